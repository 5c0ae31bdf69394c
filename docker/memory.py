"""GPU memory of DiffusionGemma-26B-A4B, computed from its config: weights, KV per token, KV room per GPU.

    .venv/bin/python docker/memory.py                          # the real checkpoint's values
    .venv/bin/python docker/memory.py --config DIR/config.json  # any DiffusionGemma config.json
    .venv/bin/python docker/memory.py --canvases 16 --context 32768

Text shapes come from ``bench/roofline.py``'s ``Arch`` (one reader of the config for both scripts); this adds what
a server holds beyond them: the norms, the vision tower and its projection, and the per-rank split at TP 2.

- Weights: bf16 = 2 bytes per parameter. FP8 (``--quantization fp8``, or an FP8 checkpoint): the attention
  projections, the dense and self-conditioning MLPs and the routed experts (22.8B of the 24.5B linear parameters,
  held in fp8 with their scales: README "Quantized weights") at 1 byte. The tied embedding, routers, norms and
  the vision tower stay bf16 (the per-expert / block scales are < 0.1%, not counted).
- KV per token: sliding layers K and V of ``num_key_value_heads x head_dim``; full layers have one k_proj (K = V
  in the checkpoint) but the pool still holds two tensors: K is q/k-normed and rotated, V is the scale-free norm of
  the same projection, unrotated (``Attention`` in sgl_diffusion/models/layers.py stores both).
  A request of L tokens needs its full layers at L tokens and its sliding layers at min(L, window) (a sliding
  layer never reads further back than window - 1 tokens).
- Pool: sglang 0.5.23 serves the model with its hybrid SWA pool: per full-layer token, ``--swa-full-tokens-ratio``
  (default 0.8) sliding-layer tokens. Requests that fit are printed at that ratio and at window / context (where
  the sliding pool holds exactly each request's window).
- TP: attention heads, experts, the dense MLPs and the vocab-parallel embedding split across ranks; KV heads split
  while there are at least as many heads as ranks, else they are replicated (full layers: 2 KV heads, so TP 2
  keeps 1 per rank and TP 4 would replicate). Norms, routers and the vision tower are counted whole on every rank
  (conservative: the vision tower is 1.1 GB).
- Margin: what the KV pool must leave free, ``--fixed-gib`` (CUDA context, NCCL, cuBLAS and FlashInfer workspaces,
  CUDA graphs) plus, per concurrently denoised canvas, ``--logit-buffers`` float32 [C, V] buffers (the logits, the
  self-conditioning probabilities and the sampler's scratch: 268 MB each at C = 256, V = 262144).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench/ is a plain folder

from bench.roofline import Arch  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
# usable memory per GPU as nvidia-smi reports it (total, not free); not measured here
GPUS = {"H100 80GB": 81559 * MIB, "H200 141GB": 143771 * MIB}

# the real checkpoint's vision tower (HF converter's _VISION_CONFIG; reference/diffusiongemma_arch.md section 2)
REAL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   num_key_value_heads=16, head_dim=72, patch_size=16, position_embedding_size=10240)  # fmt: skip


@dataclass(frozen=True)
class Params:
    text_linear: int  # attention projections, dense MLP, experts, self-conditioning MLP
    experts: int  # the routed experts, part of text_linear (fp8 under FP8, like the rest of it)
    embedding: int  # tied input embedding / LM head
    small: int  # norms, routers (proj, scale, per-expert scale)
    vision: int  # vision tower + its projection into the text model

    @property
    def total(self) -> int:
        return self.text_linear + self.embedding + self.small + self.vision


def norm_params(a: Arch) -> int:
    """RMSNorm weights (7 of hidden size per layer, q/k norms of head_dim), router scales, final and
    self-conditioning norms; v_norm has no weight."""
    per_layer = 7 * a.hidden + a.hidden + a.experts  # norms, router.scale, router.per_expert_scale
    sliding = a.layers - a.full_layers
    return (sliding * (per_layer + 2 * a.sliding_head_dim) + a.full_layers * (per_layer + 2 * a.full_head_dim)
            + 2 * a.hidden)  # fmt: skip


def vision_params(v: dict, text_hidden: int) -> int:
    """Gemma 4 vision tower (patch embedding, 2-D position table, ViT layers with q/k norms) + embed_vision."""
    h, heads, kv, d = v["hidden_size"], v["num_attention_heads"], v["num_key_value_heads"], v["head_dim"]
    layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * v["intermediate_size"] + 4 * h + 2 * d
    embed = 3 * v["patch_size"] ** 2 * h + 2 * v["position_embedding_size"] * h
    return v["num_hidden_layers"] * layer + embed + h * text_hidden


def params(a: Arch, vision: dict | None) -> Params:
    routers = a.layers * a.experts * a.hidden
    embedding = a.vocab * a.hidden
    linear = a.total_params - embedding - routers  # roofline's count: linear layers + routers + embedding
    experts = a.layers * a.experts * 3 * a.hidden * a.moe_intermediate  # gate, up, down of every expert
    vision_total = vision_params(vision, a.hidden) if vision else 0
    return Params(linear, experts, embedding, routers + norm_params(a), vision_total)


def weight_bytes(p: Params, fp8: bool, tp: int = 1) -> int:
    """Bytes of weights on one of ``tp`` ranks; with ``fp8``, every text linear layer (experts too) at 1 byte."""
    one_byte = p.text_linear if fp8 else 0
    sharded = one_byte + (p.text_linear - one_byte) * 2 + p.embedding * 2
    return -(-sharded // tp) + (p.small + p.vision) * 2


def kv_heads_per_rank(heads: int, tp: int) -> int:
    return heads // tp if heads >= tp else 1  # sglang replicates KV heads when the ranks outnumber them


def kv_bytes_per_token(a: Arch, tp: int = 1, kv_bytes: int = 2) -> tuple[int, int]:
    """(full layers, sliding layers) KV bytes per token of context on one rank, all layers of each kind summed."""
    full = a.full_layers * 2 * kv_heads_per_rank(a.full_kv_heads, tp) * a.full_head_dim * kv_bytes
    sliding_layers = a.layers - a.full_layers
    sliding = sliding_layers * 2 * kv_heads_per_rank(a.sliding_kv_heads, tp) * a.sliding_head_dim * kv_bytes
    return full, sliding


def margin_bytes(a: Arch, canvases: int, fixed_gib: float, logit_buffers: int) -> int:
    return int(fixed_gib * GIB) + canvases * logit_buffers * a.canvas * a.vocab * 4


SGLANG_SWA_RATIO = 0.8  # sglang 0.5.23's --swa-full-tokens-ratio fallback (arg_groups/fields/schedule.py)


@dataclass(frozen=True)
class Room:
    gpu: str
    tp: int
    fp8: bool
    weights: int  # per rank
    margin: int
    kv_room: int  # per rank, what the KV pool may take (negative: the weights do not fit)
    full_tokens: int  # full-layer pool tokens at swa_ratio (the sliding layers' pool holds swa_ratio x as many)
    requests: float  # requests of `context` tokens that fit both pools at swa_ratio
    best_requests: float  # ... at swa_ratio = min(1, window / context): sliding layers hold just their window


def pool_tokens(kv_room: int, full: int, sliding: int, swa_ratio: float) -> int:
    """Full-layer tokens of sglang's hybrid SWA pool: each costs its full-layer KV plus swa_ratio sliding tokens
    (pool_configurator.py: cell size = full + swa_full_tokens_ratio x swa)."""
    return int(max(kv_room, 0) // (full + swa_ratio * sliding))


def fitting_requests(tokens: int, swa_ratio: float, context: int, window: int) -> float:
    """Requests of ``context`` tokens both pools hold, the sliding one keeping only each request's window (sglang's
    SWA cache frees what falls out of it)."""
    return min(tokens / context, swa_ratio * tokens / min(context, window))


def room(a: Arch, p: Params, gpu: str, tp: int, fp8: bool, margin: int, context: int,
         swa_ratio: float = SGLANG_SWA_RATIO) -> Room:
    w = weight_bytes(p, fp8, tp)
    kv = GPUS[gpu] - w - margin
    full, sliding = kv_bytes_per_token(a, tp)
    tokens = pool_tokens(kv, full, sliding, swa_ratio)
    best = min(1.0, a.window / context)
    best_requests = fitting_requests(pool_tokens(kv, full, sliding, best), best, context, a.window)
    return Room(gpu, tp, fp8, w, margin, kv, tokens, fitting_requests(tokens, swa_ratio, context, a.window),
                best_requests)


def real_arch() -> tuple[Arch, dict]:
    return Arch(), REAL_VISION


def from_config(path: str) -> tuple[Arch, dict | None]:
    cfg = json.loads(Path(path).read_text())
    vision = cfg.get("vision_config")
    if vision is not None:  # transformers' Gemma4VisionConfig defaults for keys a config.json may omit
        vision = {**REAL_VISION, **{k: vision[k] for k in REAL_VISION if k in vision}}
    return Arch.from_config(path), vision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="a DiffusionGemma config.json (default: the real 26B-A4B's values)")
    ap.add_argument("--canvases", type=int, default=8, help="canvases denoised at once (the margin's activations)")
    ap.add_argument("--fixed-gib", type=float, default=4.0, help="context, NCCL, workspaces, CUDA graphs")
    ap.add_argument("--logit-buffers", type=int, default=3, help="float32 [C, V] buffers per canvas")
    ap.add_argument("--context", type=int, default=8192, help="tokens per request for the requests columns")
    ap.add_argument("--swa-ratio", type=float, default=SGLANG_SWA_RATIO, help="sglang's --swa-full-tokens-ratio")
    args = ap.parse_args()
    a, vision = from_config(args.config) if args.config else real_arch()
    p = params(a, vision)
    full, sliding = kv_bytes_per_token(a)
    margin = margin_bytes(a, args.canvases, args.fixed_gib, args.logit_buffers)
    print(f"params: {p.total / 1e9:.2f}B ({p.text_linear / 1e9:.2f}B text linear, {p.embedding / 1e9:.2f}B embedding, "
          f"{p.small / 1e6:.1f}M norms+routers, {p.vision / 1e6:.1f}M vision)")  # fmt: skip
    print(f"weights: bf16 {weight_bytes(p, False) / 1e9:.1f} GB, fp8 {weight_bytes(p, True) / 1e9:.1f} GB "
          f"({p.experts / 1e9:.2f}B routed expert parameters among the fp8 ones)")
    windowed = full * args.context + sliding * min(args.context, a.window)
    print(f"kv per token (bf16): full layers {full} B ({a.full_layers} layers), sliding layers {sliding} B "
          f"({a.layers - a.full_layers} layers, only the last {a.window} tokens of a request are read); "
          f"a {args.context}-token request: {windowed / 1e9:.2f} GB windowed, "
          f"{(full + sliding) * args.context / 1e9:.2f} GB if every layer keeps every token")  # fmt: skip
    print(f"margin: {margin / GIB:.1f} GiB ({args.fixed_gib:g} GiB fixed + {args.canvases} canvases x "
          f"{args.logit_buffers} float32 [{a.canvas}, {a.vocab}] buffers)")  # fmt: skip
    best = min(1.0, a.window / args.context)
    print(f"pool: sglang's hybrid SWA pool, sliding-layer tokens = --swa-full-tokens-ratio x full-layer tokens "
          f"(default {args.swa_ratio:g}; {best:.3g} = window / context fits {args.context}-token requests best)")
    print("(GiB per rank)")
    print(f"{'gpu':<11} {'tp':>2} {'dtype':>5} {'weights':>7} {'KV room':>7} {'full tokens':>11} "
          f"{f'requests @{args.swa_ratio:g}':>13} {f'requests @{best:.3g}':>15}")  # fmt: skip
    for gpu in GPUS:
        for tp in (1, 2):
            for fp8 in (False, True):
                r = room(a, p, gpu, tp, fp8, margin, args.context, args.swa_ratio)
                fits = f"{r.kv_room / GIB:7.1f}" if r.kv_room > 0 else " no fit"
                print(f"{gpu:<11} {tp:>2} {'fp8' if fp8 else 'bf16':>5} {r.weights / GIB:7.1f} {fits} "
                      f"{r.full_tokens:>11,} {r.requests:>13.1f} {r.best_requests:>15.1f}")  # fmt: skip

if __name__ == "__main__":
    main()
