"""Decides what goes into the next forward and applies its result.

Every running request contributes at most two segments per forward: its pending encode (the prompt,
or the canvas it just finished) followed by one denoise step of its current canvas. Encoding and
denoising thus share forwards: a new prompt never stalls the requests that are denoising, and a
finished canvas is committed in the same forward as the next canvas's first step. Prompts share a
prefill budget per forward (chunked prefill): a long one is encoded over several forwards, and its
canvas starts with its last chunk.

A request's last canvas is committed too when the KV store keeps prefixes (the radix cache): its answer
is streamed as soon as the canvas is done, and the request stays one more forward to encode those
tokens, so the next turn of a conversation reuses the whole answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sgl_diffusion.runtime import constraints
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
from sgl_diffusion.runtime.runner import CanvasState, DiffusionRunner, make_generator
from sgl_diffusion.sampling.logprobs import TokenLogprobs
from sgl_diffusion.sampling.params import DiffusionParams


@dataclass
class Reservation:
    reused: torch.Tensor  # [P] int64 slots of a cached prefix of the tokens (their KV is already there)
    new: torch.Tensor  # [n - P] int64 slots the encode segment writes


class KVSlots(ABC):
    """Owns the KV slots of running requests (sglang's pools and radix tree in the server)."""

    @abstractmethod
    def reserve(self, req: DiffusionRequest, tokens: list[int], limit: int | None = None) -> Reservation | None:
        """KV for ``tokens`` appended to the request's committed context; None when memory is short.

        Only a request's first reservation (its prompt) may reuse a cached prefix. ``limit``: at most that many new
        slots, for the first tokens after the reused prefix (a chunk of a long prompt); None: all of them.
        """

    def encoded(self, req: DiffusionRequest) -> None:
        """Called after a forward wrote the request's reserved KV (a prefix cache may publish it)."""

    def room(self) -> int | None:
        """Slots a reservation could get now (free, or held only by a cache that would give them up); None: no
        limit is known."""
        return None

    @property
    def caches_prefixes(self) -> bool:
        """Whether released context is kept for later requests (then a request's last canvas is worth encoding)."""
        return False

    @abstractmethod
    def release(self, req: DiffusionRequest, cache: bool = True) -> None:
        """Give back everything the request holds; with ``cache``, keep its committed context cached."""

    def forget(self, req: DiffusionRequest, cache: bool = False) -> None:
        """Give back everything the request holds (with ``cache``, keep its committed context cached, as release does),
        and let its next reservation start afresh."""
        self.release(req, cache)


@dataclass
class DiffusionRequest:
    prompt_ids: list[int]
    params: DiffusionParams
    max_new_tokens: int
    handle: object = None  # the caller's own request object (sglang's Req in the server)
    image_runs: tuple[tuple[int, int], ...] = ()
    image_embeds: torch.Tensor | None = None  # [num image tokens, H]
    # what the request asks of its canvases beyond free generation (runtime/constraints.py)
    grammar: object = None  # a grammar matcher (sglang's BaseGrammarObject) the committed tokens must follow
    logprobs: int | None = None  # logprobs of committed tokens with this many top alternatives; None: none
    score_from: int | None = None  # score the prompt tokens after this position (None: no prompt scores)
    banned: tuple[int, ...] = ()  # token ids never produced (EOS inside infill holes)
    # set by the policy
    slots: torch.Tensor | None = field(default=None, init=False)  # [committed context] KV slots
    pending: list[int] = field(default_factory=list, init=False)  # tokens to encode next forward
    # pending holds (the rest of) its prompt, or prompt + output after a retraction: encoded as a prefill, in chunks
    # of the round's prefill budget; its canvas waits until all of it is encoded
    prefilling: bool = field(default=False, init=False)
    state: CanvasState | None = field(default=None, init=False)
    output_ids: list[int] = field(default_factory=list, init=False)
    finished: bool = field(default=False, init=False)  # output complete; may still encode its last canvas
    added_after: int = field(default=0, init=False)  # the policy's rounds run before it was added
    finished_in: int | None = field(default=None, init=False)  # the round (counted from 0) that completed its output
    retracted: bool = field(default=False, init=False)  # it gave its KV back once: its later prefills re-encode
    output_logprobs: TokenLogprobs | None = field(default=None, init=False)  # one entry per output token
    prompt_logprobs: TokenLogprobs | None = field(default=None, init=False)  # prompt tokens after score_from + 1
    canvas_logprobs: TokenLogprobs | None = field(default=None, init=False)  # the canvas being committed
    scoring: list[CanvasState] | None = field(default=None, init=False)  # prompt-scoring canvases in flight
    grammar_prefix: list[int] = field(default_factory=list, init=False)  # current canvas, accepted by the grammar
    # the logprobs of grammar_prefix, each from the pass that accepted it (the re-denoise after holds it fixed)
    grammar_prefix_logprobs: TokenLogprobs | None = field(default=None, init=False)
    repairs: int = field(default=0, init=False)  # grammar repairs of the current canvas so far
    grammar_fallbacks: int = field(default=0, init=False)  # positions whose top-k held no allowed token

    def encode_from_scratch(self) -> None:
        """Give up its KV slots (the caller released them): prompt + output are encoded again before its canvas."""
        self.slots, self.pending = None, [*self.prompt_ids, *self.output_ids]
        self.prefilling = bool(self.pending)  # an empty prompt has nothing to encode: its first encode is a commit

    @property
    def context_len(self) -> int:
        return 0 if self.slots is None else self.slots.numel()

    def images_after(self, start: int):
        """Image runs of the prompt from ``start`` on (offsets relative to it) and their soft tokens.

        A cached prefix may end inside an image: its first soft tokens are already in the KV.
        """
        runs, rows, cursor = [], [], 0
        for begin, end in self.image_runs:
            if end > start:
                skip = max(start - begin, 0)
                runs.append((begin + skip - start, end - start))
                rows.append(torch.arange(cursor + skip, cursor + end - begin))
            cursor += end - begin
        if not runs:
            return (), None
        return tuple(runs), self.image_embeds[torch.cat(rows).to(self.image_embeds.device)]


# Called with a request and its newly committed canvas; returns the tokens to keep and whether the
# request is finished. The server routes this through sglang's stop checks.
CanvasSink = Callable[[DiffusionRequest, list[int]], tuple[list[int], bool]]


@dataclass
class StepOutput:
    """What one forward produced."""

    committed: list[tuple[DiffusionRequest, list[int]]]  # requests that finished a canvas, with kept tokens
    finished: list[DiffusionRequest]  # requests whose output completed in this forward
    starved: list[DiffusionRequest] = field(default_factory=list)  # denied KV slots this round
    # holding all the KV it could get, and short of more: the pool cannot hold it even alone; the caller ends it
    exhausted: list[DiffusionRequest] = field(default_factory=list)
    prefill_tokens: int = 0  # prompt tokens the forward encoded (bounded by the prefill budget)
    # requests that began encoding their prompt (a retracted one: prompt + output again), and the tokens the prefix
    # cache held of them; of those, the figures of retracted requests' re-encodes
    started: list[DiffusionRequest] = field(default_factory=list)
    cached_tokens: int = 0
    reencoded_tokens: int = 0  # of prefill_tokens
    reencoded_cached_tokens: int = 0  # of cached_tokens
    retracted: list[DiffusionRequest] = field(default_factory=list)  # gave their KV back to make room
    chunked: list[DiffusionRequest] = field(default_factory=list)  # encoded a chunk of their prompt, more to come


class CanvasScheduler:
    def __init__(self, runner: DiffusionRunner, kv: KVSlots, sink: CanvasSink, device, steps_per_round: int = 1,
                 mixed_rounds: bool = True, prefill_chunk: int | None = None):
        self.runner = runner
        # prompt tokens a round encodes at most, over all requests (sglang's --chunked-prefill-size; None: no limit):
        # a long prompt is encoded over several rounds, so the canvases beside it keep their pace and a round's
        # activations stay bounded. Commits (one canvas each) are not counted.
        self.prefill_chunk = prefill_chunk
        self.steps_per_round = steps_per_round  # denoise steps per forward round before the host checks ``done``
        # False: a round with any prefill or commit runs only those, as sglang's in-tree dLLM loop does
        # (kept for bench/bench_rounds.py, which measures what mixing buys)
        self.mixed_rounds = mixed_rounds
        self.kv = kv
        self.sink = sink
        self.device = device
        cfg = runner.model.cfg
        self.canvas_length, self.vocab_size = cfg.canvas_length, cfg.vocab_size
        self.running: list[DiffusionRequest] = []
        self.rounds = 0  # step() calls so far
        # this round's first reservations: each request, with the length of the cached prefix it reuses
        self._admitted: list[tuple[DiffusionRequest, int]] = []

    def add(self, req: DiffusionRequest) -> None:
        req.encode_from_scratch()
        req.added_after = self.rounds
        self.running.append(req)

    def step(self) -> StepOutput:
        """plan -> forward + sample -> commit -> free."""
        self._admitted = []
        reqs, segments, states, starved = self._plan()
        out = StepOutput([], [], starved)
        if reqs:  # NOTE: a prefill-only request of a prompt cached whole has no segment: it ends without a forward
            done = []
            if segments:
                batch = self._build_batch(reqs, segments, states)
                done = self.runner.run(batch, states, extra_steps=self.steps_per_round - 1)
            for seg in segments:
                if seg.writes_kv:
                    self.kv.encoded(reqs[seg.req_index])
            out = self._apply(reqs, segments, states, done)
            out.starved = starved
            out.prefill_tokens = sum(seg.num_tokens for seg in segments if seg.kind == "prefill")
            out.started = [req for req, _ in self._admitted]
            out.cached_tokens = sum(cached for _, cached in self._admitted)
            out.reencoded_cached_tokens = sum(cached for req, cached in self._admitted if req.retracted)
            out.reencoded_tokens = sum(seg.num_tokens for seg in segments
                                       if seg.kind == "prefill" and reqs[seg.req_index].retracted)  # fmt: skip
            out.chunked = [reqs[seg.req_index] for seg in segments
                           if seg.kind == "prefill" and reqs[seg.req_index].prefilling]  # fmt: skip
        elif starved and len(starved) == len(self.running):
            out.exhausted = self._make_room()
            out.retracted = [] if out.exhausted else [self.running[-1]]  # the victim waits last
        for req in list(self.running):
            if req.finished and not req.pending:  # its last canvas is encoded (or never will be)
                self._free(req)
        self.rounds += 1
        return out

    def abort(self, req: DiffusionRequest, cache: bool = True) -> None:
        """Drop a request; ``cache=False`` when its KV may be incomplete (a failed forward)."""
        self._free(req, cache)

    def retract(self) -> None:
        """Give back every running request's KV (new weights are coming): each keeps its output and its current
        canvas, and re-encodes prompt + output in its next forward; answered requests (only their last canvas left to
        encode) just leave."""
        for req in list(self.running):
            if req.finished:
                self._free(req, cache=False)
            elif req.slots is not None:
                self.kv.forget(req)
                req.encode_from_scratch()
                req.retracted = True

    def _make_room(self) -> list[DiffusionRequest]:
        """Every request waits for KV that only running requests could free (a burst of prompts filled the pool, and
        each now needs room to commit a canvas). As sglang retracts decode requests, the newest one holding KV gives it
        back (its committed context stays cached while the pool lets it) and waits behind the others with its output
        and current canvas, to re-encode prompt + output when there is room. The oldest is never retracted, so it
        finishes and frees what it holds; when it is the only one holding KV, it needs more than the pool has, and is
        returned to be ended."""
        holders = [req for req in self.running if req.slots is not None]
        if not holders or holders[-1] is self.running[0]:
            return self.running[:1]
        victim = holders[-1]
        self.kv.forget(victim, cache=True)
        victim.encode_from_scratch()
        victim.retracted = True
        self.running.remove(victim)
        self.running.append(victim)
        return []

    def holds_kv(self) -> bool:
        return any(req.slots is not None for req in self.running)

    # ---- helpers ------------------------------------------------------------------------------

    def _plan(self):
        encode_only = not self.mixed_rounds and any(r.pending for r in self.running)
        reqs, segments, states, starved = self._plan_round(encode_only)
        if encode_only and not segments:  # every encode waits for KV: the canvases run meanwhile (and may free some)
            return self._plan_round(encode_only=False)
        return reqs, segments, states, starved

    def _plan_round(self, encode_only: bool):
        reqs, segments, states, starved = [], [], [], []
        # NOTE: the next turn of a conversation, sent once the answer was streamed (after the round that finished it),
        # may arrive before the forward that encodes the answer's last canvas: a prompt added after an answer whose last
        # canvas is still to encode is matched against the cache only once that canvas is in it. Prompts added before
        # cannot be such a turn, and start as they would.
        first_answer = min((r.finished_in for r in self.running if r.finished and r.pending), default=None)
        holders = sum(r.slots is not None and not r.finished for r in self.running)
        held_back = False
        budget = self.prefill_chunk
        for req in list(self.running):
            if first_answer is not None and req.slots is None and req.added_after > first_answer:
                continue  # admitted next round
            if req.prefilling and req.pending and budget is not None and budget <= 0:
                held_back = held_back or req.slots is None
                continue  # the round's prefill budget is spent: it goes on next round (it is not short of KV)
            if req.slots is None and req.pending:
                if held_back or not self._has_headroom(req, holders):
                    held_back = True  # first come, first served: a long prompt is not overtaken by shorter ones
                    starved.append(req)
                    continue
                holders += 1
            if req.pending:
                kind = "prefill" if req.prefilling else "commit"
                limit = budget if kind == "prefill" and self._chunkable(req) else None
                got = self.kv.reserve(req, req.pending, limit)
                if got is None and req.finished:
                    req.pending = []  # no room for its last canvas: release what is encoded rather than wait
                    continue
                if got is None:
                    starved.append(req)  # out of KV: wait until someone frees
                    # first come, first served: newer prompts do not take the KV a prompt (or its next chunk) waits for
                    held_back = held_back or req.prefilling
                    continue
                if req.slots is None and kind == "prefill":
                    self._admitted.append((req, got.reused.numel()))
                prefix = got.reused if req.slots is None else req.slots
                req.slots = torch.cat([prefix, got.new])
                req.pending = req.pending[got.reused.numel() :]
                encoding = got.new.numel()
                if encoding:
                    runs = req.images_after(prefix.numel())[0] if kind == "prefill" else ()
                    segments.append(Segment(kind, len(reqs), encoding, prefix.numel(), prefix, got.new, runs))
                    if kind == "prefill" and budget is not None:
                        budget -= encoding
                if len(req.pending) > encoding:  # more chunks of its prompt to come: no canvas yet
                    if encoding:
                        reqs.append(req)
                    continue
                req.prefilling = False
            if req.finished:
                if req.pending:
                    reqs.append(req)  # only its last canvas's commit
                continue
            if req.slots is None:  # an empty prompt: the canvas attends to itself only
                req.slots = torch.empty(0, dtype=torch.long, device=self.device)
            if req.score_from is not None and req.scoring is None and not encode_only:
                # one-step canvases over each prompt prefix; they read the prefill this forward writes
                req.scoring = []
                for context, state in constraints.scoring_states(req, self.canvas_length, self.vocab_size,
                                                                 self.device):
                    segments.append(Segment("canvas", len(reqs), self.canvas_length, context, req.slots[:context]))
                    states.append(state)
                    req.scoring.append(state)
                if not req.scoring:  # only the first entry, which is null
                    req.prompt_logprobs = TokenLogprobs([], [], [])
            if req.max_new_tokens <= 0:
                reqs.append(req)  # prefill only (the DSL's prefix caching)
                continue
            if encode_only:
                if segments and segments[-1].req_index == len(reqs):
                    reqs.append(req)
                continue
            if req.state is None:
                gen = make_generator(req.params.seed, self.device)
                req.state = constraints.dress(
                    req, CanvasState.first(req.params, gen, self.canvas_length, self.vocab_size, self.device),
                    self.canvas_length)
            segments.append(Segment("canvas", len(reqs), self.canvas_length, req.context_len, req.slots))
            states.append(req.state)
            reqs.append(req)
        return reqs, segments, states, starved

    @staticmethod
    def _chunkable(req: DiffusionRequest) -> bool:
        """Whether its prompt may be encoded over several rounds. Not with images: their runs attend both ways, as
        sglang keeps multimodal prompts whole on its transformers backend. Not with prompt scores: their one-step
        canvases, run after the last chunk, read the sliding window at every scored position, and an earlier
        chunk's insertion into the radix cache gives back the sliding-window KV behind it."""
        return not req.image_runs and req.score_from is None

    def _has_headroom(self, req: DiffusionRequest, holders: int) -> bool:
        """Whether a prompt (or a retracted request's prompt + output) may be encoded beside ``holders`` requests that
        hold KV: its tokens and then a canvas for each of them must fit. Encoding prompts into the whole pool would
        leave no room for anyone's next commit, and requests would be retracted as soon as they were admitted (sglang's
        prefill admission keeps room for running decodes the same way). Alone, a request is always tried."""
        if holders == 0:
            return True
        room = self.kv.room()
        canvases = holders + (req.max_new_tokens > 0)
        return room is None or len(req.pending) + canvases * self.canvas_length <= room

    def _build_batch(self, reqs, segments, states) -> CanvasBatch:
        ids, soft = self.runner.canvas_inputs(states) if states else (None, None)
        pieces, cursor, images = [], 0, []
        for seg in segments:
            req = reqs[seg.req_index]
            if seg.kind == "canvas":
                pieces.append(ids[cursor : cursor + seg.num_tokens])
                cursor += seg.num_tokens
            else:
                pieces.append(torch.tensor(req.pending[: seg.num_tokens], dtype=torch.long, device=self.device))
                req.pending = req.pending[seg.num_tokens :]
                if seg.image_runs:
                    images.append(req.images_after(seg.start_pos)[1])
        return CanvasBatch(segments, torch.cat(pieces), soft, torch.cat(images) if images else None)

    def _apply(self, reqs, segments, states, done) -> StepOutput:
        committed, finished = [], []
        canvas_reqs = [reqs[seg.req_index] for seg in segments if seg.kind == "canvas"]
        model = self.runner.model
        for req, state, is_done in zip(canvas_reqs, states, done, strict=True):
            if state is not req.state:  # one of its prompt-scoring canvases (collected below)
                continue
            if not is_done:
                continue
            canvas = constraints.finish_canvas(req, model)
            if canvas is None:  # a grammar repair: the canvas denoises on with its valid prefix fixed
                continue
            kept, is_finished = self.sink(req, canvas)
            constraints.record_logprobs(req, len(kept))
            req.output_ids.extend(kept)
            committed.append((req, kept))
            if is_finished:
                req.finished, req.finished_in, req.state, req.grammar = True, self.rounds, None, None
                finished.append(req)
                if self.kv.caches_prefixes:
                    req.pending = kept  # committed in the next forward, after the answer has been streamed
            else:
                assert len(canvas) == self.canvas_length, "only a finished request commits a partial canvas"
                req.pending = canvas  # committed causally in the next forward
                req.state = constraints.dress(req, req.state.next_canvas(self.vocab_size), self.canvas_length)
        for req in reqs:
            if req.scoring:
                constraints.collect_scores(req, model)
            if req.max_new_tokens <= 0 and not req.finished and not req.pending:
                req.finished = True
                finished.append(req)
        return StepOutput(committed, finished)

    def _free(self, req: DiffusionRequest, cache: bool = True) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.slots is not None:
            self.kv.release(req, cache)
            req.slots = None
        # NOTE: the grammar matcher is the request's own copy (sglang's cache hands out copies): dropping it frees
        # its state, including the prefix of a canvas being repaired, which never reached the output
        req.state, req.grammar, req.grammar_prefix, req.grammar_prefix_logprobs = None, None, [], None


def eos_sink(eos_token_ids) -> CanvasSink:
    """Offline stop rule: cut after the first EOS (kept) and at max_new_tokens."""
    eos = set(eos_token_ids)

    def sink(req: DiffusionRequest, canvas: list[int]) -> tuple[list[int], bool]:
        kept = canvas
        for i, t in enumerate(canvas):
            if t in eos:
                kept = canvas[: i + 1]
                break
        room = req.max_new_tokens - len(req.output_ids)
        finished = kept[-1] in eos or len(kept) >= room
        return kept[:room], finished

    return sink
