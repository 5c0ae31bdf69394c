"""The radix cache with canvases: prompt prefixes and committed canvases are reused; memory is returned."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.server.conftest import Server
from tests.server.test_load import assert_idle_and_no_kv_in_use

pytestmark = pytest.mark.slow


def generate(server, **body):
    resp = server.post("/generate", body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_repeated_prompt_is_served_from_cache(server):
    """A repeated prompt reports its cached tokens and, seeded, gives the same answer as uncached."""
    ids = [2, 5, 381, 280] + list(range(300, 330))
    body = dict(input_ids=ids, sampling_params={"max_new_tokens": 40, "ignore_eos": True,
                                                "diffusion": {"seed": 3, "max_denoising_steps": 2}})
    first, second = generate(server, **body), generate(server, **body)
    assert second["meta_info"]["cached_tokens"] == len(ids)  # all of it: a canvas needs no last-token logits
    assert second["output_ids"] == first["output_ids"]


def test_a_prompt_cached_whole_is_not_encoded_again(server):
    """A prefill-only request (the DSL's prefix caching) of a cached prompt reuses all of it and ends without a forward:
    its "Prefill batch" line counts no new token."""
    ids = [2, 9, 377, 12] + list(range(340, 361))
    body = dict(input_ids=ids, sampling_params={"max_new_tokens": 0})
    assert generate(server, **body)["meta_info"]["cached_tokens"] <= 1  # <bos>, which other prompts share
    with open(server.log_path) as log:
        log.seek(0, 2)
        again = generate(server, **body)
        lines = log.read()
    assert again["meta_info"]["cached_tokens"] == len(ids) and again["output_ids"] == []
    assert f"#new-token: 0, #cached-token: {len(ids)}," in lines, lines


def test_a_prompt_that_branched_off_a_cached_one_is_served_whole_again(server):
    """A prompt sharing its first tokens with a cached one, answered over several canvases (the sliding window of 16
    moves past the prompt), is matched whole when repeated, and the seeded answer is the uncached one. sglang's SWA
    cache first inserts such a prompt only up to where it branches off the cached one; the rest lost its sliding KV
    as the canvases moved on, and a repeat matched the 5 shared tokens only."""
    shared = [2, 7, 333, 44, 61]
    generate(server, input_ids=shared + list(range(200, 240)), sampling_params={
        "max_new_tokens": 8, "diffusion": {"seed": 1, "max_denoising_steps": 1}})
    ids = shared + list(range(241, 281))
    body = dict(input_ids=ids, sampling_params={"max_new_tokens": 70, "ignore_eos": True,
                                                "diffusion": {"seed": 5, "max_denoising_steps": 2}})
    first, second = generate(server, **body), generate(server, **body)
    assert first["meta_info"]["cached_tokens"] <= len(shared)  # 0: the other prompt's window has moved on
    assert second["meta_info"]["cached_tokens"] == len(ids)
    assert second["output_ids"] == first["output_ids"]


@pytest.mark.parametrize("max_new_tokens", [20, 70])  # one canvas; three canvases, the last one cut at 6 tokens
def test_next_turn_reuses_prompt_and_the_whole_answer(server, max_new_tokens):
    """A follow-up whose prompt extends prompt + answer reuses all of it, the answer's last canvas included."""
    ids = [2, 5, 381, 280] + list(range(100 + max_new_tokens, 120 + max_new_tokens))
    out = generate(server, input_ids=ids, sampling_params={"max_new_tokens": max_new_tokens, "ignore_eos": True,
                                                           "diffusion": {"seed": 4, "max_denoising_steps": 2}})
    answer = out["output_ids"]
    assert len(answer) == max_new_tokens
    follow_up = ids + answer + [6, 280, 5, 381, 280, 150, 151]
    body = dict(input_ids=follow_up, sampling_params={"max_new_tokens": 8, "diffusion": {"seed": 4, "max_denoising_steps": 1}})
    out2 = generate(server, **body)
    assert out2["meta_info"]["cached_tokens"] == len(ids) + len(answer)
    # ?timeout: the follow-up's last canvas may still be encoding (the engine is idle right after)
    assert requests.post(f"{server.url}/flush_cache", params={"timeout": 30}, timeout=60).status_code == 200
    uncached = generate(server, **body)  # the cached KV of the answer is the KV a fresh prefill writes
    assert uncached["meta_info"]["cached_tokens"] == 0 and uncached["output_ids"] == out2["output_ids"]


def test_next_turn_reuses_an_answer_that_ended_on_eos(server):
    """An answer cut at an EOS inside its canvas is cached through the EOS, which the next turn's prompt repeats."""
    ids = [2, 5, 381, 280] + list(range(200, 215))
    for seed in range(20):
        out = generate(server, input_ids=ids, sampling_params={"max_new_tokens": 200,
                                                               "diffusion": {"seed": seed, "max_denoising_steps": 1}})
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            break
    else:
        pytest.fail("no EOS in 20 seeded generations")
    answer = out["output_ids"]
    assert answer[-1] in (1, 6, 10)
    out2 = generate(server, input_ids=ids + answer + [280, 150, 151], sampling_params={
        "max_new_tokens": 8, "diffusion": {"seed": 1, "max_denoising_steps": 1}})
    assert out2["meta_info"]["cached_tokens"] == len(ids) + len(answer)


def test_kv_returned_after_requests(server):
    """After requests finish and the cache is flushed, no KV token is in use."""
    generate(server, text="memory check", sampling_params={"max_new_tokens": 50, "diffusion": {"max_denoising_steps": 1}})
    assert_idle_and_no_kv_in_use(server)


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint_dir):
    srv = Server(tiny_checkpoint_dir, "--max-total-tokens", "400", "--swa-full-tokens-ratio", "0.9",
                 "--max-running-requests", "2", "--chunked-prefill-size", "64")
    yield srv
    srv.stop()


def test_eviction_under_memory_pressure(small_server):
    """With a pool of a few requests' worth of KV, distinct prompts evict cached ones and all succeed."""
    for i in range(12):
        ids = [2, 5] + [(i * 37 + j) % 390 + 3 for j in range(40)]
        out = generate(small_server, input_ids=ids, sampling_params={"max_new_tokens": 64, "ignore_eos": True,
                                                                    "diffusion": {"max_denoising_steps": 1}})
        assert len(out["output_ids"]) == 64
    assert_idle_and_no_kv_in_use(small_server)


def test_concurrent_repeats_of_one_prompt_reuse_each_other_and_leave_no_kv(small_server):
    """Nine requests of one 92-token prompt at once on the small pool (chunks of 64, two running at a time): answers
    and prefill-only requests, which reuse what the others have cached (whole, once it is), and requests scoring the
    prompt's last 12 tokens. All answer in full, a prefill-only request sent after them finds the prompt whole, and no
    KV is left."""
    ids = [2, 5] + [(j * 7) % 390 + 3 for j in range(90)]
    kinds = {"answer": {"max_new_tokens": 40}, "prefill_only": {"max_new_tokens": 0}, "scored": {"max_new_tokens": 8}}
    sent = [kind for _ in range(3) for kind in kinds]

    def send(kind):
        params = kinds[kind] | {"ignore_eos": True, "diffusion": {"seed": 1, "max_denoising_steps": 1}}
        extra = {"return_logprob": True, "logprob_start_len": 80} if kind == "scored" else {}
        return small_server.post("/generate", {"input_ids": ids, "sampling_params": params, **extra})

    with ThreadPoolExecutor(len(sent)) as pool:
        outs = list(pool.map(send, sent))
    assert all(o.status_code == 200 for o in outs), [o.text for o in outs if o.status_code != 200]
    for kind, out in zip(sent, (o.json() for o in outs)):
        assert len(out["output_ids"]) == kinds[kind]["max_new_tokens"], (kind, out["meta_info"])
        if kind == "scored":
            assert len(out["meta_info"]["input_token_logprobs"]) == len(ids) - 80
    late = generate(small_server, input_ids=ids, sampling_params={"max_new_tokens": 0})
    assert late["meta_info"]["cached_tokens"] == len(ids)
    assert_idle_and_no_kv_in_use(small_server)


def test_requests_beyond_max_running_wait_their_turn(small_server):
    """With --max-running-requests 2, eight concurrent requests queue in sglang's waiting queue and all finish."""
    import concurrent.futures

    def one(i):
        return generate(small_server, text=f"queued {i}", sampling_params={
            "max_new_tokens": 40, "ignore_eos": True, "diffusion": {"max_denoising_steps": 2, "seed": i}})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(8)))
    assert all(len(o["output_ids"]) == 40 for o in outs)
    assert_idle_and_no_kv_in_use(small_server)


def test_requests_that_fill_the_pool_together_are_retracted_not_failed(small_server):
    """Two requests that fit the pool one at a time but not together, sent in one batch (pre-tokenized: sglang hands
    them to the scheduler in one message, so they always overlap). Both are encoded (the second prompt while its tokens
    and both requests' next canvases fit), then both grow until each needs room to commit a canvas that only the other
    could free, and the newer gives its KV back (into the sliding-window radix tree) and resumes once the older is done
    (sglang's retraction). Before, one was failed with a 503. Both answer in full and no KV is left."""
    ids = [[2, 5] + [(i * 53 + j * 7) % 390 + 3 for j in range(10)] for i in range(2)]  # 12 + 256 of 400 each
    resp = small_server.post("/generate", {"input_ids": ids, "sampling_params": {
        "max_new_tokens": 250, "ignore_eos": True, "diffusion": {"max_denoising_steps": 1, "seed": 1}}}, timeout=300)
    assert resp.status_code == 200, resp.text[:300]
    outs = resp.json()
    assert [len(o["output_ids"]) for o in outs] == [250, 250]
    assert sorted(o["meta_info"]["num_retractions"] for o in outs) == [0, 1], [o["meta_info"] for o in outs]
    # a retracted request's re-encode may reuse its own context: that is no cached prompt (tests/runtime/test_radix_slots.py)
    assert all(o["meta_info"]["cached_tokens"] <= 12 for o in outs), [o["meta_info"] for o in outs]
    assert_idle_and_no_kv_in_use(small_server)


def test_a_request_waiting_for_kv_is_reported_queued_not_running(small_server):
    """A request the canvas loop holds until there is KV for it counts as queued, as sglang counts one it has not
    admitted: in /v1/loads (what a DP router balances on) and in the queue gauge of /metrics. Before, the loop
    reported it running. A 100-token prompt streams a long answer; a 300-token prompt then cannot start beside it
    (its tokens and two canvases exceed the pool's room) until the first is aborted, and then finishes."""
    import concurrent.futures
    import json
    import time

    from tests.server.test_metrics import metric
    from tests.server.test_load import _loads

    rid = "held-for-kv"
    first = requests.post(f"{small_server.url}/generate", stream=True, timeout=60, json={
        "rid": rid, "input_ids": [2] + [(j * 29) % 390 + 3 for j in range(99)], "stream": True,
        "sampling_params": {"max_new_tokens": 250, "ignore_eos": True,  # ~8 canvases of 48 steps
                            "diffusion": {"max_denoising_steps": 48, "confidence_threshold": 0, "seed": 1}}})
    assert first.status_code == 200, first.text
    lines = first.iter_lines()
    assert any(line.startswith(b"data: {") and json.loads(line[6:])["meta_info"]["completion_tokens"] for line in lines)
    # rounds of 20 ms or more: the first request's ~380 rounds leave the second held for 7 s at least
    assert small_server.post("/slow_down", {"forward_sleep_time": 0.02}).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        second = pool.submit(generate, small_server, input_ids=[2] + [(j * 31) % 390 + 3 for j in range(299)],
                             sampling_params={"max_new_tokens": 8, "diffusion": {"max_denoising_steps": 1}})
        try:
            deadline = time.time() + 60
            while True:
                load = _loads(small_server)
                gauges = requests.get(f"{small_server.url}/metrics", timeout=30).text
                queued = metric(gauges, "sglang:num_queue_reqs"), metric(gauges, "sglang:num_running_reqs")
                if (load["num_running_reqs"], load["num_waiting_reqs"]) == (1, 1) and queued == (1, 1):
                    break
                assert time.time() < deadline and not second.done(), (load, queued)
                time.sleep(0.1)
        finally:
            assert small_server.post("/slow_down", {"forward_sleep_time": 0}).status_code == 200
            requests.post(f"{small_server.url}/abort_request", json={"rid": rid}, timeout=10)
            first.close()
        assert len(second.result(timeout=120)["output_ids"]) == 8
    assert_idle_and_no_kv_in_use(small_server)


def test_a_long_prompt_is_encoded_in_chunks_of_the_prefill_budget(small_server, server):
    """With --chunked-prefill-size 64, a 300-token prompt is encoded over rounds of at most 64 prompt tokens (sglang's
    chunked prefill; /metrics has every round's count), and the seeded answer is the one the default server gives,
    which encodes it in one round."""
    from tests.server.test_metrics import metric, metric_where

    ids = [2, 5] + [(j * 11) % 390 + 3 for j in range(298)]
    body = dict(input_ids=ids, sampling_params={"max_new_tokens": 40, "ignore_eos": True,
                                                "diffusion": {"seed": 7, "max_denoising_steps": 1}})
    name = "sglang:diffusion_prefill_tokens_per_round"
    before = requests.get(f"{small_server.url}/metrics", timeout=30).text
    chunked = generate(small_server, **body)
    after = requests.get(f"{small_server.url}/metrics", timeout=30).text
    delta = lambda suffix: metric(after, name + suffix) - metric(before, name + suffix)  # noqa: E731
    assert delta("_sum") == len(ids) - chunked["meta_info"]["cached_tokens"] == 300
    assert delta("_count") == 5  # 64 x 4 + 44
    assert metric(after, name + "_bucket", le="64.0") - metric(before, name + "_bucket", le="64.0") == 5
    # sglang's chunked_prefill stage: one sample for each chunk before the last
    stages = [metric_where(text, "sglang:per_stage_req_latency_seconds_count", stage="chunked_prefill")
              for text in (before, after)]
    assert stages[1] - stages[0] == 4
    assert chunked["output_ids"] == generate(server, **body)["output_ids"]
    assert_idle_and_no_kv_in_use(small_server)


def test_prompt_scores_on_the_chunked_server_are_the_default_servers(small_server, server):
    """Prompt scores read the sliding window at every scored position. Scoring from token 41 of a 100-token prompt
    crosses the 64-token chunk boundary, and the first chunk's insertion into the radix cache gives back the sliding
    KV behind it; such a prompt is encoded whole, and its scores are the default server's."""
    ids = [2, 5] + [(j * 13) % 390 + 3 for j in range(98)]
    body = dict(input_ids=ids, return_logprob=True, logprob_start_len=40, top_logprobs_num=2,
                sampling_params={"max_new_tokens": 0})
    chunked, whole = generate(small_server, **body)["meta_info"], generate(server, **body)["meta_info"]
    got, want = chunked["input_token_logprobs"], whole["input_token_logprobs"]
    assert len(got) == len(want) == 60 and got[0][0] is None
    assert [t for _, t, _ in got] == [t for _, t, _ in want]
    assert [v for v, _, _ in got[1:]] == pytest.approx([v for v, _, _ in want[1:]], abs=1e-4)
    assert [[t for _, t, _ in top] for top in chunked["input_top_logprobs"][1:]] == [
        [t for _, t, _ in top] for top in whole["input_top_logprobs"][1:]]
