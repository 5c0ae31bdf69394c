"""--attention-backend on a real server on the CPU: triton under the Triton interpreter serves transformers' tokens,
flashinfer stops the launcher with a clear message."""

import subprocess
import sys

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

from tests.server.conftest import Server
from tests.server.test_generate import PROMPT_IDS, generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def triton_server(tiny_checkpoint_dir):
    srv = Server(tiny_checkpoint_dir, "--attention-backend", "triton", env={"TRITON_INTERPRET": "1"})
    yield srv
    srv.stop()


@pytest.mark.triton_interpret
def test_triton_under_the_interpreter_serves_transformers_tokens(triton_server, tiny_checkpoint_dir):
    """The server runs the Triton backend (its log says so), and one canvas with init_canvas and a near-zero
    temperature is HF generate's, token for token."""
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32).eval()
    c = hf.config.canvas_length
    init = [(7 * i + 3) % hf.config.text_config.vocab_size for i in range(c)]
    gen = DiffusionGemmaGenerationConfig.from_pretrained(tiny_checkpoint_dir)
    gen.t_min, gen.t_max, gen.max_denoising_steps, gen.max_new_tokens = 1e-4, 2e-4, 1, c
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT_IDS]), decoder_input_ids=torch.tensor([init]), generation_config=gen)
    ref = out.sequences[0, len(PROMPT_IDS) :].tolist()
    eos = [i for i, t in enumerate(ref) if t in gen.eos_token_id]
    ref = ref[: eos[0] + 1] if eos else ref
    diffusion = {"init_canvas": init, "t_min": 1e-4, "t_max": 2e-4, "max_denoising_steps": 1}
    got = generate(triton_server, input_ids=PROMPT_IDS, sampling_params={"max_new_tokens": c, "diffusion": diffusion})
    assert got["output_ids"] == ref
    with open(triton_server.log_path) as log:
        assert "sgl-diffusion: attention backend triton" in log.read()


def test_flashinfer_on_the_cpu_stops_the_launcher(tiny_checkpoint_dir):
    """The launcher exits non-zero before starting any process, naming the problem."""
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tiny_checkpoint_dir), "--device", "cpu",
         "--attention-backend", "flashinfer"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--attention-backend flashinfer needs CUDA" in proc.stderr + proc.stdout
