"""What a run is drawn and measured with where no prompt is given: its training prompt, each concept's in turn for a
run of several, a dataset run's class captions. Read from the run folder alone, for sampling and evaluation alike."""

from __future__ import annotations

from pathlib import Path

from .errors import SdtuneError, error_line


def run_prompt(run: Path, settings: dict, placeholder: str) -> str:
    """The run's training prompt with the placeholder, e.g. 'photo of a <castle>.', from `settings`, its config.toml
    as read (`run_prompts`)."""
    template = settings.get("template", "photo of a {token}.")
    try:
        return template.format(token=placeholder)
    except (AttributeError, LookupError, ValueError) as error:  # a config.toml edited by hand, or not sdtune's
        raise SdtuneError(
            f"{run / 'config.toml'}: template {template!r} is not a caption template with {{token}} ({error_line(error)}); "
            "give --prompt or --prompts"
        ) from None


def run_prompts(run: Path, placeholder: str, tokens: str | dict[str, str] | None = None) -> list[str]:
    """The prompts a run is measured with by default: a dataset run's caption of each class (as `sdtune sample
    --dataset` draws them); a run of several concepts' training prompt with each concept's placeholder in turn, in the
    order it trained them (its config.toml's, else its adapter's `tokens`: an adapter file apart from its run); else
    its training prompt."""
    from .config import read_toml
    from .datasets import class_captions

    settings = read_toml(run / "config.toml") if (run / "config.toml").is_file() else {}
    if settings.get("dataset"):
        return [caption for _, caption in class_captions(
            settings["dataset"], settings.get("data_root"), settings.get("classes") or None, settings.get("class_template"))]
    concepts = settings_concepts(settings) or (list(tokens) if isinstance(tokens, dict) else [])
    if len(concepts) > 1:
        return [run_prompt(run, settings, f"<{name}>") for name in concepts]
    return [run_prompt(run, settings, placeholder)]


def run_concepts(run: Path | None) -> list[str]:
    """The concepts a run's config.toml names (a list for several), [] for a dataset's run or none readable."""
    from .config import read_toml

    try:
        settings = read_toml(run / "config.toml") if run is not None and (run / "config.toml").is_file() else {}
    except (SdtuneError, OSError, ValueError):
        return []
    return settings_concepts(settings)


def settings_concepts(settings: dict) -> list[str]:
    """The concepts a run's settings (its config.toml as read) name; [] for a dataset's run."""
    concepts = settings.get("concept")
    if settings.get("dataset") or not concepts:
        return []
    return [str(name) for name in concepts] if isinstance(concepts, list) else [str(concepts)]
