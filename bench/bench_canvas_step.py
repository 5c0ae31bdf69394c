"""What the graph-ready canvas step buys on this CPU: whole generations through the offline engine, side by side.

    .venv/bin/python bench/bench_canvas_step.py [--requests 16] [--repeats 5] [--threads 1] [--steps-per-round 1]
                                                [--profile]

Modes (``--modes``, each one engine over the same checkpoint, requests, seeds and default sampler settings):
- ``mixed``: every round through the model's mixed forward (a server without --enable-torch-compile);
- ``static``: every round through the canvas step (canvas-only rounds, and rounds that prefill or commit as rows
  of C tokens), uncompiled (the static layout alone);
- ``compiled``: the same step compiled with fullgraph=True (--enable-torch-compile; exact sampler);
- ``counter``: the counter-RNG sampler (SGL_DIFFUSION_RNG=counter), mixed forwards;
- ``counter-compiled``: counter RNG with the whole canvas-only round compiled, sampler included.
Each mode generates the --requests prompts one at a time (n=1) and all together (n=N); every mode is warmed up
first (compiles included), then the modes alternate repeat by repeat so that load hits them alike. Prints ms per
request (n=1) and per batch (n=N), median [min..max], this thread's CPU time too, the ratios to ``mixed``,
whether each mode's tokens equal ``mixed``'s (exact modes) or ``counter``'s (counter modes), and the share of
right answers; ``key: value`` lines last.

``--profile`` then runs each mode's n=1 pass once more under torch.profiler and prints where a request's time goes
(self times, ms a request): the GEMM and attention kernels, inductor's other kernels (norms, rope, GELUs, softmaxes;
compiled modes), the compiled graphs' Python wrappers and how many calls, dynamo's cache lookup, and the exact draws'
``uniform_``. Inductor then records each of its kernels (``cpp.enable_kernel_profile``, set before any compile),
which costs time of its own: a --profile run's timings are not comparable to another run's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import KERNELS, load_average  # noqa: E402

MODES = {  # name -> (canvas step mode, rng)
    "mixed": (None, "exact"),
    "static": ("eager", "exact"),
    "compiled": ("compile", "exact"),
    "counter": (None, "counter"),
    "counter-compiled": ("compile", "counter"),
}
MAX_NEW_TOKENS = 64


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.profile:
        from torch._inductor import config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    from sgl_diffusion.entrypoints import tiny_tasks
    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_tokenizer
    from sgl_diffusion.entrypoints.tiny_training import trained_checkpoint
    from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
    from sgl_diffusion.runtime.offline import OfflineEngine
    from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
    from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams

    model_dir = Path(args.model_dir) if args.model_dir else Path(trained_checkpoint())
    model = DiffusionGemmaForBlockDiffusion(AutoConfig.from_pretrained(model_dir)).eval()
    model.load_weights(load_file(model_dir / "model.safetensors").items())
    gen = DiffusionGemmaGenerationConfig.from_pretrained(model_dir)
    defaults = DiffusionDefaults.from_generation_config(json.loads(gen.to_json_string()))
    tok = build_tiny_tokenizer()
    examples = tiny_tasks.eval_examples(args.requests, seed=args.seed)
    prompts = [tiny_tasks.prompt_ids(tok, e) for e in examples]
    cfg = model.cfg
    print(f"checkpoint {model_dir} | {args.requests} prompts, max_new_tokens {MAX_NEW_TOKENS} | threads "
          f"{args.threads}, steps per round {args.steps_per_round}, repeats {args.repeats} | {load_average()}",
          flush=True)  # fmt: skip

    engines = {}
    for name in args.modes:
        step, rng = MODES[name]
        engines[name] = OfflineEngine(model, eos_token_ids=gen.eos_token_id, steps_per_round=args.steps_per_round,
                                      canvas_step=step, rng=rng)  # fmt: skip

    def generate(name, indices):
        reqs = [DiffusionRequest(prompts[i], DiffusionParams.from_request(
            {"seed": args.seed + i}, defaults, vocab_size=cfg.vocab_size, canvas_length=cfg.canvas_length),
            MAX_NEW_TOKENS) for i in indices]  # fmt: skip
        return engines[name].generate(reqs)

    everyone = list(range(args.requests))
    outputs, warm = {}, {}
    for name in args.modes:  # warm-up: compiles (one graph for a single canvas, one for more) and first calls
        started = time.perf_counter()
        generate(name, [0])
        outputs[name] = generate(name, everyone)
        warm[name] = time.perf_counter() - started
    times = {(name, kind): [] for name in args.modes for kind in ("n1", "nN", "n1_cpu", "nN_cpu")}
    for _ in range(args.repeats):
        for name in args.modes:
            wall, cpu = time.perf_counter(), time.thread_time()
            for i in everyone:
                generate(name, [i])
            times[name, "n1"].append((time.perf_counter() - wall) / args.requests * 1e3)
            times[name, "n1_cpu"].append((time.thread_time() - cpu) / args.requests * 1e3)
            wall, cpu = time.perf_counter(), time.thread_time()
            generate(name, everyone)
            times[name, "nN"].append((time.perf_counter() - wall) * 1e3)
            times[name, "nN_cpu"].append((time.thread_time() - cpu) * 1e3)

    med = {key: statistics.median(v) for key, v in times.items()}
    spread = lambda k: f"{med[k]:.1f} [{min(times[k]):.1f}..{max(times[k]):.1f}]"  # noqa: E731
    n = args.requests
    print(f"{'mode':18} {'warm-up s':>9} {'ms/request, n=1 (cpu)':>34} {f'ms for n={n} together (cpu)':>36} "
          f"{'same tokens':>11} {'right':>6}")
    lines = {}
    for name in args.modes:
        base = "counter" if name.startswith("counter") and "counter" in outputs else "mixed"
        reference = outputs.get(base, outputs[name])
        same = sum(a == b for a, b in zip(outputs[name], reference))
        right = sum(tiny_tasks.score_ids(tok, e, o) for e, o in zip(examples, outputs[name]))
        n1 = f"{spread((name, 'n1'))} ({med[name, 'n1_cpu']:.1f})"
        n_all = f"{spread((name, 'nN'))} ({med[name, 'nN_cpu']:.1f})"
        print(f"{name:18} {warm[name]:9.1f} {n1:>34} {n_all:>36} {f'{same}/{n}':>11} {right:>6}")
        key = name.replace("-", "_")
        lines[f"ms_per_request_n1_{key}"] = med[name, "n1"]
        lines[f"ms_n{n}_{key}"] = med[name, "nN"]
        lines[f"same_tokens_{key}"] = same
        lines[f"right_{key}"] = right
        if "mixed" in outputs and name != "mixed":
            lines[f"speedup_n1_{key}"] = med["mixed", "n1"] / med[name, "n1"]
            lines[f"speedup_n{n}_{key}"] = med["mixed", "nN"] / med[name, "nN"]
    print(f"after: {load_average()}")
    if args.profile:
        lines |= profile_n1(args.modes, generate, everyone)
    for key, value in lines.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


def profile_n1(modes, generate, everyone) -> dict:
    """(--profile) Each mode's requests one at a time under torch.profiler: self times in ms a request."""
    from torch.profiler import ProfilerActivity, profile

    parts = {  # key -> which profiler events it sums
        "gemm_attention": lambda key: key in KERNELS,
        "inductor_kernels": lambda key: key.startswith("graph_") and "_cpp_fused_" in key,
        "graph_wrappers": lambda key: key.startswith("## Call CompiledFxGraph"),
        "dynamo_lookup": lambda key: key == "TorchDynamo Cache Lookup",
        "uniform": lambda key: key == "aten::uniform_",
    }
    lines = {}
    print("profile, ms a request at n=1: " + ", ".join(parts) + ", compiled graph calls a request")
    for name in modes:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in everyone:
                generate(name, [i])
        events, n = prof.key_averages(), len(everyone)
        key = name.replace("-", "_")
        for part, picks in parts.items():
            lines[f"profile_{key}_{part}_ms"] = sum(e.self_cpu_time_total for e in events if picks(e.key)) / 1e3 / n
        lines[f"profile_{key}_graph_calls"] = sum(e.count for e in events if parts["graph_wrappers"](e.key)) / n
        print(f"{name:18} " + ", ".join(f"{lines[f'profile_{key}_{part}_ms']:.2f}" for part in parts)
              + f", {lines[f'profile_{key}_graph_calls']:.1f}")
    return lines


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", help="a DiffusionGemma checkpoint (default: the trained tiny one)")
    p.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","))
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps-per-round", type=int, default=1)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--profile", action="store_true", help="then profile each mode's n=1 pass (see the docstring)")
    args = p.parse_args()
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; choose from {sorted(MODES)}")
    return args


if __name__ == "__main__":
    main()
