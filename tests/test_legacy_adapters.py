"""Adapters written by an earlier sdtune still load, save to the same bytes, merge to the same outputs
and export to the same kohya tensors (fixtures in tests/data/legacy, made by its make_fixtures.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sdtune import methods
from sdtune.adapter import load_adapter, read_adapter, save_adapter

LEGACY = Path(__file__).parent / "data" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


def _fixtures_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", LEGACY / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURES = _fixtures_module()


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_legacy_adapter_saves_to_the_same_bytes(stem, tiny_path, tmp_path):
    from sdtune.models import load_pipeline

    source = LEGACY / f"{stem}.safetensors"
    info, _ = read_adapter(source)
    pipe = load_pipeline("tiny-random")
    method = load_adapter(source, pipe, merge=False)
    assert method.name == info.method
    again = save_adapter(tmp_path / "again.safetensors", method, info.base_model, placeholder=info.placeholder, token=info.token)
    assert again.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_legacy_adapter_merges_to_the_same_outputs(stem, tiny_path):
    outputs = FIXTURES.merged_outputs(LEGACY / f"{stem}.safetensors").flatten()[::16]
    torch.testing.assert_close(outputs, torch.tensor(EXPECTED[stem]["outputs"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_legacy_adapter_exports_the_same_kohya_tensors(stem, tiny_path):
    found = FIXTURES.export_summary(LEGACY / f"{stem}.safetensors")
    expected = EXPECTED[stem]["kohya"]
    assert sorted(found) == sorted(expected)
    for key, (shape, total, magnitude) in expected.items():
        assert found[key][0] == shape, key
        assert found[key][1] == pytest.approx(total, rel=1e-4, abs=1e-6 * max(magnitude, 1.0)), key
        assert found[key][2] == pytest.approx(magnitude, rel=1e-4, abs=1e-6), key


def test_every_method_has_a_legacy_fixture_except_full():
    assert {name for _, name, _ in FIXTURES.FIXTURES} == set(methods.available()) - {"full"}
