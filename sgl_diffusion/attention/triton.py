"""Attention on sglang's Triton extend kernel, over the paged KV pool (page size 1).

sglang's ``extend_attention_fwd`` attends a batch of queries to [prefix read from the pool through
``kv_indices`` ; the queries' own k/v handed in as tensors] in one kernel: exactly a segment's
shape, with no LSE merge. One call per kind of segment and layer geometry:

- ``encode`` (prefill and commit without images): ``is_causal`` and, on sliding layers,
  ``sliding_window_size = W - 1`` (the kernel keeps key j for query i when i <= j + W - 1, counting
  the listed prefix and the own tokens as one sequence, i.e. transformers' window);
- ``image`` (encode segments with image runs): a custom [n, P' + n] mask per segment with the window
  folded in, since an image run ignores it; the only place a dense mask is built;
- ``canvas``: non-causal, no window, the prefix list cut to the visible context.

Per forward: ``plan()`` builds at most 3 index sets per layer geometry (2 for DiffusionGemma);
per layer: one KV write and at most 3 kernel launches (1 for a batch of only canvases), plus a
gather/scatter of q, k, v and the output when a kind's segments are not contiguous in the batch.

This is the fallback where FlashInfer is missing, and the backend whose kernels CI checks
numerically on the CPU (``TRITON_INTERPRET=1``, float32: the interpreter's bf16 ``tl.dot`` is broken).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sgl_diffusion.attention.base import (
    AttnLayer, BaseAttnBackend, CallKind, LayerGroup, call_kind, dense_encode_mask, indptr, layer_groups,
    segment_rows, visible_prefix,
)  # fmt: skip
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment

KINDS: tuple[CallKind, ...] = ("encode", "image", "canvas")


@dataclass
class TritonCall:
    """One kernel launch per layer of a group: the segments of one kind."""

    kind: CallKind
    rows: torch.Tensor | slice  # the queries' rows in the flat batch (a slice: contiguous, no gather)
    qo_indptr: torch.Tensor  # [B + 1] int32, on device
    kv_indptr: torch.Tensor  # [B + 1] int32 over the visible prefixes, on device
    kv_indices: torch.Tensor  # [sum P'] int64 buffer rows of the visible prefixes, on device
    max_len: int  # longest segment: the kernel's grid, a host int so forward never syncs
    causal: bool
    window: int  # the kernel's sliding_window_size: W - 1 for encode calls of sliding layers, else -1
    custom_mask: torch.Tensor | None = None  # [sum n * (P' + n)] bool, image calls only
    mask_indptr: torch.Tensor | None = None  # [B + 1] int64


@dataclass
class TritonGroupPlan:
    write_rows: torch.Tensor | None  # [sum n_encode] buffer rows the encode segments write (None: nothing)
    calls: list[TritonCall]


@dataclass
class TritonMetadata:
    writes: torch.Tensor | slice | None  # batch rows of the encode segments' tokens, in write_rows order
    groups: list[TritonGroupPlan]  # one per LayerGroup of the backend


class TritonBackend(BaseAttnBackend):
    def __init__(self, kv, layers: Sequence[AttnLayer]):
        super().__init__(kv)
        # NOTE: imported here, not at module level: CPU CI never loads Triton unless asked, and under
        # TRITON_INTERPRET=1 the kernel must be defined after the variable is set.
        from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

        self.kernel = extend_attention_fwd
        self.groups = layer_groups(layers)
        self.group_of = {layer_id: i for i, g in enumerate(self.groups) for layer_id in g.layer_ids}

    def plan(self, batch: CanvasBatch) -> None:
        device = batch.input_ids.device
        writers = [s for s in batch.segments if s.writes_kv]
        new_slots = torch.cat([s.new_slots for s in writers]) if writers else None
        groups = []
        for group in self.groups:
            layer = group.layer_ids[0]
            write_rows = self.kv.rows(layer, new_slots) if writers else None
            calls = []
            for kind in KINDS:
                segments = [s for s in batch.segments if call_kind(s) == kind]
                if segments:
                    calls.append(self._plan_call(kind, segments, group, device))
            groups.append(TritonGroupPlan(write_rows, calls))
        batch.attn_metadata = TritonMetadata(segment_rows(writers, device) if writers else None, groups)

    def forward(self, q, k, v, layer: AttnLayer, batch: CanvasBatch) -> torch.Tensor:
        meta: TritonMetadata = batch.attn_metadata
        plan = meta.groups[self.group_of[layer.layer_id]]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        # NOTE: write first: a canvas may read the KV its own request's commit writes in this forward.
        if plan.write_rows is not None:
            self.kv.store_rows(layer.layer_id, plan.write_rows, k[meta.writes], v[meta.writes])
        k_buf, v_buf = self.kv.buffers(layer.layer_id)
        out = torch.empty_like(q)  # every row belongs to exactly one call
        for call in plan.calls:
            contiguous = isinstance(call.rows, slice)
            q_c, k_c, v_c = q[call.rows], k[call.rows], v[call.rows]  # views, or gathers of a kind's rows
            o_c = out[call.rows] if contiguous else torch.empty_like(q_c)
            self.kernel(
                q_c, k_c, v_c, o_c, k_buf, v_buf, call.qo_indptr, call.kv_indptr, call.kv_indices,
                call.custom_mask, call.causal, call.mask_indptr, call.max_len, 1.0, 1.0,
                sm_scale=1.0,  # q and k are RMS-normed (Gemma 4)
                skip_prefix_custom_mask=False, sliding_window_size=call.window,
            )  # fmt: skip
            if not contiguous:
                out.index_copy_(0, call.rows, o_c)
        return out

    def _plan_call(self, kind: CallKind, segments: list[Segment], group: LayerGroup, device) -> TritonCall:
        layer = group.layer_ids[0]
        prefixes = [visible_prefix(s, group.window) for s in segments]
        lengths = [s.num_tokens for s in segments]
        kv_indices = self.kv.rows(layer, torch.cat(prefixes).to(device)).long()
        call = TritonCall(
            kind, segment_rows(segments, device), indptr(lengths, device),
            indptr([p.numel() for p in prefixes], device), kv_indices, max(lengths), causal=kind == "encode",
            window=group.window - 1 if kind == "encode" and group.window is not None else -1,
        )  # fmt: skip
        if kind == "image":
            # NOTE: causal stays False: the kernel would stop each query block at the diagonal, and an
            # image run's queries see keys after them.
            masks = [dense_encode_mask(s, p.numel(), group.window).flatten() for s, p in zip(segments, prefixes)]
            call.custom_mask = torch.cat(masks).to(device)
            sizes = torch.tensor([0] + [m.numel() for m in masks], dtype=torch.int64)
            call.mask_indptr = sizes.cumsum(0).to(device)
        return call
