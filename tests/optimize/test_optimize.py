"""`kernl.optimize` on tiny models in memory (CPU, fp32): results match eager, the second call
loads from the cache without compiling (compile calls are counted), changed weights or buckets
miss it, save_to writes a loadable artifact, and the caller's model is left as it was."""

from __future__ import annotations

import copy
import errno
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import transformers as T
from generation.tiny_models import mixed_prompts, tiny_model

import kernl
import kernl.runtime
from kernl.artifacts import ArtifactDestinationError, verify_artifact
from kernl.artifacts.writer import STALE_SECONDS, pid_namespace
from kernl.compiler import api
from kernl.compiler import optimize as opt
from kernl.compiler.buckets import BucketLimitError

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=120,
    max_position_embeddings=32,
)
BUCKETS = "batch=1,2 seq=8,16"
TOL = 2e-5


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return T.BertModel(T.BertConfig(**SMALL)).eval()


def _inputs(batch: int = 2, seq: int = 11, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _assert_matches(got, want) -> None:
    for name in ("last_hidden_state", "pooler_output"):
        err = (got[name] - want[name]).abs().max().item()
        assert err < TOL, f"{name}: max |error| {err}"


def _entries(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_bert_matches_eager_then_hits_the_cache(cache, compiles):
    bert = tiny_bert()
    messages: list[str] = []
    model = kernl.optimize(bert, BUCKETS, progress=messages.append)
    assert len(compiles) == 1 and not model.cache_hit
    assert compiles[0][1]["dtype"] == "fp32" and compiles[0][1]["device"] == "cpu"
    inputs = _inputs()
    with torch.no_grad():
        want = bert(**inputs)
    got = model(**inputs)  # like model(**tokenizer(...))
    assert type(got) is type(want)  # the Hugging Face output class, same field names
    assert got.hidden_states is None and got.attentions is None  # as in eager
    _assert_matches(got, want)
    _assert_matches(model(inputs["input_ids"], inputs["attention_mask"]), want)  # positional
    tup = model(**inputs, return_dict=False)
    assert isinstance(tup, tuple) and torch.allclose(tup[0], want[0], atol=TOL)
    assert _entries(cache) == [model.artifact.name]
    # a config flag for per-layer outputs set afterwards was ignored in silence (review)
    model.config.output_hidden_states = True
    with pytest.raises(ValueError, match="output_hidden_states is True, set after"):
        model(**inputs)
    # the call's own False wins, as in HF (it was refused for the config's True)
    assert model(**inputs, output_hidden_states=False).hidden_states is None
    model.config.output_hidden_states = False
    _assert_matches(model(**inputs), want)

    # Same model again (another object, same weights): no compile, same results.
    again = kernl.optimize(tiny_bert(), "1x8,1x16,2x8,2x16", progress=messages.append)
    assert len(compiles) == 1 and again.cache_hit and again.artifact == model.artifact
    _assert_matches(again(**inputs), want)
    assert any("cache hit" in m for m in messages)


def test_changed_weights_and_changed_buckets_miss(cache, compiles):
    bert = tiny_bert()
    kernl.optimize(bert, "batch=1 seq=8", progress=False)
    changed = copy.deepcopy(bert)
    with torch.no_grad():
        changed.encoder.layer[1].output.dense.weight[3, 5] += 1e-3
    model = kernl.optimize(changed, "batch=1 seq=8", progress=False)
    assert len(compiles) == 2 and not model.cache_hit
    inputs = _inputs(1, 8)
    with torch.no_grad():
        _assert_matches(model(**inputs), changed(**inputs))  # the new weights are served
    other = kernl.optimize(bert, "batch=1 seq=16", progress=False)
    assert len(compiles) == 3 and not other.cache_hit
    assert len(_entries(cache)) == 3
    assert kernl.optimize(bert, "batch=1 seq=8", progress=False).cache_hit
    assert len(compiles) == 3


def test_another_attention_implementation_misses(cache, compiles):
    """`_attn_implementation` is not in the config's JSON, yet it picks the attention code:
    an eager BERT's fully masked row averages its keys where an SDPA BERT's is zeros. An
    eager model was served the SDPA model's entry."""
    models = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        models[impl] = T.BertModel(T.BertConfig(**SMALL, attn_implementation=impl)).eval()
    inputs = _inputs(1, 8)
    inputs["attention_mask"].zero_()  # exactly the bucket: no padding of the runtime's
    kernl.optimize(models["sdpa"], "batch=1 seq=8", progress=False)
    eager = kernl.optimize(models["eager"], "batch=1 seq=8", progress=False)
    assert len(compiles) == 2 and not eager.cache_hit
    with torch.no_grad():
        want = models["eager"](**inputs)
    _assert_matches(eager(**inputs), want)


def test_call_outside_the_buckets_gets_the_runtime_error(cache):
    model = kernl.optimize(tiny_bert(), "batch=1 seq=8", progress=False)
    with pytest.raises(ValueError, match=r"larger than every bucket .*batch x seq: 1x8"):
        model(input_ids=torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="larger than every bucket"):
        model(input_ids=torch.ones(2, 8, dtype=torch.long))


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "devices": {str(p.device) for p in model.parameters()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "config": model.config.to_dict(),
        "rng": torch.get_rng_state(),
    }


def _assert_same(before: dict, after: dict) -> None:
    assert after["dtypes"] == before["dtypes"] and after["devices"] == before["devices"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["config"] == before["config"]
    assert torch.equal(after["rng"], before["rng"])
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), f"{k} changed"
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


# None: the model's own dtype (no cast). fp16: compiled from the model cast in place, its
def test_a_chunked_feed_forward_keeps_the_hugging_face_output_class(cache):
    """chunk_size_feed_forward=4: the output class was found by a forward on two tokens,
    which HF refuses for chunks of 4; the runtime's dict came back instead of the class."""
    torch.manual_seed(0)
    bert = T.BertForSequenceClassification(T.BertConfig(**SMALL, chunk_size_feed_forward=4))
    model = kernl.optimize(bert.eval(), "batch=2 seq=12", progress=False)
    got = model(**_inputs(2, 12))
    assert type(got) is T.modeling_outputs.SequenceClassifierOutput and got.loss is None
    with torch.no_grad():
        assert (got.logits - bert(**_inputs(2, 12)).logits).abs().max().item() < TOL


class _MeanPool(torch.nn.Module):
    """A sentence-embedding wrapper as users write one: no return_dict, a tensor out."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.config = encoder, encoder.config

    def forward(self, input_ids, attention_mask=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask[..., None].float()
        return (hidden * mask).sum(1) / mask.sum(1)


class _MeanPoolTakingReturnDict(_MeanPool):
    def forward(self, input_ids, attention_mask=None, return_dict=None):
        return super().forward(input_ids, attention_mask)


@pytest.mark.parametrize("wrapper", [_MeanPool, _MeanPoolTakingReturnDict])
def test_a_wrapper_is_told_to_take_return_dict_and_return_a_dict(cache, wrapper):
    """The refusal said "kernl compiles encoders called as model(input_ids[, attention_mask,
    ...])", which the wrapper is: what it lacked (return_dict, a mapping out) went unsaid, or
    its tensor failed on .items() as a failure kernl did not foresee."""
    from kernl.compiler.trace import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=r"take return_dict .* return a dict"):
        kernl.optimize(wrapper(tiny_bert()), "batch=2 seq=8", progress=False)


# tensors put back after. grads: a parameter to cast has a gradient (compiled from a copy).
@pytest.mark.parametrize("case", [None, "fp16", "grads"])
def test_the_original_model_is_untouched(cache, case):
    bert = tiny_bert().train()  # compile switches its model to eval mode: must be undone
    bert.pooler.dense.weight.requires_grad_(False)
    if case == "grads":
        bert.pooler.dense.bias.grad = torch.randn(64)
    inputs = _inputs(1, 8)
    with torch.no_grad():
        want = bert.eval()(**inputs)
    bert.train()
    before = _snapshot(bert)
    param = bert.encoder.layer[0].output.dense.weight
    param_data_ptr = param.data_ptr()
    dtype = None if case is None else "fp16"
    model = kernl.optimize(bert, "batch=1 seq=8", dtype=dtype, progress=False)
    _assert_same(before, _snapshot(bert))
    # The very same Parameter objects and storage: optimizers holding them still work.
    assert bert.encoder.layer[0].output.dense.weight is param
    assert param.data_ptr() == param_data_ptr
    with torch.no_grad():
        _assert_matches(bert.eval()(**inputs), want)  # same outputs as before
    # The returned model holds its own weights: changing the original changes nothing.
    got = model(**inputs)
    with torch.no_grad():
        bert.pooler.dense.weight.add_(1.0)
    again = model(**inputs)
    assert torch.equal(got.pooler_output, again.pooler_output)
    if dtype == "fp16":
        assert got.last_hidden_state.dtype == torch.float16
        assert (got.last_hidden_state.float() - want.last_hidden_state).abs().max() < 2e-2


def test_the_compile_never_touches_the_callers_modules(cache, monkeypatch):
    """compile() casts and traces the modules it is given: given the caller's, another thread
    serving the model eagerly meanwhile got fp16 outputs or torch's export errors. It is given
    new module objects over the same tensors: the caller's stay fp32 all along."""
    bert = tiny_bert()
    modules = set(map(id, bert.modules()))
    seen = []
    real = api._compile  # what compile() runs on the module objects it made

    def spy(subject, *args, progress=None, **kwargs):
        def watch(message):
            dtypes = {p.dtype for p in bert.parameters()}
            seen.append((modules.isdisjoint(map(id, subject.modules())), dtypes))

        shared = {p.data_ptr() for p in bert.parameters()}
        assert shared == {p.data_ptr() for p in subject.parameters()}  # no copy made
        return real(subject, *args, progress=watch, **kwargs)

    monkeypatch.setattr(api, "_compile", spy)
    model = kernl.optimize(bert, "batch=1 seq=8", dtype="fp16", progress=False)
    assert len(seen) > 3 and all(apart and dtypes == {torch.float32} for apart, dtypes in seen)
    with torch.no_grad():
        want = bert(**_inputs(1, 8))
    got = model(**_inputs(1, 8))
    assert (got.last_hidden_state.float() - want.last_hidden_state).abs().max() < 2e-2


def test_an_fp32_buffer_of_an_fp16_model_stays_fp32(cache):
    """Like Llama's rotary table in an fp16 model: compile's cast would make it fp16."""
    bert = tiny_bert().half()
    bert.register_buffer("table", torch.linspace(0, 1, 7, dtype=torch.float32))
    table = bert.table
    model = kernl.optimize(bert, "batch=1 seq=8", progress=False)
    assert model.runtime.manifest.dtype == "float16"  # the model's own dtype by default
    assert bert.table is table and table.dtype == torch.float32
    assert all(p.dtype == torch.float16 for p in bert.parameters())


def test_save_to_writes_a_loadable_artifact(cache, tmp_path, compiles):
    bert = tiny_bert()
    out = tmp_path / "bert.kernl"
    kernl.optimize(bert, "batch=1 seq=8", save_to=out, progress=False)
    verify_artifact(out)
    inputs = _inputs(1, 8)
    with torch.no_grad():
        _assert_matches(kernl.runtime.load(out)(**inputs), bert(**inputs))
    # From the cache this time, and over the existing artifact.
    assert kernl.optimize(bert, "batch=1 seq=8", save_to=out, progress=False).cache_hit
    assert len(compiles) == 1
    verify_artifact(out)
    (out / "tokenizer.json").write_text("{}")  # as docs/deployment.md has it: kept
    assert kernl.optimize(bert, "batch=1 seq=8", save_to=out, progress=False).cache_hit
    assert (out / "tokenizer.json").read_text() == "{}"
    verify_artifact(out)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ArtifactDestinationError, match="not a kernl artifact"):
        kernl.optimize(bert, "batch=1 seq=8", save_to=tmp_path / "notes", progress=False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_save_to_the_cache_folder_is_refused_before_the_compile(cache, tmp_path, compiles):
    """save_to= naming a new folder that is also cache_dir= passed the destination check,
    then the compile made the cache in it, and the copy refused it after the compile."""
    bert = tiny_bert()
    new = tmp_path / "new"
    for save_to, cache_dir in ((new, new), (tmp_path / "a", tmp_path / "a" / "cache")):
        with pytest.raises(ValueError, match="is the cache folder .* or holds it"):
            kernl.optimize(bert, "batch=1 seq=8", cache_dir=cache_dir, save_to=save_to)
        assert not save_to.exists()
    with pytest.raises(ValueError, match="or holds it"):  # KERNL_CACHE_DIR's folder alike
        kernl.optimize(bert, "batch=1 seq=8", save_to=cache.parent, progress=False)
    assert compiles == []
    # a folder inside the cache folder is the user's to choose: it holds no cache
    kernl.optimize(bert, "batch=1 seq=8", save_to=cache.parent / "out", progress=False)
    verify_artifact(cache.parent / "out")


def test_an_entry_the_device_has_no_room_for_now_is_kept(cache, compiles, monkeypatch):
    """A device short of free memory (another model on it) refuses the load; the entry is
    sound and stays for the next call. It was taken for a corrupt one: deleted, recompiled
    (an 8B model's compile), and the new entry refused the same way."""
    from kernl.artifacts import DeviceMemoryError

    bert = tiny_bert()
    entry = kernl.optimize(bert, "batch=1 seq=8", progress=False).artifact
    manifest = (entry / "manifest.msgpack").stat()
    # a context, not monkeypatch.undo(): that also undid the cache fixture's KERNL_CACHE_DIR,
    # and the last call then read whatever cache the environment named (failed once, -n 2)
    with monkeypatch.context() as m:
        m.setattr(kernl.runtime, "_free_memory", lambda device: 1024)
        with pytest.raises(DeviceMemoryError, match="the device has 1.0 KiB free"):
            kernl.optimize(bert, "batch=1 seq=8", progress=False)
    assert len(compiles) == 1
    assert (entry / "manifest.msgpack").stat().st_ino == manifest.st_ino
    assert kernl.optimize(bert, "batch=1 seq=8", progress=False).cache_hit


def test_a_failed_copy_to_save_to_puts_the_previous_artifact_back(cache, tmp_path, monkeypatch):
    """Where the filesystem cannot swap two paths in one step, the copy to save_to= moves
    the previous artifact aside, then renames the new one in; a failure of that second
    rename deleted the previous one with the temporary folder (review)."""
    out = tmp_path / "saved.kernl"
    kernl.optimize(tiny_bert(), "batch=1 seq=8", save_to=out, progress=False)
    before = verify_artifact(out)
    other = kernl.optimize(tiny_bert(seed=1), "batch=1 seq=8", progress=False).artifact
    real = os.rename

    def failing(src, dst):
        if Path(src).name == "artifact":
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real(src, dst)

    import kernl.artifacts.writer as writer

    monkeypatch.setattr(writer, "_exchange", lambda a, b: False)  # no exchange there
    monkeypatch.setattr(opt.os, "rename", failing)
    with pytest.raises(OSError, match="Input/output error"):
        opt.copy_artifact(other, out)
    monkeypatch.undo()
    assert verify_artifact(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved.kernl.copy")]


def test_a_copy_to_save_to_removes_what_killed_copies_left(cache, tmp_path):
    """A process killed while it copied to save_to= left a hidden full-size copy that every
    later save_to= (and compile) to that path kept (review)."""
    import socket
    import subprocess
    import sys

    from kernl.artifacts.writer import pid_namespace

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".saved.kernl.copy-{socket.gethostname()}~{pid_namespace()}@{dead.pid}-x1"
    (left / "artifact").mkdir(parents=True)
    (left / "artifact" / "weights.safetensors").write_bytes(b"0" * 1024)
    kernl.optimize(tiny_bert(), "batch=1 seq=8", save_to=tmp_path / "saved.kernl", progress=False)
    assert not left.exists()
    assert verify_artifact(tmp_path / "saved.kernl")


@pytest.mark.parametrize("when", ["writing", "up front"])
def test_a_full_disk_under_the_cache_is_said_as_the_caches(cache, monkeypatch, when):
    """The writer's message named the build folder's hidden paths (`.build-*/...partial-*`),
    not the cache or the setting that moves it (review)."""
    import kernl.artifacts.writer as writer

    if when == "writing":

        def full(path, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(writer, "write_safetensors", full)
    else:
        monkeypatch.setattr(writer, "MIN_FREE_BYTES", 1 << 62)
    with pytest.raises(ArtifactDestinationError) as info:
        kernl.optimize(tiny_bert(), "batch=1 seq=8", progress=False)
    message = str(info.value)
    assert message.startswith(f"the kernl cache {cache} has no room for this model's artifact")
    assert "KERNL_CACHE_DIR" in message and ".build-" not in message
    assert ("the file system is full" if when == "writing" else "MiB are free") in message
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_a_copy_racing_another_to_a_new_save_to_replaces_it(cache, tmp_path, monkeypatch):
    """Another process's artifact appearing at a new save_to between the check and the rename
    (ENOTEMPTY from the rename) is replaced, as the writer's commit replaces it: the copy
    failed with a bare "Directory not empty" after the whole compile (review)."""
    out = tmp_path / "saved.kernl"
    first = kernl.optimize(tiny_bert(), "batch=1 seq=8", progress=False).artifact
    other = kernl.optimize(tiny_bert(seed=1), "batch=1 seq=8", progress=False).artifact
    real = os.rename
    raced = []

    def racing(src, dst):
        if Path(dst) == out and not raced:  # the other copy lands first
            raced.append(True)
            opt.copy_artifact(first, out)
        return real(src, dst)

    monkeypatch.setattr(opt.os, "rename", racing)
    opt.copy_artifact(other, out)
    monkeypatch.undo()
    assert raced
    assert verify_artifact(out) == verify_artifact(other)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved.kernl.copy")]


def test_a_replaced_copy_that_cannot_be_deleted_is_named_in_a_warning(cache, tmp_path, monkeypatch):
    """The previous artifact a copy swapped out, left where it could not be deleted, is named
    in a warning (it was ignored: a hidden folder nobody removes)."""
    out = tmp_path / "saved.kernl"
    kernl.optimize(tiny_bert(), "batch=1 seq=8", save_to=out, progress=False)
    other = kernl.optimize(tiny_bert(seed=1), "batch=1 seq=8", progress=False).artifact
    import shutil

    real_rmtree = shutil.rmtree

    def failing(path, *args, onexc=None, onerror=None, **kwargs):
        if not Path(path).name.startswith(".saved.kernl.copy"):
            hooks = {k: v for k, v in (("onexc", onexc), ("onerror", onerror)) if v is not None}
            return real_rmtree(path, *args, **hooks, **kwargs)
        error = PermissionError(errno.EACCES, "Permission denied", str(path))
        if onexc is not None:
            return onexc(os.rmdir, str(path), error)
        if onerror is not None:
            return onerror(os.rmdir, str(path), (PermissionError, error, None))
        raise error

    monkeypatch.setattr(shutil, "rmtree", failing)
    with pytest.warns(RuntimeWarning, match=r"could not be deleted and is left at .*\.saved"):
        opt.copy_artifact(other, out)
    monkeypatch.undo()
    assert verify_artifact(out) == verify_artifact(other)


def test_a_corrupt_entry_is_recompiled(cache, compiles):
    bert = tiny_bert()
    first = kernl.optimize(bert, "batch=1 seq=8", progress=False)
    weights = first.artifact / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    messages: list[str] = []
    model = kernl.optimize(bert, "batch=1 seq=8", progress=messages.append)
    assert len(compiles) == 2 and not model.cache_hit
    assert any("failed verification" in m for m in messages)
    verify_artifact(model.artifact)
    inputs = _inputs(1, 8)
    with torch.no_grad():
        _assert_matches(model(**inputs), bert(**inputs))
    assert not [p for p in cache.iterdir() if p.name.startswith((".build", ".corrupt"))]


def test_leftover_builds_are_never_used_and_dead_ones_are_removed(cache, compiles):
    bert = tiny_bert()
    cache.mkdir(parents=True)
    host, here = socket.gethostname(), pid_namespace()
    # What a compile killed before its rename leaves: a build folder of a dead process.
    dead = cache / f".build-{host}~{here}@999999999-x"
    (dead / "artifact").mkdir(parents=True)
    alive = cache / f".build-{host}~{here}@{os.getpid()}-y"
    alive.mkdir()
    # Another PID namespace with this host's name (a container sharing it): its pid says
    # nothing here, so its build stays however dead that pid looks, until it is stale.
    elsewhere = cache / f".build-{host}~{here}1@999999999-z"
    elsewhere.mkdir()
    old_format = cache / f".build-{host}@999999999-w"  # an older kernl's name: no namespace
    old_format.mkdir()
    week_ago = os.path.getmtime(old_format) - STALE_SECONDS - 60
    os.utime(old_format, (week_ago, week_ago))
    corrupt_file = cache / f".corrupt-{host}~{here}@999999999-bert"  # a damaged entry, a file
    corrupt_file.write_bytes(b"x")
    model = kernl.optimize(bert, "batch=1 seq=8", progress=False)
    assert len(compiles) == 1 and not model.cache_hit
    assert not dead.exists() and alive.exists()  # a live process's build is its own
    assert elsewhere.exists() and not old_format.exists() and not corrupt_file.exists()
    opt._remove_dead_builds(cache, now=os.path.getmtime(elsewhere) + STALE_SECONDS + 1)
    assert not elsewhere.exists() and not alive.exists()  # stale, whoever made them


def test_no_home_folder_and_no_cache_dir_is_said_as_an_unwritable_cache(monkeypatch):
    """HOME unset for a uid without a passwd entry (docker run --user 12345): Path.home()'s
    bare RuntimeError("Could not determine home directory.") (review 2026-12-07)."""

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("KERNL_CACHE_DIR", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(opt.CacheNotWritableError, match="no home folder.*KERNL_CACHE_DIR"):
        kernl.optimize(tiny_bert(), "batch=1 seq=8", progress=False)


def test_a_read_only_cache_serves_its_entries(cache, compiles, monkeypatch):
    """A cache baked read-only into an image: hits load without the lock (which cannot be
    opened for writing); a miss says what to do instead of failing on the lock file."""
    bert = tiny_bert()
    kernl.optimize(bert, "batch=1 seq=8", progress=False)

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(opt, "_open_lock", read_only)
    model = kernl.optimize(bert, "batch=1 seq=8", progress=False)
    assert model.cache_hit and len(compiles) == 1
    inputs = _inputs(1, 8)
    with torch.no_grad():
        _assert_matches(model(**inputs), bert(**inputs))
    with pytest.raises(opt.CacheNotWritableError, match="KERNL_CACHE_DIR"):
        kernl.optimize(bert, "batch=1 seq=16", progress=False)
    assert len(compiles) == 1
    weights = model.artifact / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(opt.CacheNotWritableError, match="failed verification"):
        kernl.optimize(bert, "batch=1 seq=8", progress=False)
    assert model.artifact.exists()  # left where it is: nothing could replace it


def test_install_keeps_the_entry_another_compile_put_first(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "manifest.msgpack").write_text("first")
    built = tmp_path / "built"
    built.mkdir()
    (built / "manifest.msgpack").write_text("second")
    assert opt._install(built, entry) is False
    assert (entry / "manifest.msgpack").read_text() == "first"
    fresh = tmp_path / "fresh"
    assert opt._install(built, fresh) is True and not built.exists()


def test_concurrent_calls_compile_once_per_key(cache, compiles):
    """Two threads on one model compile it once (the second waits, then loads); a third on
    other buckets compiles too, not at the same time (torch.export is not thread-safe)."""
    bert = tiny_bert()
    results: dict[int, object] = {}
    errors: list = []

    def run(i: int, buckets: str) -> None:
        try:
            results[i] = kernl.optimize(bert, buckets, progress=False)
        except Exception as e:  # reported below
            errors.append(e)

    jobs = [(0, "batch=1 seq=8"), (1, "batch=1 seq=8"), (2, "batch=1 seq=16")]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(compiles) == 2
    assert sorted([results[0].cache_hit, results[1].cache_hit]) == [False, True]
    assert not results[2].cache_hit
    inputs = _inputs(1, 8)
    with torch.no_grad():
        want = bert(**inputs)
    for r in results.values():
        _assert_matches(r(**inputs), want)


def test_default_buckets_from_the_config():
    def bert(n, model_type="bert"):
        return (
            T.BertConfig(max_position_embeddings=n)
            if model_type == "bert"
            else (T.RobertaConfig(max_position_embeddings=n, pad_token_id=1))
        )

    assert opt.default_buckets(bert(512), "base") == "batch=1,8,32 seq=16:512"
    assert opt.default_buckets(bert(80), "masked-lm") == "batch=1,8,32 seq=16:80"
    assert opt.default_buckets(bert(8), "base") == "batch=1,8,32 seq=8"
    assert opt.default_buckets(bert(8192), "base") == "batch=1,8,32 seq=16:512"
    assert opt.default_buckets(bert(514, "roberta"), "base") == "batch=1,8,32 seq=16:512"
    llama = T.LlamaConfig(max_position_embeddings=4096)
    assert opt.default_buckets(llama, "causal-lm") == "batch=1 prompt=16:512 cache=1024"
    gpt2 = T.GPT2Config(n_positions=128)
    assert opt.default_buckets(gpt2, "causal-lm") == "batch=1 prompt=16:64 cache=128"


def test_omitted_buckets_are_chosen_and_said(cache, monkeypatch):
    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_compile(model, buckets, out, **kwargs):
        seen["buckets"] = buckets
        raise Stop

    monkeypatch.setattr(api, "compile", fake_compile)
    messages: list[str] = []
    with pytest.raises(Stop):
        kernl.optimize(tiny_bert(), progress=messages.append)
    assert seen["buckets"] == "batch=1,8,32 seq=16:32"
    assert any("chose 'batch=1,8,32 seq=16:32'" in m for m in messages)
    # The failed compile left nothing in the cache.
    assert not [p for p in cache.iterdir() if p.is_dir()]


def test_bad_buckets_are_refused_before_any_work(cache, monkeypatch):
    monkeypatch.setattr(api, "compile", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(BucketLimitError, match="longer than the model's 32 positions"):
        kernl.optimize(tiny_bert(), "batch=1 seq=64", progress=False)
    with pytest.raises(TypeError, match="Hugging Face model object"):
        kernl.optimize(torch.nn.Linear(2, 2), "batch=1 seq=8", progress=False)


class _SentencePipeline(torch.nn.Sequential):
    """What sentence-transformers' SentenceTransformer is to kernl: a torch module holding the
    Hugging Face model, with its `.config` (the package is not a test dependency)."""

    __module__ = "sentence_transformers.model"

    @property
    def config(self):
        return self[0].config


def test_a_task_less_peft_wrapper_is_refused_naming_the_model_it_wraps(cache, monkeypatch):
    """It failed after the compile began with "PeftModel.forward takes no input_ids"."""
    monkeypatch.setattr(api, "compile", lambda *a, **k: pytest.fail("compiled"))
    wrapper_class = type("PeftModel", (torch.nn.Module,), {"__module__": "peft.peft_model"})
    wrapper = wrapper_class()
    wrapper.base_model = tiny_bert()
    wrapper.config = wrapper.base_model.config
    with pytest.raises(ValueError, match=r"get_base_model\(\)"):
        kernl.optimize(wrapper, "batch=1 seq=8", progress=False)


def test_a_sentence_transformers_pipeline_is_refused_naming_its_model(cache, monkeypatch):
    """It passed every early check and failed after "compiling ... into the cache" with
    "forward takes no input_ids"."""
    monkeypatch.setattr(api, "compile", lambda *a, **k: pytest.fail("compiled"))
    pipeline = _SentencePipeline(tiny_bert())
    with pytest.raises(ValueError, match=r"sentence-transformers pipeline.*st\[0\]\.auto_model"):
        kernl.optimize(pipeline, "batch=1 seq=8", progress=False)
    assert not cache.exists() or not list(cache.iterdir())


def test_bad_options_are_refused_before_any_work(cache, tmp_path, monkeypatch):
    """Each of these used to be found after the weights were hashed (a bare KeyError for the
    dtype, torch's assertion for the device) or after the whole compile (save_to), or not at
    all (a task the model object is not: an artifact labelled masked-lm serving hidden
    states)."""
    monkeypatch.setattr(api, "compile", lambda *a, **k: pytest.fail("compiled"))
    monkeypatch.setattr(opt, "weights_digest", lambda *a: pytest.fail("hashed"))
    bert = tiny_bert()
    with pytest.raises(ValueError, match="dtype must be fp32, fp16 or bf16"):
        kernl.optimize(bert, BUCKETS, dtype="fp64", progress=False)
    with pytest.raises(ValueError, match="unknown task 'bogus'.*speech-seq2seq"):
        kernl.optimize(bert, BUCKETS, task="bogus", progress=False)
    with pytest.raises(ValueError, match="task 'masked-lm' does not match .* BertModel"):
        kernl.optimize(bert, BUCKETS, task="masked-lm", progress=False)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ArtifactDestinationError):
        kernl.optimize(bert, BUCKETS, save_to=tmp_path / "a_file" / "bert.kernl", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
            kernl.optimize(bert, BUCKETS, device="cuda", progress=False)
    # pinned keys refuse every (unsigned) cache entry: each call compiled, then failed
    monkeypatch.setenv("KERNL_TRUSTED_KEYS", str(tmp_path / "deploy.pub"))
    with pytest.raises(RuntimeError, match="KERNL_TRUSTED_KEYS is set"):
        kernl.optimize(bert, BUCKETS, progress=False)
    assert not cache.exists() or not list(cache.iterdir())


def test_an_empty_cache_dir_variable_is_unset(monkeypatch):
    monkeypatch.setenv("KERNL_CACHE_DIR", "")  # was the working directory
    assert opt.cache_root() == Path.home() / ".cache" / "kernl"


def test_an_empty_or_relative_cache_dir_argument(cache, monkeypatch, tmp_path):
    """cache_dir="" compiled into the working directory's models/ (the variable's "" is unset),
    and a relative cache_dir gave a relative model.artifact, wrong after a chdir."""
    monkeypatch.chdir(tmp_path)
    model = kernl.optimize(tiny_bert(), "batch=1 seq=8", cache_dir="", progress=False)
    assert model.artifact.parent == cache and not (tmp_path / "models").exists()
    model = kernl.optimize(tiny_bert(), "batch=1 seq=8", cache_dir="rel", progress=False)
    assert model.artifact.is_absolute()
    assert model.artifact.parent == tmp_path / "rel" / "models"


def test_cache_dir_holds_the_tuning_cache_too(cache, monkeypatch, tmp_path):
    """kernl.optimize(cache_dir=X) kept its models in X but its tuner wrote to $KERNL_CACHE_DIR
    or ~/.cache/kernl (read-only in many containers). Timing faked on the CPU: aten wins."""
    from kernl.compiler import tune

    monkeypatch.setattr(tune, "_timing_target", lambda device: "fake-gpu")
    monkeypatch.setattr(tune, "_bench_us", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(tune, "_configs", lambda op, *call: [])
    given = tmp_path / "given"
    bert = tiny_bert()
    model = kernl.optimize(bert, "batch=1 seq=8", cache_dir=given, progress=False)
    assert list((given / "tuning").glob("*.json")) and list((given / "models").iterdir())
    assert not (cache.parent / "tuning").exists()  # $KERNL_CACHE_DIR's
    assert tune.cache_dir() == cache.parent / "tuning"  # only while optimize compiles
    inputs = _inputs(1, 8)
    with torch.no_grad():
        _assert_matches(model(**inputs), bert(**inputs))


def test_every_spelling_of_a_dtype_is_one_cache_entry(cache, compiles):
    bert = tiny_bert()
    kernl.optimize(bert, "batch=1 seq=8", dtype="fp32", progress=False)
    for spelling in ("float32", torch.float32):
        assert kernl.optimize(bert, "batch=1 seq=8", dtype=spelling, progress=False).cache_hit
    assert len(compiles) == 1


def test_weights_digest():
    bert = tiny_bert()
    digest = opt.weights_digest(bert)
    assert opt.weights_digest(copy.deepcopy(bert), threads=1) == digest
    buffered = copy.deepcopy(bert)
    buffered.embeddings.token_type_ids.fill_(1)  # a buffer, not a parameter
    assert opt.weights_digest(buffered) != digest
    assert opt.weights_digest(copy.deepcopy(bert).half()) != digest
    # Same values under a swapped pair of names: another model.
    swapped = copy.deepcopy(bert)
    q = swapped.encoder.layer[0].attention.self
    with torch.no_grad():
        q.query.weight, q.key.weight = q.key.weight, q.query.weight
    assert opt.weights_digest(swapped) != digest


def test_tiny_llama_generates_like_eager_then_hits_the_cache(cache, compiles):
    hf = tiny_model("llama3")
    buckets = "batch=1,2 prompt=8,16 cache=48"
    before = _snapshot(hf)
    generation_config = hf.generation_config.to_dict()
    model = kernl.optimize(hf, buckets, progress=False)
    # compile validates against the eager model's generate: that leaves it as it was too
    _assert_same(before, _snapshot(hf))
    assert hf.generation_config.to_dict() == generation_config
    assert len(compiles) == 1 and compiles[0][1]["task"] == "causal-lm"
    ids, mask = mixed_prompts(2, [11, 4])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0
        )
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0, eos_token_id=[]
    )
    assert torch.equal(out, ref)
    with pytest.raises(TypeError, match=r"model.generate"):
        model(ids)
    again = kernl.optimize(tiny_model("llama3"), buckets, progress=False)
    assert again.cache_hit and len(compiles) == 1
    # HF's text-generation pipeline reads the model's generation config (it failed on it)
    assert again.generation_config.to_dict() == generation_config
    assert again.generation_config is not hf.generation_config
    tok = _llama_word_tokenizer()
    prompts = ["w3 w4 w5", "w7 w8 w9 w10 w11 w12"]
    greedy = dict(max_new_tokens=6, do_sample=False)  # the pipeline samples by default
    want = T.pipeline("text-generation", model=hf, tokenizer=tok)(prompts, **greedy)
    got = T.pipeline("text-generation", model=again, tokenizer=tok, device="cpu")(prompts, **greedy)
    assert got == want and len({g[0]["generated_text"] for g in got}) == 2
    # A length set in the generation config is HF's default for the call, and the pipeline
    # then passes none: kernl's generate stopped at 20 new tokens, not the config's 5.
    again.generation_config.max_new_tokens = 5
    assert torch.equal(
        again.generate(ids, attention_mask=mask, pad_token_id=0, eos_token_id=[]),
        ref[:, : ids.shape[1] + 5],
    )
    got = T.pipeline("text-generation", model=again, tokenizer=tok, device="cpu")(
        prompts, do_sample=False
    )
    assert got == T.pipeline("text-generation", model=hf, tokenizer=tok)(
        prompts, max_new_tokens=5, do_sample=False
    )
    again.generation_config.max_new_tokens = None
    again.generation_config.max_length = ids.shape[1] + 3  # counts the prompt, as in HF
    steps = list(again.stream(ids, attention_mask=mask, pad_token_id=0, eos_token_id=[]))
    assert len(steps) == 3
    assert again.generate(ids, attention_mask=mask, max_new_tokens=2).shape[1] == ids.shape[1] + 2
    assert again.generate(ids, mask, 2).shape[1] == ids.shape[1] + 2  # positional: was a TypeError
    assert torch.equal(
        again.generate(
            ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0, eos_token_id=[]
        ),
        ref,
    )
    # A config's length is a bound, as in HF: Llama-2-chat's max_length=4096 past this cache
    # of 48 made every call without a length fail, naming "max_new_tokens 4092".
    again.generation_config.max_length = 4096
    with pytest.warns(UserWarning, match=r"max_length=4096 asks for up to .* holds 33 after"):
        out = again.generate(ids, attention_mask=mask, pad_token_id=0, eos_token_id=[])
    assert torch.equal(out[:, : ref.shape[1]], ref) and out.shape[1] == ids.shape[1] + 33
    with pytest.raises(ValueError, match="exceeds the KV cache"):  # the caller's own: refused
        again.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[])
    # an EOS tensor, as HF's generate takes (was "must be token ids ..., got [tensor(...)]")
    eos = torch.tensor([int(ref[0, ids.shape[1] + 2]), 93])
    assert torch.equal(
        again.generate(
            ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0
        ),
        again.generate(
            ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos.tolist(), pad_token_id=0
        ),
    )


def test_a_changed_generation_config_is_another_cache_entry(cache, monkeypatch):
    """The generation config's ids go into a generating artifact (EOS, pad, forced BOS/EOS,
    suppressed tokens): a model whose generation config changed was served the last entry,
    and generated other ids than its own generate."""
    hf = tiny_model("llama3")
    seen = []
    real = opt.cache_key
    monkeypatch.setattr(opt, "cache_key", lambda **kw: seen.append(real(**kw)) or seen[-1])
    monkeypatch.setattr(api, "compile", lambda *a, **k: pytest.fail("compiled"))
    monkeypatch.setattr(opt, "_load_entry", lambda *a: pytest.fail("loaded"))
    monkeypatch.setattr(opt, "_compile_entry", lambda *a, **k: (_ for _ in ()).throw(KeyError))
    for eos in (None, 5, [5, 6], None):
        hf.generation_config.eos_token_id = eos
        with pytest.raises(KeyError):
            kernl.optimize(hf, "batch=1 prompt=8 cache=16", progress=False)
    assert len(set(seen)) == 3 and seen[0] == seen[3]


def test_import_kernl_imports_neither_transformers_nor_the_compiler():
    code = textwrap.dedent(
        """
        import sys
        import kernl, kernl.runtime
        assert callable(kernl.optimize)
        bad = [m for m in sys.modules if m.startswith(("transformers", "kernl.compiler"))]
        assert not bad, bad
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(50)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", model_max_length=16
    )


def _llama_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w1", pad_token="w0")


def test_code_written_for_the_hugging_face_model_runs_or_says_why(cache):
    """A pipeline calls forward, to(device), eval() and reads dtype: those failed with
    "'CompiledModel' object has no attribute 'forward'", naming a class the user never saw;
    pickling failed on a lock."""
    torch.manual_seed(0)
    hf = T.BertForSequenceClassification(T.BertConfig(**SMALL)).eval()
    model = kernl.optimize(hf, "batch=1,2 seq=8,16", progress=False)
    tok = _word_tokenizer()
    texts = ["w5 w6 w7", "w1 w2 w3 w4 w9"]
    want = T.pipeline("text-classification", model=hf, tokenizer=tok)(texts)
    got = T.pipeline("text-classification", model=model, tokenizer=tok, device="cpu")(texts)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert all(abs(g["score"] - w["score"]) < 1e-5 for g, w in zip(got, want))
    inputs = tok(texts, return_tensors="pt", padding=True)
    torch.testing.assert_close(model.forward(**inputs).logits, hf(**inputs).logits)
    assert model.eval() is model and model.to("cpu") is model and model.train(False) is model
    assert model.dtype == torch.float32 and not model.training and not model.can_generate()
    with pytest.raises(ValueError, match="compiled for cpu: kernl.optimize"):
        model.to("cuda")
    with pytest.raises(ValueError, match="compiled in torch.float32"):
        model.to(torch.float16)
    with pytest.raises(RuntimeError, match="inference only"):
        model.train()
    with pytest.raises(AttributeError, match="'OptimizedModel' object has no attribute 'bert'"):
        model.bert  # noqa: B018
    # what pipelines read of the model's class: printing a pipeline raised AttributeError
    # (input_modalities), as did fill-mask's check of the mask token (base_model_prefix)
    pipe = T.pipeline("text-classification", model=model, tokenizer=tok, device="cpu")
    shown = repr(pipe)
    assert "'input_modalities': 'text'" in shown or not hasattr(hf, "input_modalities")
    assert (model.base_model_prefix, model.main_input_name) == ("bert", "input_ids")
    for copy_it in (copy.deepcopy, lambda m: __import__("pickle").dumps(m)):
        with pytest.raises(TypeError, match="cannot be pickled or copied.*save_to"):
            copy_it(model)


def test_a_model_whose_modules_cannot_be_copied_is_compiled_itself_and_put_back(cache):
    """Hooks (accelerate's own weights, say) or parameter subclasses: the copy over the same
    tensors is not made; the model itself is compiled, cast and put back, saying so."""
    bert = tiny_bert()
    handle = bert.encoder.layer[0].output.register_forward_hook(lambda m, i, o: o)
    messages = []
    before = _snapshot(bert)
    model = kernl.optimize(bert, "batch=1 seq=8", dtype="fp16", progress=messages.append)
    handle.remove()
    assert any("compiling the model itself" in m for m in messages)
    _assert_same(before, _snapshot(bert))
    with torch.no_grad():
        want = bert(**_inputs(1, 8))
    got = model(**_inputs(1, 8))
    assert (got.last_hidden_state.float() - want.last_hidden_state).abs().max() < 2e-2


def test_a_refused_model_that_changes_itself_is_left_as_given(cache):
    """kernl.optimize's look at the output class ran a forward on the caller's model: a
    block-sparse BigBird, refused, came back switched to full attention for good."""
    from kernl.compiler.trace import UnsupportedModelError

    torch.manual_seed(0)
    cfg = T.BigBirdConfig(**SMALL, block_size=4, num_random_blocks=1)
    model = T.BigBirdModel(cfg).eval()
    with pytest.raises(UnsupportedModelError, match="block-sparse attention"):
        kernl.optimize(model, buckets="batch=1 seq=32", dtype="fp32", device="cpu")
    assert model.attention_type == "block_sparse"
    assert {type(layer.attention.self).__name__ for layer in model.encoder.layer} == {
        "BigBirdBlockSparseAttention"
    }


def test_an_fp64_model_compiles_at_the_dtype_asked_for(cache, compiles):
    """dtype= casts the model: an fp64 model was refused for its own dtype even with
    dtype="fp32" (api.compile took it); without dtype= it is refused, saying what to pass."""
    bert = tiny_bert().double()
    with pytest.raises(ValueError, match="pass dtype="):
        kernl.optimize(bert, "batch=1 seq=8", progress=False)
    model = kernl.optimize(bert, "batch=1 seq=8", dtype="fp32", progress=False)
    inputs = _inputs(1, 8)
    with torch.no_grad():
        want = bert(**inputs).last_hidden_state.float()
    torch.testing.assert_close(model(**inputs).last_hidden_state, want, atol=1e-4, rtol=1e-4)
    assert next(bert.parameters()).dtype == torch.float64  # the caller's model as it was


def test_a_lock_file_left_writable_in_a_folder_that_is_not(cache, compiles, monkeypatch):
    """chmod 555 on the cache after a compile leaves its lock files writable: the lock opened,
    so the folder counted as writable, and a miss failed with a raw PermissionError from the
    build folder (or the move of a damaged entry) instead of saying what to do."""
    bert = tiny_bert()
    kernl.optimize(bert, "batch=1 seq=8", progress=False)
    monkeypatch.setattr(opt, "_writable", lambda folder: False)
    assert kernl.optimize(bert, "batch=1 seq=8", progress=False).cache_hit
    with pytest.raises(opt.CacheNotWritableError, match="KERNL_CACHE_DIR"):
        kernl.optimize(bert, "batch=1 seq=16", progress=False)
    assert len(compiles) == 1

    def no_build_folder(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(opt, "_writable", lambda folder: True)  # as os.access says to root
    monkeypatch.setattr(opt.tempfile, "mkdtemp", no_build_folder)
    with pytest.raises(opt.CacheNotWritableError, match="cannot be written"):
        kernl.optimize(bert, "batch=1 seq=16", progress=False)


def test_a_dangling_link_at_an_entry_is_replaced(cache, compiles):
    """A broken symbolic link where an entry goes: it did not exist, so kernl compiled, and
    the rename into place failed on the link, on every call for good."""
    bert = tiny_bert()
    entry = kernl.optimize(bert, "batch=1 seq=8", progress=False).artifact
    opt._remove(entry)
    entry.symlink_to(cache / "gone")
    model = kernl.optimize(bert, "batch=1 seq=8", progress=False)
    assert not model.cache_hit and len(compiles) == 2
    assert entry.is_dir() and not entry.is_symlink()


def test_a_filesystem_without_flock_compiles_unlocked(cache, compiles, monkeypatch):
    """NFS without its lock daemon answers flock with ENOLCK: every call failed; it is served
    unlocked, as where fcntl is missing (the rename into place keeps the cache whole)."""
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    bert = tiny_bert()
    assert not kernl.optimize(bert, "batch=1 seq=8", progress=False).cache_hit
    assert kernl.optimize(bert, "batch=1 seq=8", progress=False).cache_hit


def test_a_wait_for_another_compile_names_the_process_holding_it(tmp_path):
    """ "waiting for another compile of the same model" named no one: a stopped notebook or a
    debugger holding it left the waiter with nothing to look for (review)."""
    import threading
    import time

    from kernl.artifacts.writer import owner_tag

    entry = tmp_path / "entry"
    holding, release, said = threading.Event(), threading.Event(), []

    def hold():
        with opt._entry_lock(entry, lambda msg: None):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)

    def wait():
        with opt._entry_lock(entry, said.append):
            pass

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + 30
    while not said and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    holder.join(30)
    waiter.join(30)
    assert said and said[0].startswith("waiting for another compile of the same model (entry)")
    assert f", held by process {owner_tag()} since " in said[0]
