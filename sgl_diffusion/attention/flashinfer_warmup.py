"""Build FlashInfer's kernels for DiffusionGemma before the first request.

FlashInfer 0.7.2 ships no precompiled head_dim 512 prefill kernels (the full-attention layers), and JIT-compiles
them with nvcc on first use: without this, the first request that reaches a full layer waits for nvcc (minutes).

It runs our own ``FlashInferBackend`` (not a copy of its calls) on one mixed batch at the model's geometry, so
exactly the wrappers and plan arguments the server uses get compiled: per layer geometry (sliding: head_dim 256,
8 KV heads, window 1024; full: head_dim 512, 2 KV heads, K = V; 16 query heads), an encode (causal, window on
sliding layers), an image prefill (custom mask), canvases with and without a visible prefix (ragged + paged +
``merge_state_in_place``), in bf16. Three ways to run it:

    python -m sgl_diffusion.attention.flashinfer_warmup                  # GPU: plan + run, checked against SDPA
    FLASHINFER_CUDA_ARCH_LIST="9.0" python -m sgl_diffusion.attention.flashinfer_warmup --compile-only
                                                                          # no GPU, nvcc: compile the same modules
    python -m sgl_diffusion.attention.flashinfer_warmup --plan-only      # anywhere: print what would be built

``--model-path DIR`` reads the geometry from a checkpoint's config.json (default: the real 26B-A4B's).
``--compile-only`` targets the architectures of ``FLASHINFER_CUDA_ARCH_LIST``; FlashInfer keys its cache
directory by that set, so the server must run with the same variable (docker/Dockerfile sets both).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import time
from dataclasses import dataclass

import torch

from sgl_diffusion.attention.base import AttnLayer, layer_groups
from sgl_diffusion.attention.kv import TorchKVStore
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment

FA3_HEAD_DIMS = (64, 128, 256)  # FlashInfer's FA3 prefill head dims (SM90 only); 512 always runs FA2
# google/diffusiongemma-26B-A4B-it (reference/diffusiongemma_arch.md section 2)
REAL_LAYERS = (AttnLayer(0, 16, 8, 256, 1024), AttnLayer(1, 16, 2, 512, None))
REAL_CANVAS = 256
KV_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


# ---- geometry and batch -------------------------------------------------------------------------------------


def model_layers(model_path: str | None) -> tuple[tuple[AttnLayer, ...], int]:
    """(one AttnLayer per layer geometry, renumbered 0..k-1; canvas length) of a checkpoint, or the real model's."""
    if model_path is None:
        return REAL_LAYERS, REAL_CANVAS
    from transformers import AutoConfig

    from sgl_diffusion.models.config import DiffusionGemmaConfig

    cfg = DiffusionGemmaConfig.from_hf(AutoConfig.from_pretrained(model_path))
    layers = [AttnLayer(i, cfg.num_heads, s.num_kv_heads, s.head_dim, cfg.sliding_window if s.sliding else None)
              for i, s in enumerate(cfg.layers)]  # fmt: skip
    return tuple(AttnLayer(i, g.num_heads, g.num_kv_heads, g.head_dim, g.window)
                 for i, g in enumerate(layer_groups(layers))), cfg.canvas_length  # fmt: skip


def warmup_batch(window: int | None, canvas: int, device="cpu") -> tuple[CanvasBatch, int]:
    """(a batch with every segment kind and call path, KV slots it uses).

    A prefill from scratch; a commit after more cached tokens than the window (sliding layers see only W - 1 of
    them); an image prefill (custom mask); a canvas reading that commit in the same forward; a canvas with no
    prefix (the backend's partial-prefix path). Lengths are small except the canvases (the real C).
    """
    long_context = (window or 64) + 8
    layout = [("a", "prefill", 0, 16, ()), ("b", "commit", long_context, 16, ()), ("c", "prefill", 4, 12, ((2, 10),)),
              ("b", "canvas", None, canvas, ()), ("d", "canvas", 0, canvas, ())]  # fmt: skip
    next_slot, context, segments = 0, {}, []

    def take(n: int) -> torch.Tensor:
        nonlocal next_slot
        next_slot += n
        return torch.arange(next_slot - n, next_slot, device=device)

    for name, kind, cached, n, runs in layout:
        prefix = context[name] if name in context else take(cached)
        new = None if kind == "canvas" else take(n)
        if new is not None:
            context[name] = torch.cat([prefix, new])
        segments.append(Segment(kind, len(segments), n, prefix.numel(), prefix, new, runs))
    total = sum(s.num_tokens for s in segments)
    return CanvasBatch(segments, torch.zeros(total, dtype=torch.long, device=device)), next_slot


# ---- recording the plans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanCall:
    wrapper: str  # "paged" or "ragged"
    backend: str  # as constructed ("fa2", "auto")
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    window_left: int
    custom_mask: bool
    q_dtype: torch.dtype
    kv_dtype: torch.dtype


@dataclass(frozen=True)
class JitModule:
    """What FlashInfer compiles one batch-prefill module for (its ``get_batch_prefill_module`` arguments)."""

    backend: str  # "fa2" or "fa3"
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    head_dim: int
    sliding_window: bool  # window_left >= 0 is a compile-time flag


class _Recorded:
    """A FlashInfer wrapper whose plan() calls are recorded, then forwarded (``cls`` None: record only)."""

    def __init__(self, cls, kind: str, calls: list, *args, **kwargs):
        self._wrapper = cls(*args, **kwargs) if cls is not None else None
        self._kind, self._calls = kind, calls
        self._backend = kwargs.get("backend", "auto")

    def plan(self, *args, **kw):
        self._calls.append(PlanCall(
            self._kind, self._backend, kw["num_qo_heads"], kw["num_kv_heads"], kw["head_dim_qk"],
            bool(kw.get("causal", False)), int(kw.get("window_left", -1)), kw.get("custom_mask") is not None,
            kw["q_data_type"], kw.get("kv_data_type") or kw["q_data_type"],
        ))  # fmt: skip
        if self._wrapper is not None:
            return self._wrapper.plan(*args, **kw)

    def __getattr__(self, name):
        return getattr(self._wrapper, name)


class RecordingApi:
    """The ``flashinfer`` module as our backend sees it, recording every plan; ``api`` None plans nothing (CPU)."""

    def __init__(self, api=None):
        self.api, self.plans = api, []
        cls = (lambda name: getattr(api, name)) if api is not None else (lambda name: None)
        self.BatchPrefillWithPagedKVCacheWrapper = functools.partial(
            _Recorded, cls("BatchPrefillWithPagedKVCacheWrapper"), "paged", self.plans)
        self.BatchPrefillWithRaggedKVCacheWrapper = functools.partial(
            _Recorded, cls("BatchPrefillWithRaggedKVCacheWrapper"), "ragged", self.plans)

    def merge_state_in_place(self, *args, **kwargs):
        return self.api.merge_state_in_place(*args, **kwargs)


def make_backend(layers, canvas: int, api, device, dtype=torch.bfloat16, kv_dtype=torch.bfloat16,
                 workspace_bytes: int | None = None):
    """(FlashInferBackend over a fresh KV store, the warm-up batch, the store) at ``layers``' geometry."""
    from sgl_diffusion.attention.flashinfer import WORKSPACE_BYTES, FlashInferBackend

    windows = {layer.sliding_window for layer in layers} - {None}
    batch, slots = warmup_batch(min(windows) if windows else None, canvas, device)
    kv = TorchKVStore(slots, [(layer.num_kv_heads, layer.head_dim) for layer in layers], kv_dtype, device)
    for buf in kv.k + kv.v:  # unit-spread logits whatever the head_dim (zeros would hide a wrong kernel)
        buf.copy_((torch.randn(buf.shape, device=device) * buf.shape[-1] ** -0.25).to(kv_dtype))
    backend = FlashInferBackend(kv, layers, dtype, device, api=api,
                                workspace_bytes=WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes)
    return backend, batch, kv


def plan_calls(layers=REAL_LAYERS, canvas: int = REAL_CANVAS, dtype=torch.bfloat16,
               kv_dtype=torch.bfloat16) -> list[PlanCall]:
    """Every plan our backend makes for the warm-up batch, on the CPU with a recording stub (no FlashInfer)."""
    api = RecordingApi()
    backend, batch, _ = make_backend(layers, canvas, api, "cpu", dtype, kv_dtype, workspace_bytes=0)
    backend.plan(batch)
    return api.plans


def jit_modules(plans: list[PlanCall], archs: set[int]) -> list[JitModule]:
    """The batch-prefill modules FlashInfer compiles for ``plans`` on GPUs of compute-capability majors ``archs``.

    Paged wrappers are FA2. Our ragged canvas wrapper is ``auto`` on Hopper (FlashInfer picks FA3 where FA3 has the
    head_dim and there is no custom mask), FA2 elsewhere: a mixed set of architectures needs both.
    """
    out = []
    for p in plans:
        backends = ["fa2"]
        if p.wrapper == "ragged" and p.head_dim in FA3_HEAD_DIMS and not p.custom_mask:
            backends = (["fa3"] if 9 in archs else []) + (["fa2"] if archs - {9} else [])
        for b in backends:
            module = JitModule(b, p.q_dtype, p.kv_dtype, p.head_dim, p.window_left >= 0)
            if module not in out:
                out.append(module)
    return out


# ---- the three modes --------------------------------------------------------------------------------------


def run_on_gpu(layers, canvas: int, kv_dtype=torch.bfloat16, check: bool = True) -> dict:
    """Plan and run every layer geometry once on the current CUDA device (compiles what is missing); with
    ``check``, the largest |output - SDPA reference| over the batch."""
    import flashinfer

    from sgl_diffusion.attention.sdpa import SdpaBackend

    device, dtype = torch.device("cuda"), torch.bfloat16
    api = RecordingApi(flashinfer)
    start = time.perf_counter()
    backend, batch, kv = make_backend(layers, canvas, api, device, dtype, kv_dtype)
    reference_kv = copy.deepcopy(kv)
    backend.plan(batch)
    n = batch.input_ids.numel()
    qkv = []
    for layer in layers:
        q = torch.randn(n, layer.num_heads, layer.head_dim, device=device) * layer.head_dim**-0.25
        k = torch.randn(n, layer.num_kv_heads, layer.head_dim, device=device) * layer.head_dim**-0.25
        v = k if layer.sliding_window is None else torch.randn_like(k)  # K = V on full layers
        qkv.append((q.to(dtype), k.to(dtype), v.to(dtype)))
    outs = [backend.forward(q, k, v, layer, batch) for layer, (q, k, v) in zip(layers, qkv)]
    torch.cuda.synchronize()
    result = {"seconds": time.perf_counter() - start, "plans": api.plans, "max_abs_err": None}
    if check and kv_dtype == dtype:
        windows = {layer.sliding_window for layer in layers} - {None}
        ref = SdpaBackend(reference_kv, min(windows) if windows else None)
        ref_batch = CanvasBatch(batch.segments, batch.input_ids)
        ref.plan(ref_batch)
        result["max_abs_err"] = max((o.float() - ref.forward(q, k, v, layer, ref_batch).float()).abs().max().item()
                                    for o, layer, (q, k, v) in zip(outs, layers, qkv))  # fmt: skip
    return result


def target_archs() -> set[int]:
    """Compute-capability majors of FLASHINFER_CUDA_ARCH_LIST (e.g. "9.0 10.0" -> {9, 10})."""
    value = os.environ.get("FLASHINFER_CUDA_ARCH_LIST", "").split()
    return {int(a.split(".")[0]) for a in value}


def compile_only(modules: list[JitModule]) -> list[str]:
    """Compile ``modules`` and the merge kernel with nvcc, no GPU needed; returns FlashInfer's module names."""
    from flashinfer.jit.attention.modules import _gen_batch_prefill_primary_module, gen_batch_prefill_module
    from flashinfer.jit.cascade import gen_cascade_module

    specs = [gen_cascade_module()]
    for m in modules:
        # fa2: get_batch_prefill_module builds the equal-stride primary (our K and V pools share strides)
        gen = _gen_batch_prefill_primary_module if m.backend == "fa2" else gen_batch_prefill_module
        specs.append(gen(m.backend, m.q_dtype, m.kv_dtype, m.q_dtype, torch.int32, m.head_dim, m.head_dim,
                         0, m.sliding_window, False, False))  # pos_encoding NONE, no soft cap, no fp16 QK reduction
    for spec in specs:
        spec.build()
    return [spec.name for spec in specs]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", help="checkpoint directory (default: the real 26B-A4B geometry)")
    ap.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="bf16", help="the server's --kv-cache-dtype")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--compile-only", action="store_true", help="no GPU: nvcc for FLASHINFER_CUDA_ARCH_LIST")
    mode.add_argument("--plan-only", action="store_true", help="print the plans and modules, build nothing")
    args = ap.parse_args(argv)
    layers, canvas = model_layers(args.model_path)
    kv_dtype = KV_DTYPES[args.kv_dtype]
    for g in layer_groups(layers):
        print(f"geometry: {g.num_heads} heads, {g.num_kv_heads} KV heads, head_dim {g.head_dim}, "
              f"{'window ' + str(g.window) if g.window else 'full attention'}")  # fmt: skip
    if args.plan_only or args.compile_only:
        archs = target_archs()
        if args.compile_only and not archs:
            raise SystemExit("--compile-only needs FLASHINFER_CUDA_ARCH_LIST (e.g. '9.0' for H100/H200)")
        modules = jit_modules(plan_calls(layers, canvas, kv_dtype=kv_dtype), archs or {9})
        for m in modules:
            print(f"module: {m.backend} head_dim {m.head_dim} q {m.q_dtype} kv {m.kv_dtype} "
                  f"sliding_window={m.sliding_window}")  # fmt: skip
        if args.compile_only:
            start = time.perf_counter()
            names = compile_only(modules)
            print(f"compiled {len(names)} FlashInfer modules in {time.perf_counter() - start:.0f} s")
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --compile-only (nvcc + FLASHINFER_CUDA_ARCH_LIST) or --plan-only")
    result = run_on_gpu(layers, canvas, kv_dtype)
    err = result["max_abs_err"]
    print(f"warmed {len(result['plans'])} FlashInfer plans in {result['seconds']:.1f} s"
          + ("" if err is None else f"; max |FlashInfer - SDPA| = {err:.3g}"))  # fmt: skip
    if err is not None and err > 0.1:  # bf16 inputs of unit spread: a correct kernel is ~1e-2
        raise SystemExit(f"FlashInfer output differs from the SDPA reference by {err:.3g}")


if __name__ == "__main__":
    main()
