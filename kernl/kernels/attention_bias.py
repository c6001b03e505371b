"""An additive attention bias in the log2 domain that the attention kernels' exp2 works in.

Hugging Face's eager masks fill masked keys with finfo(dtype).min. In float32 and bfloat16,
that times log2(e) overflows to -inf: a row whose keys are all masked (an attention_mask row
of zeros) then had no visible key, and the kernels wrote zeros where eager, adding the same
finite minimum to every score, averages v over all keys. Here a finite bias stays finite
(clamped at -2e38, still far below any score, and below it every key weighs nothing beside a
visible one), and -inf (kernl.mask_to_bias's masked keys) stays -inf."""

from __future__ import annotations

from .jit import jit, tl


@jit
def log2_bias(bias):
    b = bias.to(tl.float32)
    # -2e38, the lowest finite bias kept: times log2(e) it is -2.9e38, within float32's -3.4e38
    return tl.where(b == float("-inf"), b, tl.maximum(b, -2.0e38)) * 1.4426950408889634
