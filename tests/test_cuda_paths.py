"""Branches of the training loop that only a GPU run takes, run on a CPU by switching them on.

On an accelerator the trainer reads each step's values while the next step waits in the device's queue
(`Trainer.reads_late`); a CPU reads every step at once. The late reads must log and save exactly what
reading at once does, and a non-finite step read late must stop the run before anything is saved after it.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.config import TrainConfig
from sdtune.errors import TrainingFailed
from sdtune.training import Trainer, train


def config(output, **settings) -> TrainConfig:
    return TrainConfig(model="tiny-random", output=str(output), log_with="none", **{"seed": 3, **settings})


def records(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def late_reads(monkeypatch):
    """Switch the GPU's late reads on; the steps each read finds already taken past it."""
    finished = []
    original = Trainer.finish

    def finish(self, result):
        finished.append((result.step, self.global_step))
        return original(self, result)

    monkeypatch.setattr(Trainer, "reads_late", True)
    monkeypatch.setattr(Trainer, "finish", finish)
    return finished


def test_reading_each_step_late_logs_and_saves_what_reading_at_once_does(tmp_path, tiny_path, monkeypatch, late_reads):
    settings = dict(steps=6, save_every=4, gradient_accumulation_steps=2, max_grad_norm=1.0)
    late = train(config(tmp_path / "late", **settings), progress=False)
    monkeypatch.undo()
    at_once = train(config(tmp_path / "at-once", **settings), progress=False)
    # read late: steps 1, 2, 3 and 5 while the next was queued; 4 (a save) and 6 (the end) at once
    assert late_reads == [(1, 2), (2, 3), (3, 4), (4, 4), (5, 6), (6, 6)]
    drop = ("step_seconds", "images_per_second")
    late_records = [{k: v for k, v in r.items() if k not in drop} for r in records(late.output)]
    assert late_records == [{k: v for k, v in r.items() if k not in drop} for r in records(at_once.output)]
    assert [r["step"] for r in late_records] == [1, 2, 3, 4, 5, 6]
    expected = load_file(str(at_once.output / "adapter.safetensors"))
    saved = load_file(str(late.output / "adapter.safetensors"))
    assert saved.keys() == expected.keys() and all(saved[k].equal(expected[k]) for k in expected)


def test_a_non_finite_step_read_late_stops_before_the_next_save(tmp_path, tiny_path, late_reads):
    output = tmp_path / "nan"
    with pytest.raises(TrainingFailed, match=r"loss is (nan|inf) at step \d+; stopped without saving") as failure:
        train(config(output, steps=12, lr=1e30, save_every=5), progress=False)
    step = int(str(failure.value).split("at step ")[1].split(";")[0])
    assert any(read < taken for read, taken in late_reads)  # the late path ran
    assert [r["step"] for r in records(output)] == list(range(1, step))
    if step > 5:
        with safe_open(str(output / "adapter.safetensors"), framework="pt") as handle:
            assert int(handle.metadata()["step"]) == 5 * ((step - 1) // 5)
    else:
        assert not (output / "adapter.safetensors").exists()
