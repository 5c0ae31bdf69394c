"""What a DiffusionGemma request may ask of sglang's sampling parameters, decided once at admission.

The canvas sampler has its own knobs (``diffusion``); sglang's token-sampler knobs either map onto
them or are refused with a message, never silently ignored:
- ``temperature`` scales the whole schedule (1 = the checkpoint's t_max -> t_min; 0 = greedy, and
  unseeded greedy requests use seed 0 so that they are deterministic like greedy decoding elsewhere:
  the first canvas is noise, so greedy alone does not fix the output);
- ``sampling_seed`` (OpenAI ``seed``) seeds the canvas sampler unless ``diffusion.seed`` is given;
- grammars, logprobs, penalties, ``min_new_tokens``, ``logit_bias``, ``top_p``/``top_k``/``min_p``
  are refused until the canvas sampler implements them.
"""

from __future__ import annotations

import dataclasses

from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams, InvalidDiffusionParams

GREEDY_TEMPERATURE = 1e-6  # softmax at this temperature is one-hot on any non-tied logit
_REFUSED_IF_SET = {
    "regex": "grammars (regex)",
    "json_schema": "grammars (json_schema / response_format)",
    "ebnf": "grammars (ebnf)",
    "structural_tag": "grammars (structural_tag)",
    "logit_bias": "logit_bias",
    "stop_regex": "stop_regex",
}
_REFUSED_UNLESS = {  # key: the only accepted values (besides None)
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "min_new_tokens": (0,),
    "min_p": (0, 0.0),
    "top_p": (1, 1.0),
    "top_k": (-1, 1 << 30),
}


def check_request(sampling: dict, return_logprob: bool, raw_diffusion, defaults: DiffusionDefaults, *,
                  vocab_size: int, canvas_length: int) -> DiffusionParams:
    """Validate one request; raise ValueError (HTTP 400) naming what is not supported."""
    if return_logprob:
        raise ValueError("logprobs are not supported for DiffusionGemma yet")
    for key, what in _REFUSED_IF_SET.items():
        if sampling.get(key):
            raise ValueError(f"{what} is not supported for DiffusionGemma yet")
    for key, accepted in _REFUSED_UNLESS.items():
        value = sampling.get(key)
        if value is not None and value not in accepted and not _greedy_top_k(key, value, sampling):
            raise ValueError(f"{key}={value!r} is not supported for DiffusionGemma (use the diffusion parameters)")
    params = DiffusionParams.from_request(raw_diffusion, defaults, vocab_size=vocab_size, canvas_length=canvas_length)
    seed = sampling.get("sampling_seed")
    if params.seed is None and seed is not None:
        params = DiffusionParams.from_request(
            ({} if raw_diffusion is None else raw_diffusion) | {"seed": seed}, defaults,
            vocab_size=vocab_size, canvas_length=canvas_length,
        )
    return _apply_temperature(params, sampling.get("temperature"), raw_diffusion)


def _greedy_top_k(key, value, sampling) -> bool:
    return key == "top_k" and value == 1  # top_k=1 is greedy; temperature 0 means the same


def _apply_temperature(params: DiffusionParams, temperature, raw_diffusion) -> DiffusionParams:
    if temperature is None or temperature == 1.0:
        return params
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise InvalidDiffusionParams(f"temperature must be >= 0 (got {temperature!r})")
    if isinstance(raw_diffusion, dict) and ({"t_min", "t_max"} & raw_diffusion.keys()):
        raise InvalidDiffusionParams("set either temperature or diffusion.t_min/t_max, not both")
    scale = temperature if temperature > 0 else GREEDY_TEMPERATURE
    seed = params.seed if params.seed is not None or temperature > 0 else 0
    return dataclasses.replace(params, t_min=params.t_min * scale, t_max=params.t_max * scale, seed=seed)
