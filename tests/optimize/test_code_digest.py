"""The code digest of kernl.optimize's cache key (kernl/compiler/code_digest.py) follows what a
user patches on a model in a notebook: a layer's forward set on the instance (a bound method, a
functools.partial, a callable object), a Hugging Face helper replaced in its module, and what
that helper calls; and stays the same for an unchanged model in another process."""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
import transformers.models.bert.modeling_bert as modeling_bert
import transformers.models.llama.modeling_llama as modeling_llama
from generation.tiny_models import tiny_model

from kernl.compiler.code_digest import code_digest

from .test_optimize import tiny_bert

ROOT = Path(__file__).resolve().parents[2]


def _doubled(self, hidden_states, input_tensor):
    return type(self).forward(self, hidden_states, input_tensor) * 2.0


def _scaled(module, hidden_states, input_tensor, scale=1.0):
    return type(module).forward(module, hidden_states, input_tensor) * scale


class _Scaled:
    def __init__(self, module, scale):
        self.module, self.scale = module, scale

    def __call__(self, hidden_states, input_tensor):
        return type(self.module).forward(self.module, hidden_states, input_tensor) * self.scale


def _my_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    return _original_attention(module, query, key, value, attention_mask, scaling=scaling * 0.5)


_original_attention = modeling_bert.eager_attention_forward


def _my_repeat_kv(hidden_states, n_rep):
    return hidden_states.repeat_interleave(n_rep, dim=1)


def _patch(bert, monkeypatch, change):
    """Each of these left the digest as it was: kernl.optimize then served the entry compiled
    from the unpatched model (silently other numbers)."""
    out = bert.encoder.layer[1].output
    if change == "bound method":  # the usual way to patch one layer
        out.forward = types.MethodType(_doubled, out)
    elif change == "bound to another layer":  # the same function, other weights
        out.forward = bert.encoder.layer[0].output.forward
    elif change == "partial":
        out.forward = functools.partial(_scaled, out, scale=2.0)
    elif change == "callable object":
        out.forward = _Scaled(out, 2.0)
    elif change == "helper replaced":  # a function of another module (here the test's)
        monkeypatch.setattr(modeling_bert, "eager_attention_forward", _my_attention)
    else:
        raise AssertionError(change)


@pytest.mark.parametrize(
    "change",
    ["bound method", "bound to another layer", "partial", "callable object", "helper replaced"],
)
def test_a_patched_forward_or_helper_changes_the_digest(monkeypatch, change):
    bert = tiny_bert()
    before = code_digest(bert)
    _patch(bert, monkeypatch, change)
    assert code_digest(bert) != before
    monkeypatch.undo()
    bert.encoder.layer[1].output.__dict__.pop("forward", None)
    assert code_digest(bert) == before  # nothing else moved it


def test_the_arguments_of_a_partial_and_the_state_of_a_callable_count(monkeypatch):
    bert = tiny_bert()
    out = bert.encoder.layer[1].output
    out.forward = functools.partial(_scaled, out, scale=2.0)
    two = code_digest(bert)
    out.forward = functools.partial(_scaled, out, scale=3.0)
    assert code_digest(bert) != two
    out.forward = _Scaled(out, 2.0)
    two = code_digest(bert)
    out.forward.scale = 3.0
    assert code_digest(bert) != two


def test_what_a_helper_calls_in_its_module_counts(monkeypatch):
    """LlamaAttention.forward names eager_attention_forward, which calls repeat_kv: replacing
    repeat_kv (two calls deep, in the model's module) changes what the model computes."""
    llama = tiny_model("llama3")
    before = code_digest(llama)
    monkeypatch.setattr(modeling_llama, "repeat_kv", _my_repeat_kv)
    assert code_digest(llama) != before


def test_a_recursive_helper_ends_the_walk(monkeypatch):
    def countdown(n):
        return n if n <= 0 else countdown(n - 1)

    def attention(module, query, key, value, attention_mask, **kwargs):
        countdown(3)
        return _original_attention(module, query, key, value, attention_mask, **kwargs)

    bert = tiny_bert()
    monkeypatch.setattr(modeling_bert, "eager_attention_forward", attention)
    bert.encoder.layer[0].output.forward = functools.partial(_scaled, bert.encoder.layer[0].output)
    assert code_digest(bert) == code_digest(bert)


_DIGESTS = """
import json, sys
sys.path.insert(0, "tests")
from optimize.test_optimize import tiny_bert
from generation.tiny_models import tiny_model
from kernl.compiler.code_digest import code_digest
print(json.dumps([code_digest(tiny_bert()), code_digest(tiny_model("llama3"))]))
"""


def test_an_unchanged_model_has_one_digest_in_every_process():
    """Two fresh processes (other hash seeds, other import orders) and this one agree: a
    digest that moved between processes would make every optimize() a compile."""
    here = [code_digest(tiny_bert()), code_digest(tiny_model("llama3"))]
    for seed, first in (("1", "import kernl"), ("2", "import transformers")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", first + _DIGESTS],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == here


def test_a_forward_and_an_export_leave_the_digest_as_it_was():
    bert = tiny_bert()
    before = code_digest(bert)
    ids = torch.randint(3, 120, (1, 8))
    with torch.no_grad():
        bert(input_ids=ids)
    torch.export.export(bert, (ids,), strict=False)
    assert code_digest(bert) == before
    assert code_digest(T.BertModel(bert.config).eval()) == before


def test_an_installed_librarys_process_state_is_not_in_the_digest(monkeypatch):
    """transformers' module globals that its functions read are its process state: a flag a
    context manager sets while some thread loads a model, an attention function imported on
    first use. Hashed, they gave a plain BERT another digest in CI's long-running test worker
    than in a fresh process (every optimize() there would have recompiled)."""
    import transformers.modeling_flash_attention_utils as flash_utils
    import transformers.modeling_utils as modeling_utils

    before = code_digest(tiny_bert())
    monkeypatch.setattr(modeling_utils, "_is_ds_init_called", True)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", "flash_attention_2")
    monkeypatch.setattr(flash_utils, "_flash_fn", lambda *a: None)
    assert code_digest(tiny_bert()) == before


WRAPPED_SCALE = 1.0  # a notebook global the patched helper below reads


def test_a_helper_patched_with_functools_wraps_counts_the_globals_it_reads(monkeypatch):
    """functools.wraps copies transformers' __module__ onto the user's function: taken for
    the library's, its global was not hashed and the cache served the stale artifact."""
    real = modeling_bert.eager_attention_forward

    @functools.wraps(real)
    def patched(*args, **kwargs):
        out, weights = real(*args, **kwargs)
        return out * WRAPPED_SCALE, weights

    monkeypatch.setattr(modeling_bert, "eager_attention_forward", patched)
    bert = tiny_bert()
    before = code_digest(bert)
    monkeypatch.setattr(sys.modules[__name__], "WRAPPED_SCALE", 2.0)
    assert code_digest(bert) != before


def test_forwards_collecting_outputs_and_attention_switches_leave_the_digest(monkeypatch):
    """The first forward with output_hidden_states installs transformers' recording hooks on
    the layers, and set_attn_implementation caches a flag on the class: neither changes what
    the model computes, and each made the next optimize() a compile."""
    bert = tiny_bert()
    before = code_digest(bert)
    ids = torch.randint(3, 120, (1, 8))
    with torch.no_grad():
        bert(input_ids=ids, output_hidden_states=True, output_attentions=True)
    assert code_digest(bert) == before
    for layer in bert.encoder.layer:  # transformers 5.0/5.1 left each forward so, bound
        layer.forward = layer.forward
    assert code_digest(bert) == before
    other = tiny_bert()
    if hasattr(other, "set_attn_implementation"):
        other.set_attn_implementation("eager")
    assert code_digest(tiny_bert()) == before


def test_installed_libraries_are_told_from_the_users_code(tmp_path, monkeypatch):
    """An editable or --target install of transformers (not under site-packages) is still a
    library whose globals are process state; a user's module is not, even named like one."""
    from kernl.compiler.code_digest import _installed

    _installed.cache_clear()
    monkeypatch.chdir(tmp_path)
    elsewhere = "/opt/src/transformers/src/transformers/modeling_utils.py"
    assert _installed("transformers.modeling_utils", elsewhere)
    assert _installed("anything", "/usr/lib/python3/dist-packages/anything/core.py")
    assert not _installed("transformers.x", str(tmp_path / "transformers" / "x.py"))  # cwd
    assert not _installed("my_notebook_helpers", "/home/me/my_notebook_helpers.py")
    assert not _installed("__main__", None)
    _installed.cache_clear()


def test_an_attention_function_registered_again_under_its_name_counts():
    """A notebook registers its own attention function, optimizes, then edits the cell and
    registers another under the same name: the key held the name only and the stale entry
    was served (0.047 off)."""
    from transformers import AttentionInterface

    def attention_v1(module, query, key, value, attention_mask, scaling=None, **kwargs):
        return modeling_bert.eager_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )

    def attention_v2(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out, weights = attention_v1(module, query, key, value, attention_mask, scaling, **kwargs)
        return out * 0, weights

    bert = tiny_bert()
    AttentionInterface.register("kernl_test_mine", attention_v1)
    bert.set_attn_implementation("kernl_test_mine")
    first = code_digest(bert)
    assert code_digest(bert) == first
    AttentionInterface.register("kernl_test_mine", attention_v2)
    assert code_digest(bert) != first


class _CFG:  # a Kaggle-style settings class a forward reads
    scale = 1.0


_OPTIONS = types.SimpleNamespace(scale=1.0)


def _reads_settings(self, hidden_states, input_tensor):
    out = self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)
    return out * _CFG.scale * _OPTIONS.scale


def test_settings_objects_a_forward_reads_count(monkeypatch):
    """`class CFG: scale = 1.0` or a SimpleNamespace read by a patched forward: only plain
    values, tensors and containers were hashed, and after `CFG.scale = 3.0` the stale entry
    was served (5.97 off)."""
    bert = tiny_bert()
    monkeypatch.setattr(modeling_bert.BertOutput, "forward", _reads_settings)
    first = code_digest(bert)
    monkeypatch.setattr(_CFG, "scale", 3.0)
    second = code_digest(bert)
    assert second != first
    monkeypatch.setattr(_OPTIONS, "scale", 2.0)
    assert code_digest(bert) != second


def test_a_method_set_on_a_torch_class_counts(monkeypatch):
    """torch's classes are keyed by the torch version, but `torch.nn.LayerNorm.forward =
    ...` in a notebook changes them under the same version: the stale entry was served."""
    bert = tiny_bert()
    first = code_digest(bert)
    real = torch.nn.LayerNorm.forward
    monkeypatch.setattr(torch.nn.LayerNorm, "forward", lambda self, x: real(self, x) * 2.0)
    assert code_digest(bert) != first
    monkeypatch.undo()
    assert code_digest(bert) == first


class _Mode(enum.Enum):
    PLAIN = 1
    DOUBLE = 2


@dataclasses.dataclass
class _HeadOptions:
    scale: float = 1.0


class _ScaledBert(T.BertModel):
    """A notebook's subclass whose forward reads a class constant and instance state that are
    not plain values (review, 2026-12-07: each edit below served the stale entry, 2.8-5.6 off)."""

    WEIGHTS = (1.0, 1.0)

    def forward(self, input_ids=None, attention_mask=None, **kw):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kw)
        scale = self.WEIGHTS[0] * self.options.scale * float(self.table[0])
        return out.last_hidden_state * scale * (2.0 if self.mode is _Mode.DOUBLE else 1.0)


def _scaled_bert() -> _ScaledBert:
    torch.manual_seed(0)
    model = _ScaledBert(tiny_bert().config).eval()
    model.options, model.table, model.mode = _HeadOptions(), np.array([1.0]), _Mode.PLAIN
    return model


def test_a_users_class_constants_and_options_objects_count(monkeypatch):
    model = _scaled_bert()
    seen = {code_digest(model)}
    assert code_digest(_scaled_bert()) in seen  # the same state: the same digest
    monkeypatch.setattr(_ScaledBert, "WEIGHTS", (0.0, 2.0))  # the cell's constant edited
    seen.add(code_digest(model))
    model.options.scale = 3.0  # a dataclass of options
    seen.add(code_digest(model))
    model.table[0] = 3.0  # a numpy array, edited in place
    seen.add(code_digest(model))
    model.mode = _Mode.DOUBLE
    seen.add(code_digest(model))
    assert len(seen) == 5


@functools.cache
def _factor() -> float:
    return 1.0


class _Post:
    def __call__(self, x):
        return x * 1.0


_post = _Post()


def _reads_cached_helpers(self, hidden_states, input_tensor):
    out = self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)
    return _post(out) * _factor()


def test_a_cached_helper_and_a_callable_object_a_forward_calls_count(monkeypatch):
    """A helper under @functools.cache, and a global callable object, redefined in their cell:
    neither was followed (not a plain function), and the stale entry was served."""
    bert = tiny_bert()
    monkeypatch.setattr(modeling_bert.BertOutput, "forward", _reads_cached_helpers)
    first = code_digest(bert)
    monkeypatch.setitem(globals(), "_factor", functools.cache(lambda: 3.0))
    second = code_digest(bert)
    assert second != first
    monkeypatch.setattr(_Post, "__call__", lambda self, x: x * 3.0)
    assert code_digest(bert) != second


_settings: types.ModuleType | None = None  # the user's module, imported by the test below


def _reads_a_users_module(self, hidden_states, input_tensor):
    out = self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)
    return _settings.scaled(out) * _settings.SCALE


def test_a_users_module_a_forward_reads_through_counts(tmp_path, monkeypatch):
    """`import settings` beside the notebook, its `SCALE` and its helper edited (the module
    was read as nothing: the stale entry was served)."""
    (tmp_path / "kernl_test_settings.py").write_text(
        "SCALE = 1.0\n\ndef scaled(x):\n    return x * 1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import kernl_test_settings as settings

    monkeypatch.setitem(globals(), "_settings", settings)
    bert = tiny_bert()
    monkeypatch.setattr(modeling_bert.BertOutput, "forward", _reads_a_users_module)
    first = code_digest(bert)
    assert code_digest(tiny_bert()) == first
    monkeypatch.setattr(settings, "SCALE", 2.0)
    second = code_digest(bert)
    assert second != first
    monkeypatch.setattr(settings, "scaled", lambda x: x * 3.0)
    assert code_digest(bert) not in (first, second)


def test_modules_held_in_a_plain_list_count():
    """`layer.adapters = [nn.Linear(...)]` is no submodule (a plain list): its weights were
    not in the key, and an edited adapter served the stale entry."""
    bert = tiny_bert()
    adapter = torch.nn.Linear(4, 4)
    bert.encoder.layer[1].output.adapters = [adapter]
    bert.encoder.layer[0].output.by_name = {"a": bert.encoder.layer[1]}  # the model's own
    first = code_digest(bert)
    with torch.no_grad():
        adapter.weight[0, 0] += 1.0
    assert code_digest(bert) != first


def _my_sdpa(query, key, value, *args, **kwargs):
    return _torch_sdpa(query, key, value, *args, **kwargs) * 0.5


_torch_sdpa = torch.nn.functional.scaled_dot_product_attention


def test_a_torch_functional_op_replaced_in_a_notebook_counts(monkeypatch):
    """`F.scaled_dot_product_attention = mine` changes what transformers' attention computes
    (it looks the function up at each call); torch's functions were keyed by name only."""
    bert = tiny_bert()
    first = code_digest(bert)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _my_sdpa)
    assert code_digest(bert) != first
    monkeypatch.undo()
    assert code_digest(bert) == first
