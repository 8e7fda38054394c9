#!/usr/bin/env bash
# The GPU tables of benchmarks/RESULTS.md: SD v1.4 architecture, 512 px (64x64 latents), within one
# wall-clock budget. Configurations run most important first, each limited to what is left of the
# budget, and each appends its tables to OUT_DIR/speed.md as soon as it is done, so a run cut short
# keeps everything it finished; OUT_DIR/speed.log says how long every row took.
#   bash benchmarks/gpu.sh OUT_DIR [TOTAL_SECONDS]          (default 420)
# DEVICE, ARCH and LATENT override cuda, sd14 and 64: `DEVICE=cpu ARCH=tiny LATENT=8` checks the
# script itself in a minute on a machine without a GPU.
set -u
out=${1:?output folder}
budget=${2:-420}
device=${DEVICE:-cuda}
arch=${ARCH:-sd14}
latent=${LATENT:-64}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
deadline=$((SECONDS + budget))

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

# 1. the headline: bf16 at batch 1 and 4, atoms against LoRA and the floor
speed --dtype bf16 --batch 1 --rows "floor,atoms,atoms[tap],atoms[weight],lora"
speed --dtype bf16 --batch 4 --rows "floor,atoms,atoms[tap],atoms[weight],lora"
# 2. merged sampling costs what the base costs, every method (fp16, as sampling runs on a GPU)
speed --dtype fp16 --batch 1 --sampling-only --rows "atoms,lora,loha,lokr,difffit,bitfit,gift,full"
# 3. fp32, with the reference formulation and full fine-tuning
speed --dtype fp32 --batch 1 --rows "floor,atoms,atoms[weight],atoms-reference,lora,full"
# 4. which kernel wins per layer
kernels bf16 1
kernels bf16 4
# 5. the rest
speed --dtype fp16 --batch 1 --rows "floor,atoms,atoms[tap],atoms[weight],lora"
speed --dtype fp32 --batch 4 --rows "floor,atoms,atoms[tap],atoms[weight],lora"
remaining=$(left); echo "finished with $((remaining > 0 ? remaining : 0)) s of the budget left" >>"$out/speed.log"
