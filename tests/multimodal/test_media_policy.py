"""The media policy without a server: what a request's media may make the process read, and the limits."""

import base64
import os

import pytest
from PIL import Image
from sglang.srt.utils import ImageData, VideoData

from sgl_diffusion.env import MediaEnv
from sgl_diffusion.multimodal.media_policy import LOCAL_REFUSED, MediaPolicy, MediaRefused
from tests.multimodal.media import data_url, png_bomb_bytes, png_bytes

PNG = png_bytes(8, 6)


def policy(**env) -> MediaPolicy:
    return MediaPolicy.from_env(MediaEnv(**env))


@pytest.fixture
def layout(tmp_path):
    """allowed/ (with an image, a subfolder, links in and out), outside/ (an image), and allowed-evil/ (a sibling
    whose name starts like allowed's)."""
    allowed, outside, evil = tmp_path / "allowed", tmp_path / "outside", tmp_path / "allowed-evil"
    for folder in (allowed / "sub", outside, evil):
        folder.mkdir(parents=True)
    for folder in (allowed, allowed / "sub", outside, evil):
        (folder / "img.png").write_bytes(PNG)
    (allowed / "out.png").symlink_to(outside / "img.png")
    (allowed / "out-missing.png").symlink_to(outside / "missing.png")
    (allowed / "outdir").symlink_to(outside)
    (allowed / "in.png").symlink_to(allowed / "sub" / "img.png")
    return tmp_path


def test_the_requests_own_bytes_are_read():
    """Data URLs, bare base64, bytes, and sglang's ImageData/VideoData around them, whatever the MIME type says."""
    p = policy()
    b64 = base64.b64encode(PNG).decode()
    for item in (data_url(PNG, "image/png"), data_url(PNG, "video/mp4"), b64, PNG, bytearray(PNG),
                 ImageData(url=data_url(PNG, "image/png")), VideoData(url=b64)):  # fmt: skip
        assert p.read(item, "image") == PNG


@pytest.mark.parametrize("source", [
    "file:///etc/passwd", "/etc/shadow", "/etc/passwd", "/nonexistent.png", "file:///nonexistent.png",
    "relative/img.png", "file://localhost/etc/hosts", "file://otherhost/etc/hosts", "/dev/zero", "/proc/self/environ",
])  # fmt: skip
def test_local_paths_are_off_by_default(source, monkeypatch):
    """Without allowed directories every path gets one message: existing, missing or unreadable alike, and
    nothing looks at the disk."""
    from sgl_diffusion.multimodal import media_policy

    def untouched(*args):
        raise AssertionError("the disk was looked at")

    monkeypatch.setattr(media_policy.os.path, "realpath", untouched)
    monkeypatch.setattr(media_policy.os, "open", untouched)
    for item in (source, ImageData(url=source), VideoData(url=source)):
        with pytest.raises(MediaRefused) as refused:
            policy().read(item, "image")
        assert str(refused.value) == LOCAL_REFUSED


def test_paths_inside_an_allowed_directory_are_read(layout):
    """Paths and file:// URLs inside, a link that stays inside, and an allowed directory named through a link."""
    p = policy(allowed_local_media_paths=(str(layout / "allowed"),))
    allowed = layout / "allowed"
    for source in (str(allowed / "img.png"), f"file://{allowed}/img.png", f"file://{allowed}/sub/../img.png",
                   str(allowed / "in.png"), str(allowed / "sub" / "img.png")):  # fmt: skip
        assert p.read(source, "image") == PNG, source
    (layout / "link-to-allowed").symlink_to(allowed)
    through_link = policy(allowed_local_media_paths=(str(layout / "link-to-allowed"),))
    assert through_link.read(str(allowed / "img.png"), "image") == PNG


def test_links_and_dotdot_cannot_leave_an_allowed_directory(layout):
    """`..`, symlinks (to a file, to a missing file, through a linked directory) and a look-alike sibling
    directory all get the one refusal, whether their target exists or not."""
    p = policy(allowed_local_media_paths=(str(layout / "allowed"),))
    allowed = layout / "allowed"
    escapes = [f"{allowed}/../outside/img.png", f"{allowed}/../outside/missing.png",
               f"file://{allowed}/../outside/img.png", str(allowed / "out.png"), str(allowed / "out-missing.png"),
               str(allowed / "outdir" / "img.png"), str(layout / "allowed-evil" / "img.png"),
               f"{allowed}/sub/../../outside/img.png", "/etc/passwd"]  # fmt: skip
    for source in escapes:
        with pytest.raises(MediaRefused) as refused:
            p.read(source, "image")
        assert str(refused.value) == LOCAL_REFUSED, source


def test_what_is_not_a_file_inside_an_allowed_directory(layout):
    """Inside an allowed directory a missing file, a directory or a FIFO is 'no file' (and a FIFO does not hang)."""
    allowed = layout / "allowed"
    os.mkfifo(allowed / "fifo.png")
    p = policy(allowed_local_media_paths=(str(allowed),))
    for name in ("missing.png", "sub", "fifo.png"):
        with pytest.raises(MediaRefused, match=f"no video file at {allowed / name}"):
            p.read(str(allowed / name), "video")


@pytest.mark.parametrize("source, word", [
    ("ftp://example.com/a.png", "ftp: URLs are not read"), ("gopher://x/", "gopher: URLs"),
    ("data:image/png;base64,@@@", "not valid base64"), (12, "not int"), (None, "not NoneType"),
    ("", "the image is empty"), ("  ", "the image is empty"),
])  # fmt: skip
def test_other_sources_are_refused(source, word):
    with pytest.raises(ValueError, match=word):
        policy().read(source, "image")


def test_remote_urls_go_through_the_guarded_fetcher():
    """http(s) URLs to loopback, private or metadata addresses are refused with the default settings."""
    for url in ("http://127.0.0.1:9/a.png", "https://localhost/a.png", "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(ValueError, match="not a public address"):
            policy().read(ImageData(url=url), "image")


def test_media_bytes_are_capped(layout):
    """A data URL, raw bytes or a local file over max_media_bytes is refused, naming the variable."""
    p = policy(max_media_bytes=len(PNG) - 1, allowed_local_media_paths=(str(layout / "allowed"),))
    for item in (data_url(PNG, "image/png"), PNG, str(layout / "allowed" / "img.png")):
        with pytest.raises(MediaRefused, match=f"more than {len(PNG) - 1} bytes.*SGL_DIFFUSION_MAX_MEDIA_BYTES"):
            p.read(item, "image")
    assert policy(max_media_bytes=len(PNG)).read(PNG, "image") == PNG


def test_counts_per_request():
    p = policy(max_images_per_request=2, max_videos_per_request=1)
    p.check_counts(2, 1)
    with pytest.raises(MediaRefused, match="3 images in one request; at most 2.*SGL_DIFFUSION_MAX_IMAGES_PER_REQUEST"):
        p.check_counts(3, 0)
    with pytest.raises(MediaRefused, match="2 videos in one request; at most 1.*SGL_DIFFUSION_MAX_VIDEOS_PER_REQUEST"):
        p.check_counts(0, 2)


def test_decompression_bombs_are_refused_from_the_header():
    """Over the pixel limit is refused before decoding: by our limit (9000x9000), and where PIL's own bomb
    check fires first (20000x20000), both naming SGL_DIFFUSION_MAX_IMAGE_PIXELS; at the limit passes."""
    with pytest.raises(MediaRefused, match="9000x9000 = 81000000 pixels; at most 67108864 .*MAX_IMAGE_PIXELS"):
        policy().image(png_bomb_bytes(9000, 9000))
    bomb = png_bomb_bytes(20000, 20000)
    for limit, said in ((67108864, 67108864), (10**9, 2 * Image.MAX_IMAGE_PIXELS)):  # PIL's hard limit, when lower
        with pytest.raises(MediaRefused, match=f"more than {said} pixels.*SGL_DIFFUSION_MAX_IMAGE_PIXELS"):
            policy(max_image_pixels=limit).image(bomb)
    checked = policy(max_image_pixels=48).image(PNG)
    assert isinstance(checked, Image.Image) and (checked.format, checked.size) == ("PNG", (8, 6))
    with pytest.raises(MediaRefused, match="8x6 = 48 pixels"):
        policy(max_image_pixels=47).image(PNG)
    with pytest.raises(MediaRefused, match="8x6 = 48 pixels"):
        policy(max_image_pixels=47).image(Image.new("RGB", (8, 6)))  # in-process PIL images (Engine API) too


def test_only_known_image_formats_are_opened():
    """EPS (which PIL hands to Ghostscript) and other formats outside the list are refused unopened."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    for data in (eps, b"P6\n8 6\n255\n" + bytes(144), b"not an image"):
        with pytest.raises(MediaRefused, match="could not decode the image: not one of PNG, JPEG"):
            policy().image(data)
    preprocessed = {"format": "processor_output", "pixel_values": [0.0]}
    assert policy().image(preprocessed) is preprocessed  # names no file: sglang's own path


def test_sglang_gets_the_image_that_was_checked():
    """Bytes that PIL reads as a 1x1 TIFF among the known formats and as a 12000x12000 IM image among all its plugins:
    sglang's loader gets the image opened as checked (handed the bytes, it opened them with every plugin and
    decoded 144M pixels, past the limit, in a format the policy does not open)."""
    from sglang.srt.utils.common import load_image

    from tests.multimodal.media import tiff_that_pil_also_reads_as_im

    checked = policy().image(tiff_that_pil_also_reads_as_im())
    assert isinstance(checked, Image.Image) and (checked.format, checked.size) == ("TIFF", (1, 1))
    loaded, _ = load_image(checked)
    assert loaded.size == (1, 1)


def test_bad_networks_variable_fails_at_startup():
    with pytest.raises(ValueError, match="SGL_DIFFUSION_ALLOWED_MEDIA_NETWORKS"):
        policy(allowed_media_networks=("10.0.0.0/33",))
