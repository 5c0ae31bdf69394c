"""What a DiffusionGemma request may ask of sglang's sampling parameters, decided once at admission.

The canvas sampler has its own knobs (``diffusion``); sglang's token-sampler knobs either map onto
them or are refused with a message, never silently ignored:
- ``temperature`` scales the whole schedule (1 = the checkpoint's t_max -> t_min; 0 = greedy, and
  unseeded greedy requests use seed 0 so that they are deterministic like greedy decoding elsewhere:
  the first canvas is noise, so greedy alone does not fix the output); ``top_k`` 1 is greedy too, whatever the
  temperature;
- ``sampling_seed`` (OpenAI ``seed``) seeds the canvas sampler unless ``diffusion.seed`` is given;
- grammars (``regex``, ``json_schema``, ``ebnf``, ``structural_tag``) and logprobs act on the canvas
  (runtime/constraints.py); prompt logprobs are bounded, and combinations without a meaning are refused;
- penalties, ``min_new_tokens``, ``logit_bias``, ``top_p``/``top_k`` (but 1)/``min_p``, ``stop_regex`` and
  ``token_ids_logprob`` are refused until the canvas sampler implements them.
"""

from __future__ import annotations

import dataclasses

from sgl_diffusion.runtime.constraints import MAX_SCORED_PROMPT_TOKENS
from sgl_diffusion.sampling.params import MAX_TEMPERATURE, DiffusionDefaults, DiffusionParams, InvalidDiffusionParams

# softmax at this temperature is one-hot on any non-tied logit; a smaller one is greedy, as in sglang (_SAMPLING_EPS)
GREEDY_TEMPERATURE = 1e-6
GRAMMAR_KEYS = ("regex", "json_schema", "ebnf", "structural_tag")
_REFUSED_IF_SET = {
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


# sampling fields whose type sglang checks on /generate only (_check_types)
_TYPES = {"max_new_tokens": int, "n": int, "ignore_eos": bool, "skip_special_tokens": bool,
          "spaces_between_special_tokens": bool, "no_stop_trim": bool}  # fmt: skip


def check_request(sampling: dict, return_logprob: bool, raw_diffusion, defaults: DiffusionDefaults, *,
                  vocab_size: int, canvas_length: int, tokenizer=None) -> DiffusionParams:
    """Validate one request; raise ValueError (HTTP 400) naming what is not supported.

    ``tokenizer`` lays out a ``diffusion.infill`` template (sampling/infill.py)."""
    _check_types(sampling)
    for key, what in _REFUSED_IF_SET.items():
        if sampling.get(key):
            raise ValueError(f"{what} is not supported for DiffusionGemma yet")
    for key, accepted in _REFUSED_UNLESS.items():
        value = sampling.get(key)
        if value is not None and value not in accepted and not _greedy_top_k(key, value):
            raise ValueError(f"{key}={value!r} is not supported for DiffusionGemma (use the diffusion parameters)")
    params = DiffusionParams.from_request(raw_diffusion, defaults, vocab_size=vocab_size, canvas_length=canvas_length,
                                          tokenizer=tokenizer)
    seed = sampling.get("sampling_seed")
    if params.seed is None and seed is not None:
        try:
            seed = DiffusionParams.from_request({"seed": seed}, defaults, vocab_size=vocab_size,
                                                canvas_length=canvas_length).seed  # fmt: skip
        except ValueError as e:  # the client sent seed (OpenAI) or sampling_seed (/generate), not diffusion.seed
            raise ValueError(str(e).replace("diffusion.seed", "seed (sampling_seed)")) from None
        params = dataclasses.replace(params, seed=seed)
    if params.infill is not None:
        _check_infill(params.infill, sampling, defaults)
    return _apply_temperature(params, sampling.get("temperature"), raw_diffusion, sampling.get("top_k"))


def _check_types(sampling: dict) -> None:
    """sglang checks these types on /generate only: /vertex_generate and Ollama's options pass them on as sent, and a
    wrong one reached the scheduler's or the detokenizer's code and ended the server (a float max_new_tokens, from
    Ollama's ``num_predict: 40.0``, a string skip_special_tokens)."""
    for key, kind in _TYPES.items():
        value = sampling.get(key)
        if value is not None and type(value) is not kind:
            raise ValueError(f"{key} must be {'a boolean' if kind is bool else 'an integer'}, not {value!r}")
    if (n := sampling.get("n")) is not None and n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    stop = sampling.get("stop")
    if stop is not None and not isinstance(stop, str) and not _list_of(stop, str):
        raise ValueError(f"stop must be a string or a list of strings, not {stop!r}")
    ids = sampling.get("stop_token_ids")
    if ids is not None and not _list_of(ids, int):
        raise ValueError(f"stop_token_ids must be a list of integers, not {ids!r}")


def _list_of(value, kind) -> bool:
    return isinstance(value, list) and all(type(item) is kind for item in value)


def check_logprobs(return_logprob: bool, logprob_start_len, token_ids_logprob, prompt_len: int | None,
                   has_images: bool) -> None:
    """Refuse logprob requests without a defined answer (runtime/constraints.py defines the others)."""
    if not return_logprob:
        return
    if token_ids_logprob:
        raise ValueError("token_ids_logprob (what /v1/score and /v1/decisions ask for) is not supported for "
                         "DiffusionGemma: ask for top_logprobs_num instead")
    if logprob_start_len is None or logprob_start_len < 0 or prompt_len is None or logprob_start_len >= prompt_len:
        return  # output logprobs only
    if has_images:
        raise ValueError("prompt logprobs (logprob_start_len) are not supported with images for DiffusionGemma")
    scored = prompt_len - logprob_start_len - 1
    if scored > MAX_SCORED_PROMPT_TOKENS:
        raise ValueError(
            f"prompt logprobs cost one canvas forward per scored token on DiffusionGemma: at most "
            f"{MAX_SCORED_PROMPT_TOKENS} prompt tokens may be scored (logprob_start_len >= prompt length - "
            f"{MAX_SCORED_PROMPT_TOKENS + 1} = {prompt_len - MAX_SCORED_PROMPT_TOKENS - 1}; got {logprob_start_len})")


def check_infill_length(params: DiffusionParams, prompt_len: int, max_new_tokens, context_len: int) -> None:
    """The prompt and the (cut) template must fit in the context."""
    length = len(params.infill) if max_new_tokens is None else min(len(params.infill), max_new_tokens)
    if prompt_len + length > context_len:
        raise ValueError(f"the prompt ({prompt_len} tokens) and the diffusion.infill template ({length} tokens) are "
                         f"longer than the context ({context_len} tokens)")


def _check_infill(layout: tuple[int, ...], sampling: dict, defaults: DiffusionDefaults) -> None:
    if grammar := [k for k in GRAMMAR_KEYS if sampling.get(k)]:
        raise ValueError(f"an infill (diffusion.infill, or the suffix of a completion) cannot be combined with a "
                         f"grammar ({grammar[0]}: response_format, a forced tool call, or the request's own)")
    stops = set(defaults.eos_token_ids) | set(sampling.get("stop_token_ids") or ())
    if stops & set(layout):
        raise ValueError("diffusion.infill.template holds an end-of-sequence token, which would end the output "
                         "before the template is complete")


def _greedy_top_k(key, value) -> bool:
    return key == "top_k" and value == 1  # greedy, as temperature 0 (_apply_temperature)


def _apply_temperature(params: DiffusionParams, temperature, raw_diffusion, top_k=None) -> DiffusionParams:
    """The schedule scaled by ``temperature``; greedy for a temperature under sglang's epsilon or ``top_k`` 1,
    whatever the temperature (sglang's token sampler reads both so)."""
    given = temperature is not None and temperature != 1.0
    if given and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= MAX_TEMPERATURE):
        raise InvalidDiffusionParams(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (got {temperature!r})")
    asked = "temperature"
    if _greedy_top_k("top_k", top_k):
        temperature, asked = 0.0, "top_k=1"
    elif not given:
        return params
    if isinstance(raw_diffusion, dict) and ({"t_min", "t_max"} & raw_diffusion.keys()):
        raise InvalidDiffusionParams(f"set either {asked} or diffusion.t_min/t_max, not both")
    greedy = temperature < GREEDY_TEMPERATURE
    scale = GREEDY_TEMPERATURE if greedy else temperature
    seed = 0 if params.seed is None and greedy else params.seed
    return dataclasses.replace(params, t_min=params.t_min * scale, t_max=params.t_max * scale, seed=seed)
