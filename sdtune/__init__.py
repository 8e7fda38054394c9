"""sdtune: parameter-efficient fine-tuning of Stable Diffusion (SD 1.x, 2.x and SDXL).

    import sdtune
    run = sdtune.train(sdtune.TrainConfig(concept="castle", method="lora", model="tiny", steps=200))
    sdtune.sample(sdtune.SampleConfig(adapter=str(run.output), prompt=["a <castle> at dawn"]))
    sdtune.load_adapter(run.output, pipe, scale=0.8)   # into a diffusers pipeline you loaded

Each function takes a config (`TrainConfig`, `SampleConfig`, `EvaluateConfig`, `ExtractConfig`: built
directly, or `.load("run.toml", steps=50)` from TOML with overrides) and returns what it produced:
`train` a `training.Run`, `sample` a `sampling.SampleResult`, `evaluate` an `evaluation.Evaluation`,
`compare` a `comparison.Comparison`. Every refusal is an `SdtuneError` of one line, naming settings as Python
spells them (`overwrite=True`, `options["rank"]`; the CLI's name flags), as every warning does.

Heavy libraries (torch, diffusers) are imported only when a function that needs them is called,
so `import sdtune` and `sdtune --help` stay fast; so are the configs and submodules (`sdtune.config`,
`sdtune.methods`, ...), on first use.
"""

import functools
import logging
import os

from .errors import SdtuneError, TrainingFailed
from .version import __version__

# bitsandbytes, which peft and transformers import whenever it is installed (`--optimizer adamw8bit`), warns on
# every CPU import that an optional 4-bit matmul kernel is missing; sdtune uses no 4-bit matmul
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["train", "sample", "evaluate", "compare", "load_adapter", "load_adapters", "open_adapter", "extract_lora",
           "TrainConfig", "SampleConfig", "EvaluateConfig", "CompareConfig", "ExtractConfig",
           "SdtuneError", "TrainingFailed", "__version__"]
CONFIGS = ("TrainConfig", "SampleConfig", "EvaluateConfig", "CompareConfig", "ExtractConfig")


def __getattr__(name: str):
    """The configs (`sdtune.TrainConfig`) and submodules (`sdtune.config`) on first use, not at `import sdtune`."""
    import importlib
    import importlib.util

    if name in CONFIGS:
        return getattr(importlib.import_module(".config", __name__), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _spelled_for_python(command: str):
    """A public function's decorator: its errors name settings as Python spells them (`config.python_spelling`, as
    `config.spelled_for_python` does; the configs loaded on the first call, not at `import sdtune`)."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            from .config import python_spelling

            with python_spelling(command):
                return function(*args, **kwargs)

        return wrapper

    return decorate


def _checked_config(config, kind: str):
    """`config` if it is a `sdtune.config.<kind>`: anything else is one clear error, not an AttributeError deep inside."""
    from . import config as configs
    from .errors import SdtuneError

    if not isinstance(config, getattr(configs, kind)):
        raise SdtuneError(f"give a sdtune.config.{kind} (such as {kind}.load(None, ...)), got {type(config).__name__}")
    return config


@_spelled_for_python("train")
def train(config):
    """Train an adapter as `config` (a `sdtune.config.TrainConfig`) says; returns a `sdtune.training.Run`: the run's
    folder (`output`), its adapter file (`adapter`), the settings it resolved, the losses and the seconds it took.

    A refused setting or input raises `SdtuneError`; a run that cannot go on (a non-finite loss) `TrainingFailed`."""
    from .training import train as _train

    return _train(_checked_config(config, "TrainConfig"))


@_spelled_for_python("sample")
def sample(config):
    """Draw images and a grid as `config` (a `sdtune.config.SampleConfig`) says; returns a `sdtune.sampling.SampleResult`:
    the output folder, the image files, the grid file, the prompts as drawn and the timings."""
    from .sampling import sample as _sample

    return _sample(_checked_config(config, "SampleConfig"))


@_spelled_for_python("evaluate")
def evaluate(config):
    """Measure a run's images as `config` (a `sdtune.config.EvaluateConfig`) says; writes eval.json and returns a
    `sdtune.evaluation.Evaluation`: `metrics` (name → value), `unavailable` (name → why) and `table()`."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(_checked_config(config, "EvaluateConfig"))


@_spelled_for_python("compare")
def compare(runs, output=None, progress: bool = True, **options):
    """Compare run folders into `output`: table (md, csv), plots, image grid; options: `CompareConfig`'s, or a whole
    `sdtune.config.CompareConfig` in place of `runs`. Returns a `sdtune.comparison.Comparison` (`runs`, `files`, `table`)."""
    from .comparison import compare as _compare
    from .config import CompareConfig

    if isinstance(runs, CompareConfig):
        if output is not None or options:
            raise SdtuneError("give a CompareConfig alone, or runs, output and options, not both")
        values = runs.to_dict()
        return _compare(values.pop("runs"), values.pop("output"), progress, **values)
    if output is None:
        raise SdtuneError("give the folder to write the comparison to: sdtune.compare(runs, output)")
    return _compare(runs, output, progress, **options)


# adapters bound to a pipeline at strengths: the settings of `sdtune merge` (`scale`), which does the same
@_spelled_for_python("merge")
def load_adapter(path, pipeline, merge: bool = True, scale: float = 1.0):
    """Apply an sdtune adapter file or run folder to `pipeline`'s UNet at strength `scale`
    (W + scale·ΔW; 0: the base weights), merged by default; returns the method (`set_scale`, `merge`, `unmerge`:
    merged here, the update is in the weights for good; `open_adapter`, then `merge()`, keeps it undoable).

    A kohya-format file (LoRA, LoHa, LoKr, full-weight diffs, from any trainer) is added to the
    base weights instead (always merged, its ΔW times `scale`)."""
    from .adapter import load_adapter as _load

    return _load(path, pipeline, merge=merge, scale=scale)


@_spelled_for_python("merge")
def load_adapters(paths, pipeline, scales=None):
    """Stack several adapters (sdtune or kohya-format) onto `pipeline`, merged: W + Σ scaleᵢ·ΔWᵢ, each ΔWᵢ
    the update that adapter makes on the weights it was trained on (the base weights, or those its base adapters
    leave where they are in the stack at the strengths it records), whatever the order. Returns how their new
    tokens are named in the stack (`StackedTokens`: later adapters' `<s0><s1>` become the next free names)."""
    from .adapter import load_adapters as _load

    return _load(paths if isinstance(paths, (str, os.PathLike)) else list(paths), pipeline, scales)


@_spelled_for_python("merge")
def open_adapter(path, pipeline):
    """The adapter bound to `pipeline`, unmerged, with `set_scale`, `merge` and `unmerge`: an sdtune
    adapter's method (its layers compute the update), or a kohya-format file's updates (not yet added)."""
    from .adapter import open_adapter as _open

    return _open(path, pipeline)


@_spelled_for_python("extract")
def extract_lora(config):
    """Write an adapter's update (sdtune or kohya-format) as a kohya LoRA/LoCon file of a chosen rank, as
    `config` (a `sdtune.config.ExtractConfig`) says; returns an `ExtractResult` with each layer's kept fraction."""
    from .extraction import extract_lora as _extract

    return _extract(_checked_config(config, "ExtractConfig"))
