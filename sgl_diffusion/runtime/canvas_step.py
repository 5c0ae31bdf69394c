"""The graph-ready canvas step: a round as host planning, then one static-shape tensor function.

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

Rounds that also encode (a prompt's prefill or a finished canvas's commit, beside canvases or alone) take the same
layout in rows of C tokens (``CanvasStepPlanner.plan_batch``): a canvas is one row, an encode segment is cut into
rows of C tokens (the last one padded), and every row gets a per-query mask over [its context ; its own C keys]
(causal, and the window on sliding groups, for encode rows; everything it sees for canvas rows). An encode row's
context is the request's cached context plus the rows of its segment before it. Each layer writes the encode rows'
K/V into the KV buffers first (padding tokens and canvases write to buffer row 0, the pools' padding row), then
every row gathers its context, so a canvas reads the commit its request makes in the same round, as in the mixed
forward.

``CanvasStep`` runs it one of three ways: ``eager`` (the reference, used by tests), ``compile`` (torch.compile with
fullgraph=True, the CPU's ``--enable-torch-compile``; dynamic shapes, so batch sizes and prefix buckets do not
recompile past the first graphs) or ``cuda_graph`` (one CUDA graph per (batch bucket, prefix bucket), captured on
first use in a shared memory pool and replayed after the planner refills its buffers; unverified on a GPU so far).

The RNG is not in here: the step draws nothing. In exact mode the draws are the runner's, from each request's own
generator in transformers' order, so a compiled or captured step changes only rounding. A judging step (``judge``,
a compiled CPU server in exact mode: ``run_judged_step``) also computes, inside the graph, everything the sampler
decides before its draws (graph_sampler.decide: LM head, temperature, probabilities, entropies, acceptance, stopping
rule, next self-conditioning input); the runner then only draws and picks (~1 ms less host work per round at batch
1 on this CPU). The counter RNG puts the draws in the graph too (``rounds``).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from sgl_diffusion.attention.base import KVStore, layer_groups, visible_prefix
from sgl_diffusion.attention.sdpa import MASK_BUDGET_BYTES, canvas_step_attention
from sgl_diffusion.models.parallel import sglang_runtime
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
from sgl_diffusion.sampling import graph_sampler as gs

logger = logging.getLogger(__name__)

PREFIX_GRANULE = 64  # the smallest full-attention prefix bucket; buckets double from here
# prompt tokens a graphed round encodes at most (more: the mixed forward): each C-token row gathers its whole context
PREFILL_TOKENS_LIMIT = 2048
RECOMPILE_LIMIT = 64  # graphs per compiled function (dynamo's default is 8)
# NOTE: no guards on the model's modules, only on the step's inputs (which still pick the graph): checking ~3,000
# parameters and attributes cost 0.4 ms a call (a 1-canvas round is ~6 ms), and nothing changes them after warm-up.
# A tensor swapped in is still read (parameters are graph inputs, fetched from the module on every call); only a new
# shape or dtype, or a changed module attribute, would go unseen.
GUARD_FILTER = torch.compiler.skip_guard_on_all_nn_modules_unsafe


def compile_step(fn):
    # a new options dict each time: torch.compile pops guard_filter_fn out of the one it is given
    return torch.compile(fn, fullgraph=True, options={"guard_filter_fn": GUARD_FILTER})


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
    # per layer group, [B, P_g + C] bool: True on real context rows and own keys; rounds that encode: [B, C, P_g + C],
    # per query
    key_masks: tuple[torch.Tensor, ...]
    # rounds that encode: [B*C, 1] bool, True on canvas rows (the decoder's layer scalars and self-conditioning);
    # None: every row is a canvas
    decoder: torch.Tensor | None = None
    # rounds that encode: per layer group, [B*C] int64 buffer rows each token's K/V is written to (0, the padding
    # row, for canvas and padding tokens); None: nothing is written
    writes: tuple[torch.Tensor, ...] | None = None

    @property
    def shape(self) -> tuple[int | str, ...]:
        """(B, P per layer group, and "encode" for a round that encodes): the key of the graph reading these buffers."""
        kind = () if self.decoder is None else ("encode",)
        return (self.rows[0].shape[0], *(rows.shape[1] for rows in self.rows), *kind)


@dataclass(frozen=True)
class _Row:
    """C queries of one segment in a round that encodes: tokens [start, start + length) of ``seg``."""

    seg: Segment
    start: int
    length: int

    def context(self, window: int | None) -> torch.Tensor:
        """Slots of what the row's queries may see before it: the cached context, then the segment's earlier rows
        (encode rows); the last W - 1 of them on a sliding group."""
        if self.seg.kind == "canvas":
            return visible_prefix(self.seg, window)
        before = torch.cat([self.seg.prefix_slots, self.seg.new_slots[: self.start]])
        return before if window is None else before[max(0, before.numel() - (window - 1)) :]


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

    def plan_batch(self, batch: CanvasBatch) -> tuple[StepInputs, torch.Tensor]:
        """Fill the inputs of a round that encodes (``batch``: any segments without image runs) in rows of C tokens.
        Returns the persistent StepInputs of its shape and the rows of its canvases [n] int64, in batch order."""
        c = self.canvas_length
        rows = [_Row(seg, start, min(c, seg.num_tokens - start)) for seg in batch.segments
                for start in range(0, seg.num_tokens, c)]  # fmt: skip
        key = self.batch_shape(batch)
        inputs = self.inputs.get(key)
        if inputs is None:
            inputs = self.inputs[key] = self._allocate(key)
        canvas_rows = self._fill_tokens(inputs, batch, rows)
        for group, context_rows, mask, writes in zip(self.groups, inputs.rows, inputs.key_masks, inputs.writes):
            self._fill_group(group, rows, context_rows, mask, writes)
        return inputs, canvas_rows

    def _fill_tokens(self, inputs: StepInputs, batch: CanvasBatch, rows: list[_Row]) -> torch.Tensor:
        """ids, positions, decoder flags and self-conditioning input of every row (padding rows: zeros);
        -> the canvas rows [n] on the device."""
        r, c = inputs.rows[0].shape[0], self.canvas_length
        ids = torch.zeros(r, c, dtype=torch.long)
        positions = torch.zeros(r, c, dtype=torch.long)
        host_ids = batch.input_ids.cpu()
        for i, row in enumerate(rows):
            offset = row.seg.offset + row.start
            ids[i, : row.length] = host_ids[offset : offset + row.length]
            positions[i] = row.seg.start_pos + row.start + torch.arange(c)
        canvas_rows = torch.tensor([i for i, row in enumerate(rows) if row.seg.kind == "canvas"], dtype=torch.long)
        decoder = torch.zeros(r, c, dtype=torch.bool)
        decoder[canvas_rows] = True
        inputs.ids.copy_(ids.view(-1))
        inputs.positions.copy_(positions.view(-1))
        inputs.decoder.copy_(decoder.view(-1, 1))
        inputs.soft_embeds.zero_()
        canvas_rows = canvas_rows.to(self.device)
        if batch.canvas_soft_embeds is not None and canvas_rows.numel():
            soft = inputs.soft_embeds.view(r, c, -1)
            soft[canvas_rows] = batch.canvas_soft_embeds.view(-1, c, self.hidden_size).to(self.dtype)
        return canvas_rows

    def _fill_group(self, group, rows: list[_Row], context_rows, mask, writes) -> None:
        """One layer group's context rows [R, P], per-query masks [R, C, P + C] and KV write rows [R*C]."""
        r, width = context_rows.shape
        c = self.canvas_length
        own = torch.arange(c)
        causal = own[None, :] <= own[:, None]  # [query, own key]
        if group.window is not None:
            causal &= own[None, :] > own[:, None] - group.window
        context = [row.context(group.window) for row in rows]
        lengths = [ctx.numel() for ctx in context]
        new = [row.seg.new_slots[row.start : row.start + row.length] for row in rows if row.seg.kind != "canvas"]
        flat = self.kv.rows(group.layer_ids[0], torch.cat([*context, *new])).cpu()  # one mapping and one copy
        new_rows = iter(torch.split(flat[sum(lengths) :], [n.numel() for n in new]))
        host_rows = torch.zeros(r, width, dtype=torch.long)
        host_mask = torch.zeros(r, c, width + c, dtype=torch.bool)
        host_mask[:, :, width:] = causal  # encode rows, and padding rows of a batch bucket, which see nothing else
        host_writes = torch.zeros(r, c, dtype=torch.long)
        for i, (row, start, length) in enumerate(zip(rows, itertools.accumulate([0, *lengths]), lengths)):
            host_rows[i, :length] = flat[start : start + length]
            if row.seg.kind == "canvas":  # all of its context and all of itself
                host_mask[i, :, :length] = True
                host_mask[i, :, width:] = True
                continue
            host_writes[i, : row.length] = next(new_rows)
            if group.window is None:
                host_mask[i, :, :length] = True
            else:  # context key j sits length - j tokens before the row; query q sees W - 1 tokens back
                distance = length - torch.arange(length)[None, :] + own[:, None]
                host_mask[i, :, :length] = distance < group.window
        context_rows.copy_(host_rows)
        mask.copy_(host_mask)
        writes.copy_(host_writes.view(-1))

    def num_rows(self, batch: CanvasBatch) -> int:
        """Rows of C tokens a round that encodes takes, before any padding."""
        return sum(-(-seg.num_tokens // self.canvas_length) for seg in batch.segments)

    def batch_shape(self, batch: CanvasBatch) -> tuple[int | str, ...]:
        """(rows, P per layer group, "encode") of a round that encodes: the key of its graph."""
        c = self.canvas_length
        num_rows = self.num_rows(batch)
        widths = []
        for group in self.groups:
            if group.window is not None:
                widths.append(group.window - 1)
            else:  # an encode segment's last row sees its whole context but its own last row
                longest = max(seg.start_pos + (seg.num_tokens - 1) // c * c * (seg.kind != "canvas")
                              for seg in batch.segments)  # fmt: skip
                widths.append(prefix_bucket(longest))
        if not self.batch_buckets:
            # NOTE: two rows at least (a lone commit gets a padding row): a compiled graph of one row would be another
            # graph, with its own 15-30 s of compile on a CPU, for the cost of one row
            num_rows = max(num_rows, 2)
        return (batch_bucket(num_rows, self.batch_buckets), *widths, "encode")

    def _allocate(self, key: tuple[int | str, ...]) -> StepInputs:
        encodes = key[-1] == "encode"
        batch, widths = key[0], key[1 : len(key) - encodes]
        c = self.canvas_length
        n = batch * c
        zeros = functools.partial(torch.zeros, device=self.device)
        inputs = StepInputs(
            ids=zeros(n, dtype=torch.long),
            positions=zeros(n, dtype=torch.long),
            soft_embeds=zeros(n, self.hidden_size, dtype=self.dtype),
            rows=tuple(zeros(batch, p, dtype=torch.long) for p in widths),
            key_masks=tuple(zeros(batch, *(c,) * encodes, p + c, dtype=torch.bool) for p in widths),
            decoder=zeros(n, 1, dtype=torch.bool) if encodes else None,
            writes=tuple(zeros(n, dtype=torch.long) for _ in widths) if encodes else None,
        )
        # NOTE: for torch.compile, only the batch and the full groups' context vary; everything else (hidden size,
        # canvas length, the sliding groups' W - 1) stays static, and no size that happens to equal another (B*C and
        # H, say) is unified with it. "maybe": a batch of one is a graph of its own (sizes 0 and 1 specialise).
        for tensor in (inputs.ids, inputs.positions, inputs.soft_embeds, *inputs.rows, *inputs.key_masks,
                       *(() if inputs.decoder is None else (inputs.decoder, *inputs.writes))):  # fmt: skip
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        for group, rows, mask in zip(self.groups, inputs.rows, inputs.key_masks):
            if group.window is None:
                torch._dynamo.maybe_mark_dynamic(rows, 1)
                torch._dynamo.maybe_mark_dynamic(mask, mask.dim() - 1)
        return inputs


def run_step(model, group_of_layer: tuple[int, ...], kv_buffers, ids, positions, soft_embeds, rows, key_masks,
             decoder=None, writes=None):
    """The step as one function of tensors (what is compiled or captured): -> last hidden states [B*C, H].
    ``decoder`` and ``writes`` (StepInputs): a round that encodes; None, canvases only."""

    def attend(q, k, v, layer):
        group = group_of_layer[layer.layer_id]
        k_buf, v_buf = kv_buffers[layer.layer_id]
        return canvas_step_attention(q, k, v, k_buf, v_buf, rows[group], key_masks[group],
                                     None if writes is None else writes[group])  # fmt: skip

    return model.denoise_step(ids, positions, soft_embeds, attend, decoder)


def run_judged_step(model, group_of_layer: tuple[int, ...], kv_buffers, ids, positions, soft_embeds, rows, key_masks,
                    decoder, writes, decide_rows, state: gs.GraphSamplerState):
    """The step, then for the rows ``decide_rows`` [m] int64 the LM head, everything the sampler decides before its
    draws (graph_sampler.decide, ``state`` [m] their sampler rows) and the next self-conditioning input.
    -> (hidden [R, C, H] of every row, then for the m rows: argmax, accepted, mean_entropy, stable, done,
    probs [m, C, V] for the draws, soft [m, C, H])."""
    hidden = run_step(model, group_of_layer, kv_buffers, ids, positions, soft_embeds, rows, key_masks, decoder, writes)
    c = key_masks[0].shape[-1] - rows[0].shape[1]
    hidden = hidden.view(-1, c, hidden.shape[-1])
    chosen = hidden[decide_rows]
    logits = model.logits(chosen.flatten(0, 1)).view(chosen.shape[0], c, -1)
    d = gs.decide(logits, state, soft_embeds.dtype)
    soft = model.soft_embed(d.self_conditioning_probs)  # the vocab-sized probabilities die here
    return hidden, d.argmax, d.accepted, d.mean_entropy, d.stable, d.done, d.probs, soft


class Judged(NamedTuple):
    """A round's canvases after the compiled part of their step (``CanvasStep.judged``), in batch order."""

    hidden: torch.Tensor  # [n, C, H] last hidden states
    # None when no sampler rows were given; its self_conditioning_probs are already embedded: ``soft``
    decision: gs.Decision | None
    soft: torch.Tensor | None  # [n, C, H] the next step's self-conditioning input


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

    def __init__(self, model, kv: KVStore, mode: StepMode = "eager", batch_buckets: Sequence[int] | None = None,
                 judge: bool = False):
        """``judge`` (exact RNG, not under CUDA graphs): every round runs ``run_judged_step``, the sampler's decision
        inside the step, and the runner draws from the requests' generators after it (``judged``)."""
        if mode == "cuda_graph" and not batch_buckets:
            raise ValueError("CUDA graphs need batch buckets (static batch sizes)")
        self.model, self.kv, self.mode = model, kv, mode
        self.planner = CanvasStepPlanner(model, kv, batch_buckets)
        step = functools.partial(run_step, model, self.planner.group_of_layer)
        judged = functools.partial(run_judged_step, model, self.planner.group_of_layer)
        # NOTE: dynamic batch and context sizes (marked by the planner): one graph for a single canvas and one for any
        # larger batch, whatever the prefix bucket; a static graph per shape costs 20-40 s of compile on a CPU at
        # every new prompt-length bucket.
        self._step = compile_step(step) if mode == "compile" else step
        self._judged = compile_step(judged) if mode == "compile" else judged
        from sgl_diffusion.runtime.runner import sampler_tile_rows

        self.sampler_tile = sampler_tile_rows(model.cfg.canvas_length, model.cfg.vocab_size)
        # NOTE: float32 only: compiled, inductor drops the bf16 rounding of the scaled logits that transformers'
        # self-conditioning input keeps (eb._self_conditioning_probs); and not with a vocabulary so large that a
        # sampler tile is one canvas (the real model: a decision of even two rows would not fit beside the round's)
        self.judges = (judge and mode != "cuda_graph" and model.embed_tokens.weight.dtype == torch.float32
                       and self.sampler_tile >= 2)  # fmt: skip
        # sampler history rows in a judging graph (warm_up: the checkpoint's stability threshold): rows with fewer are
        # padded to it, rows with more take the eager sampler (another depth would be another graph)
        self.history_depth = 1
        self._rounds: dict[int, object] = {}  # steps per round -> the compiled (or plain) run_rounds
        self._sampler_inputs: dict[tuple[int, ...], tuple] = {}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self._pool = None
        if mode != "eager":
            # NOTE: each (graph kind, batch 1 or more, steps, history depth) is a graph of one code object, and at
            # dynamo's default limit of 8 a fullgraph compile raises instead of running; a server needs a few more
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        logger.info("sgl-diffusion: canvas-only rounds run the graph-ready canvas step (%s)", mode)

    def warm_up(self, params, rng: str, steps_per_round: int) -> None:
        """Compile (CPU) or capture (CUDA) before serving, so that no request waits for it: the step for one canvas
        and for a batch (no buckets) or every batch bucket (CUDA graphs), at the smallest context bucket, for
        canvases alone and for a round that also encodes; with the
        counter sampler also the graphed round (``steps_per_round`` steps, and the steps after a round's mixed
        first step). ``params``: sampler parameters for the warm-up canvases (the checkpoint's defaults)."""
        from sgl_diffusion.runtime.runner import CanvasState, make_generator

        c, device = self.planner.canvas_length, self.planner.device
        vocab_size = self.model.cfg.vocab_size
        nothing = torch.empty(0, dtype=torch.long, device=device)
        self.history_depth = params.stability_threshold
        for n in self.planner.batch_buckets or (1, 2):  # dynamic batch sizes: a graph for one canvas, one for more
            segments = [Segment("canvas", i, c, 0, nothing) for i in range(n)]
            ids = torch.zeros(n * c, dtype=torch.long, device=device)
            self(segments, ids, None)
            # a round that encodes: a commit (alone: a finished answer's last canvas) and n - 1 canvases; it writes
            # its KV to slot 0, the pools' padding slot
            commit = Segment("commit", 0, c, 0, nothing, torch.zeros(c, dtype=torch.long, device=device))
            self.encode_round(CanvasBatch([commit, *segments[1:]], ids))
            if rng != "counter":
                continue
            for steps in {steps_per_round, steps_per_round - 1} - {0}:
                states = [CanvasState.first(params, make_generator(0, device), c, vocab_size, device)
                          for _ in range(n)]  # fmt: skip
                self.rounds(segments, ids, None, states, steps)

    def takes(self, batch: CanvasBatch) -> bool:
        """Whether the round runs here (canvases alone: ``accepts``; a round that encodes: ``accepts_batch``)."""
        if batch.token_kinds == "canvas":
            return self.accepts(batch.segments)
        return self.accepts_batch(batch)

    def accepts(self, segments: Sequence[Segment]) -> bool:
        """Whether a round of these canvases runs here: a batch bucket holds them and their attention fits the budget
        (``_fits``; many canvases over long contexts run the mixed forward's kernels instead)."""
        if not self._in_a_bucket(len(segments)):
            return False
        rows, *widths = self.planner.shape(segments)
        return self._fits(rows, widths)

    def _in_a_bucket(self, rows: int) -> bool:
        buckets = self.planner.batch_buckets
        return not buckets or rows <= max(buckets)

    def _fits(self, rows: int, widths: Sequence[int]) -> bool:
        """Whether a round's query-key pairs per head, [rows, C, P + C] over its widest layer group, stay within
        MASK_BUDGET_BYTES: a round that encodes builds that many mask bools on the host, and one SDPA call scores
        them all at once (on a GPU at head dim 512 maybe with torch's math kernel: 4 bytes a pair and head)."""
        c = self.planner.canvas_length
        return rows * c * (max(widths) + c) <= MASK_BUDGET_BYTES

    def accepts_batch(self, batch: CanvasBatch) -> bool:
        """Whether a round that encodes runs here (``encode_round``): no images, a batch bucket holds its rows, its
        prompts are short (PREFILL_TOKENS_LIMIT), its masks fit MASK_BUDGET_BYTES (many canvases over long contexts
        run the mixed forward's kernels instead) and, under CUDA graphs, it commits canvases but prefills nothing (a
        long prompt's rows are for FlashInfer's causal kernels, not a masked SDPA)."""
        if batch.image_embeds is not None or any(seg.image_runs for seg in batch.segments):
            return False
        prefill = sum(seg.num_tokens for seg in batch.segments if seg.kind == "prefill")
        if prefill > (0 if self.mode == "cuda_graph" else PREFILL_TOKENS_LIMIT):
            return False
        if not self._in_a_bucket(self.planner.num_rows(batch)):
            return False
        rows, *widths = self.planner.batch_shape(batch)[:-1]
        return self._fits(rows, widths)

    def kv_buffers(self):
        return [self.kv.buffers(i) for i in range(len(self.model.layers))]

    @torch.no_grad()
    def judged(self, batch: CanvasBatch, state: gs.GraphSamplerState | None) -> Judged:
        """A round that ``takes`` runs here, with the sampler's decision for its n canvases computed in the step:
        ``state`` [n] their sampler rows; None: hidden states only (two dummy rows decide, whatever n: one graph
        serves both, and a round the eager sampler steps pays for two rows of LM head, not n). Writes the encode
        segments' KV. -> Judged, canvases in batch order."""
        n = len(batch.canvas_segments)
        if batch.token_kinds == "canvas":
            inputs = self.planner.plan(batch.segments, batch.input_ids, batch.canvas_soft_embeds)
            canvas_rows = torch.arange(n, device=self.planner.device)
        else:
            inputs, canvas_rows = self.planner.plan_batch(batch)
        # NOTE: two rows at least, repeats of the first (one row would be another graph; sizes 0 and 1 specialise)
        deciding = state is not None
        decide_rows = canvas_rows if deciding else canvas_rows[:0]
        first = decide_rows[:1] if decide_rows.numel() else torch.zeros(1, dtype=torch.long, device=self.planner.device)
        decide_rows = torch.cat([decide_rows, first.expand(max(0, 2 - decide_rows.numel()))])
        torch._dynamo.maybe_mark_dynamic(decide_rows, 0)
        state = self._padded_state(state, decide_rows.numel())
        args = (self.kv_buffers(), inputs.ids, inputs.positions, inputs.soft_embeds, inputs.rows, inputs.key_masks,
                inputs.decoder, inputs.writes, decide_rows, state)  # fmt: skip
        with sglang_runtime():
            hidden, argmax, accepted, mean_entropy, stable, done, probs, soft = self._judged(*args)
        hidden = hidden[canvas_rows]
        if not deciding:
            return Judged(hidden, None, None)
        decision = gs.Decision(argmax[:n], probs[:n], None, None, accepted[:n], mean_entropy[:n], stable[:n], done[:n])
        return Judged(hidden, decision, soft[:n])

    def _padded_state(self, state: gs.GraphSamplerState | None, rows: int) -> gs.GraphSamplerState:
        """``state`` padded to ``rows`` with repeats of its first row (none: rows that stop at once) and to
        ``history_depth`` history rows (a shorter history is a window of a longer one: graph_sampler.GraphSamplerState),
        each field's batch dimension marked dynamic."""
        c = self.planner.canvas_length
        if state is not None and state.history.shape[1] < self.history_depth:
            n, k = state.history.shape[:2]
            older = torch.full((n, self.history_depth - k, c), -1, dtype=torch.long, device=self.planner.device)
            state = gs.GraphSamplerState(*state[:-1], torch.cat([older, state.history], dim=1))
        if state is None:
            one = lambda value, dtype: torch.full((rows,), value, dtype=dtype, device=self.planner.device)  # noqa: E731
            state = gs.GraphSamplerState(
                one(0, torch.int64), one(0, torch.int64), one(1, torch.int32), one(1, torch.int32),
                one(1.0, torch.float64), one(1.0, torch.float64), one(0.0, torch.float32), one(0.0, torch.float32),
                one(0, torch.int64),
                torch.full((rows, self.history_depth, c), -1, dtype=torch.long, device=self.planner.device))
        pad = rows - state.history.shape[0]
        state = gs.GraphSamplerState(*(torch.cat([t, t[:1].expand(pad, *t.shape[1:])]) if pad else t for t in state))
        for tensor in state:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return state

    @torch.no_grad()
    def __call__(self, segments: Sequence[Segment], ids: torch.Tensor, soft_embeds: torch.Tensor | None):
        """Last hidden states [n*C, H] of the n canvases ``segments`` (flat ids [n*C], soft_embeds [n*C, H] | None)."""
        if self.judges:  # the graph a judging step has (the decision of dummy rows, unused)
            return self.judged(CanvasBatch(list(segments), ids, soft_embeds), None).hidden.flatten(0, 1)
        inputs = self.planner.plan(segments, ids, soft_embeds)
        n = len(segments) * self.planner.canvas_length
        args = (self.kv_buffers(), inputs.ids, inputs.positions, inputs.soft_embeds, inputs.rows, inputs.key_masks)
        with sglang_runtime():
            if self.mode != "cuda_graph":
                return self._step(*args)[:n]
            out = self._replay(("step", *inputs.shape), self._step, args)
        return out[:n].clone()  # the next replay overwrites `out`; the runner may keep rows of it

    @torch.no_grad()
    def encode_round(self, batch: CanvasBatch) -> torch.Tensor | None:
        """The mixed forward's contract for a round that encodes (``accepts_batch``): writes the encode segments'
        KV and returns the canvases' last hidden states [n*C, H] (None without canvases)."""
        if self.judges:
            hidden = self.judged(batch, None).hidden
            return hidden.flatten(0, 1) if hidden.shape[0] else None
        inputs, canvas_rows = self.planner.plan_batch(batch)
        args = (self.kv_buffers(), inputs.ids, inputs.positions, inputs.soft_embeds, inputs.rows, inputs.key_masks,
                inputs.decoder, inputs.writes)  # fmt: skip
        with sglang_runtime():
            if self.mode != "cuda_graph":
                out = self._step(*args)
            else:
                out = self._replay(("step", *inputs.shape), self._step, args)
        if not canvas_rows.numel():
            return None
        c = self.planner.canvas_length
        return out.view(-1, c, out.shape[-1])[canvas_rows].flatten(0, 1)  # a copy: the next replay overwrites `out`

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
            self._rounds[steps] = compile_step(fn) if self.mode == "compile" else fn
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
