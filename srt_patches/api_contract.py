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
     each an HTTP 500. They are a ValueError (a 400) here, with the lengths. More dicts than prompts are left as
     sglang serves them (each prompt takes its own, the rest go unread), for every model. An empty ``input_embeds``
     (the prompt when neither text nor ids are given) failed on ``[0][0]``, a 500 too.
Remove when: sglang checks the length of sampling_params as it does for ``watermark``, and empty input_embeds.

Target: sglang.srt.managers.io_struct.GenerateReqInput._handle_parallel_sampling
Checked against: sglang 0.5.23
Why: a single prompt asking for ``n`` > 1 becomes a batch of one here, its text or ids wrapped in a list but not its
     media: a list of two images was a 400 ("The length of image_data should be equal to the batch size", an OpenAI
     chat with two images and ``n: 2``), and a list of videos was dealt out one per choice. When this conversion
     happens (not for ``n`` <= 1 nor beam search), the prompt's media lists and their hashes are wrapped with it.
Remove when: sglang wraps them too.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

TARGETS = (
    "sglang.srt.entrypoints.api_contract.generate_contract_error",
    "sglang.srt.managers.io_struct.GenerateReqInput.normalize_batch_and_arguments",
    "sglang.srt.managers.io_struct.GenerateReqInput._handle_parallel_sampling",
)
MEDIA_FIELDS = ("image_data", "video_data", "audio_data", "mm_hashes", "mm_content_hashes")  # one entry per media


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


def normalize_batch_and_arguments(original, request):
    embeds = request.input_embeds
    if request.text is None and request.input_ids is None and isinstance(embeds, list) and not (embeds and embeds[0]):
        raise ValueError("input_embeds is empty")
    given = request.sampling_params
    if isinstance(given, list) and not (given and all(isinstance(params, dict) for params in given)):
        raise ValueError("sampling_params must be an object, or a non-empty list of objects, one per prompt")
    original(request)
    if isinstance(given, list):
        if request.is_single:
            raise ValueError(f"sampling_params is a list of {len(given)} but the prompt is one: send an object, "
                             "or a list of prompts")  # fmt: skip
        if len(given) < request.batch_size:
            raise ValueError(f"sampling_params has {len(given)} entries for {request.batch_size} prompts: send one "
                             "object for all, or one per prompt")  # fmt: skip


def handle_parallel_sampling(original, request):
    was_single = request.is_single
    original(request)
    if was_single and not request.is_single:  # one prompt became a batch of one: so do its media
        for field in MEDIA_FIELDS:
            media = getattr(request, field, None)
            if isinstance(media, list) and media and not isinstance(media[0], list):
                setattr(request, field, [media])


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(generate_contract_error)
    plugin_hook(TARGETS[1], HookType.AROUND)(normalize_batch_and_arguments)
    plugin_hook(TARGETS[2], HookType.AROUND)(handle_parallel_sampling)
