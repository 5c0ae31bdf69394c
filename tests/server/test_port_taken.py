"""Starting a test server when another process binds its port between our pick and the server's own bind (CI met
it): the start is retried on a new port, never failed, and never mistaken for the server by whatever holds the port."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.server import conftest
from tests.server.conftest import Server

pytestmark = pytest.mark.slow


class AnswersEverything(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_taken_port_is_retried_on_a_new_one(tiny_checkpoint_dir, monkeypatch):
    # the port's holder answers /health with 200: only the server's own listening socket tells them apart
    holder = ThreadingHTTPServer(("127.0.0.1", 0), AnswersEverything)
    threading.Thread(target=holder.serve_forever, daemon=True).start()
    taken = holder.server_address[1]
    picks = iter([taken])
    pick = conftest._free_port
    monkeypatch.setattr(conftest, "_free_port", lambda: next(picks, None) or pick())
    try:
        srv = Server(tiny_checkpoint_dir)
        try:
            assert srv.port != taken
            assert requests.get(f"{srv.url}/server_info", timeout=10).json()["port"] == srv.port
            body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "diffusion": {"seed": 1}}}
            assert len(srv.post("/generate", body).json()["output_ids"]) == 4
        finally:
            srv.stop()
    finally:
        holder.shutdown()
        holder.server_close()
