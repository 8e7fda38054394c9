"""`sdtune env`: the report a bug report carries, and the methods' device notes it lists."""

from __future__ import annotations

import json
import re
from importlib import metadata

import torch
from typer.testing import CliRunner

from sdtune import environment
from sdtune.cli import app
from sdtune.methods import atom_kernels, method_class

runner = CliRunner()


def listed(text: str) -> dict[str, str]:
    """The report's top-level "- name: value" lines as a dict."""
    return dict(re.match(r"- ([^:]+):\s?(.*)", line).groups() for line in text.splitlines() if line.startswith("- "))


def test_env_prints_the_installed_versions():
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    facts = listed(result.output)
    assert facts["sdtune"] == metadata.version("sdtune")
    assert facts["torch"].split(" (")[0] == metadata.version("torch")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        assert facts["CUDA available"].startswith(f"yes ({count} GPU")
        assert all(torch.cuda.get_device_name(index) in facts[f"GPU {index}"] for index in range(count))
    else:
        assert facts["CUDA available"] == "no" and "GPU 0" not in facts
    assert facts["torch CPU threads"] == str(torch.get_num_threads())
    assert environment.METHODS_KEY in facts


def test_env_json_has_the_text_keys():
    text = runner.invoke(app, ["env"])
    as_json = runner.invoke(app, ["env", "--json"])
    assert text.exit_code == 0 and as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.output)
    assert list(report) == list(listed(text.output))
    assert report["torch"].split(" (")[0] == metadata.version("torch")
    for method, by_device in report[environment.METHODS_KEY].items():
        for device_type, notes in by_device.items():
            assert notes == method_class(method).device_notes(device_type)
            for note in notes:
                assert f"  - {method} on {device_type}: {note}" in text.output


def test_a_package_not_installed_says_so(monkeypatch):
    real_version = metadata.version

    def version(name: str) -> str:
        if name == "bitsandbytes":
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    facts = dict(environment.report().facts)
    assert facts["bitsandbytes"] == environment.NOT_INSTALLED
    assert facts["torch"].split(" (")[0] == real_version("torch")


def test_the_cache_and_settings_are_those_sdtune_reads(monkeypatch, tmp_path):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    facts = dict(environment.report().facts)
    assert facts["sdtune cache"].startswith(str(tmp_path))
    assert facts["TRITON_INTERPRET"] == "1" and "OMP_NUM_THREADS" not in facts


def test_the_atoms_cpu_note_agrees_with_the_route():
    """The note's limit is where `route` turns from the tap side to the weight side for a large weight."""
    (note,) = [line for line in method_class("atoms").device_notes("cpu") if line.startswith("convolutions")]
    small = torch.empty(1, 4, 8, 8)
    side, backward = atom_kernels.route(small)
    assert side == "tap" and f"tap side ({backward} backward)" in note
    limit = int(re.search(r"up to ([\d,]+) batch x input positions, else the weight side", note).group(1).replace(",", ""))
    at_limit = torch.empty(limit, 4, 1, 1)
    above = torch.empty(limit + 1, 4, 1, 1)
    assert atom_kernels.route(at_limit, weights=1 << 20) == (side, backward)
    assert atom_kernels.route(above, weights=1 << 20) == ("weight", None)
    plain = int(re.search(r"at most ([\d,]+) weights plain autograd", note).group(1).replace(",", ""))
    assert atom_kernels.route(above, weights=plain) == ("autograd", None)
    assert atom_kernels.route(above, weights=plain + 1) == ("weight", None)


def test_a_device_without_its_own_tables_takes_the_weight_side():
    """mps has no entry in the routes' tables: the note says what `device_route` does there."""
    notes = method_class("atoms").device_notes("mps")
    assert atom_kernels.device_route("mps", 1) == ("weight", None)
    assert len(notes) == 1 and "the weight side at every size" in notes[0]


def test_the_oft_notes_name_its_routes():
    from sdtune.methods import oft

    for device_type in ("cpu", "cuda"):
        (note,) = method_class("oft").device_notes(device_type)
        assert oft.ROUTE_WORDS[oft.default_route(device_type, False)] in note
        assert oft.ROUTE_WORDS[oft.default_route(device_type, True)] in note


def test_a_method_has_no_device_notes_unless_it_says():
    from sdtune.methods.base import Method

    assert Method.device_notes("cpu") == []


def test_a_failing_probe_is_reported_not_raised(monkeypatch):
    def broken() -> str:
        raise OSError("config folder unreadable")

    monkeypatch.setattr(environment, "accelerate_config_file", broken)
    facts = dict(environment.report().facts)
    assert facts["Accelerate default config"] == "unknown (OSError: config folder unreadable)"


def test_a_gpu_is_described_and_its_device_notes_listed(monkeypatch):
    """With CUDA present (simulated here: the test machines have no GPU), each GPU gets a line and the methods' notes
    cover "cuda" too."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    props = SimpleNamespace(name="Tesla T4", total_memory=15 << 30, major=7, minor=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "device", lambda index: nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    report = environment.report()
    facts = dict(report.facts)
    assert facts["CUDA available"] == "yes (1 GPU)"
    assert facts["GPU 0"] == "Tesla T4, 15.0 GB, compute capability 7.5, bf16: emulated"
    assert report.method_notes["atoms"]["cuda"] == method_class("atoms").device_notes("cuda")
    assert set(report.method_notes["atoms"]) == {"cpu", "cuda"}
