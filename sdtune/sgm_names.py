"""The original (SGM/LDM) module names of a diffusers UNet2DConditionModel, both ways.

Stability's checkpoints and kohya-ss' SDXL trainer name the UNet's modules as the original code
does (`input_blocks.4.1.proj_in`), diffusers names them by block (`down_blocks.1.attentions.0.proj_in`).
The correspondence follows from the config alone:

* `input_blocks.0.0` is conv_in; then each down block's layers, one input block each (`.0` the resnet,
  `.1` its attention where the block has them), then its downsampler (`input_blocks.<n>.0.op`),
  except after the last block;
* `middle_block.0/1/2`: the mid block's first resnet, attention and second resnet;
* `output_blocks`: each up block's layers_per_block + 1 layers (`.0` resnet, `.1` attention), the
  upsampler after the block's last layer (`.2.conv`, or `.1.conv` in a block without attentions);
* `time_embed.0/2`, `label_emb.0.0/2` (SDXL's added-conditioning MLP), `out.0` (norm), `out.2` (conv);
* inside a resnet: in_layers.0/2 = norm1/conv1, emb_layers.1 = time_emb_proj, out_layers.0/3 =
  norm2/conv2, skip_connection = conv_shortcut; inside an attention the names are the same.

Checked against diffusers' own converter of original checkpoints (`convert_ldm_unet_checkpoint`) on
SD 1.4's, SD 2.1's and SDXL's full configs (tests/test_sdxl_kohya.py).
"""

from __future__ import annotations

from typing import Mapping

# resnet internals: diffusers name → original name
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _per_block(value, blocks: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * blocks


def block_table(config: Mapping) -> dict[str, tuple[str, bool]]:
    """diffusers block prefix → (original prefix, whether it is a resnet), for a UNet2DConditionModel config."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    layers = _per_block(config.get("layers_per_block", 2), len(down_types))
    table: dict[str, tuple[str, bool]] = {name: (sgm, False) for name, sgm in TOP_LEVEL.items()}

    block = 1
    for i, kind in enumerate(down_types):
        for j in range(layers[i]):
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{block}.0", True)
            if "CrossAttn" in kind:
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{block}.1", False)
            block += 1
        if i < len(down_types) - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{block}.0.op", False)
            block += 1

    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid:
        table["mid_block.resnets.0"] = ("middle_block.0", True)
        if "CrossAttn" in mid:
            table["mid_block.attentions.0"] = ("middle_block.1", False)
            table["mid_block.resnets.1"] = ("middle_block.2", True)
        else:
            table["mid_block.resnets.1"] = ("middle_block.1", True)

    block = 0
    up_layers = list(reversed(layers))
    for i, kind in enumerate(up_types):
        attention = "CrossAttn" in kind
        for j in range(up_layers[i] + 1):
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{block}.0", True)
            if attention:
                table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{block}.1", False)
            block += 1
        if i < len(up_types) - 1:
            table[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{block - 1}.{2 if attention else 1}.conv", False)
    return table


class SgmNames:
    """diffusers ↔ original module names of the UNet that `config` (a UNet2DConditionModel config) builds."""

    def __init__(self, config: Mapping):
        self._to_sgm = block_table(config)
        self._to_diffusers = {sgm: (name, resnet) for name, (sgm, resnet) in self._to_sgm.items()}

    @staticmethod
    def _split(name: str, table: Mapping) -> tuple[str, str] | None:
        """(the longest prefix of `name` in `table`, the rest) or None."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in table:
                return prefix, ".".join(parts[end:])
        return None

    def to_sgm(self, name: str) -> str | None:
        """The original name of diffusers module `name`; None where the original has no such module
        (containers such as `down_blocks.0`, a resnet's parameterless dropout and activation)."""
        found = self._split(name, self._to_sgm)
        if found is None:
            return None
        prefix, rest = found
        sgm, resnet = self._to_sgm[prefix]
        if rest and resnet:
            head, _, tail = rest.partition(".")
            if head not in RESNET_PARTS:
                return None
            rest = RESNET_PARTS[head] + (f".{tail}" if tail else "")
        return f"{sgm}.{rest}" if rest else sgm

    def to_diffusers(self, sgm_name: str) -> str | None:
        """The diffusers name of original module `sgm_name`; None where diffusers has no such module."""
        found = self._split(sgm_name, self._to_diffusers)
        if found is None:
            return None
        prefix, rest = found
        name, resnet = self._to_diffusers[prefix]
        if rest and resnet:
            for part, sgm_part in RESNET_PARTS.items():
                if rest == sgm_part or rest.startswith(sgm_part + "."):
                    rest = part + rest[len(sgm_part):]
                    break
            else:
                return None
        return f"{name}.{rest}" if rest else name
