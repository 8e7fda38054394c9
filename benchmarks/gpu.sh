#!/usr/bin/env bash
# The GPU tables of benchmarks/RESULTS.md: SD v1.4 architecture, 512 px (64x64 latents), within one
# wall-clock budget. Configurations run most important first, each limited to what is left of the
# budget, and each appends its tables to OUT_DIR/loop.md, speed.md or kernels.md as soon as it is done, so
# a run cut short keeps everything it finished; OUT_DIR/speed.log and loop.log say how long every row took.
# Last, OUT_DIR/targets.md says which targets the tables meet (targets.py). Six files at most come back (a device
# call returns eight).
#   bash benchmarks/gpu.sh OUT_DIR [TOTAL_SECONDS] [GROUPS]    (default 420 s and `default`)
# GROUPS, comma-separated, run in the order given; each is a list of parts (below), or names one part:
#   default  everything but families, interleaved so that what the targets need comes first: the Triton
#            kernel's bf16 error (kernels.md: PASS or FAIL), the whole train step (loop.md), every kernel's
#            bf16 step at batch 1 and 4 against the floor and LoRA with peak memory (speed.md), fp16 sampling
#            against plain diffusers (loop.md); the same bf16 rows in turns in one process, cuDNN
#            autotuned, channels-last and CUDA graphs; then the per-layer tables with the measured rule, fp16,
#            --compile, the variants (1x1, D1, kc), bf16 sampling, OFT's two routes, merged sampling, fp32
#   kernel   filter atoms' kernels alone: kernelcheck kernelspeed kernelturns cudnn channelslast graphs kernellayers
#            kernel16 variants
#   hostbound  what the 2026-11-30 H200 run left open, most telling first (about 8 minutes in all):
#            kernelspeed graphs cudnn channelslast kernelturns
#   fold     the fold kernel (tap-triton-fold) first, then what hostbound measures, then `sdtune train` under
#            CUDA graphs: kernelcheck foldlayers kernelspeed graphs kernelturns cudnn channelslast traingraphs
#   loop     the whole train step and sampling alone (loop.py): train sample16 compile traingraphs samplebf16
#   sampling merged sampling of every method; rest: fp32 tables
#   families one training step per method on the SDXL-architecture UNet at 1024 px and the SD 2.1 one at
#            768 px, bf16 batch 1, with peak memory (not in the default)
# For the kernel issue alone: `bash benchmarks/gpu.sh OUT 300 kernel` (about 5 minutes).
# The GPU machine has torch, Triton and peft but no diffusers: the wheels it lacks travel in the ignored
# folder .whl (`bash benchmarks/wheels.sh` fills it here; carry .whl with the call), installed into
# /tmp/site when diffusers cannot be imported. The full-size SD v1.4-architecture pipeline with random
# weights that loop.py trains and samples is built on the GPU into $SDTUNE_CACHE (default
# /tmp/sdtune-cache), never into OUT_DIR.
# DEVICE, ARCH and LATENT override cuda, sd14 and 64: `DEVICE=cpu ARCH=tiny LATENT=8` checks the
# script itself in a few minutes on a machine without a GPU (per-layer tables at SD v1.4's layers
# with LATENT-sized latents; the Triton rows fall back to the library there). With TRITON_INTERPRET=1 too,
# atom_kernels.py runs the Triton routes through Triton's interpreter (13 minutes for `--check` alone).
set -u
out=${1:?output folder}
budget=${2:-420}
groups=${3:-default}
device=${DEVICE:-cuda}
arch=${ARCH:-sd14}
latent=${LATENT:-64}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
deadline=$((SECONDS + budget))
export SDTUNE_CACHE=${SDTUNE_CACHE:-/tmp/sdtune-cache} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$(cd "$here/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"  # sdtune from this tree
if ! python3 -c "import diffusers, tomli_w" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$here"/../.whl/*.whl >>"$out/loop.log" 2>&1 || { echo "no diffusers and no wheels in .whl" >>"$out/loop.log"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" >>"$out/loop.log" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" >>"$out/speed.log" 2>&1
python3 -m sdtune env >>"$out/loop.log" 2>&1 || echo "sdtune env ended with $?" >>"$out/loop.log"  # the whole environment

left() { echo $((deadline - SECONDS)); }

budget_for() {  # MIN_SECONDS LOG WHAT: the seconds left, or a "skipped" line in LOG and failure below MIN_SECONDS
    local limit
    limit=$(left)
    if [ "$limit" -lt "$1" ]; then
        echo "skipped (budget spent): $3" >>"$2"
        return 1
    fi
    echo "$limit"
}

speed() {
    local limit
    limit=$(budget_for 20 "$out/speed.log" "speed.py $*") || return 0
    echo "== speed.py $* (${limit} s left)" >>"$out/speed.log"
    timeout "$limit" python3 "$here/speed.py" --device "$device" --arch "$arch" --latent "$latent" \
        --steps 10 --warmup 3 --markdown "$out/speed.md" "$@" >>"$out/speed.log" 2>&1 \
        || echo "speed.py $* ended with $?" >>"$out/speed.log"
}

kernels() {  # atom_kernels.py arguments: one per-layer table (or --check) appended to kernels.md
    local limit
    limit=$(budget_for 20 "$out/speed.log" "atom_kernels.py $*") || return 0
    echo "== atom_kernels.py $* (${limit} s left)" | tee -a "$out/kernels.md" >>"$out/speed.log"
    timeout "$limit" python3 "$here/atom_kernels.py" --device "$device" --latent "$latent" "$@" \
        >>"$out/kernels.md" 2>>"$out/speed.log" || echo "atom_kernels.py $* ended with $?" | tee -a "$out/kernels.md" >>"$out/speed.log"
}

loop() {
    local limit
    limit=$(budget_for 30 "$out/loop.log" "loop.py $*") || return 0
    echo "== loop.py $* (${limit} s left)" >>"$out/loop.log"
    timeout "$limit" python3 "$here/loop.py" --device "$device" --model "$arch" --latent "$latent" \
        --work /tmp/sdtune-loop --markdown "$out/loop.md" "$@" >>"$out/loop.log" 2>&1 \
        || echo "loop.py $* ended with $?" >>"$out/loop.log"
}

tiles=16x32x4u,8x256x4,32x32x4,8x64x2  # other Triton tiles for the per-layer tables (default: 4x128x4u)
fold_tiles=32x2x8,128x4x4,64x4x32  # other tiles of the fold kernel (default: 64x4x8)
kernel_rows="floor,atoms,atoms[autograd],atoms[tap-triton],atoms[tap-triton-fold],atoms[tap-depthwise],lora"  # atoms: the weight side on CUDA

# Each part appends its tables as it finishes; the default order puts first what the loop and kernel targets
# need (correctness, the bf16 steps, fp16 sampling), then what explains them, then the rest.
part_kernelcheck() {  # is the Triton kernel right in bf16? (every distinct layer; a strided odd one)
    kernels --check --dtype bf16 --batch 2
}

part_train() {  # the whole sdtune train step against the bare UNet step and the floor (bf16, batch 1 and 4, atoms, LoRA)
    loop --mixed-precision bf16 --steps 30 --warmup 10
}

part_kernelspeed() {  # the training step of every kernel against the floor and LoRA, with peak memory: bf16, batch 1 and 4
    speed --dtype bf16 --batch 1 --rows "$kernel_rows"
    speed --dtype bf16 --batch 4 --rows "$kernel_rows"
}

part_kernelturns() {  # the same rows stepped in turns in one process: ratios that a host's slow spells skew less
    speed --dtype bf16 --batch 1 --interleave --rows "floor,atoms,atoms[tap-triton-fold],lora"
    speed --dtype bf16 --batch 4 --interleave --rows "floor,atoms,atoms[tap-triton-fold],lora"
}

part_cudnn() {  # cuDNN autotuned (--cudnn-benchmark): does the weight side's bf16 weight gradient get cheaper?
    speed --dtype bf16 --batch 1 --cudnn-benchmark --rows "floor,atoms,lora"
    speed --dtype bf16 --batch 4 --cudnn-benchmark --rows "floor,atoms,lora"
}

part_channelslast() {  # channels-last memory format: cuDNN's NHWC kernels for the weight side's weight gradient
    speed --dtype bf16 --batch 1 --channels-last --rows "floor,atoms,lora"
    speed --dtype bf16 --batch 4 --channels-last --rows "floor,atoms,lora"
}

part_graphs() {  # torch.compile in reduce-overhead mode (CUDA graphs): the step without the host's launches
    speed --dtype bf16 --batch 1 --compile reduce-overhead --warmup 5 --rows "floor,atoms,atoms[tap-triton-fold],lora"
}

part_traingraphs() {  # the whole sdtune train step under CUDA graphs (--compile-mode reduce-overhead), batch 1
    loop --mixed-precision bf16 --methods atoms,lora --batches 1 --compile --compile-mode reduce-overhead --steps 20 --warmup 10
}

part_sample16() {  # sdtune sample against plain diffusers in fp16: start-up and time per image
    loop --sampling-only --sample-dtype fp16 --sample-rounds 2
}

part_kernellayers() {  # why: per layer, every route and tile, its GPU time, and the rule that the table measures
    kernels --dtype bf16 --batch 1 --triton-tiles "$tiles" --fold-tiles "$fold_tiles"
    kernels --dtype bf16 --batch 4 --triton-tiles "$tiles" --fold-tiles "$fold_tiles"
}

part_foldlayers() {  # per layer, the routes without the fused kernel's other tiles: the GPU time of each
    kernels --dtype bf16 --batch 1 --fold-tiles "$fold_tiles"
    kernels --dtype bf16 --batch 4 --fold-tiles "$fold_tiles"
}

part_kernel16() {  # fp16 steps and the kernel's fp16 error
    speed --dtype fp16 --batch 1 --rows "floor,atoms,atoms[autograd],atoms[tap-triton],atoms[tap-triton-fold],lora"
    speed --dtype fp16 --batch 4 --rows "floor,atoms,atoms[autograd],atoms[tap-triton],atoms[tap-triton-fold],lora"
    kernels --check --dtype fp16 --batch 2
}

part_compile() {  # the opt-in --compile (its first step compiles for a minute or more)
    loop --mixed-precision bf16 --methods atoms,lora --batches 1,4 --compile --steps 30 --warmup 10
}

part_variants() {
    # 1x1 convolutions and D1 (one mixing per channel) through the same kernels, D1 on autograd over the formed
    # weight for comparison, kc on its plain route; per layer, D1's mixing
    speed --dtype bf16 --batch 1 --rows "floor,atoms{include_1x1=true},atoms{include_1x1=true}[weight],atoms{m1=4},atoms[autograd]{m1=4},atoms{kc=2},lora"
    kernels --dtype bf16 --batch 1 --per-channel
    kernels --check --dtype bf16 --batch 2 --per-channel
}

part_oft() {  # OFT's two routes (CUDA takes the formed weight; a CPU the rotated input): which should CUDA take?
    speed --dtype bf16 --batch 1 --rows "floor,oft[weight],oft[input],oft{targets=attn}[weight],oft{targets=attn}[input],lora"
}

part_samplebf16() {  # the opt-in bf16 sampling
    loop --sampling-only --sample-dtype bf16 --sample-rounds 1
}

part_sampling() {  # merged sampling costs what the base costs, every method (fp16, as sampling runs on a GPU)
    speed --dtype fp16 --batch 1 --sampling-only --rows "atoms,lora,loha,lokr,difffit,bitfit,gift,full"
}

part_rest() {  # fp32, with the reference formulation and full fine-tuning
    speed --dtype fp32 --batch 1 --rows "floor,atoms,atoms[weight],atoms-reference,lora,full"
    speed --dtype fp32 --batch 4 --rows "floor,atoms,atoms[tap-triton],atoms[weight],lora"
}

part_families() {  # the later --arch and --latent override the defaults speed() passes
    local rows="floor,atoms,lora,loha,lokr,difffit,bitfit,gift,full"
    speed --arch sdxl --latent 128 --dtype bf16 --batch 1 --steps 3 --warmup 1 --rows "$rows"
    speed --arch sd2 --latent 96 --dtype bf16 --batch 1 --steps 3 --warmup 1 --rows "$rows"
}

declare -A group_parts=(
    [default]="kernelcheck train kernelspeed sample16 kernelturns cudnn channelslast graphs kernellayers kernel16 compile traingraphs variants samplebf16 oft sampling rest"
    [kernel]="kernelcheck kernelspeed kernelturns cudnn channelslast graphs kernellayers kernel16 variants"
    [hostbound]="kernelspeed graphs cudnn channelslast kernelturns"
    [fold]="kernelcheck foldlayers kernelspeed graphs kernelturns cudnn channelslast traingraphs"
    [loop]="train sample16 compile traingraphs samplebf16"
    [sampling]="sampling" [rest]="rest" [families]="families"
)
for group in ${groups//,/ }; do
    parts=${group_parts[$group]:-}
    if [ -z "$parts" ] && declare -F "part_$group" >/dev/null; then
        parts=$group
    fi
    if [ -z "$parts" ]; then
        echo "unknown group $group (${!group_parts[*]}, or one part: ${group_parts[default]} families)" >>"$out/speed.log"
    fi
    for part in $parts; do "part_$part"; done
done
remaining=$(left); echo "finished with $((remaining > 0 ? remaining : 0)) s of the budget left" | tee -a "$out/loop.log" >>"$out/speed.log"
# the targets, met or not, from the tables above
python3 "$here/targets.py" "$out" --markdown "$out/targets.md" $([ "$device" = cpu ] && echo --cpu) >/dev/null 2>>"$out/speed.log" \
    || echo "targets.py ended with $?" >>"$out/speed.log"
