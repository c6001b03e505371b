"""A sliding-window mask becomes kernl.attention's `window`: the kernel then loads only the key
blocks within the window of each query block, and the mask left is the padding alone.

ModernBERT's local layers (two in three) attend where `|i - j| <= local_attention // 2` and the
key is no padding. Traced, that is a band `abs(q_idx - kv_idx) <= w` and-ed with the padding
gathered to [B, 1, 1, L], expanded to [B, 1, L, L] and made an additive bias: every layer then
reads a [B, L, L] float bias and attends to every key, a 64x waste at 8192 tokens and a window
of 128. The band depends on no input: this pass computes it (fold_constants.constant_value,
at any length: it is not stored) and takes it for a window only where it is exactly one.

    bias = kernl.mask_to_bias(expand(__and__(band, padding)))     (or the mask without the bias)
    o = kernl.attention(q, k, v, bias, scale, False)
  ->
    bias = kernl.mask_to_bias(padding)                             [B, 1, 1, L]: per key
    o = kernl.attention(q, k, v, bias, scale, False; window=w)

Every reader of the mask must be such an attention (non-causal, Lq x Lk the band's shape), or
nothing changes."""

from __future__ import annotations

import torch

from kernl.artifacts.program import Instruction, Program

from .fold_constants import constant_value
from .graph import ProgramView, drop_dead, reads, ref


def band_width(band: torch.Tensor) -> int | None:
    """w where `band` (bool, [..., Lq, Lk], leading dims 1) is exactly |i - j| <= w; else None."""
    if band.dtype != torch.bool or band.dim() < 2 or any(n != 1 for n in band.shape[:-2]):
        return None
    rows, cols = band.shape[-2:]
    if rows < 1 or cols < 1:
        return None
    plane = band.reshape(rows, cols).cpu()
    w = int(plane[0].sum()) - 1  # row 0 sees keys 0..w
    if w < 0:
        return None
    i = torch.arange(rows)[:, None]
    j = torch.arange(cols)[None, :]
    return w if torch.equal(plane, (j - i).abs() <= w) else None


def use_attention_windows(
    program: Program, weights: dict[str, torch.Tensor], device: torch.device
) -> Program:
    view = ProgramView(program)
    producer = view.producers()
    ins_of = program.instructions
    readers: dict[int, list[Instruction]] = {}
    for ins in ins_of:
        for v in set(reads(ins)):
            readers.setdefault(v, []).append(ins)

    def made_by(vid: int | None, op: str) -> Instruction | None:
        i = producer.get(vid) if vid is not None else None
        return ins_of[i] if i is not None and ins_of[i].op == op else None

    inserts: list[tuple[Instruction, Instruction]] = []  # (after this, the new instruction)
    for ins in ins_of:
        bias = ins if ins.op == "kernl.mask_to_bias" else None
        mask = ref(ins.args[0]) if bias is not None and ins.args else None
        if bias is None:
            continue
        expand = made_by(mask, "aten.expand.default")
        both = made_by(ref(expand.args[0]) if expand else mask, "aten.__and__.Tensor")
        if both is None or len(both.args) != 2:
            continue
        window = None
        for band_arg, padding_arg in (both.args, both.args[::-1]):
            band, padding = ref(band_arg), ref(padding_arg)
            if band is None or padding is None or view.dtype(padding) != "bool":
                continue
            if view.dtype(band) != "bool" or (view.shape(band) or [0])[:-2] != [1, 1]:
                continue  # [1, 1, Lq, Lk] only: a band per batch row or head is no window
            value = constant_value(program, weights, device, band)
            window = None if value is None else band_width(value)
            if window is not None:
                break
        if window is None:
            continue
        shape = view.shape(band)
        out = bias.outputs[0]
        users = readers.get(out, [])
        if window is None or not users or out in program.outputs:
            continue
        if not all(_windowable(u, out, shape, view) for u in users):
            continue
        narrow = view.new_value(view.shape(padding), view.dtype(out))
        # right after the `and`: what it read of the padding, not what a later write left
        inserts.append(
            (
                both,
                Instruction(bias.op, [{"v": padding}, *bias.args[1:]], dict(bias.kwargs), [narrow]),
            )
        )
        for u in users:
            u.args[3] = {"v": narrow}
            u.kwargs["window"] = window
    for after, new in inserts:
        ins_of.insert(next(i for i, x in enumerate(ins_of) if x is after) + 1, new)
    return drop_dead(view.commit())


def _windowable(ins: Instruction, mask: int, band_shape: list[int] | None, view: ProgramView):
    """A non-causal kernl.attention reading `mask` as its mask only, Lq x Lk the band's."""
    if ins.op != "kernl.attention" or len(ins.args) < 4 or ref(ins.args[3]) != mask:
        return False
    if reads(ins).count(mask) != 1 or ins.kwargs.get("window") is not None:
        return False
    causal = ins.args[5] if len(ins.args) > 5 else ins.kwargs.get("causal", False)
    q, k = view.shape(ref(ins.args[0])), view.shape(ref(ins.args[1]))
    if causal is not False or q is None or k is None or band_shape is None:
        return False
    return [q[-2], k[-2]] == band_shape[-2:]
