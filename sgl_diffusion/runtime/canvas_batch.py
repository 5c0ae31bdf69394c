"""The canvas-level forward batch: one forward pass carries segments of different kinds.

- ``prefill``: prompt tokens, causal (image runs bidirectional), writes KV.
- ``commit``: a finished canvas re-encoded causally, writes KV.
- ``canvas``: one denoise step over ``canvas_length`` positions, bidirectional over
  [visible cached KV ; own canvas KV], writes nothing persistent.

Only what the model, the attention backends and the sampler read lives here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch

SegmentKind = Literal["prefill", "commit", "canvas"]


@dataclass
class Segment:
    kind: SegmentKind
    req_index: int  # row of the request in the runner's state
    num_tokens: int
    start_pos: int  # absolute position of the first token; equals len(prefix_slots)
    prefix_slots: torch.Tensor  # [start_pos] int64, KV slots of the cached context
    new_slots: torch.Tensor | None = None  # [num_tokens] int64, where encode segments write KV
    # [begin, end) offsets of image soft tokens: bidirectional if the checkpoint sets use_bidirectional_attention
    image_runs: tuple[tuple[int, int], ...] = ()
    offset: int = field(init=False, default=0)  # first token in the flat batch; set by CanvasBatch

    def __post_init__(self):
        assert self.num_tokens > 0
        assert self.prefix_slots.dim() == 1 and self.prefix_slots.numel() == self.start_pos
        if self.kind == "canvas":
            assert self.new_slots is None and not self.image_runs, "a canvas never writes KV"
        else:
            assert self.new_slots is not None and self.new_slots.numel() == self.num_tokens

    @property
    def writes_kv(self) -> bool:
        return self.kind != "canvas"

    @property
    def is_causal(self) -> bool:
        return self.kind != "canvas"


@dataclass
class CanvasBatch:
    """Segments laid out back to back: segment i owns tokens [offset_i, offset_i + num_tokens_i)."""

    segments: list[Segment]
    input_ids: torch.Tensor  # [N] int64
    canvas_soft_embeds: torch.Tensor | None = None  # [N_canvas, H] self-conditioning input, None = zeros
    image_embeds: torch.Tensor | None = None  # [N_image_tokens, H] in token order, scattered at image ids
    attn_metadata: object = field(init=False, default=None)  # set by the attention backend's plan()

    def __post_init__(self):
        offset = 0
        for seg in self.segments:
            seg.offset = offset
            offset += seg.num_tokens
        assert self.input_ids.shape == (offset,), (self.input_ids.shape, offset)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    # NOTE: derived once per batch (the model reads each once per forward; a plan may too): segments and ids are
    # not changed after construction.
    @functools.cached_property
    def positions(self) -> torch.Tensor:  # [N] int64
        if len(self.segments) == 1:
            seg = self.segments[0]
            return torch.arange(seg.start_pos, seg.start_pos + seg.num_tokens, device=self.input_ids.device)
        return torch.cat(
            [torch.arange(s.start_pos, s.start_pos + s.num_tokens) for s in self.segments]
        ).to(self.input_ids.device)

    @functools.cached_property
    def canvas_mask(self) -> torch.Tensor:  # [N] bool, True on canvas tokens
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        for seg in self.segments:
            if seg.kind == "canvas":
                mask[seg.offset : seg.offset + seg.num_tokens] = True
        return mask.to(self.input_ids.device)

    @functools.cached_property
    def canvas_segments(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "canvas"]

    @property
    def token_kinds(self) -> Literal["canvas", "encode", "mixed"]:
        """Whether every token is a canvas token, none is, or both kinds are in the batch."""
        n = len(self.canvas_segments)
        return "canvas" if n == len(self.segments) else "encode" if n == 0 else "mixed"
