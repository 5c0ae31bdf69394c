"""A request's media, read into bytes under the operator's rules before anything decodes it.

DESIGN.md: the server reads only the request's own bytes and what the operator allowed. Every image and video
of a request (a URL, a data URL, base64, raw bytes, or sglang's ``ImageData``/``VideoData`` around one) goes
through ``MediaPolicy.image`` or ``MediaPolicy.video`` first, and only their results reach sglang's loader and
PyAV, so neither ever opens a path or a URL of its own:

- data URLs, base64 and bytes are the request's own bytes;
- a local path or ``file://`` URL is read only when its real path (symlinks and ``..`` resolved) lies inside
  a directory the operator allowed; otherwise it is refused with one message, whether or not the file exists;
- http(s) URLs are fetched by ``fetch.fetch`` (public addresses only, unless allowed; capped size, time and
  redirects); every other scheme is refused;
- images are checked before they are decoded: a known format (no EPS, which PIL hands to Ghostscript) and at
  most ``max_image_pixels`` (decompression bombs).
Each refusal is a ValueError (``MediaRefused``, ``fetch.FetchRefused``; HTTP 400) naming what was refused and
the variable that allows it. The settings are ``sgl_diffusion.env.MediaEnv``. A bare string is base64 when it is
valid base64, and a local path otherwise.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import ipaddress
import os
import re
import stat
from typing import Literal
from urllib.parse import unquote, urlsplit

from sgl_diffusion.env import MediaEnv
from sgl_diffusion.multimodal.fetch import FetchRules, fetch

MediaKind = Literal["image", "video"]
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "AVIF", "BMP", "TIFF")  # PIL format names (JPEG covers MPO)
LOCAL_REFUSED = ("local media paths are refused: this server reads local files only inside the directories its "
                 "operator allowed (SGL_DIFFUSION_ALLOWED_LOCAL_MEDIA_PATHS; none by default)")  # fmt: skip
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class MediaRefused(ValueError):
    """A media item the server does not read, or that breaks a limit (HTTP 400)."""


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    local_dirs: tuple[str, ...]  # real paths (symlinks resolved) of the allowed directories
    fetch_rules: FetchRules
    limits: MediaEnv

    @classmethod
    def from_env(cls, env: MediaEnv) -> MediaPolicy:
        try:
            networks = tuple(ipaddress.ip_network(n, strict=False) for n in env.allowed_media_networks)
        except ValueError as e:
            raise ValueError(f"SGL_DIFFUSION_ALLOWED_MEDIA_NETWORKS: {e}") from None
        domains = tuple(d.lower().rstrip(".") for d in env.allowed_media_domains)
        rules = FetchRules(domains, networks, env.max_media_bytes, env.media_fetch_timeout_s, env.media_max_redirects)
        return cls(tuple(os.path.realpath(d) for d in env.allowed_local_media_paths), rules, env)

    def check_counts(self, images: int, videos: int) -> None:
        """Refuse a request with more images or videos than allowed, before any of them is read."""
        for count, limit, kind, variable in (
            (images, self.limits.max_images_per_request, "images", "SGL_DIFFUSION_MAX_IMAGES_PER_REQUEST"),
            (videos, self.limits.max_videos_per_request, "videos", "SGL_DIFFUSION_MAX_VIDEOS_PER_REQUEST"),
        ):  # fmt: skip
            if count > limit:
                raise MediaRefused(f"{count} {kind} in one request; at most {limit} are allowed ({variable})")

    def image(self, item):
        """What sglang's image loader may get for ``item``: the image its bytes open as (checked); an in-process PIL
        image (Engine API) within the pixel limit; or a preprocessed-input dict (sglang's ``format`` key), which names
        no file."""
        from PIL import Image

        if isinstance(item, Image.Image):
            self.check_pixels(*item.size)
            return item
        if isinstance(item, dict) and "format" in item:
            return item
        return self.check_image(self.read(item, "image"))

    def video(self, item) -> bytes:
        """The encoded bytes of a video item; ``video.sample_frames`` decides which containers open."""
        return self.read(item, "video")

    def read(self, item, kind: MediaKind) -> bytes:
        """The bytes ``item`` stands for, read only where the policy allows (blocking: file and network I/O)."""
        source = getattr(item, "url", item)  # sglang's ImageData / VideoData
        if isinstance(source, (bytes, bytearray, memoryview)):
            return self._capped(bytes(source), kind)
        if not isinstance(source, str):
            raise MediaRefused(f"{'an image' if kind == 'image' else 'a video'} must be a URL, a data URL, base64 or a "
                               f"file path, not {type(source).__name__}")  # fmt: skip
        if not source.strip():  # not a path to refuse: nothing was sent
            raise MediaRefused(f"the {kind} is empty: send a URL, a data URL, base64 or a file path")
        scheme = _SCHEME.match(source)
        scheme = scheme.group(1).lower() if scheme else None
        if scheme == "data":
            return self._capped(_b64decode(source.partition(",")[2], kind, self.limits.max_media_bytes), kind)
        if scheme in ("http", "https"):
            return fetch(source, self.fetch_rules)
        if scheme == "file":
            parts = urlsplit(source)
            if parts.netloc not in ("", "localhost"):
                raise MediaRefused(LOCAL_REFUSED)
            return self._read_local(unquote(parts.path), kind)
        if scheme is not None:
            raise MediaRefused(f"{scheme}: URLs are not read; send an http(s) URL, a data URL or base64")
        if _is_base64(source):
            return self._capped(_b64decode(source, kind, self.limits.max_media_bytes), kind)
        return self._read_local(source, kind)

    def check_image(self, data: bytes):
        """``data`` opened as an image of a known format within the pixel limit (its header read; sglang's loader
        decodes it). The image goes on, not the bytes: sglang would open them again with every PIL plugin, and
        bytes made for it open there as another format, larger than the one checked."""
        from PIL import Image, UnidentifiedImageError

        Image.init()  # NOTE: loads every plugin once; open() with `formats` looks names up only in those loaded
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            size = image.size
        except Image.DecompressionBombError:  # PIL's own hard limit fired first (twice its MAX_IMAGE_PIXELS)
            limit = min(self.limits.max_image_pixels, 2 * (Image.MAX_IMAGE_PIXELS or self.limits.max_image_pixels))
            raise MediaRefused(f"the image has more than {limit} pixels, the most allowed per image "
                               "(SGL_DIFFUSION_MAX_IMAGE_PIXELS)") from None  # fmt: skip
        except UnidentifiedImageError:
            raise MediaRefused(f"could not decode the image: not one of {', '.join(IMAGE_FORMATS)}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise MediaRefused(f"could not decode the image: {e}") from None
        self.check_pixels(*size)
        return image

    def check_pixels(self, width: int, height: int, what: str = "image") -> None:
        if width * height > self.limits.max_image_pixels:
            raise MediaRefused(f"the {what} is {width}x{height} = {width * height} pixels; at most "
                               f"{self.limits.max_image_pixels} are allowed (SGL_DIFFUSION_MAX_IMAGE_PIXELS)")

    def _read_local(self, path: str, kind: MediaKind) -> bytes:
        # NOTE: one message for every path outside the allowed directories, before anything touches the disk
        # there: a client must not learn which files exist
        if not self.local_dirs:
            raise MediaRefused(LOCAL_REFUSED)
        try:
            real = os.path.realpath(path)
        except (OSError, ValueError):  # e.g. a NUL byte
            raise MediaRefused(LOCAL_REFUSED) from None
        if not self._allowed_path(real):
            raise MediaRefused(LOCAL_REFUSED)
        try:
            # O_NOFOLLOW: the checked path holds no symlink, so one appearing now is a race; O_NONBLOCK: a FIFO
            # must not hang the open
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            raise MediaRefused(f"no {kind} file at {path}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MediaRefused(f"no {kind} file at {path}")
            if not self._allowed_path(_opened_path(fd, real)):  # a directory swapped for a symlink meanwhile
                raise MediaRefused(LOCAL_REFUSED)
            if info.st_size > self.limits.max_media_bytes:
                raise self._too_large(kind)
            return self._capped(_read_fd(fd, self.limits.max_media_bytes + 1), kind)
        finally:
            os.close(fd)

    def _allowed_path(self, real: str) -> bool:
        return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in self.local_dirs)

    def _capped(self, data: bytes, kind: MediaKind) -> bytes:
        if len(data) > self.limits.max_media_bytes:
            raise self._too_large(kind)
        return data

    def _too_large(self, kind: MediaKind) -> MediaRefused:
        return MediaRefused(f"the {kind} is more than {self.limits.max_media_bytes} bytes, the most allowed "
                            "(SGL_DIFFUSION_MAX_MEDIA_BYTES)")  # fmt: skip


def is_relative_path(source) -> bool:
    """Whether ``read`` takes ``source`` (an image or video item's string) for a relative file path."""
    return (isinstance(source, str) and bool(source.strip()) and _SCHEME.match(source) is None
            and not _is_base64(source) and not os.path.isabs(source))  # fmt: skip


def _is_base64(source: str) -> bool:
    return _BASE64.fullmatch(source) is not None and len(source) % 4 == 0


def _b64decode(payload: str, kind: MediaKind, max_bytes: int) -> bytes:
    if len(payload) // 4 * 3 > max_bytes + 3:  # refused before the decoded copy is made
        raise MediaRefused(f"the {kind} is more than {max_bytes} bytes, the most allowed "
                           "(SGL_DIFFUSION_MAX_MEDIA_BYTES)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaRefused(f"the {kind} data is not valid base64: {e}") from None


def _read_fd(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit and (chunk := os.read(fd, min(1 << 20, limit - size))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _opened_path(fd: int, fallback: str) -> str:
    """The path the kernel opened (Linux: /proc/self/fd), or ``fallback`` where there is no /proc."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return fallback
