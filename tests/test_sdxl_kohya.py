"""kohya files for SDXL: the original model's module names (`lora_unet_input_blocks_...`), both ways,
and `lora_te1_`/`lora_te2_` for its two text encoders.

The names are checked against diffusers' own converters of original checkpoints and kohya SDXL
LoRAs, and LyCORIS' table, on SD 1.4's and SDXL's full-size UNets (meta device); the files are
checked on a tiny SDXL (tests/sdxl_fixtures.py) with diffusers' `StableDiffusionXLPipeline.load_lora_weights`
(LoRA) and LyCORIS' own merge (every kind), against sdtune's adapter outputs.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune import methods
from sdtune.adapter import load_adapter, save_adapter
from sdtune.errors import SdtuneError
from sdtune.kohya import KohyaLayout, kohya_diff_state, kohya_layout, kohya_name, kohya_state, kohya_updates, missing_diffs
from sdtune.sgm_names import SgmNames

from helpers import run_unet
from sdxl_fixtures import (
    sdxl_unet_config, tiny_sdxl_pipeline, tiny_sdxl_unet, tiny_text_encoders, unet_inputs,
)


def meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def full_size_configs() -> dict:
    from sdtune.models import sd14_unet_config

    # SD 2.1: SD 1.4's blocks with linear projections, per-block head sizes and OpenCLIP's width
    sd21 = {**sd14_unet_config(), "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "use_linear_projection": True, "sample_size": 96}
    return {"sd14": sd14_unet_config(), "sd21": sd21, "sdxl": sdxl_unet_config()}


def layer_names(unet) -> list[str]:
    """The modules that hold parameters of their own: every layer an update can change."""
    return [name for name, module in unet.named_modules() if any(True for _ in module.parameters(recurse=False))]


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("model", ["sd14", "sd21", "sdxl"])
def test_sgm_names_round_trip_and_match_diffusers_checkpoint_converter(model):
    """Every parameter named as the original checkpoint names it, by our table, is put back where it
    belongs by diffusers' own converter of original checkpoints."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = meta_unet(full_size_configs()[model])
    names = SgmNames(unet.config)
    for name, _ in unet.named_modules():  # every module with an original counterpart maps back to itself
        original = names.to_sgm(name)
        if original is not None:
            assert names.to_diffusers(original) == name, (name, original)
    checkpoint, parameters = {}, [name for name, _ in unet.named_parameters()]
    for index, parameter in enumerate(parameters):
        module, _, attr = parameter.rpartition(".")
        original = names.to_sgm(module)
        assert original is not None, parameter  # every layer has its original name
        checkpoint[f"model.diffusion_model.{original}.{attr}"] = torch.tensor(index)
    assert len(checkpoint) == len(parameters)  # no two layers share a name
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert sorted(converted) == sorted(parameters)
    assert all(parameters[int(value)] == key for key, value in converted.items())
    if model == "sdxl":
        expected = {
            "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k": "input_blocks.5.1.transformer_blocks.1.attn2.to_k",
            "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
            "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
            "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
            "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
            "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
            "add_embedding.linear_2": "label_emb.0.2",
            "conv_norm_out": "out.0",
        }
    else:  # the first up block has no attentions: its upsampler is the layer's second module
        expected = {"up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv", "down_blocks.3.resnets.1.norm1": "input_blocks.11.0.in_layers.0",
                    "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out"}
    assert {name: names.to_sgm(name) for name in expected} == expected
    assert names.to_sgm("down_blocks.0") is None and names.to_diffusers("input_blocks.1.0.in_layers.1") is None


def diffusers_lora_module(key: str) -> str:
    """The module diffusers' kohya LoRA key conversion (`_convert_unet_lora_key`, after the SGM block
    map) gives `key`, without the attention-processor spelling of its older LoRA layers."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key

    name = _convert_unet_lora_key(key).replace(".processor", "").replace("to_out_lora", "to_out.0.lora")
    for projection in "qkv":
        name = name.replace(f"to_{projection}_lora", f"to_{projection}.lora")
    return name.removesuffix(".lora.down.weight")


def test_sdxl_kohya_names_match_diffusers_and_lycoris_tables():
    """On the full-size SDXL UNet, every LoRA-able layer's kohya key is converted back to it by
    diffusers' kohya SDXL LoRA conversion (what `load_lora_weights` applies), and is the key LyCORIS'
    own diffusers → SGM table gives."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
    from lycoris.utils import convert_diffusers_name_to_compvis

    unet = meta_unet(sdxl_unet_config())
    layout = kohya_layout(unet.config)
    assert layout.sgm is not None and layout.text_encoder_prefixes == {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    assert layout.base_model_version == "sdxl_base_v1-0"
    layers = [name for name in layer_names(unet) if isinstance(unet.get_submodule(name), (torch.nn.Linear, torch.nn.Conv2d))]
    keys = {f"{layout.key(name)}.lora_down.weight": name for name in layers}
    assert len(keys) == len(layers) == 794 and all(key.startswith("lora_unet_") for key in keys)
    assert not any("down_blocks" in key or "up_blocks" in key or "mid_block" in key for key in keys)
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(keys), unet.config)
    assert sorted(diffusers_lora_module(key) for key in mapped) == sorted(layers)

    lycoris_converted = 0
    for name in layer_names(unet):  # norms too
        diffusers_key = kohya_name("lora_unet", name)
        converted = convert_diffusers_name_to_compvis(diffusers_key)
        if converted != diffusers_key:  # its table covers the blocks, conv_in/out and the time embedding
            assert converted == layout.key(name), name
            lycoris_converted += 1
    assert lycoris_converted == len(layer_names(unet)) - 3  # all but add_embedding's two linears and conv_norm_out


def test_sd_keys_stay_diffusers_names():
    from sdtune.models import sd14_unet_config

    layout = kohya_layout(sd14_unet_config())
    assert layout.sgm is None and layout.text_encoder_prefixes == {"text_encoder": "lora_te"}
    assert layout.key("down_blocks.0.resnets.0.conv1") == "lora_unet_down_blocks_0_resnets_0_conv1"
    assert layout.base_model_version == "sd_v1"


# ---------------------------------------------------------------------------------------------
# LyCORIS' own SDXL loader works on kohya-ss' own UNet, whose modules have the original names


def named_as_original(unet) -> torch.nn.Module:
    """A module tree named as the original SDXL UNet whose layers are `unet`'s own (shared, not copied):
    LyCORIS merges SDXL files into kohya-ss' UNet, which has the original names."""
    names = SgmNames(unet.config)
    root = torch.nn.Module()
    for name in layer_names(unet):
        *parents, leaf = names.to_sgm(name).split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.add_module(leaf, unet.get_submodule(name))
    return root


def with_text_model(encoder) -> torch.nn.Module:
    """`encoder` under `text_model.` as kohya names CLIP's layers (transformers 5 dropped the level in CLIPTextModel)."""
    if hasattr(encoder, "text_model"):
        return encoder
    root = torch.nn.Module()
    root.add_module("text_model", encoder)
    return root


def lycoris_merge(state: dict, unet, encoders: dict) -> None:
    from lycoris.utils import merge

    tes = [with_text_model(encoders["text_encoder"]), with_text_model(encoders["text_encoder_2"])]
    merge(tes, named_as_original(unet), {key: value.clone() for key, value in state.items()}, scale=1.0)


# ---------------------------------------------------------------------------------------------
# export


LOW_RANK = [
    ("lora", {"alpha": 2.0}),
    ("lora", {"targets": "conv", "rank": 2, "alpha": 1.0}),  # LoCon
    ("loha", {}),  # alpha = rank: LyCORIS' merge applies a LoHa's alpha/rank twice (the export warns)
    ("lokr", {"targets": "attn", "factor": 8, "rank": 2}),
    ("lora", {"targets": "transformer"}),  # kohya-ss' SDXL LoRA: proj_in/out (linear on SDXL) and ff too
    ("lora", {"targets": "locon", "rank": 2}),  # kohya-ss' LoCon: the resnets' emb_layers and skip_connection too
    ("lora", {"targets": "full", "rank": 2}),  # LyCORIS' full preset: conv_in, conv_out, time and added embeddings too
]
# the time embedding's and the added conditioning's linears by their original names, which only LyCORIS' full preset takes
SDXL_EMBEDDINGS = {"lora_unet_time_embed_0", "lora_unet_time_embed_2", "lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2"}


def tuned_adapter(name: str, options: dict, path, scale: float = 0.05, base_model: str = "tiny-sdxl"):
    """The tiny SDXL UNet with a method whose every trainable tensor is perturbed, saved to `path`; merged."""
    unet = tiny_sdxl_unet()
    method = methods.create(name, **options)
    method.inject(unet)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    save_adapter(path, method, base_model, placeholder="<castle>", token="sks castle")
    method.merge()
    return unet, method


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """The tiny SDXL pipeline saved as a diffusers folder: a base model whose configs export reads."""
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def sdxl_readable(monkeypatch):
    """Until sdtune loads SDXL pipelines, let its config reader accept one (export reads the UNet config only)."""
    import sdtune.models

    if "StableDiffusionXLPipeline" not in sdtune.models.SUPPORTED_PIPELINES:
        monkeypatch.setattr(sdtune.models, "SUPPORTED_PIPELINES", (*sdtune.models.SUPPORTED_PIPELINES, "StableDiffusionXLPipeline"))


@pytest.mark.parametrize("name,options", LOW_RANK, ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_sdxl_low_rank_export_has_original_names_and_loads_elsewhere(name, options, tmp_path, sdxl_folder, sdxl_readable):
    from diffusers import StableDiffusionXLPipeline

    inputs = unet_inputs()
    tuned_unet, method = tuned_adapter(name, options, tmp_path / "a.safetensors", base_model=str(sdxl_folder))
    tuned = run_unet(tuned_unet, inputs)
    base = tiny_sdxl_unet()
    assert (tuned - run_unet(base, inputs)).abs().max() > 1e-4

    from sdtune.export import export_adapter

    out = tmp_path / "castle.safetensors"
    result = export_adapter(tmp_path / "a.safetensors", "kohya", out)
    assert result.notes == []
    state = load_file(out)
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    layout = kohya_layout(base.config)
    expected = {layout.key(target) for target in method.target_names}
    assert {key.partition(".")[0] for key in state} == expected
    assert not any("down_blocks" in key or "up_blocks" in key or "mid_block" in key for key in state)
    if options.get("targets") not in ("attn", "transformer"):
        assert "lora_unet_input_blocks_1_0_in_layers_2.alpha" in state and "lora_unet_output_blocks_2_2_conv.alpha" in state
    if options.get("targets") in ("transformer", "locon"):  # kohya-ss' SDXL names of the feed-forward and projections
        assert {"lora_unet_input_blocks_4_1_transformer_blocks_1_ff_net_0_proj.alpha",
                "lora_unet_output_blocks_0_1_proj_out.alpha"} <= set(state)
        assert ("lora_unet_input_blocks_4_0_emb_layers_1.alpha" in state) == (options["targets"] == "locon")
        assert ("lora_unet_input_blocks_4_0_skip_connection.alpha" in state) == (options["targets"] == "locon")
    modules = {key.partition(".")[0] for key in state}
    assert (SDXL_EMBEDDINGS & modules) == (SDXL_EMBEDDINGS if options.get("targets") == "full" else set())
    if options.get("targets") == "full":  # and conv_in, conv_out
        assert {"lora_unet_input_blocks_0_0", "lora_unet_out_2"} <= modules

    own = tiny_sdxl_pipeline()  # sdtune reads it back onto a pipeline
    loaded = load_adapter(out, own)
    assert loaded.info.token == "sks castle" and sorted(loaded.target_names) == sorted(method.target_names)
    torch.testing.assert_close(run_unet(own.unet, inputs), tuned, rtol=0, atol=1e-4)

    lycoris_unet, encoders = tiny_sdxl_unet(), tiny_text_encoders()
    lycoris_merge(state, lycoris_unet, encoders)
    torch.testing.assert_close(run_unet(lycoris_unet, inputs), tuned, rtol=0, atol=1e-4)

    if name == "lora":  # diffusers reads kohya SDXL LoRAs (LoRA and LoCon), not LoHa/LoKr
        pipe = tiny_sdxl_pipeline()
        pipe.load_lora_weights(dict(state))
        assert isinstance(pipe, StableDiffusionXLPipeline)
        torch.testing.assert_close(run_unet(pipe.unet, inputs), tuned, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["atoms", "full", "difffit"])
def test_sdxl_diff_export_has_original_names(name, tmp_path):
    """Diff-style methods: ΔW = merged − base under the original names, read back by sdtune and LyCORIS."""
    inputs = unet_inputs()
    tuned_unet, method = tuned_adapter(name, {}, tmp_path / "a.safetensors")
    diffs = method.weight_diffs()
    state, extra = kohya_diff_state(tuned_unet, diffs, tmp_path / "a.safetensors")
    assert extra["ss_base_model_version"] == "sdxl_base_v1-0"
    layout = kohya_layout(tuned_unet.config)
    assert {key.partition(".")[0] for key in state} == {layout.key(module) for module, _ in diffs}
    assert all(key.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_unet_out_",
                               "lora_unet_time_embed_", "lora_unet_label_emb_")) for key in state), sorted(state)[:3]
    tuned = run_unet(tuned_unet, inputs)
    missing = missing_diffs(tuned_unet, state)
    if name == "difffit":  # biases alone changed in some layers: their zero .diff is named the same way
        assert missing and all(key.partition(".")[0] in {k.partition(".")[0] for k in state} for key in missing)
        state = {**state, **{key: torch.zeros(shape) for key, shape in missing.items()}}
    path = tmp_path / "diff.safetensors"
    save_file(state, str(path))

    unet = tiny_sdxl_unet()
    adapter = kohya_updates(path, unet, tiny_text_encoders())
    adapter.merge()
    torch.testing.assert_close(run_unet(unet, inputs), tuned, rtol=0, atol=1e-5)
    lycoris_unet = tiny_sdxl_unet()
    lycoris_merge(state, lycoris_unet, tiny_text_encoders())
    torch.testing.assert_close(run_unet(lycoris_unet, inputs), tuned, rtol=0, atol=1e-5)


def test_every_module_key_written_reads_back_to_its_module():
    """The names `KohyaLayout.key` writes (UNet and text encoders, SDXL's and SD's) are the ones the
    reader finds each module by."""
    from sdtune.kohya import kohya_module_lookup
    from sdtune.models import tiny_unet_config
    from diffusers import UNet2DConditionModel

    sdxl_unet, sdxl_encoders = tiny_sdxl_unet(), tiny_text_encoders()
    sd_unet, sd_encoders = UNet2DConditionModel(**tiny_unet_config()), {"text_encoder": tiny_text_encoders()["text_encoder"]}
    for unet, encoders in [(sdxl_unet, sdxl_encoders), (sd_unet, sd_encoders)]:
        layout, lookup = kohya_layout(unet.config), kohya_module_lookup(unet, encoders)
        modules = {name: unet.get_submodule(name) for name in layer_names(unet)}
        for component, encoder in encoders.items():
            modules.update({f"{component}.{name}": encoder.get_submodule(name) for name in layer_names(encoder)})
        keys = {name: layout.key(name) for name in modules}
        assert len(set(keys.values())) == len(keys)
        for name, key in keys.items():
            assert lookup[key][2] is modules[name], name
    assert kohya_layout(sdxl_unet.config).key("text_encoder_2.text_projection") == "lora_te2_text_projection"
    assert kohya_layout(sdxl_unet.config).key("text_encoder.encoder.layers.0.mlp.fc1") == "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    assert kohya_layout(sd_unet.config).key("text_encoder.encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"


def test_kohya_state_without_layout_is_unchanged():
    """SD 1.x files keep diffusers' names: no layout, or SD's, name modules as before."""
    parts = {"down_blocks.0.resnets.0.conv1": {"alpha": torch.tensor(1.0)}}
    sd = kohya_layout({"addition_embed_type": None})
    assert list(kohya_state(parts)) == list(kohya_state(parts, sd)) == ["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]
    assert isinstance(sd, KohyaLayout)


# ---------------------------------------------------------------------------------------------
# files trained elsewhere


def elsewhere_state() -> dict:
    """A kohya SDXL file as other trainers write it: every update kind, original and diffusers
    spellings of UNet names, and both text encoders."""
    g = torch.Generator().manual_seed(3)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    return {
        # LoRA on an attention projection of the second transformer layer
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k.lora_down.weight": r(2, 64, scale=1),
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k.lora_up.weight": r(64, 2),
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k.alpha": torch.tensor(1.0),
        "lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_out_0.lora_down.weight": r(2, 64, scale=1),
        "lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_out_0.lora_up.weight": r(64, 2),
        "lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_out_0.alpha": torch.tensor(2.0),
        # LoCon with a Tucker core on a resnet's second 3x3 conv
        "lora_unet_output_blocks_0_0_out_layers_3.lora_down.weight": r(3, 64, 1, 1, scale=1),
        "lora_unet_output_blocks_0_0_out_layers_3.lora_mid.weight": r(3, 3, 3, 3, scale=1),
        "lora_unet_output_blocks_0_0_out_layers_3.lora_up.weight": r(64, 3, 1, 1),
        "lora_unet_output_blocks_0_0_out_layers_3.alpha": torch.tensor(1.5),
        # LoCon on the downsampler (`op`) and a skip connection
        "lora_unet_input_blocks_3_0_op.lora_down.weight": r(2, 32, 3, 3, scale=1),
        "lora_unet_input_blocks_3_0_op.lora_up.weight": r(32, 2, 1, 1),
        "lora_unet_input_blocks_3_0_op.alpha": torch.tensor(2.0),
        "lora_unet_input_blocks_4_0_skip_connection.lora_down.weight": r(2, 32, 1, 1, scale=1),
        "lora_unet_input_blocks_4_0_skip_connection.lora_up.weight": r(64, 2, 1, 1),
        "lora_unet_input_blocks_4_0_skip_connection.alpha": torch.tensor(2.0),
        # LoHa on the middle block's attention input projection
        "lora_unet_middle_block_1_proj_in.hada_w1_a": r(64, 2, scale=1),
        "lora_unet_middle_block_1_proj_in.hada_w1_b": r(2, 64, scale=1),
        "lora_unet_middle_block_1_proj_in.hada_w2_a": r(64, 2, scale=1),
        "lora_unet_middle_block_1_proj_in.hada_w2_b": r(2, 64),
        "lora_unet_middle_block_1_proj_in.alpha": torch.tensor(2.0),  # = rank: LyCORIS' merge applies a LoHa's alpha/rank twice
        # LoKr on the added-conditioning MLP (label_emb) and the time embedding
        "lora_unet_label_emb_0_0.lokr_w1": r(8, 8, scale=1),  # (128, 80) = (8·16, 8·10), as LyCORIS factors it
        "lora_unet_label_emb_0_0.lokr_w2_a": r(16, 2, scale=1),
        "lora_unet_label_emb_0_0.lokr_w2_b": r(2, 10),
        "lora_unet_label_emb_0_0.alpha": torch.tensor(2.0),
        "lora_unet_time_embed_2.lokr_w1": r(8, 8, scale=0.3),
        "lora_unet_time_embed_2.lokr_w2": r(16, 16, scale=0.3),
        "lora_unet_time_embed_2.alpha": torch.tensor(4.0),  # both factors full: scale 1, alpha ignored
        # full-weight differences: the upsampler's conv (weight and bias), the output norm, a diffusers-style name
        "lora_unet_output_blocks_2_2_conv.diff": r(64, 64, 3, 3, scale=0.01),
        "lora_unet_output_blocks_2_2_conv.diff_b": r(64),
        "lora_unet_out_0.w_norm": r(32),
        "lora_unet_out_0.b_norm": r(32),
        "lora_unet_up_blocks_0_attentions_0_proj_out.diff": r(64, 64, scale=0.01),
        # both text encoders, with kohya's `text_model_` names, and the second one's projection
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": r(2, 32, scale=1),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": r(32, 2),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
        "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight": r(2, 32, scale=1),
        "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight": r(32, 2),
        "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.alpha": torch.tensor(3.0),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1.hada_w1_a": r(37, 2, scale=1),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1.hada_w1_b": r(2, 32, scale=1),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1.hada_w2_a": r(37, 2, scale=1),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1.hada_w2_b": r(2, 32),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha": torch.tensor(2.0),
        "lora_te2_text_projection.diff": r(32, 32, scale=0.01),
    }


ELSEWHERE_MODULES = {
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k", "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.0.resnets.0.conv2",
    "down_blocks.0.downsamplers.0.conv", "down_blocks.1.resnets.0.conv_shortcut", "mid_block.attentions.0.proj_in",
    "add_embedding.linear_1", "time_embedding.linear_2", "up_blocks.0.upsamplers.0.conv", "conv_norm_out",
    "up_blocks.0.attentions.0.proj_out",
}


def test_kohya_sdxl_file_from_elsewhere_matches_lycoris(tmp_path):
    """Every kind of update (LoRA, LoCon with a Tucker core, LoHa, LoKr, full diffs, norms) under the
    original names, a diffusers-style name and both text encoders: the weights sdtune's reader
    gives are LyCORIS' own merge's."""
    state = elsewhere_state()
    path = tmp_path / "elsewhere.safetensors"
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sdxl_base_v1-0"})

    unet, encoders = tiny_sdxl_unet(), tiny_text_encoders()
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    adapter = kohya_updates(path, unet, encoders)
    first = "text_encoder." + ("text_model." if hasattr(encoders["text_encoder"], "text_model") else "") + "encoder.layers."
    assert sorted(adapter.target_names) == sorted(ELSEWHERE_MODULES | {
        first + "0.self_attn.q_proj", first + "1.self_attn.out_proj", "text_encoder_2.text_model.encoder.layers.1.mlp.fc1",
        "text_encoder_2.text_projection",
    })
    adapter.merge()
    changed = {name for name, value in unet.state_dict().items() if not torch.equal(value, before[name])}
    assert {name.rpartition(".")[0] for name in changed} == ELSEWHERE_MODULES

    lycoris_unet, lycoris_encoders = tiny_sdxl_unet(), tiny_text_encoders()
    lycoris_merge(state, lycoris_unet, lycoris_encoders)
    for mine, theirs in [(unet, lycoris_unet), *zip(encoders.values(), lycoris_encoders.values())]:
        reference = theirs.state_dict()
        for key, value in mine.state_dict().items():
            torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)
    # the LoRA on to_k, literally
    to_k = "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k"
    delta = state[f"{to_k}.lora_up.weight"] @ state[f"{to_k}.lora_down.weight"] * 0.5
    weight = "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k.weight"
    torch.testing.assert_close(unet.state_dict()[weight], before[weight] + delta, rtol=0, atol=1e-6)
    adapter.unmerge()
    assert all(torch.equal(value, before[name]) for name, value in unet.state_dict().items())


def test_kohya_sdxl_lora_from_elsewhere_matches_diffusers(tmp_path):
    """A kohya SDXL LoRA/LoCon (original names, both text encoders) loads as diffusers' SDXL pipeline loads it."""
    every = elsewhere_state()
    plain = {key.partition(".")[0] for key in every if key.endswith(".lora_down.weight")}
    plain -= {key.partition(".")[0] for key in every if key.endswith(".lora_mid.weight")}
    state = {key: value for key, value in every.items() if key.partition(".")[0] in plain}
    # alpha = rank: diffusers 0.42 drops the per-layer alpha of an attention projection it renames
    # (peft warns that the alpha_pattern key `...attn2.processor.to_k_lora.down.weight` matched nothing)
    state.update({key: torch.tensor(float(state[key.replace(".alpha", ".lora_down.weight")].shape[0])) for key in state if key.endswith(".alpha")})
    assert len({key.partition(".")[0] for key in state}) == 6
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    inputs = unet_inputs()
    ours = tiny_sdxl_pipeline()
    load_adapter(path, ours)
    theirs = tiny_sdxl_pipeline()
    theirs.load_lora_weights(str(path))
    torch.testing.assert_close(run_unet(ours.unet, inputs), run_unet(theirs.unet, inputs), rtol=0, atol=1e-5)
    ids = torch.tensor([[0, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours.text_encoder(ids)[0], theirs.text_encoder(ids)[0], rtol=0, atol=1e-5)


def test_kohya_sdxl_file_errors_are_one_line(tmp_path):
    good = {key: value for key, value in elsewhere_state().items() if key.startswith("lora_unet_middle_block_1_proj_in")}
    cases = {
        "matches no module of this model's text encoders (lora_te1_, lora_te2_)": {
            **good, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.diff": torch.zeros(32, 32)},
        "matches no module of the UNet": {**good, "lora_unet_input_blocks_12_1_proj_in.diff": torch.zeros(64, 64)},
        "is updated twice in the file (under two spellings of its name)": {
            **good, "lora_unet_mid_block_attentions_0_proj_in.diff": torch.zeros(64, 64)},
        "but mid_block.attentions.0.proj_out's weight has shape (64, 64)": {"lora_unet_middle_block_1_proj_out.diff": torch.zeros(32, 32)},
    }
    for message, state in cases.items():
        path = tmp_path / "bad.safetensors"
        save_file(state, str(path))
        unet = tiny_sdxl_unet()
        with pytest.raises(SdtuneError) as error:
            kohya_updates(path, unet, tiny_text_encoders())
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_a_file_of_another_family_is_named_so(tmp_path):
    """A file whose `ss_base_model_version` names another family says so: beside the module that does not fit, or,
    where every module fits (small models can), in a warning."""
    import warnings

    fits = {"lora_unet_middle_block_1_proj_out.diff": torch.zeros(64, 64)}
    does_not = {"lora_unet_middle_block_1_proj_out.diff": torch.zeros(32, 32)}
    for state, version in ((fits, "sdxl_base_v1-0"), (does_not, "sdxl_base_v1-0"), (fits, "sd_v2"), (does_not, "sd_v1")):
        path = tmp_path / f"{version}-{len(state)}.safetensors"
        save_file(state, str(path), metadata={"ss_base_model_version": version})
        family = {"sdxl_base_v1-0": "SDXL", "sd_v1": "SD 1.x", "sd_v2": "SD 2.x"}[version]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                kohya_updates(path, tiny_sdxl_unet(), tiny_text_encoders())
                refused = ""
            except SdtuneError as error:
                refused = str(error)
        said = [str(w.message) for w in caught if "made for" in str(w.message)]
        if family == "SDXL":  # its own family: nothing more said
            assert not said and "made for" not in refused
        elif state is fits:
            assert said == [f"{path}: the file was made for {family}, this model is SDXL; its updates fit and are applied"]
        else:
            assert refused.endswith(f"proj_out's weight has shape (64, 64) (the file was made for {family}, this model is SDXL)")


def test_export_falls_back_to_sd_names_where_the_base_model_is_unreadable(tmp_path):
    """An adapter whose base model's config cannot be read is written with SD 1.x/2.x's names, and says so."""
    from sdtune.export import export_adapter

    tuned_unet, _ = tuned_adapter("lora", {"targets": "attn"}, tmp_path / "a.safetensors", base_model=str(tmp_path / "gone"))
    result = export_adapter(tmp_path / "a.safetensors", "kohya", tmp_path / "k.safetensors")
    assert len(result.notes) == 1 and "could not be read" in result.notes[0] and "SD 1.x/2.x" in result.notes[0]
    state = load_file(tmp_path / "k.safetensors")
    assert all("down_blocks" in key or "up_blocks" in key or "mid_block" in key for key in state)
    # such a file still loads on SDXL in diffusers (and sdtune), which take diffusers-style names too
    inputs, pipe = unet_inputs(), tiny_sdxl_pipeline()
    pipe.load_lora_weights(dict(state))
    torch.testing.assert_close(run_unet(pipe.unet, inputs), run_unet(tuned_unet, inputs), rtol=0, atol=1e-4)


def test_sd_files_with_original_names_load_too(tmp_path, tiny_path):
    """An SD 1.x file naming the UNet's modules as the original model does reads as its diffusers-named twin."""
    from sdtune.models import load_pipeline

    g = torch.Generator().manual_seed(4)
    parts = {"lora_down.weight": torch.randn(2, 32, generator=g), "lora_up.weight": torch.randn(32, 2, generator=g) * 0.1,
             "alpha": torch.tensor(1.0)}
    original, diffusers = tmp_path / "original.safetensors", tmp_path / "diffusers.safetensors"
    save_file({f"lora_unet_input_blocks_1_1_proj_in.{k}": v for k, v in parts.items()}, str(original))
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in.{k}": v for k, v in parts.items()}, str(diffusers))
    first, second = load_pipeline("tiny-random"), load_pipeline("tiny-random")
    assert load_adapter(original, first).target_names == ["down_blocks.0.attentions.0.proj_in"]
    load_adapter(diffusers, second)
    for (name, mine), (_, theirs) in zip(first.unet.state_dict().items(), second.unet.state_dict().items()):
        assert torch.equal(mine, theirs), name


def test_export_refuses_a_model_the_adapter_does_not_fit(tmp_path, sdxl_folder, tiny_path):
    """`--model` decides the file's names and metadata: an SDXL LoRA is not written as an SD 1.x file (SD names,
    `sd_v1`) but refused, naming the model it was trained on; the same model in another folder is taken."""
    from sdtune.export import export_adapter

    tuned_adapter("lora", {}, tmp_path / "a.safetensors", base_model=str(sdxl_folder))
    with pytest.raises(SdtuneError, match=r"trained on base model .*, on model=\".*\", does not fit this model"):
        export_adapter(tmp_path / "a.safetensors", "kohya", tmp_path / "sd.safetensors", model=str(tiny_path))
    assert not (tmp_path / "sd.safetensors").exists()
    copy = tmp_path / "copy"
    tiny_sdxl_pipeline().save_pretrained(copy)
    export_adapter(tmp_path / "a.safetensors", "kohya", tmp_path / "xl.safetensors", model=str(copy))
    with safe_open(str(tmp_path / "xl.safetensors"), framework="pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


@pytest.mark.parametrize("targets", ["transformer", "locon", "full", "attn", "all"])
def test_a_kohya_sdxl_file_names_its_targets_family(targets, tmp_path, sdxl_folder, sdxl_readable):
    """A run started from a kohya SDXL file (original names: input_blocks, emb_layers, skip_connection, time_embed,
    label_emb) takes the family whose layers are exactly the file's UNet modules, as it does on SD 1.x; a file of
    some layers of one family (others left out, as kohya-ss' block-wise dims of 0 leave them) takes that family too,
    the smallest that holds them all, and the run says how many of its layers start fresh."""
    from sdtune.export import export_adapter
    from sdtune.starting_weights import fresh_layers, kohya_layer_options, kohya_unet_layers, read_kohya_header

    tuned_adapter("lora", {"targets": targets, "rank": 2}, tmp_path / "a.safetensors", base_model=str(sdxl_folder))
    out = tmp_path / "k.safetensors"
    export_adapter(tmp_path / "a.safetensors", "kohya", out)
    lora = methods.method_class("lora")
    whole = kohya_unet_layers(str(sdxl_folder), read_kohya_header(out))
    assert kohya_layer_options(lora, whole) == {"targets": targets}
    assert fresh_layers(lora(targets=targets), whole) == ""
    state = load_file(out)
    part = {key: value for key, value in state.items() if "_ff_net_" not in key and "_to_k." not in key}
    save_file(part, tmp_path / "part.safetensors")
    cut = kohya_unet_layers(str(sdxl_folder), read_kohya_header(tmp_path / "part.safetensors"))
    assert kohya_layer_options(lora, cut) == {"targets": targets}
    held, tuned = len(cut.modules), len(whole.modules)
    assert held < tuned and fresh_layers(lora(targets=targets), cut) == (
        f"{held} of the run's {tuned} UNet layers (the other {tuned - held} start as in a fresh run)")
