"""Compiles the Triton tap-side kernels for sm_90 (or another GPU), one request per line of stdin, for
test_atom_triton_sm90.py.

Run as `python sm90_compiler.py <path of atom_triton.py>` without TRITON_INTERPRET: Triton decides at its
first import whether triton.language's own @jit helpers (tl.sum, ...) are interpreted or compiled, and the test
process imports it interpreted (conftest.py), where compiling a kernel that calls them fails.

Request: {"signature": {name: type}, "constexprs": [[path, value]], "attrs": [[path, attrs]], "num_warps": n,
"arch": 90, "kernel": "_tap_backward_kernel" (the default) or "_tap_fold_kernel"}.
Reply: {"cubin": base64, "ptx": text}, or {"error": the traceback}.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
import traceback


def main(kernel_file: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location("atom_triton_sm90", kernel_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for line in sys.stdin:
        request = json.loads(line)
        kernel = getattr(module, request.get("kernel", "_tap_backward_kernel"))
        try:
            source = ASTSource(
                fn=kernel,
                signature=request["signature"],
                constexprs={tuple(path): value for path, value in request["constexprs"]},
                attrs={tuple(path): value for path, value in request["attrs"]},
            )
            compiled = triton.compile(
                source, target=GPUTarget("cuda", request.get("arch", 90), 32), options={"num_warps": request["num_warps"]}
            )
            reply = {"cubin": base64.b64encode(compiled.asm["cubin"]).decode(), "ptx": compiled.asm["ptx"]}
        except Exception:  # noqa: BLE001 - the test reports the compiler's own error
            reply = {"error": traceback.format_exc()}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
