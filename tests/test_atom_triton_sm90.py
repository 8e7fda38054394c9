"""The Triton tap-side kernel compiles for the H200 (sm_90) in every configuration the GPU run launches, and
for the GPUs users train on (sm_75 to sm_89) in SD v1.4's launches.

No GPU is needed: Triton's ptxas compiles offline. The launches are the real ones: `tap_backward` runs on
meta tensors (no memory, no arithmetic) through the autograd Function's backward, as it would under bf16 or
fp16 autocast (x, W and dL/dy in the autocast dtype, the trained mixing fp32) or in fp32, for every
convolution of SD v1.4 at 64x64 latents, batch 1 and 4, and a recorder stands in for the kernel's launch.
Each recorded launch is specialised as Triton's launcher would (ints equal to 1 become constants, pointers
and ints divisible by 16 are marked so) and compiled for sm_90 once; cuobjdump then reads its registers
and local memory (spills) from the cubin.

The test process runs Triton interpreted (conftest.py sets TRITON_INTERPRET=1 before anything imports it),
and Triton fixes at that import whether triton.language's own @jit helpers (tl.sum, ...) are interpreted:
compiling a kernel that calls an interpreted tl.sum runs the interpreter's patching of triton.language inside
the code generator and fails. So this file records the launches with its own copy of `atom_triton` loaded with
the interpreter off (a real JITFunction to specialise against) and compiles them in a child process that
imports Triton without the interpreter (sm90_compiler.py).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

from sdtune.methods import atom_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Every distinct convolution of SD v1.4's UNet at 64x64 latents (512 px): (in, out, kernel, stride, size),
# as benchmarks/atom_kernels.py's conv_shapes(64, ...) records them from a forward pass (1x1 ones are
# trained with include_1x1).
SD14_CONVS = [
    (4, 320, 3, 1, 64), (320, 4, 3, 1, 64), (320, 320, 1, 1, 64), (320, 320, 3, 1, 64), (320, 320, 3, 2, 64),
    (320, 640, 1, 1, 32), (320, 640, 3, 1, 32), (640, 320, 1, 1, 64), (640, 320, 3, 1, 64),
    (640, 640, 1, 1, 32), (640, 640, 3, 1, 32), (640, 640, 3, 1, 64), (640, 640, 3, 2, 32),
    (640, 1280, 1, 1, 16), (640, 1280, 3, 1, 16), (960, 320, 1, 1, 64), (960, 320, 3, 1, 64),
    (960, 640, 1, 1, 32), (960, 640, 3, 1, 32), (1280, 640, 1, 1, 32), (1280, 640, 3, 1, 32),
    (1280, 1280, 1, 1, 8), (1280, 1280, 1, 1, 16), (1280, 1280, 3, 1, 8), (1280, 1280, 3, 1, 16),
    (1280, 1280, 3, 1, 32), (1280, 1280, 3, 2, 16), (1920, 640, 1, 1, 32), (1920, 640, 3, 1, 32),
    (1920, 1280, 1, 1, 16), (1920, 1280, 3, 1, 16), (2560, 1280, 1, 1, 8), (2560, 1280, 1, 1, 16),
    (2560, 1280, 3, 1, 8), (2560, 1280, 3, 1, 16),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _tool(name: str) -> str | None:
    try:
        path = getattr(triton.knobs.nvidia, name).path
    except Exception:  # noqa: BLE001 - a Triton without the NVIDIA tools: skip
        return None
    return path if path and Path(path).exists() else None


@pytest.fixture(scope="module")
def compiled_kernel_module(tmp_path_factory):
    """atom_triton loaded afresh with the interpreter off: its kernel a real JITFunction."""
    if _tool("ptxas") is None or _tool("cuobjdump") is None:
        pytest.skip("Triton's ptxas or cuobjdump is missing: cannot compile for sm_90 here")
    knobs = triton.knobs.runtime
    previous = knobs.interpret
    knobs.interpret = False
    try:
        spec = importlib.util.spec_from_file_location("atom_triton_sm90", ROOT / "sdtune/methods/atom_triton.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        knobs.interpret = previous
    assert isinstance(module._tap_backward_kernel, triton.runtime.jit.JITFunction)
    return module


class Sm90CompileError(Exception):
    """Triton failed to compile a launch for sm_90; the message is the compiler process's traceback."""


class Sm90Compiler:
    """sm90_compiler.py, started once: compiles one specialisation per call in a process with Triton compiled."""

    def __init__(self):
        environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/sm90_compiler.py"), str(ROOT / "sdtune/methods/atom_triton.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment,
        )  # its stderr is the test's: pytest shows it with a failure

    def compile(self, signature: dict, constexprs: dict, attrs: dict, num_warps: int, arch: int = 90,
                kernel: str = "_tap_backward_kernel") -> tuple[bytes, str]:
        """(cubin, ptx) of the kernel specialised so, for sm_`arch`."""
        request = {
            "signature": signature, "num_warps": num_warps, "arch": arch, "kernel": kernel,
            "constexprs": [[list(path), value] for path, value in constexprs.items()],
            "attrs": [[list(path), value] for path, value in attrs.items()],
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise Sm90CompileError(f"the compiler process exited with code {self.process.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise Sm90CompileError(f"sm_{arch} {signature} {constexprs} num_warps={num_warps}:\n{reply['error']}")
        return base64.b64decode(reply["cubin"]), reply["ptx"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def sm90_compiler(compiled_kernel_module):
    """The compiler process (after compiled_kernel_module, whose skip applies to it), closed after the module."""
    compiler = Sm90Compiler()
    yield compiler
    compiler.close()


class Launches:
    """Stands in for the kernel: records each launch's arguments instead of running it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.seen: list[dict] = []

    def __getitem__(self, grid):
        def launch(*args, num_warps, **constexprs):
            arguments = dict(zip(self.kernel.arg_names, args), **constexprs)
            self.seen.append({"grid": grid, "num_warps": num_warps, "arguments": arguments})

        return launch


def specialization(kernel, arguments: dict):
    """(signature, constexprs, attrs) as Triton's launcher derives them from these arguments."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
            continue
        kind, key = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = key
        elif key and "D" in key:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


KERNEL_OF = {"triton": "_tap_backward_kernel", "triton-fold": "_tap_fold_kernel"}


def record_launches(module, dtype_name: str, batch: int, per_channel: bool, needs=((True, True),), convs=SD14_CONVS,
                    backward: str = "triton"):
    """The kernel launches of the tap side's `backward` for each convolution, on meta tensors."""
    name = KERNEL_OF[backward]
    launches = Launches(getattr(module, name))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, launches)
        patch.setitem(atom_kernels._triton_state, "function", module.tap_backward)
        run_backwards(DTYPES[dtype_name], batch, per_channel, needs, convs, backward)
    assert launches.seen, "the Triton route was not taken"
    return launches.seen


def run_backwards(dtype, batch, per_channel, needs, convs, backward="triton") -> None:
    for c_in, c_out, k, stride, size in convs:
        with torch.device("meta"):
            conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2).requires_grad_(False)
            mixing_shape = (c_in, k * k, k * k) if per_channel else (k * k, k * k)
            for need_x, need_mixing in needs:
                x = torch.empty(batch, c_in, size, size).requires_grad_(need_x)
                mixing = torch.empty(mixing_shape).requires_grad_(need_mixing)  # the trained parameter: fp32
                # what tap_mixed_conv2d does under autocast: x and W in its dtype, the mixing fp32
                out = atom_kernels._fast_or_plain(
                    x.to(dtype), conv, mixing, "tap", backward, None if dtype == torch.float32 else dtype
                )
                assert out.dtype == dtype
                inputs = [t for t in (x, mixing) if t.requires_grad]
                grads = torch.autograd.grad(out, inputs, torch.empty_like(out))
                assert all(g.shape == t.shape and g.dtype == t.dtype for g, t in zip(grads, inputs))


_compiled: dict = {}


def compile_sm90(module, compiler: Sm90Compiler, launch, arch: int = 90, kernel: str = "_tap_backward_kernel") -> dict:
    """Compile one recorded launch of `kernel` for sm_90 or `arch` (cached by its specialisation); its registers and
    local memory."""
    signature, constexprs, attrs = specialization(getattr(module, kernel), launch["arguments"])
    key = (kernel, arch, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(sorted(attrs)),
           launch["num_warps"])
    if key not in _compiled:
        binary, ptx = compiler.compile(signature, constexprs, attrs, launch["num_warps"], arch, kernel)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(binary)
            cubin.flush()
            usage = subprocess.run(
                [_tool("cuobjdump"), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
            ).stdout
        figures = {name: int(value) for name, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
        assert {"REG", "STACK", "LOCAL"} <= set(figures), usage
        figures["ptx"] = ptx
        _compiled[key] = figures
    return _compiled[key]


def tile_of(launch) -> tuple:
    a = launch["arguments"]
    return a["BLOCK_C"], a["BLOCK_Q"], launch["num_warps"], a["UNROLL"]


def check_launch(launch) -> None:
    """Nothing in the launch that only the interpreter tests should see, nor an index past int32 where the
    kernel indexes in int32."""
    a = launch["arguments"]
    assert a["FP64"] is False
    assert a["x_ptr"].dtype != torch.float64 and a["h_ptr"].dtype == a["x_ptr"].dtype
    assert a["mix_ptr"].dtype == torch.float32  # (I + M) in fp32 whatever autocast's dtype
    if a["NEED_M"]:
        assert a["part_ptr"].dtype == torch.float32  # partial sums of dL/dM accumulate in fp32
    if a["NEED_X"]:
        assert a["gx_ptr"].dtype == a["x_ptr"].dtype
    # the kernel's int32 arithmetic: a tap's row of H (s·positions + p) and an input position q; the rest
    # (batch, channel and partial-sum rows) is int64 in the kernel
    taps = a["KH"] * a["KW"]
    assert taps * a["out_height"] * a["out_width"] < 2**31
    grid_q, grid_c, grid_b = launch["grid"]
    assert grid_q < 2**31 and grid_c < 2**16 and grid_b < 2**16  # CUDA's grid limits (the interpreter has none)
    assert grid_q * a["BLOCK_Q"] < 2**31 and a["height"] * a["width"] < 2**31
    # every pointer the launch covers fits the tensors it was given (the chunked views' extents)
    assert a["h_ptr"].numel() == launch["grid"][2] * a["channels"] * taps * a["out_height"] * a["out_width"]


# Configurations that spill on sm_90 today (ptxas 13.4 as Triton 3.9 runs it): grad_x alone with one mixing per
# channel in fp16 on the 8x64 tile, 40 bytes (80 registers). The GPU run never launches it: the mixing is
# always trained, so dL/dM is always asked for.
KNOWN_SPILLS = {"fp16 3x3 tile (8, 64, 4, True) grad_x only, per channel"}


@pytest.mark.parametrize("dtype_name", ["bf16", pytest.param("fp16", marks=pytest.mark.slow), pytest.param("fp32", marks=pytest.mark.slow)])
def test_every_sd14_launch_compiles_for_sm90_without_spills(compiled_kernel_module, sm90_compiler, dtype_name):
    """Batch 1 and 4, shared and per-channel mixing, with and without grad_x: the default tiles compile for
    sm_90 with no spills (no stack frame, no local memory) but the known ones."""
    launches = []
    for batch in (1, 4):
        launches += record_launches(compiled_kernel_module, dtype_name, batch, per_channel=False)
    # per-channel mixing (D1); the first layer (no grad_x); a frozen mixing (no dL/dM): batch 4, on both
    # tiles, both strides and both kernel sizes
    needs = ((True, True), (False, True), (True, False))
    convs = [(4, 320, 3, 1, 64), (320, 320, 3, 2, 64), (1280, 1280, 3, 1, 8), (320, 320, 1, 1, 64), (2560, 1280, 1, 1, 8)]
    launches += record_launches(compiled_kernel_module, dtype_name, 4, per_channel=True, needs=needs, convs=convs)
    tiles, spilled = set(), {}
    for launch in launches:
        check_launch(launch)
        tiles.add(tile_of(launch))
        figures = compile_sm90(compiled_kernel_module, sm90_compiler, launch)
        a = launch["arguments"]
        wanted = "grad_x and dL/dM" if a["NEED_X"] and a["NEED_M"] else "grad_x only" if a["NEED_X"] else "dL/dM only"
        name = f"{dtype_name} {a['KH']}x{a['KW']} tile {tile_of(launch)} {wanted}, {'per channel' if a['PER_CHANNEL'] else 'shared'}"
        assert figures["REG"] <= 255, name
        if figures["LOCAL"] or figures["STACK"]:
            spilled[name] = figures["STACK"] + figures["LOCAL"]
        assert ".f64" not in figures["ptx"], f"{name}: float64 arithmetic on the GPU run"
    assert set(spilled) <= KNOWN_SPILLS, f"spills (bytes of stack and local memory): {spilled}"
    # tile()'s choices at these sizes: 128 positions by 4 channels, and 64 by 8 on the 8x8 maps
    assert tiles == {(4, 128, 4, True), (8, 64, 4, True)}


def check_fold_launch(launch) -> None:
    """`check_launch` for the "fold" kernel."""
    a = launch["arguments"]
    assert a["FP64"] is False and a["IEEE"] is (a["x_ptr"].dtype == torch.float32)
    assert a["x_ptr"].dtype != torch.float64 and a["h_ptr"].dtype == a["x_ptr"].dtype
    assert a["mix_ptr"].dtype == torch.float32
    if a["NEED_M"]:
        assert a["part_ptr"].dtype == torch.float32
    taps = a["KH"] * a["KW"]
    assert a["ROWS"] >= max(16, taps)
    assert a["ROWS"] * a["positions"] < 2**31 and a["height"] * a["width"] < 2**31  # the kernel's int32 offsets
    grid_p, grid_c, grid_b = launch["grid"]
    assert grid_c == a["channels"] and grid_c < 2**16 and grid_b < 2**16
    assert grid_p * a["blocks_per_program"] * a["BLOCK_P"] >= a["positions"]  # every position in some program
    assert (grid_p - 1) * a["blocks_per_program"] * a["BLOCK_P"] < a["positions"]  # and no program without one
    assert a["h_ptr"].numel() == grid_b * a["channels"] * taps * a["positions"]


@pytest.mark.parametrize("dtype_name", ["bf16", pytest.param("fp16", marks=pytest.mark.slow), pytest.param("fp32", marks=pytest.mark.slow)])
def test_every_sd14_launch_of_the_fold_kernel_compiles_for_sm90_without_spills(compiled_kernel_module, sm90_compiler, dtype_name):
    """The "fold" kernel as the GPU run launches it (batch 1 and 4, shared mixing; per channel, and each gradient
    alone, on a few layers): no spills, no float64 arithmetic."""
    launches = []
    for batch in (1, 4):
        launches += record_launches(compiled_kernel_module, dtype_name, batch, per_channel=False, backward="triton-fold")
    needs = ((True, True), (False, True), (True, False))
    convs = [(4, 320, 3, 1, 64), (320, 320, 3, 2, 64), (1280, 1280, 3, 1, 8), (320, 320, 1, 1, 64)]
    launches += record_launches(compiled_kernel_module, dtype_name, 4, per_channel=True, needs=needs, convs=convs,
                                backward="triton-fold")
    for launch in launches:
        check_fold_launch(launch)
        figures = compile_sm90(compiled_kernel_module, sm90_compiler, launch, kernel="_tap_fold_kernel")
        a = launch["arguments"]
        name = f"{dtype_name} {a['KH']}x{a['KW']} block {a['BLOCK_P']} NEED_X={a['NEED_X']} NEED_M={a['NEED_M']}"
        assert figures["REG"] <= 255 and not figures["LOCAL"] and not figures["STACK"], (name, figures["REG"])
        assert ".f64" not in figures["ptx"], f"{name}: float64 arithmetic on the GPU run"


@pytest.mark.parametrize("arch,dtype_name", [(75, "fp16"), (80, "bf16"), (86, "bf16"), (89, "bf16")],
                         ids=["T4 sm_75 fp16", "A100 sm_80", "RTX 30 sm_86", "RTX 40 and L4 sm_89"])
def test_sd14_launches_compile_for_other_gpus_without_spills(compiled_kernel_module, sm90_compiler, arch, dtype_name):
    """Users train on more than the H200: the same launches (batch 1 and 4) compile for the GPUs they have,
    in the dtype each trains in, without spills (sm_75 has no bf16: fp16 there)."""
    launches = []
    for batch in (1, 4):
        launches += record_launches(compiled_kernel_module, dtype_name, batch, per_channel=False)
    for launch in launches:
        figures = compile_sm90(compiled_kernel_module, sm90_compiler, launch, arch)
        assert figures["REG"] <= 255 and not figures["LOCAL"] and not figures["STACK"], (arch, tile_of(launch), figures)


def benchmark_tiles(variable: str = "tiles", parser: str = "parse_tile") -> list[tuple]:
    """The tiles gpu.sh asks benchmarks/atom_kernels.py to time (`tiles`: --triton-tiles; `fold_tiles`:
    --fold-tiles), parsed as it parses them."""
    spec = importlib.util.spec_from_file_location("atom_kernels_benchmark", ROOT / "benchmarks/atom_kernels.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    script = (ROOT / "benchmarks/gpu.sh").read_text()
    specs = re.search(rf"^{variable}=(\S+)", script, re.MULTILINE).group(1).split(",")
    return [getattr(benchmark, parser)(spec) for spec in specs]


@pytest.mark.slow
def test_the_benchmarks_fold_tiles_compile_for_sm90(compiled_kernel_module, sm90_compiler, monkeypatch):
    tiles = benchmark_tiles("fold_tiles", "parse_fold_tile")
    assert tiles
    convs = [(320, 320, 3, 1, 64), (320, 320, 3, 2, 64), (1280, 1280, 3, 1, 8)]
    for tile in tiles:
        monkeypatch.setattr(compiled_kernel_module, "FOLD_TILE", tile)
        for batch in (1, 4):
            for launch in record_launches(compiled_kernel_module, "bf16", batch, per_channel=False, convs=convs,
                                          backward="triton-fold"):
                check_fold_launch(launch)
                figures = compile_sm90(compiled_kernel_module, sm90_compiler, launch, kernel="_tap_fold_kernel")
                assert figures["REG"] <= 255, (tile, figures["REG"])


@pytest.mark.slow
def test_the_benchmarks_other_tiles_compile_for_sm90(compiled_kernel_module, sm90_compiler, monkeypatch):
    """The tiles that the per-layer tables time compile too (spills there are reported, not failed: they are
    the alternatives being measured)."""
    tiles = benchmark_tiles()
    assert tiles
    convs = [(320, 320, 3, 1, 64), (320, 320, 3, 2, 64), (1280, 1280, 3, 1, 8), (320, 320, 1, 1, 64)]
    for tile in tiles:
        monkeypatch.setattr(compiled_kernel_module, "TAP_TILE", tile)
        for batch in (1, 4):
            launches = record_launches(compiled_kernel_module, "bf16", batch, per_channel=False, convs=convs)
            for launch in launches:
                assert tile_of(launch) == tile
                check_launch(launch)
                assert compile_sm90(compiled_kernel_module, sm90_compiler, launch)["REG"] <= 255


def test_the_gpu_run_takes_the_weight_side_and_offers_every_sd14_convolution_the_kernel(monkeypatch):
    """On CUDA "auto" takes cuDNN's weight side for every convolution, conv_in and conv_out included (no plain-autograd
    size limit there), with Triton or without; "tap" is the Triton tap side where Triton loads, else the library's.
    `route` reads only the input's device and shape: a stand-in carries a CUDA device without a GPU."""
    from types import SimpleNamespace

    for batch in (1, 4):
        for c_in, c_out, k, _, size in SD14_CONVS:
            x = SimpleNamespace(device=torch.device("cuda"), shape=(batch, c_in, size, size))
            monkeypatch.setitem(atom_kernels._triton_state, "function", lambda *args, **kwargs: None)
            assert atom_kernels.route(x, "auto", c_out * c_in * k * k) == ("weight", None)
            assert atom_kernels.route(x, "tap") == ("tap", "triton")
            monkeypatch.setitem(atom_kernels._triton_state, "function", None)
            assert atom_kernels.route(x, "auto", c_out * c_in * k * k) == ("weight", None)
            assert atom_kernels.route(x, "tap") == ("tap", "depthwise")
