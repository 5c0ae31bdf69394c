"""Which sglang sampling parameters a DiffusionGemma request may use, and how they map."""

import pytest

from sgl_diffusion.runtime.admission import GREEDY_TEMPERATURE, check_logprobs, check_request
from sgl_diffusion.sampling.params import DiffusionDefaults

DEFAULTS = DiffusionDefaults.from_generation_config({})


def check(sampling, raw=None, logprob=False, tokenizer=None):
    return check_request(sampling, logprob, raw, DEFAULTS, vocab_size=100, canvas_length=32, tokenizer=tokenizer)


def test_defaults_pass_through():
    """A request using sglang's default sampling values gets the checkpoint's schedule."""
    p = check({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0, "n": 2})
    assert (p.t_min, p.t_max) == (0.4, 0.8)


@pytest.mark.parametrize(
    "sampling, word",
    [({"frequency_penalty": 0.5}, "frequency_penalty"), ({"presence_penalty": -1}, "presence_penalty"),
     ({"repetition_penalty": 1.2}, "repetition_penalty"), ({"min_new_tokens": 4}, "min_new_tokens"),
     ({"top_p": 0.9}, "top_p"), ({"top_k": 20}, "top_k"), ({"min_p": 0.1}, "min_p"),
     ({"logit_bias": {"3": 1.0}}, "logit_bias")],
)  # fmt: skip
def test_unsupported_features_are_refused(sampling, word):
    """Penalties and token-sampler filters raise ValueError naming the parameter."""
    with pytest.raises(ValueError, match=word):
        check(sampling)


@pytest.mark.parametrize("sampling, message", [
    ({"max_new_tokens": 40.0}, "max_new_tokens must be an integer"), ({"max_new_tokens": True}, "an integer"),
    ({"n": 2.0}, "n must be an integer"), ({"n": 0}, "n must be at least 1"), ({"n": -1}, "at least 1"),
    ({"skip_special_tokens": "no"}, "skip_special_tokens must be a boolean"), ({"ignore_eos": 1}, "a boolean"),
    ({"stop": 5}, "stop must be a string or a list"), ({"stop": ["a", 5]}, "a list of strings"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids must be a list of integers"),
])  # fmt: skip
def test_sampling_fields_of_the_wrong_type_are_refused(sampling, message):
    """Routes that pass sampling fields on unchecked (/vertex_generate, Ollama's options) get a 400 here."""
    with pytest.raises(ValueError, match=message):
        check(sampling)
    check({"max_new_tokens": 40, "n": 2, "stop": ["a"], "stop_token_ids": [3], "skip_special_tokens": False})


def test_grammars_and_logprobs_pass():
    """Grammars and logprobs act on the canvas: a request with them is accepted here (compiled by sglang later)."""
    for sampling in ({"regex": "a+"}, {"json_schema": "{}"}, {"ebnf": "root ::= x"}, {"structural_tag": "{}"}):
        check(sampling, logprob=True)


@pytest.mark.parametrize("start, prompt_len, images, word", [
    (-1, 500, True, None), (None, 10, False, None), (10, 10, True, None),  # output logprobs only
    (5, 10, False, None), (435, 500, False, None),  # 64 scored prompt tokens at most
    (434, 500, False, "one canvas forward per scored token"), (0, 10, True, "with images"),
])  # fmt: skip
def test_prompt_logprobs_are_bounded(start, prompt_len, images, word):
    """Prompt scores cost a canvas forward each: at most 64 (after the null first entry); none with images."""
    if word is None:
        check_logprobs(True, start, None, prompt_len, images)
    else:
        with pytest.raises(ValueError, match=word):
            check_logprobs(True, start, None, prompt_len, images)
    check_logprobs(False, 0, [1], 10_000, True)  # nothing asked, nothing checked
    with pytest.raises(ValueError, match="token_ids_logprob"):
        check_logprobs(True, -1, [1], 10, False)


class _Chars:
    """A character tokenizer: id = ord(c) (the vocabulary is 100 ids here)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, **kwargs):
        return "".join(map(chr, ids))


def test_infill_checks():
    """An infill template is laid out with the tokenizer; with a grammar, or holding an EOS id, it is refused."""
    raw = {"infill": {"template": "ab{{hole:2}}"}}
    assert check({}, raw, tokenizer=_Chars()).infill == (97, 98, -1, -1)
    with pytest.raises(ValueError, match=r"the suffix of a completion\) cannot be combined with a grammar \(regex"):
        check({"regex": "a+"}, raw, tokenizer=_Chars())
    defaults = DiffusionDefaults.from_generation_config({"eos_token_id": [98]})
    with pytest.raises(ValueError, match="end-of-sequence"):
        check_request({}, False, raw, defaults, vocab_size=100, canvas_length=32, tokenizer=_Chars())


def test_temperature_scales_the_schedule_and_zero_is_greedy():
    """temperature multiplies t_min and t_max; 0 (or top_k=1) gives a near-zero, greedy schedule."""
    p = check({"temperature": 0.5})
    assert (p.t_min, p.t_max) == pytest.approx((0.2, 0.4))
    p = check({"temperature": 0.0, "top_k": 1})
    assert p.t_max == pytest.approx(0.8 * GREEDY_TEMPERATURE) and p.seed == 0  # deterministic without a seed
    assert check({"temperature": 0.0}, {"seed": 5}).seed == 5
    with pytest.raises(ValueError, match="either temperature or diffusion"):
        check({"temperature": 0.5}, {"t_min": 0.1})


@pytest.mark.parametrize("sampling", [{"top_k": 1}, {"top_k": 1, "temperature": 0.7}, {"top_k": 1, "temperature": 1.0}])
def test_top_k_1_is_greedy_whatever_the_temperature(sampling):
    """top_k=1 picks the likeliest token, whatever the temperature, as sglang's token sampler reads it."""
    assert check(sampling) == check({"temperature": 0.0})
    assert check(sampling, {"seed": 5}) == check({"temperature": 0.0}, {"seed": 5})
    with pytest.raises(ValueError, match="either top_k=1 or diffusion"):
        check(sampling, {"t_max": 0.5})
    with pytest.raises(ValueError, match="temperature must be in"):
        check(sampling | {"temperature": -1})


@pytest.mark.parametrize("temperature", [1e-7, 1e-38, 5e-324])
def test_a_temperature_below_sglangs_epsilon_is_greedy(temperature):
    """As sglang reads temperature < 1e-6: greedy, not a float32 temperature that rounds to 0 or sends the logits
    to inf (a NaN in one canvas's probabilities failed the whole forward round, every request in it)."""
    p = check({"temperature": temperature})
    assert (p.t_min, p.t_max) == pytest.approx((0.4 * GREEDY_TEMPERATURE, 0.8 * GREEDY_TEMPERATURE))
    assert p.seed == 0


@pytest.mark.parametrize("temperature", [1e39, 1e7, -0.1, float("inf"), float("nan"), "0.5"])
def test_a_temperature_outside_its_range_is_refused(temperature):
    with pytest.raises(ValueError, match=r"temperature must be in \[0, 1e\+06\]"):
        check({"temperature": temperature})


def test_sampling_seed_seeds_the_canvas_sampler():
    """sglang's sampling_seed (OpenAI seed) becomes the diffusion seed unless one is given."""
    assert check({"sampling_seed": 7}).seed == 7
    assert check({"sampling_seed": 7}, {"seed": 9}).seed == 9
    # refused naming what the client sent
    with pytest.raises(ValueError, match=r"^seed \(sampling_seed\) must fit in a signed 64-bit integer"):
        check({"sampling_seed": 2**64 - 1})
