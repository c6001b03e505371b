"""One process, many users of Triton: a loaded model's kernel binaries serve that model's
launches only, on the thread that runs it; everything else (another model, the compiler, a
user's own Triton code, another thread) keeps its own launcher. Interpreted launches (CPU
mode) from several threads are serialised."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers as T
import triton.language as tl
from triton.runtime.jit import JITFunction

import kernl.compiler
import kernl.runtime
from kernl.kernels import launch as kernel_launch
from kernl.kernels.launch import launch_kernel, launching_with
from kernl.kernels.norm import layer_norm, layer_norm_reference
from kernl.runtime import binaries
from kernl.runtime.binaries import BinarySpec, KernelBinaries, MissingBinaryError, allow_jit


def _scaled_add(X, Y, Out, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Out + offs, tl.load(X + offs) * alpha + tl.load(Y + offs), mask=offs < n)


# A compiled-mode kernel object whatever TRITON_INTERPRET says: what a GPU process holds.
SCALED_ADD = JITFunction(_scaled_add)


class _FakeLoaded:
    """Stands for a cubin loaded on a GPU: records who launched what."""

    def __init__(self, spec, cubin, device):
        self.spec, self.owner = spec, cubin.decode()

    def launch(self, grid, bound, pdl: bool = False, cooperative: bool = False):
        _FakeLoaded.launches.append((self.owner, grid, bound["n"]))


@pytest.fixture
def fake_gpu(monkeypatch):
    _FakeLoaded.launches = []
    jitted = []
    monkeypatch.setattr(binaries, "_Loaded", _FakeLoaded)
    monkeypatch.setattr(torch.cuda, "device", lambda device: _NullContext())

    def jit(kernel, grid, args, kwargs):
        jitted.append(args[3])

    monkeypatch.setattr(kernel_launch, "jit_launch", jit)
    monkeypatch.setattr(binaries, "jit_launch", jit)
    return jitted


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _args(n: int):
    x = torch.zeros(n)
    return (x, x, x, n, 0.5)


def _binaries_for(owner: str) -> KernelBinaries:
    """A model's binaries holding one kernel for the key of `_args(100)`."""
    bound, options = binaries.bind(SCALED_ADD, _args(100), {"BLOCK": 128})
    key = binaries.launch_key(SCALED_ADD, bound, options)
    spec = BinarySpec(key, "_scaled_add", 4, 1, 0, [])
    loaded = KernelBinaries(torch.device("cuda", 0))
    loaded.add(spec, owner.encode())
    return loaded


def test_each_model_launches_its_own_binaries_and_nothing_else_is_routed(fake_gpu):
    jitted = fake_gpu
    a, b = _binaries_for("model A"), _binaries_for("model B")  # the same launch key
    with launching_with(a):
        launch_kernel(SCALED_ADD, (1,), *_args(100), BLOCK=128)
        with launching_with(b):  # a second model called from inside the first one's run
            launch_kernel(SCALED_ADD, (1,), *_args(100), BLOCK=128)
        with allow_jit():  # the compiler (kernl bench) inside a model's run: Triton's JIT
            launch_kernel(SCALED_ADD, (1,), *_args(7), BLOCK=128)
        launch_kernel(SCALED_ADD, (2,), *_args(100), BLOCK=128)
        with pytest.raises(MissingBinaryError, match="no precompiled binary"):
            launch_kernel(SCALED_ADD, (1,), *_args(100), BLOCK=64)  # a key it was not built for
        other_thread = threading.Thread(
            target=lambda: launch_kernel(SCALED_ADD, (1,), *_args(3), BLOCK=128)
        )
        other_thread.start()
        other_thread.join()
    launch_kernel(SCALED_ADD, (1,), *_args(5), BLOCK=128)  # after the run: plain Triton
    assert _FakeLoaded.launches == [
        ("model A", (1, 1, 1), 100),
        ("model B", (1, 1, 1), 100),
        ("model A", (2, 1, 1), 100),
    ]
    assert jitted == [7, 3, 5]


def test_loading_an_artifact_patches_nothing_in_triton(tmp_path):
    run_before = JITFunction.run
    torch.manual_seed(0)
    model = T.BertModel(
        T.BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=50,
            max_position_embeddings=16,
        )
    ).eval()
    kernl.compiler.compile(model, "batch=1 seq=8", tmp_path / "a", dtype="fp32", device="cpu")
    compiled = kernl.runtime.load(tmp_path / "a", device="cpu")
    compiled(torch.tensor([[5, 6, 7]]))
    assert JITFunction.run is run_before


def test_interpreted_kernels_from_many_threads_are_all_right():
    """Triton's interpreter patches triton.language while it runs a kernel: two threads in it
    at once failed with InterpreterError (333 of 800 calls with two models, before)."""
    if not kernel_launch.is_interpreted(layer_norm.__globals__["_norm_kernel"]):
        pytest.skip("kernels are compiled here, not interpreted")
    errors: list[str] = []

    def worker(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(12):
            x = torch.randn(3, 48, generator=g)
            w, bias = torch.randn(48, generator=g), torch.randn(48, generator=g)
            try:
                got = layer_norm(x, w, bias, 1e-5)
            except Exception as e:  # collected, so every thread's failure is reported
                errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            want = layer_norm_reference(x.double(), w.double(), bias.double(), 1e-5)
            if (got.double() - want).abs().max().item() > 1e-4:
                errors.append("wrong result")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_two_loaded_models_called_from_two_threads(tmp_path):
    torch.manual_seed(0)
    cfg = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
    )
    eager = [T.BertModel(T.BertConfig(**cfg)).eval() for _ in range(2)]
    loaded = []
    for i, m in enumerate(eager):
        kernl.compiler.compile(m, "batch=1,2 seq=8", tmp_path / f"m{i}", dtype="fp32", device="cpu")
        loaded.append(kernl.runtime.load(tmp_path / f"m{i}", device="cpu"))
    errors: list[str] = []

    def worker(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        for _ in range(6):
            ids = torch.randint(1, 50, (2, 7), generator=g)
            try:
                got = loaded[i](ids).last_hidden_state
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            with torch.no_grad():
                want = eager[i](ids).last_hidden_state
            if (got - want).abs().max().item() > 1e-4:
                errors.append(f"model {i}: wrong result")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
