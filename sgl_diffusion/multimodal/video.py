"""Video as still frames: DiffusionGemma reads video as a run of images, one per second.

Decoded with PyAV (FFmpeg) from bytes only (``MediaPolicy.video`` reads them), sampled at ``FRAMES_PER_SECOND``;
a video longer than ``MAX_SECONDS`` is refused.

FFmpeg opens only containers that read nothing but their own bytes, and is told which one: the container is
sniffed from the first bytes, never taken from a file name or MIME type, and nested opens are off
(``protocol_whitelist``). Playlists (HLS, DASH), concat lists, SDP and everything else that names other files
or URLs are refused; bytes that start like an MP4 but hold a playlist fail in the forced demuxer. Decoding is
bounded: pixels per frame, decoded frames and decode time (``MediaEnv``); each breach is an ``InvalidVideo``.
"""

from __future__ import annotations

import io
import math
import time

from PIL import Image

from sgl_diffusion.env import MediaEnv

FRAMES_PER_SECOND = 1.0
MAX_SECONDS = 60.0
CONTAINERS = ("mov", "matroska", "avi")  # FFmpeg demuxers: MP4/MOV/3GP, Matroska/WebM, AVI
_ISO_BMFF_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}  # a MOV/MP4's first box
# NOTE: "none" names no protocol, so FFmpeg can open nothing besides the bytes it is handed
_DEMUXER_OPTIONS = {"protocol_whitelist": "none"}
_MOV_OPTIONS = {"enable_drefs": "0", "use_absolute_path": "0"}  # FFmpeg's defaults, pinned: no external data refs


class InvalidVideo(ValueError):
    """A video that cannot be read, is refused, or breaks a limit (HTTP 400)."""


def sniff_container(head: bytes) -> str | None:
    """The FFmpeg demuxer for a video's first bytes, or None when it is none of ``CONTAINERS``."""
    if head[4:8] in _ISO_BMFF_BOXES:
        return "mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def sample_frames(video: bytes, limits: MediaEnv = MediaEnv()) -> list[tuple[float, Image.Image]]:
    """(timestamp in seconds, RGB frame) at FRAMES_PER_SECOND: the first frame at or after each whole second."""
    import av

    if not isinstance(video, bytes):
        raise InvalidVideo(f"a video must be bytes here, not {type(video).__name__}")
    demuxer = sniff_container(video[:16])
    if demuxer is None:
        raise InvalidVideo("could not decode the video: only MP4/MOV, WebM/Matroska and AVI files are read "
                           "(playlists, concat lists and other containers are refused)")  # fmt: skip
    options = _DEMUXER_OPTIONS | (_MOV_OPTIONS if demuxer == "mov" else {})
    deadline = time.monotonic() + limits.max_video_decode_s
    try:
        with av.open(io.BytesIO(video), format=demuxer, options=options) as container:
            if not container.streams.video:
                raise InvalidVideo("the file has no video stream")
            stream = container.streams.video[0]
            _check_frame_size(stream.codec_context.width, stream.codec_context.height, limits)
            duration = _duration(container, stream)
            if duration is not None and duration > MAX_SECONDS:
                raise InvalidVideo(f"the video is {duration:.1f} s long; at most {MAX_SECONDS:.0f} s is supported")
            return _sample(container, stream, limits, deadline)
    except av.FFmpegError as e:
        raise InvalidVideo(f"could not decode the video: {e}") from None


def _sample(container, stream, limits: MediaEnv, deadline: float) -> list[tuple[float, Image.Image]]:
    """Times count from the first frame (a stream may start late) and label each sampled frame with its own second
    (a variable-rate stream may skip some)."""
    frames, next_time, decoded, start = [], 0.0, 0, None
    for packet in container.demux(stream):  # packet by packet: the clock is checked even when no frame comes out
        _check_clock(deadline, limits)
        for frame in packet.decode():
            decoded += 1
            if decoded > limits.max_video_frames:
                raise InvalidVideo(f"the video has more than {limits.max_video_frames} frames, the most decoded "
                                   "per video (SGL_DIFFUSION_MAX_VIDEO_FRAMES)")  # fmt: skip
            _check_frame_size(frame.width, frame.height, limits)
            if frame.time is None:
                continue
            start = frame.time if start is None else start
            time_in = frame.time - start
            if time_in < next_time - 1e-6:
                continue
            if time_in > MAX_SECONDS:
                raise InvalidVideo(f"the video is longer than {MAX_SECONDS:.0f} s, which is the most supported")
            second = math.floor(time_in * FRAMES_PER_SECOND + 1e-6) / FRAMES_PER_SECOND
            frames.append((second, frame.to_image().convert("RGB")))
            next_time = second + 1.0 / FRAMES_PER_SECOND
    if not frames:
        raise InvalidVideo("the video has no frames")
    return frames


def _check_clock(deadline: float, limits: MediaEnv) -> None:
    if time.monotonic() >= deadline:
        raise InvalidVideo(f"decoding the video took more than {limits.max_video_decode_s:g} s, the most allowed "
                           "(SGL_DIFFUSION_MAX_VIDEO_DECODE_S)")  # fmt: skip


def _check_frame_size(width: int, height: int, limits: MediaEnv) -> None:
    if width * height > limits.max_image_pixels:
        raise InvalidVideo(f"the video's frames are {width}x{height} = {width * height} pixels; at most "
                           f"{limits.max_image_pixels} are allowed (SGL_DIFFUSION_MAX_IMAGE_PIXELS)")  # fmt: skip


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return None


def frame_placeholders(timestamps: list[float], image_token: str) -> str:
    """The prompt text for a video's frames, Gemma 4's video layout with images: ``mm:ss <image> mm:ss <image>``."""
    return " ".join(f"{int(t // 60):02d}:{int(t % 60):02d} {image_token}" for t in timestamps)
