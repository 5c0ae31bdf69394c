"""The diffusion model runner: one mixed forward, then one Entropy-Bound step for every canvas in it.

It owns nothing but the per-request canvas state it is handed; KV slots, radix handles and streaming
belong to the scheduler policy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from sgl_diffusion.attention.base import BaseAttnBackend
from sgl_diffusion.runtime.canvas_batch import CanvasBatch
from sgl_diffusion.runtime.canvas_step import CanvasStep
from sgl_diffusion.sampling import entropy_bound as eb
from sgl_diffusion.sampling import graph_sampler as gs
from sgl_diffusion.sampling.params import DiffusionParams

SAMPLER_TILE_BYTES = 1 << 30  # budget for the vocab-sized float32 transients of one sampler tile


@dataclass
class CanvasState:
    """One request's canvas being denoised."""

    params: DiffusionParams
    generator: torch.Generator | None
    canvas: torch.Tensor  # [C] int64, the input of the next step
    history: torch.Tensor  # [k, C] int64, previous argmax canvases
    step_remaining: int  # N before the first step; 1 on the last
    soft_embeds: torch.Tensor | None = None  # [C, H] self-conditioning input; None on the first step
    argmax: torch.Tensor | None = field(default=None)  # [C] draft after the latest step
    # kept on device, read once the canvas is done: steps it took and positions accepted over them
    steps_taken: torch.Tensor | int = 0
    accepted: torch.Tensor | int = 0
    # fixed positions (sampling/entropy_bound.py): set with clamp(); None = all positions free
    fixed: torch.Tensor | None = None  # [C] bool
    fixed_tokens: torch.Tensor | None = None  # [C] int64
    banned: tuple[int, ...] = ()  # token ids the sampler never produces on this request's canvases
    # the final hidden states of the first `keep_hidden` positions, kept after every step for what is computed
    # from the committed step's logits (grammar commit, logprobs, prompt scores); 0 keeps nothing
    keep_hidden: int = 0
    hidden: torch.Tensor | None = None  # [keep_hidden, H]
    # the request's denoise pass (a new canvas, or fixed positions set): keys the counter-RNG sampler's draws
    canvas_index: int = 0

    @property
    def seed(self) -> int:
        """The request's seed (drawn at random for an unseeded one): keys the counter-RNG sampler's draws."""
        seed = self.generator.initial_seed()  # an unsigned 64-bit value
        return seed - (1 << 64) if seed >= 1 << 63 else seed  # the same bits as an int64

    @property
    def plain(self) -> bool:
        """Nothing but free denoising: no fixed position, no banned token, no kept hidden states."""
        return self.fixed is None and not self.banned and not self.keep_hidden

    @classmethod
    def first(cls, params: DiffusionParams, generator, canvas_length: int, vocab_size: int, device) -> CanvasState:
        """State of a request's first canvas (``init_canvas`` seeds only this one)."""
        canvas = eb.init_canvas_noise(canvas_length, vocab_size, generator, init_canvas=params.init_canvas, device=device)
        return cls(params, generator, canvas, eb.new_history(params.stability_threshold, canvas_length, device),
                   params.max_denoising_steps)

    def next_canvas(self, vocab_size: int) -> CanvasState:
        """State of the following canvas: fresh noise from the same generator (no position fixed)."""
        c = self.canvas.numel()
        canvas = eb.init_canvas_noise(c, vocab_size, self.generator, device=self.canvas.device)
        return CanvasState(self.params, self.generator, canvas,
                           eb.new_history(self.params.stability_threshold, c, canvas.device),
                           self.params.max_denoising_steps, banned=self.banned, keep_hidden=self.keep_hidden,
                           canvas_index=self.canvas_index + 1)

    def clamp(self, fixed: torch.Tensor, tokens: torch.Tensor) -> None:
        """Fix the positions where ``fixed`` [C] bool is set to ``tokens`` [C] int64 from the next step on: the
        canvas input holds them now, and the sampler never renoises them (see sampling/entropy_bound.py)."""
        self.fixed, self.fixed_tokens = fixed, tokens
        self.canvas = torch.where(fixed, tokens, self.canvas)
        self.canvas_index += 1  # a new denoise pass (a grammar repair restarts the schedule): new counter draws


def make_generator(seed: int | None, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


class DiffusionRunner:
    def __init__(self, model, attn: BaseAttnBackend, canvas_step: CanvasStep | None = None, rng: str = "exact"):
        """``canvas_step``: runs canvas-only forwards (compiled or captured, runtime/canvas_step.py); None: every
        forward is the model's mixed one. ``rng`` (env.SamplerEnv): "exact" draws from each request's generator in
        transformers' order; "counter" from sampling/graph_sampler.py's counter hash, and then a canvas-only round of
        plain canvases runs all its steps inside the canvas step (sampler included, no host sync between them)."""
        self.model = model
        self.attn = attn
        self.canvas_step = canvas_step
        self.rng = rng
        self.vocab_size = model.cfg.vocab_size

    def canvas_inputs(self, states: list[CanvasState]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flat canvas ids [sum C] and self-conditioning input [sum C, H] (None when every row is on step 1)."""
        ids = torch.cat([s.canvas for s in states])
        if all(s.soft_embeds is None for s in states):
            return ids, None
        h = self.model.cfg.hidden_size
        weight = self.model.embed_tokens.weight
        soft = [s.soft_embeds if s.soft_embeds is not None else weight.new_zeros(s.canvas.numel(), h) for s in states]
        return ids, torch.cat(soft)

    def run(self, batch: CanvasBatch, states: list[CanvasState], extra_steps: int = 0) -> list[bool]:
        """Forward ``batch``, advancing ``states`` (one per canvas segment, in order) by one step; then
        run up to ``extra_steps`` more canvas-only steps before the host looks at ``done``.

        NOTE: the extra steps never sync the host: a canvas that finishes early keeps being computed
        but its state is frozen (as HF does for finished rows of a batch). Returns per-state ``done``;
        a done state's ``argmax`` is the canvas to commit.
        """
        if states and batch.token_kinds == "canvas" and self._graphs_rounds(states, batch.segments):
            return self.canvas_step.rounds(batch.segments, batch.input_ids, batch.canvas_soft_embeds, states,
                                           1 + extra_steps)
        done = self._forward_and_step(batch, states, None)
        if states and extra_steps and self._graphs_rounds(states, batch.canvas_segments):  # the first step was mixed
            ids, soft = self.canvas_inputs(states)
            return self.canvas_step.rounds(batch.canvas_segments, ids, soft, states, extra_steps, frozen=done)
        canvas_segments = batch.canvas_segments
        dones, draws = [done], []  # per step: who is done after it, and (exact draws) each generator's state after it
        for _ in range(extra_steps if states else 0):
            if self.rng == "exact":
                draws.append([s.generator.get_state() for s in states])
            ids, soft = self.canvas_inputs(states)
            segments = [dataclasses.replace(seg) for seg in canvas_segments]
            done = self._forward_and_step(CanvasBatch(segments, ids, soft), states, done)
            dones.append(done)
        if not states:
            return []
        done_after = torch.stack(dones).tolist()  # the round's one host sync
        if draws:
            _rewind_frozen_generators(states, done_after, draws)
        return done_after[-1]

    def _graphs_rounds(self, states: list[CanvasState], segments) -> bool:
        """Whether canvas-only steps of ``states`` (of canvas ``segments``) run inside the canvas step, sampler
        included."""
        step = self.canvas_step
        return self.rng == "counter" and step is not None and all(s.plain for s in states) and step.accepts(segments)

    def forward(self, batch: CanvasBatch) -> torch.Tensor | None:
        """The canvases' last hidden states: through the canvas step when it takes the round."""
        step = self.canvas_step
        if step is not None and step.takes(batch):
            if batch.token_kinds == "canvas":
                return step(batch.segments, batch.input_ids, batch.canvas_soft_embeds)
            return step.encode_round(batch)
        return self.model(batch, self.attn)

    def _forward_and_step(self, batch: CanvasBatch, states: list[CanvasState], frozen: torch.Tensor | None):
        """The forward, then one sampler step of ``states`` (rows in ``frozen`` [B] keep theirs): -> done [B].

        A judging canvas step (exact RNG, runtime/canvas_step.py) computes what the step decides before its draws
        inside its graph; only the draws from each request's generator, in transformers' order, run here after it.
        """
        step = self.canvas_step
        if not states or step is None or not step.judges or not step.takes(batch):
            return self._step(self.forward(batch), states, frozen)
        params = [s.params for s in states]
        # more canvases than a sampler tile, fixed positions, banned tokens, kept hidden states, or a longer
        # stability history than the graph's: two dummy rows decide, and the eager sampler steps from the hidden states
        decides = (len(states) <= step.sampler_tile and all(s.plain for s in states)
                   and max(p.stability_threshold for p in params) <= step.history_depth)  # fmt: skip
        state = gs.graph_state(params, [0] * len(states), [0] * len(states),
                               [max(s.step_remaining, 1) for s in states], [s.history for s in states],
                               step.planner.device) if decides else None  # fmt: skip
        judged = step.judged(batch, state)
        if not decides:
            return self._step(judged.hidden.flatten(0, 1), states, frozen)
        generators = [s.generator for s in states]
        decision = judged.decision
        c = decision.argmax.shape[1]
        sampled = eb.multinomial_rows(decision.probs, generators)  # RNG phase 1, then 2, as eb.step draws them
        noise = eb.noise_rows(generators, c, self.vocab_size, decision.argmax.device)
        return self._advance(states, gs.renoise(decision, sampled, noise), judged.soft, judged.hidden, frozen)

    def _step(self, hidden, states: list[CanvasState], frozen: torch.Tensor | None) -> torch.Tensor:
        """One sampler step from the canvases' hidden states [B*C, H]; rows in ``frozen`` [B] keep their state.

        NOTE: logits, probabilities and their temporaries are [rows, C, V] float32 (268 MB per 256-token
        canvas at V=262144), so the LM head, the sampler and the self-conditioning input run in tiles
        of rows sized by SAMPLER_TILE_BYTES; nothing vocab-sized outlives its tile.
        """
        if not states:
            return torch.zeros(0, dtype=torch.bool)
        c = states[0].canvas.numel()
        hidden = hidden.view(len(states), c, -1)
        tile = sampler_tile_rows(c, self.vocab_size)
        done = [self._sample_tile(hidden[i : i + tile], states[i : i + tile], None if frozen is None else frozen[i : i + tile])
                for i in range(0, len(states), tile)]
        return torch.cat(done)

    def _counter_step(self, logits, states: list[CanvasState], dtype) -> eb.StepResult:
        """The step's sampling with the counter-RNG sampler, eagerly (mixed rounds, and rows with fixed positions,
        banned tokens or kept hidden states): the same draws a graphed round makes for these rows."""
        fixed = fixed_tokens = banned = None
        if any(s.fixed is not None for s in states):
            none = torch.zeros_like(states[0].canvas, dtype=torch.bool)
            fixed = torch.stack([none if s.fixed is None else s.fixed for s in states])
            fixed_tokens = torch.stack([s.canvas if s.fixed_tokens is None else s.fixed_tokens for s in states])
        if any(s.banned for s in states):
            banned = torch.zeros(len(states), self.vocab_size, dtype=torch.bool, device=logits.device)
            for b, s in enumerate(states):
                banned[b, list(s.banned)] = True
        state = counter_sampler_state(states, logits.device)
        return gs.graph_step(logits, state, dtype, fixed, fixed_tokens, banned)[0]

    def _sample_tile(self, hidden, states, frozen) -> torch.Tensor:
        logits = self.model.logits(hidden.flatten(0, 1)).view(*hidden.shape[:2], -1)
        # NOTE: the self-conditioning probabilities come out in the model dtype, rounded where HF rounds them
        dtype = self.model.embed_tokens.weight.dtype
        if self.rng == "counter":
            result = self._counter_step(logits, states, dtype)
        else:
            rows = [eb.SamplerRow(s.params, max(s.step_remaining, 1), s.history, s.fixed, s.fixed_tokens, s.banned)
                    for s in states]
            result = eb.step(logits, eb.prepare(rows), [s.generator for s in states], self_conditioning_dtype=dtype)
        del logits
        soft = self.model.soft_embed(result.self_conditioning_probs)  # [rows, C, H]; the probs die with the tile
        return self._advance(states, result, soft, hidden, frozen)

    @staticmethod
    def _advance(states: list[CanvasState], result: eb.StepResult, soft: torch.Tensor, hidden: torch.Tensor,
                 frozen: torch.Tensor | None) -> torch.Tensor:
        """Each state takes its row of a step's ``result``, self-conditioning input ``soft`` [B, C, H] and
        ``hidden`` states [B, C, H], unless ``frozen`` [B] says it is done already. -> done [B], frozen rows too."""
        for i, s in enumerate(states):
            keep = None if frozen is None else frozen[i]
            s.history = _unless(keep, s.history, eb.push_history(s.history, result.argmax[i]))
            s.argmax = _unless(keep, s.argmax, result.argmax[i])
            s.canvas = _unless(keep, s.canvas, result.next_canvas[i])
            s.soft_embeds = _unless(keep, s.soft_embeds, soft[i])
            if s.keep_hidden:
                s.hidden = _unless(keep, s.hidden, hidden[i, : s.keep_hidden])
            s.accepted = s.accepted + _unless(keep, 0, result.accepted[i].sum())
            s.steps_taken = s.steps_taken + _unless(keep, 0, 1)
            s.step_remaining -= 1
        return result.done if frozen is None else result.done | frozen


def sampler_tile_rows(canvas_length: int, vocab_size: int) -> int:
    """Canvases per LM-head-and-sampler tile: their [rows, C, V] float32 logits and two temporaries fit
    SAMPLER_TILE_BYTES."""
    return max(1, SAMPLER_TILE_BYTES // (canvas_length * vocab_size * 4 * 3))


def counter_sampler_state(states: list[CanvasState], device) -> gs.GraphSamplerState:
    return gs.graph_state([s.params for s in states], [s.seed for s in states], [s.canvas_index for s in states],
                          [max(s.step_remaining, 1) for s in states], [s.history for s in states], device)


def _rewind_frozen_generators(states: list[CanvasState], done_after: list[list[bool]], draws: list[list]) -> None:
    """A frozen row's sampler still drew from its request's generator in the round's later steps (no host sync in
    between): set each generator back to its state after the step its canvas finished on, so that the next canvas's
    noise and steps draw what one step per round draws (transformers' sequence, for a seeded request)."""
    for i, state in enumerate(states):
        finished_on = next((step for step, done in enumerate(done_after) if done[i]), None)
        if finished_on is not None and finished_on < len(draws):
            state.generator.set_state(draws[finished_on][i])


def _unless(frozen: torch.Tensor | None, old, new):
    """``old`` where the row is frozen, else ``new``, without a host sync."""
    return new if frozen is None else torch.where(frozen, old, new)
