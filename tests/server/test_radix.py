"""The radix cache with canvases: prompt prefixes and committed canvases are reused; memory is returned."""

import pytest
import requests

from tests.server.conftest import Server

pytestmark = pytest.mark.slow


def generate(server, **body):
    resp = server.post("/generate", body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def used_tokens(server) -> int:
    requests.post(f"{server.url}/flush_cache", timeout=30)
    return requests.get(f"{server.url}/v1/loads", timeout=30).json()["loads"][0]["num_used_tokens"]


def test_repeated_prompt_is_served_from_cache(server):
    """A repeated prompt reports its cached tokens and, seeded, gives the same answer as uncached."""
    ids = [2, 5, 381, 280] + list(range(300, 330))
    body = dict(input_ids=ids, sampling_params={"max_new_tokens": 40, "ignore_eos": True,
                                                "diffusion": {"seed": 3, "max_denoising_steps": 2}})
    first, second = generate(server, **body), generate(server, **body)
    assert second["meta_info"]["cached_tokens"] == len(ids) - 1  # the last prompt token is always recomputed
    assert second["output_ids"] == first["output_ids"]


def test_next_turn_reuses_prompt_and_committed_canvases(server):
    """A follow-up whose prompt extends prompt + answer reuses every committed canvas of the answer."""
    ids = [2, 5, 381, 280] + list(range(100, 120))
    out = generate(server, input_ids=ids, sampling_params={"max_new_tokens": 70, "ignore_eos": True,
                                                           "diffusion": {"seed": 4, "max_denoising_steps": 2}})
    answer = out["output_ids"]
    follow_up = ids + answer + [6, 280, 5, 381, 280, 150, 151]
    out2 = generate(server, input_ids=follow_up, sampling_params={"max_new_tokens": 8,
                                                                  "diffusion": {"seed": 4, "max_denoising_steps": 1}})
    # two full canvases (64 tokens) were committed; the third canvas (6 kept tokens) never is
    assert out2["meta_info"]["cached_tokens"] == len(ids) + 64


def test_kv_returned_after_requests(server):
    """After requests finish and the cache is flushed, no KV token is in use."""
    generate(server, text="memory check", sampling_params={"max_new_tokens": 50, "diffusion": {"max_denoising_steps": 1}})
    assert used_tokens(server) == 0


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint_dir):
    srv = Server(tiny_checkpoint_dir, "--max-total-tokens", "400", "--swa-full-tokens-ratio", "0.9",
                 "--max-running-requests", "2")
    yield srv
    srv.stop()


def test_eviction_under_memory_pressure(small_server):
    """With a pool of a few requests' worth of KV, distinct prompts evict cached ones and all succeed."""
    for i in range(12):
        ids = [2, 5] + [(i * 37 + j) % 390 + 3 for j in range(40)]
        out = generate(small_server, input_ids=ids, sampling_params={"max_new_tokens": 64, "ignore_eos": True,
                                                                    "diffusion": {"max_denoising_steps": 1}})
        assert len(out["output_ids"]) == 64
    assert used_tokens(small_server) == 0


def test_requests_beyond_max_running_wait_their_turn(small_server):
    """With --max-running-requests 2, eight concurrent requests queue in sglang's waiting queue and all finish."""
    import concurrent.futures

    def one(i):
        return generate(small_server, text=f"queued {i}", sampling_params={
            "max_new_tokens": 40, "ignore_eos": True, "diffusion": {"max_denoising_steps": 2, "seed": i}})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(8)))
    assert all(len(o["output_ids"]) == 40 for o in outs)
    assert used_tokens(small_server) == 0
