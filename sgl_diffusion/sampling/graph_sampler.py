"""Entropy-Bound sampler, graph mode: one step for a batch as a pure tensor function (no host sync, static shapes).

Same algorithm and outputs as `entropy_bound.step` (the "exact mode"): temperature from `step_remaining` as HF
computes it, argmax of the scaled logits, self-conditioning probabilities in the model dtype, HF's entropy, the
entropy-bound acceptance, the stability / confidence stopping rule, fixed positions and banned tokens. Only the two
random phases differ: instead of one `torch.Generator` per request (which needs Python loops and host syncs), the
random numbers come from a counter-based generator, a pure function of

    (request seed, canvas index, step, stream, canvas position, vocab id)

so a step can be captured in a CUDA graph (several steps per replay) or traced by `torch.compile(fullgraph=True)`,
and a request's draws never depend on which other requests share its batch, in which order, how the rows are
chunked, or how many steps a replay holds. Same seed and params -> same tokens; not bit-identical to transformers
(that is exact mode's job).

RNG design
----------
* Hash: MurmurHash3_x86_32 (Appleby's reference algorithm: per-word `k*c1, rotl 15, k*c2; h^=k, rotl 13, h*5+n`,
  then `h ^= len` and the `fmix32` finaliser), seed 0, over 7 little-endian 32-bit words

      [seed & 0xffffffff, seed >> 32 & 0xffffffff, canvas_index, step, 2 * stream + lane, position, vocab_id]

  `step` is the row's `step_remaining` (N on a canvas's first step, 1 on its last). Every value is held in int64
  but kept in [0, 2^32); 32-bit products are split into 16-bit halves so that no int64 operation ever overflows
  (no reliance on wrap-around: the same bits on CPU, CUDA, inductor's C++ and Triton code).
* Uniform: two lanes (lane 0, lane 1: two hashes of keys differing in one word) give 32 + 20 bits,
  k = h0 << 20 | h1 >> 12 in [0, 2^52), and u = (k + 0.5) * 2^-52, an exact float64 in [2^-53, 1 - 2^-53]:
  never 0 nor 1.
* Stream 0, candidate tokens: the exponential race argmax_v p_v / E_v with E_v = -log(u_v) in float64
  (equivalent to Gumbel-max over log p; P(v) = p_v exactly up to the uniform's 2^-52 grid). Zero-probability
  (banned) tokens are never drawn.
* Stream 1, renoise ids: one uniform per (row, position) at vocab id 0, noise = min(floor(u * V), V - 1).
* Stream 2, a canvas's initial noise (`graph_init_noise`), keyed with step 0 (steps use step >= 1).
* Chunking: the stream-0 draw is generated and consumed in static chunks of whole canvas positions (along C, so
  that the batch size stays dynamic in a compiled graph), `draw_chunk // V` positions of every row per chunk
  (default GRAPH_DRAW_CHUNK = 2^22: 16 positions of V = 262144, 16 chunks per 256-token canvas). Eager peak of the
  draw, besides the probabilities: about 5 live [B x positions, V] 8-byte temporaries of one chunk (160 MiB per
  row at the default), under the step's own peak (its [B, C, V] float32 temporaries, 256 MiB per row for each).
  Results do not depend on the chunk size.

Cost (H200, torch 2.11, B=4, C=256, V=262144, bf16 self-conditioning; allocations beyond the logits):
eager graph_step 87 ms, peak 3.5 GiB (exact mode's eb.step: 12.9 ms, 3.5 GiB); torch.compile(graph_step,
fullgraph=True, dynamic=False): 8.7 ms, peak 2.0 GiB, 29 s to compile. Eager runs the hash as ~60 separate int64
passes over each chunk: run graph mode compiled (one compile per batch size B with dynamic=False).

Rows past their last step
-------------------------
`step_remaining` is clamped at 1: a row stepped again after its last step repeats a last step (same temperature,
same draws, `done` True). The runner freezes done rows itself (torch.where on its buffers); shapes never change.

What the runner must do
-----------------------
* `canvas_index` must be fresh for every denoise pass of a request: bump it for each new canvas *and* for a grammar
  repair pass (which restarts `step_remaining` on the same canvas and would otherwise replay the same draws).
* A request without a seed needs one picked on the host (`graph_state` draws one from torch's global CPU RNG).
* Draw a canvas's first input with `graph_init_noise` (then overwrite an `init_canvas` prefix / fixed positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import entropy_bound as eb
from .params import DiffusionParams

GRAPH_DRAW_CHUNK = 1 << 22  # stream-0 uniforms per row and chunk (whole canvas positions; at least one position)

STREAM_CANDIDATE, STREAM_NOISE, STREAM_INIT = 0, 1, 2

_M32 = 0xFFFFFFFF
_C1, _C2 = 0xCC9E2D51, 0x1B873593
_F1, _F2 = 0x85EBCA6B, 0xC2B2AE35
_N = 0xE6546B64
_KEY_WORDS = 7  # seed lo, seed hi, canvas, step, stream/lane, position, vocab id


class GraphSamplerState(NamedTuple):
    """Per-row device tensors, all [B] unless said. Built once per request batch by `graph_state`; `graph_step`
    returns the state advanced one step (a new tuple; the input is not modified)."""

    seed: torch.Tensor  # [B] int64, the request's seed
    canvas_index: torch.Tensor  # [B] int64, the request's denoise pass (0, 1, ...): a new pass gets new draws
    step_remaining: torch.Tensor  # [B] int32, N on a canvas's first step, 1 on its last (clamped at 1)
    max_steps: torch.Tensor  # [B] int32 (params.max_denoising_steps)
    # NOTE: float64, the request's exact values: HF rounds (t_max - t_min), computed in double, to float32, which
    # float32 copies of t_max and t_min cannot reproduce.
    t_min: torch.Tensor  # [B] float64
    t_max: torch.Tensor  # [B] float64
    entropy_bound: torch.Tensor  # [B] float32
    confidence_threshold: torch.Tensor  # [B] float32
    stability_threshold: torch.Tensor  # [B] int64, k_b <= K
    history: torch.Tensor  # [B, K, C] int64, row b's last k_b slots hold its previous argmax canvases, the rest -1


def graph_state(
    params: Sequence[DiffusionParams],
    seeds: Sequence[int | None],
    canvas_index: Sequence[int],
    step_remaining: Sequence[int],
    histories: Sequence[torch.Tensor],
    device,
) -> GraphSamplerState:
    """Host-side builder (outside the graph). `histories[b]` is [k_b, C] int64 (`entropy_bound.new_history` /
    `push_history`), k_b = params[b].stability_threshold; a None seed is drawn from torch's global CPU RNG."""
    rows = len(params)
    assert rows == len(seeds) == len(canvas_index) == len(step_remaining) == len(histories) > 0
    assert all(s >= 1 for s in step_remaining), step_remaining
    seeds = [int(torch.randint(-(2**63), 2**63 - 1, ()).item()) if s is None else s for s in seeds]
    canvas_length = histories[0].shape[1]
    max_k = max(p.stability_threshold for p in params)
    history = torch.full((rows, max_k, canvas_length), -1, dtype=torch.long)
    for b, (p, h) in enumerate(zip(params, histories)):
        assert h.shape == (p.stability_threshold, canvas_length), (b, tuple(h.shape), p.stability_threshold)
        if h.shape[0]:
            history[b, max_k - h.shape[0]:] = h.cpu()
    return GraphSamplerState(
        seed=torch.tensor(seeds, dtype=torch.int64).to(device),
        canvas_index=torch.tensor(canvas_index, dtype=torch.int64).to(device),
        step_remaining=torch.tensor(step_remaining, dtype=torch.int32).to(device),
        max_steps=torch.tensor([p.max_denoising_steps for p in params], dtype=torch.int32).to(device),
        t_min=torch.tensor([p.t_min for p in params], dtype=torch.float64).to(device),
        t_max=torch.tensor([p.t_max for p in params], dtype=torch.float64).to(device),
        # float64 -> fp32 rounding, as HF's comparisons of fp32 tensors with Python floats (and `prepare`)
        entropy_bound=torch.tensor([p.entropy_bound for p in params], dtype=torch.float32).to(device),
        confidence_threshold=torch.tensor([p.confidence_threshold for p in params], dtype=torch.float32).to(device),
        stability_threshold=torch.tensor([p.stability_threshold for p in params], dtype=torch.int64).to(device),
        history=history.to(device),
    )


# ---------------------------------------------------------------------------------------------------------------
# counter-based generator


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) and a constant c, without overflowing int64 (products stay < 2^49)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) & _M32) | (x >> (32 - r))


def _scramble(k):
    """The word half of a MurmurHash3_x86_32 body round (depends on the word alone)."""
    return _mul32(_rotl32(_mul32(k, _C1), 15), _C2)


def _absorb(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The state half of a body round, given the scrambled word."""
    return (_rotl32(h ^ k, 13) * 5 + _N) & _M32


def _mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """One MurmurHash3_x86_32 body round: mix the 32-bit word `k` into the state `h`."""
    return _absorb(h, _scramble(k))


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _F1)
    h = h ^ (h >> 13)
    h = _mul32(h, _F2)
    return h ^ (h >> 16)


def murmur3_words(words: Sequence[torch.Tensor | int], seed: int = 0) -> torch.Tensor:
    """MurmurHash3_x86_32 of the little-endian 32-bit words `words` (int64 tensors, broadcast; only the low 32 bits
    of each are used) with `seed`: an int64 tensor of values in [0, 2^32)."""
    h = None
    for w in words:
        w = torch.as_tensor(w, dtype=torch.int64) & _M32
        h = _mix(torch.full_like(w, seed & _M32) if h is None else h, w)
    if h is None:
        h = torch.tensor(seed & _M32, dtype=torch.int64)
    return _fmix32(h ^ (4 * len(words)))


def _row_keys(seed, canvas_index, step, position, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two lanes' hash states after the first 6 key words (all but the vocab id), broadcast over the inputs."""
    seed = seed.to(torch.int64)
    prefix = [seed & _M32, (seed >> 32) & _M32, canvas_index.to(torch.int64), step.to(torch.int64)]
    lanes = []
    for lane in (0, 1):
        h = torch.zeros((), dtype=torch.int64, device=seed.device)
        for w in (*prefix, 2 * stream + lane, position.to(torch.int64)):  # the stream word is a Python int
            h = _mix(h, w & _M32)
        lanes.append(h)
    return lanes[0], lanes[1]


def _uniform_from_keys(h0: torch.Tensor, h1: torch.Tensor, num_cols: int) -> torch.Tensor:
    """[R] row keys -> [R, num_cols] float64 uniforms in [2^-53, 1 - 2^-53] (column j = vocab id j)."""
    return _uniform_from_scrambled(h0, h1, _scramble(torch.arange(num_cols, dtype=torch.int64, device=h0.device)))


def _uniform_from_scrambled(h0: torch.Tensor, h1: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """As _uniform_from_keys, with the vocab ids' scrambled words `col` [V] computed once for all rows and lanes."""
    a = _fmix32(_absorb(h0[:, None], col) ^ (4 * _KEY_WORDS))
    b = _fmix32(_absorb(h1[:, None], col) ^ (4 * _KEY_WORDS))
    return _to_uniform(a, b)


def _to_uniform(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two 32-bit hashes -> the float64 (k + 0.5) * 2^-52 with k = a << 20 | b >> 12 in [0, 2^52): exact, in (0, 1)."""
    k = (a << 20) | (b >> 12)
    return (k.to(torch.float64) + 0.5) * (2.0**-52)


def counter_uniform(
    seed: torch.Tensor, canvas_index: torch.Tensor, step: torch.Tensor, position: torch.Tensor, num_cols: int,
    stream: int,
) -> torch.Tensor:
    """The generator: [R, num_cols] float64 uniforms strictly inside (0, 1) (on a 2^-52 grid, offset by half a step).

    `seed`, `canvas_index`, `step`, `position` are [R] integer tensors on one device (or broadcast to [R]); element
    [r, j] is a pure function of (seed[r], canvas_index[r], step[r], stream, position[r], j), so any subset of rows
    or columns, in any order or chunking, gives the same numbers. `stream` is 0..2^30 (see the module docstring).
    """
    h0, h1 = _row_keys(seed, canvas_index, step, position, stream)
    return _uniform_from_keys(h0.reshape(-1), h1.reshape(-1), num_cols)


def _canvas_keys(state: GraphSamplerState, canvas_length: int, stream: int, step: torch.Tensor | None = None):
    """Row keys for every (row, position) of the batch, flattened to [B * C]."""
    position = torch.arange(canvas_length, dtype=torch.int64, device=state.seed.device)[None, :]
    step = state.step_remaining if step is None else step
    h0, h1 = _row_keys(state.seed[:, None], state.canvas_index[:, None], step[:, None], position, stream)
    return h0.reshape(-1), h1.reshape(-1)


def counter_multinomial(probs: torch.Tensor, state: GraphSamplerState, draw_chunk: int | None = None) -> torch.Tensor:
    """Stream 0: one token per position from `probs` [B, C, V] (non-negative weights, any float dtype), [B, C] int64:
    the exponential race argmax_v probs[v] / -log(u_v), in float64, in static chunks of whole positions.

    NOTE: chunked along the canvas (C, static), never along the batch: a loop over B would fix the batch size in a
    compiled graph (one graph per size, and dynamo's recompile limit). A chunk holds B x (draw_chunk // V) positions.
    """
    batch, canvas_length, vocab_size = probs.shape
    h0, h1 = (h.view(batch, canvas_length) for h in _canvas_keys(state, canvas_length, STREAM_CANDIDATE))
    per_chunk = max(1, (GRAPH_DRAW_CHUNK if draw_chunk is None else draw_chunk) // vocab_size)  # positions per row
    col = _scramble(torch.arange(vocab_size, dtype=torch.int64, device=probs.device))
    out = []
    for start in range(0, canvas_length, per_chunk):
        stop = min(start + per_chunk, canvas_length)
        q = _uniform_from_scrambled(h0[:, start:stop].reshape(-1), h1[:, start:stop].reshape(-1), col).log_().neg_()
        weights = probs[:, start:stop].reshape(-1, vocab_size)
        out.append(torch.div(weights, q).argmax(dim=-1).view(batch, stop - start))  # q is Exp(1), > 0
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def counter_noise(state: GraphSamplerState, canvas_length: int, vocab_size: int, stream: int = STREAM_NOISE,
                  step: torch.Tensor | None = None) -> torch.Tensor:
    """Stream 1: renoise ids, [B, C] int64 uniform over [0, V) (one uniform per position, at vocab id 0)."""
    h0, h1 = _canvas_keys(state, canvas_length, stream, step)
    u = _uniform_from_keys(h0, h1, 1).view(-1, canvas_length)
    return (u * vocab_size).floor_().to(torch.int64).clamp_(max=vocab_size - 1)


def graph_init_noise(state: GraphSamplerState, canvas_length: int, vocab_size: int) -> torch.Tensor:
    """Stream 2: a canvas's initial noise for every row, [B, C] int64 uniform over [0, V), keyed on (seed,
    canvas_index) only (step 0). Pure tensor ops: it may run in the graph or outside it."""
    return counter_noise(state, canvas_length, vocab_size, STREAM_INIT, torch.zeros_like(state.step_remaining))


# ---------------------------------------------------------------------------------------------------------------
# the step


def graph_temperature(state: GraphSamplerState, device_type: str) -> torch.Tensor:
    """[B] float32 T = t_min + (t_max - t_min) * (s / N), rounded as HF's LinearTemperatureScheduleLogitsProcessor
    (an int32 step tensor, Python-float t_min/t_max/N) rounds it on `device_type` - bit for bit in eager mode.

    NOTE: on CUDA, HF's `int32 tensor / Python int` is a multiplication by the float32 reciprocal of N (a
    CPU-scalar divisor); elsewhere a true float32 division. (t_max - t_min) is a double subtraction rounded to
    float32, t_min rounded to float32. Each float32 operation is evaluated in float64 and rounded to float32, which
    gives the IEEE float32 result (53 >= 2 * 24 + 2: double rounding is innocuous for + - * /), so the schedule is
    the same compiled (Triton's float32 division is not correctly rounded; it may also contract a*b+c to an fma).
    """
    f64 = torch.float64
    s = state.step_remaining.to(f64)
    n = state.max_steps.to(f64)
    ratio = s * _round32(1.0 / n) if device_type == "cuda" else s / n
    product = _round32(state.t_max - state.t_min) * _round32(ratio)
    return (_round32(state.t_min) + _round32(product)).to(torch.float32)


def _round32(x: torch.Tensor) -> torch.Tensor:
    """float64 `x` rounded to float32, as float64.

    NOTE: not `x.to(float32).to(float64)`: some inductor versions drop such a cast pair as pointless (AMP
    cleanup); the exact scaling by 2 between the casts keeps the rounding in the compiled graph."""
    return (x.to(torch.float32) * 2.0).to(torch.float64) * 0.5


class Decision(NamedTuple):
    """What a step decides from its logits before any draw (`decide`): everything but the next canvas."""

    argmax: torch.Tensor  # [B, C] int64
    probs: torch.Tensor | None  # [B, C, V] float32, the candidate draw's probabilities (None: `sampled` holds it)
    sampled: torch.Tensor | None  # [B, C] int64, the candidate draw when `decide` was given one
    # [B, C, V] the next step's self-conditioning input in the model dtype (`probs` itself in float32)
    self_conditioning_probs: torch.Tensor
    accepted: torch.Tensor  # [B, C] bool
    mean_entropy: torch.Tensor  # [B] float32
    stable: torch.Tensor  # [B] bool
    done: torch.Tensor  # [B] bool


def decide(
    logits: torch.Tensor,
    state: GraphSamplerState,
    self_conditioning_dtype: torch.dtype = torch.float32,
    fixed: torch.Tensor | None = None,
    fixed_tokens: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
    draw=None,
) -> Decision:
    """A step up to its next canvas (no host sync), arguments as `graph_step`'s: temperature, argmax, probabilities,
    entropy, acceptance, fixed positions, stopping rule. `draw` (probs [B, C, V] -> candidates [B, C]) draws the
    candidates as soon as the probabilities exist, which frees them before the entropy's temporaries in a non-float32
    model (`graph_step`); None returns the probabilities for a draw after (exact mode runs this part inside the
    compiled canvas step and draws from each request's generator after it, runner.DiffusionRunner). Run eagerly, its
    values are entropy_bound.step's bit for bit (the same ops, the same temperature bits); compiled, the temperature
    still is, the rest within float32 rounding."""
    temp = graph_temperature(state, logits.device.type)
    scaled = logits / temp[:, None, None]  # [B, C, V] fp32
    if banned is not None:
        scaled = scaled.masked_fill(banned[:, None, :], float("-inf"))
    argmax = scaled.argmax(dim=-1)
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    sampled = None if draw is None else draw(probs)
    if self_conditioning_dtype == torch.float32:
        # NOTE: fixed positions overwrite it below, before a later draw reads it: only their own draws change, and
        # those are overridden by their tokens (`renoise`)
        sc_probs = probs
    else:
        if draw is not None:
            probs = None  # the float32 probabilities only served the draw
        sc_probs = eb._self_conditioning_probs(scaled, self_conditioning_dtype, argmax)

    entropy = eb._categorical_entropy_(scaled)  # consumes `scaled` (a temporary of ours)
    del scaled
    if fixed is not None:
        entropy = entropy.masked_fill(fixed, 0.0)
    accepted = eb._accept(entropy, state.entropy_bound)

    mean_entropy = entropy.mean(dim=-1)
    if fixed is not None:
        argmax = torch.where(fixed, fixed_tokens, argmax)
        free = (~fixed).sum(dim=-1)
        free_mean = entropy.sum(dim=-1) / free.clamp(min=1)
        mean_entropy = torch.where(fixed.any(dim=-1), free_mean, mean_entropy)
        # one-hot at fixed positions, in place and without nonzero: zero the row, then write 1 at the token
        # (free positions write back their own value at a harmless index)
        index = torch.where(fixed, fixed_tokens, 0)[..., None]
        own = sc_probs.gather(-1, index)
        sc_probs.masked_fill_(fixed[..., None], 0)
        sc_probs.scatter_(-1, index, torch.where(fixed[..., None], torch.ones_like(own), own))

    stable = eb._stable(state.history, state.stability_threshold, argmax)
    done = (stable & (mean_entropy < state.confidence_threshold)) | (state.step_remaining <= 1)
    return Decision(argmax, probs if draw is None else None, sampled, sc_probs, accepted, mean_entropy, stable,
                    done)


def renoise(decision: Decision, sampled: torch.Tensor, noise: torch.Tensor, fixed: torch.Tensor | None = None,
            fixed_tokens: torch.Tensor | None = None) -> eb.StepResult:
    """The step's result from its decision and its two draws ([B, C] candidates and noise): accepted positions take
    their candidate, the others fresh noise, fixed positions their token."""
    next_canvas = torch.where(decision.accepted, sampled, noise)
    if fixed is not None:
        next_canvas = torch.where(fixed, fixed_tokens, next_canvas)
    return eb.StepResult(next_canvas, decision.argmax, decision.self_conditioning_probs, decision.accepted,
                         decision.mean_entropy, decision.stable, decision.done)


def graph_step(
    logits: torch.Tensor,
    state: GraphSamplerState,
    self_conditioning_dtype: torch.dtype = torch.float32,
    fixed: torch.Tensor | None = None,
    fixed_tokens: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
    draw_chunk: int | None = None,
) -> tuple[eb.StepResult, GraphSamplerState]:
    """One Entropy-Bound step for a batch, with no host sync and static shapes.

    `logits` [B, C, V] float32, softcapped; nothing passed in is modified. `fixed` [B, C] bool and `fixed_tokens`
    [B, C] int64 (meaningful where fixed): positions held to given tokens, as in entropy_bound (never renoised,
    accepted at zero entropy cost, argmax = token, one-hot self-conditioning input, mean entropy over the free
    positions). `banned` [B, V] bool: token ids never drawn nor chosen on the row (entropy_bound's `banned` pairs as
    a mask). `draw_chunk`: uniforms per chunk of the candidate draw (default GRAPH_DRAW_CHUNK).

    Returns the StepResult (fields as entropy_bound.StepResult; `done` is (stable & mean_entropy < confidence) |
    (step_remaining == 1)) and the state advanced one step: step_remaining - 1 clamped at 1, history pushed with
    the argmax (HF's roll-and-set-last within each row's k_b window, -1 outside it), the rest unchanged.
    """
    batch, canvas_length, vocab_size = logits.shape
    assert (fixed is None) == (fixed_tokens is None)
    decision = decide(logits, state, self_conditioning_dtype, fixed, fixed_tokens, banned,
                      draw=lambda probs: counter_multinomial(probs, state, draw_chunk))  # RNG phase 1 (stream 0)
    noise = counter_noise(state, canvas_length, vocab_size)  # RNG phase 2 (stream 1)
    result = renoise(decision, decision.sampled, noise, fixed, fixed_tokens)
    # NOTE: built field by field, not with _replace (torch 2.11's dynamo returns a malformed tuple for it)
    advanced = GraphSamplerState(
        state.seed, state.canvas_index, (state.step_remaining - 1).clamp(min=1), state.max_steps, state.t_min,
        state.t_max, state.entropy_bound, state.confidence_threshold, state.stability_threshold,
        push_history(state.history, state.stability_threshold, result.argmax))
    return result, advanced


def push_history(history: torch.Tensor, threshold: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """[B, K, C] histories with `argmax` [B, C] pushed: each row's last k_b slots roll left by one and the newest
    is its argmax (entropy_bound.push_history per row); slots outside the window stay -1. A new tensor."""
    max_k = history.shape[1]
    if max_k == 0:
        return history
    rolled = torch.cat([history[:, 1:], argmax[:, None]], dim=1)
    in_window = torch.arange(max_k, device=history.device) >= (max_k - threshold)[:, None]  # [B, K]
    return torch.where(in_window[..., None], rolled, -1)


def update_state_(dst: GraphSamplerState, src: GraphSamplerState, frozen: torch.Tensor | None = None) -> None:
    """Copy `src` into the static buffers of `dst` (for graph replay), keeping rows where `frozen` [B] bool."""
    for d, s in zip(dst, src):
        if d is s:
            continue
        if frozen is not None:
            s = torch.where(frozen.view(-1, *[1] * (s.dim() - 1)), d, s)
        d.copy_(s)
