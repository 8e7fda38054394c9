#!/usr/bin/env bash
# The GPU tables of benchmarks/RESULTS.md: SD v1.4 architecture, 512 px (64x64 latents), within one
# wall-clock budget. Configurations run most important first, each limited to what is left of the
# budget, and each appends its tables to OUT_DIR/loop.md or OUT_DIR/speed.md as soon as it is done, so a
# run cut short keeps everything it finished; OUT_DIR/speed.log and loop.log say how long every row took.
#   bash benchmarks/gpu.sh OUT_DIR [TOTAL_SECONDS]          (default 420)
# The GPU machine has torch, Triton and peft but no diffusers: the wheels it lacks travel in the ignored
# folder .whl (`bash benchmarks/wheels.sh` fills it here; carry .whl with the call), installed into
# /tmp/site when diffusers cannot be imported. The full-size SD v1.4-architecture pipeline with random
# weights that loop.py trains and samples is built on the GPU into $SDTUNE_CACHE (default
# /tmp/sdtune-cache), never into OUT_DIR.
# DEVICE, ARCH and LATENT override cuda, sd14 and 64: `DEVICE=cpu ARCH=tiny LATENT=8` checks the
# script itself in a few minutes on a machine without a GPU.
set -u
out=${1:?output folder}
budget=${2:-420}
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

left() { echo $((deadline - SECONDS)); }

speed() {
    local limit
    limit=$(left)
    if [ "$limit" -lt 20 ]; then
        echo "skipped (budget spent): speed.py $*" >>"$out/speed.log"
        return
    fi
    echo "== speed.py $* (${limit} s left)" >>"$out/speed.log"
    timeout "$limit" python3 "$here/speed.py" --device "$device" --arch "$arch" --latent "$latent" \
        --steps 10 --warmup 3 --markdown "$out/speed.md" "$@" >>"$out/speed.log" 2>&1 \
        || echo "speed.py $* ended with $?" >>"$out/speed.log"
}

kernels() {  # DTYPE BATCH
    local limit
    limit=$(left)
    if [ "$limit" -lt 20 ]; then
        echo "skipped (budget spent): atom_kernels.py $1 batch $2" >>"$out/speed.log"
        return
    fi
    timeout "$limit" python3 "$here/atom_kernels.py" --device "$device" --latent "$latent" --dtype "$1" --batch "$2" \
        >"$out/kernels-$1-batch$2.md" 2>&1 || echo "atom_kernels.py $1 batch $2 ended with $?" >>"$out/speed.log"
}

loop() {
    local limit
    limit=$(left)
    if [ "$limit" -lt 30 ]; then
        echo "skipped (budget spent): loop.py $*" >>"$out/loop.log"
        return
    fi
    echo "== loop.py $* (${limit} s left)" >>"$out/loop.log"
    timeout "$limit" python3 "$here/loop.py" --device "$device" --model "$arch" --latent "$latent" \
        --work /tmp/sdtune-loop --markdown "$out/loop.md" "$@" >>"$out/loop.log" 2>&1 \
        || echo "loop.py $* ended with $?" >>"$out/loop.log"
}

# 1. the whole sdtune train step against the bare UNet step and the floor (bf16, batch 1 and 4, atoms and
#    LoRA), then sdtune sample against plain diffusers in fp16 (start-up and time per image)
loop --mixed-precision bf16 --steps 30 --warmup 10
loop --sampling-only --sample-dtype fp16 --sample-rounds 2
# 2. bf16 sampling, and the opt-in --compile (its first step compiles for a minute or more)
loop --sampling-only --sample-dtype bf16 --sample-rounds 1
loop --mixed-precision bf16 --methods atoms --batches 1,4 --compile --steps 30 --warmup 10
# 3. the bare steps of every formulation: bf16 at batch 1 and 4, atoms against LoRA and the floor
speed --dtype bf16 --batch 1 --rows "floor,atoms,atoms[tap],atoms[weight],lora"
speed --dtype bf16 --batch 4 --rows "floor,atoms,atoms[tap],atoms[weight],lora"
# 4. merged sampling costs what the base costs, every method (fp16, as sampling runs on a GPU)
speed --dtype fp16 --batch 1 --sampling-only --rows "atoms,lora,loha,lokr,difffit,bitfit,gift,full"
# 5. fp32, with the reference formulation and full fine-tuning
speed --dtype fp32 --batch 1 --rows "floor,atoms,atoms[weight],atoms-reference,lora,full"
# 6. which kernel wins per layer
kernels bf16 1
kernels bf16 4
# 7. the rest
speed --dtype fp16 --batch 1 --rows "floor,atoms,atoms[tap],atoms[weight],lora"
speed --dtype fp32 --batch 4 --rows "floor,atoms,atoms[tap],atoms[weight],lora"
remaining=$(left); echo "finished with $((remaining > 0 ? remaining : 0)) s of the budget left" | tee -a "$out/loop.log" >>"$out/speed.log"
