"""FP8 weights through sglang's quantization methods, on CPU: what loads where, and a dequantized reference forward.

sglang's fp8 GEMMs do not run here: ``Fp8LinearMethod.process_weights_after_loading`` asserts AMX on an sglang CPU
engine and otherwise prepares CUDA kernels. So the forward below swaps each layer's method for ``DequantLinear``
(weight.float() * scale, then a plain GEMM): it checks the weights and scales, not sglang's kernels.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from sglang.srt.layers.linear import LinearBase
from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_model
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
from sgl_diffusion.models.weights import dequantize
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
from tests.models.test_parity import our_kv, prefill, prompt_ids, rel_err
from tests.models.test_tensor_parallel import as_rank

FP8 = torch.float8_e4m3fn
BLOCK = [16, 16]  # divides every projection of the default preset (sglang requires it of fused parts)
# what a quantizer would convert: attention and dense-MLP projections, and the routed experts (3-D tensors)
QUANTIZED = re.compile(r"model\.decoder\.(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.\w+_proj)\.weight|"
                       r"self_conditioning\.\w+_proj\.weight|layers\.\d+\.experts\.(gate_up|down)_proj)$")
# left in bf16 by the checkpoint's ignored_layers: sglang gives these layers its unquantized method
IGNORED = ["model.decoder.self_conditioning.gate_proj", "model.decoder.self_conditioning.up_proj",
           "model.decoder.self_conditioning.down_proj"]  # fmt: skip


def quantize(w: torch.Tensor, block: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale) as sglang-compatible tools write them: per [bn, bk] block of the last two dims
    (``weight_scale_inv``), or one scale per tensor (``weight_scale``)."""
    if block is None:
        scale = w.abs().amax().float() / torch.finfo(FP8).max
        return (w / scale).to(FP8), scale
    bn, bk = block
    *lead, rows, cols = w.shape
    blocks = w.float().reshape(*lead, rows // bn, bn, cols // bk, bk)
    scale = blocks.abs().amax(dim=(-3, -1)) / torch.finfo(FP8).max  # [..., rows / bn, cols / bk]
    q = (blocks / scale[..., :, None, :, None]).to(FP8).reshape(w.shape)
    return q, scale


def fp8_checkpoint(hf, block):
    """The tiny model's state dict as an FP8 checkpoint, and its config.json's quantization_config."""
    state, suffix = {}, "_scale_inv" if block else "_scale"
    for name, tensor in hf.state_dict().items():
        if QUANTIZED.match(name) and not any(name.startswith(f"{ignored}.") for ignored in IGNORED):
            state[name], state[name + suffix] = quantize(tensor, block)
        else:
            state[name] = tensor
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": IGNORED}
    return state, config | ({"weight_block_size": block} if block else {})


def build(hf, quantization_config, state):
    """The model as sglang's loader builds it for this checkpoint (sglang's own config parsing), loaded."""
    hf.config.quantization_config = quantization_config
    try:
        model = DiffusionGemmaForBlockDiffusion(hf.config, quant_config=Fp8Config.from_config(quantization_config))
    finally:
        del hf.config.quantization_config
    model.load_weights(state.items())
    return model.eval()


class DequantLinear(UnquantizedLinearMethod):
    """Test stand-in for sglang's fp8 apply(): the layer's fp8 weight dequantized, then a plain GEMM."""

    def __init__(self, block):
        self.block = block

    def apply(self, layer, x, bias=None):
        scale = layer.weight_scale_inv if self.block else layer.weight_scale
        if not self.block:  # one scale per fused part (q, k, v / gate, up), each over its own rows
            scale = torch.cat([s.expand(n) for s, n in zip(scale, layer.logical_widths)])[:, None]
        return F.linear(x, dequantize(layer.weight, scale, self.block).to(x.dtype), bias)


@pytest.fixture(scope="module")
def hf():
    return build_tiny_model(0)


@pytest.mark.parametrize("block", [BLOCK, None], ids=["block", "per_tensor"])
def test_projections_take_sglang_fp8_method(hf, block):
    """Attention and dense-MLP projections take Fp8LinearMethod; ignored layers (by their checkpoint names) sglang's
    unquantized method; router and embedding stay plain; the experts hold the dequantized checkpoint tensors."""
    state, qconfig = fp8_checkpoint(hf, block)
    model = build(hf, qconfig, state)
    methods = {name: type(m.quant_method) for name, m in model.named_modules() if isinstance(m, LinearBase)}
    assert {n for n, t in methods.items() if t is UnquantizedLinearMethod} == {
        "self_conditioning.gate_up_proj", "self_conditioning.down_proj"}  # fmt: skip
    assert sum(t is Fp8LinearMethod for t in methods.values()) == 4 * len(model.layers)
    assert type(model.layers[0].router.proj) is torch.nn.Linear and model.embed_tokens.weight.dtype == torch.float32
    experts = model.layers[0].experts.gate_up_proj
    key = "model.decoder.layers.0.experts.gate_up_proj"
    assert experts.dtype == torch.float32
    assert torch.equal(experts, dequantize(state[key], state[key + ("_scale_inv" if block else "_scale")], block))


def test_fused_projection_holds_each_part_and_its_scales(hf):
    """qkv_proj holds q, k, v rows in order, fp8 bits unchanged, with their block scales; gate_up_proj likewise."""
    state, qconfig = fp8_checkpoint(hf, BLOCK)
    model = build(hf, qconfig, state)
    key = "model.decoder.layers.0.{}.{}_proj.weight{}"
    qkv = model.layers[0].self_attn.qkv_proj
    for param, suffix in [(qkv.weight, ""), (qkv.weight_scale_inv, "_scale_inv")]:
        want = torch.cat([state[key.format("self_attn", p, suffix)] for p in "qkv"])
        assert torch.equal(param.view(torch.uint8) if suffix == "" else param,
                           want.view(torch.uint8) if suffix == "" else want)  # fmt: skip
    gate_up = model.layers[0].mlp.gate_up_proj
    want = torch.cat([state[key.format("mlp", p, "_scale_inv")] for p in ("gate", "up")])
    assert torch.equal(gate_up.weight_scale_inv, want)
    # K=V full layer: no v part, so its fused weight is q then k
    full, layer = model.layers[5].self_attn.qkv_proj, "model.decoder.layers.5.self_attn"
    assert f"{layer}.v_proj.weight" not in state
    want = torch.cat([state[f"{layer}.{p}_proj.weight"] for p in "qk"]).view(torch.uint8)
    assert torch.equal(full.weight.view(torch.uint8), want)


def test_tensor_parallel_ranks_hold_their_fp8_slices(hf):
    """At TP 2 (one process), each rank's o_proj and down_proj hold their input-dim slice of the fp8 weight and of
    its block scales; gate_up_proj its rows of gate and of up."""
    state, qconfig = fp8_checkpoint(hf, BLOCK)
    layer = "model.decoder.layers.0"
    for rank in range(2):
        with as_rank(rank, 2):
            model = build(hf, qconfig, state)
        o_proj, mlp = model.layers[0].self_attn.o_proj, model.layers[0].mlp
        w, s = state[f"{layer}.self_attn.o_proj.weight"], state[f"{layer}.self_attn.o_proj.weight_scale_inv"]
        assert torch.equal(o_proj.weight.view(torch.uint8), w.view(torch.uint8).chunk(2, 1)[rank])
        assert torch.equal(o_proj.weight_scale_inv, s.chunk(2, 1)[rank])
        gate, up = (state[f"{layer}.mlp.{p}_proj.weight_scale_inv"].chunk(2, 0)[rank] for p in ("gate", "up"))
        assert torch.equal(mlp.gate_up_proj.weight_scale_inv, torch.cat([gate, up]))


def canvas_logits(model):
    """Logits of one canvas after a 40-token prompt (float32 KV)."""
    kv, attn = our_kv(model)
    ids = prompt_ids(40, model.cfg.vocab_size)
    slots = prefill(model, attn, ids)
    gen = torch.Generator().manual_seed(2)
    canvas = torch.randint(0, model.cfg.vocab_size, (model.cfg.canvas_length,), generator=gen)
    return model.logits(model(CanvasBatch([Segment("canvas", 0, canvas.numel(), ids.numel(), slots)], canvas), attn))


@pytest.mark.parametrize("block", [BLOCK, None], ids=["block", "per_tensor"])
def test_dequantized_forward(hf, block):
    """With a dequantizing apply, the fp8 model computes what the unquantized model computes on the dequantized
    checkpoint (which it also loads, dequantizing at load), and stays close to the original bf16/fp32 weights."""
    state, qconfig = fp8_checkpoint(hf, block)
    model = build(hf, qconfig, state)
    for module in model.modules():
        if isinstance(module, LinearBase) and isinstance(module.quant_method, Fp8LinearMethod):
            module.quant_method = DequantLinear(block)
    hf.config.quantization_config = qconfig  # its weight_block_size, for the tensors dequantized at load
    try:
        reference = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    finally:
        del hf.config.quantization_config
    reference.load_weights(state.items())  # no quant_config: every fp8 tensor is dequantized at load
    original = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    original.load_weights(hf.state_dict().items())

    got = canvas_logits(model)
    torch.testing.assert_close(got, canvas_logits(reference), rtol=1e-5, atol=1e-5)
    # NOTE: loose: e4m3 moves each weight by ~2.6% (below), and this random high-gain model turns that into ~0.3
    # relative logit error, as it does random 2.6% noise on the same weights; the exact check is the line above.
    want = canvas_logits(original)
    assert rel_err(got, want) < 0.6 and (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.5


@pytest.mark.parametrize("block", [BLOCK, None], ids=["block", "per_tensor"])
def test_dequantized_weights_are_near_the_originals(hf, block):
    """weight.float() * scale is within e4m3's rounding (3 mantissa bits: < 4% relative) of every original weight:
    the scales sit on the blocks (or tensors) they were computed from."""
    state, _ = fp8_checkpoint(hf, block)
    suffix = "_scale_inv" if block else "_scale"
    originals = {name: t for name, t in hf.state_dict().items() if name + suffix in state}
    assert sum(".experts." in n for n in originals) == 2 * len(hf.config.text_config.layer_types)
    for name, tensor in originals.items():
        assert rel_err(dequantize(state[name], state[name + suffix], block), tensor) < 0.04, name


def test_fp8_tensor_without_scale_is_refused(hf):
    """An fp8 expert tensor whose scale never comes is an error, not silently cast."""
    state, qconfig = fp8_checkpoint(hf, BLOCK)
    del state["model.decoder.layers.0.experts.down_proj_scale_inv"]
    with pytest.raises(ValueError, match="without their scale"):
        build(hf, qconfig, state)
