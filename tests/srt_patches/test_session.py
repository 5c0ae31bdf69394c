"""The session patch: ``replace`` without a rid clears the session's nodes before sglang's own loop does."""

from inspect import Parameter
from types import SimpleNamespace

import pytest

from srt_patches import session

TARGET = session.TARGETS[0]


def _session_with_nodes():
    """A session of sglang's holding a node with a child, and a second, unfinished root."""
    from sglang.srt.session.session_controller import Session, SessionReqNode

    def req(rid, finished=True):
        return SimpleNamespace(rid=rid, finished_reason="stop" if finished else None, to_finish=None)

    s = Session(capacity_of_str_len=100, session_id="s")
    first = SessionReqNode(req("a"))
    s.req_nodes = {"a": first, "b": SessionReqNode(req("b"), parent=first), "c": SessionReqNode(req("c", False))}
    return s


def _turn(**params):
    from sglang.srt.managers.io_struct import SessionParams

    return SimpleNamespace(session_params=SessionParams(id="s", **params))


def test_installed(applied):
    assert applied.is_installed(TARGET)


def test_upstream_signature(upstream_parameters):
    """The wrapper reads the turn (the argument after the session) and passes the rest through."""
    assert [name for name, _ in upstream_parameters(TARGET)][:2] == ["self", "req"]
    assert upstream_parameters(TARGET)[2:4] == [("tokenizer", Parameter.empty), ("vocab_size", Parameter.empty)]


def test_upstream_still_fails_on_replace_without_a_rid(upstream):
    """The bug this patch exists for: remove the patch once sglang clears over a copy."""
    with pytest.raises(RuntimeError, match="dictionary changed size during iteration"):
        upstream(TARGET)(_session_with_nodes(), _turn(replace=True), None, 100)


def test_replace_without_a_rid_clears_every_node_first():
    """Every node is gone before sglang's loop runs (it then loops over nothing), and the unfinished request is
    aborted as sglang's clear does."""
    s, seen = _session_with_nodes(), []
    unfinished = s.req_nodes["c"].req
    result = session.create_req(lambda sess, req, *a: (seen.append(dict(sess.req_nodes)), "turn")[1], s,
                                _turn(replace=True), None, 100)
    assert result == "turn" and seen == [{}]
    assert unfinished.to_finish is not None


@pytest.mark.parametrize("params", [{"replace": True, "rid": "a"}, {"rid": "a"}, {}])
def test_other_turns_reach_sglang_untouched(params):
    s, seen = _session_with_nodes(), []
    session.create_req(lambda sess, req, *a: seen.append(sorted(sess.req_nodes)), s, _turn(**params), None, 100)
    assert seen == [["a", "b", "c"]]
