import copy
from inspect import Parameter

import pytest

from srt_patches import api_contract

EMPTY = Parameter.empty
# What the wrapper relies on: the body is the first positional argument.
EXPECTED_PARAMETERS = {
    "sglang.srt.entrypoints.api_contract.generate_contract_error": [("body", EMPTY)],
    "sglang.srt.managers.io_struct.GenerateReqInput.normalize_batch_and_arguments": [("self", EMPTY)],
    "sglang.srt.managers.io_struct.GenerateReqInput._handle_parallel_sampling": [("self", EMPTY)],
}
DIFFUSION = {"seed": 3, "max_denoising_steps": 8}


def _check(body):
    from sglang.srt.entrypoints import api_contract as upstream_module

    return upstream_module.generate_contract_error(body)


def test_every_target_has_an_expected_signature():
    """Each target the module declares is covered by the signature table of this file."""
    assert set(api_contract.TARGETS) == set(EXPECTED_PARAMETERS)


@pytest.mark.parametrize("target", api_contract.TARGETS)
def test_upstream_signature(target, upstream_parameters):
    """The upstream function still takes exactly (body)."""
    assert upstream_parameters(target) == EXPECTED_PARAMETERS[target]


@pytest.mark.parametrize("target", api_contract.TARGETS)
def test_installed(target, applied):
    """apply() leaves our wrapper on the target."""
    assert applied.is_installed(target)


def test_http_server_binding_is_patched(applied, resolve):
    """http_server's `from api_contract import generate_contract_error` binding is the wrapper too."""
    from sglang.srt.entrypoints import http_server

    assert http_server.generate_contract_error is resolve(api_contract.TARGETS[0])


def test_diffusion_in_sampling_params_passes(applied):
    """A /generate body whose sampling_params carry `diffusion` has no contract error."""
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 4, "diffusion": DIFFUSION}}
    assert _check(body) is None


def test_upstream_alone_rejects_diffusion(upstream):
    """Without the wrapper the schema rejects `diffusion` (the patch is still needed; see Remove when)."""
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 4, "diffusion": DIFFUSION}}
    error = upstream(api_contract.TARGETS[0])(body)
    assert error is not None and "diffusion" in error


def test_unknown_sampling_key_still_rejected(applied):
    """An unknown sampling key is still a contract error, with or without `diffusion` beside it."""
    for sampling in ({"bogus": 1}, {"bogus": 1, "diffusion": DIFFUSION}):
        error = _check({"text": "hi", "sampling_params": sampling})
        assert error is not None and "bogus" in error


def test_list_form_sampling_params(applied):
    """List-form sampling_params pass with `diffusion` in some entries and fail on an unknown key in any entry."""
    ok = {"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 4, "diffusion": DIFFUSION}, {"max_new_tokens": 2}]}
    assert _check(ok) is None
    bad = {"text": ["a", "b"], "sampling_params": [{"diffusion": DIFFUSION}, {"bogus": 1}]}
    error = _check(bad)
    assert error is not None and "bogus" in error


def test_body_is_not_mutated(applied):
    """The caller's body keeps its `diffusion` entries; the wrapper checks a stripped copy."""
    body = {"text": ["a", "b"], "sampling_params": [{"diffusion": DIFFUSION}, {"max_new_tokens": 2, "diffusion": {}}]}
    before = copy.deepcopy(body)
    assert _check(body) is None
    assert body == before


def test_bodies_without_diffusion_are_judged_by_upstream():
    """Bodies without `diffusion` (or not dicts) reach the original unchanged."""
    seen = []

    def original(body):
        seen.append(body)
        return "verdict"

    bodies = [{"text": "hi"}, {"text": "hi", "sampling_params": None}, {"text": "hi", "sampling_params": {"n": 1}}, [1]]
    for body in bodies:
        assert api_contract.generate_contract_error(original, body) == "verdict"
    assert seen == bodies


def _normalized(**fields):
    from sglang.srt.managers.io_struct import GenerateReqInput

    request = GenerateReqInput(**fields)
    request.normalize_batch_and_arguments()
    return request


@pytest.mark.parametrize("fields, message", [
    ({"text": "Hi", "sampling_params": [{}]}, "a list of 1 but the prompt is one"),
    ({"input_ids": [2, 5], "sampling_params": [{}, {}]}, "a list of 2 but the prompt is one"),
    ({"text": ["Hi", "Yo", "Hey"], "sampling_params": [{}, {}]}, "has 2 entries for 3 prompts"),
    ({"text": ["Hi", "Yo"], "sampling_params": [{"n": 2}]}, "has 1 entries for 2 prompts"),
    ({"text": ["Hi", "Yo"], "sampling_params": []}, "a non-empty list of objects"),
    ({"text": ["Hi", "Yo"], "sampling_params": [{}, 3]}, "a non-empty list of objects"),
    ({"input_embeds": []}, "input_embeds is empty"),
    ({"input_embeds": [[]]}, "input_embeds is empty"),
    # sglang's own refusals, raised before it has read a prompt (is_single is not set yet)
    ({"sampling_params": {"n": 2}}, "should be provided"),
    ({"input_ids": [], "sampling_params": {"n": 2}}, "should be provided|empty"),
])  # fmt: skip
def test_a_sampling_params_list_that_does_not_fit_the_prompts_is_a_value_error(applied, fields, message):
    """sglang read these unchecked: an AttributeError or IndexError later, an HTTP 500."""
    with pytest.raises(ValueError, match=message):
        _normalized(**fields)


def test_sampling_params_that_fit_are_normalized_as_sglang_does(applied):
    assert _normalized(text="Hi", sampling_params={"temperature": 0.5}).sampling_params == {"temperature": 0.5}
    batch = _normalized(text=["Hi", "Yo"], sampling_params=[{"temperature": 0.5}, {"temperature": 0.7}])
    assert [p["temperature"] for p in batch.sampling_params] == [0.5, 0.7]
    assert len(_normalized(text=["Hi", "Yo"], sampling_params={}).sampling_params) == 2
    # more dicts than prompts: sglang serves them (each prompt its own), for every model; not ours to refuse
    extra = _normalized(text=["Hi", "Yo"], sampling_params=[{"temperature": 0.5}, {"temperature": 0.7}, {}])
    assert [extra[i].sampling_params["temperature"] for i in range(2)] == [0.5, 0.7]
    parallel = _normalized(text="Hi", sampling_params=[{"n": 2}])  # n > 1 makes one prompt a batch of one
    assert parallel.batch_size == 1 and len(parallel.sampling_params) == 2


@pytest.mark.parametrize("prompt", [{"text": "<|image|><|image|> Hi"}, {"input_ids": [2, 18, 18, 5]}])
def test_one_prompts_media_list_goes_with_each_of_its_n_samples(applied, prompt):
    """A single prompt with n > 1 is a batch of one: its list of images (videos) is that prompt's, and every sample
    gets all of them, as n = 1 reads the list; upstream refused two images and dealt two videos out one per sample."""
    images, videos = ["img-a", "img-b"], ["vid-a", "vid-b"]
    request = _normalized(**prompt, image_data=images, video_data=videos, sampling_params={"n": 3})
    assert request.image_data == [images] * 3 and request.video_data == [videos] * 3
    assert request.modalities == ["multi-images"] * 3
    one = _normalized(**prompt, image_data=list(images), sampling_params={"n": 1})
    assert one.image_data == images  # n = 1: left as sglang reads it
    single = _normalized(**prompt, image_data="img-a", sampling_params={"n": 2})
    assert single.image_data == [["img-a"]] * 2  # one image, not in a list: sglang's own path
    listed = _normalized(**prompt, image_data=list(images), sampling_params=[{"n": 2}])  # the list form of n
    assert listed.image_data == [images] * 2
    hashed = _normalized(**prompt, image_data=list(images), mm_hashes=["h-a", "h-b"], sampling_params={"n": 2})
    assert hashed.image_data == [images] * 2 and hashed.mm_hashes == [["h-a", "h-b"]] * 2


@pytest.mark.parametrize("sampling", [{"n": 1}, {"n": 0}, {"n": 2, "beam_width": 2}, {}])
def test_media_of_a_prompt_that_stays_single_are_left_alone(applied, sampling):
    """n = 1 (or n <= 0, or beam search, where n counts the beams returned) keeps one prompt single: its media list
    is what sglang reads, untouched."""
    request = _normalized(text="<|image|><|image|> Hi", image_data=["img-a", "img-b"], video_data=["vid-a"],
                          sampling_params=sampling)
    assert request.is_single and request.image_data == ["img-a", "img-b"] and request.video_data == ["vid-a"]


def test_upstream_refuses_one_prompts_two_images_with_n_above_one(upstream, monkeypatch):
    """Why the media are wrapped: upstream reads one prompt's image list as one image per prompt of the batch."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    monkeypatch.setattr(GenerateReqInput, "_handle_parallel_sampling", upstream(api_contract.TARGETS[2]))
    request = GenerateReqInput(text="<|image|><|image|> Hi", image_data=["a", "b"], sampling_params={"n": 2})
    with pytest.raises(ValueError, match="length of image_data should be equal to the batch size"):
        request.normalize_batch_and_arguments()
