"""Per-request diffusion parameters: checkpoint defaults, the one validation point, and a JSON form.

`DiffusionParams.from_request` runs once at admission; code downstream reads the frozen dataclass only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

MAX_DENOISING_STEPS = 1024
# temperatures the sampler divides float32 logits by: below this they underflow float32 (1e-46 is 0) or overflow the
# logits to inf (1e-38 already does on a logit of 40), and softmax is one-hot long before (``temperature`` 0 is greedy)
MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6  # past float32's range (3.4e38) a temperature is inf; long before, every canvas is noise
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# transformers' DiffusionGemmaGenerationConfig._get_default_generation_params(), used for keys a checkpoint leaves unset.
_HF_FALLBACKS = {
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}
_INT_FIELDS = ("max_denoising_steps", "stability_threshold")
_FLOAT_FIELDS = ("entropy_bound", "t_min", "t_max", "confidence_threshold")


class InvalidDiffusionParams(ValueError):
    """A request's `diffusion` object (or a checkpoint's generation config) is malformed; the message names the field."""


@dataclass(frozen=True)
class DiffusionDefaults:
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @classmethod
    def from_generation_config(cls, d: dict) -> DiffusionDefaults:
        """Read a checkpoint's generation_config.json dict; unset (missing or null) keys take HF's global fallbacks."""
        values = {k: d.get(k) for k in _HF_FALLBACKS if k != "entropy_bound"}
        sampler = d.get("sampler_config")
        if sampler is not None:
            if not isinstance(sampler, dict) or sampler.get("_cls_name", "EntropyBoundSamplerConfig") != (
                "EntropyBoundSamplerConfig"
            ):
                raise InvalidDiffusionParams(f"generation_config.sampler_config is not an EntropyBoundSamplerConfig: {sampler!r}")
            values["entropy_bound"] = sampler.get("entropy_bound")
        values = {k: _HF_FALLBACKS[k] if values.get(k) is None else values[k] for k in _HF_FALLBACKS}
        values = _check_numeric(values, "generation_config")

        eos = d.get("eos_token_id")
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(**values, eos_token_ids=eos, pad_token_id=d.get("pad_token_id"))


@dataclass(frozen=True)
class DiffusionParams:
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    confidence_threshold: float
    stability_threshold: int
    seed: int | None = None  # None: the device's global RNG
    init_canvas: tuple[int, ...] | None = None  # overwrites a prefix of the first canvas's noise
    stream_drafts: bool = False  # stream the argmax canvas after every round (runtime/drafts.py)
    # the output's positions from diffusion.infill.template (sampling/infill.py): token ids fixed, -1 free
    infill: tuple[int, ...] | None = None
    # a grammar-constrained canvas whose commit changed a token is re-denoised this many steps with the valid
    # prefix fixed (at most max_denoising_steps), before the rest is committed (runtime/constraints.py); 0: at once
    grammar_repair_steps: int = 0

    @classmethod
    def from_request(
        cls, raw: dict | None, defaults: DiffusionDefaults, *, vocab_size: int, canvas_length: int, tokenizer=None
    ) -> DiffusionParams:
        """Validate a request's `diffusion` object; missing keys take `defaults`. Raises InvalidDiffusionParams.

        ``tokenizer`` (``encode(text, add_special_tokens=False)``, ``decode(ids)``) lays out an infill template;
        without one, ``infill`` is refused."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise InvalidDiffusionParams(f"diffusion must be a JSON object (got {type(raw).__name__})")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in raw if k not in allowed)
        if unknown:
            raise InvalidDiffusionParams(f"diffusion has unknown key(s) {unknown}; allowed: {allowed}")

        values = {k: raw.get(k, getattr(defaults, k)) for k in _HF_FALLBACKS}
        values = _check_numeric(values, "diffusion")

        seed = raw.get("seed")
        if seed is not None:
            _check_type("diffusion.seed", seed, int)
            if not _INT64_MIN <= seed <= _INT64_MAX:
                raise InvalidDiffusionParams(f"diffusion.seed must fit in a signed 64-bit integer (got {seed})")

        init_canvas = raw.get("init_canvas")
        if init_canvas is not None:
            init_canvas = _check_init_canvas(init_canvas, vocab_size, canvas_length)

        stream_drafts = raw.get("stream_drafts", False)
        _check_type("diffusion.stream_drafts", stream_drafts, bool)
        repair = raw.get("grammar_repair_steps", 0)
        _check_type("diffusion.grammar_repair_steps", repair, int)
        if not 0 <= repair <= MAX_DENOISING_STEPS:
            raise InvalidDiffusionParams(f"diffusion.grammar_repair_steps must be in [0, {MAX_DENOISING_STEPS}] "
                                         f"(got {repair})")
        infill = _infill_layout(raw["infill"], tokenizer, vocab_size) if "infill" in raw else None
        if infill is not None and init_canvas is not None:
            raise InvalidDiffusionParams("diffusion.infill and diffusion.init_canvas both set the first canvas: use one")
        return cls(**values, seed=seed, init_canvas=init_canvas, stream_drafts=stream_drafts, infill=infill,
                   grammar_repair_steps=repair)

    def to_json(self) -> str:
        """Compact JSON, so the params can ride in sglang's `custom_params` as one string."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> DiffusionParams:
        """Inverse of `to_json`; trusts its input (it was validated before `to_json`)."""
        d = json.loads(s)
        for key in ("init_canvas", "infill"):
            if d[key] is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def _check_type(name: str, value, kind: type) -> None:
    # NOTE: bool is a subclass of int in Python, so it has to be rejected explicitly.
    ok = isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise InvalidDiffusionParams(f"{name} must be {kind.__name__} (got {type(value).__name__}: {value!r})")


def _check_numeric(values: dict, prefix: str) -> dict:
    """Type- and range-check the six sampler numbers; returns them with floats as float."""
    out = {}
    for k in _INT_FIELDS:
        _check_type(f"{prefix}.{k}", values[k], int)
        out[k] = values[k]
    for k in _FLOAT_FIELDS:
        v = values[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidDiffusionParams(f"{prefix}.{k} must be a number (got {type(v).__name__}: {v!r})")
        try:
            out[k] = float(v)
        except OverflowError:  # an integer past float's range (JSON integers are unbounded)
            raise InvalidDiffusionParams(f"{prefix}.{k} must be finite (got an integer of {len(str(abs(v)))} digits)") \
                from None
        if not math.isfinite(out[k]):
            raise InvalidDiffusionParams(f"{prefix}.{k} must be finite (got {v})")

    def fail(msg: str):
        raise InvalidDiffusionParams(msg.format(p=prefix, **out))

    if not 1 <= out["max_denoising_steps"] <= MAX_DENOISING_STEPS:
        fail("{p}.max_denoising_steps must be in [1, %d] (got {max_denoising_steps})" % MAX_DENOISING_STEPS)
    if out["entropy_bound"] < 0:
        fail("{p}.entropy_bound must be >= 0 (got {entropy_bound})")
    # the schedule runs from t_max down to t_min + (t_max - t_min) / N: t_min itself is never used, and may be 0
    if not 0 <= out["t_min"] <= MAX_TEMPERATURE:
        fail("{p}.t_min must be in [0, %g] (got {t_min})" % MAX_TEMPERATURE)
    if not MIN_TEMPERATURE <= out["t_max"] <= MAX_TEMPERATURE:
        fail("{p}.t_max must be in [%g, %g] (got {t_max}; temperature 0 asks for greedy)"
             % (MIN_TEMPERATURE, MAX_TEMPERATURE))
    if out["t_min"] > out["t_max"]:
        fail("{p}.t_min must be <= {p}.t_max (got {t_min} > {t_max})")
    last = out["t_min"] + (out["t_max"] - out["t_min"]) / out["max_denoising_steps"]
    if last < MIN_TEMPERATURE:
        fail("{p}.t_min + ({p}.t_max - {p}.t_min) / {p}.max_denoising_steps, the last step's temperature, must be "
             ">= %g (got %g; temperature 0 asks for greedy)" % (MIN_TEMPERATURE, last))
    if out["confidence_threshold"] < 0:
        fail("{p}.confidence_threshold must be >= 0 (got {confidence_threshold})")
    # NOTE: more than max_denoising_steps is valid, as in transformers: the stop never fires (a request that lowers
    # max_denoising_steps under a checkpoint's stability_threshold was refused for a key it never set)
    if not 0 <= out["stability_threshold"] <= MAX_DENOISING_STEPS:
        fail("{p}.stability_threshold must be in [0, %d] (got {stability_threshold})" % MAX_DENOISING_STEPS)
    return out


def _infill_layout(raw, tokenizer, vocab_size: int) -> tuple[int, ...]:
    from .infill import layout, parse_template

    if not isinstance(raw, dict) or set(raw) != {"template"}:
        raise InvalidDiffusionParams(f"diffusion.infill must be an object {{\"template\": \"...\"}} (got {raw!r:.80})")
    pieces = parse_template(raw["template"])
    if tokenizer is None:
        raise InvalidDiffusionParams("diffusion.infill needs the server's tokenizer (not with --skip-tokenizer-init)")
    ids = layout(pieces, lambda text: tokenizer.encode(text, add_special_tokens=False),
                 lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False))
    if any(t >= vocab_size for t in ids):
        raise InvalidDiffusionParams(f"diffusion.infill.template tokenizes to ids outside the model's vocabulary "
                                     f"[0, {vocab_size})")
    return ids


def _check_init_canvas(ids, vocab_size: int, canvas_length: int) -> tuple[int, ...]:
    if not isinstance(ids, (list, tuple)):
        raise InvalidDiffusionParams(f"diffusion.init_canvas must be a list of token ids (got {type(ids).__name__})")
    if not 1 <= len(ids) <= canvas_length:
        raise InvalidDiffusionParams(f"diffusion.init_canvas must hold 1..{canvas_length} ids (got {len(ids)})")
    for i, t in enumerate(ids):
        _check_type(f"diffusion.init_canvas[{i}]", t, int)
        if not 0 <= t < vocab_size:
            raise InvalidDiffusionParams(f"diffusion.init_canvas[{i}] must be in [0, {vocab_size}) (got {t})")
    return tuple(ids)
