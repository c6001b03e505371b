"""`kernl.optimize` keyed on the model's code as well as its weights (a redefined class, an
attribute such as eps, a forward hook must miss the cache), and what code written around a
Hugging Face encoder does with the optimized one: AutoModel of a head checkpoint, a
torch.compile wrapper, buckets as an iterator, None-valued inputs, Module's shorthands."""

from __future__ import annotations

import errno
import types

import pytest
import torch
import transformers as T

import kernl
from kernl.compiler import optimize as opt
from kernl.compiler.buckets import BucketSyntaxError, as_buckets
from kernl.compiler.code_digest import code_digest

from .test_optimize import _assert_matches, _inputs, tiny_bert

B = "batch=1 seq=8"


class ScaledBert(T.BertModel):
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kw):
        out = super().forward(input_ids, attention_mask, token_type_ids, **kw)
        out.last_hidden_state = out.last_hidden_state * 1.0
        return out


def _redefined_scaled_bert():
    class ScaledBert(T.BertModel):  # the same name, the notebook cell edited and run again
        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kw):
            out = super().forward(input_ids, attention_mask, token_type_ids, **kw)
            out.last_hidden_state = out.last_hidden_state * 2.0
            return out

    return ScaledBert


def _doubled(self, hidden_states, input_tensor):
    return type(self).forward(self, hidden_states, input_tensor) * 2.0


@pytest.mark.parametrize("change", ["eps", "redefined class", "forward hook", "patched forward"])
def test_a_change_of_code_or_module_state_misses_the_cache(cache, compiles, change):
    """Keyed on weights, config and class name only, each of these was served the old entry:
    other numbers than the model's, silently."""
    bert = tiny_bert() if change != "redefined class" else ScaledBert(tiny_bert().config)
    if change == "redefined class":
        bert.load_state_dict(tiny_bert().state_dict())
        bert.eval()
    kernl.optimize(bert, B, progress=False)
    if change == "eps":
        bert.embeddings.LayerNorm.eps = 0.5
    elif change == "forward hook":
        bert.encoder.layer[0].output.register_forward_hook(lambda m, i, o: o * 0.5)
    elif change == "patched forward":  # the entry of the unpatched model: max error 3.4
        layer = bert.encoder.layer[1].output
        layer.forward = types.MethodType(_doubled, layer)
    else:
        changed = _redefined_scaled_bert()(bert.config)
        changed.load_state_dict(bert.state_dict())
        bert = changed.eval()
    model = kernl.optimize(bert, B, progress=False)
    assert not model.cache_hit and len(compiles) == 2
    inputs = _inputs(1, 8)
    with torch.no_grad():
        _assert_matches(model(**inputs), bert(**inputs))


def test_the_code_digest_is_stable_and_ignores_where_the_model_came_from(tmp_path):
    bert = tiny_bert()
    bert.save_pretrained(tmp_path / "m")
    loaded = T.AutoModel.from_pretrained(tmp_path / "m").eval()
    assert code_digest(bert) == code_digest(tiny_bert()) == code_digest(loaded)
    handle = bert.register_forward_pre_hook(lambda m, args: None)
    assert code_digest(bert) != code_digest(loaded)
    handle.remove()
    assert code_digest(bert) == code_digest(loaded)


def test_automodel_of_a_head_checkpoint_is_the_encoder(cache, tmp_path):
    """AutoModel of bert-base-uncased (architectures: BertForMaskedLM) was refused: "task
    'masked-lm' does not match the model given, a BertModel"."""
    torch.manual_seed(0)
    T.BertForMaskedLM(tiny_bert().config).save_pretrained(tmp_path / "mlm")
    base = T.AutoModel.from_pretrained(tmp_path / "mlm").eval()
    assert base.config.architectures == ["BertForMaskedLM"]
    model = kernl.optimize(base, B, progress=False)
    assert model.runtime.manifest.task == "base"
    inputs = _inputs(1, 8)
    with torch.no_grad():
        _assert_matches(model(**inputs), base(**inputs))


def test_a_torch_compile_wrapper_is_unwrapped(cache, compiles):
    bert = tiny_bert()
    messages: list[str] = []
    kernl.optimize(torch.compile(bert), B, progress=messages.append)
    assert any("torch.compile" in m for m in messages)
    assert kernl.optimize(bert, B, progress=False).cache_hit and len(compiles) == 1


def test_a_torch_compile_wrapper_hits_the_entry_of_the_model_it_wraps(cache, compiles):
    """torch.compile marks the model it wraps (_is_torch_compile): the key changed, and the
    first optimize through a wrapper compiled again what the notebook had compiled before."""
    bert = tiny_bert()
    kernl.optimize(bert, B, progress=False)
    assert kernl.optimize(torch.compile(bert), B, progress=False).cache_hit
    assert len(compiles) == 1


def test_buckets_as_an_iterator_compile(cache):
    """An iterator was read once for the cache key: the compile got it empty ("no buckets
    given")."""
    model = kernl.optimize(tiny_bert(), ((1, s) for s in (8, 16)), progress=False)
    assert [(b.batch, b.seq) for b in model.runtime.buckets] == [(1, 8), (1, 16)]


def test_bucket_forms_a_dict_with_a_range_and_no_silent_truncation():
    assert as_buckets({"batch": [1, 2], "seq": "8:16"}) == as_buckets("batch=1,2 seq=8:16")
    assert as_buckets({"batch": 1, "seq": "8,32"}) == as_buckets("1x8,1x32")
    for bad in ([(1.9, 8.7)], [(1, "8")], [(True, 8)]):
        with pytest.raises(BucketSyntaxError, match="pair of integers"):
            as_buckets(bad)


def test_a_cache_folder_that_cannot_be_created_is_the_documented_error(
    cache, monkeypatch, tmp_path
):
    real = opt.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "models":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(opt.Path, "mkdir", read_only)
    with pytest.raises(opt.CacheNotWritableError, match="KERNL_CACHE_DIR"):
        kernl.optimize(tiny_bert(), B, progress=False)
    monkeypatch.setattr(opt.Path, "mkdir", real)
    # A parent that refuses new folders with ENOENT (/proc does): the same error, not a bare
    # FileNotFoundError
    with pytest.raises(opt.CacheNotWritableError, match="cannot be created"):
        kernl.optimize(tiny_bert(), B, progress=False, cache_dir="/proc/kernl-cache")
    # a file where its models folder should be: the same error, not a bare FileExistsError
    (tmp_path / "filed").mkdir()
    (tmp_path / "filed" / "models").write_text("")
    with pytest.raises(opt.CacheNotWritableError, match="cannot be created .*File exists"):
        kernl.optimize(tiny_bert(), B, progress=False, cache_dir=tmp_path / "filed")


def test_none_inputs_and_module_shorthands_are_taken(cache):
    bert = tiny_bert()
    model = kernl.optimize(bert, B, progress=False)
    inputs = _inputs(1, 8)
    with torch.no_grad():
        want = bert(**inputs)
    # HF's "not given": position_ids=None, head_mask=None, ... (were "unexpected input(s)")
    none = dict(position_ids=None, head_mask=None, inputs_embeds=None, use_cache=False)
    _assert_matches(model(**inputs, **none), want)
    with pytest.raises(TypeError, match=r"unexpected input\(s\) \['position_ids'\]"):
        model(**inputs, position_ids=torch.arange(8)[None])
    assert model.cpu() is model and model.float() is model
    for convert, what in ((model.half, "float16"), (model.double, "float64")):
        with pytest.raises(ValueError, match=f"compiled in torch.float32.*dtype=torch.{what}"):
            convert()
    with pytest.raises(ValueError, match="compiled for cpu"):
        model.cuda()
