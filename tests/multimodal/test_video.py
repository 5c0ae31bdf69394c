import pytest

from sgl_diffusion.env import MediaEnv
from sgl_diffusion.multimodal.video import MAX_SECONDS, InvalidVideo, frame_placeholders, sample_frames, sniff_container
from tests.multimodal.media import hls_playlist, mp4_bytes, video_bytes


@pytest.fixture(scope="module")
def short_video():
    return mp4_bytes(3.5, fps=4)


def test_one_frame_per_second(short_video):
    """A 3.5 s video at 4 fps gives the frames at 0, 1, 2 and 3 s."""
    frames = sample_frames(short_video)
    assert [t for t, _ in frames] == [0.0, 1.0, 2.0, 3.0]
    # frame i has the flat colour 9*i: the sampled ones are frames 0, 4, 8, 12 (lossy codec: roughly)
    shades = [image.getpixel((16, 16))[0] for _, image in frames]
    assert all(abs(s - 36 * k) <= 6 for k, s in enumerate(shades)), shades
    assert all(image.mode == "RGB" and image.size == (32, 32) for _, image in frames)


@pytest.mark.parametrize("times, want", [
    ([5 + i / 4 for i in range(12)], [0.0, 1.0, 2.0]),  # starts at 5 s: its seconds count from its first frame
    ([0, 0.5, 1, 1.5, 6, 6.25, 6.5], [0.0, 1.0, 6.0]),  # a gap: the frame after it is labelled with its own second
    ([59 + i / 4 for i in range(12)], [0.0, 1.0, 2.0]),  # 3 s that start at 59 s are not "62 s long"
], ids=["late start", "gap", "late start near the limit"])
def test_frames_are_labelled_with_their_own_second(times, want):
    frames = sample_frames(mp4_bytes(0, fps=4, times=times))
    assert [t for t, _ in frames] == want


@pytest.mark.parametrize("container", ["matroska", "webm", "avi"])
def test_other_self_contained_containers_are_read(container):
    """Matroska, WebM and AVI are read too (2 s at 2 fps: frames at 0 and 1 s)."""
    assert [t for t, _ in sample_frames(video_bytes(container))] == [0.0, 1.0]


def test_too_long_video_is_refused():
    with pytest.raises(InvalidVideo, match=f"at most {MAX_SECONDS:.0f} s"):
        sample_frames(mp4_bytes(MAX_SECONDS + 2, fps=1, width=16, height=16))


@pytest.mark.parametrize("source, word", [
    (b"not a video at all", "could not decode"), (b"\x00\x00\x00\x18ftypisom" + bytes(64), "could not decode"),
    ("/nonexistent/v.mp4", "must be bytes"), (12, "not int"),
])  # fmt: skip
def test_bad_sources_are_invalid_video(source, word):
    with pytest.raises(InvalidVideo, match=word):
        sample_frames(source)


def test_containers_are_sniffed_from_the_bytes():
    assert sniff_container(mp4_bytes(1.0)) == "mov"
    assert [sniff_container(video_bytes(c)) for c in ("matroska", "webm", "avi")] == ["matroska", "matroska", "avi"]
    assert sniff_container(b"#EXTM3U\n") is None and sniff_container(b"") is None


@pytest.mark.parametrize("disguise", ["plain", "ftyp", "bom"])
def test_playlists_and_lists_that_name_other_files_are_refused(tmp_path, monkeypatch, disguise):
    """An HLS playlist whose entry is a real clip (FFmpeg would follow it), an ffconcat list (FFmpeg would probe
    it from bytes alone and open a relative entry from the working directory), an SDP file and a DASH manifest
    are refused, also behind an MP4 box header or a BOM (what a file name or MIME type claims never reaches this
    far: only bytes do)."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(mp4_bytes(2.0))
    monkeypatch.chdir(tmp_path)
    lists = [hls_playlist(f"file://{clip}"), hls_playlist(str(clip)), b"ffconcat version 1.0\nfile clip.mp4\n",
             b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nm=video 5004 RTP/AVP 96\n",
             b'<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011"></MPD>']  # fmt: skip
    prefix = {"plain": b"", "ftyp": b"\x00\x00\x00\x10ftypisom\x00\x00\x02\x00", "bom": b"\xef\xbb\xbf"}[disguise]
    for data in lists:
        with pytest.raises(InvalidVideo, match="could not decode the video"):
            sample_frames(prefix + data)


def test_decoded_frames_and_time_are_capped(short_video):
    """14 frames: a cap of 13 refuses it, naming the variable; a decode budget of 0 s refuses at the first packet."""
    assert len(sample_frames(short_video, MediaEnv(max_video_frames=14))) == 4
    with pytest.raises(InvalidVideo, match="more than 13 frames.*SGL_DIFFUSION_MAX_VIDEO_FRAMES"):
        sample_frames(short_video, MediaEnv(max_video_frames=13))
    with pytest.raises(InvalidVideo, match="took more than 0 s.*SGL_DIFFUSION_MAX_VIDEO_DECODE_S"):
        sample_frames(short_video, MediaEnv(max_video_decode_s=0))


def test_frame_pixels_are_capped(short_video):
    """Frames over the image pixel limit (32x32 = 1024 here) are refused before decoding."""
    assert sample_frames(short_video, MediaEnv(max_image_pixels=1024))
    with pytest.raises(InvalidVideo, match="32x32 = 1024 pixels; at most 1023.*SGL_DIFFUSION_MAX_IMAGE_PIXELS"):
        sample_frames(short_video, MediaEnv(max_image_pixels=1023))


def test_frame_placeholders_use_gemma4_timestamps():
    assert frame_placeholders([0.0, 1.0, 75.0], "<|image|>") == "00:00 <|image|> 00:01 <|image|> 01:15 <|image|>"


def test_ffmpeg_opens_nothing_else_even_in_a_demuxer_that_would(tmp_path):
    """The second wall: forced into FFmpeg's hls demuxer, a playlist over bytes follows its file:// entry, and
    with the options sample_frames passes it cannot."""
    import io

    import av

    from sgl_diffusion.multimodal.video import _DEMUXER_OPTIONS

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(mp4_bytes(2.0))
    playlist = hls_playlist(f"file://{clip}")
    with av.open(io.BytesIO(playlist), format="hls") as container:
        assert sum(1 for _ in container.decode(video=0)) == 8  # what the wall stops
    with pytest.raises(av.FFmpegError):
        with av.open(io.BytesIO(playlist), format="hls", options=dict(_DEMUXER_OPTIONS)) as container:
            list(container.decode(video=0))


def test_ffmpeg_is_told_the_container(monkeypatch):
    """FFmpeg never probes: av.open gets the sniffed demuxer and the no-protocol whitelist for every video."""
    import av

    calls, real_open, videos = [], av.open, (mp4_bytes(1.0), video_bytes("webm"))

    def recording_open(file, *args, **kwargs):
        calls.append((kwargs.get("format"), (kwargs.get("options") or {}).get("protocol_whitelist")))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", recording_open)
    for video in videos:
        sample_frames(video)
    assert calls == [("mov", "none"), ("matroska", "none")]
