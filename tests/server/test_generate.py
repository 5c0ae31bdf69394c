"""End-to-end through a real sglang server: /generate, OpenAI routes, parity with transformers, bad input."""

import concurrent.futures
import json

import openai
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

from tests.server.test_load import assert_serves

pytestmark = pytest.mark.slow

PROMPT_IDS = [2, 5, 381, 280, 300, 320, 340, 6, 280, 5, 385, 280]


def generate(server, **body):
    resp = server.post("/generate", body)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.parametrize("steps", [1, 2])
def test_one_canvas_equals_transformers_generate(server, tiny_checkpoint_dir, steps):
    """With init_canvas and a near-zero temperature, one canvas from /generate is HF generate's, token for token."""
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32).eval()
    canvas_length = hf.config.canvas_length
    init = [(7 * i + 3) % hf.config.text_config.vocab_size for i in range(canvas_length)]
    gen = DiffusionGemmaGenerationConfig.from_pretrained(tiny_checkpoint_dir)
    gen.t_min, gen.t_max, gen.max_denoising_steps, gen.max_new_tokens = 1e-4, 2e-4, steps, canvas_length
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT_IDS]), decoder_input_ids=torch.tensor([init]), generation_config=gen)
    ref = out.sequences[0, len(PROMPT_IDS) :].tolist()
    eos = [i for i, t in enumerate(ref) if t in gen.eos_token_id]
    ref = ref[: eos[0] + 1] if eos else ref

    diffusion = {"init_canvas": init, "t_min": 1e-4, "t_max": 2e-4, "max_denoising_steps": steps}
    got = generate(server, input_ids=PROMPT_IDS, sampling_params={"max_new_tokens": canvas_length, "diffusion": diffusion})
    assert got["output_ids"] == ref


def test_same_seed_same_output(server):
    """A given seed reproduces its output; another seed gives another one."""
    body = dict(text="Hello there", sampling_params={"max_new_tokens": 40, "ignore_eos": True,
                                                     "diffusion": {"seed": 11, "max_denoising_steps": 3}})
    first, second = generate(server, **body)["output_ids"], generate(server, **body)["output_ids"]
    body["sampling_params"]["diffusion"]["seed"] = 12
    assert first == second and len(first) == 40
    assert generate(server, **body)["output_ids"] != first


def test_max_new_tokens_spans_canvases_and_cuts(server):
    """max_new_tokens beyond one canvas commits canvases one after another and cuts at the limit."""
    out = generate(server, text="Hi", sampling_params={"max_new_tokens": 70, "ignore_eos": True,
                                                       "diffusion": {"max_denoising_steps": 2, "seed": 1}})
    assert len(out["output_ids"]) == 70
    assert out["meta_info"]["finish_reason"]["type"] == "length"


def test_eos_inside_a_canvas_ends_the_request(server):
    """Tokens after the first EOS of a canvas are dropped and the request finishes with stop."""
    for seed in range(20):
        out = generate(server, text="Hi", sampling_params={"max_new_tokens": 200,
                                                           "diffusion": {"max_denoising_steps": 1, "seed": seed}})
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            assert out["output_ids"][-1] == out["meta_info"]["finish_reason"]["matched"]
            assert out["output_ids"][-1] in (1, 6, 10)
            return
    pytest.fail("no EOS in 20 seeded generations")


def test_concurrent_requests_all_complete(server):
    """Several requests in flight at once are denoised together and all answer."""
    def one(seed):
        return generate(server, text=f"req {seed}", sampling_params={"max_new_tokens": 50, "ignore_eos": True,
                                                                     "diffusion": {"seed": seed, "max_denoising_steps": 2}})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(one, range(6)))
    assert all(len(o["output_ids"]) == 50 for o in outs)
    assert one(3)["output_ids"] == outs[3]["output_ids"]  # batching does not change a seeded result


def test_openai_chat_and_completions(server):
    """The OpenAI routes answer and pass "diffusion" through (a bad value there is a 400 too)."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=20,
        extra_body={"diffusion": {"max_denoising_steps": 2, "seed": 4}},
    )
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens > 0
    comp = client.completions.create(model="tiny", prompt="Once", max_tokens=20,
                                     extra_body={"diffusion": {"max_denoising_steps": 2, "seed": 4}})
    assert comp.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="max_denoising_steps"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"diffusion": {"max_denoising_steps": 0}})


@pytest.mark.parametrize("route, body, text_of", [
    ("/api/generate", {"prompt": "Hi"}, lambda chunk: chunk["response"]),
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]}, lambda chunk: chunk["message"]["content"]),
])  # fmt: skip
def test_ollama_streams_the_whole_answer(server, route, body, text_of):
    """sglang's Ollama API streams the text a greedy request answers in one piece (sglang sent the finished chunk,
    here the whole one-canvas answer, as done with no text)."""
    body = {"model": "tiny", **body, "options": {"num_predict": 12, "temperature": 0}}
    whole = server.post(route, body | {"stream": False}).json()
    chunks = [json.loads(line) for line in server.post(route, body).text.splitlines() if line]
    assert [c["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert text_of(whole) and "".join(map(text_of, chunks)) == text_of(whole)


def test_ollama_seed_option_seeds_the_canvas(server):
    """options.seed seeds the canvas sampler as /generate's sampling_seed does (every seeded Ollama request was a 500:
    sglang passed it on as ``seed``, which its SamplingParams lacks); a seed that is no integer is a 400."""
    def answer(seed):
        body = {"model": "tiny", "prompt": "Hi", "stream": False, "raw": True,
                "options": {"num_predict": 8, "seed": seed}}
        resp = server.post("/api/generate", body)
        assert resp.status_code == 200, resp.text
        return resp.json()["response"]

    def native():
        return server.post("/generate", {"text": "Hi", "sampling_params": {
            "max_new_tokens": 8, "sampling_seed": 11}}).json()["text"]

    native()  # NOTE: the prompt's KV is cached from here on: a cold prompt's KV differs in its last bits, which 48
    # steps on random weights can amplify
    assert answer(11) == answer(11) == native() != answer(12)
    resp = server.post("/api/generate", {"model": "tiny", "prompt": "Hi", "stream": False, "options": {"seed": "x"}})
    assert resp.status_code == 400, resp.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_generate_is_a_400_streamed_or_not(server, stream):
    """A bad diffusion parameter is a 400 with the message before any stream starts (streamed, it was a 200 whose
    stream held the error); a good streamed request still streams to [DONE]."""
    body = {"text": "Hi", "stream": stream, "sampling_params": {"max_new_tokens": 8, "diffusion": {"seed": 1}}}
    bad = body | {"sampling_params": {"max_new_tokens": 8, "diffusion": {"max_denoising_steps": 0}}}
    resp = server.post("/generate", bad)
    assert resp.status_code == 400 and "diffusion.max_denoising_steps" in resp.json()["error"]["message"], resp.text
    resp = server.post("/generate", body)
    assert resp.status_code == 200, resp.text
    if stream:
        events = [line for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][len("data: "):])["meta_info"]["completion_tokens"] == 8
    assert server.healthy()


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_refuses_an_option_the_sampler_lacks_with_a_400(server, stream):
    """top_k has no meaning for the canvas sampler: Ollama's routes answer a 400 naming it (a 500, or a stream cut
    off with no body, before), and the server keeps serving."""
    resp = server.post("/api/generate", {"model": "tiny", "prompt": "Hi", "stream": stream,
                                         "options": {"num_predict": 8, "top_k": 40}})
    assert resp.status_code == 400 and "top_k" in resp.json()["error"], resp.text
    assert server.healthy()


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {"model": "tiny", "prompt": "Hi", "stream": False, "options": {"num_predict": 40.0}}),
    ("/api/generate", {"model": "tiny", "prompt": "Hi", "stream": True, "options": {"num_predict": 1.5}}),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                   "options": {"num_predict": "x"}}),
    ("/vertex_generate", {"instances": [{"text": "Hi"}], "parameters": {"sampling_params": {"max_new_tokens": 40.0}}}),
    ("/vertex_generate", {"instances": [{"text": "Hi"}], "parameters": {"sampling_params": {
        "max_new_tokens": 8, "skip_special_tokens": "no"}}}),
    ("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 8, "n": -1}),
])  # fmt: skip
def test_sampling_fields_of_the_wrong_type_are_a_400(server, path, body):
    """These routes pass sampling fields on unchecked: a float token limit reached the scheduler's list slices and
    ended the server, a string one was a 500 (sglang's TypeError), a string skip_special_tokens ended the
    detokenizer (and the server), and n = -1 answered one choice with a prompt of 0 tokens."""
    resp = server.post(path, body)
    assert resp.status_code == 400, resp.text
    assert server.healthy()
    assert_serves(server)


def test_an_answer_that_ends_at_the_context_limit_is_served_whole(server):
    """A prompt 4040 tokens long and 46 new tokens fit the 4096-token context (sglang keeps a request under it by a
    token or two): the second canvas reaches past the context, but the 14 tokens it commits fit, so the answer is
    whole (it was cut to the 32 of the first canvas), and an infill template ending there is completed."""
    prompt = [2] + [(j * 7) % 390 + 3 for j in range(4039)]
    out = server.post("/generate", {"input_ids": prompt, "sampling_params": {
        "max_new_tokens": 46, "ignore_eos": True, "diffusion": {"seed": 7, "max_denoising_steps": 1}}}).json()
    assert len(out["output_ids"]) == 46 and out["meta_info"]["finish_reason"]["type"] == "length", out["meta_info"]
    template = {"template": "{{hole:30}} THE END"}
    resp = server.post("/generate", {"input_ids": prompt, "sampling_params": {
        "diffusion": {"seed": 7, "max_denoising_steps": 1, "infill": template}}})
    assert resp.status_code == 200 and resp.json()["text"].endswith(" THE END"), resp.text[-300:]


@pytest.mark.parametrize(
    "diffusion, field",
    [
        ({"bogus": 1}, "bogus"),
        ({"t_min": 0.9, "t_max": 0.5}, "t_min"),
        ({"max_denoising_steps": 0}, "max_denoising_steps"),
        ({"max_denoising_steps": -3}, "max_denoising_steps"),
        ({"entropy_bound": -0.1}, "entropy_bound"),
        ({"confidence_threshold": -1}, "confidence_threshold"),
        ({"init_canvas": [10**6]}, "init_canvas"),
        ({"init_canvas": list(range(33))}, "init_canvas"),
        ({"seed": "x"}, "seed"),
        ("not a dict", "diffusion"),
    ],
)
def test_bad_diffusion_params_are_400(server, diffusion, field):
    """Each invalid diffusion value is rejected with HTTP 400 naming the field; the server stays healthy."""
    resp = server.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 8, "diffusion": diffusion}})
    assert resp.status_code == 400, resp.text
    assert field in resp.text
    assert server.healthy()


def _png_data_url(color, size=(48, 32)):
    import base64
    import io

    from PIL import Image

    img = Image.new("RGB", size)
    img.putdata([((x * color[0]) % 256, (y * color[1]) % 256, (x * y) % 256) for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return img, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("budget, colors", [(None, [(5, 7)]), (140, [(5, 7), (3, 11)])])
def test_image_prompt_canvas_equals_transformers_generate(server, tiny_checkpoint_dir, budget, colors):
    """An image prompt through /generate (sglang's processor, our vision path) gives HF generate's canvas, at the
    checkpoint's image token budget and at another one, with one image and with two."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint_dir)
    images, urls = zip(*(_png_data_url(c) for c in colors))
    content = [{"type": "image"} for _ in colors] + [{"type": "text", "text": "what is this?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    images_kwargs = {} if budget is None else {"images_kwargs": {"max_soft_tokens": budget}}
    inputs = processor(text=text, images=list(images), return_tensors="pt", return_mm_token_type_ids=True,
                       **images_kwargs)

    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32).eval()
    canvas_length = hf.config.canvas_length
    init = [(5 * i + 1) % hf.config.text_config.vocab_size for i in range(canvas_length)]
    gen = DiffusionGemmaGenerationConfig.from_pretrained(tiny_checkpoint_dir)
    gen.t_min, gen.t_max, gen.max_denoising_steps, gen.max_new_tokens = 1e-4, 2e-4, 2, canvas_length
    with torch.no_grad():
        out = hf.generate(**inputs, decoder_input_ids=torch.tensor([init]), generation_config=gen)
    ref = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    eos = [i for i, t in enumerate(ref) if t in gen.eos_token_id]
    ref = ref[: eos[0] + 1] if eos else ref

    diffusion = {"init_canvas": init, "t_min": 1e-4, "t_max": 2e-4, "max_denoising_steps": 2}
    budget_kwargs = {} if budget is None else {"mm_processor_kwargs": {"image_token_budget": budget}}
    got = generate(server, text=text, image_data=list(urls), **budget_kwargs,
                   sampling_params={"max_new_tokens": canvas_length, "diffusion": diffusion})
    assert got["meta_info"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert got["output_ids"] == ref


@pytest.mark.parametrize(
    "extra, word",
    [({"stop_regex": "x"}, "stop_regex"), ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"top_p": 0.5}, "top_p")],
)
def test_unsupported_sampling_features_are_400(server, extra, word):
    """Penalties and token filters are refused with 400 (grammars and logprobs: tests/server/test_structured.py)."""
    resp = server.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 8, **extra}})
    assert resp.status_code == 400 and word in resp.text, resp.text


def test_temperature_zero_is_greedy_and_deterministic(server):
    """temperature=0 maps to a near-zero schedule: unseeded requests agree."""
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True,
                                                 "diffusion": {"max_denoising_steps": 2}}}
    assert generate(server, **body)["output_ids"] == generate(server, **body)["output_ids"]
