"""`sdtune sweep`: plans expand to named runs; runs are trained, sampled, measured, skipped when finished,
resumed when interrupted, shared out by shards; bad plans are one line; the HTML report renders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, invoke

ROOT = Path(__file__).resolve().parents[1]

TINY_PLAN = """
name = "tiny"
[train]
model = "tiny"
steps = 2
log_with = "none"
checkpoint_every = 1
[axes]
concept = ["castle"]
method = ["atoms", "lora"]
[sample]
prompt = ["photo of a <castle>.", "a <castle> at night"]
num_images = 1
steps = 2
[evaluate]
fid_features = "none"
"""


def write_plan(folder: Path, text: str = TINY_PLAN, name: str = "plan.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def sweep(plan: Path, output: Path, **options):
    from sdtune.config import SweepConfig
    from sdtune.sweep import run_sweep

    lines: list[str] = []
    result = run_sweep(SweepConfig(plan=str(plan), output=str(output), **options), log=lines.append)
    return result, lines


@pytest.fixture(scope="module")
def finished(tmp_path_factory, private_cache):
    """The tiny plan run once: two runs, trained, sampled, measured, and the report."""
    folder = tmp_path_factory.mktemp("sweep")
    plan = write_plan(folder)
    result, lines = sweep(plan, folder / "out")
    assert result.exit_code == 0 and result.ran == ["castle-atoms", "castle-lora"], lines
    return plan, folder / "out"


def test_dry_run_lists_the_runs_by_name_and_writes_nothing(tmp_path):
    plan = write_plan(tmp_path)
    result = invoke("sweep", plan, "--dry-run", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("plan tiny: 2 runs")
    assert [line.split()[:3] for line in lines[1:]] == [["0", "castle-atoms", "pending"], ["1", "castle-lora", "pending"]]
    assert ", castle, lr 0.001 (default), seed 0, 2 steps" in lines[1] and ", castle, lr 3e-05 (default), seed 0," in lines[2]
    assert not (tmp_path / "out").exists()
    shard = invoke("sweep", plan, "--dry-run", "--shard", "1/2", "--output", tmp_path / "out")
    assert [line.split()[1] for line in shard.stdout.splitlines()[1:]] == ["castle-lora"]
    # a run of several concepts names them as a list of words, not Python's ['castle', 'canal']
    several = write_plan(tmp_path, TINY_PLAN.replace('concept = ["castle"]\n', "").replace(
        "[train]", '[train]\nconcept = ["castle", "canal"]'), "several.toml")
    lines = invoke("sweep", several, "--dry-run", "--output", tmp_path / "out").stdout.splitlines()
    assert ", castle, canal, lr 0.001 (default), seed 0, 2 steps" in lines[1], lines


def test_a_runs_several_concepts_fill_placeholders_and_run_names_joined_as_a_file_name(tmp_path):
    """{concept} of a run of several concepts, and the run name from a table of them: castle+canal, not Python's
    ['castle', 'canal']."""
    from sdtune.sweep import read_plan

    plan = write_plan(tmp_path, TINY_PLAN.replace('concept = ["castle"]\n', "").replace(
        "[train]", '[train]\nconcept = ["castle", "canal"]\nvalidation_prompts = "prompts/{concept}.txt"').replace(
        'method = ["atoms", "lora"]', 'method = ["lora", {method = "lora", concept = ["canal", "castle"], lr = 1e-4}]'))
    runs = read_plan(plan, str(tmp_path / "out")).runs
    assert [run.name for run in runs] == ["lora", "lora-canal+castle-lr0.0001"]
    assert [run.train.validation_prompts for run in runs] == ["prompts/castle+canal.txt", "prompts/canal+castle.txt"]


def test_a_sweep_trains_samples_measures_every_run_and_writes_the_report(finished):
    _, output = finished
    for name in ("castle-atoms", "castle-lora"):
        run = output / "runs" / name
        marker = json.loads((run / "sweep-run.json").read_text())
        assert marker["state"] == "finished" and marker["axes"] == {"concept": "castle", "method": name.split("-")[1]}
        assert (run / "adapter.safetensors").is_file() and (run / "eval.json").is_file()
        assert marker["prompts"] == ["photo of a sks castle.", "a sks castle at night"]
        assert all((run / image).is_file() for images in marker["images"] for image in images)
    page = (output / "report" / "index.html").read_text()
    assert "castle-atoms" in page and "castle-lora" in page and "http" not in page.replace("http-equiv", "")
    assert page.count("<img ") >= 4  # two prompts × two runs, and the loss plot
    assert 'href="../runs/castle-atoms/config.toml"' in page
    assert (output / "report" / "compare" / "comparison.csv").is_file()
    seconds = [json.loads((output / "runs" / name / "sweep-run.json").read_text())["train_seconds"] for name in ("castle-atoms", "castle-lora")]
    assert all(0 < value <= marker_seconds for value, marker_seconds in zip(seconds, [
        json.loads((output / "runs" / name / "sweep-run.json").read_text())["seconds"] for name in ("castle-atoms", "castle-lora")]))
    assert 'data-key="train_seconds">train time</th>' in page and "<p>Training took " in page and "over 2 runs" in page


def test_a_training_time_reads_as_a_person_reads_it():
    from sdtune.report import duration

    assert [duration(s) for s in (4.04, 59.94, 60, 725.4, 3600, 11220)] == ["4.0 s", "59.9 s", "1 min 00 s", "12 min 05 s",
                                                                             "1 h 00 min", "3 h 07 min"]


def test_finished_runs_are_skipped_not_retrained(finished):
    plan, output = finished
    adapters = {name: (output / "runs" / name / "adapter.safetensors").stat().st_mtime_ns for name in ("castle-atoms", "castle-lora")}
    result, lines = sweep(plan, output)
    assert result.skipped == ["castle-atoms", "castle-lora"] and result.ran == [] and result.exit_code == 0, lines
    assert {name: (output / "runs" / name / "adapter.safetensors").stat().st_mtime_ns for name in adapters} == adapters
    dry = invoke("sweep", plan, "--dry-run", "--output", output)
    assert [line.split()[2] for line in dry.stdout.splitlines()[1:]] == ["finished", "finished"]


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, private_cache):
    from sdtune.tracking import read_metrics_log

    plan = write_plan(tmp_path, TINY_PLAN.replace('"atoms", "lora"', '"atoms"').replace("steps = 2\nlog", "steps = 3\nlog"))
    result, _ = sweep(plan, tmp_path / "out")
    run = tmp_path / "out" / "runs" / "castle-atoms"
    # what a kill after step 1 leaves: the step-1 checkpoint, config.toml and metrics up to there; no adapter
    for name in ("adapter.safetensors", "sweep-run.json", "eval.json"):
        (run / name).unlink()
    for step in (2, 3):
        shutil.rmtree(run / "checkpoints" / f"step-{step}")
    dry = invoke("sweep", plan, "--dry-run", "--output", tmp_path / "out").stdout.splitlines()
    assert dry[1].split()[2] == "partial" and dry[-1] == "partial: its training stopped with checkpoints of these settings; it resumes from the latest"
    result, lines = sweep(plan, tmp_path / "out")
    assert result.ran == ["castle-atoms"], lines
    assert any("resuming from its latest checkpoint" in line for line in lines), lines
    assert [record["step"] for record in read_metrics_log(run / "metrics.jsonl")] == [1, 2, 3]
    assert (run / "adapter.safetensors").is_file()


def test_a_run_stopped_after_logging_its_last_step_resumes_to_its_last_adapter(tmp_path, private_cache, monkeypatch):
    """An interrupt after the last step is logged but before the last adapter is written (at the last checkpoint)
    leaves metrics.jsonl at the last step beside an earlier checkpoint's adapter: the next sweep resumes the run
    (it sampled that adapter as trained) and ends with the uninterrupted run's adapter."""
    from sdtune.training import Trainer

    plan = write_plan(tmp_path, TINY_PLAN.replace('"atoms", "lora"', '"atoms"').replace("steps = 2\nlog", "steps = 4\nlog")
                      .replace("checkpoint_every = 1", "checkpoint_every = 2"))
    sweep(plan, tmp_path / "uninterrupted")
    save_checkpoint = Trainer.save_checkpoint

    def interrupted_at_the_last(self):
        if self.global_step == 4:
            raise KeyboardInterrupt
        save_checkpoint(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", interrupted_at_the_last)
    with pytest.raises(KeyboardInterrupt):
        sweep(plan, tmp_path / "out")
    monkeypatch.undo()
    run = Path("runs") / "castle-atoms"
    assert json.loads((tmp_path / "out" / run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    result, lines = sweep(plan, tmp_path / "out")
    assert result.ran == ["castle-atoms"] and any("resuming from its latest checkpoint" in line for line in lines), lines
    assert (tmp_path / "out" / run / "adapter.safetensors").read_bytes() == (tmp_path / "uninterrupted" / run / "adapter.safetensors").read_bytes()


def test_an_interrupted_training_keeps_its_time_in_the_run_record(tmp_path, private_cache, monkeypatch):
    """SIGTERM (or Ctrl-C) during a run's training marks it pending with the seconds it trained, which the sweep that
    resumes it counts on from: its finished marker's train_seconds covers both invocations."""
    from sdtune.cli import Terminated
    from sdtune.training import Trainer

    plan = write_plan(tmp_path, TINY_PLAN.replace('"atoms", "lora"', '"lora"').replace("steps = 2\nlog", "steps = 3\nlog"))
    save_checkpoint = Trainer.save_checkpoint

    def slow_then_terminated(self):
        save_checkpoint(self)
        if self.global_step == 2:
            time.sleep(1.5)  # training time an interrupt must not lose
            raise Terminated

    monkeypatch.setattr(Trainer, "save_checkpoint", slow_then_terminated)
    with pytest.raises(KeyboardInterrupt):
        sweep(plan, tmp_path / "out")
    monkeypatch.undo()
    run = tmp_path / "out" / "runs" / "castle-lora"
    marker = json.loads((run / "sweep-run.json").read_text())
    assert marker["state"] == "pending" and marker["train_seconds"] >= 1.5, marker
    dry = invoke("sweep", plan, "--dry-run", "--output", tmp_path / "out").stdout.splitlines()
    assert dry[1].split()[2] == "partial", dry  # what its folder holds, as before it was marked
    result, lines = sweep(plan, tmp_path / "out")
    assert result.ran == ["castle-lora"] and any("resuming from its latest checkpoint" in line for line in lines), lines
    resumed = json.loads((run / "sweep-run.json").read_text())
    assert resumed["state"] == "finished" and resumed["train_seconds"] >= marker["train_seconds"], resumed


def test_a_changed_setting_retrains_the_run(finished, tmp_path):
    plan, output = finished
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    changed = write_plan(tmp_path, TINY_PLAN.replace('"atoms", "lora"', '"lora"').replace("steps = 2\nlog", "steps = 1\nlog"))
    dry = invoke("sweep", changed, "--dry-run", "--output", copy).stdout.splitlines()
    assert dry[1].split()[1:3] == ["castle-lora", "changed"] and dry[-1].startswith("changed: trained before with other settings")
    result, lines = sweep(changed, copy)
    assert result.ran == ["castle-lora"], lines
    assert any(line.endswith(": training") for line in lines), lines


def test_raised_steps_extend_a_finished_run_to_the_bytes_of_one_trained_in_one_go(finished, tmp_path, monkeypatch):
    """A plan whose steps are raised under a constant rate resumes its finished runs from their last checkpoint: the
    adapter is the one a run trained to the new steps from the start writes, and its samples, eval.json and the
    report's metrics are of that adapter, not the earlier one's."""
    import dataclasses

    from sdtune.comparison import summarize_run
    from sdtune.adapter import adapter_digest
    from sdtune.sweep import read_plan
    from sdtune.tracking import read_metrics_log
    from sdtune.training import train

    plan, output = finished
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    run = copy / "runs" / "castle-lora"
    images = {path: path.stat().st_mtime_ns for path in (run / "samples" / "images").iterdir()}
    old_digest = json.loads((run / "eval.json").read_text())["adapter_digest"]
    longer = write_plan(tmp_path, TINY_PLAN.replace('"atoms", "lora"', '"lora"').replace("steps = 2\nlog", "steps = 3\nlog"))
    dry = invoke("sweep", longer, "--dry-run", "--output", copy).stdout.splitlines()
    assert dry[1].split()[1:3] == ["castle-lora", "extends"] and dry[1].endswith("3 steps; resumes at step 2"), dry
    assert dry[-1].startswith("extends: trained before with fewer steps, under a rate that does not depend on the step count")
    from sdtune.training import Trainer

    steps, step = [], Trainer.step
    monkeypatch.setattr(Trainer, "step", lambda self: steps.append(self.global_step) or step(self))
    marker = json.loads((run / "sweep-run.json").read_text())
    (run / "sweep-run.json").write_text(json.dumps({**marker, "train_seconds": 1000.0}))  # its first training's, say
    started = time.perf_counter()
    result, lines = sweep(longer, copy)
    elapsed = time.perf_counter() - started
    monkeypatch.undo()
    assert result.ran == ["castle-lora"] and steps == [2], (steps, lines)  # the one step more, not all three again
    assert any(line.endswith("extending its training to 3 steps: resumes at step 2") for line in lines), lines
    assert [record["step"] for record in read_metrics_log(run / "metrics.jsonl")] == [1, 2, 3]

    one_go = dataclasses.replace(read_plan(longer, str(copy)).runs[0].train, output=str(tmp_path / "one-go"))
    assert (run / "adapter.safetensors").read_bytes() == train(one_go, progress=False).adapter.read_bytes()
    report = json.loads((run / "eval.json").read_text())
    assert report["adapter_digest"] == adapter_digest(run / "adapter.safetensors") != old_digest
    summary = summarize_run(run)
    assert summary.stale_evaluation == "" and summary.metrics == report["metrics"]
    assert json.loads((run / "sweep-run.json").read_text())["metrics"] == report["metrics"]
    # the training time counts both invocations: the first's 1000 s and the extension's
    marker = json.loads((run / "sweep-run.json").read_text())
    assert 1000 < marker["train_seconds"] <= 1000 + elapsed and marker["seconds"] < 1000
    assert "16 min " in (copy / "report" / "index.html").read_text()
    assert all(path.stat().st_mtime_ns > when for path, when in images.items())
    assert "report: 1 of 1 runs finished" in lines[-1]


def test_raised_steps_a_run_cannot_be_extended_to_are_trained_afresh_and_the_dry_run_says_why(tmp_path, private_cache):
    """A schedule whose rate depends on the step count, no checkpoint to resume from, fewer steps, or another setting
    changed with the steps: each run is `changed`, with why in a few words."""
    def plan_text(raised: int, lowered: int) -> str:
        return ('name = "grow"\nmetrics = "none"\n[train]\nmodel = "tiny-random"\nlog_with = "none"\ncheckpoint_every = 1\n'
                '[axes]\nconcept = ["castle"]\nlr_scheduler = [\n'
                f'  {{ name = "cosine", lr_scheduler = "cosine", steps = {raised} }},\n'
                f'  {{ name = "unsaved", checkpoint_every = 0, steps = {raised} }},\n'
                f'  {{ name = "lowered", steps = {lowered} }},\n'
                f'  {{ name = "other", steps = {raised}, seed = {raised} }},\n]\n')

    result, lines = sweep(write_plan(tmp_path, plan_text(2, 2)), tmp_path / "out")
    assert result.exit_code == 0 and len(result.ran) == 4, lines
    changed = write_plan(tmp_path, plan_text(3, 1), name="changed.toml")
    dry = invoke("sweep", changed, "--dry-run", "--output", tmp_path / "out").stdout.splitlines()
    states = {line.split()[1]: (line.split()[2], line.split("; ", 1)[-1]) for line in dry[1:5]}
    assert dry[1].endswith(", seed 0, 3 steps, lr_scheduler=cosine; steps: 2 -> 3 (the cosine rate depends on the step count)")
    assert ", seed 0, 1 step; " in dry[3]  # what tells the runs apart beside the steps, and a step counted as one
    assert states == {
        "castle-cosine": ("changed", "steps: 2 -> 3 (the cosine rate depends on the step count)"),
        "castle-unsaved": ("changed", "no checkpoint to extend its 2 steps from"),
        "castle-lowered": ("changed", "steps: 2 -> 1 (fewer steps)"),
        "castle-other": ("changed", "seed: 2 -> 3"),
    }, dry
    assert dry[5:] == ["changed: trained before with other settings; it is trained afresh, replacing that run"]
    result, lines = sweep(changed, tmp_path / "out")
    assert len(result.ran) == 4 and sum(line.endswith(": training") for line in lines) == 4, lines


@pytest.mark.slow  # 10-35 s on two cores; `make test-all` runs it
def test_a_run_started_from_init_weights_on_base_adapters_extends_and_is_sampled_on_them(tmp_path, private_cache):
    """init_weights gives the run the file's options (not the plan's), which config.toml records: raised steps still
    extend it. Its samples are drawn on the base adapters it trained on, stacked beneath it, as its validation was."""
    from PIL import Image

    from sdtune.config import TrainConfig
    from sdtune.training import train

    start = train(TrainConfig(model="tiny-random", method="lora", options={"targets": "transformer"}, steps=1, resolution=32,
                              log_with="none", output=str(tmp_path / "start")), progress=False).adapter

    def plan_text(steps: int) -> str:
        return ('name = "started"\nmetrics = "none"\n[train]\nmodel = "tiny-random"\nresolution = 32\nlog_with = "none"\n'
                f'checkpoint_every = 1\nsteps = {steps}\ninit_weights = "{start}"\nbase_adapters = ["{start}:0.5"]\n'
                '[axes]\nmethod = ["lora"]\n[sample]\nprompt = ["a <castle>"]\nnum_images = 1\nsteps = 1\n')

    result, lines = sweep(write_plan(tmp_path, plan_text(2)), tmp_path / "out")
    assert result.ran == ["lora"], lines
    image = next((tmp_path / "out" / "runs" / "lora" / "samples" / "images").iterdir())
    drawn = json.loads(Image.open(image).text["sdtune"])
    assert drawn["adapter"] == ["start/adapter.safetensors", "lora"] and drawn["adapter_scale"] == [0.5, 1.0], drawn
    longer = write_plan(tmp_path, plan_text(3), name="longer.toml")
    dry = invoke("sweep", longer, "--dry-run", "--output", tmp_path / "out").stdout.splitlines()
    assert dry[0].startswith("plan started: 1 run, into ")
    assert dry[1].split()[1:3] == ["lora", "extends"] and dry[1].endswith(f"3 steps, starts from {start}, on base adapters {start} at 0.5; resumes at step 2"), dry
    result, lines = sweep(longer, tmp_path / "out")
    assert any(line.endswith("extending its training to 3 steps: resumes at step 2") for line in lines), lines
    # the file it started from and trained on, written again (trained anew): the run is trained afresh, and says why
    train(TrainConfig(model="tiny-random", method="lora", options={"targets": "transformer"}, steps=1, resolution=32, seed=1,
                      log_with="none", output=str(tmp_path / "start"), overwrite=True), progress=False)
    dry = invoke("sweep", longer, "--dry-run", "--output", tmp_path / "out").stdout.splitlines()
    assert dry[1].split()[2] == "changed" and dry[1].endswith("; start/adapter.safetensors written again since it trained"), dry


def test_a_failing_run_is_recorded_and_the_others_go_on(tmp_path, private_cache):
    plan = write_plan(tmp_path, TINY_PLAN.replace(
        'concept = ["castle"]', 'images = [{ name = "missing", images = "{sweep}/missing" }, { name = "present", images = "{sweep}/images" }]')
                      .replace('"atoms", "lora"', '"lora"'))
    from sdtune.demo_images import demo_concept_folder

    shutil.copytree(demo_concept_folder("castle"), tmp_path / "out" / "images")
    result = invoke("sweep", plan, "--output", tmp_path / "out")
    assert_one_line_error(result, 1, "1 run(s) failed: missing-lora")
    marker = json.loads((tmp_path / "out" / "runs" / "missing-lora" / "sweep-run.json").read_text())
    assert marker["state"] == "failed" and "missing" in marker["error"] and marker["train_seconds"] >= 0  # its training time counts
    assert json.loads((tmp_path / "out" / "runs" / "present-lora" / "sweep-run.json").read_text())["state"] == "finished"
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert "failed" in page and 'data-key="error">note</th>' in page  # the failed run's reason, in a column of its own
    import html

    assert html.escape(marker["error"]) in page


def test_a_warning_every_run_gives_alike_is_shown_once(tmp_path, private_cache):
    """The runs read the same images: a file that is no image is named once for the sweep, not once a run; a
    warning that differs from run to run (another folder's file) is still shown."""
    from sdtune.demo_images import demo_concept_folder

    for name in ("first", "second"):
        shutil.copytree(demo_concept_folder("castle"), tmp_path / "out" / name)
    (tmp_path / "out" / "first" / "notes.png").write_bytes(b"not an image")
    (tmp_path / "out" / "second" / "notes.png").write_bytes(b"not an image")
    plan = write_plan(tmp_path, TINY_PLAN.replace(
        'concept = ["castle"]', 'images = [{ name = "first", images = "{sweep}/first" }, { name = "second", images = "{sweep}/second" }]')
                      .replace("checkpoint_every = 1", "checkpoint_every = 0").replace('name = "tiny"', 'name = "tiny"\nmetrics = "none"')
                      .replace('prompt = ["photo of a <castle>.", "a <castle> at night"]', 'prompt = ["a castle"]'))
    with pytest.warns(UserWarning) as said:
        result, lines = sweep(plan, tmp_path / "out")
    assert result.exit_code == 0 and len(result.ran) == 4, lines
    skipped = [str(warning.message) for warning in said if "notes.png" in str(warning.message)]
    assert len(skipped) == 2 and {"first" in message for message in skipped} == {True, False}, skipped


def test_a_prompt_files_warning_is_shown_once_for_its_check_and_the_runs_that_read_it(tmp_path, private_cache):
    """The [sample] prompt file is checked before the first run trains, and read again by each run's validation."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <castle> --s 1 --ss euler_a\n")
    plan = write_plan(tmp_path, f'name = "once"\nmetrics = "none"\n[train]\nmodel = "tiny-random"\nresolution = 32\nsteps = 1\n'
                                f'log_with = "none"\nvalidate_every = 1\nvalidation_prompts = "{prompts}"\n'
                                f'[axes]\nseed = [0, 1]\n[sample]\nprompts = "{prompts}"\nnum_images = 1\nsteps = 1\n')
    with pytest.warns(UserWarning) as said:
        result, lines = sweep(plan, tmp_path / "out")
    assert len(result.ran) == 2, lines
    assert sum("ignored --ss" in str(warning.message) for warning in said) == 1, [str(w.message) for w in said]


def test_a_run_another_sweep_process_holds_is_left_to_it(tmp_path, private_cache):
    from sdtune.fileio import OutputLock
    from sdtune.sweep import RUN_LOCK

    plan = write_plan(tmp_path)
    held = tmp_path / "out" / "runs" / "castle-atoms"
    held.mkdir(parents=True)
    with OutputLock(held, RUN_LOCK):
        result, lines = sweep(plan, tmp_path / "out")
    assert result.ran == ["castle-lora"] and result.skipped == ["castle-atoms"] and not result.failed, lines
    assert any("castle-atoms: in use by another sweep process, skipped" in line for line in lines)
    assert not (held / "sweep-run.json").exists()


def test_two_shards_share_a_plan_and_one_report_gathers_both(tmp_path, private_cache):
    plan = write_plan(tmp_path)
    output = tmp_path / "out"
    first, first_lines = sweep(plan, output, shard="0/2")
    second, second_lines = sweep(plan, output, shard="1/2")
    assert (first.ran, second.ran) == (["castle-atoms"], ["castle-lora"]), first_lines + second_lines
    assert "report: 1 of 2 runs finished" in first_lines[-1] and "report: 2 of 2 runs finished" in second_lines[-1]
    page = (output / "report" / "index.html").read_text()
    assert page.count('class="finished"') == 2


@pytest.mark.slow
def test_two_shard_processes_at_once_then_one_report(tmp_path, private_cache):
    plan = write_plan(tmp_path)
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    shards = [
        subprocess.Popen([sys.executable, "-m", "sdtune", "sweep", str(plan), "--shard", f"{i}/2", "--output", str(output)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [shard.communicate(timeout=300) for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], outputs
    assert "castle-atoms" in outputs[0][0] and "castle-lora" not in outputs[0][0]
    assert "castle-lora" in outputs[1][0] and "castle-atoms" not in outputs[1][0]
    result = invoke("sweep", plan, "--report-only", "--output", output)
    assert result.exit_code == 0 and "2 of 2 runs finished" in result.stdout, result.output
    page = (output / "report" / "index.html").read_text()
    assert page.count('class="finished"') == 2


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_the_report_renders_in_a_browser_sorts_and_shows_every_image(finished, tmp_path):
    _, output = finished
    page = output / "report" / "index.html"
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
         page.resolve().as_uri() + "?selftest=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert "selftest PASS" in result.stdout, (result.stdout[-2000:], result.stderr[-2000:])
    assert "images=5 rows=2" in result.stdout  # two prompts × two runs, the loss plot; two table rows


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the report's script")
def test_the_report_sorts_axis_labels_by_their_numbers():
    """Clicking a seed or lr_scale column orders seed2 before seed10 and lr3x before lr10x, as a reader expects."""
    from sdtune.report import SCRIPT

    compare = re.search(r"function compare\(a, b\) \{.*?\n  \}", SCRIPT, re.S).group(0)
    labels = ["seed10", "seed2", "seed1", "lr10x", "lr3x", "lr0.3x", "3e-05", "0.001"]
    script = f"{compare}\nconsole.log(JSON.stringify({json.dumps(labels)}.sort(compare)));"
    result = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout) == ["3e-05", "0.001", "lr0.3x", "lr3x", "lr10x", "seed1", "seed2", "seed10"], result.stderr


BAD_PLANS = [
    ("unknown axis", TINY_PLAN.replace("[axes]", "[axes]\ncolour = [1, 2]"), "unknown axis 'colour'"),
    ("unknown method", TINY_PLAN.replace('"atoms", "lora"', '"atoms", "lorax"'), "run castle-lorax: unknown method 'lorax'"),
    ("bad learning rate", TINY_PLAN.replace("[axes]", "[axes]\nlr = [1e-4, -1.0]"), "run lr-1-castle-atoms: lr must be positive and finite, got -1.0"),
    ("empty axis", TINY_PLAN.replace('concept = ["castle"]', "concept = []"), "axis concept has no values"),
    ("unknown key", "colour = 1\n" + TINY_PLAN, "unknown key(s) colour"),
    ("unknown train setting", TINY_PLAN.replace("steps = 2\nlog", "stepz = 2\nlog"), "unknown [train] setting(s) stepz"),
    ("per-run setting", TINY_PLAN.replace("[train]", '[train]\noutput = "x"'), "[train] output is set per run"),
    ("bad option", TINY_PLAN.replace('"atoms", "lora"', '{ method = "lora", options = { rank = "big" } }'), "options.rank"),
    ("same names", TINY_PLAN.replace('"atoms", "lora"', '"lora", { name = "lora", method = "lora" }'), "both named 'castle-lora'"),
    ("a repeated value", TINY_PLAN.replace("[axes]", "[axes]\nseed = [0, 1, 0]"), "runs 0 and 4 are both named 'seed0-castle-atoms'; axis seed lists 0 twice"),
    ("values labelled alike", TINY_PLAN.replace("[axes]", "[axes]\nlr_scale = [0.1, 0.10000001]"),
     "axis lr_scale's values 0.1 and 0.10000001 are labelled alike"),
    ("values joined alike", TINY_PLAN.replace('"atoms", "lora"]', '"atoms", "lora"]\ntoken = ["sks-x", "sks"]\ntemplate = ["a {token}", "x-a {token}"]'),
     "their values on the axes join into one name"),
    ("lr and lr_scale", TINY_PLAN.replace("[axes]", '[axes]\nlr_scale = [1]\nseed = [{ name = "s1", seed = 1, lr = 1e-3 }]'),
     "give lr or lr_scale, not both"),
    ("unknown metrics", 'metrics = "fid"\n' + TINY_PLAN, "metrics 'fid' is not a metric set"),
    ("not toml", "name = ", "not valid TOML"),
    # steps is a training and a sampling setting: the line says which section refused it
    ("sampling steps", TINY_PLAN.replace("num_images = 1\nsteps = 2", "num_images = 1\nsteps = 0"),
     "run castle-atoms: [sample] steps must be at least 1, got 0"),
    ("evaluate setting", TINY_PLAN.replace('fid_features = "none"', 'fid_features = "sift"'), "run castle-atoms: [evaluate] fid_features must be one of"),
    # datasets: what a run would only find after its model loaded
    ("misspelt class", TINY_PLAN.replace('concept = ["castle"]', 'dataset = [{ name = "d", dataset = "digits", classes = ["three", "sevn"] }]'),
     "run d-atoms: unknown class 'sevn' for dataset 'digits'"),
    ("dataset without its folder", TINY_PLAN.replace('concept = ["castle"]', 'dataset = ["digits", "eurosat"]'),
     "run eurosat-atoms: dataset 'eurosat' needs data_root = DIR"),
    # a model no run could load: found as the plan is read, not as its runs start after the others trained
    ("unknown model", TINY_PLAN.replace('model = "tiny"\n', "").replace("[axes]", '[axes]\nmodel = ["tiny", "tiny-sd3-random"]'),
     'run tiny-sd3-random-castle-atoms: model = "tiny-sd3-random": no such folder, and not a hub id; use model = "tiny"'),
    ("malformed hub id", TINY_PLAN.replace('model = "tiny"', 'model = "org/-name"'), 'model = "org/-name": no such folder, and not a hub id (ORG/NAME'),
    ("folder of no pipeline", TINY_PLAN.replace('model = "tiny"', 'model = "/"'), 'model = "/": not a diffusers pipeline folder'),
    ("sampling's model", TINY_PLAN.replace("num_images = 1\n", 'num_images = 1\nmodel = "tiny-sd3"\n'), 'run castle-atoms: [sample] model = "tiny-sd3": no such folder'),
    ("built-in dataset given a folder", TINY_PLAN.replace('concept = ["castle"]', 'dataset = ["digits"]').replace("[train]", '[train]\ndata_root = "d"'),
     "dataset 'digits' is built in; it takes no data_root"),
]


@pytest.mark.parametrize("text,message", [case[1:] for case in BAD_PLANS], ids=[case[0] for case in BAD_PLANS])
def test_a_bad_plan_is_refused_in_one_line_before_anything_runs(text, message, tmp_path):
    plan = write_plan(tmp_path, text)
    result = invoke("sweep", plan, "--output", tmp_path / "out")
    assert_one_line_error(result, 2, message)
    assert result.stdout == "" and not (tmp_path / "out").exists()


def test_a_missing_plan_is_refused(tmp_path):
    assert_one_line_error(invoke("sweep", tmp_path / "nope.toml"), 2, "nope.toml: no such file")
    assert_one_line_error(invoke("sweep", tmp_path), 2, "a folder; give a TOML file")


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "0/0"])
def test_a_bad_shard_is_refused(shard, tmp_path):
    assert_one_line_error(invoke("sweep", write_plan(tmp_path), "--shard", shard), 2, "--shard takes i/N")


@pytest.mark.parametrize("plan,count,names", [
    ("paper-fewshot", 24, ["castle-atoms-m9", "castle-atoms-m9-m1_4", "castle-atoms-m9-kc2", "canal-lora-r16", "canal-lokr-r8-both"]),
    ("paper-vtab", 19, ["cifar", "caltech101", "sun397", "eurosat", "smallnorb_ele"]),
    ("digits-quality", 8, ["atoms-seed0", "lora-seed0", "gift-seed0", "oft-seed0"]),
    ("digits-lr", 54, ["lora-lr3e-5-seed0", "difffit-lr3e-5-seed2", "bitfit-lr3e-4-seed1", "atoms-lr3e-3-seed2", "lokr-lr1e-4-seed1"]),
])
def test_the_shipped_plans_expand(plan, count, names, tmp_path):
    from sdtune.sweep import read_plan

    expanded = read_plan(ROOT / "sweeps" / f"{plan}.toml", output=str(tmp_path))
    assert len(expanded.runs) == count
    assert set(names) <= {run.name for run in expanded.runs}
    assert [run.index for run in expanded.runs] == list(range(count))
    if plan == "paper-vtab":
        from sdtune.datasets import vtab_tasks

        assert {run.train.dataset for run in expanded.runs} == set(vtab_tasks())
    result = invoke("sweep", ROOT / "sweeps" / f"{plan}.toml", "--dry-run", "--output", tmp_path / "out")
    assert result.exit_code == 0 and f"{count} runs" in result.stdout.splitlines()[0], result.output


def test_the_digits_metric_set_measures_a_run_against_the_base_model(tmp_path, private_cache):
    plan = (ROOT / "sweeps" / "digits-quality.toml").read_text()
    plan = (plan.replace("steps = 200", "steps = 1").replace("steps = 25", "steps = 2").replace("num_images = 4", "num_images = 1")
            .replace('prompts = "prompts/', f'prompts = "{ROOT.as_posix()}/prompts/'))
    plan = re.sub(r'(?m)^method = \[.*\]$', 'method = ["lora"]', plan)  # whatever methods the plan lists
    result, lines = sweep(write_plan(tmp_path, plan), tmp_path / "out")
    assert result.ran == ["lora-seed0"], lines
    assert len(list((tmp_path / "out" / "concept-images").glob("*.png"))) == 6
    report = json.loads((tmp_path / "out" / "runs" / "lora-seed0" / "eval.json").read_text())
    assert set(report["metrics"]) == {"digit_fidelity", "style_fidelity", "preservation"}
    assert 0 <= report["metrics"]["preservation"] <= 1 and 0 <= report["base_preservation"] <= 1
    assert report["concept_read_as_digit"] is not None and report["num_parameters"] > 0
    assert len(list((tmp_path / "out" / "base").glob("*/images/*.png"))) == 10  # the base model's draws, once


def test_the_best_learning_rate_keeps_preservation_and_learns_most():
    from sdtune.digits import best_learning_rates

    def row(method, lr, style, preservation, base=1.0):
        return {"method": method, "lr": lr, "style_fidelity": style, "preservation": preservation, "base_preservation": base}

    rows = [row("a", 1e-3, 0.1, 1.0), row("a", 1e-3, 0.2, 0.9), row("a", 3e-3, 0.3, 0.95), row("a", 3e-3, 0.3, 0.8),
            row("a", 1e-2, 0.6, 0.5), row("b", 1e-3, 0.5, 0.5)]
    best = best_learning_rates(rows)
    assert best["a"]["lr"] == 1e-3 and best["a"]["seeds"] == 2 and best["a"]["style_fidelity"] == pytest.approx(0.15)
    assert best["b"] is None  # every rate lost more than 10 points


@pytest.mark.slow
def test_a_sweep_under_two_processes_trains_each_run_on_both(tmp_path, private_cache):
    """As `accelerate launch --multi_gpu` runs it: torchrun with a two-process gloo group (see test_multiprocess)."""
    from test_multiprocess import free_port

    plan = write_plan(tmp_path)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "sdtune", "sweep", str(plan), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("finished in") == 2  # the main process alone reports
    for name in ("castle-atoms", "castle-lora"):
        run = tmp_path / "out" / "runs" / name
        assert json.loads((run / "sweep-run.json").read_text())["state"] == "finished"
        assert json.loads((run / "checkpoints" / "step-2" / "state.json").read_text())["num_processes"] == 2


def test_the_report_gathers_the_runs_that_differ_only_in_their_seed():
    """Mean ± sample standard deviation over the finished seeds of each (method, lr) group, in plan order; a
    pending seed is counted but not averaged; the trainable count is shown as it is, not averaged."""
    from sdtune.report import across_seeds, seeds_csv, seeds_section

    def run(method, seed, state, dino=None):
        values = {"trainable_parameters": 4212 if method == "atoms" else 213152, "train_seconds_per_step": 0.1}
        if dino is not None:
            values["dino"] = dino
        return {"method": method, "lr_scale": "lr1x", "seed": f"seed{seed}"}, state, values if state == "finished" else {}

    runs = [run("lora", 0, "finished", 0.5), run("lora", 1, "finished", 0.7), run("lora", 2, "finished", 0.6),
            run("atoms", 0, "finished", 0.4), run("atoms", 1, "pending"),
            run("loha", 0, "finished", 0.07596), run("loha", 1, "finished", 0.076)]
    groups = across_seeds(runs, ["method", "lr_scale", "seed"], ["train_seconds_per_step", "dino"])
    assert [(g["axes"]["method"], g["finished"], g["seeds"], g["trainable"]) for g in groups] == [
        ("lora", 3, 3, [213152]), ("atoms", 1, 2, [4212]), ("loha", 2, 2, [213152])]
    mean, spread = groups[0]["stats"]["dino"]
    assert mean == pytest.approx(0.6) and spread == pytest.approx(0.1)  # n − 1: sqrt((0.01 + 0 + 0.01) / 2)
    assert groups[1]["stats"]["dino"] == (pytest.approx(0.4), None)  # one seed: no spread
    keys = [("train_seconds_per_step", "s/step"), ("dino", "DINO")]
    page = "".join(seeds_section(groups, ["method", "lr_scale"], keys))
    assert ">0.60 ± 0.10<" in page and ">1 of 2<" in page and ">213,152<" in page and ">0.4000<" in page
    assert ">0.100<" in page and "second significant digit" in page  # s/step at the run table's 3 places; the rule, once
    lines = seeds_csv(groups, ["method", "lr_scale"], [key for key, _ in keys]).splitlines()
    assert lines[0] == "method,lr_scale,seeds,finished,trainable_parameters,train_seconds_per_step_mean,train_seconds_per_step_std,dino_mean,dino_std"
    assert lines[2].startswith("atoms,lr1x,2,1,4212,0.1,,0.4,")
    assert lines[3].endswith(",0.07598,2.8284271e-05")  # the mean of 0.07596 and 0.076 is not 0.07597999999999999


def test_a_report_written_while_another_shard_finishes_a_run_is_written_again(finished, tmp_path, monkeypatch):
    """Two shards finishing together: the one that read the states before the other's last run finished writes its
    report again, so whichever writes last, the report holds every finished run."""
    import sdtune.report

    plan, output = finished
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    marker = copy / "runs" / "castle-lora" / "sweep-run.json"
    saved = marker.read_bytes()
    marker.unlink()  # castle-lora is still running in the other shard
    write_html_report, calls = sdtune.report.write_html_report, []

    def other_shard_finishes_meanwhile(plan, comparison):
        path = write_html_report(plan, comparison)
        calls.append(len(comparison.runs))
        if not marker.exists():
            marker.write_bytes(saved)
        return path

    monkeypatch.setattr(sdtune.report, "write_html_report", other_shard_finishes_meanwhile)
    result, lines = sweep(plan, copy, report_only=True)
    assert calls == [1, 2] and lines[-1].startswith("report: 2 of 2 runs finished"), (calls, lines)
    assert "2 runs: 2 finished" in (copy / "report" / "index.html").read_text()


def test_shards_writing_the_report_at_once_take_turns(finished, tmp_path, monkeypatch):
    """Two shards writing report/compare at once would remove the plots the other just wrote: they take turns on the
    report folder's lock, each writing a whole report; one kept waiting past REPORT_LOCK_WAIT leaves it to the holder."""
    import threading

    import sdtune.comparison
    import sdtune.sweep
    from sdtune.fileio import OutputLock

    plan, output = finished
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    compare, writing, overlaps = sdtune.comparison.compare, [], []

    def slow_compare(*args, **kwargs):
        writing.append(threading.get_ident())
        overlaps.append(len(writing))
        try:
            time.sleep(0.5)  # long enough for the other shard to start meanwhile, were it let
            return compare(*args, **kwargs)
        finally:
            writing.remove(threading.get_ident())

    monkeypatch.setattr(sdtune.comparison, "compare", slow_compare)
    said: list = []
    shards = [threading.Thread(target=lambda: said.append(sweep(plan, copy, report_only=True))) for _ in range(2)]
    for shard in shards:
        shard.start()
    for shard in shards:
        shard.join()
    assert overlaps == [1, 1], overlaps
    assert all(result.report == copy / "report" / "index.html" and lines[-1].startswith("report: 2 of 2 runs finished")
               for result, lines in said), said
    plots = {path.name for path in (copy / "report" / "compare").iterdir()}
    assert {"comparison.md", "comparison.csv", "training-loss-vs-step.png"} <= plots and not any(".tmp" in p for p in plots)
    assert not (copy / "report" / ".sdtune.lock").exists()

    monkeypatch.setattr(sdtune.sweep, "REPORT_LOCK_WAIT", 0.3)
    with OutputLock(copy / "report"):  # another shard writing the report, for longer than the wait
        result, lines = sweep(plan, copy, report_only=True)
    assert result.report is None and overlaps == [1, 1], lines
    assert re.fullmatch(rf"report: not written: pid {os.getpid()} on \S+ has been writing .*report for over 0.3 s, and it is "
                        r"left to it \(`sdtune sweep .*plan.toml --report-only` writes it again\)", lines[-1]), lines


def test_metrics_that_cannot_be_measured_are_one_warning_a_reason(recwarn):
    from sdtune.sweep import each_warning_once, warn_unavailable

    offline = "--clip-model x: not in the local Hugging Face cache and the hub is offline"
    with each_warning_once():
        for _ in range(3):  # three runs of a sweep, all offline alike
            warn_unavailable({"clip_t": offline, "clip_i": offline, "fid": "--fid-features none"})
    assert [str(w.message) for w in recwarn] == [f"CLIP-T, CLIP-I unavailable: {offline}", "FID unavailable: --fid-features none"]


def test_a_mean_is_shown_to_the_decimal_place_of_its_spread():
    """SPREAD_RULE: the spread's second significant digit, at most two places finer than the column (4 here); a
    smaller spread in scientific notation. One seed's value reads as the run table shows it: 0.4000 beside 0.8468
    (it read "0.4", its trailing zeros dropped, as if measured less precisely)."""
    from sdtune.report import _mean_spread

    assert _mean_spread(0.8751454, 7.7e-05) == "0.875145 ± 0.000077"
    assert _mean_spread(123.4, 12.3, 2) == "123 ± 12"
    assert _mean_spread(0.9444, 0.0) == "0.9444 ± 0" and _mean_spread(0.4, None) == "0.4000"
    assert _mean_spread(0.84, None) == "0.8400" and _mean_spread(33.2, None, 2) == "33.20"
    assert _mean_spread(0.860071364, 8.2e-08) == "0.860071 ± 8.2e-08"  # not 0.860071364 ± 0.000000082
    assert _mean_spread(1.264e-05, 3e-07) == "1.264e-05 ± 3.0e-07"


def test_a_metric_reads_alike_everywhere_small_ones_in_scientific_notation():
    from sdtune.evaluation import format_metric
    from sdtune.report import _number

    assert format_metric("clip_i", 0.84) == "0.8400" and format_metric("clip_t", 33.2) == "33.20"
    assert format_metric("diversity", 1.264e-05) == "1.264e-05" and format_metric("diversity", 0.0) == "0.0000"
    assert format_metric("kid", 0.00004) == "4.000e-05" and format_metric("kid", 0.0004) == "0.00040"
    assert _number("clip_i", 0.84) == "0.8400" and _number("lr", 1e-05) == "1e-05" and _number("lr", 0.0003) == "0.0003"
    assert _number("train_seconds_per_step", 0.1) == "0.100" and _number("trainable_parameters", 4212) == "4,212"


def test_the_reports_plots_are_inlined_whole_not_as_previews(finished):
    """A 256-pixel preview of a plot blurs its labels away: plots are inlined as the PNGs they are."""
    import base64
    import io

    from PIL import Image

    _, output = finished
    page = (output / "report" / "index.html").read_text()
    encoded = re.search(r'<img src="data:image/png;base64,([^"]+)" alt="training-loss-vs-step">', page)
    assert encoded, "the loss plot is not inlined as a PNG"
    inlined = Image.open(io.BytesIO(base64.b64decode(encoded.group(1))))
    assert inlined.size == Image.open(output / "report" / "compare" / "training-loss-vs-step.png").size and max(inlined.size) > 256


def test_a_dataset_runs_samples_are_its_classes_unless_the_plan_gives_prompts(tmp_path):
    from sdtune.sweep import read_plan

    text = ('name = "ds"\n[train]\nmodel = "tiny"\ndataset = "digits"\nclasses = ["three", "seven"]\nsteps = 1\n'
            '[axes]\nmethod = ["atoms"]\n[sample]\nnum_images = 1\n')
    sample = read_plan(write_plan(tmp_path, text), tmp_path / "out").runs[0].sample
    assert (sample.dataset, sample.classes, sample.num_images) == ("digits", ["three", "seven"], 1)
    given = read_plan(write_plan(tmp_path, text + 'prompt = ["a three"]\n', name="given.toml"), tmp_path / "out").runs[0].sample
    assert given.dataset is None and given.prompt == ["a three"]


def test_a_concept_runs_samples_are_each_concepts_training_prompt_unless_the_plan_gives_prompts(tmp_path):
    """[sample] without prompts: a run of several concepts draws its training prompt with each concept's placeholder
    in turn (a row each, as `sdtune evaluate` measures it), a run of one concept its one training prompt."""
    from sdtune.sweep import read_plan

    text = ('name = "two"\n[train]\nmodel = "tiny"\nconcept = ["castle", "canal"]\ntemplate = "a {token} at dusk"\n'
            'steps = 1\n[axes]\nmethod = ["atoms"]\n[sample]\nnum_images = 1\n')
    sample = read_plan(write_plan(tmp_path, text), tmp_path / "out").runs[0].sample
    assert sample.prompt == ["a <castle> at dusk", "a <canal> at dusk"] and sample.prompts is None
    one = text.replace('concept = ["castle", "canal"]', 'concept = "castle"')
    assert read_plan(write_plan(tmp_path, one, name="one.toml"), tmp_path / "out").runs[0].sample.prompt == ["a <castle> at dusk"]
    given = read_plan(write_plan(tmp_path, text + 'prompt = ["a <canal>"]\n', name="given.toml"), tmp_path / "out").runs[0].sample
    assert given.prompt == ["a <canal>"]


def test_the_report_names_the_settings_that_tell_runs_apart_beside_their_axes(tmp_path, private_cache):
    """Two runs of one method whose axis values (tables named by their label) set a clip_skip and a zero terminal SNR:
    the report's table says so, as compare's does; a setting an axis's column shows (seed) is not said twice."""
    import html

    text = ('name = "reading"\nmetrics = "none"\n[train]\nmodel = "tiny-random"\nsteps = 1\nlog_with = "none"\n'
            '[axes]\nmethod = [{ name = "plain", method = "lora" }, { name = "skip2", method = "lora", clip_skip = 2, resolution = 32 }]\n'
            'seed = [0, 1]\n[sample]\nprompt = ["a <castle>"]\nnum_images = 1\nsteps = 1\n')
    plan = write_plan(tmp_path, text)
    dry = invoke("sweep", plan, "--dry-run", "--output", tmp_path / "out").stdout.splitlines()
    assert dry[1].endswith("  plain-seed0  pending   lora, castle, lr 3e-05 (default), seed 0, 1 step"), dry
    assert dry[4].endswith("  skip2-seed1  pending   lora, castle, lr 3e-05 (default), seed 1, 1 step, clip_skip=2, resolution=32"), dry
    result, lines = sweep(plan, tmp_path / "out")
    assert result.exit_code == 0 and len(result.ran) == 4, lines
    assert sum(line.endswith("sampling") for line in lines) == 4 and not any("measuring" in line for line in lines), lines
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    header = re.search(r'<table id="runs"><thead><tr>(.*?)</tr>', page).group(1)
    assert re.findall(r'data-key="([^"]+)"', header)[:7] == ["index", "run", "state", "axis-method", "axis-seed", "variant", "settings"]
    settings = {name: html.unescape(cell) for name, cell in re.findall(
        r'<tr class="finished" data-run="([^"]+)">(?:<td[^>]*>.*?</td>){6}<td data-value="([^"]*)">', page)}
    skip2 = "clip_skip=2, resolution=32"  # no column of the report's shows the size, as compare's px column does
    assert settings == {"plain-seed0": "", "plain-seed1": "", "skip2-seed0": skip2, "skip2-seed1": skip2}, settings
    assert 'data-key="error"' not in page  # no run failed: no note column standing empty
    table = re.sub(" +", " ", (tmp_path / "out" / "report" / "compare" / "comparison.md").read_text())
    assert "| skip2-seed1 | lora | defaults | clip_skip=2, seed=1 | 32 |" in table, table
    # metrics = "none": said once, not a line a run that it was not evaluated
    assert "not evaluated" not in table and "Missing metrics" not in table
    assert table.count('- Metrics: none were asked for (the sweep\'s metrics = "none").') == 1, table
    assert 'No metrics were asked for (the plan\'s metrics = "none").' in page and "<p>Settings: the training settings" in page
    (tmp_path / "out" / "runs" / "plain-seed0" / "sweep-run.json").unlink()  # trained, but not marked finished
    result, lines = sweep(plan, tmp_path / "out")
    assert result.ran == ["plain-seed0"], lines
    assert any(line.endswith("trained earlier with these settings; sampling") for line in lines), lines


def test_the_reports_table_shows_each_metric_at_one_precision_as_comparison_md_does(tmp_path, private_cache):
    """0.86 and 0.8599 in one column read as numbers of different precision: the report shows a metric's column as
    comparison.md does (CLIP-T 33.20, CLIP-I 0.8600, KID 0.50000, s/step 0.125). An earlier plan's seeds.csv goes."""
    from sdtune.comparison import compare
    from sdtune.config import TrainConfig
    from sdtune.evaluation import FORMAT, METRICS_VERSION
    from sdtune.report import write_html_report
    from sdtune.sweep import Plan, RunSpec, write_marker
    from sdtune.training import train

    folder = train(TrainConfig(model="tiny-random", steps=1, lr=1.2345e-4, log_with="none", output=str(tmp_path / "out" / "runs" / "a")),
                   progress=False).output
    (folder / "eval.json").write_text(json.dumps({"format": FORMAT, "metrics_version": METRICS_VERSION, "unavailable": {},
                                                  "metrics": {"clip_t": 33.2, "clip_i": 0.86, "kid": 0.5, "diversity": 1.264e-05}}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "step_seconds": 0.125}\n')
    run = RunSpec(0, "a", {}, folder, TrainConfig(), None, {}, fingerprint="f")
    write_marker(run, "finished")
    plan = Plan(tmp_path / "plan.toml", "one", "", tmp_path / "out", "standard", {}, [], None, {}, runs=[run])
    (plan.report_folder).mkdir(parents=True)
    (plan.report_folder / "seeds.csv").write_text("method,seeds\nlora,3\n")  # an earlier plan's, with a seed axis
    page = write_html_report(plan, compare([str(folder)], str(tmp_path / "cmp"), grid=False, progress=False)).read_text()
    cells = dict(re.findall(r'<td class="number" data-value="([^"]+)">([^<]*)</td>', page))
    assert cells["33.2"] == "33.20" and cells["0.86"] == "0.8600" and cells["0.5"] == "0.50000" and cells["0.125"] == "0.125", cells
    # the learning rate as config.toml writes it, not at a metric's precision; a diversity near 1e-5 as comparison.md
    # shows it, in scientific notation rather than 0.0000
    assert cells["0.00012345"] == "0.00012345" and cells["1.264e-05"] == "1.264e-05", cells
    assert "| 1.264e-05 |" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert not (plan.report_folder / "seeds.csv").exists()  # this plan has no seed axis: no spread over seeds to read


def test_a_report_with_no_run_finished_under_its_plan_keeps_no_earlier_comparison(finished, tmp_path):
    """The plan changed and nothing has run since: the report says 0 finished, and report/compare no longer holds the
    earlier runs' table and plots, which would be read as this plan's."""
    _, output = finished
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    assert (copy / "report" / "compare" / "comparison.md").is_file() and (copy / "report" / "compare" / "training-loss-vs-step.png").is_file()
    changed = write_plan(tmp_path, TINY_PLAN.replace("steps = 2\nlog", "steps = 1\nlog"))
    result, lines = sweep(changed, copy, report_only=True)
    assert lines[-1].startswith("report: 0 of 2 runs finished"), lines
    assert not any((copy / "report" / "compare").iterdir())
    assert "2 runs: 0 finished, 0 failed, 2 pending." in (copy / "report" / "index.html").read_text()


def test_a_plans_hub_models_are_checked_in_the_cache_alone(tmp_path, monkeypatch):
    """A well-formed hub id not in the cache is read without asking the hub (offline or not; its run finds it out as
    train does); one whose cached model_index.json names a pipeline sdtune does not train is refused."""
    import huggingface_hub

    import sdtune.models
    from sdtune.sweep import read_plan

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(sdtune.models._HubFiles, "__call__", no_network)
    plan = write_plan(tmp_path, TINY_PLAN.replace('model = "tiny"', 'model = "someone/not-cached-model"'))
    for offline in ("1", "0"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        assert {run.train.model for run in read_plan(plan, output=str(tmp_path / "out")).runs} == {"someone/not-cached-model"}
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: str(index) if name == "model_index.json" else None)
    result = invoke("sweep", plan, "--dry-run", "--output", tmp_path / "out")
    assert_one_line_error(result, 2, 'run castle-atoms: model = "someone/not-cached-model" is a StableDiffusion3Pipeline, which sdtune')
    assert not (tmp_path / "out").exists()


def test_a_plans_errors_name_its_toml_keys_also_to_python_callers(tmp_path):
    """A plan is TOML: its refusals name the keys it spells (lr, options.rank), not flags (--lr) nor Python's
    (options["rank"]), whether the CLI or Python code ran it."""
    from sdtune.config import SweepConfig
    from sdtune.errors import SdtuneError
    from sdtune.sweep import run_sweep

    plan = write_plan(tmp_path, TINY_PLAN.replace('"atoms", "lora"', '{ method = "lora", options = { rank = 0 } }'))
    with pytest.raises(SdtuneError) as refused:
        run_sweep(SweepConfig(plan=str(plan), output=str(tmp_path / "out")), log=lambda line: None)
    assert "options.rank" in str(refused.value) and "--rank" not in str(refused.value) and '["rank"]' not in str(refused.value)
    assert "options.rank" in invoke("sweep", plan, "--output", tmp_path / "out").stderr


def test_a_new_metrics_version_measures_a_standard_plans_finished_runs_again(monkeypatch):
    """Runs measured by `sdtune evaluate` whose metrics now mean otherwise are not finished with the plan's settings
    (they are sampled and measured again); a plan of other metric sets keeps its fingerprints."""
    from sdtune import evaluation
    from sdtune.sweep import fingerprint

    before = {metrics: fingerprint({"steps": 1}, None, {}, metrics) for metrics in ("standard", "digits", "none")}
    monkeypatch.setattr(evaluation, "METRICS_VERSION", evaluation.METRICS_VERSION + 1)
    after = {metrics: fingerprint({"steps": 1}, None, {}, metrics) for metrics in ("standard", "digits", "none")}
    assert after["standard"] != before["standard"]
    assert after["digits"] == before["digits"] and after["none"] == before["none"]
