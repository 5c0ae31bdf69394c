"""End to end on the trained tiny checkpoint: right answers through the server, as right as transformers' own,
the same tokens as transformers at the default schedule, canvases that stop early, several tokens per forward."""

import concurrent.futures
import json
import re
from pathlib import Path

import openai
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

from sgl_diffusion.entrypoints import tiny_tasks
from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_tokenizer
from tests.server.conftest import Server

pytestmark = pytest.mark.slow

MAX_NEW = 64
EXAMPLES = tiny_tasks.eval_examples(16, seed=4321)


@pytest.fixture(scope="module")
def trained_server(trained_checkpoint_dir):
    """One server on the trained checkpoint for every test here (each server start costs 30-40 s), started with
    ``--enable-torch-compile``: every test here then checks the compiled canvas step, and the eager one is what
    every other server test runs."""
    srv = Server(trained_checkpoint_dir, "--enable-torch-compile", env={"TORCH_LOGS": "recompiles"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(trained_checkpoint_dir):
    """transformers' generate on the same prompts and seeds, one at a time: (outputs, tokenizer)."""
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(trained_checkpoint_dir, dtype=torch.float32).eval()
    gen = DiffusionGemmaGenerationConfig.from_pretrained(trained_checkpoint_dir)
    gen.max_new_tokens = MAX_NEW
    tok = build_tiny_tokenizer()
    outs = []
    for i, example in enumerate(EXAMPLES):
        prompt = tiny_tasks.prompt_ids(tok, example)
        torch.manual_seed(i)
        with torch.no_grad():
            new = hf.generate(torch.tensor([prompt]), generation_config=gen).sequences[0, len(prompt) :].tolist()
        eos = [j for j, t in enumerate(new) if t in gen.eos_token_id]
        outs.append(new[: eos[0] + 1] if eos else new)
    return outs, tok


def generate(server, prompt, seed):
    resp = server.post("/generate", {"input_ids": prompt,
                                     "sampling_params": {"max_new_tokens": MAX_NEW, "diffusion": {"seed": seed}}})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_answers_through_the_server_are_right_and_match_transformers(trained_server, reference):
    """16 requests sent together, default sampler settings: at least as many right answers as transformers'
    generate on the same prompts, 14 of 16 at least, and the same tokens (same seeds)."""
    ref, tok = reference
    prompts = [tiny_tasks.prompt_ids(tok, e) for e in EXAMPLES]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda i: generate(trained_server, prompts[i], i), range(len(prompts))))
    got = [o["output_ids"] for o in outs]
    right_ours = sum(tiny_tasks.score_ids(tok, e, g) for e, g in zip(EXAMPLES, got))
    right_hf = sum(tiny_tasks.score_ids(tok, e, r) for e, r in zip(EXAMPLES, ref))
    assert right_ours >= max(right_hf, 14), (right_ours, right_hf)
    assert got == ref
    assert all(o["meta_info"]["finish_reason"]["type"] == "stop" for o in outs)


def test_canvases_stop_early_with_several_tokens_per_forward(trained_server, reference):
    """meta_info.diffusion_steps: each canvas takes a few of its 48 steps; a request commits several tokens per
    model forward (denoise steps + one commit per canvas)."""
    _, tok = reference
    out = generate(trained_server, tiny_tasks.prompt_ids(tok, EXAMPLES[1]), seed=3)
    steps = [s for s in out["meta_info"]["diffusion_steps"] if s]
    assert len(steps) == 2 and max(steps) < 24
    assert len(out["output_ids"]) / (sum(steps) + len(steps)) > 4


def test_chat_usage_reports_the_early_stop(trained_server, reference):
    """The OpenAI completions route reports the canvases and the (few) denoise steps in usage.diffusion."""
    client = openai.OpenAI(base_url=f"{trained_server.url}/v1", api_key="none")
    example = next(e for e in EXAMPLES if e.task == "sort")
    out = client.completions.create(model="tiny", prompt="<bos>" + example.prompt, max_tokens=MAX_NEW,
                                    extra_body={"diffusion": {"seed": 5}})
    usage = out.usage.model_extra["diffusion"]
    assert usage["canvases"] == 2 and usage["denoise_steps"] < 2 * 24
    assert tiny_tasks.score(example, out.choices[0].text)


def test_the_readme_example_gets_the_answer_it_shows(trained_server):
    """README's curl on the trained checkpoint: its body through the server gives the text the README shows (seeded
    here; the model is confident on in-format prompts), which is the task's right answer."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    shown = re.search(r"""--model-path /tmp/dg-trained &\n(?:until .*\n)?curl .*? -d '(\{.*?\})'\s+# \{"text": "(.*?)", \.\.\.\}""", readme)
    assert shown, "README's trained example changed shape"
    body, answer = json.loads(shown.group(1)), shown.group(2)
    task, payload = body["text"].removeprefix("<bos>").removesuffix("\n").split(": ")
    assert answer == tiny_tasks.solve(task, payload)
    for seed in range(3):
        out = trained_server.post("/generate", body | {"sampling_params": {"diffusion": {"seed": seed}}})
        assert out.status_code == 200, out.text
        assert out.json()["text"] == answer


def test_torch_compile_server_keeps_transformers_tokens(trained_server, reference):
    """``--enable-torch-compile`` on the CPU: the canvas step is compiled with fullgraph=True at start-up (for one
    canvas and for a batch, as the event loop runs, so serving compiles nothing more: not for this module's earlier
    tests' batches either), and seeded requests, alone and together, still give transformers' tokens."""
    ref, tok = reference
    assert generate(trained_server, tiny_tasks.prompt_ids(tok, EXAMPLES[0]), 0)["output_ids"] == ref[0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: generate(trained_server, tiny_tasks.prompt_ids(tok, EXAMPLES[i]), i),
                             range(1, 5)))  # fmt: skip
    assert [o["output_ids"] for o in outs] == ref[1:5]
    with open(trained_server.log_path) as log:
        text = log.read()
    assert "canvas-only rounds run the graph-ready canvas step (compile)" in text
    after_warm_up = text.split("canvas step warmed up in", 1)[1]
    assert "Recompiling" not in after_warm_up
