"""What a model computes besides its weights and config: the code of its module classes, their
plain attributes and the hooks registered on them, as one digest.

kernl.optimize keys its cache on it. Keyed on weights, config and class name alone, a cache
entry was served for a model whose code had changed under the same names (silently other
numbers): a notebook subclass redefined with another forward, `layer_norm.eps` set on a
module, a forward hook added. The digest reads, per module class (torch's own excepted, which
the torch version in the key covers):
- the source file of the class's module, where there is one (it also holds the module-level
  functions a forward calls: HF's `apply_rotary_pos_emb`, a remote-code helper);
- the code of its methods and of the module-level functions they name, without file names
  or line numbers (a class defined in a notebook has no file; one redefined further down a
  script shares its file);
and per module instance its public int/float/bool/str attributes (eps, scaling, head counts)
and its forward hooks (their code and the plain values they close over).
"""

from __future__ import annotations

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


def code_digest(model: torch.nn.Module) -> str:
    """sha256 (hex) of the code and the non-tensor state `model` computes with (see above)."""
    h = hashlib.sha256()
    seen: set[type] = set()
    files: dict[str, bytes] = {}
    for name, module in model.named_modules():
        h.update(f"module {name}: {_qualname(type(module))}\n".encode())
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or key in _IGNORED:
                continue
            if isinstance(value, _PLAIN) or _plain_sequence(value):
                h.update(f"  {key}={value!r}\n".encode())
            elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
                h.update(f"  {key}=<{_callable_fingerprint(value)}>\n".encode())
        for table in _HOOK_TABLES:
            for hook in getattr(module, table, {}).values():
                h.update(f"  {table}: {_callable_fingerprint(hook)}\n".encode())
        for klass in type(module).__mro__:
            if klass not in seen and not _is_torch(klass):
                seen.add(klass)
                h.update(_class_fingerprint(klass, files).encode())
    from torch.nn.modules import module as torch_module

    for table in ("_global_forward_pre_hooks", "_global_forward_hooks"):
        for hook in getattr(torch_module, table, {}).values():
            h.update(f"global {table}: {_callable_fingerprint(hook)}\n".encode())
    return h.hexdigest()


def _qualname(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def _is_torch(klass: type) -> bool:
    return klass is object or klass.__module__.split(".")[0] in ("torch", "builtins", "typing")


def _plain_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value)


def _class_fingerprint(klass: type, files: dict[str, bytes]) -> str:
    """The class's name, its module file's sha256 where it has one, and its methods' code
    (a class redefined further down the same file, or in a notebook cell, has no file of
    its own)."""
    parts = [f"class {_qualname(klass)}"]
    path = getattr(sys.modules.get(klass.__module__), "__file__", None)
    if isinstance(path, str) and path.endswith(".py") and os.path.isfile(path):
        if path not in files:
            with open(path, "rb") as f:
                files[path] = hashlib.sha256(f.read()).digest()
        parts.append(f"file {files[path].hex()}")
    module_globals = getattr(sys.modules.get(klass.__module__), "__dict__", {})
    for name, value in sorted(vars(klass).items()):
        fn = getattr(value, "__func__", value)  # staticmethod, classmethod
        if isinstance(value, property):
            fn = value.fget
        code = getattr(fn, "__code__", None)
        if code is None:
            if isinstance(value, _PLAIN) and not name.startswith("__"):
                parts.append(f"{name}={value!r}")
            continue
        parts.append(f"{name}: {_code_fingerprint(code)}")
        # module-level functions it calls by name, one level deep (a notebook's helper)
        for called in sorted(set(code.co_names)):
            target = module_globals.get(called)
            if isinstance(target, types.FunctionType) and target.__module__ == klass.__module__:
                parts.append(f"  calls {called}: {_code_fingerprint(target.__code__)}")
    return "\n".join(parts) + "\n"


def _callable_fingerprint(fn: Any) -> str:
    """A hook or a function attribute: its qualified name, its code (for Python functions)
    and the plain values it closes over or defaults to (a lambda's captured scale)."""
    method_self = getattr(fn, "__self__", None)
    fn = getattr(fn, "__func__", fn)
    if isinstance(fn, torch.nn.Module):
        return f"module {_qualname(type(fn))}"
    code = getattr(fn, "__code__", None)
    if code is None:  # a builtin, or a callable object
        name = getattr(fn, "__qualname__", None) or _qualname(type(fn))
        return f"{getattr(fn, '__module__', '?')}.{name}"
    values = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        values.append(_value_fingerprint(v))
    values += [_value_fingerprint(v) for v in getattr(fn, "__defaults__", None) or ()]
    owner = "" if method_self is None else f" of {_qualname(type(method_self))}"
    return f"{_code_fingerprint(code)}{owner} [{', '.join(values)}]"


def _value_fingerprint(v: Any) -> str:
    if isinstance(v, _PLAIN) or _plain_sequence(v):
        return repr(v)
    if isinstance(v, torch.Tensor) and v.device.type != "meta" and v.numel() <= 4096:
        data = v.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        return f"tensor {v.dtype} {tuple(v.shape)} {hashlib.sha256(data).hexdigest()[:16]}"
    if isinstance(v, types.FunctionType):
        return _code_fingerprint(v.__code__)
    return f"<{_qualname(type(v))}>"


def _code_fingerprint(code: types.CodeType) -> str:
    """sha256 of a code object's bytecode, names and constants (nested code included), without
    its file name and line numbers: the same function moved in its file keeps its digest."""
    h = hashlib.sha256()
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_argcount)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            h.update(_code_fingerprint(const).encode())
        elif isinstance(const, frozenset):  # its order follows string hashing: sorted
            h.update(repr(sorted(map(repr, const))).encode())
        else:
            h.update(repr(const).encode())
    return h.hexdigest()[:32]
