"""Compile the Triton tap-side kernel for a GPU without one: `python triton_compile_check.py CONFIGS_JSON`.

Run in a process of its own, as Triton's interpreter (TRITON_INTERPRET=1, which the kernel tests set) replaces
the compiler in the process that imports the kernel. Each configuration is compiled through Triton's own
pipeline to a cubin for `target` (ptxas ships with Triton), and `cuobjdump` reads its resource use. Prints one
JSON object: for each configuration, {"registers", "stack", "local"} or {"error"}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def compile_one(config: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sdtune.methods.atom_triton import _tap_backward_kernel as kernel

    # The pointers' dtypes as `tap_backward` passes them: H, x and grad_x in the compute dtype; the mixing and
    # the partial sums of dL/dM in fp32 (the partial sums are H itself, never written, without dL/dM)
    dtype = config["dtype"]
    pointers = {"h_ptr": dtype, "x_ptr": dtype, "gx_ptr": dtype, "mix_ptr": "fp32",
                "part_ptr": "fp32" if config["NEED_M"] else dtype}
    signature = {}
    for parameter in kernel.params:
        if parameter.is_constexpr:
            signature[parameter.name] = "constexpr"
        elif parameter.name in pointers:
            signature[parameter.name] = "*" + pointers[parameter.name]
        else:
            signature[parameter.name] = "i32"
    names = [parameter.name for parameter in kernel.params]
    constants = {name: config[name] for name in names if signature[name] == "constexpr"}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", config["arch"], 32), options={"num_warps": config["warps"]})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}


def main(configs: list[dict]) -> dict:
    results = {}
    for config in configs:
        try:
            results[config["name"]] = compile_one(config)
        except Exception as error:  # noqa: BLE001 - reported per configuration
            results[config["name"]] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return results


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    print(json.dumps(main(json.loads(sys.argv[1]))))
