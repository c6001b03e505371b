"""An encoder layer's QKV linear, its split into heads and its attention as one
kernl.qkv_attention (kernels/qkv_attention.py), where the tuner timed the fused kernel faster.

Not a rewrite every program gets: the fused kernel runs one program per (sequence, head), so
it wins only where batch x heads fills the GPU and a sequence fits one block, and by how much
depends on the GPU. compiler/tune_qkv_attention.py finds the groups with
`qkv_attention_groups`, times the fused kernel on the group's real inputs against what the
tuner measured for the two launches, and calls `fuse_qkv_attention` on the ones it won.

A group is, exactly (anything else is left alone):
    y = kernl.linear(x [B, L, C], W [3C, C] weight, b [3C] weight), no activation or residual
    q, k, v = aten.split_with_sizes(y, [C, C, C], -1)
    each: aten.view(., [B, L, H or -1, D]) -> aten.transpose(., 1, 2) -> kernl.attention
    o = kernl.attention(q, k, v, bias [B, 1, 1, L] float or none, scale, causal=False)
where each intermediate value has that one reader and nothing else, and the program's
outputs hold none of them."""

from __future__ import annotations

from dataclasses import dataclass

from kernl.artifacts.program import Instruction, Program
from kernl.kernels.qkv_attention import MAX_SEQ

from .graph import ProgramView, drop_dead, reads, ref


@dataclass(frozen=True)
class QKVAttentionGroup:
    linear: Instruction
    attention: Instruction
    num_heads: int

    def fused(self, impl: str, config: list | None) -> Instruction:
        x, w, b = self.linear.args
        mask, scale = self.attention.args[3], self.attention.args[4]
        args = [x, w, b, mask, scale, self.num_heads]
        return Instruction(
            "kernl.qkv_attention", args, {"impl": impl, "config": config}, self.attention.outputs
        )


def qkv_attention_groups(program: Program) -> list[QKVAttentionGroup]:
    """The groups of `program` the fused kernel can take, in program order."""
    view = ProgramView(program)
    uses = view.use_counts()
    readers: dict[int, list[Instruction]] = {}
    for ins in program.instructions:
        for vid in set(reads(ins)):
            readers.setdefault(vid, []).append(ins)

    def only_reader(vid: int | None) -> Instruction | None:
        if vid is None or uses[vid] != 1 or vid in program.outputs:
            return None
        found = readers.get(vid, [])
        return found[0] if len(found) == 1 else None

    groups = []
    for lin in program.instructions:
        group = _group_at(lin, view, only_reader)
        if group is not None:
            groups.append(group)
    return groups


def _group_at(lin: Instruction, view: ProgramView, only_reader) -> QKVAttentionGroup | None:
    if lin.op != "kernl.linear" or len(lin.args) != 3 or len(lin.outputs) != 1:
        return None
    if lin.kwargs.get("activation", "none") != "none" or lin.kwargs.get("residual") is not None:
        return None
    x, w, b = (ref(a) for a in lin.args)
    if not (view.is_weight(w) and view.is_weight(b)):
        return None
    x_shape, w_shape = view.shape(x), view.shape(w)
    if x_shape is None or len(x_shape) != 3 or w_shape is None:
        return None
    B, L, C = x_shape
    if w_shape != [3 * C, C] or L > MAX_SEQ:
        return None
    split = only_reader(lin.outputs[0])
    if split is None or split.op != "aten.split_with_sizes.default" or split.kwargs:
        return None
    if split.args[1:] not in ([[C, C, C], -1], [[C, C, C], 2]) or len(split.outputs) != 3:
        return None
    heads = []
    attention = None
    for part in split.outputs:
        reshape = only_reader(part)
        if reshape is None or reshape.op != "aten.view.default" or reshape.kwargs:
            return None
        shape = reshape.args[1]
        if not (isinstance(shape, list) and len(shape) == 4 and shape[:2] == [B, L]):
            return None
        D = shape[3]
        if not isinstance(D, int) or D <= 0 or C % D or shape[2] not in (-1, C // D):
            return None
        heads.append(C // D)
        transpose = only_reader(reshape.outputs[0])
        if transpose is None or transpose.op != "aten.transpose.int" or transpose.kwargs:
            return None
        if transpose.args[1:] not in ([1, 2], [2, 1]):
            return None
        reader = only_reader(transpose.outputs[0])
        if reader is None or reader.op != "kernl.attention":
            return None
        if attention is not None and reader is not attention:
            return None
        attention = reader
        if ref(attention.args[len(heads) - 1]) != transpose.outputs[0]:
            return None  # q, k and v in their order, as the attention's first three arguments
    num_heads = heads[0]
    D = C // num_heads
    if len(set(heads)) != 1 or D < 16 or D & (D - 1):
        return None
    args = attention.args
    if len(args) != 6 or args[5] is not False or attention.kwargs.get("causal"):
        return None
    if attention.kwargs.get("window") is not None:  # the fused kernel has no sliding window
        return None
    mask = ref(args[3])
    if args[3] is not None:
        if mask is None or view.shape(mask) != [B, 1, 1, L]:
            return None
        if view.dtype(mask) not in ("float16", "bfloat16", "float32"):
            return None
    if args[4] is not None and not isinstance(args[4], (int, float)):
        return None
    if view.dtype(x) not in ("float16", "bfloat16", "float32"):
        return None
    return QKVAttentionGroup(lin, attention, num_heads)


def fuse_qkv_attention(
    program: Program, chosen: list[tuple[QKVAttentionGroup, str, list | None]]
) -> Program:
    """Each chosen group (with the fused op's impl and encoded config) becomes one
    kernl.qkv_attention where its attention was (its mask is made by then); the linear, the
    split and the head views go. In place; returns `program`."""
    if not chosen:
        return program
    replace = {id(g.attention): g.fused(impl, config) for g, impl, config in chosen}
    gone = {id(g.linear) for g, _, _ in chosen}
    program.instructions = [
        replace.get(id(ins), ins) for ins in program.instructions if id(ins) not in gone
    ]
    return drop_dead(program)
