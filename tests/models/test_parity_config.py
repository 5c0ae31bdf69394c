"""Parity with transformers on checkpoints that set config fields away from the tiny presets' values.

Each field the config table marks honoured and that changes the math gets a checkpoint that sets it; the test
also checks that the field does change transformers' output, so a port that ignored it would fail.
"""

import pytest
import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_model, build_tiny_processor, tiny_generation_config
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
from tests.models.test_parity import hf_cache_kv, our_kv, prefill, prompt_ids, rel_err

TOL = 1e-4  # fp32, as tests/models/test_parity.py: reduction-order differences only


def pair(**text_overrides):
    hf = build_tiny_model(0, "default", **text_overrides)
    ours = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def kv_and_logits(hf, ours, steps=2):
    """Prefill a prompt past the window on both sides, then ``steps`` self-conditioned denoise steps.
    Returns the worst per-layer K/V error and, per step, (ours, HF) logits."""
    cfg = ours.cfg
    n = 2 * cfg.sliding_window + 3
    ids = prompt_ids(n, cfg.vocab_size)
    cache = DynamicCache(config=hf.config.text_config)
    with torch.no_grad():
        hf.model.encoder(input_ids=ids[None], past_key_values=cache, use_cache=True)
    kv, attn = our_kv(ours)
    slots = prefill(ours, attn, ids)
    kv_err = 0.0
    for layer in range(cfg.num_layers):
        ref_k, ref_v = hf_cache_kv(cache, layer)
        got_k, got_v = kv.gather(layer, slots[-ref_k.shape[0] :])
        kv_err = max(kv_err, rel_err(got_k, ref_k), rel_err(got_v, ref_v))
    canvas = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=torch.Generator().manual_seed(2))
    sc, soft, out = None, None, []
    for _ in range(steps):
        with torch.no_grad():
            ref = hf(decoder_input_ids=canvas[None], past_key_values=cache, self_conditioning_logits=sc).logits[0]
        got = ours.logits(ours(CanvasBatch([Segment("canvas", 0, cfg.canvas_length, n, slots)], canvas,
                                           canvas_soft_embeds=soft), attn))
        out.append((got, ref))
        sc = (ref / 0.7)[None]
        soft = ours.soft_embed(torch.softmax(sc[0], dim=-1))
        canvas = ref.argmax(-1)
    return kv_err, out


@pytest.fixture(scope="module")
def baseline_logits():
    hf, ours = pair()
    return kv_and_logits(hf, ours)[1]


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_hidden_activation_is_honoured(activation, baseline_logits):
    """MLPs, experts and self-conditioning use the checkpoint's hidden_activation (silu; exact erf gelu)."""
    hf, ours = pair(hidden_activation=activation)
    kv_err, steps = kv_and_logits(hf, ours)
    assert kv_err <= TOL
    for (got, ref), (_, ref_tanh) in zip(steps, baseline_logits):
        assert rel_err(got, ref) <= TOL
        # the field changes transformers' logits (erf vs tanh gelu only by ~3e-4) far more than we differ from it
        assert rel_err(ref, ref_tanh) > 10 * rel_err(got, ref)


@pytest.mark.parametrize("overrides", [
    dict(rms_norm_eps=0.05, final_logit_softcapping=4.0),
    dict(layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention",
                      "sliding_attention", "full_attention"], sliding_window=9),
])  # fmt: skip
def test_other_values_of_honoured_fields(overrides, baseline_logits):
    """Norm epsilon and softcap far from the presets' values; full layers first and in the middle, another window."""
    hf, ours = pair(**overrides)
    kv_err, steps = kv_and_logits(hf, ours)
    assert kv_err <= TOL
    for (got, ref), (_, ref_base) in zip(steps, baseline_logits):
        assert rel_err(got, ref) <= TOL and rel_err(ref, ref_base) > 100 * TOL


def test_rope_factor_applies_only_to_proportional_rope():
    """A ``factor`` on both RoPE entries: transformers scales the proportional (full) layers by it and ignores it
    on the default (sliding) ones; so do we."""
    plain = build_tiny_model(0, "default").config.text_config.rope_parameters
    rope = {kind: dict(params, factor=4.0) for kind, params in plain.items()}
    hf, ours = pair(rope_parameters=rope)
    assert [s.rope.factor for s in ours.cfg.layers] == [1.0 if s.sliding else 4.0 for s in ours.cfg.layers]
    kv_err, steps = kv_and_logits(hf, ours)
    assert kv_err <= TOL
    for got, ref in steps:
        assert rel_err(got, ref) <= TOL
    unscaled = build_tiny_model(0, "default", rope_parameters=plain)
    with torch.no_grad():  # the factor is not a no-op for transformers either
        ids = prompt_ids(40, ours.cfg.vocab_size)[None]
        a, b = hf.model.encoder(input_ids=ids), unscaled.model.encoder(input_ids=ids)
    assert rel_err(a.last_hidden_state, b.last_hidden_state) > 100 * TOL


def image_prompt():
    processor = build_tiny_processor()
    image = Image.new("RGB", (48, 32))
    image.putdata([((x * 5) % 256, (y * 7) % 256, (x * y) % 256) for y in range(32) for x in range(48)])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=text, images=[image], return_tensors="pt", return_mm_token_type_ids=True)


@pytest.mark.parametrize("mode", [None, "vision"])
def test_use_bidirectional_attention_decides_image_attention(mode):
    """use_bidirectional_attention unset: transformers' generate encodes image tokens causally, like text; "vision":
    bidirectionally inside each image. Our prefill (which always carries the image runs) follows the config."""
    hf, ours = pair(use_bidirectional_attention=mode)
    inputs = image_prompt()
    ids, is_image = inputs["input_ids"][0], inputs["mm_token_type_ids"][0] == 1
    idx = torch.nonzero(is_image)[:, 0]
    runs = ((idx[0].item(), idx[-1].item() + 1),)
    assert runs[0][1] - runs[0][0] == idx.numel() > 1

    gen = tiny_generation_config()
    gen.max_denoising_steps, gen.max_new_tokens = 1, hf.config.canvas_length
    with torch.no_grad():
        cache = hf.generate(**inputs, generation_config=gen, return_dict_in_generate=True).past_key_values
        embeds = ours.image_embeds(inputs["pixel_values"], inputs["image_position_ids"])
    kv, attn = our_kv(ours)
    slots = prefill(ours, attn, ids, runs, embeds)
    for layer in range(ours.cfg.num_layers):
        ref_k, ref_v = hf_cache_kv(cache, layer)
        got_k, got_v = kv.gather(layer, slots[-ref_k.shape[0] :])
        assert rel_err(got_k, ref_k) <= TOL and rel_err(got_v, ref_v) <= TOL, layer

    kv2, attn2 = our_kv(ours)  # the other image attention gives other KV: the field matters
    other = pair(use_bidirectional_attention="vision" if mode is None else None)[1]
    prefill(other, attn2, ids, runs, embeds)
    last = ours.cfg.num_layers - 1
    assert rel_err(kv2.gather(last, slots)[0], kv.gather(last, slots)[0]) > 100 * TOL


def test_experts_in_token_chunks_match(monkeypatch):
    """Long encodes run the CPU experts in token chunks (bounded fp32 buffers); KV and logits still match HF."""
    from sgl_diffusion.models import layers

    monkeypatch.setattr(layers, "MOE_CHUNK_TOKENS", 7)
    kv_err, steps = kv_and_logits(*pair(), steps=1)
    assert kv_err <= TOL and rel_err(*steps[0]) <= TOL
