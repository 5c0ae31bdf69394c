"""Checks that run in the Triton-interpreter child (``interpreter.InterpretedWorker``), in float32."""

from __future__ import annotations

import torch

from tests.attention import cases

GEOMETRIES = {
    "unit": [cases.SLIDING, cases.FULL],  # GQA 2:1 sliding, 4:1 full with K = V
    "real_head_dims": [cases.SLIDING_256, cases.FULL_512],  # DiffusionGemma's 256 / 512 (K = V), fewer heads
}


def triton_backend(kv, layers):
    from sgl_diffusion.attention.triton import TritonBackend

    return TritonBackend(kv, layers)


def kernel_errors(layout: str, geometry: str) -> tuple[float, float]:
    """(output error, KV error) of the Triton backend against SDPA on one of cases.LAYOUTS."""
    return cases.compare(cases.make_case(layout, GEOMETRIES[geometry]), triton_backend)


def model_errors() -> dict[str, float]:
    """The tiny checkpoint (default preset, float32) through both backends: a prefill, then one mixed forward
    (a commit and the next canvas of the same request, an image prefill and its first canvas, a canvas after
    an empty prompt). Relative errors of the canvas logits and of every layer's KV after each forward."""
    from sgl_diffusion.attention.kv import TorchKVStore
    from sgl_diffusion.attention.sdpa import SdpaBackend
    from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
    from tests.models.test_parity import make_pair, prompt_ids, rel_err

    _, model = make_pair("default")
    cfg = model.cfg
    c, w = cfg.canvas_length, cfg.sliding_window
    kv_sdpa, kv_triton = (TorchKVStore(256, [(s.num_kv_heads, s.head_dim) for s in cfg.layers], torch.float32)
                          for _ in range(2))  # fmt: skip
    layers = [layer.self_attn.info for layer in model.layers]
    backends = {"sdpa": (kv_sdpa, SdpaBackend(kv_sdpa, w)), "triton": (kv_triton, triton_backend(kv_triton, layers))}
    gen = torch.Generator().manual_seed(3)
    slots = torch.randperm(256, generator=gen)
    a_len = 2 * w + 3  # longer than the window
    a_ctx, a_new, b_new = slots[:a_len], slots[a_len : a_len + c], slots[a_len + c : a_len + c + 12]
    empty = torch.empty(0, dtype=torch.long)
    prefill = CanvasBatch([Segment("prefill", 0, a_len, 0, empty, a_ctx)], prompt_ids(a_len, cfg.vocab_size))
    mixed_segments = [
        Segment("commit", 0, c, a_len, a_ctx, a_new), Segment("canvas", 0, c, a_len + c, torch.cat([a_ctx, a_new])),
        Segment("prefill", 1, 12, 0, empty, b_new, ((2, 9),)), Segment("canvas", 1, c, 12, b_new),
        Segment("canvas", 2, c, 0, empty),
    ]  # fmt: skip
    ids = torch.randint(5, cfg.vocab_size - 300, (sum(s.num_tokens for s in mixed_segments),), generator=gen)
    image = torch.randn(7, cfg.hidden_size, generator=gen)
    errors, logits, kvs = {}, {}, {}
    for name, (kv, attn) in backends.items():
        with torch.no_grad():
            model(prefill, attn)
            kvs[name, "prefill"] = [kv.gather(i, a_ctx) for i in range(cfg.num_layers)]
            mixed = CanvasBatch([Segment(s.kind, s.req_index, s.num_tokens, s.start_pos, s.prefix_slots,
                                         s.new_slots, s.image_runs) for s in mixed_segments], ids,
                                image_embeds=image)  # fmt: skip
            logits[name] = model.logits(model(mixed, attn))
            kvs[name, "mixed"] = [kv.gather(i, torch.cat([a_new, b_new])) for i in range(cfg.num_layers)]
    errors["logits"] = rel_err(logits["triton"], logits["sdpa"])
    for step in ("prefill", "mixed"):
        errors[f"kv_{step}"] = max(rel_err(t, s) for got, ref in zip(kvs["triton", step], kvs["sdpa", step])
                                   for t, s in zip(got, ref))  # fmt: skip
    return errors
