"""Validate per-request ``diffusion`` parameters where sglang builds SamplingParams.

Target: sglang.srt.managers.tokenizer_manager.TokenizerManager._create_tokenized_object
Checked against: sglang 0.5.23
Why: SamplingParams is a fixed msgspec struct, so ``sampling_params["diffusion"]`` would be rejected
     as an unknown keyword. We pop it, validate the request once (sgl_diffusion.runtime.admission; a
     ValueError here becomes HTTP 400 naming the field), and let the result travel to the scheduler
     as a JSON string in ``custom_params``.
Remove when: SamplingParams accepts model-specific parameters.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

TARGETS = ("sglang.srt.managers.tokenizer_manager.TokenizerManager._create_tokenized_object",)


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
    _check_prompt(manager, input_ids)
    params = _validate(manager, obj, sampling, raw)
    # NOTE: the request's dict replaces a --preferred-sampling-params custom_params whole; keep those keys
    preferred = (manager.preferred_sampling_params or {}).get("custom_params") or {}
    custom = dict(preferred) | dict(sampling.get("custom_params") or {})
    custom[PARAMS_KEY] = params.to_json()
    obj.sampling_params = {k: v for k, v in sampling.items() if k != "diffusion"} | {"custom_params": custom}
    try:
        return original(manager, obj, *args, **kwargs)
    finally:
        obj.sampling_params = sampling


def _check_prompt(manager, input_ids) -> None:
    # sglang range-checks no prompt id; an id outside the embedding table would fail the whole forward round
    if input_ids is None:
        return
    if len(input_ids) == 0:
        raise ValueError("the prompt is empty")
    vocab = manager.model_config.hf_config.text_config.vocab_size
    if min(input_ids) < 0 or max(input_ids) >= vocab:
        raise ValueError(f"input_ids must be in [0, {vocab})")


def _validate(manager, obj, sampling, raw):
    from sgl_diffusion.runtime.admission import check_request
    from sgl_diffusion.runtime.scheduler_hook import load_defaults

    defaults = getattr(manager, "diffusion_defaults", None)
    if defaults is None:
        defaults = manager.diffusion_defaults = load_defaults(manager.server_args.model_path)
    hf = manager.model_config.hf_config
    return check_request(
        sampling, bool(getattr(obj, "return_logprob", False)), raw, defaults,
        vocab_size=hf.text_config.vocab_size, canvas_length=getattr(hf, "canvas_length", 256),
    )


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(create_tokenized_object)
