import os
import pathlib
import re

import pytest

from sgl_diffusion.env import MediaEnv, env_name


def test_defaults_without_variables():
    """No variable set: no local files, any public host, no private networks, the documented limits."""
    env = MediaEnv.from_environ({})
    assert env == MediaEnv()
    assert env.allowed_local_media_paths == env.allowed_media_domains == env.allowed_media_networks == ()
    assert env.max_images_per_request == 64 and env.max_image_pixels == 8192 * 8192


def test_variables_are_parsed_by_type():
    """Paths split on os.pathsep, lists on commas (blanks dropped), numbers by the field's type."""
    env = MediaEnv.from_environ({
        "SGL_DIFFUSION_ALLOWED_LOCAL_MEDIA_PATHS": f"/a{os.pathsep}/b,c{os.pathsep}",
        "SGL_DIFFUSION_ALLOWED_MEDIA_DOMAINS": " example.com, ,*.cdn.example.org",
        "SGL_DIFFUSION_ALLOWED_MEDIA_NETWORKS": "127.0.0.1/32,10.0.0.0/8",
        "SGL_DIFFUSION_MAX_IMAGES_PER_REQUEST": "3",
        "SGL_DIFFUSION_MEDIA_FETCH_TIMEOUT_S": "2.5",
        "SGL_DIFFUSION_UNRELATED": "x",
    })  # fmt: skip
    assert env.allowed_local_media_paths == ("/a", "/b,c")
    assert env.allowed_media_domains == ("example.com", "*.cdn.example.org")
    assert env.allowed_media_networks == ("127.0.0.1/32", "10.0.0.0/8")
    assert env.max_images_per_request == 3 and env.media_fetch_timeout_s == 2.5


@pytest.mark.parametrize("name, value, word", [
    ("SGL_DIFFUSION_MAX_IMAGE_PIXELS", "lots", "an integer"),
    ("SGL_DIFFUSION_MAX_VIDEO_DECODE_S", "soon", "a number"),
    ("SGL_DIFFUSION_MAX_VIDEO_FRAMES", "-1", "a number >= 0"),
    ("SGL_DIFFUSION_MEDIA_FETCH_TIMEOUT_S", "nan", "a number >= 0"),
])  # fmt: skip
def test_malformed_values_name_the_variable(name, value, word):
    with pytest.raises(ValueError, match=f"{name} must be {re.escape(word)}"):
        MediaEnv.from_environ({name: value})


def test_every_variable_the_media_code_names_exists_and_is_documented():
    """Refusal messages name variables by hand: each must be a MediaEnv field, and every field is in the README."""
    root = pathlib.Path(__file__).parents[1]
    variables = {env_name(f) for f in MediaEnv.__dataclass_fields__}
    package = root / "sgl_diffusion"
    sources = [*(package / "multimodal").glob("*.py"), package / "entrypoints" / "batch.py"]
    named = {name for path in sources for name in re.findall(r"SGL_DIFFUSION_[A-Z0-9_]+", path.read_text())}
    assert named and named <= variables, sorted(named - variables)
    readme = (root / "README.md").read_text()
    assert [v for v in sorted(variables) if v not in readme] == []
