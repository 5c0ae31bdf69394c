"""Provisional drafts: the current argmax canvas of a streamed request, sent beside the committed text.

A request with ``diffusion.stream_drafts`` gets, after every scheduling round in which its canvas is
still denoising, a chunk whose ``meta_info.diffusion_draft`` holds that canvas (cut to the tokens the
request may still produce). Drafts never enter ``output_ids`` or ``text``: a client that ignores the
field sees exactly the committed stream. They ride sglang's per-chunk ``customized_info`` channel,
which its output streamer opens to subclasses (``has_additional_customized_info``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

DRAFT_KEY = "diffusion_draft"


@dataclass(kw_only=True, slots=True)
class DraftOutputStreamer(SchedulerOutputStreamer):
    """sglang's output streamer, plus one draft per request for the next chunk it sends."""

    has_additional_customized_info: ClassVar[bool] = True
    drafts: dict = field(default_factory=dict)  # rid -> draft; set by the canvas engine, sent by stream_output

    @classmethod
    def replacing(cls, streamer: SchedulerOutputStreamer) -> DraftOutputStreamer:
        return cls(**{f.name: getattr(streamer, f.name) for f in dataclasses.fields(streamer)})

    def stream_output(self, reqs, return_logprob, *args, **kwargs):
        # NOTE: no zero-argument super() in a slots dataclass (the class is rebuilt, its __class__ cell is not)
        out = SchedulerOutputStreamer.stream_output(self, reqs, return_logprob, *args, **kwargs)
        for req in reqs:
            # NOTE: sglang sends output logprobs up to max(len(output_ids), 1), a token-by-token rule (the first token
            # comes with the prefill): a draft of a request with no output yet moved its offset past the first token
            if req.return_logprob and not req.output_ids:
                req.send_output_token_logprobs_offset = 0
        return out

    def should_build_additional_customized_info(self) -> bool:
        return bool(self.drafts)

    def build_additional_customized_info(self, reqs) -> dict[str, list]:
        return {DRAFT_KEY: [self.drafts.pop(req.rid, None) for req in reqs]}


def make_draft(req, argmax: list[int], canvas_index: int, steps: int, tokenizer) -> dict:
    """The draft of one request's canvas: token ids (and text unless the server skips its tokenizer)."""
    room = req.sampling_params.max_new_tokens - len(req.output_ids)
    ids = argmax[: max(room, 0)]
    text = None
    if tokenizer is not None:
        text = tokenizer.decode(ids, skip_special_tokens=req.sampling_params.skip_special_tokens)
    return {"canvas": canvas_index, "step": steps, "token_ids": ids, "text": text}
