"""/metrics carries the canvas engine's figures."""

import re

import pytest
import requests

pytestmark = pytest.mark.slow


def metric(text: str, name: str, le: str | None = None) -> float:
    """The sum of a metric's samples over their labels (``le``: a histogram bucket's samples only)."""
    bucket = "" if le is None else rf'[^}}]*le="{re.escape(le)}"'
    values = [float(v) for v in re.findall(rf"^{re.escape(name)}\{{{bucket}[^}}]*\}} ([0-9.e+-]+)$", text, re.M)]
    return sum(values)


def test_diffusion_metrics_count_canvases_and_steps(server):
    """A request of two 3-step canvases adds 2 canvases and 6 steps to the diffusion histograms."""
    before = requests.get(f"{server.url}/metrics", timeout=30).text
    resp = server.post("/generate", {"text": "metrics", "sampling_params": {
        "max_new_tokens": 64, "ignore_eos": True, "diffusion": {"max_denoising_steps": 3, "seed": 2}}})
    assert resp.status_code == 200
    after = requests.get(f"{server.url}/metrics", timeout=30).text
    delta = lambda name: metric(after, name) - metric(before, name)  # noqa: E731
    assert delta("sglang:diffusion_canvases_total") == 2
    assert delta("sglang:diffusion_steps_per_canvas_count") == 2
    assert delta("sglang:diffusion_steps_per_canvas_sum") == 6  # a random model never stops early
    assert delta("sglang:diffusion_tokens_per_forward_sum") == pytest.approx(2 * 32 / 3)
    assert "sglang:diffusion_canvases_in_flight" in after


def test_openai_usage_reports_cached_tokens(server):
    """With --enable-cache-report, a repeated chat prompt reports cached prompt tokens in usage."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "cache me please, twice"}], max_tokens=4,
                  extra_body={"diffusion": {"max_denoising_steps": 1}})
    client.chat.completions.create(**kwargs)
    usage = client.chat.completions.create(**kwargs).usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_diffusion_figures_in_meta_info_and_usage(server):
    """meta_info.diffusion_steps marks each canvas's steps on its first token; OpenAI usage sums them."""
    out = server.post("/generate", {"text": "figures", "sampling_params": {
        "max_new_tokens": 40, "ignore_eos": True, "diffusion": {"max_denoising_steps": 3, "seed": 1}}}).json()
    assert out["meta_info"]["diffusion_steps"] == [3] + [0] * 31 + [3] + [0] * 7
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=40,
                                          extra_body={"ignore_eos": True, "diffusion": {"max_denoising_steps": 2}})
    assert chat.usage.model_extra["diffusion"] == {"canvases": 2, "denoise_steps": 4, "tokens_per_forward": 10.0}
