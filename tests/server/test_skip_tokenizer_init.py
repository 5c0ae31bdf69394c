"""A server started with --skip-tokenizer-init takes input_ids and answers output_ids."""

import pytest

from tests.server.conftest import Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ids_server(tiny_checkpoint_dir):
    srv = Server(tiny_checkpoint_dir, "--skip-tokenizer-init")
    yield srv
    srv.stop()


def test_input_ids_in_output_ids_out(ids_server):
    """/generate with input_ids returns token ids only, seeded like any other request."""
    body = {"input_ids": [2, 5, 381, 280, 300], "sampling_params": {"max_new_tokens": 40, "ignore_eos": True,
                                                                     "diffusion": {"seed": 9, "max_denoising_steps": 2}}}
    first = ids_server.post("/generate", body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert len(out["output_ids"]) == 40 and not out.get("text")
    assert ids_server.post("/generate", body).json()["output_ids"] == out["output_ids"]


def test_bad_params_still_400(ids_server):
    """Validation does not depend on the tokenizer."""
    body = {"input_ids": [2, 5], "sampling_params": {"max_new_tokens": 4, "diffusion": {"stability_threshold": -1}}}
    resp = ids_server.post("/generate", body)
    assert resp.status_code == 400 and "stability_threshold" in resp.text
