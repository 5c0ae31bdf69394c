"""What grammar constraints cost on the canvas engine (offline engine, CPU, tiny random DiffusionGemma).

    .venv/bin/python bench/bench_constrained.py --requests 12 --max-steps 8 --repair-steps 2 --repeats 3 --threads 1

The same prompts run three ways, each all at once (their forwards shared):
1. constrained: half the prompts under JSON schemas, half under regexes (sglang's xgrammar matchers, built on the
   tiny checkpoint's tokenizer exactly as the server builds them), the commit taking the grammar's pass, at most
   --max-new tokens;
2. free: no constraint, each request as many whole canvases as it took constrained (EOS ignored), so both runs
   have the same rounds and batch shapes and differ only by the constraint;
3. repaired: as 1 with diffusion.grammar_repair_steps = --repair-steps.
A random model knows nothing of JSON: nearly every canvas needs the grammar to change tokens, the worst case for
the commit pass (fallbacks to the full masked argmax) and for repairs. Constrained requests end where their
grammar ends, so the figures are per committed canvas: denoise steps (the forwards a canvas takes part in; repairs
add to them), batched model forwards of the whole run (denoise steps and commits of all requests together), wall
time, and the commit pass's host time (logits from the kept hidden states, the grammar's pass, logprob-free).
Each figure is the median of --repeats runs after one warm-up; the last lines are `key: value` pairs.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch
from common import NO_EARLY_STOP, fmt_spread, load_average, make_pair, median_spread, prompt_ids

from sgl_diffusion.runtime import constraints
from sgl_diffusion.runtime.offline import OfflineEngine
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
from sgl_diffusion.sampling.params import DiffusionParams

EOS = (1, 6, 10)
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 4},
                                      "ok": {"type": "boolean"}}, "required": ["tags", "ok"]},
]  # fmt: skip
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"[a-z]{4,12}( [a-z]{2,8}){2,5}\."]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-new", type=int, default=96, help="tokens per request at most (3 tiny canvases)")
    ap.add_argument("--max-steps", type=int, default=8, help="denoise steps per canvas (no early stop)")
    ap.add_argument("--repair-steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, model = make_pair(SimpleNamespace(seed=args.seed, preset=args.preset, overrides={}, canvas_length=None))
    backend = grammar_backend(model.cfg.vocab_size)
    prompts = [prompt_ids(8 + 3 * i, model.cfg.vocab_size, i) for i in range(args.requests)]

    def params(i, repair=0):
        return DiffusionParams(max_denoising_steps=args.max_steps, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                               confidence_threshold=NO_EARLY_STOP, stability_threshold=1, seed=i,
                               grammar_repair_steps=repair)

    def grammar(i):
        if i % 2 == 0:
            return backend.dispatch_json(json.dumps(SCHEMAS[(i // 2) % len(SCHEMAS)]))
        return backend.dispatch_regex(REGEXES[(i // 2) % len(REGEXES)])

    c = model.cfg.canvas_length
    modes = {  # name: request i, given the constrained run's requests
        "constrained": lambda i, _: DiffusionRequest(prompts[i], params(i), args.max_new, grammar=grammar(i)),
        "free": lambda i, done: DiffusionRequest(prompts[i], params(i), -(-len(done[i].output_ids) // c) * c),
        "repaired": lambda i, _: DiffusionRequest(prompts[i], params(i, args.repair_steps), args.max_new,
                                                  grammar=grammar(i)),
    }
    print(f"{args.requests} requests, {args.max_steps} steps per canvas, max_new_tokens {args.max_new}, "
          f"preset {args.preset}, {args.threads} thread(s), {load_average()}")
    results = {name: [] for name in modes}
    for repeat in range(args.repeats + 1):  # the first round warms up
        done = None
        for name, make in modes.items():
            reqs = [make(i, done) for i in range(args.requests)]
            run = measure(model, reqs, () if name == "free" else EOS)
            done = reqs if name == "constrained" else done
            if repeat:
                results[name].append(run)
    summary = {}
    for name, runs in results.items():
        canvases = runs[0]["canvases"]
        print(f"{name:12s} canvases {canvases:4d}  steps/canvas {runs[0]['steps'] / canvases:5.2f}"
              f"  forwards {runs[0]['forwards']:4d}  wall ms/canvas {fmt_spread((r['wall'] / canvases for r in runs), 1e3)}"
              f"  commit-pass ms/canvas {fmt_spread((r['pass'] / canvases for r in runs), 1e3, 2)}"
              + (f"  ended by grammar {runs[0]['terminated']}/{args.requests}  fallbacks/canvas "
                 f"{runs[0]['fallbacks'] / canvases:.1f}" if name != "free" else ""))
        summary[name] = {k: median_spread(r[k] / r["canvases"] for r in runs)[0] for k in ("steps", "wall", "pass")}
    free = summary["free"]
    out = {
        "constrained_extra_steps_per_canvas": summary["constrained"]["steps"] - free["steps"],
        "repaired_extra_steps_per_canvas": summary["repaired"]["steps"] - free["steps"],
        "constrained_wall_ratio_per_canvas": summary["constrained"]["wall"] / free["wall"],
        "repaired_wall_ratio_per_canvas": summary["repaired"]["wall"] / free["wall"],
        "commit_pass_ms_per_canvas": summary["constrained"]["pass"] * 1e3,
    }
    for key, value in out.items():
        print(f"{key}: {value:.3f}")


def grammar_backend(vocab_size: int):
    """sglang's xgrammar backend on the tiny checkpoint's tokenizer, as the server's GrammarManager builds it."""
    from sglang.srt.constrained.xgrammar_backend import XGrammarGrammarBackend

    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_tokenizer

    return XGrammarGrammarBackend(build_tiny_tokenizer(), vocab_size=vocab_size, model_eos_token_ids=list(EOS))


def measure(model, reqs, eos) -> dict:
    """Run ``reqs`` together; count model forwards, committed canvases and their steps, time the commit pass."""
    engine = OfflineEngine(model, eos_token_ids=eos)
    counts = {"forwards": 0, "pass": 0.0, "canvases": 0, "steps": 0}
    forward, finish = model.forward, constraints.finish_canvas

    def counted_forward(*a, **kw):
        counts["forwards"] += 1
        return forward(*a, **kw)

    def timed_finish(req, m):
        t0 = time.perf_counter()
        tokens = finish(req, m)
        counts["pass"] += time.perf_counter() - t0
        if tokens is not None:  # committed (None: sent back for a repair)
            counts["canvases"] += 1
            counts["steps"] += int(req.state.steps_taken)
        return tokens

    model.forward, constraints.finish_canvas = counted_forward, timed_finish
    try:
        t0 = time.perf_counter()
        engine.generate(reqs)
        wall = time.perf_counter() - t0
    finally:
        del model.forward
        constraints.finish_canvas = finish
    terminated = sum(bool(r.output_ids) and r.output_ids[-1] in EOS for r in reqs)
    return counts | {"wall": wall, "terminated": terminated, "fallbacks": sum(r.grammar_fallbacks for r in reqs)}


if __name__ == "__main__":
    main()
