"""On paper: the bytes and FLOPs of one DiffusionGemma canvas forward, and what H100/H200 allow at best.

    .venv/bin/python bench/roofline.py                       # the real 26B-A4B (values below)
    .venv/bin/python bench/roofline.py --config DIR/config.json --steps 20 --context 1024

For batch b = 1..64 canvases (C positions each) after --context cached tokens, one denoise forward
- reads every dense weight once (attention, dense MLP, router, self-conditioning MLP), the experts that its
  b * C tokens route to (expected distinct experts per layer E * (1 - (1 - K/E)^(b*C)) under uniform routing;
  at C = 256 that is all 128 of them from b = 1 on), the tied embedding twice (LM head and the self-conditioning
  input probs @ E), and each canvas's visible KV (sliding layers: the last window - 1 tokens);
- moves the sampler's float32 [b, C, V] logits --sampler-passes times (write, softmax/sample, entropy, ...);
- computes 2 * active parameters per token, plus attention (QK and PV over visible KV + canvas) and the two
  vocab-wide matmuls (LM head and probs @ E: 1.5 GFLOP per token each at V = 262144).
The floor of a forward is max(bytes / HBM bandwidth, FLOPs / dense tensor-core peak) (no overlap loss, no
kernel launch or sync cost, perfect expert balance). Weights and KV are in the compute dtype (FP8: weights
1 byte, KV and activations bf16). A canvas costs --steps denoise forwards; its commit (a causal encode of its C
tokens, no LM head) rides in the next canvas's first forward, as in our engine, and costs its extra FLOPs only.

tokens/s bound at batch b = b * C / (steps * t_forward(b) + t_commit_flops(b)).

Last lines, as ``key: value``: the floor at batch 1 on H100 FP8, and where vLLM's published 1,008 tok/s
(H100, FP8, batch 1, DiffusionGemma-26B-A4B; peers.md section 2) sits against it: the fraction of the bound at
--steps, and the forwards per canvas the floor would allow at that speed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

VLLM_TOK_S = 1008.0  # vLLM blog: DiffusionGemma FP8, 1x H100, batch 1 (`vllm bench serve`, generation tok/s)


@dataclass(frozen=True)
class Gpu:
    name: str
    hbm_tb_s: float  # TB/s
    bf16_tflops: float  # dense tensor-core peak
    fp8_tflops: float


GPUS = [
    Gpu("H100 SXM", 3.35, 989.4, 1978.9),
    Gpu("H200 SXM", 4.8, 989.4, 1978.9),
]


@dataclass(frozen=True)
class Arch:
    """The text model's shapes. Defaults: DiffusionGemma-26B-A4B (reference/diffusiongemma_arch.md section 2)."""

    hidden: int = 2816
    layers: int = 30
    full_layers: int = 5  # one in six (5, 11, 17, 23, 29)
    heads: int = 16
    sliding_kv_heads: int = 8
    sliding_head_dim: int = 256
    full_kv_heads: int = 2
    full_head_dim: int = 512  # K = V on full layers: no v_proj, one cached tensor serves as both
    intermediate: int = 2112  # dense MLP and self-conditioning MLP
    experts: int = 128
    top_k: int = 8
    moe_intermediate: int = 704
    vocab: int = 262144
    window: int = 1024
    canvas: int = 256

    @classmethod
    def from_config(cls, path: str) -> Arch:
        cfg = json.loads(open(path).read())
        text = cfg.get("text_config", cfg)
        types = text.get("layer_types") or []
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        per_layer = text.get("per_layer_config") or {}
        first_full = per_layer.get(str(full[0]), per_layer.get(f"{full[0]:02d}", {})) if full else {}
        return cls(
            hidden=text["hidden_size"], layers=text["num_hidden_layers"], full_layers=len(full),
            heads=text["num_attention_heads"], sliding_kv_heads=text["num_key_value_heads"],
            sliding_head_dim=text["head_dim"] if isinstance(text.get("head_dim"), int) else 256,
            full_kv_heads=first_full.get("num_key_value_heads",
                                         text.get("num_global_key_value_heads") or text["num_key_value_heads"]),
            full_head_dim=first_full.get("head_dim", text.get("global_head_dim", 512)),
            intermediate=text["intermediate_size"], experts=text["num_experts"], top_k=text["top_k_experts"],
            moe_intermediate=text["moe_intermediate_size"], vocab=text["vocab_size"],
            window=text["sliding_window"], canvas=cfg.get("canvas_length", 256),
        )  # fmt: skip

    # ---- parameters ----

    def attention_params(self, full: bool) -> int:
        h, q = self.hidden, self.heads * (self.full_head_dim if full else self.sliding_head_dim)
        kv = (self.full_kv_heads * self.full_head_dim) if full else (self.sliding_kv_heads * self.sliding_head_dim)
        return h * q * 2 + h * kv * (1 if full else 2)  # q, o; k (+ v on sliding layers)

    @property
    def dense_per_layer(self) -> int:
        """Weights every token uses in a layer, beyond attention: dense MLP and router."""
        return 3 * self.hidden * self.intermediate + self.experts * self.hidden

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate

    @property
    def attention_total(self) -> int:
        sliding = self.layers - self.full_layers
        return sliding * self.attention_params(False) + self.full_layers * self.attention_params(True)

    @property
    def total_params(self) -> int:
        return (self.attention_total + self.layers * (self.dense_per_layer + self.experts * self.expert_params)
                + self.vocab * self.hidden + 3 * self.hidden * self.intermediate)  # fmt: skip

    @property
    def active_params_per_token(self) -> int:
        """Linear-layer parameters one canvas token multiplies (no embedding lookup, no LM head)."""
        return (self.attention_total + self.layers * (self.dense_per_layer + self.top_k * self.expert_params)
                + 3 * self.hidden * self.intermediate)  # fmt: skip

    def kv_bytes_per_token(self, layer_full: bool, kv_bytes: int) -> int:
        if layer_full:
            return self.full_kv_heads * self.full_head_dim * 2 * kv_bytes  # K and V (V = normed K) stored
        return self.sliding_kv_heads * self.sliding_head_dim * 2 * kv_bytes


def experts_hit(arch: Arch, tokens: int) -> float:
    """Expected distinct experts per layer for ``tokens`` tokens routed uniformly to top-k of E."""
    return arch.experts * (1 - (1 - arch.top_k / arch.experts) ** tokens)


@dataclass(frozen=True)
class Cost:
    flops: float  # total
    attn_flops: float  # of which attention (QK, PV): run in bf16 even with FP8 weights
    bytes: float


def canvas_forward(arch: Arch, batch: int, context: int, weight_bytes: float, sampler_passes: int) -> Cost:
    c, h = arch.canvas, arch.hidden
    tokens = batch * c
    sliding_keys = min(context, arch.window - 1) + c
    full_keys = context + c
    attn_flops = tokens * 4 * arch.heads * (
        (arch.layers - arch.full_layers) * arch.sliding_head_dim * sliding_keys
        + arch.full_layers * arch.full_head_dim * full_keys
    )  # fmt: skip
    vocab_flops = tokens * 2 * 2 * arch.vocab * h  # LM head + probs @ E
    flops = tokens * 2 * arch.active_params_per_token + vocab_flops + attn_flops

    weights = (arch.attention_total + arch.layers * arch.dense_per_layer + 3 * h * arch.intermediate
               + arch.layers * experts_hit(arch, tokens) * arch.expert_params
               + 2 * arch.vocab * h) * weight_bytes  # fmt: skip
    kv = batch * (arch.full_layers * context * arch.kv_bytes_per_token(True, 2)
                  + (arch.layers - arch.full_layers) * (sliding_keys - c) * arch.kv_bytes_per_token(False, 2))
    sampler = tokens * arch.vocab * 4 * sampler_passes
    return Cost(flops, attn_flops, weights + kv + sampler)


def commit_flops(arch: Arch, batch: int, context: int) -> float:
    """Extra FLOPs of encoding b finished canvases causally (no LM head, no self-conditioning input)."""
    tokens = batch * arch.canvas
    per_token = 2 * (arch.active_params_per_token - 3 * arch.hidden * arch.intermediate)
    # causal over [context ; the canvas]: a token sees about half the canvas before it
    sliding_keys = min(context + arch.canvas // 2, arch.window)
    full_keys = context + arch.canvas // 2
    attention = tokens * 4 * arch.heads * (
        (arch.layers - arch.full_layers) * arch.sliding_head_dim * sliding_keys
        + arch.full_layers * arch.full_head_dim * full_keys
    )  # fmt: skip
    return tokens * per_token + attention


def floor_seconds(cost: Cost, gpu: Gpu, fp8: bool) -> tuple[float, float]:
    """(HBM floor, tensor-core floor) in seconds."""
    peak = (gpu.fp8_tflops if fp8 else gpu.bf16_tflops) * 1e12
    compute = (cost.flops - cost.attn_flops) / peak + cost.attn_flops / (gpu.bf16_tflops * 1e12)
    return cost.bytes / (gpu.hbm_tb_s * 1e12), compute


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="a DiffusionGemma config.json (default: the real 26B-A4B's values)")
    p.add_argument("--steps", type=float, default=25.0,
                   help="denoise forwards per canvas (the real model: 15-35, peers.md)")
    p.add_argument("--context", type=int, default=1024, help="cached tokens before the canvas")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--sampler-passes", type=int, default=4, help="full passes over the float32 [b, C, V] logits")
    args = p.parse_args()
    arch = Arch.from_config(args.config) if args.config else Arch()
    batches = [int(b) for b in args.batches.split(",")]

    print(f"config: hidden {arch.hidden}, {arch.layers} layers ({arch.full_layers} full), {arch.experts} experts "
          f"top-{arch.top_k}, vocab {arch.vocab}, C = {arch.canvas}, window {arch.window} | "
          f"{arch.total_params / 1e9:.2f}B text params, {arch.active_params_per_token / 1e9:.2f}B active per token "
          f"(+ {2 * arch.vocab * arch.hidden / 1e9:.2f}B in the two vocab matmuls) | context {args.context}, "
          f"{args.steps:g} steps per canvas")  # fmt: skip
    print(f"{'batch':>5} {'GFLOP':>9} {'GB bf16':>8} {'GB fp8':>7}  "
          + "  ".join(f"{g.name + ' ' + d:>22}" for g in GPUS for d in ("BF16", "FP8")))
    units = "  ".join(f"{'ms/fwd  bound  tok/s':>22}" for _ in GPUS for _ in range(2))
    print(f"{'':>5} {'':>9} {'':>8} {'':>7}  {units}")
    floor_b1 = None
    for b in batches:
        cells = []
        for gpu in GPUS:
            for fp8 in (False, True):
                cost = canvas_forward(arch, b, args.context, 1 if fp8 else 2, args.sampler_passes)
                hbm, compute = floor_seconds(cost, gpu, fp8)
                t = max(hbm, compute)
                extra = commit_flops(arch, b, args.context) / ((gpu.fp8_tflops if fp8 else gpu.bf16_tflops) * 1e12)
                tok_s = b * arch.canvas / (args.steps * t + extra)
                cells.append(f"{t * 1e3:7.2f} {'HBM ' if hbm >= compute else 'MMA '} {tok_s:9.0f}")
                if b == 1 and gpu.name.startswith("H100") and fp8:
                    floor_b1 = (t, tok_s, extra)
        bf16, fp8 = (canvas_forward(arch, b, args.context, w, args.sampler_passes) for w in (2, 1))
        print(f"{b:>5} {bf16.flops / 1e9:>9.0f} {bf16.bytes / 1e9:>8.1f} {fp8.bytes / 1e9:>7.1f}  " + "  ".join(cells))

    if floor_b1 is not None:
        t, tok_s, extra = floor_b1
        per_canvas = arch.canvas / VLLM_TOK_S
        print(f"vLLM's {VLLM_TOK_S:.0f} tok/s (H100 FP8, batch 1) = {arch.canvas} tokens every "
              f"{per_canvas * 1e3:.0f} ms: "
              f"{VLLM_TOK_S / tok_s:.0%} of the floor bound at {args.steps:g} steps per canvas; at the floor that time "
              f"pays for {(per_canvas - extra) / t:.1f} forwards per canvas")  # fmt: skip
        print(f"floor_ms_per_forward_h100_fp8_b1: {t * 1e3:.2f}")
        print(f"bound_tok_s_h100_fp8_b1: {tok_s:.0f}")
        print(f"vllm_fraction_of_bound: {VLLM_TOK_S / tok_s:.2f}")
        print(f"vllm_implied_forwards_per_canvas: {(per_canvas - extra) / t:.1f}")


if __name__ == "__main__":
    main()
