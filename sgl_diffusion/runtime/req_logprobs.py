"""Logprobs computed on canvases (runtime/constraints.py), written into the sglang ``Req`` fields its output
streamer sends, in the layout sglang's own prefill and decode give them (so /generate meta_info, OpenAI logprobs
and the DSL read them unchanged)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

    from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
    from sgl_diffusion.sampling.logprobs import TokenLogprobs


def hand_over_logprobs(dreqs: list[DiffusionRequest]) -> None:
    """Copy new prompt and output logprobs of ``dreqs`` into their Reqs (what is there already is kept)."""
    for dreq in dreqs:
        req = dreq.handle
        if not req.return_logprob:
            continue
        if dreq.prompt_logprobs is not None and req.logprob.input_token_logprobs_val is None:
            set_prompt_logprobs(req, dreq.prompt_logprobs, dreq.score_from)
        got = dreq.output_logprobs
        have = len(req.logprob.output_token_logprobs_val)
        if got is None or len(got.token) <= have:
            continue
        req.logprob.output_token_logprobs_val.extend(got.token[have:])
        req.logprob.output_token_logprobs_idx.extend(dreq.output_ids[have : len(got.token)])
        if req.logprob.top_logprobs_num > 0:
            req.logprob.output_top_logprobs_val.extend(got.top_values[have:])
            req.logprob.output_top_logprobs_idx.extend(got.top_ids[have:])


def set_prompt_logprobs(req: Req, scored: TokenLogprobs | None = None, scored_from: int | None = None) -> None:
    """The Req's input logprob fields as sglang's prefill fills them: from logprob_start_len on, the first entry
    null, then ``scored`` (the prompt tokens after it); all empty without prompt scoring. Set before the Req's
    first chunk is streamed: the streamer sends them once."""
    logprob = req.logprob
    logprob.input_token_ids_logprobs_val, logprob.input_token_ids_logprobs_idx = [], []
    if scored is None:
        logprob.input_token_logprobs_val, logprob.input_token_logprobs_idx = [], []
        logprob.input_top_logprobs_val, logprob.input_top_logprobs_idx = [], []
        return
    logprob.input_token_logprobs_val = [None, *scored.token]
    logprob.input_token_logprobs_idx = list(req.origin_input_ids[scored_from:])
    with_top = logprob.top_logprobs_num > 0
    logprob.input_top_logprobs_val = [None, *scored.top_values] if with_top else []
    logprob.input_top_logprobs_idx = [None, *scored.top_ids] if with_top else []
