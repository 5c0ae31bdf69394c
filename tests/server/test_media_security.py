"""What a client's media can make a real server read (README "Security").

Attacks go to the default server (the session's ``server``: no SGL_DIFFUSION_* variable), which must refuse
each with a 400 that is the same whether a file exists or not, and stay healthy. ``media_server`` allows one
directory and 127.0.0.1 explicitly: the allowed doors still work there, and nothing leaves what it allows.
"""

import base64
import functools
import http.server
import threading
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from sgl_diffusion.multimodal.media_policy import LOCAL_REFUSED
from tests.multimodal.media import data_url, png_bomb_bytes, png_bytes
from tests.server.conftest import IMAGE, VIDEO

pytestmark = pytest.mark.slow

SAMPLER = {"max_denoising_steps": 1, "seed": 3}


# ---- fixtures: a local HTTP origin (files on disk and the allowing server: tests/server/conftest.py) -------------


@pytest.fixture(scope="module")
def disk(media_disk):
    return media_disk


class _Origin(http.server.SimpleHTTPRequestHandler):
    hits: list  # paths asked for, by any client

    def do_GET(self):
        self.hits.append(self.path)
        parts = urlsplit(self.path)
        if parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            super().do_GET()

    def guess_type(self, path):
        return "video/mp4" if str(path).endswith(".mp4") else super().guess_type(path)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin(disk):
    """A local HTTP server (127.0.0.1) over allowed/, with /redirect?to=URL; ``.hits`` lists what it served."""
    hits = []
    handler = functools.partial(type("Origin", (_Origin,), {"hits": hits}), directory=str(disk / "allowed"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url, httpd.hits = f"http://127.0.0.1:{httpd.server_address[1]}", hits
    yield httpd
    httpd.shutdown()


@pytest.fixture(scope="module")
def media_server(configured_server):
    """A server that allows disk's allowed/ and 127.0.0.1 (only: not the rest of 127/8, not ::1)."""
    return configured_server


def image_chat(server, url):
    return _post_chat(server, {"type": "image_url", "image_url": {"url": url}})


def video_chat(server, url):
    return _post_chat(server, {"type": "video_url", "video_url": {"url": url}})


def _post_chat(server, part):
    body = {"model": "tiny", "max_tokens": 4, "diffusion": SAMPLER,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "what is this?"}]}]}  # fmt: skip
    return server.post("/v1/chat/completions", body)


def native(server, images=(), videos=()):
    text = "<|image|>" * len(images) + "<|video|>" * len(videos) + " what is this?"
    body = {"text": text, "sampling_params": {"max_new_tokens": 4, "diffusion": SAMPLER},
            **({"image_data": list(images)} if images else {}), **({"video_data": list(videos)} if videos else {})}
    return server.post("/generate", body)


def every_door(server, source):
    """The answers to ``source`` through OpenAI image_url and video_url and native image_data and video_data."""
    return [image_chat(server, source), video_chat(server, source), native(server, images=[source]),
            native(server, videos=[source])]  # fmt: skip


def refused(resp, word: str) -> str:
    assert resp.status_code == 400, (resp.status_code, resp.text[:300])
    assert word in resp.text, resp.text[:300]
    return resp.text


# ---- the default server --------------------------------------------------------------------------------------------


def test_local_files_are_refused_alike_whether_or_not_they_exist(server, disk):
    """file:///etc/passwd, /etc/shadow, a missing file and an existing image outside any allowed directory give the
    same 400 body through each door; the server stays healthy."""
    sources = ["file:///etc/passwd", "/etc/shadow", "/nonexistent.png", str(disk / "outside" / "img.png"),
               f"file://{disk / 'outside' / 'img.png'}", str(disk / "allowed" / "list.m3u8")]  # fmt: skip
    for door in range(4):
        bodies = {refused(every_door(server, source)[door], "local media paths are refused") for source in sources}
        assert len(bodies) == 1, (door, bodies)
    assert LOCAL_REFUSED in bodies.pop()
    assert server.healthy()


def test_internal_urls_are_refused_before_any_connection(server, origin):
    """The server's own loopback address, a DNS name that resolves to loopback (localhost), 127.1, the cloud
    metadata address and an IPv4-mapped loopback are refused; the origin on loopback is never contacted."""
    port = urlsplit(origin.url).port
    origin.hits.clear()
    urls = [f"{server.url}/health", f"{origin.url}/img.png", f"http://localhost:{port}/img.png",
            f"http://127.1:{port}/img.png", "http://169.254.169.254/latest/meta-data/",
            f"http://[::ffff:127.0.0.1]:{port}/img.png"]  # fmt: skip
    for url in urls:
        refused(image_chat(server, url), "not a public address")
        refused(native(server, videos=[url]), "not a public address")
    refused(image_chat(server, "ftp://example.com/img.png"), "ftp: URLs are not read")
    assert origin.hits == []
    assert server.healthy()


def test_a_playlist_in_the_request_is_refused(server, disk):
    """An HLS playlist whose entry is a real clip, sent as data (video/mp4 or HLS MIME type), never becomes
    frames: 400 from the container check."""
    playlist = (disk / "allowed" / "list.m3u8").read_bytes()
    for source in (data_url(playlist, "application/vnd.apple.mpegurl"), data_url(playlist, "video/mp4"),
                   base64.b64encode(playlist).decode()):  # fmt: skip
        refused(video_chat(server, source), "could not decode the video")
        refused(native(server, videos=[source]), "could not decode the video")
    assert server.healthy()


def test_decompression_bomb_is_refused(server):
    """A 20000x20000 PNG of a few KB is refused from its header, naming the limit."""
    bomb = data_url(png_bomb_bytes(20000, 20000), "image/png")
    refused(image_chat(server, bomb), "SGL_DIFFUSION_MAX_IMAGE_PIXELS")
    refused(native(server, images=[bomb]), "SGL_DIFFUSION_MAX_IMAGE_PIXELS")
    assert server.healthy()


def test_too_many_images_or_videos_are_refused(server):
    """65 images (or 5 videos) in one request: 400 naming the limit, before any is read."""
    image = data_url(png_bytes(8, 8), "image/png")
    refused(native(server, images=[image] * 65), "65 images in one request; at most 64")
    refused(native(server, videos=["/nonexistent.mp4"] * 5), "SGL_DIFFUSION_MAX_VIDEOS_PER_REQUEST")
    assert native(server, images=[image] * 2).status_code == 200
    assert server.healthy()


# ---- a server that allows a directory and 127.0.0.1 ----------------------------------------------------------------


def test_every_image_door_gives_the_same_answer(media_server, disk, origin):
    """Allowed doors still work: a data URL, an http URL, a local path and a file:// URL of the same PNG give the
    same prompt and answer; native /generate image_data with a path too."""
    path = disk / "allowed" / "img.png"
    answers = set()
    for url in (data_url(IMAGE, "image/png"), f"{origin.url}/img.png", str(path), f"file://{path}"):
        resp = image_chat(media_server, url)
        assert resp.status_code == 200, resp.text
        answers.add((resp.json()["usage"]["prompt_tokens"], resp.json()["choices"][0]["message"]["content"]))
    assert len(answers) == 1, answers
    outs = [native(media_server, images=[source]).json() for source in (data_url(IMAGE, "image/png"), str(path))]
    assert outs[0]["output_ids"] == outs[1]["output_ids"]
    assert outs[0]["meta_info"]["prompt_tokens"] == outs[1]["meta_info"]["prompt_tokens"] > 40


def test_every_video_door_gives_the_same_answer(media_server, disk, origin):
    """A video as a data URL, a local path, a file:// URL and an http URL: the same prompt and output."""
    path = disk / "allowed" / "clip.mp4"
    outs = [native(media_server, videos=[source]).json()
            for source in (data_url(VIDEO, "video/mp4"), str(path), f"file://{path}", f"{origin.url}/clip.mp4")]
    assert all(out["meta_info"]["prompt_tokens"] == outs[0]["meta_info"]["prompt_tokens"] for out in outs), outs
    assert all(out["output_ids"] == outs[0]["output_ids"] for out in outs)


def test_links_and_dotdot_cannot_leave_the_allowed_directory(media_server, disk):
    """`..` and symlinks out of allowed/ get the default server's refusal, the same for existing and missing
    targets; a missing file inside allowed/ is merely missing."""
    allowed = disk / "allowed"
    escapes = [f"{allowed}/../outside/img.png", f"{allowed}/../outside/missing.png",
               f"file://{allowed}/../outside/img.png", str(allowed / "out.png"), str(allowed / "out-missing.png"),
               "/etc/passwd"]  # fmt: skip
    bodies = {refused(image_chat(media_server, source), "local media paths are refused") for source in escapes}
    assert len(bodies) == 1, bodies
    refused(image_chat(media_server, str(allowed / "missing.png")), f"no image file at {allowed / 'missing.png'}")
    assert media_server.healthy()


def test_redirects_are_checked_hop_by_hop(media_server, origin):
    """The allowed origin redirecting to loopback the server may not reach (127.0.0.2, ::1) is refused; a redirect
    inside what is allowed works."""
    port = urlsplit(origin.url).port
    for target in (f"http://127.0.0.2:{port}/img.png", f"http://[::1]:{port}/img.png"):
        refused(image_chat(media_server, f"{origin.url}/redirect?to={target}"), "not a public address")
    assert image_chat(media_server, f"{origin.url}/redirect?to=/img.png").status_code == 200
    assert media_server.healthy()


def test_playlists_on_disk_or_over_http_are_refused(media_server, disk, origin):
    """The playlist as a local .m3u8, as a local file named .mp4, and served over http as clip.mp4 with a
    video/mp4 type: all 400, so the clip it names never becomes frames."""
    allowed = disk / "allowed"
    assert requests.get(f"{origin.url}/list.mp4", timeout=10).headers["Content-Type"] == "video/mp4"
    for source in (str(allowed / "list.m3u8"), str(allowed / "list.mp4"), f"file://{allowed}/list.mp4",
                   f"{origin.url}/list.mp4"):  # fmt: skip
        refused(video_chat(media_server, source), "could not decode the video")
        refused(native(media_server, videos=[source]), "could not decode the video")
    assert media_server.healthy()
