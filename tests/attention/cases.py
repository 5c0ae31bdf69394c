"""Mixed canvas batches for checking an attention backend against the SDPA reference, at unit sizes.

A case is a batch (segments of every kind), a KV store holding random cached context, and random q/k/v for
each layer. ``compare`` runs the reference and a backend on copies of the store, layer by layer, and
returns the largest output and KV differences.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sgl_diffusion.attention.base import AttnLayer
from sgl_diffusion.attention.kv import TorchKVStore
from sgl_diffusion.attention.sdpa import SdpaBackend
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment

WINDOW = 8  # encode queries see themselves + 7 earlier tokens; canvases the last 7 cached ones
CANVAS = 8


@dataclass(frozen=True)
class Geometry:
    heads: int
    kv_heads: int
    head_dim: int
    sliding: bool
    k_eq_v: bool = False  # values are the keys themselves (DiffusionGemma's full layers have no v_proj)


SLIDING = Geometry(4, 2, 16, sliding=True)  # GQA 2:1
FULL = Geometry(4, 1, 32, sliding=False, k_eq_v=True)  # GQA 4:1
FULL_512 = Geometry(2, 1, 512, sliding=False, k_eq_v=True)  # the real full layers' head_dim, fewer heads
SLIDING_256 = Geometry(2, 1, 256, sliding=True)  # the real sliding layers' head_dim


def layers_of(geometries: list[Geometry], per_geometry: int = 2) -> list[AttnLayer]:
    """``per_geometry`` layers of each geometry, interleaved (layer ids 0, 1, ...)."""
    out = []
    for _ in range(per_geometry):
        for g in geometries:
            out.append(AttnLayer(len(out), g.heads, g.kv_heads, g.head_dim, WINDOW if g.sliding else None))
    return out


# (kind, cached context, own tokens, image runs); a canvas after a commit of the same request (same name)
# sees that commit's tokens in the same forward. Context lengths straddle the window (7 cached tokens).
LAYOUTS = {
    "mixed": [
        ("a", "prefill", 0, 11, ()), ("b", "commit", 13, 6, ()), ("b", "canvas", 19, CANVAS, ()),
        ("c", "canvas", 5, CANVAS, ()), ("d", "prefill", 4, 14, ((1, 11), (12, 14))), ("e", "canvas", 0, CANVAS, ()),
        ("f", "commit", 3, 5, ()),
    ],
    "canvases": [("a", "canvas", 21, CANVAS, ()), ("b", "canvas", 2, CANVAS, ()), ("c", "canvas", 7, CANVAS, ())],
    "encodes": [("a", "prefill", 0, 20, ()), ("b", "commit", 9, 4, ()), ("c", "prefill", 6, 3, ((0, 2),))],
}  # fmt: skip


@dataclass
class Case:
    batch: CanvasBatch
    layers: list[AttnLayer]
    kv: TorchKVStore  # the cached context; compare() works on copies
    qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per layer: q [N, H, D], k/v [N, KV, D]


def make_case(layout: str, geometries: list[Geometry], seed: int = 0, dtype=torch.float32) -> Case:
    gen = torch.Generator().manual_seed(seed)
    rows = LAYOUTS[layout]
    first = {name: p for name, _, p, _, _ in reversed(rows)}  # each request's context before this forward
    num_slots = 4 + sum(first.values()) + sum(n for _, kind, _, n, _ in rows if kind != "canvas")
    free = torch.randperm(num_slots, generator=gen)  # slots out of order: indices must be followed, not assumed
    context: dict[str, torch.Tensor] = {}
    segments = []
    for name, kind, p, n, runs in rows:
        if name not in context:
            context[name], free = free[:p], free[p:]
        prefix = context[name]
        assert prefix.numel() == p, (name, prefix.numel(), p)
        new = None
        if kind != "canvas":
            new, free = free[:n], free[n:]
            context[name] = torch.cat([prefix, new])
        segments.append(Segment(kind, len(segments), n, p, prefix, new, runs))
    total = sum(s.num_tokens for s in segments)
    batch = CanvasBatch(segments, torch.zeros(total, dtype=torch.long))
    layers = layers_of(geometries)
    kv = TorchKVStore(num_slots, [(l.num_kv_heads, l.head_dim) for l in layers], dtype)
    for i, layer in enumerate(layers):
        scale = layer.head_dim**-0.25  # logits of unit spread whatever the head_dim
        kv.k[i].copy_(torch.randn(kv.k[i].shape, generator=gen) * scale)
        kv.v[i].copy_(torch.randn(kv.v[i].shape, generator=gen))
    qkv = []
    for layer, g in zip(layers, geometries * 2):
        q = torch.randn(total, layer.num_heads, layer.head_dim, generator=gen) * layer.head_dim**-0.25
        k = torch.randn(total, layer.num_kv_heads, layer.head_dim, generator=gen) * layer.head_dim**-0.25
        v = k if g.k_eq_v else torch.randn(total, layer.num_kv_heads, layer.head_dim, generator=gen)
        qkv.append((q.to(dtype), k.to(dtype), v.to(dtype)))
    return Case(batch, layers, kv, qkv)


def run_backend(case: Case, make_backend) -> tuple[list[torch.Tensor], TorchKVStore]:
    """Plan once, run every layer; ``make_backend(kv, layers)``. Returns per-layer outputs and the store."""
    kv = copy.deepcopy(case.kv)
    backend = make_backend(kv, case.layers)
    batch = CanvasBatch(case.batch.segments, case.batch.input_ids)
    backend.plan(batch)
    outs = [backend.forward(q, k, v, layer, batch) for layer, (q, k, v) in zip(case.layers, case.qkv)]
    return outs, kv


def reference(kv, layers) -> SdpaBackend:
    return SdpaBackend(kv, WINDOW)


def compare(case: Case, make_backend) -> tuple[float, float]:
    """(largest |output - reference|, largest |KV - reference KV|) over every layer."""
    ref_outs, ref_kv = run_backend(case, reference)
    outs, kv = run_backend(case, make_backend)
    out_err = max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, ref_outs))
    kv_err = max((a.float() - b.float()).abs().max().item()
                 for buffers, ref in ((kv.k, ref_kv.k), (kv.v, ref_kv.v)) for a, b in zip(buffers, ref))  # fmt: skip
    return out_err, kv_err


class HostSyncs(TorchDispatchMode):
    """Records ops that make the host read a tensor's values (a device sync on a GPU), except while ``paused()``."""

    SYNCS = ("_local_scalar_dense", "nonzero", "masked_select", "item")

    def __init__(self, paused: Callable[[], bool] = lambda: False):
        super().__init__()
        self.paused = paused
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused() and any(s in str(func) for s in self.SYNCS):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))
