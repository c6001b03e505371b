"""What a model computes besides its weights and config: the code of its module classes, their
plain attributes, the callables set on them and the hooks registered on them, as one digest.

kernl.optimize keys its cache on it. Keyed on weights, config and class name alone, a cache
entry was served for a model whose code had changed under the same names (silently other
numbers): a notebook subclass redefined with another forward, `layer_norm.eps` set on a
module, a forward hook added, a layer's forward patched (`layer.forward =
types.MethodType(fn, layer)`), a Hugging Face helper replaced
(`modeling_bert.eager_attention_forward = my_attention`). The digest reads, per module class
(torch's own excepted, which the torch version in the key covers):
- the source file of the class's module, where there is one;
- the code of its methods, without file names or line numbers (a class defined in a notebook
  has no file; one redefined further down a script shares its file);
- the functions its methods name as globals, whatever their module, as they are bound now:
  their code, the values they close over or default to, and the functions they name in turn
  (each once per digest; torch's and the standard library's by name only);
and per module instance its public int/float/bool/str attributes (eps, scaling, head counts),
the callables set on it (a function, a bound method: its function and what it is bound to, a
functools.partial: its function and arguments, a callable object: its class and plain
attributes) and its forward hooks (likewise). Nothing in it depends on memory addresses or
the hash seed: an unchanged model has one digest in every process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import types
from typing import Any

import torch

_PLAIN = (bool, int, float, str, type(None))
# attributes that change nothing computed: the mode kernl sets itself, where it was loaded from
_IGNORED = frozenset({"training", "name_or_path"})
# the forward hook tables torch.nn.Module.__call__ reads
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks")
# modules whose functions are fingerprinted by name only: the versions in the cache key cover
# their code, and following their globals would cost the digest most of its time
_BY_NAME = frozenset({"torch", "builtins", "typing", *sys.stdlib_module_names})
_FUNCTIONS = (types.FunctionType, types.MethodType, functools.partial)
# how deep functions are followed through the globals, closures and partials they name (a
# bound on the recursion, far above what a model's helpers nest)
_MAX_DEPTH = 12


def code_digest(model: torch.nn.Module) -> str:
    """sha256 (hex) of the code and the non-tensor state `model` computes with (see above)."""
    h = hashlib.sha256()
    seen: set[type] = set()
    fp = _Fingerprints({id(m): name for name, m in model.named_modules()})
    for name, module in model.named_modules():
        h.update(f"module {name}: {_qualname(type(module))}\n".encode())
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or key in _IGNORED:
                continue
            if isinstance(value, _PLAIN) or _plain_sequence(value):
                h.update(f"  {key}={value!r}\n".encode())
            elif callable(value):  # a function, bound method, partial, callable object
                h.update(f"  {key}=<{fp.callable(value)}>\n".encode())
        for table in _HOOK_TABLES:
            for hook in getattr(module, table, {}).values():
                h.update(f"  {table}: {fp.callable(hook)}\n".encode())
        for klass in type(module).__mro__:
            if klass not in seen and not _is_torch(klass):
                seen.add(klass)
                h.update(fp.klass(klass).encode())
    from torch.nn.modules import module as torch_module

    for table in ("_global_forward_pre_hooks", "_global_forward_hooks"):
        for hook in getattr(torch_module, table, {}).values():
            h.update(f"global {table}: {fp.callable(hook)}\n".encode())
    return h.hexdigest()


def _qualname(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def _is_torch(klass: type) -> bool:
    return klass is object or klass.__module__.split(".")[0] in ("torch", "builtins", "typing")


def _plain_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value)


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

    def klass(self, klass: type) -> str:
        """The class's name, its module file's sha256 where it has one, and its methods (a
        class redefined further down the same file, or in a notebook cell, has no file of its
        own)."""
        if klass in self.classes:
            return self.classes[klass]
        parts = [f"class {_qualname(klass)}"]
        path = getattr(sys.modules.get(klass.__module__), "__file__", None)
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
                if isinstance(value, _PLAIN) and not name.startswith("__"):
                    parts.append(f"{name}={value!r}")
                continue
            if isinstance(fn, types.FunctionType):  # with what it closes over (a decorator's
                parts.append(f"{name}: {self.function(fn, 0)}")  # wrapped method) and calls
            else:
                parts.append(f"{name}: {_code_fingerprint(code)}")
        self.classes[klass] = "\n".join(parts) + "\n"
        return self.classes[klass]

    def callable(self, fn: Any, depth: int = 0, follow: bool = True) -> str:
        """A hook, an attribute or a value a function holds: what calling it runs. `follow`:
        with the functions it names as globals (see `function`)."""
        if isinstance(fn, functools.partial):
            args = [self.value(a, depth + 1) for a in fn.args]
            kwargs = [f"{k}={self.value(v, depth + 1)}" for k, v in sorted(fn.keywords.items())]
            inner = self.callable(fn.func, depth + 1, follow)
            return f"partial({inner}; {', '.join(args + kwargs)})"
        if isinstance(fn, types.MethodType):
            return f"{self.callable(fn.__func__, depth + 1, follow)} of {self.owner(fn.__self__)}"
        if isinstance(fn, (staticmethod, classmethod)):
            return self.callable(fn.__func__, depth + 1, follow)
        if isinstance(fn, torch.nn.Module):  # a hook that is a module: its class and weights
            return f"module {_qualname(type(fn))}"
        if isinstance(fn, types.FunctionType):
            return self.function(fn, depth, follow)
        if isinstance(fn, type):
            return f"class {_qualname(fn)}"
        if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            owner = getattr(fn, "__self__", None)
            bound = "" if owner is None or isinstance(owner, types.ModuleType) else " bound"
            return f"{getattr(fn, '__module__', None) or '?'}.{fn.__qualname__}{bound}"
        # a callable object: its class's code and its plain attributes
        klass = type(fn)
        code = "" if _is_torch(klass) else hashlib.sha256(self.klass(klass).encode()).hexdigest()
        state = [
            f"{k}={v!r}"
            for k, v in sorted(getattr(fn, "__dict__", {}).items())
            if not k.startswith("_")
            and k not in _IGNORED
            and (isinstance(v, _PLAIN) or _plain_sequence(v))
        ]
        return f"object {_qualname(klass)} {code[:32]} [{', '.join(state)}]"

    def function(self, fn: types.FunctionType, depth: int, follow: bool = True) -> str:
        """Its code, the values it closes over or defaults to (a lambda's captured scale, a
        decorator's wrapped method), and with `follow` the functions it names as globals as
        they are bound now (a patched helper): those of its own module followed in turn, those
        of another module by their own code and values only (a method's helpers, wherever
        they are, and what those call in their module; not the whole library behind them)."""
        name = f"{fn.__module__}.{fn.__qualname__}"
        if (fn.__module__ or "").split(".")[0] in _BY_NAME:
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
            if follow:
                for called in sorted(_names(fn.__code__)):
                    target = fn.__globals__.get(called)
                    if isinstance(target, _FUNCTIONS):
                        inner = _globals_of(target) is fn.__globals__  # its own module
                        parts.append(f"calls {called}: {self.callable(target, depth + 1, inner)}")
        finally:
            self.busy.discard(key)
        found = f"{name} {hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:32]}"
        self.functions[key] = found
        return found

    def value(self, v: Any, depth: int, follow: bool = False) -> str:
        if isinstance(v, _PLAIN) or _plain_sequence(v):
            return repr(v)
        if isinstance(v, torch.Tensor) and v.device.type != "meta" and v.numel() <= 4096:
            data = v.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            return f"tensor {v.dtype} {tuple(v.shape)} {hashlib.sha256(data).hexdigest()[:16]}"
        if isinstance(v, _FUNCTIONS):
            return self.callable(v, depth, follow)
        if isinstance(v, torch.nn.Module):
            return self.owner(v)
        return f"<{_qualname(type(v))}>"

    def owner(self, obj: Any) -> str:
        """What a bound method is bound to: a module of the model by its name in it (the same
        function bound to another layer computes with other weights), else by its class."""
        name = self.owners.get(id(obj))
        if name is not None:
            return f"model module {name!r}"
        return f"class {_qualname(obj)}" if isinstance(obj, type) else f"<{_qualname(type(obj))}>"


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
