"""DiffusionDefaults / DiffusionParams: checkpoint defaults, request validation, JSON round trip."""

import math

import pytest
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

from sgl_diffusion.sampling import DiffusionDefaults, DiffusionParams, InvalidDiffusionParams

VOCAB, CANVAS = 1000, 16
CHECKPOINT_GEN_CONFIG = {  # shape of the converter's generation_config.json, with non-default values
    "max_new_tokens": 256,
    "max_denoising_steps": 32,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.25},
    "t_min": 0.3,
    "t_max": 0.9,
    "stability_threshold": 2,
    "confidence_threshold": 0.01,
    "eos_token_id": [1, 106, 50],
    "pad_token_id": 0,
    "transformers_version": "5.19.0",
}
DEFAULTS = DiffusionDefaults.from_generation_config(CHECKPOINT_GEN_CONFIG)


def parse(raw):
    return DiffusionParams.from_request(raw, DEFAULTS, vocab_size=VOCAB, canvas_length=CANVAS)


def test_defaults_read_checkpoint_generation_config():
    """Every sampler key of generation_config.json, incl. the nested sampler_config, is read."""
    assert DEFAULTS == DiffusionDefaults(32, 0.25, 0.3, 0.9, 2, 0.01, eos_token_ids=(1, 106, 50), pad_token_id=0)


def test_defaults_are_read_from_a_local_checkpoint_or_a_hub_ids_cache(tmp_path, monkeypatch):
    """``--model-path`` a directory, or a Hub id (the CUDA image's default) whose files sglang fetched into the Hub
    cache: both give the checkpoint's generation_config.json (a Hub id read none, and ran on transformers' defaults
    with no EOS ids); a directory without one gives the fallbacks."""
    import json

    import huggingface_hub.constants

    from sgl_diffusion.runtime.scheduler_hook import load_defaults

    local = tmp_path / "local"
    local.mkdir()
    (local / "generation_config.json").write_text(json.dumps(CHECKPOINT_GEN_CONFIG))
    assert load_defaults(str(local)) == DEFAULTS
    assert load_defaults(str(tmp_path)) == DiffusionDefaults.from_generation_config({})

    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--google--diffusiongemma-test" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "generation_config.json").write_text(json.dumps(CHECKPOINT_GEN_CONFIG))
    (cache / "models--google--diffusiongemma-test" / "refs").mkdir()
    (cache / "models--google--diffusiongemma-test" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no machine here reaches the Hub
    assert load_defaults("google/diffusiongemma-test") == DEFAULTS
    assert load_defaults("google/diffusiongemma-test", revision=commit) == DEFAULTS


def test_defaults_fall_back_to_transformers_globals():
    """Missing or null keys take transformers' global fallbacks; a scalar eos becomes a 1-tuple."""
    hf = DiffusionGemmaGenerationConfig._get_default_generation_params()
    for d in ({}, {"t_min": None, "sampler_config": None, "eos_token_id": 1}):
        got = DiffusionDefaults.from_generation_config(d)
        assert (got.max_denoising_steps, got.entropy_bound, got.t_min, got.t_max) == (
            hf["max_denoising_steps"], hf["sampler_config"].entropy_bound, hf["t_min"], hf["t_max"])
        assert (got.stability_threshold, got.confidence_threshold) == (
            hf["stability_threshold"], hf["confidence_threshold"])
        assert got.pad_token_id is None
    assert got.eos_token_ids == (1,)
    assert DiffusionDefaults.from_generation_config({}).eos_token_ids == ()


def test_defaults_reject_unknown_sampler_and_bad_values():
    """A different sampler class or an out-of-range checkpoint value fails at startup, naming the key."""
    with pytest.raises(InvalidDiffusionParams, match="sampler_config"):
        DiffusionDefaults.from_generation_config({"sampler_config": {"_cls_name": "Other", "entropy_bound": 0.1}})
    with pytest.raises(InvalidDiffusionParams, match=r"generation_config\.t_min"):
        DiffusionDefaults.from_generation_config({"t_min": 0.9, "t_max": 0.8})


def test_t_min_zero_is_a_schedule_transformers_accepts():
    """t_min is never a step's temperature (the last step's is t_min + (t_max - t_min) / N): 0 is valid, in a request
    and in a checkpoint, as transformers' own generation config accepts it."""
    DiffusionGemmaGenerationConfig(t_min=0.0, t_max=0.8).validate()
    assert (parse({"t_min": 0}).t_min, parse({"t_min": 0}).t_max) == (0.0, 0.9)
    assert DiffusionDefaults.from_generation_config({"t_min": 0.0, "t_max": 0.8}).t_min == 0.0


def test_a_stability_threshold_past_the_steps_is_valid():
    """As in transformers (the stop then never fires): a request lowering max_denoising_steps under the checkpoint's
    stability_threshold (2 here) is not refused for a key it did not set."""
    DiffusionGemmaGenerationConfig(max_denoising_steps=1, stability_threshold=2).validate()
    p = parse({"max_denoising_steps": 1})
    assert (p.max_denoising_steps, p.stability_threshold) == (1, 2)


@pytest.mark.parametrize("raw", [None, {}])
def test_missing_keys_take_defaults(raw):
    """An absent or empty `diffusion` object gives the checkpoint defaults and no seed/init canvas."""
    assert parse(raw) == DiffusionParams(32, 0.25, 0.3, 0.9, 0.01, 2, None, None, False)


def test_overrides_accept_ints_for_floats_and_boundaries():
    """Ints are accepted (as floats) where floats are; boundary values are valid."""
    p = parse({"t_min": 1, "t_max": 1, "entropy_bound": 0, "confidence_threshold": 0, "max_denoising_steps": 1024,
               "stability_threshold": 1024, "seed": -(2**63), "init_canvas": [0] * (CANVAS - 1) + [VOCAB - 1],
               "stream_drafts": True})
    assert type(p.t_min) is float and p.t_min == p.t_max == 1.0
    assert p.entropy_bound == 0.0 and p.stability_threshold == 1024 and p.seed == -(2**63)
    assert p.init_canvas == (0,) * (CANVAS - 1) + (VOCAB - 1,) and p.stream_drafts is True
    assert parse({"seed": 2**63 - 1}).seed == 2**63 - 1


INVALID = [
    ([1, 2], "diffusion must be a JSON object"),
    ("x", "diffusion must be a JSON object"),
    ({"temperature": 0.5}, "unknown key.*temperature.*allowed.*t_min"),
    ({"max_denoising_steps": 2.0}, r"diffusion\.max_denoising_steps must be int"),
    ({"max_denoising_steps": True}, r"diffusion\.max_denoising_steps must be int"),
    ({"max_denoising_steps": 0}, r"diffusion\.max_denoising_steps must be in \[1, 1024\]"),
    ({"max_denoising_steps": 1025}, r"diffusion\.max_denoising_steps must be in \[1, 1024\]"),
    ({"entropy_bound": "0.1"}, r"diffusion\.entropy_bound must be a number"),
    ({"entropy_bound": True}, r"diffusion\.entropy_bound must be a number"),
    ({"entropy_bound": None}, r"diffusion\.entropy_bound must be a number"),
    ({"entropy_bound": -0.1}, r"diffusion\.entropy_bound must be >= 0"),
    ({"entropy_bound": math.nan}, r"diffusion\.entropy_bound must be finite"),
    ({"t_max": math.inf}, r"diffusion\.t_max must be finite"),
    ({"t_max": 10**400}, r"diffusion\.t_max must be finite \(got an integer of 401 digits\)"),  # no OverflowError
    ({"entropy_bound": -(10**400)}, r"diffusion\.entropy_bound must be finite"),
    ({"t_min": -0.1}, r"diffusion\.t_min must be in \[0, 1e\+06\]"),
    ({"t_min": -1.0, "t_max": -0.5}, r"diffusion\.t_min must be in \[0, "),
    # float32 temperatures: 1e-46 rounds to 0 and 1e-38 sends logits to inf (NaN probabilities); 1e39 is inf
    ({"t_min": 1e-46, "t_max": 1e-46}, r"diffusion\.t_max must be in \[1e-06.*temperature 0 asks for greedy"),
    ({"t_min": 0, "t_max": 1e-5}, r"the last step's temperature, must be >= 1e-06 \(got 3\.1\d*e-07"),
    ({"t_max": 1e39}, r"diffusion\.t_max must be in \[1e-06, 1e\+06\] \(got 1e\+39"),
    ({"t_min": 0.9, "t_max": 0.8}, r"^diffusion\.t_min must be <= diffusion\.t_max \(got 0\.9 > 0\.8\)$"),
    ({"confidence_threshold": -1e-3}, r"diffusion\.confidence_threshold must be >= 0"),
    ({"confidence_threshold": False}, r"diffusion\.confidence_threshold must be a number"),
    ({"stability_threshold": -1}, r"diffusion\.stability_threshold must be in \[0"),
    ({"stability_threshold": 1025}, r"diffusion\.stability_threshold must be in \[0, 1024\]"),
    ({"stability_threshold": 1.0}, r"diffusion\.stability_threshold must be int"),
    ({"seed": 2**63}, r"diffusion\.seed must fit in a signed 64-bit"),
    ({"seed": -(2**63) - 1}, r"diffusion\.seed must fit in a signed 64-bit"),
    ({"seed": "7"}, r"diffusion\.seed must be int"),
    ({"seed": True}, r"diffusion\.seed must be int"),
    ({"init_canvas": "1 2 3"}, r"diffusion\.init_canvas must be a list"),
    ({"init_canvas": []}, r"diffusion\.init_canvas must hold 1\.\.16 ids"),
    ({"init_canvas": [1] * (CANVAS + 1)}, r"diffusion\.init_canvas must hold 1\.\.16 ids"),
    ({"init_canvas": [1, 2.0]}, r"diffusion\.init_canvas\[1\] must be int"),
    ({"init_canvas": [True]}, r"diffusion\.init_canvas\[0\] must be int"),
    ({"init_canvas": [3, -1]}, r"diffusion\.init_canvas\[1\] must be in \[0, 1000\)"),
    ({"init_canvas": [VOCAB]}, r"diffusion\.init_canvas\[0\] must be in \[0, 1000\)"),
    ({"stream_drafts": 1}, r"diffusion\.stream_drafts must be bool"),
]


@pytest.mark.parametrize("raw,message", INVALID, ids=[m.split(" must")[0].lstrip("^") for _, m in INVALID])
def test_invalid_request_raises_naming_the_field(raw, message):
    """Each malformed `diffusion` object raises InvalidDiffusionParams (a ValueError) whose message names the field."""
    with pytest.raises(InvalidDiffusionParams, match=message) as info:
        parse(raw)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("raw", [{}, {"seed": -5, "init_canvas": [7, 8, 9], "stream_drafts": True, "t_max": 2}])
def test_json_round_trip(raw):
    """to_json is compact and from_json restores an equal (and hashable) object."""
    p = parse(raw)
    s = p.to_json()
    assert " " not in s
    q = DiffusionParams.from_json(s)
    assert q == p and hash(q) == hash(p)
