import json
from inspect import Parameter

import pytest

from srt_patches import openai_protocol

EMPTY = Parameter.empty
# What the wrappers rely on: the request is `self` (chat) or the argument after `self` (completions), and the
# original returns the sampling-params dict the wrapper extends.
EXPECTED_PARAMETERS = {
    "sglang.srt.entrypoints.openai.protocol.ChatCompletionRequest.to_sampling_params": [
        ("self", EMPTY), ("stop", EMPTY), ("model_generation_config", EMPTY),
    ],
    "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._build_sampling_params": [
        ("self", EMPTY), ("request", EMPTY),
    ],
    "sglang.srt.entrypoints.openai.usage_processor.UsageProcessor.calculate_response_usage": [
        ("responses", EMPTY), ("n_choices", 1),
    ],
    "sglang.srt.entrypoints.openai.serving_tokenize.OpenAIServingDetokenize._validate_request": [
        ("self", EMPTY), ("_", EMPTY),
    ],
    "sglang.srt.entrypoints.openai.protocol.ResponsesRequest.to_sampling_params": [
        ("self", EMPTY), ("default_max_tokens", None),
    ],
    "sglang.srt.entrypoints.anthropic.serving.AnthropicServing._convert_to_chat_completion_request": [
        ("self", EMPTY), ("anthropic_request", EMPTY),
    ],
    "sglang.srt.entrypoints.anthropic.serving._anthropic_usage_from_openai": [
        ("usage", EMPTY), ("include_input", EMPTY), ("include_output", EMPTY), ("force_zero_output", False),
    ],
}  # fmt: skip
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def protocol(applied):
    from sglang.srt.entrypoints.openai import protocol

    return protocol


@pytest.fixture(scope="module")
def serving_completion(applied):
    """An OpenAIServingCompletion without its (heavy) __init__: _build_sampling_params reads only the request."""
    from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion

    return object.__new__(OpenAIServingCompletion)


def test_every_target_has_an_expected_signature():
    """Each target the module declares is covered by the signature table of this file."""
    assert set(openai_protocol.TARGETS) == set(EXPECTED_PARAMETERS)


@pytest.mark.parametrize("target", openai_protocol.TARGETS)
def test_upstream_signature(target, upstream_parameters):
    """The upstream function still starts with the parameters the wrapper relies on."""
    expected = EXPECTED_PARAMETERS[target]
    assert upstream_parameters(target)[: len(expected)] == expected


@pytest.mark.parametrize("target", openai_protocol.TARGETS)
def test_installed(target, applied):
    """apply() leaves our wrapper on the target."""
    assert applied.is_installed(target)


@pytest.mark.parametrize("name", ["ChatCompletionRequest", "CompletionRequest"])
def test_request_models_declare_diffusion(protocol, name):
    """Both request models declare an optional `diffusion` field defaulting to None."""
    field = getattr(protocol, name).model_fields["diffusion"]
    assert field.default is None and not field.is_required()


def test_chat_request_keeps_diffusion(protocol):
    """ChatCompletionRequest keeps `diffusion`, whether constructed or validated from a JSON body."""
    built = protocol.ChatCompletionRequest(model="m", messages=MESSAGES, diffusion={"seed": 3})
    parsed = protocol.ChatCompletionRequest.model_validate_json(
        '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "diffusion": {"seed": 3}}'
    )
    assert built.diffusion == parsed.diffusion == {"seed": 3}


def test_chat_sampling_params_carry_diffusion(protocol):
    """to_sampling_params puts the request's `diffusion` object into the sampling params."""
    request = protocol.ChatCompletionRequest(model="m", messages=MESSAGES, max_tokens=8, diffusion={"seed": 3})
    params = request.to_sampling_params(stop=[], model_generation_config={})
    assert params["diffusion"] == {"seed": 3}
    assert params["max_new_tokens"] == 8


@pytest.mark.parametrize("fields, expected", [
    ({"max_completion_tokens": 0}, 0), ({"max_completion_tokens": 0, "max_tokens": 9}, 0),
    ({"max_completion_tokens": 5, "max_tokens": 9}, 5), ({"max_tokens": 0}, 0), ({}, None)])
def test_chat_max_completion_tokens_zero_is_zero(protocol, fields, expected):
    """sglang reads `max_completion_tokens or max_tokens`: 0 fell through to no limit (an answer up to the context
    length). It is 0 tokens, as max_tokens 0 is."""
    request = protocol.ChatCompletionRequest(model="m", messages=MESSAGES, **fields)
    assert request.to_sampling_params(stop=[], model_generation_config={})["max_new_tokens"] == expected


def test_chat_image_token_budget_moves_to_mm_processor_kwargs(protocol, monkeypatch):
    """On a DiffusionGemma server, image_token_budget (checked) joins the request's own mm_processor_kwargs, which
    sglang passes to the processor; another model's server leaves it unread, as sglang drops fields it does not
    know."""
    from srt_patches import openai_protocol

    monkeypatch.setattr(openai_protocol, "diffusion_served", False)
    elsewhere = protocol.ChatCompletionRequest(model="m", messages=MESSAGES, image_token_budget=100)
    elsewhere.to_sampling_params(stop=[], model_generation_config={})
    assert elsewhere.mm_processor_kwargs is None
    monkeypatch.setattr(openai_protocol, "diffusion_served", True)
    request = protocol.ChatCompletionRequest.model_validate_json(
        '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "image_token_budget": 140,'
        ' "mm_processor_kwargs": {"other": 1}}')
    request.to_sampling_params(stop=[], model_generation_config={})
    assert request.mm_processor_kwargs == {"other": 1, "image_token_budget": 140}
    plain = protocol.ChatCompletionRequest(model="m", messages=MESSAGES)
    plain.to_sampling_params(stop=[], model_generation_config={})
    assert plain.mm_processor_kwargs is None
    bad = protocol.ChatCompletionRequest(model="m", messages=MESSAGES, image_token_budget=100)
    with pytest.raises(ValueError, match="image_token_budget must be one of"):
        bad.to_sampling_params(stop=[], model_generation_config={})


def test_completion_request_keeps_diffusion(protocol):
    """CompletionRequest keeps `diffusion`, whether constructed or validated from a JSON body."""
    built = protocol.CompletionRequest(model="m", prompt="hi", diffusion={"seed": 3})
    parsed = protocol.CompletionRequest.model_validate_json('{"model": "m", "prompt": "hi", "diffusion": {"seed": 3}}')
    assert built.diffusion == parsed.diffusion == {"seed": 3}


def test_completion_sampling_params_carry_diffusion(protocol, serving_completion):
    """OpenAIServingCompletion._build_sampling_params puts `diffusion` into the sampling params."""
    request = protocol.CompletionRequest(model="m", prompt="hi", max_tokens=8, diffusion={"seed": 3, "t_min": 0.5})
    params = serving_completion._build_sampling_params(request)
    assert params["diffusion"] == {"seed": 3, "t_min": 0.5}
    assert params["max_new_tokens"] == 8


def test_no_diffusion_key_without_diffusion(protocol, serving_completion):
    """Requests without `diffusion` give exactly the upstream sampling params (no `diffusion` key)."""
    chat = protocol.ChatCompletionRequest(model="m", messages=MESSAGES)
    assert "diffusion" not in chat.to_sampling_params(stop=[], model_generation_config={})
    completion = protocol.CompletionRequest(model="m", prompt="hi")
    assert "diffusion" not in serving_completion._build_sampling_params(completion)


@pytest.mark.parametrize("name", ["ChatCompletionRequest", "CompletionRequest"])
def test_diffusion_must_be_an_object(protocol, name):
    """A non-object `diffusion` is a request validation error (HTTP 400), not something passed on."""
    from pydantic import ValidationError

    extra = {"messages": MESSAGES} if name == "ChatCompletionRequest" else {"prompt": "hi"}
    with pytest.raises(ValidationError, match="diffusion"):
        getattr(protocol, name)(model="m", diffusion=[1, 2], **extra)


def test_upstream_chat_validators_read_any_body_as_a_dict(protocol):
    """sglang's before-validators of a chat request call ``.get`` on the body as sent (why a non-object body was
    a 500: an AttributeError is no validation error)."""
    validators = protocol.ChatCompletionRequest.__pydantic_decorators__.model_validators
    broken = []
    for name, entry in validators.items():
        if entry.info.mode == "before" and name != openai_protocol.BODY_CHECK:
            try:
                entry.func(None)
            except AttributeError:
                broken.append(name)
    assert "set_json_schema" in broken


@pytest.mark.parametrize("body", [None, [1], "x", 1])
def test_a_chat_body_that_is_not_an_object_is_a_validation_error(protocol, body):
    """A chat body that is JSON but not an object is a request validation error (sglang's HTTP 400)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="the request body must be a JSON object"):
        protocol.ChatCompletionRequest.model_validate(body)


def test_the_body_check_runs_first_once(protocol):
    """The check is the last before-validator added (pydantic runs it first), also after a second registration,
    and a chat body that is an object still validates."""
    openai_protocol._add_diffusion_field()
    validators = list(protocol.ChatCompletionRequest.__pydantic_decorators__.model_validators)
    assert validators.count(openai_protocol.BODY_CHECK) == 1 and validators[-1] == openai_protocol.BODY_CHECK
    request = protocol.ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES})
    assert request.tool_choice == "none"  # sglang's validators ran too


def test_register_twice_keeps_the_field(protocol):
    """Re-running the field registration leaves the models (and their `diffusion` field) working."""
    openai_protocol._add_diffusion_field()
    request = protocol.CompletionRequest(model="m", prompt="hi", diffusion={"seed": 1})
    assert request.diffusion == {"seed": 1}


def test_usage_reports_diffusion_figures(applied):
    """usage.diffusion sums canvases and denoise steps from meta_info["diffusion_steps"] of every choice."""
    from sglang.srt.entrypoints.openai.usage_processor import UsageProcessor

    responses = [
        {"meta_info": {"prompt_tokens": 5, "completion_tokens": 40, "diffusion_steps": [3] + [0] * 31 + [4] + [0] * 7}},
        {"meta_info": {"prompt_tokens": 5, "completion_tokens": 2, "diffusion_steps": [2, 0]}},
    ]
    usage = UsageProcessor.calculate_response_usage(responses, n_choices=2)
    assert usage.diffusion == {"canvases": 3, "denoise_steps": 9, "tokens_per_forward": round(42 / 9, 4)}
    assert usage.completion_tokens == 42 and "diffusion" in usage.model_dump()
    plain = UsageProcessor.calculate_response_usage([{"meta_info": {"prompt_tokens": 1, "completion_tokens": 1}}])
    assert plain.diffusion is None


def test_usage_without_diffusion_figures_serializes_as_sglangs(protocol):
    """Another model's usage (no figures) is the JSON sglang writes, without a "diffusion": null, in a response or
    a stream's usage chunk (written with model_dump_json, no exclude_none); ours carries its figures."""
    usage = protocol.UsageInfo(prompt_tokens=5, completion_tokens=6, total_tokens=11)
    assert "diffusion" not in usage.model_dump_json() and "diffusion" not in usage.model_dump()
    chunk = protocol.ChatCompletionStreamResponse(id="c", model="m", choices=[], usage=usage)
    assert "diffusion" not in chunk.model_dump_json()
    figures = {"canvases": 1, "denoise_steps": 3, "tokens_per_forward": 2.0}
    chunk.usage = protocol.UsageInfo(prompt_tokens=5, completion_tokens=6, total_tokens=11, diffusion=figures)
    assert '"diffusion":{"canvases":1' in chunk.model_dump_json()


def test_anthropic_usage_carries_diffusion_with_the_output_tokens(applied):
    """sglang converts the chat usage to Anthropic's field by field; usage.diffusion comes along where the output
    tokens do (the final usage), not on a message_start's zeroed output nor on input-only usage."""
    from sglang.srt.entrypoints.anthropic.serving import _anthropic_usage_from_openai
    from sglang.srt.entrypoints.openai.protocol import UsageInfo

    figures = {"canvases": 1, "denoise_steps": 3, "tokens_per_forward": 2.0}
    usage = UsageInfo(prompt_tokens=5, completion_tokens=6, total_tokens=11, diffusion=figures)
    final = _anthropic_usage_from_openai(usage, include_input=True, include_output=True)
    assert final.diffusion == figures and final.output_tokens == 6
    assert final.model_dump(exclude_none=True)["diffusion"] == figures
    assert _anthropic_usage_from_openai(usage, include_input=True, include_output=True, force_zero_output=True
                                        ).diffusion is None  # fmt: skip
    assert _anthropic_usage_from_openai(usage, include_input=True, include_output=False).diffusion is None
    plain = UsageInfo(prompt_tokens=5, completion_tokens=6, total_tokens=11)
    assert _anthropic_usage_from_openai(plain, include_input=True, include_output=True).diffusion is None


def _completion_serving(architecture):
    from types import SimpleNamespace

    from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion

    serving = object.__new__(OpenAIServingCompletion)
    serving.template_manager = SimpleNamespace(completion_template_name=None)
    hf_config = SimpleNamespace(architectures=[architecture])
    serving.tokenizer_manager = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config))
    return serving


def test_completion_suffix_becomes_an_infill(protocol):
    """suffix on DiffusionGemma: a hole of max_tokens, then the suffix (its braces escaped) as fixed context; other
    models keep sglang's handling; suffix together with diffusion.infill is an error."""
    from sgl_diffusion.sampling.infill import parse_template

    request = protocol.CompletionRequest(model="m", prompt="a", max_tokens=6, suffix="}} x {{y", diffusion={"seed": 2})
    params = _completion_serving("DiffusionGemmaForBlockDiffusion")._build_sampling_params(request)
    assert params["diffusion"]["seed"] == 2
    assert parse_template(params["diffusion"]["infill"]["template"]) == [6, "}} x {{y"]
    assert "diffusion" not in _completion_serving("LlamaForCausalLM")._build_sampling_params(
        protocol.CompletionRequest(model="m", prompt="a", suffix="z"))
    both = protocol.CompletionRequest(model="m", prompt="a", suffix="z", diffusion={"infill": {"template": "{{hole}}"}})
    with pytest.raises(ValueError, match="either suffix or diffusion.infill"):
        _completion_serving("DiffusionGemmaForBlockDiffusion")._build_sampling_params(both)


@pytest.fixture
def serving_detokenize(applied):
    """An OpenAIServingDetokenize without its __init__, serving DiffusionGemma with a 397-token vocabulary."""
    from types import SimpleNamespace

    from sglang.srt.entrypoints.openai.serving_tokenize import OpenAIServingDetokenize

    serving = object.__new__(OpenAIServingDetokenize)
    serving.tokenizer_manager = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(architectures=["DiffusionGemmaForBlockDiffusion"])),
        tokenizer=[None] * 397)  # fmt: skip
    return serving


@pytest.mark.parametrize("tokens, bad", [([-1], [-1]), ([5, 397], [397]), ([[2, 5], [7, -3, 400]], [-3, 400])])
def test_detokenize_refuses_ids_outside_the_vocabulary(serving_detokenize, tokens, bad):
    from sglang.srt.entrypoints.openai.protocol import DetokenizeRequest

    assert serving_detokenize._validate_request(DetokenizeRequest(tokens=tokens)) == (
        f"token ids must be in [0, 397): got {bad}")


def test_detokenize_ids_in_range_and_other_models_pass(serving_detokenize):
    from types import SimpleNamespace

    from sglang.srt.entrypoints.openai.protocol import DetokenizeRequest

    for tokens in ([0, 396], [[2], []], []):
        assert serving_detokenize._validate_request(DetokenizeRequest(tokens=tokens)) is None
    serving_detokenize.tokenizer_manager.model_config.hf_config = SimpleNamespace(architectures=["LlamaForCausalLM"])
    assert serving_detokenize._validate_request(DetokenizeRequest(tokens=[-1])) is None


def test_detokenize_without_a_tokenizer_is_refused(serving_detokenize):
    """--skip-tokenizer-init: no tokenizer to detokenize with (our range check failed on len(None): a 500)."""
    from sglang.srt.entrypoints.openai.protocol import DetokenizeRequest

    serving_detokenize.tokenizer_manager.tokenizer = None
    assert "--skip-tokenizer-init" in serving_detokenize._validate_request(DetokenizeRequest(tokens=[5, 6]))


def test_a_responses_request_carries_diffusion(protocol):
    request = protocol.ResponsesRequest(model="m", input="hi", diffusion={"max_denoising_steps": 3})
    assert request.to_sampling_params(None, {})["diffusion"] == {"max_denoising_steps": 3}
    assert "diffusion" not in protocol.ResponsesRequest(model="m", input="hi").to_sampling_params(None, {})


def test_a_responses_max_output_tokens_is_the_answers_limit(protocol, monkeypatch):
    """sglang keeps 2 of max_output_tokens back (BOS and EOS a token engine adds): on a DiffusionGemma server the
    limit is the client's, under the server's default cap too; another model's server keeps sglang's reading."""
    def limit(fields, default_max_tokens=None):
        request = protocol.ResponsesRequest(model="m", input="hi", **fields)
        return request.to_sampling_params(default_max_tokens, {})["max_new_tokens"]

    monkeypatch.setattr(openai_protocol, "diffusion_served", False)
    assert limit({"max_output_tokens": 5}) == 3
    monkeypatch.setattr(openai_protocol, "diffusion_served", True)
    assert [limit({"max_output_tokens": n}) for n in (0, 1, 5)] == [0, 1, 5]
    assert limit({"max_output_tokens": 50}, default_max_tokens=20) == 20
    assert limit({}) is None and limit({}, default_max_tokens=20) == 20


def test_a_responses_request_without_a_temperature_keeps_the_schedule(protocol):
    """sglang fills a missing Responses temperature with its endpoint's default (0.7): a client that set none gets
    the checkpoint's schedule, and its diffusion.t_min/t_max are not refused as set beside a temperature."""
    from sgl_diffusion.runtime.admission import check_request
    from sgl_diffusion.sampling.params import DiffusionDefaults

    def schedule(**fields):
        params = protocol.ResponsesRequest(model="m", input="hi", **fields).to_sampling_params(None, {})
        got = check_request(params, False, params.get("diffusion"), DiffusionDefaults.from_generation_config({}),
                            vocab_size=100, canvas_length=32)
        return got.t_min, got.t_max

    assert schedule() == (0.4, 0.8)
    assert schedule(diffusion={"t_min": 0.3, "t_max": 0.6}) == (0.3, 0.6)
    assert schedule(temperature=0.5) == pytest.approx((0.2, 0.4))  # the client's own temperature applies
    assert protocol.ResponsesRequest(model="m", input="hi").to_sampling_params(None, {"temperature": 0.5})[
        "temperature"] == 0.5  # the model's generation defaults, as sglang reads them, still apply


def test_the_responses_usage_carries_diffusion_nested_or_not(protocol):
    """sglang writes the Responses usage field by field in its own serializer; diffusion is added to what it writes,
    in the response and in the stream's response.completed event, and left out when there is none."""
    def response(**usage_fields):
        usage = protocol.UsageInfo(prompt_tokens=3, completion_tokens=4, total_tokens=7, **usage_fields)
        return protocol.ResponsesResponse(id="r", created_at=0, model="m", output=[], status="completed", usage=usage)

    block = {"canvases": 1, "denoise_steps": 2, "tokens_per_forward": 2.0}
    with_diffusion = response(diffusion=block)
    assert with_diffusion.model_dump()["usage"] == {
        "input_tokens": 3, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7, "diffusion": block}  # fmt: skip
    event = protocol.ResponsesLifecycleEvent(type="response.completed", response=with_diffusion)
    assert json.loads(event.model_dump_json())["response"]["usage"]["diffusion"] == block
    assert "diffusion" not in response().model_dump()["usage"]


@pytest.mark.parametrize("stream", [True, False])
def test_a_responses_request_cannot_ask_for_drafts(protocol, stream):
    """Its stream is sglang's Responses events, which have no draft event: the drafts were dropped without a word."""
    request = protocol.ResponsesRequest(model="m", input="hi", stream=stream, diffusion={"stream_drafts": True})
    with pytest.raises(ValueError, match="Responses API has no draft events"):
        request.to_sampling_params(None, {})


def test_an_anthropic_request_carries_diffusion_into_its_chat_request(applied):
    from sglang.srt.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from sglang.srt.entrypoints.anthropic.serving import AnthropicServing

    from types import SimpleNamespace

    serving = AnthropicServing(SimpleNamespace(supports_inline_system=True))  # the conversion reads only the request
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    chat = serving._convert_to_chat_completion_request(
        AnthropicMessagesRequest(**body, diffusion={"max_denoising_steps": 3}))
    assert chat.diffusion == {"max_denoising_steps": 3}
    assert chat.to_sampling_params([], {})["diffusion"] == {"max_denoising_steps": 3}
    assert serving._convert_to_chat_completion_request(AnthropicMessagesRequest(**body)).diffusion is None


def test_a_streamed_anthropic_request_cannot_ask_for_drafts(applied):
    """sglang's Anthropic stream reads the chat chunks' choices only: drafts (choiceless chunks) were dropped without a
    word. Streamed, stream_drafts is refused (sglang's handler answers the conversion's error with a 400); not
    streamed, the chat request carries it to the admission check that asks for a stream."""
    from types import SimpleNamespace

    from sglang.srt.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from sglang.srt.entrypoints.anthropic.serving import AnthropicServing

    serving = AnthropicServing(SimpleNamespace(supports_inline_system=True))
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
            "diffusion": {"stream_drafts": True}}
    with pytest.raises(ValueError, match="Anthropic message streams have no draft events"):
        serving._convert_to_chat_completion_request(AnthropicMessagesRequest(**body, stream=True))
    assert serving._convert_to_chat_completion_request(AnthropicMessagesRequest(**body)).diffusion == {
        "stream_drafts": True}
