"""The /generate request contract: let ``sampling_params["diffusion"]`` through; refuse a sampling_params list
that does not fit the prompts.

Target: sglang.srt.entrypoints.api_contract.generate_contract_error
Checked against: sglang 0.5.23
Why: /generate checks its body against a fixed (Rust) schema that rejects unknown sampling keys.
     The check runs on the body without ``diffusion``; the tokenizer-manager patch validates it.
Remove when: the schema accepts model-specific sampling parameters.

Target: sglang.srt.managers.io_struct.GenerateReqInput.normalize_batch_and_arguments
Checked against: sglang 0.5.23
Why: a list of sampling_params is read as one dict per prompt without checking it: for one prompt the request fails
     later on ``list.get`` (AttributeError), fewer dicts than prompts fail on an index, an empty list on ``[0]``:
     each an HTTP 500. They are a ValueError (a 400) here, with the lengths. More dicts than prompts were silently
     dropped; they are refused too. An empty ``input_embeds`` (the prompt when neither text nor ids are given) failed
     on ``[0][0]``, a 500 too.
Remove when: sglang checks the length of sampling_params as it does for ``watermark``, and empty input_embeds.
Also (same target): a single prompt asking for ``n`` > 1 becomes a batch of one, its text or ids wrapped in a list
(``_handle_parallel_sampling``) but not its media: a list of two images was a 400 ("The length of image_data should
be equal to the batch size", an OpenAI chat with two images and ``n: 2``), and a list of videos was dealt out one per
choice. The prompt's own media list (and its hashes) is wrapped with it here, and given back as it was when sglang
keeps the prompt single (n <= 1, beam search). Remove when sglang wraps them too.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

TARGETS = (
    "sglang.srt.entrypoints.api_contract.generate_contract_error",
    "sglang.srt.managers.io_struct.GenerateReqInput.normalize_batch_and_arguments",
)


def _without_diffusion(sampling):
    if isinstance(sampling, dict) and "diffusion" in sampling:
        return {k: v for k, v in sampling.items() if k != "diffusion"}
    return sampling


def generate_contract_error(original, body, *args, **kwargs):
    if isinstance(body, dict) and "sampling_params" in body:
        sampling = body["sampling_params"]
        stripped = [_without_diffusion(s) for s in sampling] if isinstance(sampling, list) else _without_diffusion(sampling)
        body = body | {"sampling_params": stripped}
    return original(body, *args, **kwargs)


MEDIA_FIELDS = ("image_data", "video_data", "audio_data", "mm_hashes", "mm_content_hashes")  # one entry per media


def _is_single_prompt(request) -> bool:
    if request.text is not None:
        return isinstance(request.text, str)
    ids = request.input_ids
    return isinstance(ids, list) and bool(ids) and isinstance(ids[0], int)


def normalize_batch_and_arguments(original, request):
    embeds = request.input_embeds
    if request.text is None and request.input_ids is None and isinstance(embeds, list) and not (embeds and embeds[0]):
        raise ValueError("input_embeds is empty")
    given = request.sampling_params
    if isinstance(given, list) and not (given and all(isinstance(params, dict) for params in given)):
        raise ValueError("sampling_params must be an object, or a non-empty list of objects, one per prompt")
    wrapped = {}
    if _is_single_prompt(request):  # n > 1 may make it a batch of one (sglang decides: beam search does not)
        for field in MEDIA_FIELDS:
            media = getattr(request, field, None)
            if isinstance(media, list) and media and not isinstance(media[0], list):  # this one prompt's media
                wrapped[field] = media
                setattr(request, field, [media])
    try:
        original(request)
    finally:
        # NOTE: is_single is set only once sglang has read the prompt (a request without one raises before)
        if wrapped and getattr(request, "is_single", True):  # still one prompt: its media stay as they were
            for field, media in wrapped.items():
                setattr(request, field, media)
    if isinstance(given, list):
        if request.is_single:
            raise ValueError(f"sampling_params is a list of {len(given)} but the prompt is one: send an object, "
                             "or a list of prompts")  # fmt: skip
        if len(given) != request.batch_size:
            raise ValueError(f"sampling_params has {len(given)} entries for {request.batch_size} prompts: send one "
                             "object for all, or one per prompt")  # fmt: skip


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(generate_contract_error)
    plugin_hook(TARGETS[1], HookType.AROUND)(normalize_batch_and_arguments)
