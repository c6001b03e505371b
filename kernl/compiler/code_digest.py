"""What a model computes besides its weights and config: the code of its module classes, their
other state, the callables set on them and the hooks registered on them, as one digest.

kernl.optimize keys its cache on it. Keyed on weights, config and class name alone, a cache
entry was served for a model whose code had changed under the same names (silently other
numbers): a notebook subclass redefined with another forward, `layer_norm.eps` set on a
module, a forward hook added, a layer's forward patched (`layer.forward =
types.MethodType(fn, layer)`), a Hugging Face helper replaced
(`modeling_bert.eager_attention_forward = my_attention`), an attention function registered
again under the same name, a settings class a forward reads (`CFG.scale = 3.0`), a torch
class's method replaced (`torch.nn.LayerNorm.forward = ...`). The digest reads, per module
class (torch's own by the torch version in the key, but for methods set on them from
outside torch), and the attention and mask functions registered under the config's
`_attn_implementation`:
- the source file of the class's module, where there is one;
- the code of its methods, without file names or line numbers (a class defined in a notebook
  has no file; one redefined further down a script shares its file), and its constants: plain
  values, and for the user's own class (not an installed library's) any data (a tuple of
  weights, a tensor);
- the functions its methods name as globals, whatever their module, as they are bound now:
  their code, the values they close over or default to, and the functions they name in turn
  (each once per digest; torch's and the standard library's by name only);
and per module instance its state besides parameters and buffers: its int/float/bool/str
attributes, private ones included (eps, scaling, head counts, PEFT's `_active_adapter` and
`_disable_adapters`), dicts, lists, tuples and sets of such values or of tensors (PEFT's
`scaling = {"default": 2.0}`), tensors and numpy arrays held as plain attributes (by their
bytes, as weights are hashed: compile folds them in as constants), enums and dtypes, an options
object of the user's (a dataclass, a SimpleNamespace: by its data), a list, tuple or dict of
modules not registered as submodules (each as a module a function names), the callables set on it (a function, a bound
method: its function and what it is bound to, a functools.partial: its function and arguments,
a callable object: its class and state) and its forward hooks (likewise). Functions count the
plain values, tensors, modules and settings objects (a class, a SimpleNamespace or an
instance of the user's own class, by their data attributes) and the user's callable objects
they name as globals too (a notebook's `SCALE = 3.0`, `post = Post()`; a helper under
functools.cache by the function it wraps; not
those of installed libraries, whose globals are their process state: `_installed`), and a
module outside the model that a hook or function reaches counts with its parameters and
buffers. Left out: torch.nn.Module's own bookkeeping (parameters, buffers and submodules are
hashed by weights_digest and the walk over named_modules; hook tables as hooks; `training`,
which kernl sets itself) and a short list of Hugging Face loading bookkeeping (_IGNORED).
Nothing in it depends on memory addresses or the hash seed (sets are hashed sorted): an
unchanged model has one digest in every process.
"""

from __future__ import annotations

import dis
import enum
import functools
import hashlib
import importlib.metadata
import os
import sys
import types
from pathlib import Path
from typing import Any

import torch

_PLAIN = (bool, int, float, str, type(None))
_CONTAINERS = (dict, list, tuple, set, frozenset)
# instance attributes that change nothing computed, or are hashed elsewhere:
_IGNORED = frozenset(
    {
        # torch.nn.Module's own: _parameters/_buffers/_modules (weights_digest, named_modules),
        # the hook tables (_HOOK_TABLES, hashed as hooks), `training` (kernl sets the mode)
        *vars(torch.nn.Module()),
        "_compiled_call_impl",  # Module.compile(): the same forward, compiled by torch
        # torch.compile(model)'s mark on the model it wraps (kernl compiles the model itself):
        # the first optimize through the wrapper missed the unwrapped model's entry
        "_is_torch_compile",
        "_output_capturing_hooks_installed",  # transformers' flag: inert_transformers_hook
        # where the model was loaded from, and Hugging Face bookkeeping for loading, saving,
        # sharding and hub kernels: from_pretrained sets some that a constructor does not, and
        # nothing a forward computes reads them (kernelize's new forwards are hashed as such)
        "name_or_path",
        "_is_hf_initialized",
        "_use_kernels",
        "_kernels_mode",
        "_weight_conversions",
        "_keep_in_fp32_modules",
        "_keep_in_fp32_modules_strict",
        "_keys_to_ignore_on_load_missing",
        "_keys_to_ignore_on_load_unexpected",
        "_keys_to_ignore_on_save",
        "_no_split_modules",
        "_skip_keys_device_placement",
        "all_tied_weights_keys",
        "_tp_plan",
        "_pp_plan",
        "_ep_plan",
        "_fsdp_plan",
    }
)
# the forward hook tables torch.nn.Module.__call__ reads
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks")
# modules whose functions are fingerprinted by name only: the versions in the cache key cover
# their code, and following their globals would cost the digest most of its time
_BY_NAME = frozenset({"torch", "builtins", "typing", *sys.stdlib_module_names})
_FUNCTIONS = (types.FunctionType, types.MethodType, functools.partial)
_CACHED = type(functools.lru_cache(lambda: None))  # what @functools.cache / lru_cache return
# how deep functions are followed through the globals, closures and partials they name, and
# values through the containers and objects that hold them (a bound on the recursion, far
# above what a model's helpers nest)
_MAX_DEPTH = 12
_HASH_CHUNK = 64 << 20  # bytes of a GPU tensor copied to the host at a time


def code_digest(model: torch.nn.Module) -> str:
    """sha256 (hex) of the code and the state besides parameters and buffers that `model`
    computes with (see above)."""
    h = hashlib.sha256()
    seen: set[type] = set()
    fp = _Fingerprints({id(m): name for name, m in model.named_modules()})
    attention: set[str] = set()
    for name, module in model.named_modules():
        h.update(f"module {name}: {_qualname(type(module))}\n".encode())
        for line in fp.state(module, 0):
            h.update(f"  {line}\n".encode())
        for klass in type(module).__mro__:
            if klass in seen:
                continue
            seen.add(klass)
            # torch's own classes by the torch version in the key, but for methods set on
            # them from elsewhere (`torch.nn.LayerNorm.forward = ...` in a notebook)
            h.update((fp.patched(klass) if _is_torch(klass) else fp.klass(klass)).encode())
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if isinstance(impl, str):
            attention.add(impl)
    # The attention (and mask) function registered under the config's name, as bound now: a
    # notebook that registers another function under the same name gets another entry.
    for impl in sorted(attention):
        for kind, fn in _registered_attention(impl):
            h.update(f"{kind} {impl}: {fp.callable(fn)}\n".encode())
    from torch.nn.modules import module as torch_module

    for table in ("_global_forward_pre_hooks", "_global_forward_hooks"):
        for hook in getattr(torch_module, table, {}).values():
            h.update(f"global {table}: {fp.callable(hook)}\n".encode())
    # torch.nn.functional's ops replaced in a notebook (`F.scaled_dot_product_attention =
    # mine`, which transformers' attention looks up at each call): torch's functions are keyed
    # by name, so the entry compiled before the patch was served
    for name, fn in sorted(vars(torch.nn.functional).items()):
        if callable(fn) and not isinstance(fn, type) and not _torch_or_stdlib(fn):
            h.update(f"torch.nn.functional.{name}: {fp.callable(fn)}\n".encode())
    return h.hexdigest()


def _torch_or_stdlib(fn: Any) -> bool:
    """Whether a callable is torch's own (a C function, an op, a Python function of torch's
    modules) or the standard library's (typing's Optional)."""
    if isinstance(fn, types.BuiltinFunctionType):
        return True
    owner = (getattr(fn, "__globals__", None) or {}).get("__name__")
    owner = owner or getattr(fn, "__module__", None) or type(fn).__module__
    return (owner or "").split(".")[0] in _BY_NAME


def _registered_attention(impl: str) -> list[tuple[str, Any]]:
    """The functions transformers' attention and mask registries hold under `impl`."""
    found = []
    for module, table in (
        ("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS"),
        ("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS"),
    ):
        registry = getattr(sys.modules.get(module), table, None)
        try:
            fn = registry[impl] if registry is not None and impl in registry else None
        except Exception:  # noqa: BLE001 - a registry of another shape: nothing to add
            fn = None
        if callable(fn):
            found.append((table, fn))
    return found


def _qualname(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def _is_torch(klass: type) -> bool:
    return klass is object or klass.__module__.split(".")[0] in ("torch", "builtins", "typing")


def tensor_bytes_digest(t: torch.Tensor, chunk: int = _HASH_CHUNK) -> bytes:
    """sha256 of a tensor's bytes (weights_digest's too), a GPU tensor copied to the host
    `chunk` bytes at a time."""
    h = hashlib.sha256()
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if flat.device.type == "cpu":
        h.update(flat.numpy().data)  # no copy for a contiguous CPU tensor
    else:  # bounded host memory: a chunk at a time
        for start in range(0, flat.numel(), chunk):
            h.update(flat[start : start + chunk].cpu().numpy().data)
    return h.digest()


class _Fingerprints:
    """The fingerprints of one digest: each class, file and function is read once (a helper
    many methods call, a file many classes share), and a function that names itself, or one
    that names it, ends the walk instead of recursing."""

    def __init__(self, owners: dict[int, str]):
        self.owners = owners  # id of each module of the model -> its name in it
        self.files: dict[str, bytes] = {}
        self.classes: dict[type, str] = {}
        self.functions: dict[tuple[int, bool], str] = {}
        self.busy: set[tuple[int, bool]] = set()
        self.modules: dict[int, str] = {}  # modules outside the model, by id (this digest's)
        self.busy_modules: set[int] = set()
        self.tensors: dict[tuple, str] = {}  # a tensor shared by many hooks is read once

    def state(self, obj: Any, depth: int) -> list[str]:
        """What a module's (or a callable object's) calls may read besides parameters and
        buffers: its attributes that are data (see `data`: plain values, tensors, containers of
        those; private ones too, PEFT's `_active_adapter`), its callable attributes, and a
        module's forward hooks. Other attributes (a config, which the key hashes on its own;
        an accelerate hook object; a container holding such objects) have no fingerprint that
        is both stable across processes and complete, and are left out, as they always were."""
        lines = []
        for key, value in sorted(getattr(obj, "__dict__", {}).items()):
            if key in _IGNORED or (key == "forward" and own_forward(obj, value)):
                continue
            data = self.data(value, depth + 1)
            if data is not None:
                lines.append(f"{key}={data}")
            elif callable(value):  # a function, bound method, partial, callable object
                lines.append(f"{key}=<{self.callable(value, depth + 1)}>")
            elif _modules_held(value):
                # `self.adapters = [nn.Linear(...)]`: not registered (a plain list), so not in
                # the model's modules, yet a forward may apply them. A dict's keys by their
                # data (an object's repr may hold its address: a new key in every process)
                items = value.items() if isinstance(value, dict) else enumerate(value)
                held = [f"{self.data(k, depth + 1)}: {self.module(m, depth + 1)}" for k, m in items]
                lines.append(f"{key}={_qualname(type(value))}[{', '.join(held)}]")
            elif not isinstance(value, torch.nn.Module):
                # a dataclass of options or a SimpleNamespace of the user's, by its data
                # attributes (an instance of a library's class, such as the config: None)
                data = self.settings(value, depth + 1)
                if data is not None:
                    lines.append(f"{key}={data}")
        if isinstance(obj, torch.nn.Module):
            for table in _HOOK_TABLES:
                for hook in getattr(obj, table, {}).values():
                    if not inert_transformers_hook(hook):
                        lines.append(f"{table}: {self.callable(hook, depth + 1)}")
        return lines

    def data(self, v: Any, depth: int) -> str | None:
        """A plain value, a tensor (its bytes), or a dict, list, tuple or set holding only
        those (nested too), as a string; None for anything else. Dicts, lists and tuples in
        their order (insertion order: the same for the same code), sets sorted (their order
        follows string hashing, which differs between processes)."""
        if isinstance(v, _PLAIN):
            return repr(v)
        if isinstance(v, torch.Tensor):
            return self.tensor(v)
        if isinstance(v, (torch.dtype, torch.device)):
            return repr(v)
        if isinstance(v, enum.Enum):  # a mode switch: its member's name
            return f"{_qualname(type(v))}.{v.name}"
        if type(v).__module__ == "numpy" and type(v).__name__ == "ndarray":
            return _ndarray(v)
        if not isinstance(v, _CONTAINERS) or depth > _MAX_DEPTH:
            return None
        if isinstance(v, dict):
            items = [(self.data(k, depth + 1), self.data(x, depth + 1)) for k, x in v.items()]
            if any(k is None or x is None for k, x in items):
                return None
            inner = ", ".join(f"{k}: {x}" for k, x in items)
        else:
            parts = [self.data(x, depth + 1) for x in v]
            if any(x is None for x in parts):
                return None
            inner = ", ".join(sorted(parts) if isinstance(v, (set, frozenset)) else parts)
        return f"{_qualname(type(v))}[{inner}]"

    def tensor(self, t: torch.Tensor) -> str:
        """A tensor by dtype, shape and the sha256 of its bytes, whatever its size (compile
        folds a tensor a forward reads into the artifact, as it does weights)."""
        kind = f"tensor {t.dtype} {tuple(t.shape)}"
        if t.device.type == "meta" or t.layout != torch.strided:
            return kind  # no bytes to read (not loaded, or sparse): its kind only, as before
        try:
            ptr = t.untyped_storage().data_ptr() if t.numel() else 0
            key = (str(t.device), ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key not in self.tensors:  # the address keys this digest's memo, never the hash
                self.tensors[key] = f"{kind} {tensor_bytes_digest(t).hex()[:32]}"
            return self.tensors[key]
        except (RuntimeError, TypeError, NotImplementedError):
            # a tensor subclass without plain storage (quantized, distributed): no bytes that
            # read the same in every process, so its kind and class only, as before
            return f"{kind} {_qualname(type(t))}"

    def module(self, m: torch.nn.Module, depth: int) -> str:
        """A module: one of the model's by its name in it (weights_digest hashes its weights);
        another one (an adapter a hook applies, a module a function names as a global) by its
        classes' code, its modules' state and hooks, and its parameters' and buffers' bytes."""
        name = self.owners.get(id(m))
        if name is not None:
            return f"model module {name!r}"
        if id(m) in self.modules:
            return self.modules[id(m)]
        if id(m) in self.busy_modules or depth > _MAX_DEPTH:  # it holds itself, or too deep
            return f"module {_qualname(type(m))}"
        self.busy_modules.add(id(m))
        try:
            parts = []
            for sub_name, sub in m.named_modules():
                code = [
                    hashlib.sha256(self.klass(k).encode()).hexdigest()[:32]
                    for k in type(sub).__mro__
                    if not _is_torch(k)
                ]
                parts.append(f"module {sub_name}: {_qualname(type(sub))} {code}")
                parts += self.state(sub, depth + 1)
            tensors = [
                *m.named_parameters(remove_duplicate=False),
                *m.named_buffers(remove_duplicate=False),
            ]
            parts += [f"{n}={self.tensor(t)}" for n, t in tensors]
        finally:
            self.busy_modules.discard(id(m))
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
        self.modules[id(m)] = f"module {_qualname(type(m))} {digest}"
        return self.modules[id(m)]

    def klass(self, klass: type) -> str:
        """The class's name, its module file's sha256 where it has one, and its methods (a
        class redefined further down the same file, or in a notebook cell, has no file of its
        own)."""
        if klass in self.classes:
            return self.classes[klass]
        parts = [f"class {_qualname(klass)}"]
        path = getattr(sys.modules.get(klass.__module__), "__file__", None)
        # a library's class constants are its own (and some are caches it fills on first
        # use): plain values only, as before; the user's own class's, whatever their data
        users = _users_class(klass)
        if isinstance(path, str) and path.endswith(".py") and os.path.isfile(path):
            if path not in self.files:
                with open(path, "rb") as f:
                    self.files[path] = hashlib.sha256(f.read()).digest()
            parts.append(f"file {self.files[path].hex()}")
        for name, value in sorted(vars(klass).items()):
            fn = getattr(value, "__func__", value)  # staticmethod, classmethod
            if isinstance(value, property):
                fn = value.fget
            code = getattr(fn, "__code__", None)
            if code is None:
                # (not a value transformers caches on the class on first use, such as
                # `_can_set_attn_implementation_cached_value`: not code, and set later)
                if name.startswith("__") or name.endswith("_cached_value"):
                    continue
                if isinstance(value, _PLAIN):
                    parts.append(f"{name}={value!r}")
                elif users:  # `LAYER_WEIGHTS = (1.0, 2.0)` in a notebook's class
                    data = self.data(value, 1)
                    if data is not None:
                        parts.append(f"{name}={data}")
                continue
            if isinstance(fn, types.FunctionType):  # with what it closes over (a decorator's
                parts.append(f"{name}: {self.function(fn, 0)}")  # wrapped method) and calls
            else:
                parts.append(f"{name}: {_code_fingerprint(code)}")
        self.classes[klass] = "\n".join(parts) + "\n"
        return self.classes[klass]

    def patched(self, klass: type) -> str:
        """A torch class's methods that come from outside torch (set on the class by the
        user's code), each as `function` reads it; "" for an unpatched class."""
        parts = []
        for name, value in sorted(vars(klass).items()):
            fn = getattr(value, "__func__", value)
            if isinstance(fn, types.FunctionType):
                module = fn.__globals__.get("__name__") or ""
                if module.split(".")[0] not in _BY_NAME:
                    parts.append(f"{name}: {self.function(fn, 0)}")
        return f"patched {_qualname(klass)}\n" + "\n".join(parts) + "\n" if parts else ""

    def callable(self, fn: Any, depth: int = 0, follow: bool = True) -> str:
        """A hook, an attribute or a value a function holds: what calling it runs. `follow`:
        with the functions it names as globals (see `function`)."""
        if isinstance(fn, functools.partial):
            args = [self.value(a, depth + 1) for a in fn.args]
            kwargs = [f"{k}={self.value(v, depth + 1)}" for k, v in sorted(fn.keywords.items())]
            inner = self.callable(fn.func, depth + 1, follow)
            return f"partial({inner}; {', '.join(args + kwargs)})"
        if isinstance(fn, types.MethodType):
            bound = self.owner(fn.__self__, depth + 1)
            return f"{self.callable(fn.__func__, depth + 1, follow)} of {bound}"
        if isinstance(fn, (staticmethod, classmethod)):
            return self.callable(fn.__func__, depth + 1, follow)
        if isinstance(fn, torch.nn.Module):  # a hook that is a module: its class and weights
            return self.module(fn, depth)
        if isinstance(fn, types.FunctionType):
            return self.function(fn, depth, follow)
        if isinstance(fn, type):
            return f"class {_qualname(fn)}"
        if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            owner = getattr(fn, "__self__", None)
            bound = "" if owner is None or isinstance(owner, types.ModuleType) else " bound"
            return f"{getattr(fn, '__module__', None) or '?'}.{fn.__qualname__}{bound}"
        # a callable object: its class's code and its state (as a module's)
        klass = type(fn)
        code = "" if _is_torch(klass) else hashlib.sha256(self.klass(klass).encode()).hexdigest()
        state = self.state(fn, depth) if depth <= _MAX_DEPTH else ["..."]
        return f"object {_qualname(klass)} {code[:32]} [{', '.join(state)}]"

    def function(self, fn: types.FunctionType, depth: int, follow: bool = True) -> str:
        """Its code, the values it closes over or defaults to (a lambda's captured scale, a
        decorator's wrapped method), and with `follow` the functions it names as globals as
        they are bound now (a patched helper): those of its own module followed in turn, those
        of another module by their own code and values only (a method's helpers, wherever
        they are, and what those call in their module; not the whole library behind them)."""
        name = f"{fn.__module__}.{fn.__qualname__}"
        # the module whose globals it runs with: functools.wraps copies another function's
        # __module__ (a notebook's patched helper would pass for transformers' or torch's own)
        module = fn.__globals__.get("__name__")
        if (module or "").split(".")[0] in _BY_NAME:
            return name
        key = (id(fn), follow)
        if key in self.functions:
            return self.functions[key]
        if key in self.busy or depth > _MAX_DEPTH:  # a cycle, or far too deep: the code only
            return f"{name} {_code_fingerprint(fn.__code__)}"
        self.busy.add(key)
        try:
            parts = [_code_fingerprint(fn.__code__)]
            for cell in fn.__closure__ or ():
                try:
                    v = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                parts.append(self.value(v, depth + 1, follow))
            parts += [self.value(v, depth + 1) for v in fn.__defaults__ or ()]
            for k, v in sorted((fn.__kwdefaults__ or {}).items()):
                parts.append(f"{k}={self.value(v, depth + 1)}")
            # the data its globals hold: of the user's code only (see _installed)
            installed = _installed(module, fn.__globals__.get("__file__"))
            read = set() if installed else _global_names(fn.__code__)
            for called in sorted(_names(fn.__code__)):
                target = fn.__globals__.get(called, _ABSENT)
                # a helper under @functools.lru_cache / @functools.cache: the function it wraps
                if isinstance(target, _CACHED) and isinstance(
                    target.__wrapped__, types.FunctionType
                ):
                    target = target.__wrapped__
                if isinstance(target, _FUNCTIONS):
                    if follow:
                        inner = _globals_of(target) is fn.__globals__  # its own module
                        parts.append(f"calls {called}: {self.callable(target, depth + 1, inner)}")
                elif called not in read or target is _ABSENT:  # a builtin: not the module's
                    # an attribute name only (`out.logits`, `self.model`): a notebook global
                    # of that name is not what the function reads, and hashing it made every
                    # `logits = model(...).logits` cell a cache miss (and hashed its bytes)
                    continue
                elif isinstance(target, torch.nn.Module):  # a notebook's adapter a hook applies
                    parts.append(f"names {called}: {self.module(target, depth + 1)}")
                elif isinstance(target, types.ModuleType):  # `import settings` beside the script
                    reads = self.users_module(target, _names(fn.__code__), depth + 1)
                    if reads is not None:
                        parts.append(f"names {called}: {reads}")
                elif (
                    callable(target) and not isinstance(target, type) and _users_class(type(target))
                ):
                    # a notebook's `post = Post()`: its class's code and its state
                    parts.append(f"names {called}: {self.callable(target, depth + 1)}")
                else:  # a notebook's `SCALE = 3.0`, a steering tensor: read, not followed
                    data = self.data(target, depth + 1)
                    if data is None:  # `class CFG: scale = 1.0`, a SimpleNamespace
                        data = self.settings(target, depth + 1)
                    if data is not None:
                        parts.append(f"names {called}={data}")
        finally:
            self.busy.discard(key)
        found = f"{name} {hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:32]}"
        self.functions[key] = found
        return found

    def settings(self, target: Any, depth: int) -> str | None:
        """A settings object of the user's that a function reads: a class (a Kaggle-style
        `class CFG: scale = 1.0`), a SimpleNamespace or an instance of the user's own class
        (a dataclass of options), by its data attributes. None for anything else: a module,
        an object of a library's or the standard library's class (a logger, whose state is
        a cache of levels), which have no stable fingerprint."""
        if isinstance(target, types.ModuleType) or depth > _MAX_DEPTH:
            return None
        klass = target if isinstance(target, type) else type(target)
        attrs = getattr(target, "__dict__", None)
        if not isinstance(attrs, (dict, types.MappingProxyType)):
            return None
        if klass is not types.SimpleNamespace and not _users_class(klass):
            return None
        lines = []
        for key, value in sorted(attrs.items()):
            if not key.startswith("__"):
                data = self.data(value, depth + 1)
                if data is not None:
                    lines.append(f"{key}={data}")
        kind = "class" if isinstance(target, type) else "object"
        return f"{kind} {_qualname(klass)} [{', '.join(lines)}]"

    def users_module(self, module: types.ModuleType, names: set[str], depth: int) -> str | None:
        """A module of the user's that a function names (`settings.SCALE`, `helpers.scale(x)`):
        the attributes of it the function's code names, as globals of the function would be
        (data, settings objects, modules, functions by their code and values). None for torch's,
        the standard library's or an installed library's module: its versions are in the key,
        and its globals are process state (see _installed)."""
        top = module.__name__.split(".")[0]
        if top in _BY_NAME or _installed(module.__name__, getattr(module, "__file__", None)):
            return None
        lines = []
        attrs = vars(module)
        for name in sorted(names & attrs.keys()):
            v = attrs[name]
            if isinstance(v, _CACHED) and isinstance(v.__wrapped__, types.FunctionType):
                v = v.__wrapped__
            if isinstance(v, _FUNCTIONS):
                found = self.callable(v, depth, follow=False)
            elif isinstance(v, torch.nn.Module):
                found = self.module(v, depth)
            else:
                found = self.data(v, depth) or self.settings(v, depth)
            if found is not None:
                lines.append(f"{name}={found}")
        return f"module {module.__name__} [{', '.join(lines)}]"

    def value(self, v: Any, depth: int, follow: bool = False) -> str:
        """A value a function closes over, defaults to, or a partial binds."""
        data = self.data(v, depth)
        if data is not None:
            return data
        if isinstance(v, _FUNCTIONS):
            return self.callable(v, depth, follow)
        if isinstance(v, torch.nn.Module):
            return self.module(v, depth)
        # any other object: its class only, as before (its attributes may hold what differs
        # between processes, an address, a lock, a counter, and have no general fingerprint)
        return f"<{_qualname(type(v))}>"

    def owner(self, obj: Any, depth: int = 0) -> str:
        """What a bound method is bound to: a module by `module` (a module of the model by its
        name in it: the same function bound to another layer computes with other weights),
        else by its class."""
        if isinstance(obj, torch.nn.Module):
            return self.module(obj, depth)
        return f"class {_qualname(obj)}" if isinstance(obj, type) else f"<{_qualname(type(obj))}>"


_ABSENT = object()


def _modules_held(value: Any) -> bool:
    """A list, tuple or dict (by its values) of modules only."""
    items = list(value.values()) if isinstance(value, dict) else value
    return (
        isinstance(value, (list, tuple, dict))
        and bool(items)
        and all(isinstance(m, torch.nn.Module) for m in items)
    )


def _ndarray(a: Any) -> str | None:
    """A numpy array by dtype, shape and the sha256 of its bytes; None for an array of
    objects (its bytes are addresses)."""
    if a.dtype.hasobject:
        return None
    data = a.tobytes()  # C order, whatever its strides
    return f"ndarray {a.dtype} {a.shape} {hashlib.sha256(data).hexdigest()[:32]}"


def _users_class(klass: type) -> bool:
    """Whether `klass` is of the user's code (a notebook's, a script's), not torch's, the
    standard library's or an installed library's."""
    top = klass.__module__.split(".")[0]
    if top in _BY_NAME or top == "torch":
        return False
    return not _installed(
        klass.__module__, getattr(sys.modules.get(klass.__module__), "__file__", None)
    )


@functools.cache
def _installed(module: str | None, path: str | None) -> bool:
    """Whether a module (its name, its file) belongs to an installed distribution
    (transformers, peft, accelerate): a file under site-packages or dist-packages, or a
    top-level package a distribution installs (an editable install, `pip install --target`)
    whose file is not under the working directory. Its code is hashed as everyone's, but not
    the data its globals hold: that is the library's process state (a flag its context
    managers set while some thread loads a model, a lazily imported attention function, a
    path from the environment), which differs between a fresh process and a long-running
    one, so hashing it made an unchanged model miss the cache (a plain BERT in CI's test
    worker, 2026-12-06). A user's globals (a notebook's, a script's, a module of theirs
    beside it) are hashed."""
    if not isinstance(path, str):
        return False  # a notebook, __main__ run from stdin
    parts = Path(path).parts
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    top = (module or "").split(".")[0]
    if top in ("", "__main__") or top not in _distribution_packages():
        return False
    try:
        Path(path).resolve().relative_to(Path.cwd().resolve())
        return False  # the user's own module, named like something installed
    except (ValueError, OSError):
        return True


@functools.cache
def _distribution_packages() -> frozenset[str]:
    """The top-level packages installed distributions provide (read once: ~0.3 s)."""
    try:
        return frozenset(importlib.metadata.packages_distributions())
    except Exception:  # a broken distribution's metadata: only the path rule then
        return frozenset()


def inert_transformers_hook(hook: Any) -> bool:
    """transformers' own forward hooks that change no output: the output-capture hooks the
    first forward with output_hidden_states / output_attentions leaves on every layer
    (transformers 5), and enable_input_require_grads's (it only sets requires_grad). Hashed,
    they changed an unchanged model's key after such a forward; the generation tasks, which
    refuse hooks their decoder would not run, refused any model that had once returned its
    hidden states, with no handle to remove. The module is that of the globals the function
    runs with (functools.wraps copies __module__)."""
    fn = getattr(hook, "func", hook)
    module = (getattr(fn, "__globals__", None) or {}).get("__name__") or ""
    name = getattr(fn, "__qualname__", None) or ""
    return module == "transformers.utils.output_capturing" or (
        module.startswith("transformers.") and name.endswith("make_inputs_require_grads")
    )


def own_forward(module: Any, value: Any) -> bool:
    """Whether `value`, a module's instance attribute `forward`, is its class's own forward
    bound to it: what transformers 5.0 and 5.1 leave on every layer after one forward with
    output_hidden_states / output_attentions (check_model_inputs put the forward back as
    `module.forward = original_forward`). It computes what the class's does: no change."""
    return (
        isinstance(value, types.MethodType)
        and value.__self__ is module
        and value.__func__ is getattr(type(module), "forward", None)
    )


def _globals_of(fn: Any) -> dict | None:
    """The module globals a function (under a bound method or partial) runs with."""
    while isinstance(fn, (types.MethodType, functools.partial)):
        fn = fn.__func__ if isinstance(fn, types.MethodType) else fn.func
    return getattr(fn, "__globals__", None)


def _names(code: types.CodeType) -> set[str]:
    """The global and attribute names a code object and the code nested in it use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _global_names(code: types.CodeType) -> set[str]:
    """The names a code object and the code nested in it read as globals (LOAD_GLOBAL,
    LOAD_NAME), not as attributes: co_names holds both."""
    names = {
        i.argval
        for i in dis.get_instructions(code)
        if i.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(i.argval, str)
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _code_fingerprint(code: types.CodeType) -> str:
    """sha256 of a code object's bytecode, names and constants (nested code included), without
    its file name and line numbers: the same function moved in its file keeps its digest."""
    h = hashlib.sha256()
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_argcount)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            h.update(_code_fingerprint(const).encode())
        else:
            h.update(_const_repr(const).encode())
    return h.hexdigest()[:32]


def _const_repr(const: Any) -> str:
    """repr of a constant, a frozenset's items sorted (their order follows string hashing,
    which differs between processes), inside a tuple too."""
    if isinstance(const, frozenset):
        return f"frozenset({sorted(map(_const_repr, const))!r})"
    if isinstance(const, tuple):
        return f"({', '.join(map(_const_repr, const))},)"
    return repr(const)
