import json
from inspect import Parameter
from types import SimpleNamespace

import pytest

from srt_patches import tokenizer_manager

EMPTY = Parameter.empty
# What the wrapper relies on: the request object is the argument after `self` and carries `sampling_params`.
EXPECTED_PARAMETERS = {
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._create_tokenized_object": [
        ("self", EMPTY), ("obj", EMPTY), ("input_text", EMPTY), ("input_ids", EMPTY), ("input_embeds", None),
        ("mm_inputs", None),
    ],
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._handle_batch_request": [
        ("self", EMPTY), ("obj", EMPTY), ("request", EMPTY), ("request_states", EMPTY),
    ],
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._send_one_request": [
        ("self", EMPTY), ("tokenized_obj", EMPTY),
    ],
}  # fmt: skip
TARGET = tokenizer_manager.TARGETS[0]


class Recorder:
    """A fake original: records the sampling params it is called with, returns a sentinel."""

    result = object()

    def __init__(self, raises: Exception | None = None):
        self.calls = []
        self.raises = raises

    def __call__(self, manager, obj, *args, **kwargs):
        self.calls.append((obj.sampling_params, args, kwargs))
        if self.raises is not None:
            raise self.raises
        return self.result


@pytest.fixture(scope="module")
def hf_config(tiny_checkpoint_dir):
    from sglang.srt.utils.hf_transformers_utils import get_config

    return get_config(str(tiny_checkpoint_dir), trust_remote_code=False)


def _manager(hf_config, model_path, preferred=None):
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf_config),
        server_args=SimpleNamespace(model_path=str(model_path), revision=None),
        preferred_sampling_params=preferred,
        tokenizer=None,  # what sglang's manager has with --skip-tokenizer-init (infill then needs one)
        context_len=4096,
    )


def _params_from(sampling: dict):
    from sgl_diffusion.runtime.scheduler_hook import PARAMS_KEY
    from sgl_diffusion.sampling.params import DiffusionParams

    return DiffusionParams.from_json(sampling["custom_params"][PARAMS_KEY])


def test_every_target_has_an_expected_signature():
    """Each target the module declares is covered by the signature table of this file."""
    assert set(tokenizer_manager.TARGETS) == set(EXPECTED_PARAMETERS)


@pytest.mark.parametrize("target", tokenizer_manager.TARGETS)
def test_upstream_signature(target, upstream_parameters):
    """The upstream function still starts with (self, obj, input_text, input_ids)."""
    expected = EXPECTED_PARAMETERS[target]
    assert upstream_parameters(target)[: len(expected)] == expected


@pytest.mark.parametrize("target", tokenizer_manager.TARGETS)
def test_installed(target, applied):
    """apply() leaves our wrapper on the target."""
    assert applied.is_installed(target)


def test_diffusion_moves_into_custom_params(hf_config, tiny_checkpoint_dir):
    """The original sees no `diffusion` key but the validated params (request over generation_config) as JSON."""
    from sgl_diffusion.runtime.scheduler_hook import PARAMS_KEY
    from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams

    original = Recorder()
    sampling = {"max_new_tokens": 8, "diffusion": {"seed": 5}}
    obj = SimpleNamespace(sampling_params=sampling)
    manager = _manager(hf_config, tiny_checkpoint_dir)
    result = tokenizer_manager.create_tokenized_object(original, manager, obj, "hi", [1, 2], mm_inputs=None)

    assert result is Recorder.result
    [(seen, args, kwargs)] = original.calls
    assert (args, kwargs) == (("hi", [1, 2]), {"mm_inputs": None})
    assert "diffusion" not in seen and seen["max_new_tokens"] == 8
    assert set(seen["custom_params"]) == {PARAMS_KEY}
    generation_config = json.loads((tiny_checkpoint_dir / "generation_config.json").read_text())
    defaults = DiffusionDefaults.from_generation_config(generation_config)
    expected = DiffusionParams.from_request({"seed": 5}, defaults, vocab_size=hf_config.text_config.vocab_size,
                                            canvas_length=hf_config.canvas_length)  # fmt: skip
    assert seen["custom_params"][PARAMS_KEY] == expected.to_json()
    params = _params_from(seen)
    assert params.seed == 5 and params.max_denoising_steps == generation_config["max_denoising_steps"]
    assert params.t_min == generation_config["t_min"] and params.t_max == generation_config["t_max"]
    assert obj.sampling_params is sampling and sampling == {"max_new_tokens": 8, "diffusion": {"seed": 5}}


def test_defaults_come_from_the_served_checkpoint(hf_config, tiny_checkpoint_dir, tmp_path):
    """Unset fields take the generation_config.json under server_args.model_path (read once per manager)."""
    gen = json.loads((tiny_checkpoint_dir / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps(gen | {"max_denoising_steps": 7, "t_min": 0.25}))
    manager = _manager(hf_config, tmp_path)
    original = Recorder()
    obj = SimpleNamespace(sampling_params={"diffusion": {}})
    tokenizer_manager.create_tokenized_object(original, manager, obj)
    (tmp_path / "generation_config.json").unlink()  # the second request must use the cached defaults
    tokenizer_manager.create_tokenized_object(original, manager, obj)
    for seen, _, _ in original.calls:
        params = _params_from(seen)
        assert (params.max_denoising_steps, params.t_min, params.seed) == (7, 0.25, None)


def test_no_diffusion_key_still_gets_checkpoint_defaults(hf_config, tiny_checkpoint_dir):
    """A request without `diffusion` to a DiffusionGemma server still carries validated defaults."""
    original = Recorder()
    obj = SimpleNamespace(sampling_params={"max_new_tokens": 8})
    tokenizer_manager.create_tokenized_object(original, _manager(hf_config, tiny_checkpoint_dir), obj)
    params = _params_from(original.calls[0][0])
    assert params.seed is None and params.max_denoising_steps == 48


def test_user_custom_params_are_kept_but_cannot_smuggle_params(hf_config, tiny_checkpoint_dir):
    """Other custom_params survive; a client-sent `sgl_diffusion` entry is replaced by the validated one."""
    from sgl_diffusion.runtime.scheduler_hook import PARAMS_KEY

    original = Recorder()
    smuggled = json.dumps({"max_denoising_steps": 10**9})
    custom = {"thinking_budget": 3, PARAMS_KEY: smuggled}
    obj = SimpleNamespace(sampling_params={"custom_params": custom, "diffusion": {"seed": 1}})
    tokenizer_manager.create_tokenized_object(original, _manager(hf_config, tiny_checkpoint_dir), obj)
    seen = original.calls[0][0]["custom_params"]
    assert seen["thinking_budget"] == 3 and seen[PARAMS_KEY] != smuggled
    assert _params_from(original.calls[0][0]).seed == 1
    assert custom == {"thinking_budget": 3, PARAMS_KEY: smuggled}  # the client's dict is not mutated


@pytest.mark.parametrize(
    "raw, field",
    [({"t_min": -1}, "diffusion.t_min"), ({"seed": "x"}, "diffusion.seed"), ({"bogus": 1}, "bogus"),
     ({"init_canvas": [0] * 33}, "diffusion.init_canvas")],
)  # fmt: skip
def test_invalid_diffusion_raises_value_error(hf_config, tiny_checkpoint_dir, raw, field):
    """An invalid `diffusion` value raises ValueError naming the field; the original is not called."""
    original = Recorder()
    sampling = {"max_new_tokens": 8, "diffusion": raw}
    obj = SimpleNamespace(sampling_params=sampling)
    with pytest.raises(ValueError, match=field):
        tokenizer_manager.create_tokenized_object(original, _manager(hf_config, tiny_checkpoint_dir), obj)
    assert original.calls == [] and obj.sampling_params is sampling


def test_sampling_params_restored_when_original_raises(hf_config, tiny_checkpoint_dir):
    """obj.sampling_params is restored even when the original raises."""
    original = Recorder(raises=RuntimeError("boom"))
    sampling = {"max_new_tokens": 8, "diffusion": {"seed": 5}}
    obj = SimpleNamespace(sampling_params=sampling)
    with pytest.raises(RuntimeError, match="boom"):
        tokenizer_manager.create_tokenized_object(original, _manager(hf_config, tiny_checkpoint_dir), obj)
    assert obj.sampling_params is sampling and "diffusion" in sampling


def test_other_models_reject_diffusion():
    """On a non-diffusion model a `diffusion` key raises ValueError; without one the request passes untouched."""
    hf = SimpleNamespace(architectures=["LlamaForCausalLM"])
    manager = _manager(hf, "/nonexistent")
    original = Recorder()
    for value in ({}, None):
        with pytest.raises(ValueError, match="diffusion"):
            obj = SimpleNamespace(sampling_params={"diffusion": value})
            tokenizer_manager.create_tokenized_object(original, manager, obj)
    assert original.calls == []
    sampling = {"max_new_tokens": 8}
    tokenizer_manager.create_tokenized_object(original, manager, SimpleNamespace(sampling_params=sampling))
    assert original.calls[0][0] is sampling and sampling == {"max_new_tokens": 8}


def test_non_dict_sampling_params_pass_through(hf_config, tiny_checkpoint_dir):
    """Objects without dict sampling_params (e.g. embedding requests) reach the original untouched."""
    original = Recorder()
    obj = SimpleNamespace(sampling_params=None)
    tokenizer_manager.create_tokenized_object(original, _manager(hf_config, tiny_checkpoint_dir), obj)
    assert original.calls[0][0] is None


def test_installed_method_feeds_sglang_sampling_params(applied, hf_config, tiny_checkpoint_dir):
    """Through the installed method, sglang's own SamplingParams is built from the rewritten dict."""
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sgl_diffusion.runtime.scheduler_hook import PARAMS_KEY

    class Built(Exception):
        pass

    def build(**kwargs):
        raise Built(SamplingParams(**kwargs))  # stop before the parts of the original that need a live manager

    manager = _manager(hf_config, tiny_checkpoint_dir)
    manager.preferred_sampling_params = None
    manager.sampling_params_class = build
    obj = SimpleNamespace(sampling_params={"max_new_tokens": 8, "diffusion": {"seed": 5}})
    with pytest.raises(Built) as built:
        TokenizerManager._create_tokenized_object(manager, obj, "hi", [1, 2])
    sampling_params = built.value.args[0]
    assert sampling_params.max_new_tokens == 8
    assert json.loads(sampling_params.custom_params[PARAMS_KEY])["seed"] == 5
    assert obj.sampling_params == {"max_new_tokens": 8, "diffusion": {"seed": 5}}


def test_sglang_sampling_params_rejects_diffusion():
    """SamplingParams itself still refuses a `diffusion` keyword (the patch is still needed; see Remove when)."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    with pytest.raises(TypeError, match="diffusion"):
        SamplingParams(max_new_tokens=8, diffusion={"seed": 5})



def test_preferred_custom_params_survive(hf_config, tiny_checkpoint_dir):
    """--preferred-sampling-params custom_params are kept under the request's own and our transport key."""
    manager = _manager(hf_config, tiny_checkpoint_dir, preferred={"custom_params": {"a": 1, "b": 2}})
    original = Recorder()
    obj = SimpleNamespace(sampling_params={"custom_params": {"b": 3}, "diffusion": {"seed": 1}})
    tokenizer_manager.create_tokenized_object(original, manager, obj)
    custom = original.calls[0][0]["custom_params"]
    assert custom["a"] == 1 and custom["b"] == 3 and _params_from(original.calls[0][0]).seed == 1


@pytest.mark.parametrize("input_ids, word", [([], "empty"), ([2, -1], "input_ids"), ([2, 10**6], "input_ids")])
def test_prompt_ids_are_checked(hf_config, tiny_checkpoint_dir, input_ids, word):
    """An empty prompt or a prompt id outside the vocabulary is a ValueError (400), never reaches the model."""
    original = Recorder()
    obj = SimpleNamespace(sampling_params={"max_new_tokens": 4})
    with pytest.raises(ValueError, match=word):
        tokenizer_manager.create_tokenized_object(original, _manager(hf_config, tiny_checkpoint_dir), obj, "", input_ids)
    assert original.calls == []
    tokenizer_manager.create_tokenized_object(original, _manager(hf_config, tiny_checkpoint_dir), obj, "", [2, 5])
    assert len(original.calls) == 1


@pytest.mark.parametrize("fields, word", [
    ({"input_embeds": [[0.5] * 64] * 5}, "input_embeds"),
    ({"return_routed_experts": True}, "return_routed_experts"),
    ({"return_indexer_topk": True}, "return_indexer_topk"),
    ({"return_sampling_mask": True}, "return_sampling_mask"),
    ({"return_hidden_states": True}, "return_hidden_states"),
    ({"return_hidden_states": "last"}, "return_hidden_states"),
    ({"custom_logit_processor": "{\"callable\": \"...\"}"}, "custom_logit_processor"),
    ({"lora_id": ["a", "b"]}, "lora_id"),
    ({"lora_id": "abc"}, "lora_id"),
    ({"positional_embed_overrides": {"embeds": [[0.1]], "positions": [1]}}, "positional_embed_overrides"),
    ({"session_params": {"id": "s", "bogus": 1}}, r"session_params: unknown keys \['bogus'\]"),
    # the scheduler used these as dict keys and slice bounds, and died
    ({"session_params": {"id": ["s"]}}, r"session_params.id: Expected `str \| null`, got `array`"),
    ({"session_params": {"id": "s", "rid": {"a": 1}}}, r"session_params.rid: Expected `str \| null`, got `object`"),
    ({"session_params": {"id": "s", "offset": 2.5}}, r"session_params.offset: Expected `int \| null`, got `float`"),
    ({"session_params": {"id": "s", "offset": "a"}}, r"session_params.offset: Expected `int \| null`, got `str`"),
    ({"session_params": {"id": "s", "replace": "yes"}}, r"session_params.replace: Expected `bool \| null`"),
    ({"session_params": {"id": "s", "drop_previous_output": 1}}, r"session_params.drop_previous_output: Expected"),
    ({"session_params": "s"}, "session_params must be an object"),
])  # fmt: skip
def test_fields_the_engine_does_not_implement_are_refused(hf_config, tiny_checkpoint_dir, fields, word):
    """Refused with a 400, not ignored (input_embeds, routed experts) or left to end the scheduler (lora_id,
    positional_embed_overrides, session_params of the wrong type) or to a 500 (unknown session_params)."""
    original = Recorder()
    obj = SimpleNamespace(sampling_params={"max_new_tokens": 4}, **fields)
    with pytest.raises(ValueError, match=word):
        tokenizer_manager.create_tokenized_object(original, _manager(hf_config, tiny_checkpoint_dir), obj, "", None)
    assert original.calls == []


def test_unset_fields_and_known_session_params_pass(hf_config, tiny_checkpoint_dir):
    original = Recorder()
    obj = SimpleNamespace(sampling_params={"max_new_tokens": 4}, input_embeds=None, return_routed_experts=False,
                          return_sampling_mask=False, return_hidden_states=False, custom_logit_processor=None,
                          lora_id=None,
                          positional_embed_overrides=None,
                          session_params={"id": "s", "rid": "r", "offset": 3, "replace": True})  # fmt: skip
    tokenizer_manager.create_tokenized_object(original, _manager(hf_config, tiny_checkpoint_dir), obj, "", [2, 5])
    assert len(original.calls) == 1


def test_preferred_diffusion_is_merged_under_the_request(hf_config, tiny_checkpoint_dir):
    """A `diffusion` entry of --preferred-sampling-params fills what the request leaves unset, and is taken out
    of the preferred params the original merges (SamplingParams would reject it)."""
    preferred = {"max_new_tokens": 9, "diffusion": {"max_denoising_steps": 3, "seed": 9}}
    manager = _manager(hf_config, tiny_checkpoint_dir, preferred=preferred)
    original = Recorder()
    for request_diffusion in ({"seed": 1}, None):
        sampling = {"max_new_tokens": 4} | ({} if request_diffusion is None else {"diffusion": request_diffusion})
        tokenizer_manager.create_tokenized_object(original, manager, SimpleNamespace(sampling_params=sampling))
    assert [(p.max_denoising_steps, p.seed) for p in (_params_from(c[0]) for c in original.calls)] == [(3, 1), (3, 9)]
    assert manager.preferred_sampling_params == {"max_new_tokens": 9}


def test_preferred_sampling_params_are_judged_with_the_request(hf_config, tiny_checkpoint_dir):
    """sglang merges --preferred-sampling-params under every request: a preferred temperature or top_k scales the
    schedule as the request's own would, a preferred sampler knob the canvas has not is refused (both were silently
    ignored), and a request's own schedule (diffusion.t_min/t_max) wins over a preferred temperature."""
    original = Recorder()

    def params(preferred, sampling):
        manager = _manager(hf_config, tiny_checkpoint_dir, preferred=preferred)
        tokenizer_manager.create_tokenized_object(original, manager, SimpleNamespace(sampling_params=sampling))
        return _params_from(original.calls[-1][0])

    plain = params(None, {"max_new_tokens": 4})
    scaled = params({"temperature": 0.5}, {"max_new_tokens": 4})
    assert (scaled.t_min, scaled.t_max) == pytest.approx((plain.t_min / 2, plain.t_max / 2))
    assert params({"top_k": 1}, {"max_new_tokens": 4}).seed == 0  # greedy
    assert params({"temperature": 0.5}, {"temperature": 1.0}) == plain  # the request's own value wins
    assert params({"temperature": 0.5}, {"diffusion": {"t_min": 0.1, "t_max": 0.2}}).t_max == 0.2
    with pytest.raises(ValueError, match="top_p"):
        params({"top_p": 0.5}, {"max_new_tokens": 4})


def test_installed_method_with_preferred_diffusion(applied, hf_config, tiny_checkpoint_dir):
    """Through the installed method, a preferred `diffusion` entry no longer reaches SamplingParams(**kw)."""
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.sampling.sampling_params import SamplingParams

    class Built(Exception):
        pass

    def build(**kwargs):
        raise Built(SamplingParams(**kwargs))

    manager = _manager(hf_config, tiny_checkpoint_dir, preferred={"diffusion": {"max_denoising_steps": 2}})
    manager.sampling_params_class = build
    with pytest.raises(Built) as built:
        TokenizerManager._create_tokenized_object(manager, SimpleNamespace(sampling_params={}), "hi", [1, 2])
    assert _params_from({"custom_params": built.value.args[0].custom_params}).max_denoising_steps == 2


def _mm_inputs(*offsets):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalInputs

    return MultimodalInputs(mm_items=[MultimodalDataItem(modality=Modality.IMAGE, offsets=list(offsets))])


@pytest.mark.parametrize("images, offsets, ok", [
    (["a.png"], [(3, 8)], True), (["a.png", "b.png"], [(3, 8), (10, 15)], True),
    (["a.png"], [], False), (["a.png", "b.png"], [(3, 8)], False),
])  # fmt: skip
def test_images_need_a_placeholder_each(hf_config, tiny_checkpoint_dir, images, offsets, ok):
    """An image the prompt has no <|image|> for is a ValueError (400) instead of being dropped silently."""
    original = Recorder()
    obj = SimpleNamespace(sampling_params={"max_new_tokens": 4}, image_data=images)
    call = lambda: tokenizer_manager.create_tokenized_object(  # noqa: E731
        original, _manager(hf_config, tiny_checkpoint_dir), obj, "", [2, 5], None, _mm_inputs(*offsets))
    if ok:
        call()
        assert len(original.calls) == 1
    else:
        with pytest.raises(ValueError, match="<\\|image\\|>"):
            call()
        assert original.calls == []


@pytest.mark.parametrize("images, text, input_ids, mm_offsets, error", [
    ([None], "<|image|> a", [2, 18, 5], None, r"1 image placeholder\(s\) \('<\|image\|>'\) but no image was sent"),
    (None, "<|image|><|image|> a", [2, 18, 18, 5], None, r"2 image placeholder\(s\)"),
    ([], "<|image|> a", [2, 18, 5], None, "no image was sent"),
    ([None, "a.png"], "a", [2, 5], [], r"1 image\(s\) sent but the prompt has a placeholder for 0"),
    (None, "a b", [2, 5, 6], None, None),
    ([None], "a b", [2, 5, 6], None, None),
    (None, "<|image|> a", [2, 18, 5], [(1, 2)], None),  # placeholders another medium (a video) filled
    (None, None, [2, 18, 5], None, None),  # token ids are the caller's own (random-id benchmarks draw 18 too)
])  # fmt: skip
def test_null_images_are_not_sent_and_a_placeholder_needs_an_image(hf_config, tiny_checkpoint_dir, images, text,
                                                                   input_ids, mm_offsets, error):
    """sglang drops null image items, so they are not counted as sent; a placeholder (id 18 in the tiny checkpoint)
    in a text prompt with no image behind it was embedded as text: a ValueError (400) naming the count."""
    assert hf_config.image_token_id == 18
    original = Recorder()
    obj = SimpleNamespace(sampling_params={"max_new_tokens": 4}, image_data=images, text=text)
    mm_inputs = None if mm_offsets is None else _mm_inputs(*mm_offsets)
    call = lambda: tokenizer_manager.create_tokenized_object(  # noqa: E731
        original, _manager(hf_config, tiny_checkpoint_dir), obj, "", input_ids, None, mm_inputs)
    if error is None:
        call()
        assert len(original.calls) == 1
    else:
        with pytest.raises(ValueError, match=error):
            call()
        assert original.calls == []


def _tokenized(max_new_tokens, seed):
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sgl_diffusion.runtime.scheduler_hook import PARAMS_KEY
    from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams

    params = DiffusionParams.from_request({} if seed is None else {"seed": seed}, DiffusionDefaults.from_generation_config({}), vocab_size=100,
                                          canvas_length=32)
    return SamplingParams(max_new_tokens=max_new_tokens, custom_params={PARAMS_KEY: params.to_json(), "x": 1})


@pytest.mark.parametrize("seed, expected", [(5, [5, 6, 7]), (None, [None] * 3), (2**63 - 1, [2**63 - 1, -(2**63), -(2**63) + 1])])
def test_parallel_sample_copies_get_consecutive_seeds(seed, expected):
    """For n>1, copy i of a seeded request is sent with seed + i (wrapping in int64); the prefix warm-up copy
    (max_new_tokens=0) and unseeded copies are sent as they are; outside n>1 nothing changes."""
    import asyncio
    import copy as copy_module

    from sgl_diffusion.sampling.params import DiffusionParams

    sent = []

    async def original_send(manager, tokenized_obj):
        sent.append(tokenized_obj)

    def send(tokenized_obj):
        return tokenizer_manager.send_one_request(original_send, None, tokenized_obj)

    shared = _tokenized(8, seed)

    async def original_batch(manager, obj, request, states):  # what sglang's n>1 branch does
        warmup = copy_module.copy(shared)
        warmup.max_new_tokens = 0
        await send(SimpleNamespace(sampling_params=warmup))
        for _ in range(3):
            await send(SimpleNamespace(sampling_params=shared))
        yield "outputs"

    async def run(n):
        obj = SimpleNamespace(parallel_sample_num=n)
        if n == 1:
            await send(SimpleNamespace(sampling_params=shared))
            return None
        return [x async for x in tokenizer_manager.handle_batch_request(original_batch, None, obj, None, {})]

    assert asyncio.run(run(3)) == ["outputs"]
    asyncio.run(run(1))
    seeds = [DiffusionParams.from_json(t.sampling_params.custom_params["sgl_diffusion"]).seed for t in sent]
    assert seeds == [seed, *expected, seed]
    assert all(t.sampling_params.custom_params["x"] == 1 for t in sent)
    assert DiffusionParams.from_json(shared.custom_params["sgl_diffusion"]).seed == seed  # shared object untouched


def test_infill_is_laid_out_with_the_servers_tokenizer(hf_config, tiny_checkpoint_dir):
    """diffusion.infill is tokenized here: the params carry the layout (-1 at holes); without max_new_tokens the
    request is the whole template; a template past the context, or no tokenizer, is a ValueError (400)."""
    from transformers import AutoTokenizer

    manager = _manager(hf_config, tiny_checkpoint_dir)
    manager.tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    original = Recorder()
    obj = SimpleNamespace(sampling_params={"diffusion": {"infill": {"template": "ab{{hole:3}}c"}}})
    tokenizer_manager.create_tokenized_object(original, manager, obj, "hi", [1, 2])
    [(seen, _, _)] = original.calls
    layout = _params_from(seen).infill
    assert layout == (*manager.tokenizer.encode("ab", add_special_tokens=False), -1, -1, -1,
                      *manager.tokenizer.encode("c", add_special_tokens=False))
    assert seen["max_new_tokens"] == len(layout)
    manager.context_len = 5
    with pytest.raises(ValueError, match="longer than the context"):
        tokenizer_manager.create_tokenized_object(original, manager, obj, "hi", [1, 2])
    manager.tokenizer = None
    with pytest.raises(ValueError, match="needs the server's tokenizer"):
        tokenizer_manager.create_tokenized_object(original, manager, obj, "hi", [1, 2])


@pytest.mark.parametrize("fields, word", [
    ({"logprob_start_len": 0}, None), ({"logprob_start_len": -1}, None),
    ({"token_ids_logprob": [3]}, "token_ids_logprob"),
])  # fmt: skip
def test_logprob_requests(hf_config, tiny_checkpoint_dir, fields, word):
    """return_logprob passes (prompt scoring of a short prompt too); token_ids_logprob is refused by name."""
    obj = SimpleNamespace(sampling_params={"max_new_tokens": 4}, return_logprob=True, **fields)
    call = lambda: tokenizer_manager.create_tokenized_object(  # noqa: E731
        Recorder(), _manager(hf_config, tiny_checkpoint_dir), obj, "hi", [1, 2])
    if word is None:
        call()
    else:
        with pytest.raises(ValueError, match=word):
            call()
