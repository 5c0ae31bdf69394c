"""Let a session turn with ``replace`` and no ``rid`` clear the session's history instead of ending the server, and
refuse a turn that reuses the rid of one the session holds.

Target: sglang.srt.session.session_controller.Session.create_req
Checked against: sglang 0.5.23
Why: for ``session_params: {"replace": true}`` without a rid, sglang clears every request node of the session while
     iterating over the dict the clearing deletes from (RuntimeError: dictionary changed size during iteration), in the
     scheduler, which ends the server. Any non-empty session did it, for every model. The nodes are cleared here
     first, over a snapshot and as sglang's clear does (unfinished requests are aborted), so the original loops
     over an empty dict and builds the turn from nothing, which is what the request means.
     A turn may reuse the rid of an earlier, finished one; sglang then keeps two nodes of one rid (the dict holds the
     newer), and the next clear deletes that rid twice (KeyError in the scheduler: the server ended). Such a turn is
     refused (a 400), as sglang refuses one that names no node of the session.
Remove when: sglang clears over a copy of ``req_nodes`` and refuses a turn whose rid the session holds.
"""

from __future__ import annotations

from http import HTTPStatus

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

TARGETS = ("sglang.srt.session.session_controller.Session.create_req",)
_NO_SUCH_TURN = "\0sgl-diffusion: no such turn"  # a rid no session holds


def create_req(original, session, req, *args, **kwargs):
    params = req.session_params
    if not session.streaming and params.replace and params.rid is None:
        for node in list(session.req_nodes.values()):
            if node.req.rid in session.req_nodes:  # not already cleared as a child of an earlier node
                node.clear(session.req_nodes)
    if session.streaming or req.rid not in session.req_nodes:
        return original(session, req, *args, **kwargs)
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    # NOTE: naming a turn the session does not hold makes sglang abort the turn without adding a node
    asked, params.rid = params.rid, _NO_SUCH_TURN
    try:
        turn = original(session, req, *args, **kwargs)
    finally:
        params.rid = asked
    turn.to_finish = FINISH_ABORT(f"session_params: the session already has a turn with rid {req.rid!r}; give each "
                                  "turn a rid of its own", HTTPStatus.BAD_REQUEST, "BadRequestError")
    return turn


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(create_req)
