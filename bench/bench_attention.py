"""Times the attention of one mixed forward per backend at DiffusionGemma's shapes, on a GPU host.

    .venv/bin/python bench/bench_attention.py                      # CUDA: flashinfer, triton, torch_native
    .venv/bin/python bench/bench_attention.py --canvases 8 --prefix 8192 --backends flashinfer triton
    .venv/bin/python bench/bench_attention.py --tiny               # CPU smoke run at unit sizes (seconds)

One mixed forward: B canvases (256 positions each) over a P-token cached context, one commit (256 tokens) after the
same context and one 1024-token prefill, through the attention of all 30 layers (25 sliding: 16 heads, 8 KV heads,
head_dim 256, window 1024; 5 full: 16 heads, 2 KV heads, head_dim 512, K = V), in bf16. q/k/v and the cached KV are
random (logits of unit spread); the B canvases share one context (as requests with one radix-cached prompt do), so
the pool stays a few GB at P = 8k. The model's projections, MoE and sampler are not timed: only plan() (host, once
per forward) and the 30 per-layer forward() calls (CUDA events), after --warmup forwards, median of --repeats.
Each backend's output of the first forward is also compared with the SDPA reference (max |diff| over all layers,
bf16), so the run reports numerics next to speed. One line per (B, P, backend), then one summary line.

On a CPU it refuses unless --tiny (unit shapes: the reference, and Triton when TRITON_INTERPRET=1 is set).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from sgl_diffusion.attention import create_attention_backend
from sgl_diffusion.attention.base import AttnLayer
from sgl_diffusion.attention.kv import TorchKVStore
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment

# (heads, kv_heads, head_dim, window) of DiffusionGemma-26B-A4B's layers: 5 sliding then 1 full, 5 times
REAL = dict(layers=30, heads=16, sliding=(8, 256), full=(2, 512), window=1024, canvas=256, commit=256, prefill=1024)
TINY = dict(layers=6, heads=4, sliding=(2, 16), full=(1, 32), window=8, canvas=8, commit=8, prefill=12)


def model_layers(shape: dict) -> list[AttnLayer]:
    out = []
    for i in range(shape["layers"]):
        full = i % 6 == 5
        kv_heads, head_dim = shape["full"] if full else shape["sliding"]
        out.append(AttnLayer(i, shape["heads"], kv_heads, head_dim, None if full else shape["window"]))
    return out


def mixed_forward(shape: dict, canvases: int, prefix: int, layers: list[AttnLayer], dtype, device, seed: int):
    """(batch, KV store holding the context, per-layer q/k/v)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    c, commit, prefill = shape["canvas"], shape["commit"], shape["prefill"]
    context = torch.arange(prefix)
    commit_slots = torch.arange(prefix, prefix + commit)
    prefill_slots = torch.arange(prefix + commit, prefix + commit + prefill)
    segments = [Segment("commit", 0, commit, prefix, context, commit_slots),
                Segment("prefill", 1, prefill, 0, torch.empty(0, dtype=torch.long), prefill_slots)]  # fmt: skip
    segments += [Segment("canvas", 2 + i, c, prefix, context) for i in range(canvases)]
    for seg in segments:
        seg.prefix_slots = seg.prefix_slots.to(device)
        seg.new_slots = None if seg.new_slots is None else seg.new_slots.to(device)
    n = sum(s.num_tokens for s in segments)
    batch = CanvasBatch(segments, torch.zeros(n, dtype=torch.long, device=device))
    kv = TorchKVStore(prefix + commit + prefill, [(l.num_kv_heads, l.head_dim) for l in layers], dtype, device)
    qkv = {}
    for layer in layers:
        scale = layer.head_dim**-0.25
        kv.k[layer.layer_id].copy_(torch.randn(kv.k[layer.layer_id].shape, generator=gen) * scale)
        kv.v[layer.layer_id].copy_(torch.randn(kv.v[layer.layer_id].shape, generator=gen))
        key = (layer.num_kv_heads, layer.head_dim)
        if key not in qkv:  # one q/k/v per geometry; the KV buffers stay per layer
            q = torch.randn(n, layer.num_heads, layer.head_dim, generator=gen) * scale
            k = torch.randn(n, layer.num_kv_heads, layer.head_dim, generator=gen) * scale
            v = k if layer.sliding_window is None else torch.randn(n, layer.num_kv_heads, layer.head_dim, generator=gen)
            qkv[key] = tuple(t.to(device, dtype) for t in (q, k, v))
    return batch, kv, [qkv[l.num_kv_heads, l.head_dim] for l in layers]


def run_once(backend, batch, layers, qkv) -> tuple[list[torch.Tensor], float, float]:
    """(outputs, plan ms, forward ms over all layers)."""
    batch = CanvasBatch(batch.segments, batch.input_ids)
    cuda = batch.input_ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    backend.plan(batch)
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t1 = time.perf_counter()
    outs = [backend.forward(q, k, v, layer, batch) for layer, (q, k, v) in zip(layers, qkv)]
    if cuda:
        end.record()
        torch.cuda.synchronize()
        forward_ms = start.elapsed_time(end)
    else:
        forward_ms = (time.perf_counter() - t1) * 1e3
    return outs, (t1 - t0) * 1e3, forward_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--canvases", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prefix", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--backends", nargs="+", default=None, help="default: flashinfer triton torch_native on CUDA")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="unit shapes, any device (a smoke run, not a benchmark)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("bench_attention times GPU kernels: run it on a CUDA host (or --tiny for a CPU smoke run)")
    shape = TINY if args.tiny else REAL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = args.backends or (["flashinfer", "triton", "torch_native"] if device.type == "cuda" else
                                 ["torch_native"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []))
    if args.tiny:
        args.canvases, args.prefix = [min(b, 2) for b in args.canvases], [min(p, 20) for p in args.prefix]
    layers = model_layers(shape)
    results = []
    for prefix in sorted(set(args.prefix)):
        for canvases in sorted(set(args.canvases)):
            batch, kv, qkv = mixed_forward(shape, canvases, prefix, layers, dtype, device, args.seed)
            reference = None
            for name in ["torch_native"] + [b for b in backends if b != "torch_native"]:
                backend = create_attention_backend(name, copy.deepcopy(kv), layers, dtype, device)
                outs, _, _ = run_once(backend, batch, layers, qkv)  # FlashInfer JIT-compiles its 512 kernels here
                if reference is None:
                    reference = outs
                err = max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, reference))
                if name not in backends:
                    continue
                for _ in range(args.warmup):
                    run_once(backend, batch, layers, qkv)
                plans, forwards = zip(*(run_once(backend, batch, layers, qkv)[1:] for _ in range(args.repeats)))
                plan_ms, forward_ms = statistics.median(plans), statistics.median(forwards)
                results.append((name, canvases, prefix, plan_ms + forward_ms))
                print(f"canvases {canvases:3d}  prefix {prefix:5d}  {name:12s}  plan {plan_ms:8.3f} ms  "
                      f"forward {forward_ms:9.3f} ms ({len(layers)} layers)  max|diff| vs sdpa {err:.2e}", flush=True)
    fastest = {}
    for name, canvases, prefix, ms in results:
        key = (canvases, prefix)
        if key not in fastest or ms < fastest[key][1]:
            fastest[key] = (name, ms)
    summary = ", ".join(f"B={b} P={p}: {name}" for (b, p), (name, _) in sorted(fastest.items()))
    shapes = "tiny" if args.tiny else "DiffusionGemma"
    print(f"bench_attention ({device.type}, {dtype}, {shapes} shapes) fastest: {summary}")


if __name__ == "__main__":
    main()
