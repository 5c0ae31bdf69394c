"""Entropy-Bound sampler (arxiv 2505.24857), batched over requests at different steps with different params.

Reproduces transformers' DiffusionGemma loop op for op (LinearTemperatureScheduleLogitsProcessor,
EntropyBoundSampler.accept_canvas/renoise_canvas, StableAndConfidentStoppingCriteria), so that one request with a
seeded generator gives the same tokens as HF's `generate` after `torch.manual_seed(seed)`.

Per request and step, the RNG calls are exactly HF's (batch size 1):
  1. `torch.multinomial(probs [C, V], 1)`  - the candidate token at every position (CPU: see multinomial_rows)
  2. `torch.randint(0, V, (1, C))`         - fresh noise for the positions not accepted
and `torch.randint(0, V, (1, C))` once before a canvas's first step (`init_canvas_noise`).

Fixed positions (infill templates, a grammar-repaired prefix, see runtime/constraints.py) ride on the same calls:
a row may fix some positions to given tokens. They are drawn like any other position (so the RNG stream is the
same) and then overridden: never renoised (the next canvas holds their token), always accepted (their entropy
counts as 0, so they neither spend nor block the entropy bound), their argmax is their token, and the mean entropy
of the stopping rule is taken over the free positions. The next step's self-conditioning input at a fixed position
is the one-hot of its token (what a position the model has settled on looks like), not the model's disagreeing
probabilities. Rows with no fixed position and no banned token are bit-identical to rows of a batch without any.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .params import DiffusionParams


def temperature(step_remaining, max_steps, t_min, t_max, device=None) -> torch.Tensor:
    """T = t_min + (t_max - t_min) * (s / N), float32 on ``device``, computed as HF computes it there.

    `step_remaining` s runs N..1, so the first step gets t_max and the last t_min + (t_max - t_min) / N.
    Arguments may be scalars (a 0-dim result) or equal-length sequences ([B]; scalars are shared by all rows).
    """
    if not isinstance(step_remaining, Sequence):
        return _hf_temperature(torch.tensor(step_remaining, dtype=torch.int32, device=device), max_steps, t_min, t_max)
    rows = len(step_remaining)
    per_row = [x if isinstance(x, Sequence) else [x] * rows for x in (max_steps, t_min, t_max)]
    groups: dict[tuple, list[int]] = {}  # rows sharing (N, t_min, t_max) take one vectorised evaluation
    for b, key in enumerate(zip(*per_row)):
        groups.setdefault(key, []).append(b)
    parts, order = [], []
    for (n, lo, hi), idx in groups.items():
        cur_step = torch.tensor([step_remaining[b] for b in idx], dtype=torch.int32, device=device)
        parts.append(_hf_temperature(cur_step, n, lo, hi))
        order += idx
    temp = torch.cat(parts)
    if order != sorted(order):
        temp = temp[torch.tensor(order, device=device).argsort()]
    return temp


def _hf_temperature(cur_step: torch.Tensor, max_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    # NOTE: LinearTemperatureScheduleLogitsProcessor verbatim: `cur_step` is an int32 tensor on the logits' device
    # and everything else a Python number, so each op rounds as HF's does on that device. On CUDA `cur_step / N`
    # with a Python N becomes `cur_step * (1 / N)` (a CPU-scalar divisor), which differs from a true division by
    # one ulp on some steps: computing on the CPU and copying would break seeded bit identity on a GPU.
    return t_min + ((t_max - t_min) * (cur_step / max_steps))


def init_canvas_noise(
    canvas_length: int,
    vocab_size: int,
    generator: torch.Generator | None,
    *,
    init_canvas: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The first canvas of a denoise loop: [C] int64 uniform over [0, V), prefix optionally overwritten.

    NOTE: the noise is drawn even when `init_canvas` covers the whole canvas, because HF draws it even when
    `decoder_input_ids` is given (an eager `dict.pop` default); skipping it would shift every later draw.
    """
    canvas = torch.randint(0, vocab_size, (1, canvas_length), generator=generator, device=device)[0]
    if init_canvas is not None:
        canvas[: len(init_canvas)] = torch.tensor(init_canvas, dtype=torch.long, device=canvas.device)
    return canvas


def new_history(stability_threshold: int, canvas_length: int, device=None) -> torch.Tensor:
    """A request's empty argmax history, [k, C] int64 of -1 (never equal to an argmax, as in HF)."""
    return torch.full((stability_threshold, canvas_length), -1, dtype=torch.long, device=device)


def push_history(history: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """HF's roll-and-set-last: drop the oldest of `history` [k, C], append `argmax` [C]; returns a new tensor."""
    return torch.cat([history[1:], argmax[None]]) if history.shape[0] else history


class SamplerRow(NamedTuple):
    """What `prepare` needs from one request; the runner owns `history` and replaces it via `push_history`."""

    params: DiffusionParams
    step_remaining: int  # N on the first step of a canvas, 1 on the last
    history: torch.Tensor  # [params.stability_threshold, C] int64, previous argmax canvases, oldest first
    fixed: torch.Tensor | None = None  # [C] bool, positions whose token is given (None: all free)
    fixed_tokens: torch.Tensor | None = None  # [C] int64, the tokens of the fixed positions (others ignored)
    banned: tuple[int, ...] = ()  # token ids never drawn nor chosen anywhere on the row (EOS inside infill holes)


class SamplingArgs(NamedTuple):
    """Per-batch sampler inputs, all on the logits' device. Built by `prepare`, read-only for `step`."""

    temperature: torch.Tensor  # [B] fp32
    entropy_bound: torch.Tensor  # [B] fp32 (HF compares against the bound rounded to fp32)
    confidence_threshold: torch.Tensor  # [B] fp32
    stability_threshold: torch.Tensor  # [B] int64, k_b <= K
    is_last_step: torch.Tensor  # [B] bool
    history: torch.Tensor  # [B, K, C] int64, K = max k_b; row b's last k_b slots are its history, the rest -1
    fixed: torch.Tensor | None = None  # [B, C] bool; None when no row fixes a position
    fixed_tokens: torch.Tensor | None = None  # [B, C] int64, meaningful where `fixed`
    banned: torch.Tensor | None = None  # [2, n] int64 (row, token id) pairs; None when no row bans a token


class StepResult(NamedTuple):
    next_canvas: torch.Tensor  # [B, C] int64: sampled token where accepted, fresh uniform noise elsewhere
    argmax: torch.Tensor  # [B, C] int64, argmax of logits / T (the draft; committed when done)
    # [B, C, V] next step's self-conditioning input in the model dtype D, as HF computes it:
    # softmax(float32(D(logits / T))).to(D). Vocab-sized: do not keep it past the soft embedding.
    self_conditioning_probs: torch.Tensor
    accepted: torch.Tensor  # [B, C] bool
    mean_entropy: torch.Tensor  # [B] fp32, nats
    stable: torch.Tensor  # [B] bool
    done: torch.Tensor  # [B] bool, (stable & confident) | is_last_step


def prepare(rows: Sequence[SamplerRow]) -> SamplingArgs:
    """Host-to-device work for one step of a batch: a few small copies, the temperatures computed on the device
    (as HF computes them there) and the histories stacked on device."""
    device = rows[0].history.device
    canvas_length = rows[0].history.shape[1]
    p = [r.params for r in rows]
    temp = temperature([r.step_remaining for r in rows], [x.max_denoising_steps for x in p],
                       [x.t_min for x in p], [x.t_max for x in p], device=device)
    # float64 -> fp32 rounding here is the same HF applies when it compares fp32 tensors with Python floats.
    bounds = torch.tensor([[x.entropy_bound for x in p], [x.confidence_threshold for x in p]],
                          dtype=torch.float32).to(device)  # [2, B]
    ints = torch.tensor([[x.stability_threshold for x in p], [r.step_remaining for r in rows]]).to(device)  # [2, B]

    max_k = max(x.stability_threshold for x in p)
    history = torch.full((len(rows), max_k, canvas_length), -1, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        k = r.history.shape[0]
        assert k == r.params.stability_threshold, (k, r.params.stability_threshold)
        if k:
            history[b, max_k - k :] = r.history
    fixed = fixed_tokens = banned = None
    if any(r.fixed is not None for r in rows):
        fixed = torch.zeros(len(rows), canvas_length, dtype=torch.bool, device=device)
        fixed_tokens = torch.zeros(len(rows), canvas_length, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            if r.fixed is not None:
                fixed[b], fixed_tokens[b] = r.fixed, r.fixed_tokens
    if any(r.banned for r in rows):
        banned = torch.tensor([(b, t) for b, r in enumerate(rows) for t in r.banned], dtype=torch.long).T.to(device)
    return SamplingArgs(temp, bounds[0], bounds[1], ints[0], ints[1] == 1, history, fixed, fixed_tokens, banned)


def step(
    logits: torch.Tensor,
    args: SamplingArgs,
    generators: Sequence[torch.Generator | None],
    self_conditioning_dtype: torch.dtype = torch.float32,
) -> StepResult:
    """One Entropy-Bound step for a batch. `logits` [B, C, V] fp32, already softcapped; nothing passed in is modified.

    `generators[b]` (None = the device's global RNG) must live on the logits' device. `self_conditioning_dtype` is
    the model's dtype (HF rounds the scaled logits to it before the self-conditioning softmax). Besides the returned
    probabilities, at most two [B, C, V] fp32 temporaries are alive at once (the scaled logits, then one of: the
    sampling probabilities, the self-conditioning softmax, p*log p, logsumexp's scratch), plus in a non-fp32 model
    two [B, C, V] ones in its dtype, and the draw's scratch (multinomial_rows).
    """
    batch, canvas_length, vocab_size = logits.shape
    assert len(generators) == batch, (len(generators), batch)

    # NOTE: `temperature` is a device tensor, never a CPU scalar: CUDA turns division by a CPU scalar into a
    # multiplication by its reciprocal, which rounds differently from HF's division.
    scaled = logits / args.temperature[:, None, None]  # [B, C, V] fp32, HF's processed_logits
    if args.banned is not None:
        scaled[args.banned[0], :, args.banned[1]] = float("-inf")
    argmax = scaled.argmax(dim=-1)  # [B, C]
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)  # [B, C, V]

    # RNG phase 1, one draw per request so each request's stream matches a batch-size-1 HF run.
    sampled = multinomial_rows(probs, generators)  # [B, C]
    if self_conditioning_dtype == torch.float32:
        sc_probs = probs  # HF's softmax(float32(float32(scaled))) is the very op above
    else:
        del probs  # the fp32 probabilities only served the draw
        sc_probs = _self_conditioning_probs(scaled, self_conditioning_dtype, argmax)

    entropy = _categorical_entropy_(scaled)  # [B, C]; consumes `scaled`
    del scaled
    if args.fixed is not None:
        entropy = entropy.masked_fill(args.fixed, 0.0)  # certain: accepted first, at no cost to the bound
    accepted = _accept(entropy, args.entropy_bound)

    noise = noise_rows(generators, canvas_length, vocab_size, logits.device)  # RNG phase 2
    next_canvas = torch.where(accepted, sampled, noise)

    mean_entropy = entropy.mean(dim=-1)
    if args.fixed is not None:
        next_canvas, argmax, mean_entropy = _hold_fixed(args, next_canvas, argmax, entropy, mean_entropy, sc_probs)
    stable = _stable(args.history, args.stability_threshold, argmax)
    done = (stable & (mean_entropy < args.confidence_threshold)) | args.is_last_step
    return StepResult(next_canvas, argmax, sc_probs, accepted, mean_entropy, stable, done)


def noise_rows(generators: Sequence[torch.Generator | None], canvas_length: int, vocab_size: int,
               device) -> torch.Tensor:
    """RNG phase 2 of a step: HF renoises the full canvas every step, accepted positions included; [B, C] int64,
    row b from ``generators[b]`` as one batch-size-1 HF step draws it."""
    return torch.cat([torch.randint(0, vocab_size, (1, canvas_length), generator=g, device=device) for g in generators])


DRAW_CHUNK = 1 << 16  # float64 uniforms per CPU draw chunk (512 KB: its few passes stay in cache)


def multinomial_rows(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """``torch.multinomial(probs[b], 1, generator=generators[b])`` for every row b, bit for bit: [B, C, V] -> [B, C].

    NOTE: torch's single-sample multinomial is argmax(p / q) with q ~ Exp(1) from ``exponential_``, whose CPU kernel
    computes each q as float32(-log1p(-u)) from one float64 uniform u, one element at a time: two thirds of a tiny
    model's sampler time. On the CPU the same uniforms are drawn here with ``uniform_`` (the same generator calls in the same
    order) and the logarithm is taken vectorised, over all rows at once (see _exponential_).
    """
    if probs.device.type != "cpu" or not _exponential_is_neg_log1p():
        return torch.stack([
            torch.multinomial(probs[b], num_samples=1, generator=g).squeeze(-1) for b, g in enumerate(generators)
        ])
    batch, canvas_length, vocab_size = probs.shape
    lo, hi = torch.aminmax(probs)
    if not (hi < math.inf and lo >= 0):  # torch.multinomial's own check (a NaN fails both comparisons)
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    flat = probs.reshape(batch * canvas_length, vocab_size)
    out = torch.empty(batch * canvas_length, dtype=torch.long)
    per_chunk = max(1, DRAW_CHUNK // vocab_size)  # canvas positions per chunk
    for start in range(0, flat.shape[0], per_chunk):
        stop = min(start + per_chunk, flat.shape[0])
        u = torch.empty(stop - start, vocab_size, dtype=torch.float64)
        pos = start
        while pos < stop:  # each row's positions from its own generator, in order, as one [C, V] draw would
            b = pos // canvas_length
            end = min(stop, (b + 1) * canvas_length)
            u[pos - start : end - start].uniform_(generator=generators[b])
            pos = end
        out[start:stop] = torch.div(flat[start:stop], _exponential_(u)).argmax(dim=-1)
    return out.view(batch, canvas_length)


def _exponential_(u: torch.Tensor) -> torch.Tensor:
    """float32(-log1p(-u)) as torch's CPU ``exponential_`` rounds it (with glibc's log1p); ``u`` float64 is kept.

    NOTE: torch's vectorised log1p differs from glibc's by up to 1 ulp of float64 on ~8% of elements. That changes
    the float32 result only where the float64 value lies within an ulp of a float32 rounding midpoint; the values
    within 8 ulps of one (their 29 low mantissa bits near 2^28: about one element in 10^7) are recomputed with
    math.log1p (glibc's).
    """
    d = torch.neg(u).log1p_().neg_()  # float64
    q = d.to(torch.float32)
    low = d.view(torch.int64).bitwise_and_((1 << 29) - 1).sub_(1 << 28).abs_()
    unsure = (low <= 8).nonzero(as_tuple=True)
    if unsure[0].numel():
        q[unsure] = torch.tensor([-math.log1p(-x) for x in u[unsure].tolist()], dtype=torch.float64).to(torch.float32)
    return q


@functools.cache
def _exponential_is_neg_log1p() -> bool:
    """Whether this torch's CPU ``exponential_`` is float32(-log1p(-uniform_ float64)), checked once on a seed."""
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    expected = torch.empty(4096).exponential_(1, generator=g1)
    got = _exponential_(torch.empty(4096, dtype=torch.float64).uniform_(generator=g2))
    return bool(torch.equal(expected, got)) and bool(torch.equal(g1.get_state(), g2.get_state()))


def _hold_fixed(args: SamplingArgs, next_canvas, argmax, entropy, mean_entropy, sc_probs):
    """Fixed positions keep their token in the next canvas and the argmax, and feed a one-hot of it to the next
    step's self-conditioning (``sc_probs`` [B, C, V] is overwritten there); the stopping rule's mean entropy is
    over the free positions (0 on a row with none). Rows without fixed positions keep their values bit for bit."""
    fixed, tokens = args.fixed, args.fixed_tokens
    next_canvas = torch.where(fixed, tokens, next_canvas)
    argmax = torch.where(fixed, tokens, argmax)
    free = (~fixed).sum(dim=-1)  # [B]
    free_mean = entropy.sum(dim=-1) / free.clamp(min=1)  # entropy is 0 at fixed positions already
    mean_entropy = torch.where(fixed.any(dim=-1), free_mean, mean_entropy)
    rows, cols = fixed.nonzero(as_tuple=True)
    sc_probs[rows, cols] = 0
    sc_probs[rows, cols, tokens[rows, cols]] = 1
    return next_canvas, argmax, mean_entropy


def _self_conditioning_probs(scaled: torch.Tensor, dtype: torch.dtype, argmax: torch.Tensor) -> torch.Tensor:
    """HF's next-step input: it keeps `scaled.to(dtype)` as the self-conditioning logits, and the decoder takes
    `softmax(dim=-1, dtype=float32).to(dtype)` of them. In a bf16 model the logits (up to ~75 once divided by T,
    where bf16 spacing is 0.5) are rounded before the softmax, so softmax(scaled) would be a different input.

    NOTE: at a temperature so low that `scaled` overflows `dtype` (fp16 past 65504: temperature 0 is 1e-6 here), HF's
    softmax is NaN and the next forward's logits with it; such a position takes the T -> 0 limit instead, the one-hot
    of `argmax` [B, C]. Every other position keeps HF's bits."""
    probs = torch.softmax(scaled.to(dtype), dim=-1, dtype=torch.float32)
    if dtype == torch.float16:  # bf16 shares float32's exponent: its range would take T < 1e-37 to leave
        broken = probs.isnan().any(dim=-1, keepdim=True)  # [B, C, 1]: an inf among the rounded logits, or all -inf
        probs.masked_fill_(broken, 0.0).scatter_add_(-1, argmax[..., None], broken.to(probs.dtype))
    return probs.to(dtype)


def _categorical_entropy_(scaled: torch.Tensor) -> torch.Tensor:
    """Categorical(logits=scaled).entropy() bit for bit, reusing `scaled` as scratch (it is overwritten).

    NOTE: HF's entropy normalises with logsumexp and re-softmaxes the normalised logits; that differs in the last
    bits from softmax(scaled), and the acceptance bound is inclusive, so the same ops are used here.
    """
    log_p = scaled.sub_(scaled.logsumexp(dim=-1, keepdim=True))  # [B, C, V]
    p_log_p = torch.softmax(log_p, dim=-1)
    p_log_p.mul_(log_p.clamp_(min=torch.finfo(log_p.dtype).min))
    return p_log_p.sum(dim=-1).neg_()


def _accept(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Accept the lowest-entropy positions while sum(H) - max(H) <= bound; [B, C] bool.

    The lowest-entropy position always passes (0 <= bound), so every step accepts at least one token.
    """
    sorted_entropy, order = torch.sort(entropy, dim=-1)  # ascending, so each prefix's max is its last element
    keep = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound[:, None]
    return torch.scatter(torch.zeros_like(keep), dim=-1, index=order, src=keep)


def _stable(history: torch.Tensor, threshold: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """True where each of the row's last `threshold` argmax canvases equals `argmax`; threshold 0 is always stable."""
    max_k = history.shape[1]
    in_window = torch.arange(max_k, device=history.device) >= (max_k - threshold)[:, None]  # [B, K]
    same = (history == argmax[:, None, :]).all(dim=-1)  # [B, K]
    return (same | ~in_window).all(dim=-1)
