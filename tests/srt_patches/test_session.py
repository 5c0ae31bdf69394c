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


def _turn(own_rid="new", **params):
    from sglang.srt.managers.io_struct import SessionParams

    return SimpleNamespace(rid=own_rid, session_params=SessionParams(id="s", **params))


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
def test_a_turn_reusing_a_rid_the_session_holds_is_refused(params):
    """A turn whose own rid is a node of the session (an earlier turn's, finished, so sglang's rid check let it in)
    is aborted with a 400 and adds no node: a second node of one rid made the next clear delete it twice (KeyError),
    which ended the server. sglang aborts the turn itself (it is sent naming no turn) and nothing is cleared."""
    s, seen = _session_with_nodes(), []
    before = dict(s.req_nodes)

    def sglang(sess, req, *args):
        seen.append(req.session_params.rid)
        assert req.session_params.rid not in sess.req_nodes  # so sglang aborts the turn without adding it
        return SimpleNamespace(rid=req.rid, to_finish=None)

    turn = _turn(own_rid="b", **params)
    got = session.create_req(sglang, s, turn, None, 100)
    assert len(seen) == 1 and s.req_nodes == before and turn.session_params.rid == params.get("rid")
    assert got.to_finish.status_code == 400 and "already has a turn with rid 'b'" in got.to_finish.message
    # replace without a rid clears the session first: the rid is free again, and the turn goes through
    seen.clear()
    session.create_req(lambda sess, req, *a: seen.append(sorted(sess.req_nodes)), s, _turn(own_rid="b", replace=True),
                       None, 100)
    assert seen == [[]]


@pytest.mark.parametrize("params", [{"replace": True, "rid": "a"}, {"rid": "a"}, {}])
def test_other_turns_reach_sglang_untouched(params):
    s, seen = _session_with_nodes(), []
    session.create_req(lambda sess, req, *a: seen.append(sorted(sess.req_nodes)), s, _turn(**params), None, 100)
    assert seen == [["a", "b", "c"]]
