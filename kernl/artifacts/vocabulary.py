"""The closed vocabulary of op names a program may use: the format owns the list, the runtime
maps each name to a callable (kernl/runtime/vocabulary.py).

A name is "aten.<op>.<overload>" for an op in ATEN_OPS whose overload exists in the installed
torch, or "kernl.<op>" for an op in KERNL_OPS. Extending either set is a deliberate act (a
reviewed change), never something an artifact can ask for. Owning the list here means the
reader's op check cannot be skipped: it no longer depends on importing the runtime."""

from __future__ import annotations

import re

# Pure tensor computations that exported transformer graphs use.
ATEN_OPS = frozenset(
    """
    abs add addmm alias all any arange argmax argmin as_strided baddbmm bitwise_and
    bitwise_not bitwise_or bitwise_xor bmm cat chunk clamp clamp_max clamp_min clip clone
    contiguous conv1d copy cos cumsum detach div embedding empty empty_like eq erf exp expand
    expand_as fill fill_ flatten floor full full_like gather ge gelu gt index index_select
    isinf isnan layer_norm le leaky_relu lift_fresh_copy linear log log_softmax logical_and
    logical_not logical_or lt masked_fill matmul max maximum mean min minimum mm mul
    native_layer_norm ne neg new_ones new_zeros new_full new_empty ones ones_like permute pow
    reciprocal relu remainder repeat reshape rsqrt scalar_tensor scaled_dot_product_attention
    select sigmoid silu sin slice softmax split split_with_sizes sqrt squeeze stack sub sum
    t tanh to transpose tril triu type_as unbind unflatten unsqueeze unsafe_split view where
    zeros zeros_like __and__ __or__ __xor__ __invert__ _to_copy _softmax _log_softmax
    _unsafe_view rsub bitwise_left_shift bitwise_right_shift sort topk hardtanh mish
    pad
    """.split()
)

# kernl's own ops (kernl/runtime/kernl_ops.py implements them; kernl/artifacts/analysis.py
# knows their shapes, so a program using one is checked like any aten op).
KERNL_OPS = frozenset(
    {"linear", "layer_norm", "attention", "qkv_attention", "mask_to_bias", "bert_embeddings"}
    | {"rotary", "gated_linear"}
)

ATEN_NAME = re.compile(r"aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
KERNL_NAME = re.compile(r"kernl\.([A-Za-z_][A-Za-z0-9_]*)")


def split_aten(name: str) -> tuple[str, str] | None:
    """(op, overload) of an aten op name, or None. fullmatch: "aten.add.Tensor\\n" is no name."""
    m = ATEN_NAME.fullmatch(name) if isinstance(name, str) else None
    return (m.group(1), m.group(2)) if m else None


def is_allowed_op(name: str) -> bool:
    """Whether `name` is in the vocabulary and, for aten, names an overload this torch has."""
    if not isinstance(name, str):
        return False
    m = KERNL_NAME.fullmatch(name)
    if m:
        return m.group(1) in KERNL_OPS
    parts = split_aten(name)
    if parts is None or parts[0] not in ATEN_OPS:
        return False
    import torch  # the installed torch decides which overloads exist

    return parts[1] in getattr(torch.ops.aten, parts[0]).overloads()


def is_in_place(name: str) -> bool:
    """aten ops that write their first argument: `fill_`, `copy_`, ... (not `__and__`)."""
    parts = split_aten(name)
    return parts is not None and parts[0].endswith("_") and not parts[0].startswith("__")


def written_arguments(name: str, args: list, kwargs: dict) -> list:
    """The arguments an instruction writes (encoded or decoded alike): an in-place op's first
    (`fill_`), `out=`, and any its schema marks as written (`max.dim_max`'s `max=` and
    `max_values=`, `sort.values`' `values=`). The schema is the installed torch's."""
    written = [args[0]] if is_in_place(name) and args else []
    if "out" in kwargs:
        written.append(kwargs["out"])
    parts = split_aten(name)
    if parts is None or parts[0] not in ATEN_OPS:
        return written
    import torch

    try:
        schema = getattr(getattr(torch.ops.aten, parts[0]), parts[1])._schema
    except AttributeError:  # no such overload: the reader's op check refuses it
        return written
    for i, a in enumerate(schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write or a.name == "out":
            continue
        given = args[i] if i < len(args) and not a.kwarg_only else kwargs.get(a.name)
        if given is not None and not (i == 0 and is_in_place(name)):
            written.append(given)
    return written
