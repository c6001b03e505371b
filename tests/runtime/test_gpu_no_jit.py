"""Production start-up compiles nothing: an artifact with kernel binaries loads and serves
with an empty read-only Triton cache, no C compiler on PATH, and Triton never imported."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import kernl.compiler

# Triton is never imported (kernels/jit.py): nothing can compile, and load() pays no
# Triton import (a tenth of a cold start)
SERVE = textwrap.dedent(
    """
    import os, sys, torch
    import kernl.runtime
    model = kernl.runtime.load(sys.argv[1], device="cuda")
    assert model.manifest.kernels, "artifact holds no kernel binaries"
    ids = torch.load(sys.argv[2])
    out = model(input_ids=ids).last_hidden_state
    torch.save(out.cpu(), sys.argv[3])
    assert "triton" not in sys.modules, "load() or a call imported Triton"
    assert not os.listdir(os.environ["TRITON_CACHE_DIR"]), "Triton wrote to its cache"
    assert "kernl.compiler" not in sys.modules and "transformers" not in sys.modules
    print("served with", len(model.manifest.kernels), "binaries, Triton not imported")
    """
)


@pytest.mark.gpu
def test_load_and_serve_without_jit_cache_or_c_compiler(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024
    )
    model = BertModel(cfg).eval()
    artifact = tmp_path / "b.kernl"
    # tune=False: every kernl op on its Triton kernel (default config), so binaries exist
    kernl.compiler.compile(
        model, "batch=2 seq=64", artifact, dtype="fp16", device="cuda", tune=False
    )
    ids = torch.randint(1000, 30000, (2, 50))
    torch.save(ids, tmp_path / "ids.pt")
    cache = tmp_path / "triton-cache"
    cache.mkdir()
    cache.chmod(stat.S_IRUSR | stat.S_IXUSR)
    bindir = tmp_path / "bin"  # PATH holds python and nothing else: no gcc, cc or clang
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")}
    env.update(PATH=str(bindir), TRITON_CACHE_DIR=str(cache), HOME=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.run(
        [
            str(bindir / "python"),
            "-c",
            SERVE,
            str(artifact),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "out.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Triton not imported" in proc.stdout
    with torch.no_grad():
        ref = model.half().cuda()(input_ids=ids.cuda()).last_hidden_state.float().cpu()
    got = torch.load(tmp_path / "out.pt").float()
    assert (got - ref).abs().max() < 3e-2
