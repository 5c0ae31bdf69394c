import asyncio
import inspect
from types import SimpleNamespace

import orjson
import pytest

from srt_patches import ollama

DIFFUSION_HF = SimpleNamespace(architectures=["DiffusionGemmaForBlockDiffusion"])
OTHER_HF = SimpleNamespace(architectures=["LlamaForCausalLM"])


@pytest.mark.parametrize("target", ollama.TARGETS[:2])
def test_upstream_signature_and_why(target, upstream_parameters):
    """The streamers take (request, raw request, model name), read chunks from self.tokenizer_manager, and still send
    a finished chunk with empty content (the patch's reason)."""
    empty = inspect.Parameter.empty
    assert upstream_parameters(target) == [("self", empty), ("gen_request", empty), ("raw_request", empty),
                                           ("model_name", empty)]  # fmt: skip
    from sglang.srt.entrypoints.ollama.serving import OllamaServing

    source = inspect.getsource(getattr(OllamaServing, target.rpartition(".")[2]).__wrapped__)
    assert "self.tokenizer_manager.generate_request(" in source
    assert 'content=""' in source or 'response=""' in source


def test_options_conversion_signature_and_why(upstream_parameters):
    """The option conversion takes (options) and still maps ``seed`` to a name SamplingParams lacks (the patch's reason)."""
    empty = inspect.Parameter.empty
    assert upstream_parameters(ollama.TARGETS[4]) == [("self", empty), ("options", None)]
    from sglang.srt.entrypoints.ollama.serving import OllamaServing

    assert '"seed": "seed"' in inspect.getsource(OllamaServing._convert_options_to_sampling_params.__wrapped__)


@pytest.mark.parametrize("target", ollama.TARGETS[2:4])
def test_handlers_signature_and_why(target, upstream_parameters):
    """The handlers take (request, raw request) and still let a ValueError out (a 500) instead of answering it."""
    empty = inspect.Parameter.empty
    assert upstream_parameters(target) == [("self", empty), ("request", empty), ("raw_request", empty)]
    from sglang.srt.entrypoints.ollama.serving import OllamaServing

    assert "except" not in inspect.getsource(getattr(OllamaServing, target.rpartition(".")[2]).__wrapped__)


@pytest.mark.parametrize("target", ollama.TARGETS)
def test_installed(target, applied):
    assert applied.is_installed(target)


class Manager:
    """A tokenizer manager streaming cumulative texts; the last chunk is finished (a canvas, then the last one)."""

    def __init__(self, hf, texts, refusal=None):
        self.model_config = SimpleNamespace(hf_config=hf)
        self.served_model_name = "m"
        self.texts, self.refusal = texts, refusal

    async def generate_request(self, gen_request, raw_request):
        if self.refusal is not None:
            raise ValueError(self.refusal)
        for i, text in enumerate(self.texts):
            done = i == len(self.texts) - 1
            yield {"text": text, "meta_info": {"finish_reason": {"type": "stop"} if done else None, "id": "r"}}


def _streamed(target, hf, texts):
    from sglang.srt.entrypoints.ollama.serving import OllamaServing

    serving = OllamaServing(Manager(hf, texts))
    original = getattr(OllamaServing, target.rpartition(".")[2]).__wrapped__

    async def run():
        response = await ollama.stream_response(original, serving, None, None, "m")
        return [orjson.loads(line) async for line in response.body_iterator]

    chunks = asyncio.run(run())
    pieces = [c["message"]["content"] if "message" in c else c["response"] for c in chunks]
    return pieces, [c["done"] for c in chunks]


@pytest.mark.parametrize("target", ollama.TARGETS[:2])
def test_the_finished_chunks_text_is_streamed_before_done(target):
    assert _streamed(target, DIFFUSION_HF, ["one canvas"]) == (["one canvas", ""], [False, True])
    two_canvases = (["first ", "second", ""], [False, False, True])
    assert _streamed(target, DIFFUSION_HF, ["first ", "first second"]) == two_canvases
    assert _streamed(target, DIFFUSION_HF, ["all", "all"]) == (["all", ""], [False, True])  # nothing new: as sglang


@pytest.mark.parametrize("target", ollama.TARGETS[:2])
def test_other_models_stream_as_sglang_does(target):
    assert _streamed(target, OTHER_HF, ["first ", "first second"]) == (["first ", ""], [False, True])


def test_a_refused_request_is_a_400_streamed_or_not():
    """The tokenizer manager's refusal (a ValueError, raised when the stream starts) becomes Ollama's error body with
    a 400, before any byte of a stream is sent; other models keep sglang's handling."""
    from sglang.srt.entrypoints.ollama.protocol import OllamaGenerateRequest
    from sglang.srt.entrypoints.ollama.serving import OllamaServing

    refusal = "top_k=40 is not supported for DiffusionGemma (use the diffusion parameters)"
    handle_generate = OllamaServing.handle_generate.__wrapped__
    stream_generate = OllamaServing._stream_generate_response.__wrapped__

    async def answer(hf, stream):
        serving = OllamaServing(Manager(hf, ["x"], refusal))
        serving._stream_generate_response = lambda *a: ollama.stream_response(stream_generate, serving, *a)
        request = OllamaGenerateRequest(model="m", prompt="hi", stream=stream, options={"top_k": 40})
        return await ollama.handle(handle_generate, serving, request, None)

    for stream in (False, True):
        response = asyncio.run(answer(DIFFUSION_HF, stream))
        assert response.status_code == 400 and orjson.loads(response.body) == {"error": refusal}
    with pytest.raises(ValueError, match="top_k=40"):
        asyncio.run(answer(OTHER_HF, False))


def test_the_seed_option_seeds_the_canvas_sampler():
    """options.seed becomes sglang's sampling_seed (the OpenAI seed's parameter), which the canvas sampler takes; upstream
    named it ``seed``, which SamplingParams does not have: every seeded request was a 500. Other models: as sglang."""
    from sglang.srt.entrypoints.ollama.serving import OllamaServing
    from sglang.srt.sampling.sampling_params import SamplingParams

    options = {"seed": 7, "num_predict": 5, "temperature": 0.5}
    ours = OllamaServing(Manager(DIFFUSION_HF, []))._convert_options_to_sampling_params(options)
    assert ours == {"sampling_seed": 7, "max_new_tokens": 5, "temperature": 0.5}
    SamplingParams(**ours)  # sglang takes it
    assert OllamaServing(Manager(OTHER_HF, []))._convert_options_to_sampling_params(options)["seed"] == 7
    with pytest.raises(TypeError, match="seed"):
        SamplingParams(seed=7)  # why: upstream's mapping names no SamplingParams field
