"""Validate per-request ``diffusion`` parameters where sglang builds SamplingParams; seed n>1 copies apart.

Targets: sglang.srt.managers.tokenizer_manager.TokenizerManager._create_tokenized_object,
         ._handle_batch_request, ._send_one_request
Checked against: sglang 0.5.23
Why: SamplingParams is a fixed msgspec struct, so ``sampling_params["diffusion"]`` would be rejected
     as an unknown keyword. We pop it (and a ``diffusion`` entry of --preferred-sampling-params, which
     the original merges in), validate the request once, over the preferred params as the original merges them
     (sgl_diffusion.runtime.admission; a ValueError
     here becomes HTTP 400 naming the field; an infill template is tokenized here, with the server's
     tokenizer), and let the result travel to the scheduler as a JSON string in ``custom_params``.
     Logprob requests without a defined answer are refused here too. Images the prompt has no
     placeholder for are refused (sglang only logs them and answers from the text), and so are placeholders
     in a text prompt with no image sent (the placeholder token was embedded as text).
     For ``n > 1`` sglang sends copies of one SamplingParams, so a seeded request would give n equal
     answers; copy i is sent with seed + i instead (reproducible, and distinct).
     Request fields the canvas engine does not implement are refused, not ignored: ``input_embeds`` (with
     --disable-radix-cache sglang passed them on and the engine generated from placeholder ids),
     ``return_routed_experts``, ``return_indexer_topk``, ``return_sampling_mask`` (sglang asked for a top_k our
     admission refuses; with top_k=1 the mask came back empty), ``custom_logit_processor`` (with
     --enable-custom-logit-processor sglang passes it on), and the internal ``lora_id`` and
     ``positional_embed_overrides``, which clients can set too (a list lora_id or any override ended the
     scheduler); unknown ``session_params`` keys are a 400 instead of sglang's TypeError (a 500), and so are values
     of the wrong type (the scheduler used a list id as a dict key and a float offset as a slice bound, and died).
Remove when: SamplingParams accepts model-specific parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from contextvars import ContextVar

import msgspec
from sglang.srt.plugins.hook_registry import HookType, plugin_hook

_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
TARGETS = (f"{_MANAGER}._create_tokenized_object", f"{_MANAGER}._handle_batch_request", f"{_MANAGER}._send_one_request")
_PREFERRED_KEY = "_sgl_diffusion_preferred"  # manager attribute: the preferred `diffusion` dict, split off once
# copies already sent per SamplingParams object, for the n>1 request being handled in this asyncio task
_copies_sent: ContextVar[dict | None] = ContextVar("sgl_diffusion_copies_sent", default=None)


def create_tokenized_object(original, manager, obj, *args, **kwargs):
    from sgl_diffusion.runtime.scheduler_hook import PARAMS_KEY, serves_diffusion_model

    sampling = getattr(obj, "sampling_params", None)
    if not isinstance(sampling, dict):
        return original(manager, obj, *args, **kwargs)
    raw = sampling.get("diffusion")
    if not serves_diffusion_model(manager.model_config.hf_config):
        if "diffusion" in sampling:
            raise ValueError("diffusion parameters only apply to diffusion models")
        return original(manager, obj, *args, **kwargs)

    input_ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[1] if len(args) > 1 else None)
    _check_fields(obj)
    _check_prompt(manager, input_ids)
    mm_inputs = kwargs["mm_inputs"] if "mm_inputs" in kwargs else (args[3] if len(args) > 3 else None)
    _check_images_placed(manager, obj, input_ids, mm_inputs)
    preferred_diffusion = _split_preferred_diffusion(manager)
    if preferred_diffusion is not None and (raw is None or isinstance(raw, dict)):
        raw = preferred_diffusion | (raw or {})
    merged = _under_preferred(manager, sampling, raw)
    params = _validate(manager, obj, merged, raw, input_ids, mm_inputs)
    if params.stream_drafts and not getattr(obj, "stream", False):
        raise ValueError("diffusion.stream_drafts needs a streamed request (stream=true)")
    # NOTE: the request's dict replaces a --preferred-sampling-params custom_params whole; keep those keys
    preferred = (manager.preferred_sampling_params or {}).get("custom_params") or {}
    custom = dict(preferred) | dict(sampling.get("custom_params") or {})
    custom[PARAMS_KEY] = params.to_json()
    obj.sampling_params = {k: v for k, v in sampling.items() if k != "diffusion"} | {"custom_params": custom}
    if params.infill is not None and merged.get("max_new_tokens") is None:
        obj.sampling_params["max_new_tokens"] = len(params.infill)  # unbounded by the request: the whole template
    try:
        return original(manager, obj, *args, **kwargs)
    finally:
        obj.sampling_params = sampling


# request fields the canvas engine does not implement -> what to say
UNSUPPORTED_FIELDS = {
    "input_embeds": "input_embeds (send text or input_ids)",
    "return_routed_experts": "return_routed_experts",
    "return_indexer_topk": "return_indexer_topk",
    "lora_id": "lora_id (LoRA adapters)",
    "positional_embed_overrides": "positional_embed_overrides",
    # a canvas token is drawn from the whole vocabulary at the schedule's temperature, not from a top-k support set;
    # sglang's own check asked for a top_k that our admission refuses, and with top_k=1 the mask came back empty
    "return_sampling_mask": "return_sampling_mask (canvas tokens have no top-k support set)",
    # with --enable-return-hidden-states sglang let it through, and the answer held an empty list
    "return_hidden_states": "return_hidden_states (the canvas engine returns no hidden states)",
    # with --enable-custom-logit-processor sglang passes it on; the canvas sampler runs no logit processor
    "custom_logit_processor": "custom_logit_processor (the canvas sampler runs no logit processors)",
}


def _check_fields(obj) -> None:
    if refused := [what for field, what in UNSUPPORTED_FIELDS.items() if getattr(obj, field, None)]:
        raise ValueError(f"{', '.join(refused)}: not supported for DiffusionGemma")
    session = getattr(obj, "session_params", None)
    if session is None:
        return
    if not isinstance(session, dict):
        raise ValueError("session_params must be an object")
    from sglang.srt.managers.io_struct import SessionParams

    if unknown := sorted(set(session) - set(SessionParams.__struct_fields__)):
        raise ValueError(f"session_params: unknown keys {unknown} (known: {list(SessionParams.__struct_fields__)})")
    # NOTE: SessionParams(**session) checks no type, and the scheduler uses the values as dict keys and slice bounds:
    # a list id or a float offset raised there and ended the server
    for name, kind in typing.get_type_hints(SessionParams).items():
        try:
            msgspec.convert(session.get(name), kind)
        except msgspec.ValidationError as e:
            raise ValueError(f"session_params.{name}: {e}") from None


def _check_prompt(manager, input_ids) -> None:
    # sglang range-checks no prompt id; an id outside the embedding table would fail the whole forward round
    if input_ids is None:
        return
    if len(input_ids) == 0:
        raise ValueError("the prompt is empty")
    vocab = manager.model_config.hf_config.text_config.vocab_size
    if min(input_ids) < 0 or max(input_ids) >= vocab:
        raise ValueError(f"input_ids must be in [0, {vocab})")


def _split_preferred_diffusion(manager) -> dict | None:
    # The original merges preferred params into the request after our hook removed `diffusion`, so a
    # preferred `diffusion` entry would reach SamplingParams: take it out once and merge it here instead.
    if not hasattr(manager, _PREFERRED_KEY):
        preferred = manager.preferred_sampling_params or {}
        diffusion = preferred.get("diffusion")
        if "diffusion" in preferred:
            manager.preferred_sampling_params = {k: v for k, v in preferred.items() if k != "diffusion"}
        if diffusion is not None and not isinstance(diffusion, dict):
            raise ValueError("--preferred-sampling-params: diffusion must be an object")
        setattr(manager, _PREFERRED_KEY, diffusion)
    return getattr(manager, _PREFERRED_KEY)


def _under_preferred(manager, sampling: dict, raw) -> dict:
    """The request's sampling params over --preferred-sampling-params, as the original merges them: admission judges
    what the engine would get (a preferred temperature scales the schedule; a preferred top_p is refused). A schedule
    of the request's own (diffusion.t_min/t_max) wins over a preferred temperature or top_k."""
    preferred = dict(manager.preferred_sampling_params or {})
    if isinstance(raw, dict) and {"t_min", "t_max"} & raw.keys():
        preferred.pop("temperature", None)
        preferred.pop("top_k", None)
    return preferred | sampling


def _check_images_placed(manager, obj, input_ids, mm_inputs) -> None:
    images = getattr(obj, "image_data", None)
    images = images if isinstance(images, list) else [] if images is None else [images]
    sent = sum(image is not None for image in images)  # sglang drops null items
    if not sent:
        # NOTE: the placeholder token would be embedded as text, with no image behind it. Only for a text prompt:
        # token ids are the caller's own (random-id benchmarks draw the placeholder's id too)
        token = getattr(manager.model_config.hf_config, "image_token_id", None)
        from_text = isinstance(getattr(obj, "text", None), str)
        if from_text and token in (input_ids or ()) and not (mm_inputs and mm_inputs.mm_items):
            raise ValueError(f"the prompt has {input_ids.count(token)} image placeholder(s) ('<|image|>') but no "
                             "image was sent")  # fmt: skip
        return
    placed = sum(len(item.offsets or ()) for item in (mm_inputs.mm_items if mm_inputs else ()) if item.is_image())
    if placed < sent:
        raise ValueError(
            f"{sent} image(s) sent but the prompt has a placeholder for {placed}: put one '<|image|>' in the "
            "prompt text per image (sglang's frontend chat templates write '<image>', which Gemma 4 does not read; "
            "in a chat, images go in user messages: the template renders system messages as text only)"
        )


def handle_batch_request(original, manager, obj, *args, **kwargs):
    if getattr(obj, "parallel_sample_num", 1) <= 1:
        return original(manager, obj, *args, **kwargs)
    return _counting_copies(original(manager, obj, *args, **kwargs))


async def _counting_copies(responses):
    # The original sends all n copies before its first yield, from this task: a ContextVar scopes the count.
    _copies_sent.set({})
    try:
        async for response in responses:
            yield response
    finally:
        _copies_sent.set(None)


def send_one_request(original, manager, tokenized_obj, *args, **kwargs):
    counts = _copies_sent.get()
    sampling_params = tokenized_obj.sampling_params
    if counts is not None and sampling_params.max_new_tokens != 0:  # 0: sglang's shared-prefix warm-up copy
        index = counts.get(id(sampling_params), 0)
        counts[id(sampling_params)] = index + 1
        if index:
            tokenized_obj.sampling_params = _with_seed_offset(sampling_params, index)
    return original(manager, tokenized_obj, *args, **kwargs)


def _with_seed_offset(sampling_params, offset: int):
    from sgl_diffusion.runtime.scheduler_hook import PARAMS_KEY
    from sgl_diffusion.sampling.params import DiffusionParams

    raw = (sampling_params.custom_params or {}).get(PARAMS_KEY)
    if raw is None:
        return sampling_params
    params = DiffusionParams.from_json(raw)
    if params.seed is None:
        return sampling_params  # unseeded copies draw from the device RNG: already distinct
    seed = (params.seed + offset + 2**63) % 2**64 - 2**63  # stays a signed 64-bit integer
    shifted = copy.copy(sampling_params)
    shifted.custom_params = dict(sampling_params.custom_params) | {
        PARAMS_KEY: dataclasses.replace(params, seed=seed).to_json()}
    return shifted


def _validate(manager, obj, sampling, raw, input_ids, mm_inputs):
    from sgl_diffusion.runtime.admission import check_infill_length, check_logprobs, check_request
    from sgl_diffusion.runtime.scheduler_hook import load_defaults

    defaults = getattr(manager, "diffusion_defaults", None)
    if defaults is None:
        args = manager.server_args
        defaults = manager.diffusion_defaults = load_defaults(args.model_path, args.revision)
    hf = manager.model_config.hf_config
    return_logprob = bool(getattr(obj, "return_logprob", False))
    params = check_request(
        sampling, return_logprob, raw, defaults, vocab_size=hf.text_config.vocab_size,
        canvas_length=getattr(hf, "canvas_length", 256), tokenizer=manager.tokenizer,
    )
    prompt_len = None if input_ids is None else len(input_ids)
    has_images = bool(mm_inputs and mm_inputs.mm_items)
    check_logprobs(return_logprob, getattr(obj, "logprob_start_len", None), getattr(obj, "token_ids_logprob", None),
                   prompt_len, has_images)
    if params.infill is not None and prompt_len is not None:
        check_infill_length(params, prompt_len, sampling.get("max_new_tokens"), manager.context_len)
    return params


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(create_tokenized_object)
    plugin_hook(TARGETS[1], HookType.AROUND)(handle_batch_request)
    plugin_hook(TARGETS[2], HookType.AROUND)(send_one_request)
