import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from sgl_diffusion.multimodal.processor import DiffusionGemmaProcessor, check_image_token_budget
from tests.multimodal.media import mp4_bytes


def test_budgets_are_gemma4s():
    assert [check_image_token_budget(b) for b in (70, 140, 280, 560, 1120)] == [70, 140, 280, 560, 1120]
    for bad in (0, 100, 1121, True, "280", None, 280.5):
        with pytest.raises(ValueError, match="image_token_budget must be one of 70, 140, 280, 560, 1120"):
            check_image_token_budget(bad)


def _bare_processor(default_budget=280):
    processor = DiffusionGemmaProcessor.__new__(DiffusionGemmaProcessor)  # only what the tested methods read
    processor.io_executor = ThreadPoolExecutor(2)
    processor.default_budget = default_budget
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


@pytest.mark.parametrize("text, word", [
    ("no placeholder", "placeholder for 0"), ([2, 5, 7], "text prompt"),
])  # fmt: skip
def test_video_without_placeholder_or_text_is_refused(text, word):
    with pytest.raises(ValueError, match=word):
        asyncio.run(_bare_processor()._videos_as_images(text, None, [mp4_bytes(1.0)]))


def test_missing_local_image_file_is_a_client_error(tmp_path):
    from sgl_diffusion.multimodal.processor import _check_local_images

    (tmp_path / "a.png").write_bytes(b"x")
    _check_local_images([str(tmp_path / "a.png"), f"file://{tmp_path}/a.png", "data:image/png;base64,AAAA"])
    for missing in (str(tmp_path / "b.png"), f"file://{tmp_path}/b.png", SimpleNamespace(url=str(tmp_path / "c.png"))):
        with pytest.raises(ValueError, match="no image file"):
            _check_local_images([missing])


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
