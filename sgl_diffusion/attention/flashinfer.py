"""Attention on FlashInfer 0.7.2's batch prefill kernels, over the paged KV pool (page size 1).

Design: sglang's extend pattern, per segment kind and layer geometry.

- ``encode`` (prefill and commit without images): the segments' own K/V are written to the pool first,
  then one paged wrapper, ``causal=True``, over [visible prefix ; own tokens] with
  ``window_left = W - 1`` on sliding layers (FlashInfer keeps keys at positions >= p - window_left for
  the query at p, aligned bottom-right: transformers' window, itself included). No dense mask, however
  long the prompt.
- ``image`` (encode segments with image runs): a separate paged wrapper with a custom [n, P' + n] bool
  mask per segment (window folded in, since an image run ignores it). A plan's mask covers every request
  of the wrapper, hence a wrapper of its own: the other encodes keep their flags and no mask.
- ``canvas``: a ragged wrapper over the canvases' own K/V (``causal=False``, never written to the pool)
  plus a paged wrapper over the visible prefix (all of it on full layers, the last min(P, W - 1) on
  sliding ones; ``causal=False`` and no ``window_left``, which FlashInfer would count per query, not
  from the canvas start), merged by their base-2 LSEs with ``merge_state_in_place``.

Cost per forward: ``plan()`` calls at most 4 wrapper plans per layer geometry (8 for DiffusionGemma;
3 per geometry without image prompts); per layer: one KV write and at most 5 launches (encode, image,
ragged canvas, paged canvas prefix, merge), plus gathers/scatters when a kind's segments are not
contiguous in the batch. A batch of only canvases costs 3 launches per layer.

Why not ``BatchPrefillWithCausalBidirectionalRangesWrapper`` (new in 0.7.x: one paged plan and one
launch per layer for the whole mixed batch, encode rows causal and canvas rows a bidirectional range):
the canvas K/V would have to sit in the pool (temporary slots from sglang's allocator every step), it
needs a custom FA2 variant JIT-compiled per head_dim, and nobody here could run it. The paged, ragged
and merge kernels used instead are the ones sglang's FlashInfer backend runs for every extend.

Kernels: the paged wrappers run FA2 (as in sglang's FlashInfer backend; FA2 is also the only one with custom
masks), the ragged canvas wrapper FA3 on Hopper for the 256-dim sliding layers. FA3 builds prefill for head_dim
64/128/256 only, so the 512-dim full layers run FA2 throughout; FlashInfer JIT-compiles the 512 kernels on first
use (nvcc on the host). ``merge_state_in_place`` launches heads x D / 8 threads in bf16: at most 32 heads
at D = 512 (DiffusionGemma has 16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sgl_diffusion.attention.base import (
    AttnLayer, BaseAttnBackend, LayerGroup, call_kind, dense_encode_mask, indptr, layer_groups, segment_rows,
    visible_prefix,
)  # fmt: skip
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment

WORKSPACE_BYTES = 384 << 20  # FlashInfer's float workspace, shared by every wrapper (they run one at a time)
FA3_HEAD_DIMS = (64, 128, 256)
KINDS = ("encode", "image", "canvas")


@dataclass
class FlashInferCall:
    """Rows of one kind of segment in the flat batch: a slice when contiguous (no gather), else indices."""

    rows: torch.Tensor | slice


@dataclass
class FlashInferCanvasCall(FlashInferCall):
    # canvas-local rows of the canvases that have a visible prefix (slice(None): all of them); None: none has
    prefixed: torch.Tensor | slice | None


@dataclass
class FlashInferGroupPlan:
    write_rows: torch.Tensor | None  # [sum n_encode] buffer rows the encode segments write (None: nothing)
    encode: FlashInferCall | None
    image: FlashInferCall | None
    canvas: FlashInferCanvasCall | None


@dataclass
class FlashInferMetadata:
    writes: torch.Tensor | slice | None  # batch rows of the encode segments' tokens, in write_rows order
    groups: list[FlashInferGroupPlan]  # one per LayerGroup; the wrappers hold the rest of the plan


class _GroupWrappers:
    """One geometry's wrappers: plan fixes head_dim and KV heads, so each geometry has its own set.

    Paged wrappers run FA2, as sglang's FlashInfer backend runs them; the ragged one lets FlashInfer pick FA3 on
    Hopper where FA3 has the head_dim (256), FA2 elsewhere (512; and Blackwell, where sglang keeps it on FA2 too).
    """

    def __init__(self, api, workspace: torch.Tensor, group: LayerGroup, hopper: bool):
        ragged = "auto" if hopper and group.head_dim in FA3_HEAD_DIMS else "fa2"
        self.encode = api.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
        self.image = api.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
        self.canvas_prefix = api.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
        self.canvas_own = api.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=ragged)


class FlashInferBackend(BaseAttnBackend):
    def __init__(self, kv, layers: Sequence[AttnLayer], dtype: torch.dtype, device, api=None,
                 workspace_bytes: int = WORKSPACE_BYTES):
        """``api``: the ``flashinfer`` module (imported here when None; tests hand in an emulator)."""
        super().__init__(kv)
        if api is None:
            import flashinfer as api  # NOTE: imported here: CPU CI never loads FlashInfer unless asked
        self.api = api
        self.dtype = dtype
        self.groups = layer_groups(layers)
        self.group_of = {layer_id: i for i, g in enumerate(self.groups) for layer_id in g.layer_ids}
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        device = torch.device(device)
        hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        self.wrappers = [_GroupWrappers(api, self.workspace, g, hopper) for g in self.groups]

    def plan(self, batch: CanvasBatch) -> None:
        device = batch.input_ids.device
        writers = [s for s in batch.segments if s.writes_kv]
        new_slots = torch.cat([s.new_slots for s in writers]) if writers else None
        plans = []
        for group, wrappers in zip(self.groups, self.wrappers):
            write_rows = self.kv.rows(group.layer_ids[0], new_slots) if writers else None
            by_kind = {kind: [s for s in batch.segments if call_kind(s) == kind] for kind in KINDS}
            plans.append(FlashInferGroupPlan(
                write_rows,
                self._plan_encode(wrappers.encode, by_kind["encode"], group, device, masked=False),
                self._plan_encode(wrappers.image, by_kind["image"], group, device, masked=True),
                self._plan_canvas(wrappers, by_kind["canvas"], group, device),
            ))  # fmt: skip
        batch.attn_metadata = FlashInferMetadata(segment_rows(writers, device) if writers else None, plans)

    def forward(self, q, k, v, layer: AttnLayer, batch: CanvasBatch) -> torch.Tensor:
        meta: FlashInferMetadata = batch.attn_metadata
        plan = meta.groups[self.group_of[layer.layer_id]]
        wrappers = self.wrappers[self.group_of[layer.layer_id]]
        # NOTE: write first: encode segments read their own K/V from the pool, and a canvas may read the
        # KV its own request's commit writes in this forward.
        if plan.write_rows is not None:
            self.kv.store_rows(layer.layer_id, plan.write_rows, k[meta.writes], v[meta.writes])
        pages = self.kv.buffers(layer.layer_id)  # [rows, KV, D]: FlashInfer reads 3-D buffers as NHD pages of 1
        out = torch.empty_like(q)  # every row belongs to exactly one call
        for call, wrapper in ((plan.encode, wrappers.encode), (plan.image, wrappers.image)):
            if call is not None:
                _put(out, call.rows, wrapper.run(q[call.rows], pages, **_out_kwargs(out, call.rows)))
        if plan.canvas is not None:
            call = plan.canvas
            o, lse = wrappers.canvas_own.run(q[call.rows], k[call.rows], v[call.rows], return_lse=True,
                                             **_out_kwargs(out, call.rows))  # fmt: skip
            if call.prefixed is not None:
                o_pre, lse_pre = wrappers.canvas_prefix.run(q[call.rows][call.prefixed], pages, return_lse=True)
                o_sub, lse_sub = o[call.prefixed], lse[call.prefixed]  # views when every canvas has a prefix
                self.api.merge_state_in_place(o_sub, lse_sub, o_pre, lse_pre)
                if not isinstance(call.prefixed, slice):
                    o.index_copy_(0, call.prefixed, o_sub)
            _put(out, call.rows, o)
        return out

    # ---- planning -------------------------------------------------------------------------------

    def _common(self, group: LayerGroup, paged: bool = True) -> dict:
        # paged wrappers read the pool (fp8 with --kv-cache-dtype fp8_e4m3); the ragged one the canvas's own K/V,
        # which come straight from the model in its dtype
        kv_dtype = self.kv.buffers(group.layer_ids[0])[0].dtype if paged else self.dtype
        common = dict(num_qo_heads=group.num_heads, num_kv_heads=group.num_kv_heads, head_dim_qk=group.head_dim,
                      head_dim_vo=group.head_dim, sm_scale=1.0,  # q and k are RMS-normed (Gemma 4)
                      q_data_type=self.dtype, kv_data_type=kv_dtype)  # fmt: skip
        return common | {"page_size": 1} if paged else common

    def _rows(self, group: LayerGroup, slots: list[torch.Tensor], device) -> torch.Tensor:
        """Pool rows [sum] int32 of each segment's slot list, concatenated."""
        return self.kv.rows(group.layer_ids[0], torch.cat(slots).to(device)).to(torch.int32)

    def _plan_encode(self, wrapper, segments: list[Segment], group: LayerGroup, device, masked: bool):
        """Paged, over [visible prefix ; own tokens]: causal + window, or a custom mask (image runs)."""
        if not segments:
            return None
        prefixes = [visible_prefix(s, group.window) for s in segments]
        slots = [torch.cat([p, s.new_slots.to(p.device)]) for p, s in zip(prefixes, segments)]
        extra = dict(causal=True, window_left=-1 if group.window is None else group.window - 1)
        if masked:
            masks = [dense_encode_mask(s, p.numel(), group.window).flatten() for s, p in zip(segments, prefixes)]
            extra = dict(custom_mask=torch.cat(masks).to(device), causal=False, window_left=-1)
        wrapper.plan(
            indptr([s.num_tokens for s in segments], "cpu"), indptr([x.numel() for x in slots], "cpu"),
            self._rows(group, slots, device), torch.ones(len(segments), dtype=torch.int32),
            **self._common(group), **extra,
        )  # fmt: skip
        return FlashInferCall(segment_rows(segments, device))

    def _plan_canvas(self, wrappers: _GroupWrappers, segments: list[Segment], group: LayerGroup, device):
        """Ragged over the canvases themselves + paged over their visible prefixes, both non-causal."""
        if not segments:
            return None
        qo = indptr([s.num_tokens for s in segments], "cpu")
        wrappers.canvas_own.plan(qo, qo, **self._common(group, paged=False), causal=False)
        prefixes = [visible_prefix(s, group.window) for s in segments]
        with_prefix = [i for i, p in enumerate(prefixes) if p.numel()]  # empty only after an empty prompt
        prefixed = None
        if with_prefix:
            wrappers.canvas_prefix.plan(
                indptr([segments[i].num_tokens for i in with_prefix], "cpu"),
                indptr([prefixes[i].numel() for i in with_prefix], "cpu"),
                self._rows(group, [prefixes[i] for i in with_prefix], device),
                torch.ones(len(with_prefix), dtype=torch.int32), **self._common(group), causal=False,
            )  # fmt: skip
            prefixed = slice(None)
            if len(with_prefix) < len(segments):
                bounds = qo.tolist()  # canvas-local rows of each segment
                prefixed = torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in with_prefix]).to(device)
        return FlashInferCanvasCall(segment_rows(segments, device), prefixed)


def _out_kwargs(out: torch.Tensor, rows) -> dict:
    """Let the kernel write straight into ``out`` when the rows are contiguous."""
    return {"out": out[rows]} if isinstance(rows, slice) else {}


def _put(out: torch.Tensor, rows, result: torch.Tensor) -> None:
    if not isinstance(rows, slice):
        out.index_copy_(0, rows, result)
