"""The README's example method, run through the method contract: adding a method is one file and a registry line."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from sdtune import methods
from sdtune.adapter import load_adapter, save_adapter
from sdtune.methods.base import named_convs
from helpers import run_unet

README = Path(__file__).parents[1] / "README.md"


@pytest.fixture
def channel_scale(monkeypatch):
    """The README's `channel_scale.py` as the module sdtune.methods.channel_scale, registered."""
    text = README.read_text(encoding="utf-8")
    source = re.search(r"<!-- example method.*?-->\n```python\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType("sdtune.methods.channel_scale")
    module.__package__ = "sdtune.methods"
    monkeypatch.setitem(sys.modules, module.__name__, module)  # before its dataclass is made
    exec(compile(source, "channel_scale.py", "exec"), module.__dict__)
    monkeypatch.setitem(methods._REGISTRY, "channel-scale", "channel_scale:ChannelScale")
    return module


def test_the_example_method_keeps_the_contract(channel_scale, tiny_pipe, tmp_path):
    from sdtune.models import load_pipeline

    generator = torch.Generator().manual_seed(5)
    inputs = (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([50, 700]), torch.randn(2, 77, 32, generator=generator))
    base = run_unet(tiny_pipe.unet, inputs)
    assert "channel-scale" in methods.available()
    method = methods.create("channel-scale")
    parameters = method.inject(tiny_pipe.unet)
    assert method.num_parameters() == sum(conv.out_channels for _, conv in named_convs(load_pipeline("tiny-random").unet, {3}))
    from sdtune.limits import count_parameters
    from sdtune.models import read_model_configs

    assert count_parameters(read_model_configs("tiny-random"), method)[1] == method.num_parameters()  # on the meta device
    assert torch.equal(run_unet(tiny_pipe.unet, inputs), base), "zero update at init"

    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    target = torch.randn(base.shape, generator=generator)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(tiny_pipe.unet(*inputs).sample, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    tuned = run_unet(tiny_pipe.unet, inputs)

    path = save_adapter(tmp_path / "adapter.safetensors", method, "tiny-random")
    loaded = load_pipeline("tiny-random")
    load_adapter(path, loaded, merge=False)
    torch.testing.assert_close(run_unet(loaded.unet, inputs), tuned, rtol=0, atol=1e-5)
    merged = load_pipeline("tiny-random")
    load_adapter(path, merged)
    torch.testing.assert_close(run_unet(merged.unet, inputs), tuned, rtol=0, atol=1e-5)
    assert all(type(m).__module__.startswith(("torch.", "diffusers.")) for m in merged.unet.modules())

    method.set_scale(0.0)
    torch.testing.assert_close(run_unet(tiny_pipe.unet, inputs), base, rtol=0, atol=1e-6)
    method.set_scale(1.0)
    method.merge()
    method.unmerge()
    torch.testing.assert_close(run_unet(tiny_pipe.unet, inputs), tuned, rtol=0, atol=0)
