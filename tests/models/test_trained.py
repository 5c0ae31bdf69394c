"""The trained tiny checkpoint, where random weights are a poor referee: it converges like the real model, so whole
generations at the default schedule must match transformers token for token, canvases must stop early, and the
answers must be right."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

from sgl_diffusion.entrypoints import tiny_tasks
from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_tokenizer
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion as Ours
from sgl_diffusion.runtime.offline import OfflineEngine
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams

MAX_NEW = 64  # two canvases: every answer is 55 characters + <eos>
EXAMPLES = tiny_tasks.eval_examples(16, seed=77)  # 4 per task


@pytest.fixture(scope="module")
def trained(trained_checkpoint_dir):
    """(transformers' model, ours, generation config, tokenizer) on the trained checkpoint, float32."""
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(trained_checkpoint_dir, dtype=torch.float32).eval()
    ours = Ours(AutoConfig.from_pretrained(trained_checkpoint_dir)).eval()
    ours.load_weights(load_file(trained_checkpoint_dir / "model.safetensors").items())
    gen = DiffusionGemmaGenerationConfig.from_pretrained(trained_checkpoint_dir)
    gen.max_new_tokens = MAX_NEW
    return hf, ours, gen, build_tiny_tokenizer()


def hf_generate(hf, gen, prompt, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        new = hf.generate(torch.tensor([prompt]), generation_config=gen).sequences[0, len(prompt) :].tolist()
    eos = [i for i, t in enumerate(new) if t in gen.eos_token_id]
    return new[: eos[0] + 1] if eos else new  # HF pads after the first EOS; we stop there


def offline_generate(ours, gen, prompts, seeds, steps_per_round=1):
    """Our engine on every prompt at once (continuous batching), default sampler settings: (tokens, steps of each
    committed canvas)."""
    defaults = DiffusionDefaults.from_generation_config(json.loads(gen.to_json_string()))
    engine = OfflineEngine(ours, eos_token_ids=gen.eos_token_id, steps_per_round=steps_per_round)
    steps, sink = [], engine.scheduler.sink

    def recording_sink(req, canvas):
        steps.append(int(req.state.steps_taken))
        return sink(req, canvas)

    engine.scheduler.sink = recording_sink
    cfg = ours.cfg
    reqs = [DiffusionRequest(p, DiffusionParams.from_request({"seed": s}, defaults, vocab_size=cfg.vocab_size,
                                                             canvas_length=cfg.canvas_length), MAX_NEW)
            for p, s in zip(prompts, seeds)]  # fmt: skip
    return engine.generate(reqs), steps


def prompts_of(tok, examples):
    return [tiny_tasks.prompt_ids(tok, e) for e in examples]


@pytest.mark.parametrize("torch_threads", [1, 2], indirect=True)
def test_whole_generations_match_transformers_at_the_default_schedule(trained, torch_threads):
    """Multi-canvas generations with adaptive stopping, seeded, 8 requests batched together on our side and one at
    a time on transformers' side: the same tokens, at 1 and 2 threads (a confident model does not amplify the
    rounding that batching, SDPA and thread count change)."""
    hf, ours, gen, tok = trained
    prompts, seeds = prompts_of(tok, EXAMPLES[:8]), list(range(500, 508))
    got, _ = offline_generate(ours, gen, prompts, seeds)
    ref = [hf_generate(hf, gen, p, s) for p, s in zip(prompts, seeds)]
    assert got == ref
    assert all(len(r) > ours.cfg.canvas_length for r in ref)  # every one spans two canvases


@pytest.mark.parametrize("steps_per_round", [2, 3])
def test_several_steps_per_round_keep_transformers_tokens(trained, steps_per_round):
    """--num-continuous-decode-steps: canvases stopping after a few steps finish mid-round and are frozen until it
    ends, and their requests' generators drew for them meanwhile; set back, every request keeps transformers' tokens
    and each canvas its step count."""
    hf, ours, gen, tok = trained
    prompts, seeds = prompts_of(tok, EXAMPLES[:8]), list(range(500, 508))
    got, steps = offline_generate(ours, gen, prompts, seeds, steps_per_round)
    _, one_step_rounds = offline_generate(ours, gen, prompts, seeds)
    assert got == [hf_generate(hf, gen, p, s) for p, s in zip(prompts, seeds)]
    assert sorted(steps) == sorted(one_step_rounds)  # (commit order may differ)
    assert any(s % steps_per_round for s in steps)  # some canvases did finish mid-round


def test_canvases_stop_early_and_commit_several_tokens_per_forward(trained):
    """Adaptive stopping stops: every canvas well under the 48-step budget, and tokens per forward (committed
    tokens / (denoise steps + one commit per canvas)) far above 1."""
    _, ours, gen, tok = trained
    out, steps = offline_generate(ours, gen, prompts_of(tok, EXAMPLES), range(16))
    assert len(steps) == 2 * len(EXAMPLES)  # two canvases each
    assert max(steps) < gen.max_denoising_steps // 2
    assert sum(steps) / len(steps) <= 8
    assert sum(len(o) for o in out) / (sum(steps) + len(steps)) > 4


def test_answers_are_right(trained):
    """Copies, reversals, sorted words and sums come out right (a threshold, not exact tokens: retrained weights
    differ across CPUs)."""
    _, ours, gen, tok = trained
    out, _ = offline_generate(ours, gen, prompts_of(tok, EXAMPLES), range(100, 116))
    right = {task: 0 for task in tiny_tasks.TASKS}
    for example, tokens in zip(EXAMPLES, out):
        right[example.task] += tiny_tasks.score_ids(tok, example, tokens)
    assert sum(right.values()) >= 14, right
    assert min(right.values()) >= 3, right  # no task is left out
