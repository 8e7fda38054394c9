#!/usr/bin/env bash
# Fill the ignored folder .whl with the wheels the GPU machine lacks (it has torch, Triton, peft,
# transformers, accelerate, safetensors, tensorboard, typer, ... but not these), for Python 3.12 there.
# gpu.sh installs them into /tmp/site when diffusers cannot be imported; carry .whl with the call.
#   bash benchmarks/wheels.sh
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 tomli_w==1.2.0 importlib_metadata==10.2.0 lazy-importer==0.1.0
ls .whl
