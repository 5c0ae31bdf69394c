"""/metrics carries the canvas engine's figures."""

import re
import time

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
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens


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


def test_sglang_scheduler_metrics_count_the_rounds(server):
    """sglang's own scheduler figures follow the canvas rounds: /metrics' realtime token counters (prompt tokens
    computed and cached, generated tokens), the "Prefill batch" line of each new prompt, and a "Decode
    batch" line every 40 rounds (--decode-log-interval) with the tokens committed since the last one, and a decode
    pass per round."""
    with open(server.log_path) as log:
        log.seek(0, 2)
        before, offset = requests.get(f"{server.url}/metrics", timeout=30).text, log.tell()
    prompt = [7, 19, 23, 5, 11, 42, 17, 3, 29, 31, 8]
    # three 20-step canvases: 60-odd rounds, so one "Decode batch" line counts a committed canvas whatever the count
    out = server.post("/generate", {"input_ids": prompt, "sampling_params": {
        "max_new_tokens": 96, "ignore_eos": True, "diffusion": {"max_denoising_steps": 20, "seed": 3}}}).json()
    after = requests.get(f"{server.url}/metrics", timeout=30).text
    cached, generated = out["meta_info"]["cached_tokens"], len(out["output_ids"])
    assert generated == 96

    def delta(mode):
        name = "sglang:realtime_tokens_total"
        pick = lambda text: sum(float(v) for v in re.findall(  # noqa: E731
            rf'^{name}\{{[^}}]*mode="{mode}"[^}}]*\}} ([0-9.e+-]+)$', text, re.M))
        return pick(after) - pick(before)

    assert delta("decode") == generated
    assert delta("prefill_compute") == len(prompt) - cached
    assert delta("prefill_cache") == cached
    # every round counts as a decode pass (sglang counts its decode batches by graph mode): 60 denoise steps at least
    passes = metric_where(after, "sglang:cuda_graph_passes_total", mode="decode_none") - metric_where(
        before, "sglang:cuda_graph_passes_total", mode="decode_none")
    assert passes >= 60
    with open(server.log_path) as log:
        log.seek(offset)
        lines = log.read().splitlines()
    assert any(f"Prefill batch, #new-seq: 1, #new-token: {len(prompt) - cached}, #cached-token: {cached}," in line
               for line in lines)
    decode = [line for line in lines if "Decode batch, #running-req: 1," in line]
    assert decode and any(float(re.search(r"gen throughput \(token/s\): ([0-9.]+)", line)[1]) > 0 for line in decode)


def test_each_request_feeds_sglang_stage_histograms(server):
    """The stages sglang's batch loop stamps on a request's time_stats are stamped by the canvas rounds too: one queue
    time (sglang:queue_time_seconds) and one prefill forward in sglang:per_stage_req_latency_seconds per request."""
    before = requests.get(f"{server.url}/metrics", timeout=30).text
    for prompt in ([9, 8, 7, 6, 5], list(range(40, 300))):
        out = server.post("/generate", {"input_ids": prompt, "sampling_params": {
            "max_new_tokens": 8, "diffusion": {"max_denoising_steps": 2}}})
        assert out.status_code == 200
    after = requests.get(f"{server.url}/metrics", timeout=30).text

    def stage(text, name):
        return metric_where(text, "sglang:per_stage_req_latency_seconds_count", stage=name)

    assert metric(after, "sglang:queue_time_seconds_count") - metric(before, "sglang:queue_time_seconds_count") == 2
    assert stage(after, "prefill_forward") - stage(before, "prefill_forward") == 2


def metric_where(text: str, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    values = []
    for found, value in re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+-]+)$", text, re.M):
        if all(f'{k}="{v}"' in found for k, v in labels.items()):
            values.append(float(value))
    return sum(values)


def test_kv_events_announce_prompts_while_the_server_is_busy(server):
    """With --kv-events-config (what a cache-aware router subscribes to), the blocks a prompt leaves in the radix
    cache are published as the round that cached them ends, also while other canvases keep the server from ever
    idling (sglang publishes from its batch reports, and when idle). A long request runs beside the prompts and is
    aborted once one of them is announced: had the announcement waited for an idle server, it would have ended by
    length first. A SUB socket only gets what is published after it has joined, so new prompts are sent until one
    is announced."""
    import concurrent.futures

    import msgspec
    import zmq
    from sglang.srt.disaggregation.kv_events import BlockStored, KVEventBatch

    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(server.kv_events)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    long_body = {"rid": "busy-while-announcing", "input_ids": [5, 6, 7], "sampling_params": {
        "max_new_tokens": 3000, "ignore_eos": True, "diffusion": {"max_denoising_steps": 48}}}  # ~4,600 rounds
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(server.post, "/generate", long_body, 600)
        try:
            announced = False
            for attempt in range(10):
                prompt = [attempt + 70, 61, 62, 63, 64, 65]  # no prefix in common: each is announced whole
                assert server.post("/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": 0}}).ok
                stored, deadline = [], time.monotonic() + 5  # then the next prompt (the busy request never goes quiet)
                while not announced and (left := deadline - time.monotonic()) > 0 and sub.poll(int(left * 1000) + 1):
                    batch = decoder.decode(sub.recv_multipart()[-1])
                    stored += [t for e in batch.events if isinstance(e, BlockStored) for t in e.token_ids]
                    announced = _contains(stored, prompt[:-1])  # its last token's KV is written by the next forward
                if announced:
                    break
        finally:
            requests.post(f"{server.url}/abort_request", json={"rid": long_body["rid"]}, timeout=30)
            sub.close(linger=0)
        finish = long.result().json()["meta_info"]["finish_reason"]
    assert announced, "no KV event announced a prompt"
    assert finish["type"] == "abort", finish


def _contains(tokens: list[int], run: list[int]) -> bool:
    return any(tokens[i : i + len(run)] == run for i in range(len(tokens) - len(run) + 1))
