"""What the canvas loop's round structure buys, on the offline engine (CPU, tiny random DiffusionGemma).

    .venv/bin/python bench/bench_rounds.py --preset deep --requests 16 --arrival-gap 2 --repeats 3 --threads 1

1. mixed vs homogeneous rounds: the same stream of requests (one arrives every --arrival-gap rounds; prompts of
   16..160 tokens; 1..3 canvases; 2..--max-steps denoise steps with adaptive stopping on) run with mixed rounds
   (prefills, commits and denoise steps of different requests share a forward: what we serve) and with
   homogeneous rounds (a round that has any prefill or commit runs only those: sglang's in-tree dLLM loop). Each
   request's sampling is independent of the rounds (tests/runtime/test_scheduler_policy.py checks equal tokens on
   the default preset); on the deep preset different batch shapes change float rounding, so the line counts the
   token-identical requests. It reports rounds, wall time, throughput and mean time to a request's first
   committed canvas, and the throughput ratio mixed / homogeneous.
2. steps per round (--num-continuous-decode-steps K): the same requests all at once, K = 1, 2, 4, 8 denoise steps
   per round before the host looks at the results. A canvas that finishes mid-round is frozen (computed, not
   changed) until the round ends, so K > 1 trades wasted rows for fewer host round trips; on CPU there is no
   device sync to save, so this shows the cost side. Throughput ratio to K = 1 per line.
3. last-canvas commit: the stream of comparison 1 with a KV store that keeps prefixes (the server's radix cache:
   a finished request's last canvas is encoded in one more forward, so the next turn reuses the whole answer) and
   with one that does not (the last canvas is never encoded). Rounds, throughput ratio and the tokens per request
   the next turn no longer prefills.

Both sides of every ratio run in the same process, alternating after one warm-up; each figure is the median of
--repeats runs. CPU figures on a tiny model: they show scheduling structure, not GPU throughput.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from common import NO_EARLY_STOP, load_average, make_pair, prompt_ids

from sgl_diffusion.runtime.offline import FreeListSlots, OfflineEngine
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams


def workload(args, cfg, defaults):
    """(arrival round, prompt, params, max_new_tokens) per request, the same for every run."""
    rng = random.Random(args.seed)
    plan = []
    for i in range(args.requests):
        steps = rng.randint(2, args.max_steps)
        raw = {"seed": i, "max_denoising_steps": steps}
        if args.no_early_stop:
            raw["confidence_threshold"] = NO_EARLY_STOP
        params = DiffusionParams.from_request(raw, defaults, vocab_size=cfg.vocab_size, canvas_length=cfg.canvas_length)
        prompt = prompt_ids(rng.randint(16, 160), cfg.vocab_size, seed=1000 + i)
        plan.append((i * args.arrival_gap, prompt, params, rng.randint(1, 3) * cfg.canvas_length))
    return plan


class CachingSlots(FreeListSlots):
    """Free-list slots that claim to keep released prefixes, as the server's radix cache does: the policy then
    encodes each request's last canvas (nothing is kept here; only the work is measured)."""

    caches_prefixes = True


def run(model, plan, *, mixed=True, steps_per_round=1, arrivals=True, commit_last=False):
    """Drive the engine round by round, adding each request at its arrival round; returns stats and outputs."""
    engine = OfflineEngine(model, eos_token_ids=(), mixed_rounds=mixed, steps_per_round=steps_per_round)
    if commit_last:
        engine.scheduler.kv = CachingSlots(engine.slots.free_slots.numel(), engine.slots.free_slots.device)
    policy = engine.scheduler
    reqs = [DiffusionRequest(prompt, params, max_new) for _, prompt, params, max_new in plan]
    arrive = [a if arrivals else 0 for a, *_ in plan]
    added, rounds, first_canvas = 0, 0, {}
    t0 = time.perf_counter()
    start = {}
    while added < len(reqs) or policy.running:
        while added < len(reqs) and arrive[added] <= rounds:
            policy.add(reqs[added])
            start[added] = time.perf_counter()
            added += 1
        out = policy.step()
        rounds += 1
        now = time.perf_counter()
        for req, _ in out.committed:
            i = reqs.index(req)
            first_canvas.setdefault(i, now - start[i])
    wall = time.perf_counter() - t0
    tokens = sum(len(r.output_ids) for r in reqs)
    return {"wall": wall, "rounds": rounds, "tokens": tokens, "ttfc": statistics.mean(first_canvas.values())}, [
        r.output_ids for r in reqs]


def median_runs(fns, repeats):
    """Warm every fn up, then alternate them `repeats` times; per fn, the run with the median wall time."""
    outs = [fn() for fn in fns]
    runs = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            runs[i].append(fn())
    medians = []
    for r in runs:
        r.sort(key=lambda x: x[0]["wall"])
        medians.append(r[len(r) // 2])
    return medians, outs


def line(name, stats):
    return (f"{name}: {stats['rounds']} rounds, {stats['wall']:.2f} s, {stats['tokens'] / stats['wall']:.1f} tok/s, "
            f"first canvas after {stats['ttfc'] * 1000:.0f} ms on average")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hf, model = make_pair(args)
    cfg = model.cfg
    defaults = DiffusionDefaults.from_generation_config(json.loads(hf.generation_config.to_json_string()))
    plan = workload(args, cfg, defaults)
    print(f"config: preset={args.preset} layers={cfg.num_layers} hidden={cfg.hidden_size} C={cfg.canvas_length} | "
          f"requests={args.requests} arrival_gap={args.arrival_gap} max_steps={args.max_steps} "
          f"early_stop={'off' if args.no_early_stop else 'on'} repeats={args.repeats} "
          f"threads={torch.get_num_threads()} | {load_average()}")

    with torch.inference_mode():
        (mixed, homog), (out_mixed, out_homog) = median_runs(
            [lambda: run(model, plan, mixed=True), lambda: run(model, plan, mixed=False)], args.repeats)
        same = sum(a == b for a, b in zip(out_mixed[1], out_homog[1]))
        print("1. " + line("mixed", mixed[0]))
        print("   " + line("homogeneous", homog[0]))
        ratio = (mixed[0]["tokens"] / mixed[0]["wall"]) / (homog[0]["tokens"] / homog[0]["wall"])
        print(f"   mixed / homogeneous throughput: {ratio:.2f}x; first canvas "
              f"{homog[0]['ttfc'] / mixed[0]['ttfc']:.2f}x sooner; {same}/{len(plan)} requests token-identical "
              "(batch shapes differ between modes; on deeper models rounding then flips a draw)")

        ks = [1, 2, 4, 8]
        results, _ = median_runs([lambda k=k: run(model, plan, steps_per_round=k, arrivals=False) for k in ks],
                                 args.repeats)
        base = results[0][0]["tokens"] / results[0][0]["wall"]
        for k, (stats, _) in zip(ks, results):
            print(f"2. K={k}: " + line("", stats)[2:] + f"; {stats['tokens'] / stats['wall'] / base:.2f}x K=1")

        (last, plain), (out_last, _) = median_runs(
            [lambda: run(model, plan, commit_last=True), lambda: run(model, plan)], args.repeats)
        saved = statistics.mean(len(o) - (len(o) - 1) // cfg.canvas_length * cfg.canvas_length for o in out_last[1])
        print("3. " + line("last canvas committed", last[0]))
        print("   " + line("last canvas dropped", plain[0]))
        ratio = (last[0]["tokens"] / last[0]["wall"]) / (plain[0]["tokens"] / plain[0]["wall"])
        print(f"   committed / dropped throughput: {ratio:.2f}x; the next turn prefills {saved:.1f} fewer tokens "
              "per request")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="deep", choices=["default", "deep"])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--arrival-gap", type=int, default=2, help="rounds between two arrivals (comparison 1)")
    p.add_argument("--max-steps", type=int, default=12, help="denoise steps per canvas are drawn from 2..this")
    p.add_argument("--no-early-stop", action="store_true", help="every canvas takes all its steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    args.canvas_length, args.overrides = None, {}  # what make_pair reads
    return args


if __name__ == "__main__":
    main()
