"""bf16 parity with transformers' own bf16 run: the real checkpoint's dtype.

The reference is ``DiffusionGemmaForBlockDiffusion.from_pretrained(dir, dtype=torch.bfloat16)``, what a transformers
user runs (fp32 RoPE frequencies, bf16 buffers, the default grouped_mm experts). Ours is built as sglang builds it
(default dtype bf16, weights cast from the fp32 checkpoint) and runs the runner's own self-conditioning code.

Tolerance: none where both sides reduce in the same order. Every op of ours is the reference's op on the same
shapes (norms in fp32, bf16 GEMMs, each token's experts summed in fp32 in slot order and rounded once,
softmax(float32(bf16(logits / T))) for self-conditioning), so on one thread the KV, the logits of three
self-conditioned steps and whole seeded generations are bit for bit transformers'. A tolerance would mean little
here: these random tiny models amplify one bf16 ulp into a 10-100% change within a few layers (the reference's own
bf16 run is 7-114% away from its fp32 run), so a wrong rounding order that a tolerance would have to admit is
exactly what the issue reported (9.2e-2). At other thread counts the bound is therefore the only one bf16
justifies: we stay no further from the reference's bf16 run than that run is from exact (fp32) arithmetic.
"""

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sglang.srt.utils import cpu_has_amx_support
from transformers import DiffusionGemmaForBlockDiffusion as HFModel
from transformers.cache_utils import DynamicCache

from sgl_diffusion.attention.kv import TorchKVStore
from sgl_diffusion.attention.sdpa import SdpaBackend
from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_model, tiny_generation_config
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
from sgl_diffusion.runtime.offline import OfflineEngine
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
from sgl_diffusion.sampling import entropy_bound as eb
from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams
from tests.models.test_parity import hf_cache_kv, prompt_ids, rel_err

PRESETS = ["default", "deep"]
# sglang's Gemma4RMSNorm runs its own kernel on CPUs with AMX instead of torch ops: another rounding order there
same_ops_as_transformers = pytest.mark.skipif(cpu_has_amx_support(), reason="sglang's AMX RMSNorm kernel")
# oneDNN runs bf16 GEMMs on AMX tiles where the CPU has them: on a Sapphire Rapids host the deep preset's generation
# left transformers' tokens (2026-12-01), and matched them again with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16
_CPUINFO = Path("/proc/cpuinfo")
ONEDNN_AMX_BF16 = ("ONEDNN_MAX_CPU_ISA" not in os.environ and _CPUINFO.exists()
                   and "amx_bf16" in _CPUINFO.read_text())  # fmt: skip
PARAMS = DiffusionParams(max_denoising_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                         confidence_threshold=0.005, stability_threshold=1)


@contextlib.contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.fixture(scope="module", params=PRESETS)
def models(request, tmp_path_factory):
    """(HF bf16, HF fp32, ours bf16) from one saved fp32 checkpoint."""
    path = tmp_path_factory.mktemp(f"bf16_{request.param}")
    hf32 = build_tiny_model(0, request.param)
    hf32.save_pretrained(path)
    hf16 = HFModel.from_pretrained(path, dtype=torch.bfloat16).eval()
    hf16.generation_config = tiny_generation_config()
    with default_dtype(torch.bfloat16):  # as sglang's loader builds the model
        ours = DiffusionGemmaForBlockDiffusion(hf16.config).eval()
    ours.load_weights(load_file(path / "model.safetensors").items())
    return hf16, hf32, ours


def run_steps(hf16, hf32, ours, length):
    """Prefill a prompt on both sides, then three denoise steps, each self-conditioned on the previous step's
    reference logits. Returns per-layer (ours K, V, HF K, V, HF fp32 K) and per-step (ours logits, HF logits,
    HF fp32 logits, our soft embeddings, HF's)."""
    cfg = ours.cfg
    n = cfg.sliding_window // 2 if length == "short" else 2 * cfg.sliding_window + 3
    ids = prompt_ids(n, cfg.vocab_size)
    cache, cache32 = DynamicCache(config=hf16.config.text_config), DynamicCache(config=hf32.config.text_config)
    with torch.no_grad():
        hf16.model.encoder(input_ids=ids[None], past_key_values=cache, use_cache=True)
        hf32.model.encoder(input_ids=ids[None], past_key_values=cache32, use_cache=True)
    kv = TorchKVStore(n, [(s.num_kv_heads, s.head_dim) for s in cfg.layers], torch.bfloat16)
    attn = SdpaBackend(kv, cfg.sliding_window)
    slots = torch.arange(n)
    ours(CanvasBatch([Segment("prefill", 0, n, 0, torch.empty(0, dtype=torch.long), slots)], ids), attn)
    layers = []
    for layer in range(cfg.num_layers):
        ref_k, ref_v = hf_cache_kv(cache, layer)
        got_k, got_v = kv.gather(layer, slots[-ref_k.shape[0] :])
        layers.append((got_k, got_v, ref_k, ref_v, hf_cache_kv(cache32, layer)[0]))

    captured = []  # HF's soft embeddings, as its self-conditioning block receives them
    hook = hf16.model.decoder.self_conditioning.register_forward_pre_hook(lambda m, args: captured.append(args[1]))
    canvas = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=torch.Generator().manual_seed(2))
    sc16 = sc32 = soft = None
    steps = []
    try:
        for s in (48, 47, 46):
            with torch.no_grad():
                ref = hf16(decoder_input_ids=canvas[None], past_key_values=cache,
                           self_conditioning_logits=sc16).logits[0]
                ref32 = hf32(decoder_input_ids=canvas[None], past_key_values=cache32,
                             self_conditioning_logits=sc32).logits[0]
            seg = Segment("canvas", 0, cfg.canvas_length, n, slots)
            got = ours.logits(ours(CanvasBatch([seg], canvas, canvas_soft_embeds=soft), attn))
            steps.append((got, ref, ref32, soft, captured[-1][0] if sc16 is not None else None))
            # the next input, both sides from the reference's logits: each step compares the model alone.
            # HF's generate keeps `logits / T` in the model dtype; ours is what the runner computes.
            temp = eb.temperature(s, 48, 0.4, 0.8)
            sc16, sc32 = (ref / temp).to(torch.bfloat16)[None], (ref32 / temp)[None]
            args = eb.prepare([eb.SamplerRow(PARAMS, s, eb.new_history(1, cfg.canvas_length))])
            result = eb.step(ref[None], args, [torch.Generator().manual_seed(0)],
                             self_conditioning_dtype=torch.bfloat16)
            soft = ours.soft_embed(result.self_conditioning_probs)[0]
            canvas = ref.argmax(-1)
    finally:
        hook.remove()
    return layers, steps


@same_ops_as_transformers
@pytest.mark.parametrize("torch_threads", [1], indirect=True)
@pytest.mark.parametrize("length", ["short", "long"])
def test_bf16_kv_and_self_conditioned_logits_are_transformers_bit_for_bit(models, length, torch_threads):
    """Encoder KV of every layer (past the window for "long"), the self-conditioning input and the logits of three
    self-conditioned denoise steps equal transformers' bf16 run exactly (one thread: same reduction order)."""
    layers, steps = run_steps(*models, length)
    for i, (got_k, got_v, ref_k, ref_v, _) in enumerate(layers):
        assert got_k.dtype == torch.bfloat16
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v), i
    for i, (got, ref, _, soft, hf_soft) in enumerate(steps):
        if i:
            assert soft.dtype == torch.bfloat16 and torch.equal(soft, hf_soft), i
        assert torch.equal(got, ref), i


@pytest.mark.parametrize("torch_threads", [1, 2], indirect=True)
@pytest.mark.parametrize("length", ["short", "long"])
def test_bf16_stays_within_the_references_own_bf16_error(models, length, torch_threads):
    """At any thread count: our distance to the reference's bf16 run is at most that run's distance to its fp32 run
    (the rounding noise bf16 itself brings), for every layer's K/V and every step's logits."""
    layers, steps = run_steps(*models, length)
    for i, (got_k, got_v, ref_k, ref_v, ref32_k) in enumerate(layers):
        noise = rel_err(ref_k.float(), ref32_k)
        assert rel_err(got_k.float(), ref_k.float()) <= noise and rel_err(got_v.float(), ref_v.float()) <= noise, i
    for i, (got, ref, ref32, soft, hf_soft) in enumerate(steps):
        assert rel_err(got, ref) <= rel_err(ref, ref32), i
        if i:
            assert rel_err(soft.float(), hf_soft.float()) <= 1e-2, i  # same inputs: at most a few bf16 ulps


@same_ops_as_transformers
@pytest.mark.skipif(ONEDNN_AMX_BF16, reason="oneDNN's AMX bf16 GEMMs round otherwise than transformers' here")
@pytest.mark.parametrize("torch_threads", [1], indirect=True)
def test_bf16_seeded_generation_is_transformers_bit_for_bit(models, torch_threads):
    """Three canvases of four self-conditioned steps through the offline engine (runner, sampler, commits past the
    window) give the tokens of transformers' bf16 ``generate`` with the same seed, at the real temperatures."""
    hf16, _, ours = models
    cfg = ours.cfg
    for seed in range(2):
        ids = prompt_ids(cfg.sliding_window + 7, cfg.vocab_size, seed=seed + 1)
        gen = tiny_generation_config()
        gen.max_denoising_steps, gen.max_new_tokens = 4, 3 * cfg.canvas_length
        gen.eos_token_id = [cfg.vocab_size + 1]  # never produced: every canvas is committed
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            out = hf16.generate(ids[None], generation_config=gen, return_dict_in_generate=True)
        defaults = DiffusionDefaults.from_generation_config(json.loads(gen.to_json_string()))
        params = DiffusionParams.from_request({"seed": 100 + seed}, defaults, vocab_size=cfg.vocab_size,
                                              canvas_length=cfg.canvas_length)
        engine = OfflineEngine(ours, eos_token_ids=gen.eos_token_id)
        got = engine.generate([DiffusionRequest(ids.tolist(), params, 3 * cfg.canvas_length)])[0]
        assert got == out.sequences[0, ids.numel() :].tolist(), seed
