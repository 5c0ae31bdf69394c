"""The package's environment variables (``SGL_DIFFUSION_*``), typed and read in one place.

Each field of a settings class is the variable ``SGL_DIFFUSION_<FIELD NAME IN CAPITALS>``. A malformed value is a
``ValueError`` naming the variable: the process that reads it fails at startup instead of guessing.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping

PREFIX = "SGL_DIFFUSION_"


@dataclasses.dataclass(frozen=True)
class MediaEnv:
    """What a request's media may make the server read, and how much (README "Security").

    Read where the multimodal processor is built (sglang's tokenizer manager: the server's main process, or the
    batch CLI's); child processes inherit the environment.
    """

    allowed_local_media_paths: tuple[str, ...] = ()  # os.pathsep-separated directories; none: no local files
    allowed_media_domains: tuple[str, ...] = ()  # comma-separated hosts, "*.example.com" for subdomains; none: any
    allowed_media_networks: tuple[str, ...] = ()  # comma-separated CIDRs that may be fetched although not public
    max_images_per_request: int = 64
    max_videos_per_request: int = 4
    max_image_pixels: int = 8192 * 8192  # per image and per video frame (below PIL's own bomb warning)
    max_media_bytes: int = 64 << 20  # per image or video, encoded: a file, a fetched body or a data URL's bytes
    media_fetch_timeout_s: float = 15.0  # per URL, redirects included
    media_max_redirects: int = 3
    max_video_frames: int = 3600  # frames decoded per video (before sampling at 1 fps)
    max_video_decode_s: float = 30.0  # decode time per video

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (int, float)) and not value >= 0:  # NaN too
                raise ValueError(f"{env_name(field.name)} must be a number >= 0 (got {value})")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> MediaEnv:
        return _from_environ(cls, os.environ if environ is None else environ)


@dataclasses.dataclass(frozen=True)
class CacheEnv:
    """Where built artifacts are kept between runs (the trained tiny checkpoint of tests and benches)."""

    cache_dir: str = ""  # empty: ~/.cache/sgl-diffusion

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> CacheEnv:
        return _from_environ(cls, os.environ if environ is None else environ)


@dataclasses.dataclass(frozen=True)
class SamplerEnv:
    """Where the sampler's random numbers come from (README "Graphed canvas steps"). Read where the engine is built.

    ``exact``: each request's own torch.Generator, drawn in transformers' order (a seeded request gives
    transformers' tokens). ``counter``: a counter-based hash of (seed, canvas, step, position, token id)
    (sampling/graph_sampler.py): draws that graph capture allows and that do not depend on what else shares a
    batch; with ``--enable-torch-compile`` the sampler joins the graphed canvas step, several steps per replay.
    """

    rng: str = "exact"

    def __post_init__(self):
        if self.rng not in ("exact", "counter"):
            raise ValueError(f"{env_name('rng')} must be 'exact' or 'counter' (got {self.rng!r})")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SamplerEnv:
        return _from_environ(cls, os.environ if environ is None else environ)


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def _from_environ(cls, environ: Mapping[str, str]):
    hints, values = typing.get_type_hints(cls), {}
    for field in dataclasses.fields(cls):
        raw = environ.get(env_name(field.name))
        if raw is not None:
            values[field.name] = _parse(env_name(field.name), raw, hints[field.name])
    return cls(**values)


def _parse(name: str, raw: str, kind):
    if kind == tuple[str, ...]:
        separator = os.pathsep if name.endswith("_PATHS") else ","
        return tuple(part.strip() for part in raw.split(separator) if part.strip())
    try:
        return kind(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'} (got {raw!r})") from None
