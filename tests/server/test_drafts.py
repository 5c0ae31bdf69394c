"""Provisional drafts (diffusion.stream_drafts) through the native and OpenAI streams of a real server."""

import json

import openai
import pytest
import requests

pytestmark = pytest.mark.slow

CANVAS = 32
# confidence_threshold 0: no early stop, so every canvas takes its 4 steps: drafts after steps 1, 2 and 3,
# then the canvas is committed (the next canvas's first step runs in the same forward as that commit)
DIFFUSION = {"max_denoising_steps": 4, "confidence_threshold": 0, "seed": 11}
MAX_TOKENS = 70  # 3 canvases: 32 + 32 + 6
EVERY_DRAFT = [(c, s) for c in range(3) for s in (1, 2, 3)]


def assert_drafts_in_order(seen):
    """Drafts come in (canvas, step) order. A chunk the client has not read yet is replaced by the next one
    (sglang keeps only the newest of a request's unread chunks), so a slow reader may miss some drafts."""
    assert seen and all(d in EVERY_DRAFT for d in seen) and seen == sorted(set(seen)), seen


def _events(server, body):
    resp = requests.post(f"{server.url}/generate", json=body | {"stream": True}, stream=True, timeout=120)
    assert resp.status_code == 200, resp.text
    return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith(b"data: {")]


def _body(stream_drafts):
    return {"text": "Once", "sampling_params": {"max_new_tokens": MAX_TOKENS, "ignore_eos": True,
                                                "diffusion": DIFFUSION | {"stream_drafts": stream_drafts}}}


def test_native_stream_carries_drafts_beside_unchanged_committed_output(server):
    """meta_info.diffusion_draft comes after every round of a denoising canvas; the committed ids and text are the
    same as without drafts, and drafts are cut to what the request may still produce."""
    plain = _events(server, _body(False))
    with_drafts = _events(server, _body(True))
    drafts = [e["meta_info"]["diffusion_draft"] for e in with_drafts if "diffusion_draft" in e["meta_info"]]
    assert_drafts_in_order([(d["canvas"], d["step"]) for d in drafts])
    assert all(len(d["token_ids"]) == (CANVAS if d["canvas"] < 2 else MAX_TOKENS - 2 * CANVAS) for d in drafts)
    assert all(isinstance(d["text"], str) for d in drafts)
    assert with_drafts[-1]["output_ids"] == plain[-1]["output_ids"] and with_drafts[-1]["text"] == plain[-1]["text"]
    # committed output grows by whole canvases in both streams (an unread commit may be replaced by the next
    # draft's event, which carries it too: sglang keeps only the newest unread chunk); drafts repeat it
    lengths = [len(e["output_ids"]) for e in plain]
    assert lengths == sorted(set(lengths)) and set(lengths) <= {32, 64, 70} and lengths[-1] == 70, lengths
    lengths = [len(e["output_ids"]) for e in with_drafts]
    assert lengths == sorted(lengths) and set(lengths) <= {0, 32, 64, 70} and lengths[-1] == 70, lengths
    assert all("diffusion_draft" not in e["meta_info"] for e in plain)


def test_a_held_back_draft_never_outlives_its_canvas(server):
    """With a stream_interval longer than the answer, sglang holds every chunk back until the last: the draft of a
    canvas it held back is dropped when that canvas is committed, so the final chunk carries none (it carried the
    committed canvas's last draft)."""
    body = _body(True)
    body["sampling_params"]["stream_interval"] = 1000
    events = _events(server, body)
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length" and len(events[-1]["output_ids"]) == 70
    for event in events:
        if draft := event["meta_info"].get("diffusion_draft"):
            assert event["meta_info"]["finish_reason"] is None and draft["canvas"] == len(event["output_ids"]) // 32
    assert "diffusion_draft" not in events[-1]["meta_info"]


def test_drafts_keep_every_output_logprob(server):
    """Streamed with logprobs, a request gets one logprob per output token with drafts as without, the first
    canvas's first token included (a draft sent before any commit made sglang's streamer skip it: its offset moves to
    1 for a request with no output)."""
    def final(stream_drafts):
        body = _body(stream_drafts) | {"return_logprob": True, "top_logprobs_num": 1}
        events = _events(server, body)
        assert stream_drafts == any("diffusion_draft" in e["meta_info"] for e in events)
        return events[-1]["output_ids"], events[-1]["meta_info"]

    plain_ids, plain = final(False)
    ids, meta = final(True)
    assert ids == plain_ids and len(ids) == MAX_TOKENS
    for key in ("output_token_logprobs", "output_top_logprobs"):
        assert len(meta[key]) == len(plain[key]) == MAX_TOKENS, key
    assert [token for _, token, _ in meta["output_token_logprobs"]] == ids


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")


def _openai_kwargs(route, stream_drafts):
    kwargs = dict(model="tiny", max_tokens=MAX_TOKENS,
                  extra_body={"ignore_eos": True, "diffusion": DIFFUSION | {"stream_drafts": stream_drafts}})
    return kwargs | ({"messages": [{"role": "user", "content": "Hi"}]} if route == "chat" else {"prompt": "Once"})


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_openai_stream_sends_drafts_as_choiceless_chunks(client, route):
    """Drafts arrive as chunks with no choices and a top-level diffusion_draft; the choice chunks are those of the
    same stream without drafts, as a client that ignores drafts needs."""
    api = client.chat.completions if route == "chat" else client.completions
    plain = list(api.create(stream=True, **_openai_kwargs(route, False)))
    chunks = list(api.create(stream=True, **_openai_kwargs(route, True)))
    drafts = [c.model_extra["diffusion_draft"] for c in chunks if not c.choices]
    assert_drafts_in_order([(d["canvas"], d["step"]) for d in drafts])
    assert all(d["index"] == 0 for d in drafts) and all(c.id for c in chunks if not c.choices)

    def choices(stream):
        if route == "chat":
            return [(c.choices[0].delta.content, c.choices[0].finish_reason) for c in stream if c.choices]
        return [(c.choices[0].text, c.choices[0].finish_reason) for c in stream if c.choices]

    # the same text and finish (not the same chunk boundaries: sglang keeps only the newest unread chunk)
    assert "".join(t or "" for t, _ in choices(chunks)) == "".join(t or "" for t, _ in choices(plain))
    assert [f for _, f in choices(chunks) if f] == [f for _, f in choices(plain) if f] == ["length"]
    assert all(c.choices for c in plain)


@pytest.mark.parametrize("route", ["native", "completions"])
def test_drafts_need_a_stream(server, client, route):
    """stream_drafts on a non-streamed request is a 400 that says so."""
    if route == "native":
        resp = requests.post(f"{server.url}/generate", json=_body(True), timeout=60)
        assert resp.status_code == 400 and "stream_drafts" in resp.text
    else:
        with pytest.raises(openai.BadRequestError, match="stream_drafts"):
            client.completions.create(**_openai_kwargs("completions", True))
