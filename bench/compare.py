"""Our server against transformers and against sglang's token-by-token decode, on the trained tiny checkpoint.

    .venv/bin/python bench/compare.py [--quick] [--write-results]

One run, one machine, one checkpoint (the trained tiny DiffusionGemma, tiny_training.py, built once and cached),
the checkpoint's default sampler settings (48 steps at most, Entropy-Bound 0.1, adaptive stopping), prompts of
the generated tasks (tiny_tasks.py), a seed per request. Both sides of every ratio run in this process's time
window, one after the other, repeated (--repeats, interleaved), and each figure is a median with its [min..max].

- speedup_vs_hf_n1: wall time of transformers' ``generate`` (its own loop; ``torch.manual_seed(seed)`` first)
  over our server's ``/generate`` for one request;
- speedup_vs_hf_n16: the same for 16 requests, transformers at its better of one request at a time and one
  batched (left-padded) call, ours with all 16 sent at once;
- tokens_per_forward: committed tokens / model forwards (each canvas's denoise steps, from meta_info, plus its
  commit forward), over the 16 requests;
- batch8_over_batch1: aggregate tokens/s of 8 requests sent together over the same 8 sent one after another;
- forwards_vs_ar: model forwards per output token, ours over sglang's own decode of a tiny Llama of the same
  width and active size (random weights; sglang's CPU engine), and the wall time per token of both;
- overhead_ratio_b1 / _b8: wall time of the model forward of one denoise round on 1 / 8 canvases (canvas ids to
  logits: the transformer and the LM head) over the time of the same forward's GEMM and attention kernels alone
  (self time of aten::mm/addmm/bmm/_grouped_mm and the SDPA kernels in a torch.profiler trace): how far from the
  machine's compute limit the forward is. round_overhead_ratio_b1 / _b8: the same for the whole round (the forward,
  the sampler with its draws from each request's generator, the round's planning and bookkeeping) over its kernels.
  With --torch-compile the round is the server's compiled round and the forward the same canvas step compiled
  without the sampler's decision, then the LM head; *_eager_b* are the eager ones;
- peak_mem_per_canvas_mb: growth of a process's peak RSS per additional canvas in flight (a round at 1 and at
  --mem-batch canvases, each in a fresh process at --threads torch threads).

Then the keys that bound the targets (bench/RESULTS.md, "Targets"), from the same profiles:
- kernel_ms_{ours,hf}_n1 / _n{N}: GEMM + attention kernel time of the whole N=1 and N workloads (ours: the offline
  engine, the server's policy and model without HTTP; transformers: its better N mode); speedup_vs_hf_*_zero_overhead:
  transformers' wall time over our kernel time, the speedup if our host overhead were nil;
- eager_ops_per_round_b1 (top-level non-view aten calls of a 1-canvas round), dispatch_us (the cheapest aten call on
  this machine), rounds_n1 (our rounds for request 0), speedup_vs_hf_n1_eager_floor: transformers' wall over our
  kernel time plus that many calls at that cost per round (the floor while the forward issues those calls);
- all_ops_ratio_b8 (self time of every aten op of the eager round / its kernels: the ratio if Python cost nothing);
- batch8_over_batch1_zero_overhead (8 x 1-canvas kernels / 8-canvas kernels) and batch8_over_batch1_max_at_1_5
  (the most batch8_over_batch1 can be while round_overhead_ratio_b8 <= 1.5, given those kernels; see round_bounds);
- request_path_ms_ar / _ours: what a request pays outside any canvas round, the fastest of several requests for
  prompt 0 (cached): sglang's own server answering one token (the path and a one-token forward), and ours with
  max_new_tokens=0 (the path alone: a prompt cached whole runs no forward), sent back to back; *_after_hf: the same,
  each sent right after transformers' request 0, as compare times ours at n=1 (the server's processes wake from
  a pause);
  speedup_vs_hf_n1_path_bound: transformers' wall for request 0 over the smaller *_after_hf path plus rounds_n1
  rounds of the served 1-canvas round's GEMM and attention kernels (the speedup if our rounds cost their kernels
  alone); speedup_vs_hf_n1_round_bound: the same with rounds_n1 rounds of that round's wall (the cheapest round a
  request runs: canvases alone, one canvas);
  round_non_kernel_ms_b1: the served 1-canvas round's wall minus those kernels (inductor's fused norms, rope,
  GELUs and softmaxes, the graph's wrapper, the draws, planning), against round_non_kernel_ms_for_3x, what each of
  request 0's rounds may spend outside them for speedup_vs_hf_n1 = 3;
  round_ms_served_n1: what a round of request 0 costs in the server on average, (our wall for request 0 -
  request_path_ms_ours_after_hf) / rounds_n1 (its first round sets the request up, one round commits beside a step,
  and each round streams, reports and reads the sockets), against round_ms_for_3x, the average that
  speedup_vs_hf_n1 = 3 allows; round_ms_after_pause_b1: the served 1-canvas round in-process, rounds_n1 of them
  right after a pause as long as transformers' request 0 (their mean; request 0 meets that pause), and
  speedup_vs_hf_n1_round_bound_after_pause, speedup_vs_hf_n1_round_bound with those rounds.

The server runs with OMP_NUM_THREADS=--threads and transformers in this process with as many torch threads.
Tokens of our server and of transformers are compared (same seeds, same tokens expected on a confident model),
and task accuracy is reported for both. With --write-results the full run rewrites bench/RESULTS.md's compare
section. --quick runs 1 repeat and fewer probe rounds (under 2 minutes once the checkpoint is cached).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ar_server_env, fmt_spread, kernel_ms, launch_server, load_average, median_spread, stop_servers, wait_healthy,
)

MAX_NEW_TOKENS = 64  # two canvases of the tiny checkpoint; every answer (56 tokens with <eos>) fits
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
VIEW_OPS = {"aten::" + op for op in (
    "view", "reshape", "slice", "select", "transpose", "t", "unsqueeze", "squeeze", "expand", "as_strided", "narrow",
    "split", "split_with_sizes", "chunk", "unbind", "permute", "detach", "alias", "_unsafe_view", "view_as", "flatten",
    "unflatten", "contiguous", "expand_as", "type_as", "to", "result_type", "lift_fresh")}  # metadata only (or no-ops)


COMPILE_NOTE = ", our server with --enable-torch-compile"


def main() -> None:
    args = parse_args()
    if args.memory_probe:
        return memory_probe(*args.memory_probe)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    from sgl_diffusion.entrypoints import tiny_tasks
    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_tokenizer

    model_dir = Path(args.model_dir) if args.model_dir else trained_dir()
    tok = build_tiny_tokenizer()
    n = args.requests
    examples = tiny_tasks.eval_examples(n, seed=args.seed)
    prompts = [tiny_tasks.prompt_ids(tok, e) for e in examples]
    seeds = [args.seed + i for i in range(n)]
    steps = "default sampler settings" if args.max_steps is None else f"at most {args.max_steps} steps per canvas"
    print(f"checkpoint {model_dir} | {n} prompts, max_new_tokens {MAX_NEW_TOKENS}, {steps} | "
          f"threads {args.threads}, repeats {args.repeats}{COMPILE_NOTE * args.torch_compile} | {load_before}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        tmp = Path(tmp)
        ar_dir = build_ar_baseline(model_dir, tmp / "ar")
        # NOTE: both servers start at once (start-up is mostly imports); an idle one sleeps (--sleep-on-idle)
        ours_flags = ["--dtype", "float32", *(["--enable-torch-compile"] if args.torch_compile else [])]
        servers = [launch_server(model_dir, tmp / "ours.log", ours_flags, threads=args.threads),
                   launch_server(ar_dir, tmp / "ar.log", ["--dtype", "float32"], threads=args.threads,
                                 env=ar_server_env())]  # fmt: skip
        try:
            hf = HfSide(model_dir, prompts, seeds, args.max_steps)
            for (proc, url), log in zip(servers, ("ours.log", "ar.log")):
                wait_healthy(proc, url, tmp / log)
            srv = ServerSide(servers[0][1], prompts, seeds, args.max_steps)
            hf.one(0), srv.one(0)  # warm-up
            hf.many_sequential(2), hf.many_batched(2), srv.many(2)
            r = run_rounds(args, hf, srv)
            ar = ar_per_token(servers[1][1], prompts[0], r["tokens_n1"], args.repeats)
            paths = request_paths(servers[0][1], servers[1][1], prompts[0], args.repeats, lambda: hf.one(0))
        finally:
            stop_servers([proc for proc, _ in servers])
    budget = kernel_budget(model_dir, hf, prompts, seeds, args.max_steps, r["hf_mode"] == "batched")
    probe_rounds = 3 if args.quick else 8
    # request 0's rounds, in-process, after the pause it meets in run_rounds (transformers' request 0, median)
    pause = {"pause_s": median_spread(r["times"]["hf1"])[0], "rounds_after_pause": budget["rounds_n1"]}
    served_mode = "compile" if args.torch_compile else None

    def probe(batch, mode):
        return overhead_ratio(model_dir, prompts, batch, probe_rounds, mode,
                              **(pause if batch == 1 and mode == served_mode else {}))

    overhead = {b: probe(b, None) for b in (1, 8)}
    # the server's own rounds when it compiles them (the eager ones above still bound the targets)
    served = {b: probe(b, served_mode) for b in (1, 8)} if served_mode else overhead
    mem = peak_memory_per_canvas(model_dir, args.mem_batch, args.threads)
    load_after = load_average()

    acc_ours = sum(tiny_tasks.score_ids(tok, e, o) for e, o in zip(examples, r["out_ours"])) / n
    acc_hf = sum(tiny_tasks.score_ids(tok, e, o) for e, o in zip(examples, r["out_hf"])) / n
    same = sum(a == b for a, b in zip(r["out_ours"], r["out_hf"]))
    ours_fwd_per_tok = 1 / r["tpf"]
    lines = {
        "speedup_vs_hf_n1": r["speedup_n1"],
        f"speedup_vs_hf_n{n}": r["speedup_n16"],
        "tokens_per_forward": r["tpf"],
        "batch8_over_batch1": r["b8_over_b1"],
        "forwards_vs_ar": ours_fwd_per_tok / 1.0,
        "wall_per_token_ms_ours": r["t_ours_n1"] / r["tokens_n1"] * 1e3,
        "wall_per_token_ms_ar": ar,
        "overhead_ratio_b1": served[1]["forward_ratio"],
        "overhead_ratio_b8": served[8]["forward_ratio"],
        "round_overhead_ratio_b1": served[1]["ratio"],
        "round_overhead_ratio_b8": served[8]["ratio"],
        "peak_mem_per_canvas_mb": mem,
        "mean_steps_per_canvas": r["steps_per_canvas"],
        "accuracy_ours": acc_ours,
        "accuracy_hf": acc_hf,
    }
    if served is not overhead:
        lines |= {f"{kind}_eager_b{b}": overhead[b][key] for kind, key in
                  (("overhead_ratio", "forward_ratio"), ("round_overhead_ratio", "ratio")) for b in (1, 8)}
    lines |= bounds(r, overhead, served, budget, paths, n)
    table = report(args, r, overhead, served, ar, mem, same, lines, load_before, load_after)
    print(table)
    for key, value in lines.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    if args.write_results:
        write_results(args, table, lines, started, load_before, load_after)


# ---- the two sides ---------------------------------------------------------------------------------------------


class HfSide:
    """transformers' generate on the checkpoint, float32, in this process."""

    def __init__(self, model_dir, prompts, seeds, max_steps):
        from transformers import DiffusionGemmaForBlockDiffusion
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

        self.model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.gen = DiffusionGemmaGenerationConfig.from_pretrained(model_dir)
        self.gen.max_new_tokens = MAX_NEW_TOKENS
        if max_steps is not None:
            self.gen.max_denoising_steps = max_steps
        self.prompts, self.seeds = prompts, seeds
        self.eos, self.pad = set(self.gen.eos_token_id), self.gen.pad_token_id

    def _cut(self, new: list[int]) -> list[int]:
        for i, t in enumerate(new):
            if t in self.eos:
                return new[: i + 1]
        return new

    def one(self, i) -> list[int]:
        torch.manual_seed(self.seeds[i])
        with torch.no_grad():
            out = self.model.generate(torch.tensor([self.prompts[i]]), generation_config=self.gen)
        return self._cut(out.sequences[0, len(self.prompts[i]) :].tolist())

    def many_sequential(self, n) -> list[list[int]]:
        return [self.one(i) for i in range(n)]

    def many_batched(self, n) -> list[list[int]]:
        width = max(len(p) for p in self.prompts[:n])
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in self.prompts[:n]])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in self.prompts[:n]])
        torch.manual_seed(self.seeds[0])
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, generation_config=self.gen)
        return [self._cut(row[width:].tolist()) for row in out.sequences]


class ServerSide:
    """Our server's native /generate, one HTTP request per prompt."""

    def __init__(self, url, prompts, seeds, max_steps):
        self.url, self.prompts, self.seeds = url, prompts, seeds
        self.diffusion = {} if max_steps is None else {"max_denoising_steps": max_steps}
        self.session = requests.Session()

    def _post(self, i, session=None):
        body = {"input_ids": self.prompts[i], "sampling_params": {
            "max_new_tokens": MAX_NEW_TOKENS, "diffusion": self.diffusion | {"seed": self.seeds[i]}}}
        resp = (session or requests).post(f"{self.url}/generate", json=body, timeout=600)
        resp.raise_for_status()
        out = resp.json()
        return out["output_ids"], out["meta_info"]["diffusion_steps"]

    def one(self, i):
        return self._post(i, self.session)

    def many(self, n):
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            return list(pool.map(self._post, range(n)))

    def sequential(self, n):
        return [self._post(i, self.session) for i in range(n)]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_rounds(args, hf: HfSide, srv: ServerSide) -> dict:
    """Every comparison, repeated and interleaved so that outside load hits both sides alike."""
    t = {k: [] for k in ("hf1", "ours1", "hf_seq", "hf_batch", "ours16", "ours8_seq", "ours8")}
    for _ in range(args.repeats):
        dt, out_hf1 = timed(lambda: hf.one(0))
        t["hf1"].append(dt)
        dt, (out_ours1, _) = timed(lambda: srv.one(0))
        t["ours1"].append(dt)
        dt, out_hf = timed(lambda: hf.many_sequential(args.requests))
        t["hf_seq"].append(dt)
        dt, out_hf_batch = timed(lambda: hf.many_batched(args.requests))
        t["hf_batch"].append(dt)
        dt, ours16 = timed(lambda: srv.many(args.requests))
        t["ours16"].append(dt)
        dt, seq8 = timed(lambda: srv.sequential(min(8, args.requests)))
        t["ours8_seq"].append(dt)
        dt, par8 = timed(lambda: srv.many(min(8, args.requests)))
        t["ours8"].append(dt)
    med = {k: median_spread(v)[0] for k, v in t.items()}
    out_ours = [o for o, _ in ours16]
    steps = [s for _, meta in ours16 for s in meta if s]
    tokens = sum(len(o) for o in out_ours)
    hf_best = min(med["hf_seq"], med["hf_batch"])
    tok8 = sum(len(o) for o, _ in par8), sum(len(o) for o, _ in seq8)
    return {
        "times": t, "out_ours": out_ours, "out_hf": out_hf, "out_hf_batch": out_hf_batch,
        "speedup_n1": med["hf1"] / med["ours1"], "t_ours_n1": med["ours1"], "tokens_n1": len(out_ours1),
        "speedup_n16": hf_best / med["ours16"], "hf_mode": "one at a time" if hf_best == med["hf_seq"] else "batched",
        "tpf": tokens / (sum(steps) + len(steps)), "steps_per_canvas": sum(steps) / len(steps),
        "canvases": len(steps), "tokens": tokens,
        "b8_over_b1": (tok8[0] / med["ours8"]) / (tok8[1] / med["ours8_seq"]),
        "same_n1": out_hf1 == out_ours1,
    }  # fmt: skip


# ---- token-by-token baseline -----------------------------------------------------------------------------------


def build_ar_baseline(model_dir: Path, out: Path) -> Path:
    """A Llama as wide as the checkpoint, with as many layers and heads and the same active MLP parameters per
    token (dense MLP + top-k experts), the same tokenizer; random weights (seed 0): only its speed is measured."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_tokenizer

    text = json.loads((model_dir / "config.json").read_text())["text_config"]
    cfg = LlamaConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_hidden_layers=text["num_hidden_layers"],
        intermediate_size=text["intermediate_size"] + text["top_k_experts"] * text["moe_intermediate_size"],
        num_attention_heads=text["num_attention_heads"], num_key_value_heads=text["num_key_value_heads"],
        head_dim=text["head_dim"], max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"],
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).float().save_pretrained(out)
    build_tiny_tokenizer().save_pretrained(out)
    return out


def ar_per_token(url: str, prompt: list[int], tokens: int, repeats: int) -> float:
    """Median ms per output token of one request of ``tokens`` tokens (ignore_eos) on sglang's decode loop."""
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True, "temperature": 0}}
    requests.post(f"{url}/generate", json=body, timeout=600).raise_for_status()
    times = []
    for _ in range(max(repeats, 3)):
        dt, resp = timed(lambda: requests.post(f"{url}/generate", json=body, timeout=600))
        resp.raise_for_status()
        assert len(resp.json()["output_ids"]) == tokens
        times.append(dt / tokens * 1e3)
    return median_spread(times)[0]


def request_paths(ours_url: str, ar_url: str, prompt: list[int], repeats: int, before) -> dict:
    """The fastest of several requests for ``prompt`` (in the radix cache after the first) that generate nothing
    worth timing, ms: ``ar``, sglang's own server answering one token (its request path plus one token's forward);
    ``ours``, ours with max_new_tokens=0 (its request path: a prompt cached whole runs no forward). What any request
    pays outside its rounds: sent back to back, and ``*_after_hf`` each right after ``before()`` (transformers'
    request 0), as the n=1 comparison sends ours, after a pause (``round_ms_after_pause_b1`` measures its cost)."""
    def fastest(url, params, first=None):
        body = {"input_ids": prompt, "sampling_params": params}
        session = requests.Session()
        session.post(f"{url}/generate", json=body, timeout=600).raise_for_status()
        times = []
        for _ in range(max(repeats, 10)):
            if first is not None:
                first()
            dt, resp = timed(lambda: session.post(f"{url}/generate", json=body, timeout=600))
            resp.raise_for_status()
            times.append(dt * 1e3)
        return min(times)

    one_token, no_token = {"max_new_tokens": 1, "temperature": 0}, {"max_new_tokens": 0}
    return {"ar": fastest(ar_url, one_token), "ours": fastest(ours_url, no_token),
            "ar_after_hf": fastest(ar_url, one_token, before), "ours_after_hf": fastest(ours_url, no_token, before)}


# ---- in-process probes -----------------------------------------------------------------------------------------


def load_ours(model_dir):
    from transformers import AutoConfig

    from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
    from safetensors.torch import load_file

    model = DiffusionGemmaForBlockDiffusion(AutoConfig.from_pretrained(model_dir)).eval()
    model.load_weights(load_file(Path(model_dir) / "model.safetensors").items())
    return model


def round_inputs(model, prompts, batch: int, canvas_step: str | None = None):
    """An engine whose ``batch`` requests are past their prefill: every later round is denoise-only. ``canvas_step``:
    OfflineEngine's (``compile``: the server's --enable-torch-compile)."""
    from sgl_diffusion.runtime.offline import OfflineEngine
    from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
    from sgl_diffusion.sampling.params import DiffusionParams

    steps = 1024  # never reached: the rounds below stop long before
    params = [DiffusionParams(steps, 0.1, 0.4, 0.8, 0.0, 1, seed=i) for i in range(batch)]
    engine = OfflineEngine(model, canvas_step=canvas_step)
    for i in range(batch):
        engine.scheduler.add(DiffusionRequest(prompts[i % len(prompts)], params[i], 10**6))
    engine.scheduler.step()  # prefills + first steps
    return engine


def overhead_ratio(model_dir, prompts, batch: int, rounds: int, canvas_step: str | None = None,
                   pause_s: float = 0.0, rounds_after_pause: int = 0) -> dict:
    """Denoise-only rounds of ``batch`` canvases, ms per round: ``wall``, ``forward`` (the model forward's wall time
    within it; a compiled round's: with the LM head and the sampler's decision, computed in its graph), ``kernels``
    (GEMM + attention self time under the profiler), ``all_ops`` (self time of every aten op), ``ops`` (top-level
    non-view aten calls), and ``ratio`` = wall / kernels. ``canvas_step="compile"``: the rounds of
    a server with --enable-torch-compile (compiled first, outside the timing). With ``pause_s``, also
    ``after_pause``: the mean wall of ``rounds_after_pause`` rounds run right after the process idled ``pause_s``
    (median over ``rounds`` pauses), as request 0's rounds run after transformers' request 0."""
    from torch.profiler import ProfilerActivity, profile

    model = load_ours(model_dir)
    with torch.inference_mode():
        engine = round_inputs(model, prompts, batch, canvas_step)
        for _ in range(2):
            engine.scheduler.step()
        walls, forward = [], []
        runner = engine.scheduler.runner
        # the model's forward, or the canvas step's; a judging step's (exact mode compiled) holds the LM head and the
        # sampler's decision too
        owner = runner.canvas_step if runner.canvas_step is not None and runner.canvas_step.judges else runner
        name = "judged" if owner is not runner else "forward"
        untimed = getattr(owner, name)

        def timed_forward(*a, **k):
            t0 = time.perf_counter()
            out = untimed(*a, **k)
            forward.append(time.perf_counter() - t0)
            return out

        setattr(owner, name, timed_forward)
        try:
            for _ in range(rounds * 3):
                dt, _ = timed(engine.scheduler.step)
                walls.append(dt)
        finally:
            delattr(owner, name)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                engine.scheduler.step()
        alone = forward_alone(model, engine, canvas_step, rounds)
        if pause_s:
            alone["after_pause"] = rounds_after_a_pause(engine.scheduler.step, pause_s, rounds_after_pause, rounds)
    wall = median_spread(walls)[0]
    per_round = lambda us: us / 1e3 / rounds  # noqa: E731
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in aten if not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
    kernels = kernel_ms(prof) / rounds
    return {"ratio": wall * 1e3 / kernels, "wall": wall * 1e3, "forward": median_spread(forward)[0] * 1e3,
            "kernels": kernels, "all_ops": per_round(sum(e.self_cpu_time_total for e in aten)),
            "ops": sum(e.name not in VIEW_OPS for e in top) / rounds} | alone  # fmt: skip


def rounds_after_a_pause(step, pause_s: float, rounds: int, repeats: int) -> float:
    """Mean wall time (ms) of ``rounds`` calls of ``step`` right after ``pause_s`` of sleep, median over ``repeats``.
    On the shared 2-core VMs these figures come from, a pause of tens of ms slows the next few rounds, kernels and
    Python alike (measured 2026-12-03: bench/RESULTS.md, "Rounds after a pause")."""
    means = []
    for _ in range(repeats):
        time.sleep(pause_s)
        dt, _ = timed(lambda: [step() for _ in range(rounds)])
        means.append(dt * 1e3 / rounds)
    return median_spread(means)[0]


def forward_alone(model, engine, canvas_step: str | None, rounds: int) -> dict:
    """The model forward of ``engine``'s next denoise round alone, canvas ids to logits (no sampler, no round
    bookkeeping), replayed: ``forward_alone_wall`` (ms, median), ``forward_alone_kernels`` (its GEMM and attention
    kernels, ms) and ``forward_ratio`` (the two's ratio: overhead_ratio_b* in the module docstring).

    Compiled (``canvas_step``), it is the step without the sampler's decision, compiled alike (a judging server's
    round graph holds both); eager, the mixed forward. Canvas-only rounds write no KV, so replays change nothing."""
    from torch.profiler import ProfilerActivity, profile

    from sgl_diffusion.runtime.canvas_batch import CanvasBatch
    from sgl_diffusion.runtime.canvas_step import CanvasStep

    runner = engine.scheduler.runner
    seen = []
    run = runner.run
    runner.run = lambda batch, *a, **k: (seen.append(batch), run(batch, *a, **k))[1]
    try:
        engine.scheduler.step()
    finally:
        del runner.run
    batch = seen[0]
    assert batch.token_kinds == "canvas", "a round that encodes: the probe wants denoise-only rounds"
    if canvas_step is None:  # a fresh batch a call, as each round builds one (the attention backend plans into it)
        hidden = lambda: runner.forward(CanvasBatch([dataclasses.replace(s) for s in batch.segments],  # noqa: E731
                                                    batch.input_ids, batch.canvas_soft_embeds))
    else:
        step = CanvasStep(model, runner.canvas_step.kv, canvas_step, judge=False)
        hidden = lambda: step(batch.segments, batch.input_ids, batch.canvas_soft_embeds)  # noqa: E731
    forward = lambda: model.logits(hidden())  # noqa: E731
    for _ in range(3):  # compiles the step (compiled mode)
        forward()
    walls = [timed(forward)[0] for _ in range(rounds * 3)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            forward()
    wall = median_spread(walls)[0] * 1e3
    kernels = kernel_ms(prof) / rounds
    return {"forward_alone_wall": wall, "forward_alone_kernels": kernels, "forward_ratio": wall / kernels}


def kernel_budget(model_dir, hf: HfSide, prompts, seeds, max_steps, hf_batched: bool) -> dict:
    """GEMM + attention kernel time (ms, torch.profiler self time) of the N=1 and N workloads, ours and
    transformers', our rounds for request 0, and the cost of the cheapest aten call (us).

    Ours runs in the offline engine (the server's policy, runner and model without HTTP), on the same prompts, seeds
    and settings as the server, so it does the same GEMMs.
    """
    from torch.profiler import ProfilerActivity, profile

    from sgl_diffusion.runtime.offline import OfflineEngine
    from sgl_diffusion.runtime.scheduler_hook import load_defaults
    from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
    from sgl_diffusion.sampling.params import DiffusionParams

    model = load_ours(model_dir)
    defaults = load_defaults(str(model_dir))
    raw = {} if max_steps is None else {"max_denoising_steps": max_steps}

    def ours(n):
        engine = OfflineEngine(model, eos_token_ids=defaults.eos_token_ids)
        for i in range(n):
            params = DiffusionParams.from_request(raw | {"seed": seeds[i]}, defaults, vocab_size=model.cfg.vocab_size,
                                                  canvas_length=model.cfg.canvas_length)  # fmt: skip
            engine.scheduler.add(DiffusionRequest(prompts[i], params, MAX_NEW_TOKENS))
        rounds = 0
        with torch.inference_mode():
            while engine.scheduler.running:
                engine.scheduler.step()
                rounds += 1
        return rounds

    def profiled(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn()
        return kernel_ms(prof), out

    n = len(prompts)
    ours(1)  # warm-up
    k1, rounds1 = profiled(lambda: ours(1))
    kn, _ = profiled(lambda: ours(n))
    hk1, _ = profiled(lambda: hf.one(0))
    hkn, _ = profiled(lambda: hf.many_batched(n) if hf_batched else hf.many_sequential(n))
    x = torch.zeros(4)
    calls = []
    for _ in range(5):
        dt, _ = timed(lambda: [torch.add(x, x) for _ in range(2000)])
        calls.append(dt / 2000 * 1e6)
    return {"ours_n1": k1, "ours_n": kn, "hf_n1": hk1, "hf_n": hkn, "rounds_n1": rounds1, "dispatch_us": min(calls)}


def bounds(r, overhead, served, budget, paths, n) -> dict:
    """The keys that bound each target (see the module docstring and bench/RESULTS.md, "Targets")."""
    t = {k: median_spread(v)[0] * 1e3 for k, v in r["times"].items()}
    hf_best = min(t["hf_seq"], t["hf_batch"])
    k1, k8 = overhead[1]["kernels"], overhead[8]["kernels"]
    floor_n1 = budget["ours_n1"] + budget["rounds_n1"] * overhead[1]["ops"] * budget["dispatch_us"] / 1e3
    # request 0 alone: a request path no engine behind sglang's server avoids (timed as request 0 is, right after
    # transformers' request 0: run_rounds), then rounds that each run at least one canvas's GEMMs and attention
    path, rounds = min(paths["ar_after_hf"], paths["ours_after_hf"]), budget["rounds_n1"]
    return {
        "request_path_ms_ar": paths["ar"],
        "request_path_ms_ours": paths["ours"],
        "request_path_ms_ar_after_hf": paths["ar_after_hf"],
        "request_path_ms_ours_after_hf": paths["ours_after_hf"],
        "speedup_vs_hf_n1_path_bound": t["hf1"] / (path + rounds * served[1]["kernels"]),
        "speedup_vs_hf_n1_round_bound": t["hf1"] / (path + rounds * served[1]["wall"]),
        "round_non_kernel_ms_b1": served[1]["wall"] - served[1]["kernels"],
        "round_non_kernel_ms_for_3x": (t["hf1"] / 3 - path - rounds * served[1]["kernels"]) / rounds,
        "round_ms_served_n1": (t["ours1"] - paths["ours_after_hf"]) / rounds,
        "round_ms_after_pause_b1": served[1]["after_pause"],
        "speedup_vs_hf_n1_round_bound_after_pause": t["hf1"] / (path + rounds * served[1]["after_pause"]),
        "round_ms_for_3x": (t["hf1"] / 3 - paths["ours_after_hf"]) / rounds,
        "kernel_ms_ours_n1": budget["ours_n1"],
        "kernel_ms_hf_n1": budget["hf_n1"],
        f"kernel_ms_ours_n{n}": budget["ours_n"],
        f"kernel_ms_hf_n{n}": budget["hf_n"],
        "speedup_vs_hf_n1_zero_overhead": t["hf1"] / budget["ours_n1"],
        f"speedup_vs_hf_n{n}_zero_overhead": hf_best / budget["ours_n"],
        "rounds_n1": budget["rounds_n1"],
        "eager_ops_per_round_b1": overhead[1]["ops"],
        "dispatch_us": budget["dispatch_us"],
        "speedup_vs_hf_n1_eager_floor": t["hf1"] / floor_n1,
        "all_ops_ratio_b8": overhead[8]["all_ops"] / k8,
        "batch8_over_batch1_zero_overhead": 8 * k1 / k8,
        "batch8_over_batch1_max_at_1_5": round_bounds(k1, k8, 1.5),
    }


def round_bounds(k1: float, k8: float, ratio: float) -> float:
    """The largest tokens/s ratio of 8-canvas over 1-canvas rounds while the 8-canvas round's wall T8 <= ratio * k8.

    Per round, T1 = k1 + O1 and T8 = k8 + O8 with host overheads O1 <= O8 (an 8-canvas round does at least the host
    work of a 1-canvas one). Then 8 T1 / T8 <= 8 (k1 + T8 - k8) / T8 = 8 (1 - (k8 - k1) / T8), largest at the
    largest T8 = ratio * k8.
    """
    return 8 * (1 - (k8 - k1) / (ratio * k8))


def memory_probe(model_dir: str, batch: str) -> None:
    """(--memory-probe) Peak RSS growth in MB while ``batch`` requests run their first two rounds (prefill and first
    denoise step, then a second step), in a fresh process whose KV pool is already allocated.

    NOTE: the kernel's high-water mark is reset first (/proc/self/clear_refs, Linux): the lifetime peak comes from
    importing and loading. The parent sets glibc's mmap and trim thresholds low, so freed memory leaves the RSS.
    """
    from sgl_diffusion.entrypoints import tiny_tasks
    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_tokenizer
    from sgl_diffusion.runtime.offline import OfflineEngine
    from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
    from sgl_diffusion.sampling.params import DiffusionParams

    tok = build_tiny_tokenizer()
    prompts = [tiny_tasks.prompt_ids(tok, e) for e in tiny_tasks.eval_examples(8)]
    params = [DiffusionParams(1024, 0.1, 0.4, 0.8, 0.0, 1, seed=i) for i in range(int(batch))]
    with torch.inference_mode():
        engine = OfflineEngine(load_ours(model_dir))
        # first-call allocations (BLAS buffers, caches) out of the way: two steps of one canvas do it (its 1024 steps
        # took 14 s, half the probe's time)
        warm = DiffusionRequest(prompts[0], dataclasses.replace(params[0], max_denoising_steps=2), 1)
        engine.generate([warm])
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        for i, p in enumerate(params):
            engine.scheduler.add(DiffusionRequest(prompts[i % len(prompts)], p, 10**6))
        engine.scheduler.step()
        engine.scheduler.step()
    print((_status_kb("VmHWM") - before) / 1024)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_per_canvas(model_dir, batch: int, threads: int) -> float:
    # NOTE: the two probes run at once (each is mostly imports); each reads its own process's peak. Each gets
    # --threads torch threads like every other part of this run: two probes at torch's default (all cores) each
    # spin-wait on the other's cores, and took 43 s against 11 s on the 2-core machine.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS=str(threads))
    probes = [subprocess.Popen([sys.executable, __file__, "--memory-probe", str(model_dir), str(b)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for b in (batch, 1)]  # fmt: skip
    peaks = []
    for proc in probes:
        out, err = proc.communicate()
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
        peaks.append(float(out.strip().splitlines()[-1]))
    return (peaks[0] - peaks[1]) / (batch - 1)


# ---- output ----------------------------------------------------------------------------------------------------


def trained_dir() -> Path:
    from sgl_diffusion.entrypoints.tiny_training import trained_checkpoint

    return trained_checkpoint(log=lambda m: print(m, flush=True))


def report(args, r, overhead, served, ar, mem, same, lines, load_before, load_after) -> str:
    t, n = r["times"], args.requests
    ms = lambda k: fmt_spread(t[k], 1e3, 0)  # noqa: E731
    rows = [
        f"{'measurement':44} {'median [min..max] over ' + str(args.repeats) + ' repeats':>40}",
        f"{'transformers generate, 1 request (ms)':44} {ms('hf1'):>40}",
        f"{'our server, 1 request (ms)':44} {ms('ours1'):>40}",
        f"{f'transformers, {n} one at a time (ms)':44} {ms('hf_seq'):>40}",
        f"{f'transformers, {n} in one batched call (ms)':44} {ms('hf_batch'):>40}",
        f"{f'our server, {n} sent together (ms)':44} {ms('ours16'):>40}",
        f"{'our server, 8 one after another (ms)':44} {ms('ours8_seq'):>40}",
        f"{'our server, 8 sent together (ms)':44} {ms('ours8'):>40}",
        f"{'sglang token-by-token (tiny Llama), ms/token':44} {ar:>40.2f}",
    ]  # fmt: skip
    probes = [("", overhead)] if served is overhead else [("eager ", overhead), ("compiled ", served)]
    for kind, probe in probes:
        for b in (1, 8):
            o = probe[b]
            rows.append(f"{f'{kind}denoise round, {b} canvas(es): wall / forward / kernels / all aten ops (ms)':70} "
                        f"{o['wall']:.2f} / {o['forward']:.2f} / {o['kernels']:.2f} / {o['all_ops']:.2f}; "
                        f"{o['ops']:.0f} non-view aten calls")  # fmt: skip
            rows.append(f"{f'{kind}forward alone (ids to logits), {b} canvas(es): wall / kernels (ms)':70} "
                        f"{o['forward_alone_wall']:.2f} / {o['forward_alone_kernels']:.2f}")
    notes = (f"{n} requests: {r['tokens']} tokens in {r['canvases']} canvases, "
             f"{r['steps_per_canvas']:.2f} denoise steps "
             f"per canvas (of 48); transformers' better N={n} mode: {r['hf_mode']}; our tokens equal transformers' "
             f"(one at a time, same seeds) for {same}/{args.requests} requests; "
             f"accuracy ours {lines['accuracy_ours']:.2f}, "
             f"transformers {lines['accuracy_hf']:.2f}; {load_before} before, {load_after} after")  # fmt: skip
    return "\n".join(rows) + "\n" + notes


def write_results(args, table, lines, started, load_before, load_after) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else ""
    begin, end = "<!-- compare.py: begin -->", "<!-- compare.py: end -->"
    cmd = "python bench/compare.py " + " ".join(sys.argv[1:])
    block = (f"{begin}\n- **Command:** `.venv/bin/{cmd.strip()}`\n- **Date:** {started:%Y-%m-%d %H:%M} UTC\n"
             f"- **Machine:** {platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch "
             f"threads, torch {torch.__version__}\n- **Load:** {load_before} before, {load_after} after\n\n"
             f"```\n{table}\n" + "\n".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}"
                                       for k, v in lines.items()) + f"\n```\n{end}")  # fmt: skip
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one repeat, fewer probe rounds")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (1 with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on both sides (1 is steadier on a busy machine)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--torch-compile", action="store_true",
                   help="our server with --enable-torch-compile (canvas-only rounds compiled; warm-up compiles)")
    p.add_argument("--requests", type=int, default=16, help="N of the many-request comparison")
    p.add_argument("--max-steps", type=int, default=None,
                   help="max_denoising_steps on both sides (default: the checkpoint's, 48; smoke runs on random weights)")
    p.add_argument("--model-dir", help="a DiffusionGemma checkpoint (default: the trained tiny one, cached)")
    p.add_argument("--mem-batch", type=int, default=33, help="canvases of the larger memory probe")
    p.add_argument("--write-results", action="store_true", help="rewrite bench/RESULTS.md's compare.py section")
    p.add_argument("--memory-probe", nargs=2, metavar=("MODEL_DIR", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    return args


if __name__ == "__main__":
    main()
