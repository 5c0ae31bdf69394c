"""Images and video through every door of a real server: budgets, frames, radix reuse, bad input."""

import base64
import io

import openai
import pytest
from PIL import Image
from transformers import AutoProcessor

from tests.multimodal.media import data_url, mp4_bytes, png_bytes

pytestmark = pytest.mark.slow

QUESTION = {"type": "text", "text": "what is this?"}
SAMPLER = {"max_denoising_steps": 1, "seed": 3}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")


@pytest.fixture(scope="module")
def processor(tiny_checkpoint_dir):
    return AutoProcessor.from_pretrained(tiny_checkpoint_dir)


def soft_tokens(processor, image_bytes, budget=None) -> int:
    """Soft tokens transformers' Gemma 4 processor gives one image (at the checkpoint's budget by default)."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    kwargs = {} if budget is None else {"images_kwargs": {"max_soft_tokens": budget}}
    out = processor(text=["<|image|>"], images=[image], **kwargs)
    return out["input_ids"][0].count(processor.tokenizer.convert_tokens_to_ids("<|image|>"))


def chat(client, content, **extra):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=4,
                                          extra_body={"diffusion": SAMPLER} | extra)


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


# ---- images: budgets and doors -----------------------------------------------------------------------------------


def test_image_token_budget_sets_soft_tokens_per_image(client, processor):
    """image_token_budget gives each image the soft tokens transformers' processor gives it at that budget."""
    image = png_bytes(200, 120)
    text_only = chat(client, [QUESTION]).usage.prompt_tokens
    for budget in (None, 70, 140, 280):
        extra = {} if budget is None else {"image_token_budget": budget}
        got = chat(client, [image_part(data_url(image, "image/png")), QUESTION], **extra).usage.prompt_tokens
        assert got == text_only + soft_tokens(processor, image, budget) + 2, budget  # + <|image> and <image|>
    assert soft_tokens(processor, image, 140) > soft_tokens(processor, image, 70)


@pytest.mark.parametrize("budget", [100, 0, -70, 280.5, True])
def test_bad_budget_is_400(client, server, budget):
    with pytest.raises(openai.BadRequestError, match="image_token_budget"):
        chat(client, [image_part(data_url(png_bytes(), "image/png")), QUESTION], image_token_budget=budget)
    resp = server.post("/generate", {"text": "<|image|> hi", "image_data": [data_url(png_bytes(), "image/png")],
                                     "mm_processor_kwargs": {"image_token_budget": budget}})
    assert resp.status_code == 400 and "image_token_budget" in resp.text
    assert server.healthy()


# Local paths, file:// and http(s) URLs need what the operator allows: test_media_security.py, on a server that
# allows them.


def test_several_images_in_either_order(client, processor):
    """Two images before the text, or text between and after them: each image is read, in prompt order."""
    a, b = png_bytes(48, 32, shade=1), png_bytes(96, 64, shade=2)
    text_only = chat(client, [QUESTION]).usage.prompt_tokens
    expected = text_only + soft_tokens(processor, a) + soft_tokens(processor, b) + 4
    first = chat(client, [image_part(data_url(a, "image/png")), image_part(data_url(b, "image/png")), QUESTION])
    assert first.usage.prompt_tokens == expected
    mixed = chat(client, [{"type": "text", "text": "one"}, image_part(data_url(a, "image/png")),
                          {"type": "text", "text": "two"}, image_part(data_url(b, "image/png")), QUESTION])
    assert mixed.usage.prompt_tokens > expected  # the two extra words, and both images
    swapped = chat(client, [image_part(data_url(b, "image/png")), image_part(data_url(a, "image/png")), QUESTION])
    assert swapped.usage.prompt_tokens == expected and swapped.choices[0].message.content != first.choices[0].message.content


def test_several_images_with_n_samples(client):
    """Two images and n = 2: every sample sees both (sglang refused it with a 400, "The length of image_data should be
    equal to the batch size"); sample 0 is the n = 1 answer (sample i uses seed + i)."""
    a, b = png_bytes(48, 32, shade=1), png_bytes(96, 64, shade=2)
    content = [image_part(data_url(a, "image/png")), image_part(data_url(b, "image/png")), QUESTION]
    one, two = chat(client, content), chat(client, content, n=2)
    assert len(two.choices) == 2 and two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.choices[0].message.content == one.choices[0].message.content


# ---- video ---------------------------------------------------------------------------------------------------------


def _frames_as_pngs(video: bytes) -> list[str]:
    from sgl_diffusion.multimodal.video import sample_frames

    urls = []
    for _, frame in sample_frames(video):
        buf = io.BytesIO()
        frame.save(buf, format="PNG")
        urls.append(data_url(buf.getvalue(), "image/png"))
    return urls


@pytest.mark.parametrize("budget", [None, 140])
def test_video_is_read_as_timestamped_frames(server, budget):
    """A 3.5 s video is 4 frames at 1 fps: the same prompt and answer as those frames sent as images with
    Gemma 4's `mm:ss` timestamps; through a data URL and bare base64 alike."""
    video = mp4_bytes(3.5, fps=4, width=64, height=48)
    budget_kwargs = {} if budget is None else {"mm_processor_kwargs": {"image_token_budget": budget}}
    sampling = {"max_new_tokens": 8, "ignore_eos": True, "diffusion": SAMPLER}
    sources = (data_url(video, "video/mp4"), base64.b64encode(video).decode())
    outs = [server.post("/generate", {"text": "<|video|> what happens?", "video_data": [source], "sampling_params": sampling,
                                      **budget_kwargs}).json() for source in sources]
    frames_text = "00:00 <|image|> 00:01 <|image|> 00:02 <|image|> 00:03 <|image|> what happens?"
    as_images = server.post("/generate", {"text": frames_text, "image_data": _frames_as_pngs(video),
                                          "sampling_params": sampling, **budget_kwargs}).json()
    for out in outs:
        assert out["meta_info"]["prompt_tokens"] == as_images["meta_info"]["prompt_tokens"]
        assert out["output_ids"] == as_images["output_ids"]


def test_openai_video_url(client):
    """OpenAI video_url parts (data URL) are read; a budget shrinks or grows every frame."""
    video = data_url(mp4_bytes(2.5, fps=2, width=64, height=48), "video/mp4")
    part = {"type": "video_url", "video_url": {"url": video}}
    small = chat(client, [part, QUESTION], image_token_budget=70).usage.prompt_tokens
    large = chat(client, [part, QUESTION], image_token_budget=140).usage.prompt_tokens
    text_only = chat(client, [QUESTION]).usage.prompt_tokens
    assert text_only < small < large


# ---- radix cache with images -------------------------------------------------------------------------------------


def test_identical_images_reuse_kv_and_different_ones_never_do(server):
    """The same image prompt twice reuses the cached KV; a different image at the same place reuses none of it."""
    def run(image):
        body = {"text": "<|image|> describe", "image_data": [data_url(image, "image/png")],
                "sampling_params": {"max_new_tokens": 4, "diffusion": SAMPLER}}
        return server.post("/generate", body).json()["meta_info"]

    first = run(png_bytes(64, 64, shade=21))
    again = run(png_bytes(64, 64, shade=21))
    other = run(png_bytes(64, 64, shade=22))
    assert again["cached_tokens"] == again["prompt_tokens"]  # all of it, the image included
    assert other["prompt_tokens"] == first["prompt_tokens"] and other["cached_tokens"] <= 2  # <bos> and <|image>


# ---- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("part, word", [
    (image_part("data:image/png;base64,AAAA"), "image"),
    (image_part("/nonexistent/img.png"), "local media paths are refused"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "could not decode the video"),
    ({"type": "video_url", "video_url": {"url": "/nonexistent/v.mp4"}}, "local media paths are refused"),
])  # fmt: skip
def test_corrupt_or_missing_media_is_400(client, server, part, word):
    with pytest.raises(openai.BadRequestError, match=word):
        chat(client, [part, QUESTION])
    assert server.healthy()


def test_too_long_video_is_400(client, server):
    video = data_url(mp4_bytes(61, fps=1, width=16, height=16), "video/mp4")
    with pytest.raises(openai.BadRequestError, match="at most 60 s"):
        chat(client, [{"type": "video_url", "video_url": {"url": video}}, QUESTION])
    assert server.healthy()


def test_too_many_images_for_the_context_is_400(client, server):
    """Images whose soft tokens overflow the context length are refused with a message, not run."""
    image = data_url(png_bytes(200, 120), "image/png")
    with pytest.raises(openai.BadRequestError, match="(?i)context|too long|exceed"):
        chat(client, [image_part(image)] * 20 + [QUESTION], image_token_budget=280)
    assert server.healthy()


def test_an_image_in_a_system_message_is_400_saying_where_images_go(client, server):
    """Gemma 4's template renders a system message as text only, so its image has no placeholder: refused, and the
    message says images go in user messages."""
    image = data_url(png_bytes(32, 32), "image/png")
    with pytest.raises(openai.BadRequestError, match="images go in user messages"):
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[
            {"role": "system", "content": [image_part(image), {"type": "text", "text": "Be terse."}]},
            {"role": "user", "content": "Hi"}])  # fmt: skip
    assert server.healthy()
