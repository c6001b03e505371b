"""transformers' rotary position embedding, `x * cos + rotate_half(x) * sin` with
rotate_half(x) = cat(-x[..., h:], x[..., :h]), becomes kernl.rotary: one launch per tensor
where eager's trace runs about seven (ModernBERT, NomicBERT, ESM). A cast of the result goes
into the op's output dtype: ModernBERT computes in float32 and casts back to the model's.

The op computes in float32. Where the traced arithmetic is float32 (x cast up, or cos and sin
float32) that is the same arithmetic; where all of it is fp16 or bf16, the op rounds once
instead of after each of the four steps. Casts of x are followed only where they widen (or
change nothing): rotating a narrowed x is not rotating x."""

from __future__ import annotations

from kernl.artifacts.program import Instruction, Program

from .graph import arg, ref
from .matcher import Node, Pat, Rewriter, Rule, rewrite_with

_CASTS = ("aten.to.dtype", "aten._to_copy.default")
_FLOATS = ("float16", "bfloat16", "float32")
_END = 2**63 - 1  # slice's "to the end"


def _cast_to(ins: Instruction) -> str | None:
    """The dtype a plain cast (no copy=, no device, no layout) converts to, else None."""
    if ins.op == "aten.to.dtype":
        to = arg(ins, 1, "dtype")
        if len(ins.args) > 2 or set(ins.kwargs) - {"dtype"}:
            return None
    elif ins.op == "aten._to_copy.default":
        to = ins.kwargs.get("dtype")
        if len(ins.args) > 1 or set(ins.kwargs) - {"dtype"}:
            return None
    else:
        return None
    return to.get("dtype") if isinstance(to, dict) else None


def _widening(src: str | None, dst: str | None) -> bool:
    return src in _FLOATS and (dst == src or dst == "float32")


def _below_casts(ctx: Rewriter, vid: int | None, consumed: list[Node]) -> int | None:
    """The value `vid` is a widening cast (or a chain of them) of."""
    while vid is not None:
        node = ctx.node(vid)
        if node.ins is None or node.ins.op not in _CASTS:
            return vid
        below = ref(node.ins.args[0])
        if not _widening(ctx.dtype(below), _cast_to(node.ins)):
            return vid
        consumed.append(node)
        vid = below
    return None


def _half_slice(ctx: Rewriter, vid: int | None, x_rank: int, start: int, end: int):
    """(the sliced value, node) for `x[..., start:end]` on the last axis, else None."""
    node = ctx.node(vid)
    ins = node.ins
    if ins is None or ins.op != "aten.slice.Tensor" or ins.kwargs or len(ins.args) not in (4, 5):
        return None
    dim, lo, hi = ins.args[1:4]
    step = ins.args[4] if len(ins.args) == 5 else 1
    if dim not in (-1, x_rank - 1) or lo != start or step != 1:
        return None
    if not (hi == end or (end == _END and isinstance(hi, int) and hi >= 2 * start)):
        return None
    return ref(ins.args[0]), node


def _rotated(ctx: Rewriter, cat: Node, consumed: list[Node]) -> int | None:
    """x where `cat` is cat(-x[..., h:], x[..., :h]) on the last axis, h half of x's."""
    ins = cat.ins
    if ins is None or ins.op != "aten.cat.default" or ins.kwargs:
        return None
    parts = ins.args[0]
    if not isinstance(parts, list) or len(parts) != 2:
        return None
    neg = ctx.node(ref(parts[0]))
    if neg.ins is None or neg.ins.op != "aten.neg.default" or len(neg.ins.args) != 1:
        return None
    shape = ctx.shape(cat.vid)
    if not shape or shape[-1] % 2 or len(ins.args) != 2 or ins.args[1] not in (-1, len(shape) - 1):
        return None  # (cat's default axis is 0)
    h = shape[-1] // 2
    upper = _half_slice(ctx, ref(neg.ins.args[0]), len(shape), h, _END)
    lower = _half_slice(ctx, ref(parts[1]), len(shape), 0, h)
    if upper is None or lower is None or upper[0] != lower[0]:
        return None
    consumed += [cat, neg, upper[1], lower[1]]
    return upper[0]


def _split_mul(mul: Node) -> list[tuple[int, int]] | None:
    """The two readings (x, table) of `x * table`, either order."""
    a, b = (ref(v) for v in mul.ins.args[:2])
    if mul.ins.kwargs or len(mul.ins.args) != 2 or a is None or b is None:
        return None
    return [(a, b), (b, a)]


def _to_rotary(ctx: Rewriter, add: Node, m1: Node, m2: Node) -> list[Instruction] | None:
    if add.ins.kwargs or len(add.ins.args) != 2:
        return None  # alpha= scales one term
    out_dtype = ctx.dtype(add.vid)
    out_shape = ctx.shape(add.vid)
    if out_dtype not in _FLOATS or not out_shape or not 1 <= len(out_shape) <= 4:
        return None
    for plain, turned in ((m1, m2), (m2, m1)):
        for cat_vid, sin in _split_mul(turned) or []:
            consumed: list[Node] = []
            y = _rotated(ctx, ctx.node(cat_vid), consumed)
            if y is None:
                continue
            x = _below_casts(ctx, y, consumed)
            for xv, cos in _split_mul(plain) or []:
                used = list(consumed)
                if _below_casts(ctx, xv, used) != x:
                    continue
                if not _fits(ctx, x, cos, sin, out_shape):
                    continue
                if not all(ctx.consume(n) for n in used):
                    return None
                return [
                    Instruction(
                        "kernl.rotary",
                        [{"v": x}, {"v": cos}, {"v": sin}, {"dtype": out_dtype}],
                        {},
                        add.ins.outputs,
                    )
                ]
    return None


def _fits(ctx: Rewriter, x: int, cos: int, sin: int, out_shape: list[int]) -> bool:
    """x has the result's shape and a float dtype; cos and sin are float and broadcast to it
    without widening it (the op's result has x's shape)."""
    if ctx.shape(x) != out_shape or ctx.dtype(x) not in _FLOATS:
        return False
    for t in (cos, sin):
        shape = ctx.shape(t)
        if shape is None or ctx.dtype(t) not in _FLOATS or len(shape) > len(out_shape):
            return False
        for have, want in zip(reversed(shape), reversed(out_shape), strict=False):
            if have not in (1, want):
                return False
    return True


def _absorb_cast(ctx: Rewriter, cast: Node, rot: Node) -> list[Instruction] | None:
    to = _cast_to(cast.ins)
    if to not in _FLOATS:
        return None
    args = [*rot.ins.args[:3], {"dtype": to}]
    return [Instruction("kernl.rotary", args, {}, cast.ins.outputs)]


_MUL = dict(op="aten.mul.Tensor", one_use=True)
RULES: list[Rule] = [
    (Pat("aten.add.Tensor", name="add", src=(Pat(**_MUL, name="m1"), Pat(**_MUL, name="m2"))), _to_rotary),
    (Pat(_CASTS, name="cast", src=(Pat("kernl.rotary", name="rot", one_use=True),)), _absorb_cast),
]  # fmt: skip


def fuse_rotary(program: Program) -> Program:
    """Every `x * cos + rotate_half(x) * sin` becomes kernl.rotary, a cast after it its
    output dtype."""
    return rewrite_with(program, RULES)
