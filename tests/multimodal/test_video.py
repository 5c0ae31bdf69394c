import pytest

from sgl_diffusion.multimodal.video import MAX_SECONDS, InvalidVideo, frame_placeholders, sample_frames
from tests.multimodal.media import data_url, mp4_bytes


@pytest.fixture(scope="module")
def short_video():
    return mp4_bytes(3.5, fps=4)


def test_one_frame_per_second(short_video, tmp_path):
    """A 3.5 s video at 4 fps gives the frames at 0, 1, 2 and 3 s, whatever door it comes through."""
    path = tmp_path / "v.mp4"
    path.write_bytes(short_video)
    for source in (short_video, str(path), f"file://{path}", data_url(short_video, "video/mp4")):
        frames = sample_frames(source)
        assert [t for t, _ in frames] == [0.0, 1.0, 2.0, 3.0]
        # frame i has the flat colour 9*i: the sampled ones are frames 0, 4, 8, 12 (lossy codec: roughly)
        shades = [image.getpixel((16, 16))[0] for _, image in frames]
        assert all(abs(s - 36 * k) <= 6 for k, s in enumerate(shades)), shades
        assert all(image.mode == "RGB" and image.size == (32, 32) for _, image in frames)


def test_too_long_video_is_refused():
    with pytest.raises(InvalidVideo, match=f"at most {MAX_SECONDS:.0f} s"):
        sample_frames(mp4_bytes(MAX_SECONDS + 2, fps=1, width=16, height=16))


@pytest.mark.parametrize("source, word", [
    (b"not a video at all", "could not decode"), ("data:video/mp4;base64,@@@", "base64"),
    ("/nonexistent/v.mp4", "no video file"), (12, "not int"),
])  # fmt: skip
def test_bad_sources_are_invalid_video(source, word):
    with pytest.raises(InvalidVideo, match=word):
        sample_frames(source)


def test_frame_placeholders_use_gemma4_timestamps():
    assert frame_placeholders([0.0, 1.0, 75.0], "<|image|>") == "00:00 <|image|> 00:01 <|image|> 01:15 <|image|>"
