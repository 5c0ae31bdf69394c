"""Let a session turn with ``replace`` and no ``rid`` clear the session's history instead of ending the server.

Target: sglang.srt.session.session_controller.Session.create_req
Checked against: sglang 0.5.23
Why: for ``session_params: {"replace": true}`` without a rid, sglang clears every request node of the session while
     iterating over the dict the clearing deletes from (RuntimeError: dictionary changed size during iteration), in the
     scheduler, which ends the server. Any non-empty session did it, for every model. The nodes are cleared here
     first, over a snapshot and as sglang's clear does (unfinished requests are aborted), so the original loops
     over an empty dict and builds the turn from nothing, which is what the request means.
Remove when: sglang clears over a copy of ``req_nodes``.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

TARGETS = ("sglang.srt.session.session_controller.Session.create_req",)


def create_req(original, session, req, *args, **kwargs):
    params = req.session_params
    if not session.streaming and params.replace and params.rid is None:
        for node in list(session.req_nodes.values()):
            if node.req.rid in session.req_nodes:  # not already cleared as a child of an earlier node
                node.clear(session.req_nodes)
    return original(session, req, *args, **kwargs)


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(create_req)
