"""A server started with --skip-tokenizer-init takes input_ids and answers output_ids. It serves a checkpoint whose
dense and expert widths sglang pads on CPU (48 and 24, not multiples of 32), which answers what transformers'
``generate`` answers. (One server for both: each server start costs 30-40 s of the suite.)"""

import json

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_checkpoint
from tests.server.conftest import Server

pytestmark = pytest.mark.slow

PROMPT_IDS = [2, 5, 381, 280, 300, 320, 340, 6, 280, 5, 385, 280, 150, 151, 152, 153, 154, 155, 156]


@pytest.fixture(scope="module")
def unaligned_dir(tmp_path_factory):
    out = build_tiny_checkpoint(tmp_path_factory.mktemp("unaligned"), preset="unaligned")
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["intermediate_size"] % 32 and text["moe_intermediate_size"] % 32
    return out


@pytest.fixture(scope="module")
def ids_server(unaligned_dir):
    srv = Server(unaligned_dir, "--skip-tokenizer-init")
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


def test_padded_checkpoint_generates_transformers_tokens(ids_server, unaligned_dir):
    """Two canvases at a near-zero temperature, same seed: the server's tokens are HF generate's."""
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(unaligned_dir, dtype=torch.float32).eval()
    canvas_length = hf.config.canvas_length
    gen = DiffusionGemmaGenerationConfig.from_pretrained(unaligned_dir)
    gen.t_min, gen.t_max, gen.max_denoising_steps, gen.max_new_tokens = 1e-4, 2e-4, 2, 2 * canvas_length
    gen.eos_token_id = [hf.config.text_config.vocab_size + 1]  # never: both canvases are committed
    torch.manual_seed(7)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT_IDS]), generation_config=gen).sequences[0, len(PROMPT_IDS) :].tolist()

    diffusion = {"seed": 7, "t_min": 1e-4, "t_max": 2e-4, "max_denoising_steps": 2}
    resp = ids_server.post("/generate", {"input_ids": PROMPT_IDS, "sampling_params": {
        "max_new_tokens": 2 * canvas_length, "ignore_eos": True, "diffusion": diffusion}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["output_ids"] == ref
