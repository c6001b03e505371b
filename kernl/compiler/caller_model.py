"""The caller's model, left as it was by a compile.

A compile casts the model to its dtype and device (`model.to(device, dtype)`), puts it in eval
mode, traces it (torch.export hooks its modules) and draws random inputs. Given a model object,
`kernl.compiler.compile` and `kernl.optimize` do all of that to new module objects over the
same tensors, so the caller's model keeps its dtype, device, training flags and RNG stream,
and another thread may go on calling it; only what cannot be copied that way is compiled in
place and put back afterwards."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch


@contextlib.contextmanager
def left_as_it_was(
    model: torch.nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    say: Callable[[str], None],
) -> Iterator[torch.nn.Module]:
    """The module to compile in place of `model`: new module objects over its tensors where
    they can be made, else `model` itself with its tensors put back on exit, else (gradients,
    torch's swap-on-conversion modes) a deep copy. Training flags and the RNG state (CPU, and
    `device`'s when it is a GPU) are put back on exit either way."""
    if model.training:  # said: dropout on in the original, off in what serves
        say(
            "the model is in train() mode: compiled as in eval() (no dropout), as inference "
            "runs; its outputs equal the original's after model.eval()"
        )
    converted = converted_by_compile(model, dtype, device)
    with untouched(model, device):
        subject = modules_over_the_same_tensors(model)
        if subject is None:
            say(
                "compiling the model itself (its modules cannot be copied over their "
                "tensors): do not call it from another thread until the compile ends"
            )
            subject = model
        if subject is model and converted and not can_put_back(model, converted):
            say(
                f"compiling a copy of the model in {str(dtype).removeprefix('torch.')} on "
                f"{device} (the original stays as it is)"
            )
            subject = copy.deepcopy(model)
        with tensors_put_back(subject):
            yield subject


@contextlib.contextmanager
def untouched(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Put back every module's training flag and the RNG state the caller had: a compile and
    an output probe switch the model to eval mode and draw random inputs."""
    modes = [(m, m.training) for m in model.modules()]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m, training in modes:
            m.training = training


def modules_over_the_same_tensors(model: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of `model`'s module tree whose parameters are new Parameter objects over the
    original storage, and whose buffers and other tensor attributes are the original tensors:
    a cast gives the copy's parameters new data and the copy's modules new buffers, never the
    caller's, and an export hooks the copy's modules. None where such a copy would not
    compute what the model does or would copy weights: parameters of a subclass (quantized:
    their state lives on the object), hooks (accelerate's offload hooks own weights), or
    anything deepcopy or Parameter refuses."""
    modules = list(model.modules())
    hooked = any(
        m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in modules
    )
    params = list(model.parameters())
    if hooked or any(type(p) is not torch.nn.Parameter for p in params):
        return None
    try:
        memo: dict[int, Any] = {
            id(p): torch.nn.Parameter(p.data, requires_grad=p.requires_grad) for p in params
        }
        for m in modules:
            for value in [*m._buffers.values(), *vars(m).values()]:
                if isinstance(value, torch.Tensor) and id(value) not in memo:
                    memo[id(value)] = value  # shared: a cast replaces tensors, never writes them
        return copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 - the put-back path works for what this cannot copy
        return None


def converted_by_compile(
    model: torch.nn.Module, dtype: torch.dtype, device: torch.device
) -> list[str]:
    """Names of the tensors `model.to(device, dtype)` replaces: floating-point ones of another
    dtype (e.g. Llama's fp32 rotary table in an fp16 model) and any tensor on another
    device."""
    return [
        name
        for name, t in named_tensors(model).items()
        if (t.dtype.is_floating_point and t.dtype != dtype) or t.device != device
    ]


def can_put_back(model: torch.nn.Module, converted: list[str]) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    if any(params[n].grad is not None for n in converted if n in params):
        return False  # .to() casts gradients through grad.data: not restorable by reference
    future = torch.__future__
    return not (
        future.get_swap_module_params_on_conversion()
        or future.get_overwrite_module_params_on_conversion()
    )


@contextlib.contextmanager
def tensors_put_back(model: torch.nn.Module) -> Iterator[None]:
    """`model.to(device, dtype)` gives the parameters new tensors (`param.data = cast`) and
    replaces buffers. Keep the original tensors and put them back afterwards: nothing is
    copied but what the cast itself makes, so a model cast for compiling needs its own size
    once more, not twice (as a deep copy would)."""
    params, buffers = [], []
    for m in model.modules():
        params += [(m, n, p, p.data) for n, p in m._parameters.items() if p is not None]
        buffers += [(m, n, b) for n, b in m._buffers.items() if b is not None]
    try:
        yield
    finally:
        for m, name, p, data in params:
            m._parameters[name] = p
            p.data = data
        for m, name, b in buffers:
            m._buffers[name] = b


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and every buffer (non-persistent ones too, e.g. rotary tables: a compile
    folds all of them into the artifact), detached; tied weights under each of their names."""
    found = dict(model.named_parameters(remove_duplicate=False))
    found.update(model.named_buffers(remove_duplicate=False))
    return {name: t.detach() for name, t in found.items()}
