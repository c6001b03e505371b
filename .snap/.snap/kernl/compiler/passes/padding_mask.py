"""An encoder's padding mask, built the short way.

transformers builds a bidirectional model's boolean attention mask [B, 1, Lq, Lk] from the
`attention_mask` input [B, Lk] with a dozen small ops (aranges, unsqueezes, a comparison, an
index, two ands, an expand). Each is a kernel launch per call before the first layer: BERT-base
spends 13 of its 102 launches there, at a few microseconds each whatever the bucket.

When that mask is `attention_mask[b, k] != 0` broadcast over heads and queries, the bias the
attention layers read (kernl.mask_to_bias, hoist_attention_mask) is made from `attention_mask
!= 0` viewed as [B, 1, 1, Lk] instead: one comparison, and a bias Lq times smaller that the
attention kernels read broadcast over the queries.

The rewrite touches code kernl did not write, so it is proved before it is made:
- the mask's cone (every instruction it depends on) reads one model input and constants, no
  weight and no other input, through ops of a short list;
- the cone runs on the CPU, on the bucket's shape, for masks that cover what callers send
  (all ones, right and left padding, holes, an empty row, a value other than 0 and 1), and
  must give exactly the broadcast mask for each;
- every reader of the bias is a kernl.attention, which takes any bias broadcastable to
  [B, H, Lq, Lk].
Anything else leaves the program as it was."""

from __future__ import annotations

import torch

from kernl.artifacts.program import Instruction, Program, iter_value_refs

from .graph import ProgramView, drop_dead, reads, ref

# What transformers' mask construction uses (masking_utils: sdpa_mask and its and/or
# functions), and nothing that reads memory it was not given.
_CONE_OPS = frozenset(
    f"aten.{name}"
    for name in (
        "to.device to.dtype to.dtype_layout _to_copy.default arange.default arange.start "
        "arange.start_step add.Tensor add.Scalar sub.Tensor sub.Scalar unsqueeze.default "
        "view.default reshape.default expand.default slice.Tensor select.int "
        "new_ones.default ones.default ones_like.default ge.Scalar gt.Scalar le.Scalar "
        "lt.Scalar ge.Tensor gt.Tensor le.Tensor lt.Tensor eq.Scalar ne.Scalar eq.Tensor "
        "ne.Tensor __and__.Tensor __or__.Tensor bitwise_and.Tensor bitwise_or.Tensor "
        "bitwise_not.default logical_and.default logical_or.default logical_not.default "
        "index.Tensor"
    ).split()
)


def _cone(program: Program, producers: dict[int, int], vid: int) -> tuple[list[int], int] | None:
    """The instructions `vid` depends on (indices, in program order) and the one model input
    they read, or None when they read a weight, more than one input, or an op outside
    _CONE_OPS."""
    inputs = set(program.inputs.values())
    seen: set[int] = set()
    read: set[int] = set()
    stack = [vid]
    while stack:
        v = stack.pop()
        if v in program.weights:
            return None
        if v in inputs:
            read.add(v)
            continue
        i = producers.get(v)
        if i is None:
            return None
        if i in seen:
            continue
        ins = program.instructions[i]
        if ins.op not in _CONE_OPS:
            return None
        seen.add(i)
        stack.extend(reads(ins))
    return (sorted(seen), read.pop()) if len(read) == 1 else None


def _reads_as_mask(vid: int):
    """Whether an instruction is a kernl.attention that reads `vid` as its mask and only so."""

    def reads(ins: Instruction) -> bool:
        slots = [i for i, a in enumerate(ins.args) if ref(a) == vid]
        in_kwargs = vid in iter_value_refs(list(ins.kwargs.values()))
        return ins.op == "kernl.attention" and slots == [3] and not in_kwargs

    return reads


def _test_masks(batch: int, seq: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    cols = torch.arange(seq)[None, :]
    right = cols < lengths[:, None]
    left = cols >= (seq - lengths)[:, None]
    holes = torch.rand(batch, seq, generator=g) < 0.7
    empty = right.clone()
    empty[0] = False
    masks = [torch.ones(batch, seq, dtype=torch.bool), right, left, holes, empty]
    masks = [m.to(dtype) for m in masks]
    if dtype != torch.bool:
        masks.append(right.to(dtype) * 2)  # a "keep" other than 1
    return masks


def _computes_padding_mask(
    program: Program, view: ProgramView, cone: list[int], input_vid: int, mask_vid: int
) -> bool:
    """Whether the cone gives `input != 0` broadcast to the mask's shape for each test mask,
    run by the runtime's executor on the CPU."""
    from kernl.runtime.executor import Executor
    from kernl.runtime.vocabulary import DTYPES

    shape, dtype, out_shape = view.shape(input_vid), view.dtype(input_vid), view.shape(mask_vid)
    if shape is None or len(shape) != 2 or dtype not in DTYPES or out_shape is None:
        return False
    if len(out_shape) != 4 or out_shape[0] != shape[0] or out_shape[3] != shape[1]:
        return False
    (name,) = [n for n, v in program.inputs.items() if v == input_vid]
    sub = Program(
        bucket=program.bucket,
        num_values=program.num_values,
        inputs={name: input_vid},
        weights={},
        outputs=[mask_vid],
        instructions=[program.instructions[i] for i in cone],
    )
    try:
        run = Executor(sub, {}, torch.device("cpu"))
        for m in _test_masks(shape[0], shape[1], DTYPES[dtype]):
            (got,) = run.run({name: m})
            want = (m != 0)[:, None, None, :].expand(out_shape)
            if got.dtype != torch.bool or list(got.shape) != out_shape:
                return False
            if not torch.equal(got, want):
                return False
    except Exception:  # a cone that does not run on the CPU is not proved
        return False
    return True


def shorten_padding_mask(program: Program) -> Program:
    """kernl.mask_to_bias reads `attention_mask != 0` as [B, 1, 1, Lk] where the boolean mask
    it read is proved to be exactly that, broadcast; the cone that built it goes."""
    view = ProgramView(program)
    for ins in [i for i in program.instructions if i.op == "kernl.mask_to_bias"]:
        mask_vid, bias_vid = ref(ins.args[0]), ins.outputs[0]
        readers = [i for i in program.instructions if bias_vid in reads(i)]
        if mask_vid is None or not readers or not all(map(_reads_as_mask(bias_vid), readers)):
            continue
        found = _cone(program, view.producers(), mask_vid)
        if found is None or not _computes_padding_mask(program, view, *found, mask_vid):
            continue
        cone, input_vid = found
        batch, seq = view.shape(input_vid)
        keep = view.new_value([batch, seq], "bool")
        keep3 = view.new_value([batch, 1, seq], "bool")
        keep4 = view.new_value([batch, 1, 1, seq], "bool")
        bias = view.new_value([batch, 1, 1, seq], view.dtype(bias_vid))
        made = [
            Instruction("aten.ne.Scalar", [{"v": input_vid}, 0], {}, [keep]),
            Instruction("aten.unsqueeze.default", [{"v": keep}, 1], {}, [keep3]),
            Instruction("aten.unsqueeze.default", [{"v": keep3}, 2], {}, [keep4]),
            Instruction(ins.op, [{"v": keep4}, *ins.args[1:]], dict(ins.kwargs), [bias]),
        ]
        for r in readers:
            r.args = [{"v": bias} if ref(a) == bias_vid else a for a in r.args]
        at = program.instructions.index(ins)
        program.instructions[at : at + 1] = made
        drop_dead(program)  # the old cone, unless something else reads part of it
    return view.commit()
