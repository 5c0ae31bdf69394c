"""The graph-ready canvas step: a canvas-only round as host planning, then one static-shape tensor function.

Most rounds carry only canvases (every request denoising, none prefilling or committing). For them the mixed
forward's per-segment work (an index of each request's own length per layer, one attention call per canvas, Python
branches on the batch) is replaced by:

- ``CanvasStepPlanner.plan`` (host, eager): the batch's inputs written into persistent buffers of a static shape:
  ids and positions [B*C], the self-conditioning input [B*C, H] (zeros on a first step), and per layer group the
  buffer rows of each canvas's visible context padded to [B, P] with a key mask [B, P + C]. Sliding groups always
  take P = W - 1 (what a canvas sees there at most), full groups the next power-of-two bucket of the longest context
  (PREFIX_GRANULE at least). Padding rows point at buffer row 0 and are masked out. With ``batch_buckets``, B is
  padded to the next bucket with dummy canvases (own keys only, outputs dropped).
- ``model.denoise_step`` over those buffers, attention as one batched SDPA per layer
  (``attention.sdpa.canvas_step_attention``): no host sync, no data-dependent shape.

``CanvasStep`` runs it one of three ways: ``eager`` (the reference, used by tests), ``compile`` (torch.compile with
fullgraph=True, the CPU's ``--enable-torch-compile``; dynamic shapes, so batch sizes and prefix buckets do not
recompile past the first graphs) or ``cuda_graph`` (one CUDA graph per (batch bucket, prefix bucket), captured on
first use in a shared memory pool and replayed after the planner refills its buffers; unverified on a GPU so far).

The RNG is not in here: the forward draws nothing. The sampler after it is the runner's (exact mode, each request's
own generator in transformers' order), so a compiled or captured forward changes only the forward's rounding.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from sgl_diffusion.attention.base import KVStore, layer_groups, visible_prefix
from sgl_diffusion.attention.sdpa import canvas_step_attention
from sgl_diffusion.models.parallel import sglang_runtime
from sgl_diffusion.runtime.canvas_batch import Segment
from sgl_diffusion.sampling import graph_sampler as gs

logger = logging.getLogger(__name__)

PREFIX_GRANULE = 64  # the smallest full-attention prefix bucket; buckets double from here
RECOMPILE_LIMIT = 64  # graphs per compiled function (dynamo's default is 8)
StepMode = Literal["eager", "compile", "cuda_graph"]


def prefix_bucket(length: int) -> int:
    """The padded context length of a full-attention group: the next power of two >= ``length``, PREFIX_GRANULE
    at least (log2 shapes over the whole context)."""
    return max(PREFIX_GRANULE, 1 << max(0, length - 1).bit_length())


def batch_bucket(num_canvases: int, buckets: Sequence[int] | None) -> int:
    """The padded batch size: the smallest bucket that holds ``num_canvases`` (no buckets: the batch itself)."""
    if not buckets:
        return num_canvases
    for size in sorted(buckets):
        if size >= num_canvases:
            return size
    raise ValueError(f"{num_canvases} canvases exceed the largest batch bucket {max(buckets)}")


@dataclass
class StepInputs:
    """The static-shape inputs of one canvas step (persistent per shape: a CUDA graph reads them in place)."""

    ids: torch.Tensor  # [B*C] int64
    positions: torch.Tensor  # [B*C] int64
    soft_embeds: torch.Tensor  # [B*C, H] model dtype
    rows: tuple[torch.Tensor, ...]  # per layer group, [B, P_g] int64 buffer rows of the visible context
    key_masks: tuple[torch.Tensor, ...]  # per layer group, [B, P_g + C] bool: True on real context rows and own keys

    @property
    def shape(self) -> tuple[int, ...]:
        """(B, P per layer group): the key of the graph that reads these buffers (CanvasStepPlanner.shape)."""
        return (self.rows[0].shape[0], *(rows.shape[1] for rows in self.rows))


class CanvasStepPlanner:
    """Writes a canvas-only batch into the persistent static-shape ``StepInputs`` of its shape."""

    def __init__(self, model, kv: KVStore, batch_buckets: Sequence[int] | None = None):
        cfg = model.cfg
        self.kv = kv
        self.canvas_length, self.hidden_size = cfg.canvas_length, cfg.hidden_size
        weight = model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.groups = layer_groups([layer.self_attn.info for layer in model.layers])
        self.group_of_layer = tuple(next(g for g, group in enumerate(self.groups) if i in group.layer_ids)
                                    for i in range(len(model.layers)))  # fmt: skip
        self.batch_buckets = tuple(batch_buckets) if batch_buckets else None
        self.inputs: dict[tuple[int, ...], StepInputs] = {}

    def shape(self, segments: Sequence[Segment]) -> tuple[int, ...]:
        """(B, P per layer group) of a batch of canvas segments: the key of its graph."""
        widths = []
        for group in self.groups:
            if group.window is not None:
                widths.append(group.window - 1)
            else:
                widths.append(prefix_bucket(max(visible_prefix(seg, None).numel() for seg in segments)))
        return (batch_bucket(len(segments), self.batch_buckets), *widths)

    def plan(self, segments: Sequence[Segment], ids: torch.Tensor, soft_embeds: torch.Tensor | None) -> StepInputs:
        """Fill the inputs of ``segments`` (whole canvases, in batch order): ids [n*C], soft_embeds [n*C, H] or None
        (every canvas on its first step). Returns the persistent StepInputs of the batch's shape."""
        assert all(seg.kind == "canvas" and seg.num_tokens == self.canvas_length for seg in segments)
        key = self.shape(segments)
        inputs = self.inputs.get(key)
        if inputs is None:
            inputs = self.inputs[key] = self._allocate(key)
        n, c = len(segments) * self.canvas_length, self.canvas_length
        inputs.ids[:n].copy_(ids)
        inputs.ids[n:].zero_()
        positions = torch.cat([torch.arange(seg.start_pos, seg.start_pos + c) for seg in segments])
        inputs.positions[:n].copy_(positions)
        inputs.positions[n:].zero_()
        if soft_embeds is None:
            inputs.soft_embeds.zero_()
        else:
            inputs.soft_embeds[:n].copy_(soft_embeds)
            inputs.soft_embeds[n:].zero_()
        for group, rows, mask in zip(self.groups, inputs.rows, inputs.key_masks):
            width = rows.shape[1]
            host_rows = torch.zeros(rows.shape, dtype=torch.long)
            host_mask = torch.zeros(mask.shape, dtype=torch.bool)
            host_mask[:, width:] = True  # every canvas (dummies too) sees its own keys
            visible = [visible_prefix(seg, group.window) for seg in segments]
            lengths = [v.numel() for v in visible]
            flat = self.kv.rows(group.layer_ids[0], torch.cat(visible)).cpu()  # one mapping and one copy per group
            for b, (start, length) in enumerate(zip(itertools.accumulate([0, *lengths]), lengths)):
                host_rows[b, :length] = flat[start : start + length]
                host_mask[b, :length] = True
            rows.copy_(host_rows)
            mask.copy_(host_mask)
        return inputs

    def _allocate(self, key: tuple[int, ...]) -> StepInputs:
        batch, widths = key[0], key[1:]
        n = batch * self.canvas_length
        inputs = StepInputs(
            ids=torch.zeros(n, dtype=torch.long, device=self.device),
            positions=torch.zeros(n, dtype=torch.long, device=self.device),
            soft_embeds=torch.zeros(n, self.hidden_size, dtype=self.dtype, device=self.device),
            rows=tuple(torch.zeros(batch, p, dtype=torch.long, device=self.device) for p in widths),
            key_masks=tuple(torch.zeros(batch, p + self.canvas_length, dtype=torch.bool, device=self.device)
                            for p in widths),
        )  # fmt: skip
        # NOTE: for torch.compile, only the batch and the full groups' context vary; everything else (hidden size,
        # canvas length, the sliding groups' W - 1) stays static, and no size that happens to equal another (B*C and
        # H, say) is unified with it. "maybe": a batch of one is a graph of its own (sizes 0 and 1 specialise).
        for tensor in (inputs.ids, inputs.positions, inputs.soft_embeds, *inputs.rows, *inputs.key_masks):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        for group, rows, mask in zip(self.groups, inputs.rows, inputs.key_masks):
            if group.window is None:
                torch._dynamo.maybe_mark_dynamic(rows, 1)
                torch._dynamo.maybe_mark_dynamic(mask, 1)
        return inputs


def run_step(model, group_of_layer: tuple[int, ...], kv_buffers, ids, positions, soft_embeds, rows, key_masks):
    """The step as one function of tensors (what is compiled or captured): -> last hidden states [B*C, H]."""

    def attend(q, k, v, layer):
        group = group_of_layer[layer.layer_id]
        k_buf, v_buf = kv_buffers[layer.layer_id]
        return canvas_step_attention(q, k, v, k_buf, v_buf, rows[group], key_masks[group])

    return model.denoise_step(ids, positions, soft_embeds, attend)


def run_rounds(model, group_of_layer, steps: int, sampler, tile: int | None, kv_buffers, ids, positions, soft_embeds,
               rows, key_masks, state: gs.GraphSamplerState, argmax, frozen):
    """``steps`` denoise steps of B canvases, the counter-RNG sampler between them, no host sync: the canvas step,
    the LM head, ``sampler`` (graph_sampler.graph_step), the next self-conditioning input, and rows frozen from the
    step they finish on (as the runner freezes them). ``tile``: canvases per LM-head-and-sampler pass (their
    vocab-sized temporaries, runner.sampler_tile_rows; needs a static B), None: all at once.
    -> (ids, soft_embeds, argmax, state, frozen, steps taken [B], positions accepted [B]) after the last step."""
    b = rows[0].shape[0]
    c = key_masks[0].shape[1] - rows[0].shape[1]
    dtype = soft_embeds.dtype
    taken = torch.zeros(b, dtype=torch.int32, device=ids.device)
    accepted = torch.zeros(b, dtype=torch.long, device=ids.device)
    for _ in range(steps):
        hidden = run_step(model, group_of_layer, kv_buffers, ids, positions, soft_embeds, rows, key_masks).view(b, c, -1)
        spans = [slice(None)] if tile is None else [slice(i, i + tile) for i in range(0, b, tile)]
        parts = []
        for span in spans:
            rows_state = gs.GraphSamplerState(*(field[span] for field in state))
            result, advanced = sampler(model.logits(hidden[span].flatten(0, 1)).view(-1, c, model.cfg.vocab_size),
                                       rows_state, dtype)  # fmt: skip
            soft = model.soft_embed(result.self_conditioning_probs)  # the vocab-sized probabilities die here
            parts.append((result.next_canvas, result.argmax, result.accepted.sum(-1), result.done, soft, advanced))
        next_canvas, new_argmax, new_accepted, done, soft_next = (torch.cat([p[i] for p in parts]) for i in range(5))
        advanced = gs.GraphSamplerState(*(torch.cat([p[5][f] for p in parts]) for f in range(len(state))))
        keep = frozen[:, None]
        ids = torch.where(keep, ids.view(b, c), next_canvas).view(-1)
        soft_embeds = torch.where(keep.repeat_interleave(c, 0), soft_embeds, soft_next.view(b * c, -1))
        argmax = torch.where(keep, argmax, new_argmax)
        # NOTE: field by field, not state._replace (dynamo returns a malformed tuple for it)
        state = gs.GraphSamplerState(*(torch.where(frozen.view(-1, *[1] * (new.dim() - 1)), old, new)
                                       for old, new in zip(state, advanced)))  # fmt: skip
        taken = taken + (~frozen).int()
        accepted = accepted + torch.where(frozen, 0, new_accepted)
        frozen = frozen | done
    return ids, soft_embeds, argmax, state, frozen, taken, accepted


class CanvasStep:
    """Canvas-only forwards through the static step; ``__call__`` has the mixed forward's contract for them."""

    def __init__(self, model, kv: KVStore, mode: StepMode = "eager", batch_buckets: Sequence[int] | None = None):
        if mode == "cuda_graph" and not batch_buckets:
            raise ValueError("CUDA graphs need batch buckets (static batch sizes)")
        self.model, self.kv, self.mode = model, kv, mode
        self.planner = CanvasStepPlanner(model, kv, batch_buckets)
        step = functools.partial(run_step, model, self.planner.group_of_layer)
        # NOTE: dynamic batch and context sizes (marked by the planner): one graph for a single canvas and one for any
        # larger batch, whatever the prefix bucket; a static graph per shape costs 20-40 s of compile on a CPU at
        # every new prompt-length bucket.
        self._step = torch.compile(step, fullgraph=True) if mode == "compile" else step
        self._rounds: dict[int, object] = {}  # steps per round -> the compiled (or plain) run_rounds
        self._sampler_inputs: dict[tuple[int, ...], tuple] = {}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self._pool = None
        from sgl_diffusion.runtime.runner import sampler_tile_rows

        self.sampler_tile = sampler_tile_rows(model.cfg.canvas_length, model.cfg.vocab_size)
        if mode != "eager":
            # NOTE: each (graph kind, batch 1 or more, steps, history depth) is a graph of one code object, and at
            # dynamo's default limit of 8 a fullgraph compile raises instead of running; a server needs a few more
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        logger.info("sgl-diffusion: canvas-only rounds run the graph-ready canvas step (%s)", mode)

    def warm_up(self, params, rng: str, steps_per_round: int) -> None:
        """Compile (CPU) or capture (CUDA) before serving, so that no request waits for it: the step for one canvas
        and for a batch (no buckets) or every batch bucket (CUDA graphs), at the smallest context bucket; with the
        counter sampler also the graphed round (``steps_per_round`` steps, and the steps after a round's mixed
        first step). ``params``: sampler parameters for the warm-up canvases (the checkpoint's defaults)."""
        from sgl_diffusion.runtime.runner import CanvasState, make_generator

        c, device = self.planner.canvas_length, self.planner.device
        vocab_size = self.model.cfg.vocab_size
        for n in self.planner.batch_buckets or (1, 2):  # dynamic batch sizes: a graph for one canvas, one for more
            segments = [Segment("canvas", i, c, 0, torch.empty(0, dtype=torch.long, device=device)) for i in range(n)]
            ids = torch.zeros(n * c, dtype=torch.long, device=device)
            self(segments, ids, None)
            if rng != "counter":
                continue
            for steps in {steps_per_round, steps_per_round - 1} - {0}:
                states = [CanvasState.first(params, make_generator(0, device), c, vocab_size, device)
                          for _ in range(n)]  # fmt: skip
                self.rounds(segments, ids, None, states, steps)

    def accepts(self, num_canvases: int) -> bool:
        """Whether a round of that many canvases fits a batch bucket (larger rounds run the mixed forward)."""
        buckets = self.planner.batch_buckets
        return not buckets or num_canvases <= max(buckets)

    def kv_buffers(self):
        return [self.kv.buffers(i) for i in range(len(self.model.layers))]

    @torch.no_grad()
    def __call__(self, segments: Sequence[Segment], ids: torch.Tensor, soft_embeds: torch.Tensor | None):
        """Last hidden states [n*C, H] of the n canvases ``segments`` (flat ids [n*C], soft_embeds [n*C, H] | None)."""
        inputs = self.planner.plan(segments, ids, soft_embeds)
        n = len(segments) * self.planner.canvas_length
        args = (self.kv_buffers(), inputs.ids, inputs.positions, inputs.soft_embeds, inputs.rows, inputs.key_masks)
        with sglang_runtime():
            if self.mode != "cuda_graph":
                return self._step(*args)[:n]
            out = self._replay(("step", *inputs.shape), self._step, args)
        return out[:n].clone()  # the next replay overwrites `out`; the runner may keep rows of it

    @torch.no_grad()
    def rounds(self, segments: Sequence[Segment], ids: torch.Tensor, soft_embeds: torch.Tensor | None,
               states: list, steps: int, frozen: torch.Tensor | None = None) -> list[bool]:
        """``steps`` denoise steps of the canvases ``segments`` (whose runner.CanvasStates are ``states``: plain ones,
        counter RNG) in one call of the step, sampler included; the states advance as DiffusionRunner.run advances
        them, rows in ``frozen`` [n] bool (done already) included. -> done per state, the round's one host read."""
        inputs = self.planner.plan(segments, ids, soft_embeds)
        shape = inputs.shape
        state, argmax, frozen = self._fill_sampler_inputs(shape, states, frozen)
        args = (self.kv_buffers(), inputs.ids, inputs.positions, inputs.soft_embeds, inputs.rows, inputs.key_masks,
                state, argmax, frozen)  # fmt: skip
        with sglang_runtime():
            if self.mode != "cuda_graph":
                out = self._rounds_fn(steps)(*args)
            else:
                out = self._replay(("rounds", steps, state.history.shape[1], *shape), self._rounds_fn(steps), args)
        ids_out, soft_out, argmax_out, state_out, frozen_out, taken, accepted = out
        done = frozen_out[: len(states)].tolist()
        c, k_max = self.planner.canvas_length, state_out.history.shape[1]
        for i, s in enumerate(states):  # copies: a replay overwrites its outputs
            s.canvas = ids_out[i * c : (i + 1) * c].clone()
            s.soft_embeds = soft_out[i * c : (i + 1) * c].clone()
            s.argmax = argmax_out[i].clone()
            s.history = state_out.history[i, k_max - s.params.stability_threshold :].clone()
            s.steps_taken = s.steps_taken + taken[i]
            s.accepted = s.accepted + accepted[i]
            s.step_remaining -= steps
        return done

    def _rounds_fn(self, steps: int):
        if steps not in self._rounds:
            # NOTE: under CUDA graphs only the sampler is compiled (eagerly its hash is ~60 int64 passes; 10x slower
            # on an H200), the rest is captured as it runs; on a CPU the whole round is one compiled graph.
            sampler = torch.compile(gs.graph_step, fullgraph=True) if self.mode == "cuda_graph" else gs.graph_step
            # tiles need a static batch (CUDA graphs); a compiled CPU round keeps B dynamic and samples it whole
            tile = self.sampler_tile if self.mode == "cuda_graph" else None
            fn = functools.partial(run_rounds, self.model, self.planner.group_of_layer, steps, sampler, tile)
            self._rounds[steps] = torch.compile(fn, fullgraph=True) if self.mode == "compile" else fn
        return self._rounds[steps]

    def _fill_sampler_inputs(self, shape, states, done: torch.Tensor | None):
        """The counter sampler's inputs in persistent buffers of the batch's shape: each state's row, dummy canvases
        frozen from the start (with the first row's parameters, so that their unused steps stay finite)."""
        from sgl_diffusion.runtime.runner import counter_sampler_state

        host = counter_sampler_state(states, self.planner.device)
        pad = shape[0] - len(states)
        host = gs.GraphSamplerState(*(torch.cat([t, t[:1].expand(pad, *t.shape[1:])]) for t in host))
        key = (*shape, host.history.shape[1])
        if key not in self._sampler_inputs:
            buffers = (gs.GraphSamplerState(*(torch.empty_like(t) for t in host)),
                       torch.zeros(shape[0], self.planner.canvas_length, dtype=torch.long, device=self.planner.device),
                       torch.zeros(shape[0], dtype=torch.bool, device=self.planner.device))  # fmt: skip
            for tensor in (*buffers[0], buffers[1], buffers[2]):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
            self._sampler_inputs[key] = buffers
        state, argmax, frozen = self._sampler_inputs[key]
        for buffer, value in zip(state, host):
            buffer.copy_(value)
        argmax.zero_()
        for i, s in enumerate(states):
            if s.argmax is not None:
                argmax[i].copy_(s.argmax)
        frozen.zero_()
        if done is not None:
            frozen[: len(states)].copy_(done)
        frozen[len(states) :] = True
        return state, argmax, frozen

    def _replay(self, key, fn, args):
        """``fn(*args)`` as a CUDA graph: captured on the first call for ``key`` (after a warm-up run outside
        capture), replayed over the refilled input buffers after that. Returns the graph's output tensors."""
        if key not in self._graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture: compiles, kernel autotuning, lazy inits
                fn(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = fn(*args)
            self._pool = graph.pool()
            self._graphs[key] = graph, out
            logger.info("sgl-diffusion: captured %s", key)
        graph, out = self._graphs[key]
        graph.replay()
        return out
