"""Parity of our model and pipeline with transformers' DiffusionGemmaForBlockDiffusion on tiny checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers.cache_utils import DynamicCache

from sgl_diffusion.attention.kv import TorchKVStore
from sgl_diffusion.attention.sdpa import SdpaBackend
from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_model, build_tiny_processor, tiny_generation_config
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
from sgl_diffusion.runtime.offline import OfflineEngine
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams

PRESETS = ["default", "deep"]


def make_pair(preset, seed=0):
    hf = build_tiny_model(seed, preset)
    ours = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def our_kv(model, num_slots=512):
    cfg = model.cfg
    kv = TorchKVStore(num_slots, [(s.num_kv_heads, s.head_dim) for s in cfg.layers], torch.float32)
    return kv, SdpaBackend(kv, cfg.sliding_window)


def prompt_ids(length, vocab, seed=1):
    return torch.randint(5, vocab - 300, (length,), generator=torch.Generator().manual_seed(seed))


def prefill(model, attn, ids, image_runs=(), image_embeds=None):
    slots = torch.arange(ids.numel())
    seg = Segment("prefill", 0, ids.numel(), 0, torch.empty(0, dtype=torch.long), slots, image_runs)
    model(CanvasBatch([seg], ids, image_embeds=image_embeds), attn)
    return slots


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def hf_cache_kv(cache, layer):
    return cache.layers[layer].keys[0].transpose(0, 1), cache.layers[layer].values[0].transpose(0, 1)


def assert_prefill_and_first_canvas_match(hf, ours, ids, tol):
    """Prefill ``ids`` on both sides: every layer's K/V, then one canvas's logits, within ``tol`` relative."""
    cfg = ours.cfg
    cache = DynamicCache(config=hf.config.text_config)
    with torch.no_grad():
        hf.model.encoder(input_ids=ids[None], past_key_values=cache, use_cache=True)
    kv, attn = our_kv(ours)
    slots = prefill(ours, attn, ids)
    for layer in range(cfg.num_layers):
        ref_k, ref_v = hf_cache_kv(cache, layer)
        got_k, got_v = kv.gather(layer, slots[-ref_k.shape[0] :])
        assert rel_err(got_k, ref_k) <= tol and rel_err(got_v, ref_v) <= tol, layer
    canvas = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(decoder_input_ids=canvas[None], past_key_values=cache).logits[0]
    got = ours.logits(ours(CanvasBatch([Segment("canvas", 0, cfg.canvas_length, ids.numel(), slots)], canvas), attn))
    assert rel_err(got, ref) <= tol
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("length", ["short", "long"])
def test_encoder_kv_matches_per_layer(preset, length):
    """Prefill writes the same K and V as HF's encoder into every layer (sliding layers: HF keeps window-1)."""
    hf, ours = make_pair(preset)
    window = ours.cfg.sliding_window
    n = window // 2 if length == "short" else 3 * window + 5
    ids = prompt_ids(n, ours.cfg.vocab_size)
    cache = DynamicCache(config=hf.config.text_config)
    with torch.no_grad():
        hf.model.encoder(input_ids=ids[None], past_key_values=cache, use_cache=True)
    kv, attn = our_kv(ours)
    slots = prefill(ours, attn, ids)
    for layer in range(ours.cfg.num_layers):
        ref_k, ref_v = hf_cache_kv(cache, layer)
        got_k, got_v = kv.gather(layer, slots[-ref_k.shape[0] :])
        assert rel_err(got_k, ref_k) <= 1e-4 and rel_err(got_v, ref_v) <= 1e-4, layer


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("length", ["short", "long"])
def test_decoder_logits_match_over_three_self_conditioned_steps(preset, length):
    """Three consecutive denoise steps, each self-conditioned on the last, give HF's logits (rel err <= 1e-4)."""
    hf, ours = make_pair(preset)
    cfg = ours.cfg
    n = cfg.sliding_window // 2 if length == "short" else 2 * cfg.sliding_window + 3
    assert length == "short" or n > cfg.sliding_window  # the canvas must see only the last window-1 tokens
    ids = prompt_ids(n, cfg.vocab_size)
    cache = DynamicCache(config=hf.config.text_config)
    with torch.no_grad():
        hf.model.encoder(input_ids=ids[None], past_key_values=cache, use_cache=True)
    kv, attn = our_kv(ours)
    slots = prefill(ours, attn, ids)

    canvas = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=torch.Generator().manual_seed(2))
    sc_logits, soft = None, None
    temperature = 0.7
    for _ in range(3):
        with torch.no_grad():
            ref = hf(decoder_input_ids=canvas[None], past_key_values=cache, self_conditioning_logits=sc_logits).logits[0]
        seg = Segment("canvas", 0, cfg.canvas_length, n, slots)
        got = ours.logits(ours(CanvasBatch([seg], canvas, canvas_soft_embeds=soft), attn))
        assert rel_err(got, ref) <= 1e-4
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        # both sides condition on HF's logits, so each step compares the model alone, not drift
        sc_logits = (ref / temperature)[None]
        soft = ours.soft_embed(torch.softmax(sc_logits[0], dim=-1))
        canvas = ref.argmax(-1)


def test_prompt_with_image_matches_generate():
    """An image prompt encodes like HF generate (image runs bidirectional) and the first canvas logits match."""
    hf, ours = make_pair("default")
    processor = build_tiny_processor()
    from PIL import Image

    image = Image.new("RGB", (48, 32))
    image.putdata([((x * 5) % 256, (y * 7) % 256, (x * y) % 256) for y in range(32) for x in range(48)])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[image], return_tensors="pt", return_mm_token_type_ids=True)
    ids = inputs["input_ids"][0]
    is_image = inputs["mm_token_type_ids"][0] == 1
    assert is_image.sum() > 1

    gen = tiny_generation_config()
    gen.max_denoising_steps, gen.max_new_tokens = 1, hf.config.canvas_length
    with torch.no_grad():
        out = hf.generate(**inputs, generation_config=gen, return_dict_in_generate=True)
    kv, attn = our_kv(ours)
    idx = torch.nonzero(is_image)[:, 0]
    runs = ((idx[0].item(), idx[-1].item() + 1),)
    assert runs[0][1] - runs[0][0] == idx.numel()  # one contiguous run
    with torch.no_grad():
        embeds = ours.image_embeds(inputs["pixel_values"], inputs["image_position_ids"])
    slots = prefill(ours, attn, ids, runs, embeds)
    for layer in range(ours.cfg.num_layers):
        ref_k, ref_v = hf_cache_kv(out.past_key_values, layer)
        got_k, got_v = kv.gather(layer, slots[-ref_k.shape[0] :])
        assert rel_err(got_k, ref_k) <= 1e-4 and rel_err(got_v, ref_v) <= 1e-4, layer

    canvas = torch.arange(hf.config.canvas_length)
    with torch.no_grad():
        ref = hf(decoder_input_ids=canvas[None], past_key_values=out.past_key_values).logits[0]
    got = ours.logits(ours(CanvasBatch([Segment("canvas", 0, canvas.numel(), ids.numel(), slots)], canvas), attn))
    assert rel_err(got, ref) <= 1e-4


def generate_both(hf, ours, steps: int, with_eos: bool, seed: int = 123, prompt_seed: int = 1):
    """Three canvases of HF ``generate`` after ``torch.manual_seed(seed)`` and of our offline engine with the same
    seed, at the checkpoint's real temperatures and ``steps`` denoise steps per canvas: (ours, HF's) tokens."""
    cfg = ours.cfg
    ids = prompt_ids(cfg.sliding_window + 7, cfg.vocab_size, seed=prompt_seed)
    gen = tiny_generation_config()
    gen.max_denoising_steps, gen.max_new_tokens = steps, 3 * cfg.canvas_length
    if not with_eos:  # an id outside the vocabulary: every canvas gets committed
        gen.eos_token_id = [cfg.vocab_size + 1]
    torch.manual_seed(seed)
    with torch.no_grad():
        ref = hf.generate(ids[None], generation_config=gen, return_dict_in_generate=True).sequences[0, ids.numel() :]
    ref = ref.tolist()
    eos = [i for i, t in enumerate(ref) if t in gen.eos_token_id]
    if eos:  # HF pads after the first EOS; we stop there
        ref = ref[: eos[0] + 1]
    defaults = DiffusionDefaults.from_generation_config(json.loads(gen.to_json_string()))
    params = DiffusionParams.from_request({"seed": seed}, defaults, vocab_size=cfg.vocab_size,
                                          canvas_length=cfg.canvas_length)
    engine = OfflineEngine(ours, eos_token_ids=gen.eos_token_id)
    return engine.generate([DiffusionRequest(ids.tolist(), params, 3 * cfg.canvas_length)])[0], ref


@pytest.mark.parametrize("torch_threads", [1], indirect=True)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("with_eos", [False, True])
def test_seeded_generation_is_bit_identical_to_generate(preset, with_eos, torch_threads):
    """Three canvases at the checkpoint's real temperatures: same seed, same tokens as HF generate.

    NOTE: pinned to one thread. Each self-conditioned step feeds the last step's probabilities back, so a rounding
    difference grows step by step until it flips a multinomial draw; over 4 steps per canvas only the same
    reduction order on both sides (one thread) guarantees identical tokens. The thread-independent guarantee is
    ``test_seeded_generation_matches_generate_at_any_thread_count`` below.
    """
    hf, ours = make_pair(preset)
    # NOTE: the deep preset is chaotic enough that SDPA-vs-eager rounding (~1e-6) flips a multinomial draw
    # after a few self-conditioned steps; with one step per canvas it still covers commit + sliding windows.
    steps = 4 if preset == "default" else 1
    got, ref = generate_both(hf, ours, steps, with_eos)
    assert got == ref
    assert with_eos or len(got) == 3 * ours.cfg.canvas_length


@pytest.mark.parametrize("torch_threads", [1, 2], indirect=True)
@pytest.mark.parametrize("preset", PRESETS)
def test_seeded_generation_matches_generate_at_any_thread_count(preset, torch_threads):
    """Two denoise steps per canvas (one self-conditioned), three canvases, several seeds: HF's tokens at 1 and 2
    threads, whatever reduction order each side picks (rounding differs by ~1e-6, far below these draws' margins)."""
    hf, ours = make_pair(preset)
    for seed in range(3):
        got, ref = generate_both(hf, ours, steps=2, with_eos=False, seed=100 + seed, prompt_seed=seed + 1)
        assert got == ref, seed
        assert len(got) == 3 * ours.cfg.canvas_length


def test_loads_saved_checkpoint(tmp_path):
    """Weights loaded from the safetensors save_pretrained writes give the same logits as from the live model."""
    hf, ours = make_pair("default")
    hf.save_pretrained(tmp_path)
    loaded = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    loaded.load_weights(load_file(tmp_path / "model.safetensors").items())
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert not torch.equal(loaded.layers[0].layer_scalar, loaded.layers[0].encoder_layer_scalar)
