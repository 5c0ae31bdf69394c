"""What a request may ask of its canvases beyond free generation, and how each acts on a canvas.

- Fixed positions (``diffusion.infill``): the template after the prompt is laid over the request's canvases, C
  positions at a time. A canvas's fixed positions hold their token from its first step (never renoised, always
  accepted, one-hot self-conditioning: sampling/entropy_bound.py), so the bidirectional canvas reads them as
  context; the free ones are denoised by the Entropy-Bound sampler, with EOS banned so the template completes.
  A fixed piece informs its own canvas and, once committed, every later one; an earlier canvas never sees it.
- Grammars (``json_schema``, ``regex``, ``ebnf``, ``structural_tag``, sglang's compiled xgrammar matcher): the
  canvas is denoised unconstrained, sharing forwards with every other request; when it is done, the commit takes
  the grammar's pass over that last step's logits (sampling/constrained.py): left to right, the best token the
  matcher allows, accepted into it, ending at the matcher's termination. The matcher carries over to the next
  canvas, which continues the document. With ``diffusion.grammar_repair_steps`` > 0, a pass that had to change
  a token stops right after it: the valid prefix is fixed and the canvas is re-denoised that many more steps (at
  the low-temperature end of the schedule) so that its remainder agrees with the change, then the pass resumes
  (at most MAX_REPAIRS_PER_CANVAS times per canvas).
- Logprobs of committed tokens: log-softmax at temperature 1 of the logits of the step whose argmax is committed
  (sampling/logprobs.py); for a grammar the model's distribution before the grammar (a forced token may be far
  down, and missing from the top-k), and for a prefix a repair held fixed, the distribution of the pass that
  accepted it.
- Prompt scores (``logprob_start_len``): prompt token i (after the first scored position, which is null as in
  sglang) gets log p(token_i), where p is the denoiser's distribution at the first position of a one-step canvas
  whose context is the prompt before i, started from the noise of the request's seed (0 when unseeded: what a
  greedy request starts from). That is the distribution a one-step greedy generation after prompt[:i] would
  take its first token from. It costs one canvas forward per scored token, batched with the prefill.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sgl_diffusion.runtime.runner import CanvasState, make_generator
from sgl_diffusion.sampling import entropy_bound as eb
from sgl_diffusion.sampling.constrained import grammar_commit
from sgl_diffusion.sampling.infill import FREE
from sgl_diffusion.sampling.logprobs import TokenLogprobs, token_logprobs

if TYPE_CHECKING:
    from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest

MAX_REPAIRS_PER_CANVAS = 4
MAX_SCORED_PROMPT_TOKENS = 64  # each costs one canvas forward; runtime/admission.py refuses more


def needs_logits(req: DiffusionRequest) -> bool:
    return req.grammar is not None or req.logprobs is not None


def dress(req: DiffusionRequest, state: CanvasState, canvas_length: int) -> CanvasState:
    """Give a request's new canvas what the request asks of it: its infill positions (the canvas starts at output
    position len(req.output_ids)), banned tokens, and kept hidden states for the commit's logits."""
    state.banned = req.banned
    state.keep_hidden = canvas_length if needs_logits(req) else 0
    layout = req.params.infill
    start = len(req.output_ids)
    if layout is not None and start < len(layout):
        piece = list(layout[start : start + canvas_length])
        piece += [FREE] * (canvas_length - len(piece))
        if any(t != FREE for t in piece):
            tokens = torch.tensor(piece, dtype=torch.long, device=state.canvas.device)
            state.clamp(tokens != FREE, tokens.clamp(min=0))
    return state


def finish_canvas(req: DiffusionRequest, model) -> list[int] | None:
    """The tokens a done canvas commits (its argmax, or the grammar's pass over it), with their logprobs in
    ``req.canvas_logprobs``; None when the canvas goes back to be repaired instead."""
    state = req.state
    argmax = state.argmax.tolist()
    # NOTE: one more LM head over the canvas ([C, V] fp32, a step's worth), only for requests that need logits
    logits = model.logits(state.hidden) if needs_logits(req) else None
    if req.grammar is None:
        tokens = argmax
    else:
        tokens = _grammar_tokens(req, state, logits, argmax)
        if tokens is None:
            return None
    if req.logprobs is not None:
        # positions a grammar repair held fixed keep the logprobs of the pass that accepted them: the last step's
        # logits there are the model reading back the token it was given
        earlier, req.grammar_prefix_logprobs = req.grammar_prefix_logprobs, None
        fixed = len(earlier.token) if earlier is not None else 0
        last = _pass_logprobs(req, logits, tokens, fixed)
        req.canvas_logprobs = _joined(earlier, last)
    return tokens


def _joined(first: TokenLogprobs | None, then: TokenLogprobs) -> TokenLogprobs:
    return then if first is None else TokenLogprobs(*(a + b for a, b in zip(first, then)))


def _pass_logprobs(req: DiffusionRequest, logits: torch.Tensor, tokens: list[int], start: int) -> TokenLogprobs:
    """Logprobs of ``tokens[start:]``, at their positions of ``logits``."""
    ids = torch.tensor(tokens[start:], dtype=torch.long, device=logits.device)
    return token_logprobs(logits[start : len(tokens)], ids, req.logprobs)


def record_logprobs(req: DiffusionRequest, kept: int) -> None:
    """Append the logprobs of the first ``kept`` committed tokens to the request's output logprobs."""
    got = req.canvas_logprobs
    req.canvas_logprobs = None
    if got is None:
        return
    if req.output_logprobs is None:
        req.output_logprobs = TokenLogprobs([], [], [])
    for have, new in zip(req.output_logprobs, got):
        have.extend(new[:kept])


def scoring_states(req: DiffusionRequest, canvas_length: int, vocab_size: int, device) -> list[tuple[int, CanvasState]]:
    """(context length, one-step canvas state) for each scored prompt token after ``req.score_from``."""
    seed = req.params.seed if req.params.seed is not None else 0
    out = []
    for i in range(req.score_from + 1, len(req.prompt_ids)):
        gen = make_generator(seed, device)
        noise = eb.init_canvas_noise(canvas_length, vocab_size, gen, device=device)
        state = CanvasState(req.params, gen, noise, eb.new_history(req.params.stability_threshold, canvas_length,
                                                                    device), 1, keep_hidden=1)
        out.append((i, state))
    return out


def collect_scores(req: DiffusionRequest, model) -> None:
    """Prompt scores from the scoring canvases' first positions (after their one forward), into
    ``req.prompt_logprobs``."""
    states, req.scoring = req.scoring, []
    if not states:
        req.prompt_logprobs = TokenLogprobs([], [], [])
        return
    hidden = torch.cat([s.hidden for s in states])  # [n, H]
    tokens = torch.tensor(req.prompt_ids[req.score_from + 1 :], dtype=torch.long, device=hidden.device)
    req.prompt_logprobs = token_logprobs(model.logits(hidden), tokens, req.logprobs or 0)


def _grammar_tokens(req: DiffusionRequest, state: CanvasState, logits, argmax: list[int]) -> list[int] | None:
    room = req.max_new_tokens - len(req.output_ids)
    stop = min(len(argmax), room)
    done = req.grammar_prefix
    start = len(done)
    repair = req.params.grammar_repair_steps > 0 and req.repairs < MAX_REPAIRS_PER_CANVAS
    result = grammar_commit(logits, argmax, req.grammar, start, stop, stop_at_change=repair)
    done += result.tokens
    req.grammar_fallbacks += result.fallbacks
    if repair and not result.terminated and result.changed is not None and len(done) < stop:
        if req.logprobs is not None:
            req.grammar_prefix_logprobs = _joined(req.grammar_prefix_logprobs, _pass_logprobs(req, logits, done, start))
        # re-denoise the rest with the valid prefix fixed, at the end of the temperature schedule
        fixed = torch.zeros_like(state.argmax, dtype=torch.bool)
        fixed[: len(done)] = True
        tokens = torch.zeros_like(state.argmax)
        tokens[: len(done)] = torch.tensor(done, dtype=torch.long)
        state.clamp(fixed, tokens)
        state.step_remaining = min(req.params.grammar_repair_steps, req.params.max_denoising_steps)
        state.history = eb.new_history(req.params.stability_threshold, len(argmax), state.canvas.device)
        req.repairs += 1
        return None
    req.grammar_prefix, req.repairs = [], 0
    return done
