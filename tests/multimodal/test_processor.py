import asyncio
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from PIL import Image

from sgl_diffusion.env import MediaEnv
from sgl_diffusion.multimodal.media_policy import LOCAL_REFUSED, MediaPolicy
from sgl_diffusion.multimodal.processor import DiffusionGemmaProcessor, check_image_token_budget
from tests.multimodal.media import data_url, mp4_bytes, png_bytes


def test_budgets_are_gemma4s():
    assert [check_image_token_budget(b) for b in (70, 140, 280, 560, 1120)] == [70, 140, 280, 560, 1120]
    for bad in (0, 100, 1121, True, "280", None, 280.5, 280.0):
        with pytest.raises(ValueError, match="image_token_budget must be one of 70, 140, 280, 560, 1120"):
            check_image_token_budget(bad)


def _bare_processor(default_budget=280):
    processor = DiffusionGemmaProcessor.__new__(DiffusionGemmaProcessor)  # only what the tested methods read
    processor.io_executor = ThreadPoolExecutor(2)
    processor.default_budget = default_budget
    processor.media_policy = MediaPolicy.from_env(MediaEnv(max_images_per_request=2))
    return processor


def test_budget_comes_from_mm_processor_kwargs():
    processor = _bare_processor(70)
    assert processor.image_token_budget(SimpleNamespace(mm_processor_kwargs=None)) == 70
    assert processor.image_token_budget(SimpleNamespace(mm_processor_kwargs={"image_token_budget": 560})) == 560
    with pytest.raises(ValueError, match="reads only image_token_budget"):
        processor.image_token_budget(SimpleNamespace(mm_processor_kwargs={"max_soft_tokens": 70}))


def test_videos_become_timestamped_frames_in_prompt_order():
    """Images and videos keep their prompt order; each video placeholder becomes its 1 fps frames."""
    processor = _bare_processor()
    two_s, one_s = mp4_bytes(2.0, fps=2), mp4_bytes(1.0, fps=2)
    text = "A <|image|> B <|video|> C <|image|> D <|video|> E"
    new_text, images = asyncio.run(processor._videos_as_images(text, ["img0", "img1"], [two_s, one_s]))
    assert new_text == "A <|image|> B 00:00 <|image|> 00:01 <|image|> C <|image|> D 00:00 <|image|> E"
    assert images[0] == "img0" and images[3] == "img1" and len(images) == 5
    assert all(hasattr(images[i], "getpixel") for i in (1, 2, 4))  # decoded frames


def test_an_expanded_image_placeholder_is_one_image_beside_videos():
    """The HF-expanded form of an image placeholder (<|image>, its soft tokens, <image|>), which sglang's processor
    reads as one image, is one image here too: the images keep their places around a video's frames."""
    expanded = "<|image>" + "<|image|>" * 3 + "<image|>"
    text = f"A {expanded} B <|video|> C {expanded} D"
    new_text, images = asyncio.run(_bare_processor()._videos_as_images(text, ["img0", "img1"], [mp4_bytes(2.0, fps=2)]))
    assert new_text == f"A {expanded} B 00:00 <|image|> 00:01 <|image|> C {expanded} D"
    assert images[0] == "img0" and images[3] == "img1" and len(images) == 4


@pytest.mark.parametrize("text, word", [
    ("no placeholder", "placeholder for 0"), ([2, 5, 7], "text prompt"),
])  # fmt: skip
def test_video_without_placeholder_or_text_is_refused(text, word):
    with pytest.raises(ValueError, match=word):
        asyncio.run(_bare_processor()._videos_as_images(text, None, [mp4_bytes(1.0)]))


def test_every_item_goes_through_the_media_policy_before_sglangs_loader(monkeypatch):
    """sglang's loader gets only checked images (opened as the policy checked them): a path is refused before it
    runs, and too many images before any is read."""
    from sglang.srt.utils import ImageData

    processor, handed = _bare_processor(), []

    async def load_mm_data(prompt, image_data=None, multimodal_tokens=None):
        handed.append(image_data)
        raise RuntimeError("stop here")

    processor.load_mm_data, processor.mm_tokens = load_mm_data, None
    request = SimpleNamespace(mm_processor_kwargs=None, video_data=None)
    png = png_bytes()
    with pytest.raises(RuntimeError, match="stop here"):
        asyncio.run(processor.process_mm_data_async([ImageData(url=data_url(png, "image/png")), png], "x", request))
    [[first, second]] = handed
    assert all(isinstance(i, Image.Image) and i.format == "PNG" and i.tobytes() == Image.open(io.BytesIO(png)).tobytes()
               for i in (first, second))
    for images, word in (([png, "/etc/passwd"], LOCAL_REFUSED), ([png] * 3, "3 images in one request")):
        with pytest.raises(ValueError, match=re.escape(word)):
            asyncio.run(processor.process_mm_data_async(images, "x", request))
    assert len(handed) == 1


def test_apply_makes_ours_sglangs_external_processor_package(monkeypatch):
    """srt_patches.apply() points sglang's external processor variable at us, and sglang's loader then maps the
    DiffusionGemma architecture to our processor instead of its own."""
    import srt_patches
    from sglang.srt.environ import envs
    from sglang.srt.managers import multimodal_processor as mp

    srt_patches.apply()
    assert envs.SGLANG_EXTERNAL_MM_PROCESSOR_PACKAGE.get() == srt_patches.MM_PROCESSOR_PACKAGE
    monkeypatch.setattr(mp, "PROCESSOR_MAPPING", {})
    mp.import_processors("sglang.srt.multimodal.processors")
    mp.import_processors(os.environ[srt_patches.MM_PROCESSOR_PACKAGE_ENV], overwrite=True)
    ours = [p for m, p in mp.PROCESSOR_MAPPING.items() if m.__name__ == "DiffusionGemmaForBlockDiffusion"]
    assert ours == [DiffusionGemmaProcessor]


def test_sglang_still_reads_the_external_processor_variable():
    """The tokenizer manager loads SGLANG_EXTERNAL_MM_PROCESSOR_PACKAGE with overwrite (what apply relies on)."""
    import inspect

    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    source = inspect.getsource(TokenizerManager.init_tokenizer_and_processor)
    assert "SGLANG_EXTERNAL_MM_PROCESSOR_PACKAGE" in source and "overwrite=True" in source
