"""Concurrency sweep with sglang's own load generator against a real server on the tiny checkpoint.

    .venv/bin/python bench/bench_serving.py --concurrencies 1,4,8,16 --num-prompts 32 --repeats 3

Starts `python -m sglang.launch_server` on a tiny DiffusionGemma checkpoint (built into a temporary directory
unless --model-dir is given; --url uses a running server instead) and runs, for each concurrency,

    python -m sglang.bench_serving --backend sglang --dataset-name random-ids --max-concurrency C ...

"random-ids" draws prompt token ids from the tokenizer's vocabulary; "random" would download ShareGPT. The
sglang backend sends {"text", "sampling_params": {temperature, max_new_tokens, ignore_eos}}; an
--extra-request-body "sampling_params" replaces that dict whole, so it repeats max_new_tokens (--output-len for
every request: --random-range-ratio 1) and adds {"diffusion": {"max_denoising_steps": --steps}}. Every canvas
takes exactly --steps steps (confidence_threshold 0 turns off early stopping), so the work per token is the
same at every concurrency. The radix cache is flushed before each run (--flush-cache).

Prints, per concurrency, the median over --repeats runs of output throughput (generated tokens/s over the
run), its ratio to concurrency 1, mean end-to-end latency and median TTFT (first committed canvas). Every run
must complete all its requests, or the script exits 1.

These are CPU figures on a tiny random model: Python/dispatch overhead and how well one forward over many
canvases amortises it, not GPU throughput of the real 26B checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import start_server, stop_server


def bench_cmd(url, tokenizer, *, concurrency, num_prompts, input_len, output_len, steps, output_file, seed=1):
    extra = {"sampling_params": {"max_new_tokens": output_len, "ignore_eos": True,
                                 "diffusion": {"max_denoising_steps": steps, "confidence_threshold": 0}}}
    return [
        sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", url,
        "--tokenizer", str(tokenizer), "--dataset-name", "random-ids", "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--random-range-ratio", "1", "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--request-rate", "inf", "--extra-request-body", json.dumps(extra),
        "--seed", str(seed), "--warmup-requests", "1", "--flush-cache", "--disable-tqdm",
        "--output-file", str(output_file),
    ]  # fmt: skip


def run_once(cmd, output_file: Path, num_prompts: int) -> dict:
    output_file.unlink(missing_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not output_file.exists():
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"bench_serving failed with exit code {proc.returncode}")
    result = json.loads(output_file.read_text().splitlines()[-1])
    if result["completed"] != num_prompts:
        print(proc.stdout[-3000:])
        raise SystemExit(f"only {result['completed']} of {num_prompts} requests completed")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrencies", default="1,4,8,16")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128, help="tokens per request (4 canvases of 32 on tiny)")
    p.add_argument("--steps", type=int, default=8, help="denoise steps per canvas (exactly: no early stop)")
    p.add_argument("--repeats", type=int, default=3, help="runs per concurrency, interleaved; figures are medians")
    p.add_argument("--model-dir", type=Path, help="checkpoint dir (default: build the tiny one in a temp dir)")
    p.add_argument("--url", help="use this running server instead of starting one (--model-dir = its tokenizer)")
    p.add_argument("--server-arg", action="append", default=[], help="extra launch_server argument (repeatable)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS for the server (0: torch's default, all cores); 1 is steadier when other "
                        "processes share the cores")
    args = p.parse_args()
    concurrencies = [int(c) for c in args.concurrencies.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tmp = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_checkpoint

            model_dir = Path(build_tiny_checkpoint(tmp / "tiny"))
        if args.url:
            proc, url = None, args.url
        else:
            print(f"server: OMP_NUM_THREADS={args.threads} launch_server --model-path {model_dir} {' '.join(args.server_arg)}")
            proc, url = start_server(model_dir, tmp / "server.log", args.server_arg, args.threads)
        try:
            print(f"loadavg before: {os.getloadavg()}", flush=True)
            runs: dict[int, list[dict]] = {c: [] for c in concurrencies}
            t0 = time.time()
            for r in range(args.repeats):  # interleaved, so a burst of outside load hits every concurrency alike
                for c in concurrencies:
                    out = tmp / f"c{c}.jsonl"
                    cmd = bench_cmd(url, model_dir, concurrency=c, num_prompts=args.num_prompts,
                                    input_len=args.input_len, output_len=args.output_len, steps=args.steps,
                                    output_file=out)
                    if r == 0 and c == concurrencies[0]:
                        print("client:", " ".join(cmd[1:]).replace(url, "$URL"), flush=True)
                    res = run_once(cmd, out, args.num_prompts)
                    runs[c].append(res)
                    print(f"  repeat {r} concurrency {c:>2}: {res['output_throughput']:8.1f} tok/s "
                          f"({res['duration']:.2f} s, loadavg {os.getloadavg()[0]:.2f})", flush=True)
            print(f"loadavg after: {os.getloadavg()}; sweep took {time.time() - t0:.0f} s")
        finally:
            if proc is not None:
                stop_server(proc)

    med = {c: {k: statistics.median(r[k] for r in runs[c])
               for k in ("output_throughput", "request_throughput", "mean_e2e_latency_ms", "median_ttft_ms",
                         "duration")} for c in concurrencies}
    base = med[concurrencies[0]]["output_throughput"]
    print(f"\n{args.num_prompts} prompts x {args.output_len} tokens ({args.input_len}-token random-id prompts), "
          f"{args.steps} steps per canvas, median of {args.repeats}")
    print(f"{'concurrency':>11} {'output tok/s':>12} {'vs c=' + str(concurrencies[0]):>8} {'req/s':>7} "
          f"{'mean e2e ms':>11} {'median TTFT ms':>14} {'run s':>6}  (all runs)")
    for c in concurrencies:
        m = med[c]
        every = ", ".join(f"{r['output_throughput']:.0f}" for r in runs[c])
        print(f"{c:>11} {m['output_throughput']:>12.1f} {m['output_throughput'] / base:>7.2f}x "
              f"{m['request_throughput']:>7.2f} {m['mean_e2e_latency_ms']:>11.0f} {m['median_ttft_ms']:>14.0f} "
              f"{m['duration']:>6.2f}  ({every})")


if __name__ == "__main__":
    main()
