"""aten.layer_norm over the last axis becomes kernl.layer_norm, absorbing a preceding
single-use residual add (the norm kernel reads x and the residual in one pass, so the add costs
no launch even when the linear before it stays on cuBLAS); aten.scaled_dot_product_attention
with a boolean mask, an additive one (LayoutLM's `(1 - mask) * min`) or none becomes
kernl.attention; attentions sharing a boolean mask read one additive bias made once."""

from __future__ import annotations

from kernl.artifacts.program import Instruction, Program

from .graph import arg, ref
from .matcher import Node, Pat, Rewriter, Rule, rewrite_with


def _layer_norm(ctx: Rewriter, ln: Node, add: Node | None = None) -> list[Instruction] | None:
    ins = ln.ins
    x = ref(arg(ins, 0, "input"))
    shape = arg(ins, 1, "normalized_shape")
    w, b = ref(arg(ins, 2, "weight")), ref(arg(ins, 3, "bias"))
    eps = arg(ins, 4, "eps", 1e-5)
    if x is None or w is None or ctx.shape(x) is None or shape != ctx.shape(x)[-1:]:
        return None  # over several axes: stays aten
    args = [{"v": x}, {"v": w}, None if b is None else {"v": b}, eps]
    kwargs = {}
    if add is not None:
        a0, a1 = add.ins.args
        args[0], kwargs["residual"] = a0, a1
    return [Instruction("kernl.layer_norm", args, kwargs, ins.outputs)]


def _residual_add(ctx: Rewriter, n: Node) -> bool:
    """x = a + b of one shape (no alpha, no broadcasting): the norm kernel computes it."""
    ins = n.ins
    if ins.kwargs or len(ins.args) != 2 or any(ref(a) is None for a in ins.args):
        return False
    shapes = [ctx.shape(ref(a)) for a in ins.args]
    dtypes = [ctx.dtype(ref(a)) for a in ins.args]
    return (
        shapes[0] is not None
        and shapes[0] == shapes[1] == ctx.shape(n.vid)
        and (dtypes[0] == dtypes[1] == ctx.dtype(n.vid))
    )


LAYER_NORM_RULES: list[Rule] = [
    (
        Pat(
            "aten.layer_norm.default",
            name="ln",
            src=(Pat("aten.add.Tensor", name="add", one_use=True, where=_residual_add),),
        ),
        _layer_norm,
    ),
    (Pat("aten.layer_norm.default", name="ln"), _layer_norm),
]


def replace_layer_norm(program: Program) -> Program:
    return rewrite_with(program, LAYER_NORM_RULES)


def _attention(ctx: Rewriter, sdpa: Node) -> list[Instruction] | None:
    ins = sdpa.ins
    q, k, v = (arg(ins, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = arg(ins, 3, "attn_mask")
    dropout = arg(ins, 4, "dropout_p", 0.0)
    causal = arg(ins, 5, "is_causal", False)
    scale = arg(ins, 6, "scale")
    gqa = arg(ins, 7, "enable_gqa", False)
    if dropout or gqa:
        return None  # dropout and grouped heads stay with aten
    if mask is not None and ctx.dtype(ref(mask)) not in ("bool", "float16", "bfloat16", "float32"):
        return None  # what SDPA took: a boolean mask, or an additive one
    shapes = [ctx.shape(ref(t)) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes) or shapes[0][1] != shapes[1][1]:
        return None
    if shapes[2][3] != shapes[0][3]:
        return None  # kernl's attention kernels take one head dim for q, k and v
    return [Instruction("kernl.attention", [q, k, v, mask, scale, bool(causal)], {}, ins.outputs)]


ATTENTION_RULES: list[Rule] = [
    (Pat("aten.scaled_dot_product_attention.default", name="sdpa"), _attention),
]


def replace_attention(program: Program) -> Program:
    return rewrite_with(program, ATTENTION_RULES)


def _hoist_mask(ctx: Rewriter, att: Node, mask: Node) -> list[Instruction] | None:
    dtype = ctx.dtype(ref(att.ins.args[0]))
    if dtype is None or ctx.shape(mask.vid) is None:
        return None
    new = Instruction(att.ins.op, list(att.ins.args), dict(att.ins.kwargs), att.ins.outputs)
    bias = ctx.memo.get(("bias", mask.vid, dtype))
    made = []
    if bias is None:  # the first reader of this mask makes the bias, the others reuse it
        bias = ctx.new_value(ctx.shape(mask.vid), dtype)
        ctx.memo["bias", mask.vid, dtype] = bias
        made = [Instruction("kernl.mask_to_bias", [{"v": mask.vid}, {"dtype": dtype}], {}, [bias])]
    new.args[3] = {"v": bias}
    return [*made, new]


HOIST_MASK_RULES: list[Rule] = [
    (
        Pat(
            "kernl.attention",
            name="att",
            src=(None, None, None, Pat(name="mask", where=lambda c, n: c.dtype(n.vid) == "bool")),
        ),
        _hoist_mask,
    ),
]


def hoist_attention_mask(program: Program) -> Program:
    """kernl.attention instructions sharing a boolean mask read one additive bias made once
    (kernl.mask_to_bias) instead of each converting the mask again."""
    return rewrite_with(program, HOIST_MASK_RULES)
