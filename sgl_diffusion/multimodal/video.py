"""Video as still frames: DiffusionGemma reads video as a run of images, one per second.

Decoded with PyAV (FFmpeg), sampled at ``FRAMES_PER_SECOND``; a video longer than ``MAX_SECONDS`` is refused.
"""

from __future__ import annotations

import base64
import io
import os

from PIL import Image

FRAMES_PER_SECOND = 1.0
MAX_SECONDS = 60.0
FETCH_TIMEOUT_S = 30


class InvalidVideo(ValueError):
    """A video that cannot be read, or is too long (HTTP 400)."""


def open_source(video) -> io.BytesIO | str:
    """What av.open reads: a data URL's bytes, a fetched http(s) body, raw bytes, or a local path."""
    if isinstance(video, bytes):
        return io.BytesIO(video)
    if not isinstance(video, str):
        raise InvalidVideo(f"a video must be a URL, a data URL or a file path, not {type(video).__name__}")
    if video.startswith("data:"):
        _, _, payload = video.partition(",")
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True))
        except ValueError as e:
            raise InvalidVideo(f"the video data URL is not valid base64: {e}") from None
    if video.startswith(("http://", "https://")):
        import requests

        try:
            resp = requests.get(video, timeout=FETCH_TIMEOUT_S)
            resp.raise_for_status()
        except requests.RequestException as e:
            raise InvalidVideo(f"could not fetch the video {video}: {e}") from None
        return io.BytesIO(resp.content)
    path = video.removeprefix("file://")
    if not os.path.isfile(path):
        raise InvalidVideo(f"no video file at {path}")
    return path


def sample_frames(video) -> list[tuple[float, Image.Image]]:
    """(timestamp in seconds, RGB frame) at FRAMES_PER_SECOND: the first frame at or after each whole second."""
    import av

    try:
        with av.open(open_source(video)) as container:
            if not container.streams.video:
                raise InvalidVideo("the file has no video stream")
            stream = container.streams.video[0]
            duration = _duration(container, stream)
            if duration is not None and duration > MAX_SECONDS:
                raise InvalidVideo(f"the video is {duration:.1f} s long; at most {MAX_SECONDS:.0f} s is supported")
            frames, next_time = [], 0.0
            for frame in container.decode(stream):
                if frame.time is None or frame.time < next_time - 1e-6:
                    continue
                if frame.time > MAX_SECONDS:
                    raise InvalidVideo(f"the video is longer than {MAX_SECONDS:.0f} s, which is the most supported")
                frames.append((next_time, frame.to_image().convert("RGB")))
                next_time += 1.0 / FRAMES_PER_SECOND
    except av.FFmpegError as e:
        raise InvalidVideo(f"could not decode the video: {e}") from None
    if not frames:
        raise InvalidVideo("the video has no frames")
    return frames


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return None


def frame_placeholders(timestamps: list[float], image_token: str) -> str:
    """The prompt text for a video's frames, Gemma 4's video layout with images: ``mm:ss <image> mm:ss <image>``."""
    return " ".join(f"{int(t // 60):02d}:{int(t % 60):02d} {image_token}" for t in timestamps)
