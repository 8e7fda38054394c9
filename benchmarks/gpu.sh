#!/usr/bin/env bash
# The GPU tables of benchmarks/RESULTS.md: SD v1.4 architecture, 512 px (64x64 latents),
# fp32/bf16/fp16 at batch 1 and 4, plus the per-layer kernel table. Each configuration has its
# own time limit, so one slow configuration does not cost the others.
#   bash benchmarks/gpu.sh OUT_DIR [SECONDS_PER_CONFIGURATION]
set -u
out=${1:?output folder}
limit=${2:-100}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
speed() {
    timeout "$limit" python3 "$here/speed.py" --device cuda --latent 64 --steps 10 --warmup 3 \
        --markdown "$out/speed.md" "$@" >>"$out/speed.log" 2>&1 || echo "speed.py $* ended with $?" >>"$out/speed.log"
}
speed --dtype fp32 --batch 1 --sampling --rows "floor,atoms,atoms[tap],atoms[weight],atoms-reference,lora,full"
speed --dtype bf16 --batch 1 --rows "floor,atoms,atoms[tap],atoms[weight],atoms[autograd],atoms-reference,lora,full"
speed --dtype bf16 --batch 4 --rows "floor,atoms,atoms[tap],atoms[weight],lora"
speed --dtype fp32 --batch 4 --rows "floor,atoms,atoms[tap],atoms[weight],lora"
speed --dtype fp16 --batch 1 --rows "floor,atoms,atoms[tap],atoms[weight],lora"
timeout "$limit" python3 "$here/atom_kernels.py" --device cuda --dtype bf16 --latent 64 --batch 1 >"$out/kernels-bf16.md" 2>&1
