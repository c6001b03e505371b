"""Check a causal-LM artifact's generation against the eager Hugging Face model, step by step.

For every (batch, prompt) bucket kernl generates from random prompts of ragged lengths (row 0
fills the bucket) with no EOS, keeping each step's logits. The eager model then reads the
same sequence (prompt + generated ids, teacher-forced, with Hugging Face's own left-padding
mask and position ids) in one forward, and the logits at each generated position are
compared. The shortest prompt bucket of each batch goes through the whole cache, so every
decode (kv length) bucket a step can reach is checked too; one no step reaches (a kv length
no longer than every prompt bucket, which only the cache size itself can be) keeps no error
figure (None), never a 0 that reads as a perfect match."""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kernl.runtime.generation import GenerativeModel

from ...plural import count
from ...validate import COMPARE_CHUNK, FLOAT32_SLACK, ValidationError, no_look_reason

# Long runs compare at most this many steps (all kv-bucket boundaries included), so a
# 2048-slot cache does not need 2048 x vocab logits kept on both sides.
MAX_COMPARED_STEPS = 96


@dataclass
class StageError:
    stage: str  # "prefill" or "decode"
    batch: int
    size: int  # prompt length (prefill) or kv length (decode)
    max_abs_error: float | None = None  # None: no step compared (not validated)
    reference_scale: float | None = None
    steps: int = 0
    # set where some step was beyond the tolerance against eager in the model's dtype and
    # kernl was as close to eager in float32 as eager in that dtype is (`no_less_accurate`)
    against_float32: str | None = None


# Generation's float32 look compares the whole run: the root mean square of kernl's error
# against eager float32 may be FLOAT32_SLACK times eager bf16's; and each row's largest error
# at each step may be STEP_SLACK times eager's at that row and step plus eager's median one
# (a bug confined to one row and one step shows there, not in run-wide figures). On the CPU,
# tiny random models with every decode piece on torch (the same ops as eager) gave rms ratios
# of 0.96-1.06 and per-step ratios up to 1.8 over 48 steps; a logit of one row at one step
# moved by twice eager's largest error gave 3-7 (2026-12-06).
STEP_SLACK = 3.0


def no_less_accurate(ours: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor) -> str | None:
    """kernl's logits (`ours`) and eager's in the model's reduced dtype (`eager`), both against
    eager in float32 (`exact`), all [..., vocab] (each row of a step): a summary where kernl
    is no less accurate than eager (FLOAT32_SLACK on the rms error, STEP_SLACK on each row's
    largest at each step), else None."""
    vocab = exact.shape[-1]
    flat = [t.reshape(-1, vocab) for t in (ours, eager, exact)]
    squares, tops = [0.0, 0.0], [[], []]
    # rows a slice: whole float64 copies of [B, steps, V] were 17 GB at Gemma2's 256k, batch 16
    step = max(1, COMPARE_CHUNK // vocab)  # as the encoders' outputs (compiler/validate.py)
    for start in range(0, flat[2].shape[0], step):
        ref = flat[2][start : start + step].double()
        for i in (0, 1):
            err = (flat[i][start : start + step].double() - ref).abs()
            if not torch.isfinite(err).all():
                return None
            squares[i] += float(err.pow(2).sum())
            tops[i].append(err.amax(-1))
    rms = [math.sqrt(x / exact.numel()) for x in squares]
    ours_top, eager_top = torch.cat(tops[0]), torch.cat(tops[1])
    bound = STEP_SLACK * (eager_top + eager_top.median())
    worst = int((ours_top / bound.clamp_min(1e-30)).argmax())
    if not (rms[0] <= FLOAT32_SLACK * rms[1] and ours_top[worst] <= bound[worst]):
        return None
    return (
        f"rms error from float32: kernl {rms[0]:.3g}, eager {rms[1]:.3g}; a row's largest at "
        f"a step: kernl {float(ours_top.max()):.3g}, eager {float(eager_top.max()):.3g}"
    )


class _Float32Reference:
    """Eager logits in float32 (`float32_module_by_module`); None where they cannot be made
    (memory, a model whose tensors the swap does not reach) or are not finite, and the
    validation then refuses as without them."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.failed = ""  # why no float32 logits can be made: no look for any bucket
        self.why_not = ""  # why the latest call gave no logits, for the refusal to say

    def logits(self, seqs, valid, positions) -> torch.Tensor | None:
        if self.failed:
            self.why_not = self.failed
            return None
        try:
            with float32_module_by_module(self.model):
                exact = reference_logits(self.model, seqs, valid, positions).cpu()
        except Exception as e:  # noqa: BLE001 - memory, a mixed-dtype op: no look
            self.failed = self.why_not = no_look_reason(e)
            return None
        if not torch.isfinite(exact).all():  # this bucket's only: the next one may compare
            self.why_not = "eager float32's logits are not finite"
            return None
        return exact


@contextmanager
def float32_module_by_module(model: torch.nn.Module):
    """Within: each module of `model` runs on float32 copies of its own floating parameters
    and buffers, made as it is called and dropped as it returns. The model computes what a
    float32 copy of it computes (tests/generation/test_validation_float32.py compares the
    two) while holding one module's float32 tensors at a time: a float32 deep copy of an
    8B model was 30 GB, and the compile peaked 55 GB above the model (H100, 2026-12-06).
    The model's own tensors are not touched: a module's slots point at the copies during
    its call and at its own tensors again after it, whatever happens. Nothing else may run
    the model meanwhile (the compile holds it)."""
    calls: dict[torch.nn.Module, list[list[tuple]]] = {}

    def widen(module, args):
        saved: list[tuple] = []
        calls.setdefault(module, []).append(saved)  # before any swap: a copy that fails
        for table in (module._parameters, module._buffers):  # (memory) leaves all restorable
            for name, t in list(table.items()):
                if t is None or not t.is_floating_point() or t.dtype == torch.float32:
                    continue
                wide = t.detach().float()
                if isinstance(t, torch.nn.Parameter):
                    wide = torch.nn.Parameter(wide, requires_grad=False)
                saved.append((table, name, t))
                table[name] = wide

    def narrow(module, args, output=None):
        for table, name, t in calls[module].pop():
            table[name] = t

    hooks = []
    try:
        for module in model.modules():
            # first among the module's pre-hooks: the user's own see float32 tensors too
            hooks.append(module.register_forward_pre_hook(widen, prepend=True))
            hooks.append(module.register_forward_hook(narrow, always_call=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for saved_calls in calls.values():  # calls an exception cut short
            while saved_calls:
                for table, name, t in saved_calls.pop():
                    table[name] = t


def drops_attention_softcap(model: torch.nn.Module) -> bool:
    """Whether Hugging Face runs `model` through an attention that ignores its
    attn_logit_softcapping: SDPA has no softcap argument, and transformers 5.17 sends Gemma2
    there by default (later versions refuse SDPA for it). The checkpoint was trained with the
    softcap, so kernl keeps it and is checked against the eager attention, which applies it."""
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    return (
        getattr(config, "attn_logit_softcapping", None) is not None
        and isinstance(implementation, str)
        and "sdpa" in implementation
    )


@contextmanager
def softcapped_attention(model: torch.nn.Module):
    """Within: `model` runs its eager attention where its own would drop the softcap
    (`drops_attention_softcap`); its setting is restored after, whatever happens."""
    if not drops_attention_softcap(model):
        yield
        return
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


# The eager reference reads a prompt bucket plus the whole cache in one forward; Hugging Face's
# eager attention (Gemma2's softcap) holds float32 scores [rows, heads, L, L]: 16 GiB for 8
# rows of 8 heads at 8192 tokens, which ran a Gemma2 compile out of memory on an 80 GB GPU
# (2026-12-06). The rows go through in passes whose scores fit this budget.
REFERENCE_SCORE_BYTES = 1 << 30


def reference_rows_per_pass(model: torch.nn.Module, length: int, budget: int) -> int:
    """How many rows of `length` tokens one reference forward takes: those whose eager
    attention scores (float32, every head) fit `budget` bytes, at least one."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
    return max(1, budget // (int(heads) * length * length * 4))


def reference_logits(
    model: torch.nn.Module,
    seqs: torch.Tensor,
    valid: torch.Tensor,
    keep: list[int],
    score_bytes: int = REFERENCE_SCORE_BYTES,
) -> torch.Tensor:
    """Eager logits [B, len(keep), V] (float32) at positions `keep` of left-padded `seqs`,
    with the position ids Hugging Face's generate uses (and the softcap a model's SDPA would
    drop: `softcapped_attention`). Only the kept positions reach the lm_head where the model
    takes `logits_to_keep` (every family kernl generates with does): [B, L, V] for a 256k
    vocabulary at 8x8192 would be 33 GB. The rows go through in passes of
    `reference_rows_per_pass` (each row's mask and positions are its own: the same logits)."""
    position_ids = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
    kept = torch.tensor(keep, dtype=torch.long, device=seqs.device)
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    step = reference_rows_per_pass(model, seqs.shape[1], score_bytes)
    passes = []
    with torch.no_grad(), softcapped_attention(model):
        for i in range(0, seqs.shape[0], step):
            rows = slice(i, i + step)
            out = model(
                input_ids=seqs[rows],
                attention_mask=valid[rows].long(),
                position_ids=position_ids[rows],
                use_cache=False,
                **({"logits_to_keep": kept} if takes_keep else {}),
            )
            passes.append((out.logits if takes_keep else out.logits[:, keep]).float())
            del out
    return torch.cat(passes)


def compared_steps(n: int, prompt: int, kv_lengths: list[int]) -> list[int]:
    """Which of n steps to compare: all if few, else evenly spread plus the first and last
    step of every kv bucket."""
    if n <= MAX_COMPARED_STEPS:
        return list(range(n))
    picks = {0, 1, n - 1}
    picks |= {
        round(i * (n - 1) / (MAX_COMPARED_STEPS // 2)) for i in range(MAX_COMPARED_STEPS // 2)
    }
    for k in kv_lengths:  # step t writes slot prompt + t - 1
        for slot in (k - 1, k):
            t = slot - prompt + 1
            if 1 <= t < n:
                picks.add(t)
    return sorted(picks)


def validate_generation(
    gen: GenerativeModel,
    model: torch.nn.Module,
    atol: float,
    rtol: float,
    progress=None,
    seed: int = 1234,
) -> list[StageError]:
    say = progress or (lambda _m: None)
    b = gen.buckets
    vocab = gen.spec.vocab_size
    device = next(model.parameters()).device
    errors: dict[tuple, StageError] = {}
    for s in b.prefill_shapes():
        errors[("prefill", *s)] = StageError("prefill", *s)
    for s in b.decode_shapes():
        errors[("decode", *s)] = StageError("decode", *s)
    if drops_attention_softcap(model):
        say(
            "validate: Hugging Face's SDPA would drop the attention softcap "
            f"({model.config.attn_logit_softcapping}); the reference is its eager attention"
        )
    wide = _Float32Reference(model)  # run the first time a reduced-precision step is off
    g = torch.Generator().manual_seed(seed)
    for batch in b.batches:
        for prompt in b.prompts:
            longest = prompt == min(b.prompts)
            n = b.cache_len - prompt + 1 if longest else min(3, b.cache_len - prompt + 1)
            say(f"validate batch {batch} prompt {prompt}: {count(n, 'step')} against eager")
            lengths = torch.randint(1, prompt + 1, (batch,), generator=g)
            lengths[0] = prompt
            rows = [torch.randint(0, vocab, (int(m),), generator=g).tolist() for m in lengths]
            keep = compared_steps(n, prompt, b.kv_lengths)
            wanted = set(keep)
            ours, new_ids = {}, []
            stream = gen.stream(rows, max_new_tokens=n, eos_token_id=[], output_logits=True)
            for t, (ids, logits) in enumerate(stream):
                new_ids.append(ids)
                if t in wanted:
                    ours[t] = logits.cpu()
            seqs = torch.zeros(batch, prompt + n - 1, dtype=torch.int64)
            valid = torch.zeros_like(seqs, dtype=torch.bool)
            for i, r in enumerate(rows):
                seqs[i, prompt - len(r) : prompt] = torch.tensor(r)
                valid[i, prompt - len(r) :] = True
            if n > 1:
                seqs[:, prompt:] = torch.stack(new_ids[:-1], dim=1)
            positions = [prompt - 1 + t for t in keep]
            ref = reference_logits(model, seqs.to(device), valid.to(device), positions).cpu()
            beyond = []  # (key, step, error, scale) past the tolerance
            for j, t in enumerate(keep):
                if t == 0:
                    key = ("prefill", batch, prompt)
                else:
                    slot = prompt + t - 1
                    key = ("decode", batch, next(k for k in b.kv_lengths if k > slot))
                err = float((ours[t] - ref[:, j]).abs().max())
                scale = float(ref[:, j].abs().max())
                e = errors[key]
                e.max_abs_error = max(e.max_abs_error or 0.0, err)
                e.reference_scale = max(e.reference_scale or 0.0, scale)
                e.steps += 1
                if not err <= atol + rtol * scale:
                    beyond.append((key, t, err, scale))
            if not beyond:
                continue
            why, exact = None, None
            if gen.dtype in (torch.float16, torch.bfloat16):
                # a deep model's two bf16 generations differ by about their own error: refuse
                # only where kernl is less accurate than eager in its dtype
                exact = wide.logits(seqs.to(device), valid.to(device), positions)
                ours_run = torch.stack([ours[t] for t in keep], 1)
                why = None if exact is None else no_less_accurate(ours_run, ref, exact)
            key, t, err, scale = beyond[0]
            if why is None:
                raise ValidationError(
                    f"causal-lm {key[0]} bucket {batch}x{key[2]} "
                    f"(prompt bucket {prompt}, step {t}): logits differ from eager by "
                    f"{err:.3g} > atol {atol} + rtol {rtol} x max|logit| {scale:.3g}"
                    + (
                        f"; against eager in float32, kernl is further off than eager in "
                        f"{str(gen.dtype).removeprefix('torch.')}"
                        if exact is not None
                        else f"; no float32 look ({wide.why_not}): the tolerance alone decided"
                        if wide.why_not
                        else ""
                    )
                )
            for key, *_ in beyond:
                errors[key].against_float32 = why
            say(
                f"validate batch {batch} prompt {prompt}: {count(len(beyond), 'step')} beyond "
                f"the tolerance against eager {str(gen.dtype).removeprefix('torch.')}, as close "
                f"to eager in float32 as eager is ({why})"
            )
    return list(errors.values())
