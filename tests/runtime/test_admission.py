"""Which sglang sampling parameters a DiffusionGemma request may use, and how they map."""

import pytest

from sgl_diffusion.runtime.admission import GREEDY_TEMPERATURE, check_request
from sgl_diffusion.sampling.params import DiffusionDefaults

DEFAULTS = DiffusionDefaults.from_generation_config({})


def check(sampling, raw=None, logprob=False):
    return check_request(sampling, logprob, raw, DEFAULTS, vocab_size=100, canvas_length=32)


def test_defaults_pass_through():
    """A request using sglang's default sampling values gets the checkpoint's schedule."""
    p = check({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0, "n": 2})
    assert (p.t_min, p.t_max) == (0.4, 0.8)


@pytest.mark.parametrize(
    "sampling, word",
    [({"regex": "a+"}, "regex"), ({"json_schema": "{}"}, "json_schema"), ({"ebnf": "x"}, "ebnf"),
     ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"presence_penalty": -1}, "presence_penalty"),
     ({"repetition_penalty": 1.2}, "repetition_penalty"), ({"min_new_tokens": 4}, "min_new_tokens"),
     ({"top_p": 0.9}, "top_p"), ({"top_k": 20}, "top_k"), ({"min_p": 0.1}, "min_p"),
     ({"logit_bias": {"3": 1.0}}, "logit_bias")],
)  # fmt: skip
def test_unsupported_features_are_refused(sampling, word):
    """Grammars, penalties and token-sampler filters raise ValueError naming the parameter."""
    with pytest.raises(ValueError, match=word):
        check(sampling)


def test_logprobs_refused():
    """return_logprob is refused until committed-token logprobs exist."""
    with pytest.raises(ValueError, match="logprobs"):
        check({}, logprob=True)


def test_temperature_scales_the_schedule_and_zero_is_greedy():
    """temperature multiplies t_min and t_max; 0 (or top_k=1) gives a near-zero, greedy schedule."""
    p = check({"temperature": 0.5})
    assert (p.t_min, p.t_max) == pytest.approx((0.2, 0.4))
    p = check({"temperature": 0.0, "top_k": 1})
    assert p.t_max == pytest.approx(0.8 * GREEDY_TEMPERATURE) and p.seed == 0  # deterministic without a seed
    assert check({"temperature": 0.0}, {"seed": 5}).seed == 5
    with pytest.raises(ValueError, match="either temperature or diffusion"):
        check({"temperature": 0.5}, {"t_min": 0.1})


def test_sampling_seed_seeds_the_canvas_sampler():
    """sglang's sampling_seed (OpenAI seed) becomes the diffusion seed unless one is given."""
    assert check({"sampling_seed": 7}).seed == 7
    assert check({"sampling_seed": 7}, {"seed": 9}).seed == 9
