"""sglang's sessions (/open_session, session_params) on canvases: a turn continues from the tokens the client got,
a replace without a rid starts afresh, and malformed session_params are a 400, not the end of the server."""

import pytest

pytestmark = pytest.mark.slow

PROMPT_IDS = [2, 5, 381, 280, 300, 320, 340, 6, 280, 5, 385, 280]
PARAMS = {"max_new_tokens": 32, "diffusion": {"seed": 3, "max_denoising_steps": 2}}


def post(server, body, path="/generate"):
    resp = server.post(path, body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_turn_continues_from_the_tokens_returned_and_replace_starts_afresh(server):
    """A stop token mid-canvas ends the answer; the next turn's history is the prompt and that answer, not the whole
    canvas (before: the canvas's tokens past the stop too). A replace without a rid clears the history (before: the
    scheduler died iterating over the nodes it deleted)."""
    alone = post(server, {"input_ids": PROMPT_IDS, "sampling_params": PARAMS})["output_ids"]
    stop_at = next(k for k in range(2, len(alone)) if alone[k] not in alone[:k])
    session_id = post(server, {"capacity_of_str_len": 4096}, "/open_session")
    try:
        first = post(server, {"input_ids": PROMPT_IDS, "rid": "turn-1", "session_params": {"id": session_id},
                              "sampling_params": PARAMS | {"stop_token_ids": [alone[stop_at]]}})
        assert first["output_ids"] == alone[: stop_at + 1]
        second = post(server, {"input_ids": [5, 6], "session_params": {"id": session_id, "rid": "turn-1"},
                               "sampling_params": PARAMS | {"max_new_tokens": 4}})
        assert second["meta_info"]["prompt_tokens"] == len(PROMPT_IDS) + stop_at + 1 + 2
        fresh = post(server, {"input_ids": PROMPT_IDS, "session_params": {"id": session_id, "replace": True},
                              "sampling_params": PARAMS})
        assert fresh["meta_info"]["prompt_tokens"] == len(PROMPT_IDS) and fresh["output_ids"] == alone
    finally:
        server.post("/close_session", {"session_id": session_id})
    assert server.healthy()


def test_an_offset_before_or_into_an_image_of_the_history(server):
    """A turn whose offset cuts the history before an image drops it (sglang hands the history's images on whole);
    one that cuts into it is a 400. Before, both failed the whole round, and the requests beside them with it."""
    from tests.multimodal.media import data_url, png_bytes

    session_id = post(server, {"capacity_of_str_len": 100000}, "/open_session")
    try:
        first = post(server, {"text": "Look at this picture of a shirt: <|image|> What?", "rid": "with-image",
                              "image_data": [data_url(png_bytes(24, 24), "image/png")], "sampling_params": PARAMS,
                              "session_params": {"id": session_id}})  # fmt: skip
        history = first["meta_info"]["prompt_tokens"]  # the image's soft tokens end a few tokens before this
        before = post(server, {"text": " again", "rid": "before", "sampling_params": PARAMS,
                               "session_params": {"id": session_id, "rid": "with-image", "offset": 1}})
        assert len(before["output_ids"]) == PARAMS["max_new_tokens"]
        assert before["meta_info"]["prompt_tokens"] < 10  # one token of the history, then " again"
        into = server.post("/generate", {"text": " cut", "rid": "into", "sampling_params": PARAMS,
                                         "session_params": {"id": session_id, "rid": "with-image",
                                                            "offset": history - 12}})  # fmt: skip
        assert into.status_code == 400 and "cuts into an image" in into.text, into.text
    finally:
        server.post("/close_session", {"session_id": session_id})
    assert server.healthy()


@pytest.mark.parametrize("session_params, word", [
    ({"id": ["s"]}, "session_params.id"),
    ({"id": "s", "rid": [1]}, "session_params.rid"),
    ({"id": "s", "offset": 2.5}, "session_params.offset"),
])  # fmt: skip
def test_malformed_session_params_are_400_and_the_server_lives(server, session_params, word):
    """Each of these ended the scheduler (a list as a dict key, a float as a slice bound)."""
    resp = server.post("/generate", {"input_ids": PROMPT_IDS, "session_params": session_params,
                                     "sampling_params": {"max_new_tokens": 4}})
    assert resp.status_code == 400 and word in resp.text, resp.text
    assert server.healthy()
