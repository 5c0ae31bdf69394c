"""The counter-RNG sampler in the engine (SGL_DIFFUSION_RNG=counter): a request's draws depend on its seed alone,
and a canvas-only round runs all its steps inside the canvas step, sampler included, with the tokens of the
step-by-step rounds; on the trained checkpoint, whose canvases stop early like the real model's."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

from sgl_diffusion.entrypoints import tiny_tasks
from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_tokenizer
from sgl_diffusion.env import SamplerEnv
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
from sgl_diffusion.runtime.canvas_step import CanvasStep
from sgl_diffusion.runtime.offline import OfflineEngine
from sgl_diffusion.runtime.runner import CanvasState, DiffusionRunner, make_generator
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams

MAX_NEW = 64
EXAMPLES = tiny_tasks.eval_examples(8, seed=99)


@pytest.fixture(scope="module")
def trained(trained_checkpoint_dir):
    """(our model, generation config, prompts) on the trained checkpoint, float32."""
    model = DiffusionGemmaForBlockDiffusion(AutoConfig.from_pretrained(trained_checkpoint_dir)).eval()
    model.load_weights(load_file(trained_checkpoint_dir / "model.safetensors").items())
    gen = DiffusionGemmaGenerationConfig.from_pretrained(trained_checkpoint_dir)
    tok = build_tiny_tokenizer()
    return model, gen, [tiny_tasks.prompt_ids(tok, e) for e in EXAMPLES]


def counter_engine(trained, canvas_step=None, steps_per_round=1):
    model, gen, _ = trained
    return OfflineEngine(model, eos_token_ids=gen.eos_token_id, canvas_step=canvas_step, rng="counter",
                         steps_per_round=steps_per_round)  # fmt: skip


def generate(trained, indices, canvas_step=None, steps_per_round=1, engine=None):
    """Counter-RNG generations of the prompts at ``indices`` batched together: (tokens, steps of each canvas in
    commit order, the canvases of each round run inside the canvas step)."""
    model, gen, prompts = trained
    engine = engine or counter_engine(trained, canvas_step, steps_per_round)
    defaults = DiffusionDefaults.from_generation_config(json.loads(gen.to_json_string()))
    steps, sink = {}, engine.scheduler.sink

    def recording_sink(req, canvas):
        steps.setdefault(id(req), []).append(int(req.state.steps_taken))
        return sink(req, canvas)

    engine.scheduler.sink = recording_sink
    graphed = []
    step = engine.scheduler.runner.canvas_step
    if step is not None:
        rounds = step.rounds
        step.rounds = lambda *args, **kwargs: graphed.append(len(args[3])) or rounds(*args, **kwargs)
    cfg = model.cfg
    reqs = [DiffusionRequest(prompts[i], DiffusionParams.from_request(
        {"seed": 700 + i}, defaults, vocab_size=cfg.vocab_size, canvas_length=cfg.canvas_length), MAX_NEW)
        for i in indices]  # fmt: skip
    out = engine.generate(reqs)
    return out, [steps[id(r)] for r in reqs], graphed


def test_a_request_draws_the_same_alone_or_batched(trained):
    """The point of counter draws: a seeded request's tokens do not depend on what shares its batch."""
    together, _, _ = generate(trained, range(8))
    assert [generate(trained, [i])[0][0] for i in (0, 3, 6)] == [together[0], together[3], together[6]]


def test_graphed_rounds_give_the_step_by_step_tokens(trained):
    """Three steps per round inside the canvas step (sampler in the step, rows frozen on the step they finish) give
    the tokens and the per-canvas step counts of three rounds of one step each through the runner."""
    want, want_steps, _ = generate(trained, range(8), steps_per_round=3)
    got, got_steps, graphed = generate(trained, range(8), canvas_step="eager", steps_per_round=3)
    assert graphed  # canvas-only rounds ran inside the step
    assert got == want and got_steps == want_steps
    right = sum(tiny_tasks.score_ids(build_tiny_tokenizer(), e, o) for e, o in zip(EXAMPLES, got))
    assert right >= 6, right  # a different draw than transformers', as right


def test_compiled_rounds_give_the_eager_rounds_tokens(trained):
    """The whole round (forward, LM head, counter sampler, next input) compiled with fullgraph=True: after the
    warm-up (one canvas, and a batch), serving five requests at once (batches of 1 to 5 canvases) compiles no more
    graphs, and the tokens and step counts are the eager rounds'."""
    torch._dynamo.reset()  # graphs compiled for other models in this process count towards dynamo's recompile limit
    want, want_steps, _ = generate(trained, range(5), canvas_step="eager")
    engine = counter_engine(trained, canvas_step="compile")
    engine.scheduler.runner.canvas_step.warm_up(DiffusionParams(48, 0.1, 0.4, 0.8, 0.0, 1), "counter", 1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got, got_steps, graphed = generate(trained, range(5), engine=engine)
    assert graphed and max(graphed) > 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert got == want and got_steps == want_steps


def test_counter_step_holds_fixed_positions_and_never_draws_banned_tokens(model):
    """Rows with fixed positions or banned tokens take the eager counter step (not the graphed round): fixed
    positions keep their token, banned ids are never drawn nor chosen, and each new denoise pass gets new draws."""
    cfg = model.cfg
    c, v = cfg.canvas_length, cfg.vocab_size
    params = DiffusionParams(48, 0.1, 0.4, 0.8, 0.0, 1, seed=3)
    states = [CanvasState.first(params, make_generator(3, "cpu"), c, v, "cpu") for _ in range(2)]
    fixed = torch.arange(c) < 5
    states[0].clamp(fixed, torch.full((c,), 7))
    banned = tuple(range(0, v, 2))  # every even id
    states[1].banned = banned
    assert not states[0].plain and not states[1].plain and states[0].canvas_index == 1
    runner = DiffusionRunner(model, attn=None, rng="counter")
    logits = torch.randn(2, c, v, generator=torch.Generator().manual_seed(0)) * 4
    result = runner._counter_step(logits, states, torch.float32)
    assert (result.next_canvas[0, :5] == 7).all() and (result.argmax[0, :5] == 7).all()
    accepted = result.next_canvas[1][result.accepted[1]]  # the rest is fresh noise, over the whole vocabulary
    assert accepted.numel() and (accepted % 2 == 1).all() and (result.argmax[1] % 2 == 1).all()
    states[1].canvas_index += 1  # another pass over the same canvas: other draws
    again = runner._counter_step(logits, states, torch.float32)
    assert torch.equal(again.next_canvas[0], result.next_canvas[0])
    assert not torch.equal(again.next_canvas[1], result.next_canvas[1])
    assert states[0].next_canvas(v).canvas_index == 2


def test_rng_setting():
    assert SamplerEnv.from_environ({}).rng == "exact"
    assert SamplerEnv.from_environ({"SGL_DIFFUSION_RNG": "counter"}).rng == "counter"
    with pytest.raises(ValueError, match="SGL_DIFFUSION_RNG"):
        SamplerEnv.from_environ({"SGL_DIFFUSION_RNG": "philox"})


def test_canvas_step_counts_its_own_rounds_only(trained):
    """Exact mode never runs the sampler inside the step, even with a canvas step (transformers' draws need each
    request's own generator, in order)."""
    model, gen, prompts = trained
    engine = OfflineEngine(model, eos_token_ids=gen.eos_token_id, canvas_step="eager", steps_per_round=2)
    step: CanvasStep = engine.scheduler.runner.canvas_step
    step.rounds = lambda *args, **kwargs: pytest.fail("exact mode ran the sampler inside the step")
    params = DiffusionParams(48, 0.1, 0.4, 0.8, 0.0, 1, seed=1)
    assert engine.generate([DiffusionRequest(prompts[0], params, 8)])[0]


def test_warm_up_runs_every_graphed_round_shape(trained):
    """Warm-up compiles what serving will run: the step, and rounds of steps_per_round steps and of the steps after
    a mixed first step, for one canvas and for a batch."""
    step = counter_engine(trained, canvas_step="eager", steps_per_round=3).scheduler.runner.canvas_step
    calls, rounds = [], step.rounds
    step.rounds = lambda segments, ids, soft, states, steps, **kw: calls.append((len(states), steps)) or rounds(
        segments, ids, soft, states, steps, **kw)
    step.warm_up(DiffusionParams(48, 0.1, 0.4, 0.8, 0.0, 1), "counter", 3)
    assert sorted(calls) == [(1, 2), (1, 3), (2, 2), (2, 3)]
