"""`import kernl.runtime` is on every serving process's cold start: it must not pull in Triton
(~0.14 s; the runtime launches precompiled binaries through the CUDA driver) nor transformers
or the compiler."""

import os
import subprocess
import sys


def test_importing_the_runtime_imports_no_triton_transformers_or_compiler():
    code = (
        "import sys, kernl.runtime; "
        "print(sorted(m for m in ('triton', 'transformers', 'kernl.compiler') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_kernel_modules_imported_ahead_are_those_the_ops_launch_from():
    """load() imports KERNEL_MODULES on a thread before the first capture needs them: the
    list must be every module kernl_ops imports its kernels from, and nothing else."""
    import ast
    import inspect

    from kernl.runtime import kernl_ops

    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(kernl_ops))):
        if isinstance(node, ast.ImportFrom) and node.module == "kernl.kernels":
            imported |= {f"kernl.kernels.{alias.name}" for alias in node.names}
    assert imported and set(kernl_ops.KERNEL_MODULES) == imported


def test_importing_the_kernel_modules_ahead_imports_them_on_a_thread():
    code = (
        "import sys, kernl.runtime as rt; "
        "from kernl.runtime.kernl_ops import KERNEL_MODULES; "
        "thread = rt._import_kernel_modules_ahead(); "
        "print(thread.daemon, thread.name != 'MainThread'); thread.join(); "
        "print(all(m in sys.modules for m in KERNEL_MODULES), 'triton' in sys.modules)"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == ["True", "True", "True", "True"], out.stdout + out.stderr
