"""One denoise round (model forward, LM head, sampler) on B canvases, its sampler step alone, and transformers' own
step, on a checkpoint.

    .venv/bin/python bench/bench_round.py --model-dir DIR [--batches 1,8] [--rounds 40] [--threads 1]
    PYTHONPATH=<another checkout> .venv/bin/python bench/bench_round.py --model-dir DIR   # the same, older code

The before/after figures of bench/RESULTS.md: run it on two versions of the code, alternately, on one machine.
Requests are past their prefill and never stop (confidence threshold 0), so every timed round is a denoise-only
round of B canvases after a 48-token prompt; transformers' ``generate`` runs one canvas of --rounds steps (no early
stop) and is timed per step (its prefill included, spread over the steps). The sampler line times
``entropy_bound.prepare`` + ``step`` on B canvases of fixed logits (seeded generators). --sections splits one
more run of rounds into its parts (cpu ms per round). Each figure is the median over --repeats
runs of [min..max], as wall time and as this thread's CPU time (steadier when other processes share the cores;
with --threads 1 the whole forward runs on this thread).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NO_EARLY_STOP, load_average  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sections", action="store_true", help="also time the parts of a round")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import sgl_diffusion

    print(f"code {Path(sgl_diffusion.__file__).parent} | threads {args.threads} | {load_average()}")
    model = load(args.model_dir)
    for b in [int(x) for x in args.batches.split(",")]:
        time_rounds(model, b, 2)  # warm-up
        runs = [time_rounds(model, b, args.rounds) for _ in range(args.repeats)]
        print(f"ours batch {b}: {fmt([w for w, _ in runs])} ms wall, {fmt([c for _, c in runs])} ms cpu per round")
        if args.sections:
            parts = time_sections(model, b, args.rounds)
            print(f"ours batch {b} sections (cpu ms per round): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
        runs = [time_sampler(model.cfg, b, args.rounds) for _ in range(args.repeats)]
        print(f"sampler batch {b}: {fmt([w for w, _ in runs])} ms wall, {fmt([c for _, c in runs])} ms cpu per step")
    time_hf(args.model_dir, args.rounds)  # warm-up
    runs = [time_hf(args.model_dir, args.rounds) for _ in range(args.repeats)]
    print(f"transformers batch 1: {fmt([w for w, _ in runs])} ms wall, {fmt([c for _, c in runs])} ms cpu per step")
    print(f"done | {load_average()}")


def fmt(values) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}..{max(values):.2f}]"


def load(model_dir):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion(AutoConfig.from_pretrained(model_dir)).eval()
    model.load_weights(load_file(Path(model_dir) / "model.safetensors").items())
    return model


def prompt(cfg, i: int) -> list[int]:
    return [2] + [24 + (7 * j + 13 * i) % (cfg.vocab_size - 24) for j in range(47)]  # ordinary tokens, no image ids


def engine_past_prefill(model, batch: int, rounds: int):
    from sgl_diffusion.runtime.offline import OfflineEngine
    from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
    from sgl_diffusion.sampling.params import DiffusionParams

    engine = OfflineEngine(model)
    for i in range(batch):
        params = DiffusionParams(4 * rounds, 0.1, 0.4, 0.8, 0.0, 1, seed=i)  # never stops within the run
        engine.scheduler.add(DiffusionRequest(prompt(model.cfg, i), params, 10**6))
    engine.scheduler.step()  # prefills + first steps
    engine.scheduler.step()
    return engine


def time_rounds(model, batch: int, rounds: int) -> tuple[float, float]:
    with torch.inference_mode():
        engine = engine_past_prefill(model, batch, rounds)
        w0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(rounds):
            engine.scheduler.step()
        return (time.perf_counter() - w0) / rounds * 1e3, (time.thread_time() - c0) / rounds * 1e3


def time_sections(model, batch: int, rounds: int) -> dict[str, float]:
    """CPU ms per round (this thread's: steadier than wall time on a shared machine) of each part: the policy's
    planning, batch building and result handling, the model forward, and the runner's sampler tile (LM head, sampler
    step, self-conditioning embedding, state updates)."""
    from sgl_diffusion.runtime import runner, scheduler_policy
    from sgl_diffusion.sampling import entropy_bound as eb

    spent: dict[str, float] = {}
    patched = [(scheduler_policy.CanvasScheduler, "_plan", "plan"),
               (scheduler_policy.CanvasScheduler, "_build_batch", "build batch"),
               (type(model), "forward", "model forward"), (runner.DiffusionRunner, "_sample_tile", "sampler tile"),
               (type(model), "logits", "(LM head)"), (eb, "step", "(sampler step)"), (eb, "prepare", "(prepare)"),
               (type(model), "soft_embed", "(soft embed)"), (scheduler_policy.CanvasScheduler, "_apply", "apply")]  # fmt: skip
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]

    def timing(fn, key):
        def wrapper(*a, **k):
            t0 = time.thread_time()
            out = fn(*a, **k)
            spent[key] = spent.get(key, 0.0) + time.thread_time() - t0
            return out

        return wrapper

    with torch.inference_mode():
        engine = engine_past_prefill(model, batch, rounds)
        for (owner, name, key), (_, _, fn) in zip(patched, originals):
            setattr(owner, name, timing(fn, key))
        try:
            w0 = time.thread_time()
            for _ in range(rounds):
                engine.scheduler.step()
            total = time.thread_time() - w0
        finally:
            for owner, name, fn in originals:
                setattr(owner, name, fn)
    return {"round": total * 1e3 / rounds} | {k: v * 1e3 / rounds for k, v in spent.items()}


def time_sampler(cfg, batch: int, steps: int) -> tuple[float, float]:
    from sgl_diffusion.sampling import entropy_bound as eb
    from sgl_diffusion.sampling.params import DiffusionParams

    c = cfg.canvas_length
    logits = 30 * torch.tanh(torch.randn(batch, c, cfg.vocab_size, generator=torch.Generator().manual_seed(0)) / 6)
    rows = [eb.SamplerRow(DiffusionParams(48, 0.1, 0.4, 0.8, 0.0, 1, seed=i), 24, eb.new_history(1, c))
            for i in range(batch)]  # fmt: skip
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    eb.step(logits, eb.prepare(rows), gens)  # warm-up
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        eb.step(logits, eb.prepare(rows), gens)
    return (time.perf_counter() - w0) / steps * 1e3, (time.thread_time() - c0) / steps * 1e3


def time_hf(model_dir, rounds: int, _cache={}) -> tuple[float, float]:
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    if "model" not in _cache:
        _cache["model"] = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf = _cache["model"]
    gen = DiffusionGemmaGenerationConfig.from_pretrained(model_dir)
    gen.max_denoising_steps, gen.confidence_threshold = rounds, NO_EARLY_STOP
    gen.max_new_tokens, gen.eos_token_id = hf.config.canvas_length, [hf.config.text_config.vocab_size + 1]
    ids = torch.tensor([prompt(load_cfg(hf), 0)])
    with torch.no_grad():
        w0, c0 = time.perf_counter(), time.thread_time()
        hf.generate(ids, generation_config=gen)
        return (time.perf_counter() - w0) / rounds * 1e3, (time.thread_time() - c0) / rounds * 1e3


def load_cfg(hf):
    class Cfg:
        vocab_size = hf.config.text_config.vocab_size

    return Cfg


if __name__ == "__main__":
    main()
