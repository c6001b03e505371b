"""`import kernl.runtime` is on every serving process's cold start: it must not pull in Triton
(~0.14 s; the runtime launches precompiled binaries through the CUDA driver) nor transformers
or the compiler."""

import subprocess
import sys


def test_importing_the_runtime_imports_no_triton_transformers_or_compiler():
    code = (
        "import sys, kernl.runtime; "
        "print(sorted(m for m in ('triton', 'transformers', 'kernl.compiler') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
