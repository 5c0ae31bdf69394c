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
from sgl_diffusion.models.layers import experts_loop
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


def fp8_checkpoint(hf, block, ignored=IGNORED):
    """The tiny model's state dict as an FP8 checkpoint, and its config.json's quantization_config."""
    state, suffix = {}, "_scale_inv" if block else "_scale"
    for name, tensor in hf.state_dict().items():
        if QUANTIZED.match(name) and not any(name.startswith(f"{module}.") for module in ignored):
            state[name], state[name + suffix] = quantize(tensor, block)
        else:
            state[name] = tensor
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ignored}
    return state, config | ({"weight_block_size": block} if block else {})


def build(hf, quantization_config, state):
    """The model as sglang's loader builds it for this checkpoint (sglang's own config parsing), loaded."""
    hf.config.quantization_config = quantization_config
    try:
        # sglang's get_quant_config hands the model class's packed_modules_mapping to the quantization config
        mapping = {"packed_modules_mapping": DiffusionGemmaForBlockDiffusion.packed_modules_mapping}
        model = DiffusionGemmaForBlockDiffusion(hf.config, quant_config=Fp8Config.from_config(quantization_config
                                                                                              | mapping))
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
    unquantized method; router and embedding stay plain; the experts hold the checkpoint's fp8 bits and scales."""
    state, qconfig = fp8_checkpoint(hf, block)
    model = build(hf, qconfig, state)
    methods = {name: type(m.quant_method) for name, m in model.named_modules() if isinstance(m, LinearBase)}
    assert {n for n, t in methods.items() if t is UnquantizedLinearMethod} == {
        "self_conditioning.gate_up_proj", "self_conditioning.down_proj"}  # fmt: skip
    assert sum(t is Fp8LinearMethod for t in methods.values()) == 4 * len(model.layers)
    assert type(model.layers[0].router.proj) is torch.nn.Linear and model.embed_tokens.weight.dtype == torch.float32
    experts = model.layers[0].experts
    for name in ("gate_up_proj", "down_proj"):
        key, suffix = f"model.decoder.layers.0.experts.{name}", "_scale_inv" if block else "_scale"
        assert getattr(experts, name).dtype == FP8
        assert torch.equal(getattr(experts, name).view(torch.uint8), state[key].view(torch.uint8))
        want = state[key + suffix] if block else state[key + suffix].expand(hf.config.text_config.num_experts)
        assert torch.equal(getattr(experts, name + suffix), want)


def test_ignored_attention_names_only_the_projections_a_layer_has(hf):
    """A checkpoint that keeps attention in bf16 lists each layer's own projections: a full (K=V) layer has no
    v_proj, and its fused projection is still left unquantized, whole (sglang refuses a fused layer whose parts
    disagree)."""
    kinds = hf.config.text_config.layer_types
    assert "full_attention" in kinds
    names = [f"model.decoder.layers.{i}.self_attn.{p}" for i, kind in enumerate(kinds)
             for p in ("q_proj", "k_proj", "o_proj") + (("v_proj",) if kind == "sliding_attention" else ())]
    state, qconfig = fp8_checkpoint(hf, BLOCK, IGNORED + names)
    model = build(hf, qconfig, state)
    for layer in model.layers:
        for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj):
            assert type(proj.quant_method) is UnquantizedLinearMethod and proj.weight.dtype == torch.float32
        assert type(layer.mlp.gate_up_proj.quant_method) is Fp8LinearMethod


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
    """An fp8 expert tensor whose scale never comes is an error, not silently cast: with fp8 experts (a missing
    weight) and when dequantized at load (a model built without the quant_config)."""
    state, qconfig = fp8_checkpoint(hf, BLOCK)
    del state["model.decoder.layers.0.experts.down_proj_scale_inv"]
    with pytest.raises(ValueError, match=r"lacks 1 weights.*experts\.down_proj_scale_inv"):
        build(hf, qconfig, state)
    with pytest.raises(ValueError, match="without their scale"):
        DiffusionGemmaForBlockDiffusion(hf.config).load_weights(state.items())


# ---- fp8 routed experts -------------------------------------------------------------------------------------------


def dequantized_reference(hf, qconfig, state):
    """The model without a quant_config on the same fp8 checkpoint: every fp8 tensor dequantized at load."""
    hf.config.quantization_config = qconfig  # its weight_block_size, for the tensors dequantized at load
    try:
        reference = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    finally:
        del hf.config.quantization_config
    reference.load_weights(state.items())
    return reference


def expert_bytes(model):
    """Bytes of the routed experts' weights, and of their scales."""
    weights = scales = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            n = p.numel() * p.element_size()
            weights, scales = (weights + n, scales) if name.endswith("_proj") else (weights, scales + n)
    return weights, scales


@pytest.mark.parametrize("block", [BLOCK, None], ids=["block", "per_tensor"])
@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (2, 2), (4, 2)], ids=["tp1", "tp2", "ep2", "tp4_ep2"])
def test_fp8_experts_hold_their_slices_and_scales(hf, block, layout):
    """Every layer's experts stay float8_e4m3fn with scales of the right shapes: block scales [E_local, 2 I_local /
    bn, H / bk] and [E_local, H / bn, I_local / bk], or one per expert [E_local]; at TP 2, EP 2 and EP 2 x MoE-TP 2
    each rank holds its experts, its slice of their intermediate dim (gate rows, then up rows) and the same slice
    of the block scales, in block units."""
    from tests.models.test_expert_parallel import as_rank as as_ep_rank

    state, qconfig = fp8_checkpoint(hf, block)
    tp, ep = layout
    text = hf.config.text_config
    e, h, i = text.num_experts, text.hidden_size, text.moe_intermediate_size
    e_local, i_local = e // ep, i // (tp // ep)
    suffix = "_scale_inv" if block else "_scale"
    for rank in range(tp):
        if tp == 1:
            model = build(hf, qconfig, state)
        else:
            with as_ep_rank(rank, tp, ep):
                model = build(hf, qconfig, state)
        moe_rank, first = rank % (tp // ep), (rank // (tp // ep)) * e_local
        for layer_id, layer in enumerate(model.layers):
            experts, key = layer.experts, f"model.decoder.layers.{layer_id}.experts"
            assert experts.gate_up_proj.dtype == experts.down_proj.dtype == FP8
            assert experts.gate_up_proj.shape == (e_local, 2 * i_local, h)
            assert experts.down_proj.shape == (e_local, h, i_local)
            gate_up_scale = getattr(experts, "gate_up_proj" + suffix)
            down_scale = getattr(experts, "down_proj" + suffix)
            if block:
                bn, bk = block
                assert gate_up_scale.shape == (e_local, 2 * i_local // bn, h // bk)
                assert down_scale.shape == (e_local, h // bn, i_local // bk)
            else:
                assert gate_up_scale.shape == down_scale.shape == (e_local,)
            assert gate_up_scale.dtype == down_scale.dtype == torch.float32

            def mine(t, dim, parts):
                t = t.narrow(0, first, e_local) if t.dim() else t.expand(e)[first : first + e_local]
                if t.dim() == 1:
                    return t
                return torch.cat([p.chunk(tp // ep, dim)[moe_rank] for p in t.chunk(parts, dim)], dim)

            w = state[f"{key}.gate_up_proj"].view(torch.uint8)
            assert torch.equal(experts.gate_up_proj.view(torch.uint8), mine(w, 1, 2))
            w = state[f"{key}.down_proj"].view(torch.uint8)
            assert torch.equal(experts.down_proj.view(torch.uint8), mine(w, 2, 1))
            assert torch.equal(gate_up_scale, mine(state[f"{key}.gate_up_proj{suffix}"], 1, 2))
            assert torch.equal(down_scale, mine(state[f"{key}.down_proj{suffix}"], 2, 1))


def test_fp8_expert_blocks_must_divide_each_rank_slice(hf):
    """Block scales whose block does not divide a rank's intermediate slice are refused at load, naming the sizes."""
    from tests.models.test_expert_parallel import as_rank as as_ep_rank

    state, qconfig = fp8_checkpoint(hf, BLOCK)
    i = hf.config.text_config.moe_intermediate_size
    with as_ep_rank(0, 4, 1), pytest.raises(ValueError, match=rf"\({i // 4} = moe_intermediate_size / 4 ranks\).*"
                                                                  r"weight_block_size \[16, 16\]"):
        build(hf, qconfig, state)


@pytest.mark.parametrize("block", [BLOCK, None], ids=["block", "per_tensor"])
def test_fp8_experts_compute_what_dequantized_experts_compute(hf, block):
    """The experts kept in fp8, dequantized per expert in the loop, give exactly the bits of the experts
    dequantized at load (the same weight.float() * scale values); so does a whole layer stack's forward."""
    state, qconfig = fp8_checkpoint(hf, block)
    model, reference = build(hf, qconfig, state), dequantized_reference(hf, qconfig, state)
    gen = torch.Generator().manual_seed(5)
    n, k, e = 300, hf.config.text_config.top_k_experts, hf.config.text_config.num_experts
    x = torch.randn(n, hf.config.text_config.hidden_size, generator=gen)
    weights = torch.rand(n, k, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    for layer, ref in zip(model.layers, reference.layers):
        assert ref.experts.gate_up_proj.dtype == torch.float32
        got = layer.experts(x, weights, ids)
        assert torch.equal(got, ref.experts(x, weights, ids))
        assert got.abs().sum() > 0
    # the whole model: everything else quantized alike (the dequantizing stand-in)
    for module in model.modules():
        if isinstance(module, LinearBase) and isinstance(module.quant_method, Fp8LinearMethod):
            module.quant_method = DequantLinear(block)
    torch.testing.assert_close(canvas_logits(model), canvas_logits(reference), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [BLOCK, None], ids=["block", "per_tensor"])
def test_fp8_experts_reach_the_fused_kernel_as_fp8(hf, block, monkeypatch):
    """On the fused path (CPU standing in for CUDA, a recording stand-in for sglang's kernel), each layer hands
    fused_experts_impl its fp8 weights, their scales and the block shape (None: per-expert scales) for use_fp8_w8a8."""
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe as sglang_fused_moe

    from sgl_diffusion.models import fused_moe

    calls = []

    def kernel(x, w13, w2, topk_weights, topk_ids, **kwargs):
        calls.append((w13, w2, kwargs))
        return torch.zeros_like(x)

    state, qconfig = fp8_checkpoint(hf, block)
    model = build(hf, qconfig, state)
    monkeypatch.setattr(sglang_fused_moe, "fused_experts_impl", kernel)
    monkeypatch.setattr(fused_moe, "applies", lambda x: x.dtype in fused_moe.FUSED_DTYPES)
    x = torch.randn(6, hf.config.text_config.hidden_size).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]])
    suffix = "_scale_inv" if block else "_scale"
    for layer in model.layers:
        experts = layer.experts
        experts(x, torch.rand(6, 2), ids)
        w13, w2, kwargs = calls.pop()
        assert w13 is experts.gate_up_proj and w2 is experts.down_proj and w13.dtype == FP8
        assert kwargs["use_fp8_w8a8"] is True and kwargs["block_shape"] == block
        assert kwargs["w1_scale"] is getattr(experts, "gate_up_proj" + suffix)
        assert kwargs["w2_scale"] is getattr(experts, "down_proj" + suffix)


def test_fp8_experts_take_a_quarter_of_float32_bytes(hf):
    """fp8 experts hold a byte per weight: a quarter of the float32 tiny model's (half of a bf16 model's), and
    their scales add little."""
    state, qconfig = fp8_checkpoint(hf, BLOCK)
    fp8_weights, fp8_scales = expert_bytes(build(hf, qconfig, state))
    weights, scales = expert_bytes(dequantized_reference(hf, qconfig, state))
    assert scales == 0 and fp8_weights * 4 == weights
    assert fp8_scales < 0.02 * weights  # [16, 16] blocks: 4 bytes per 256 weights


@pytest.mark.parametrize("tp", [1, 2])
def test_online_fp8_quantizes_each_expert_at_load(hf, tp):
    """--quantization fp8 on the float32 checkpoint: each expert quantized at load with its own scale (amax / e4m3
    max over the whole expert, the same on every MoE-TP rank), within e4m3's rounding of the original; a quarter of
    the float32 bytes; and the loop computes with exactly those dequantized values."""
    qconfig = Fp8Config(is_checkpoint_fp8_serialized=False)
    original = hf.state_dict()
    fp8_max = torch.finfo(FP8).max
    for rank in range(tp):
        with as_rank(rank, tp):
            model = DiffusionGemmaForBlockDiffusion(hf.config, quant_config=qconfig).eval()
            model.load_weights(original.items())
        for layer_id, layer in enumerate(model.layers):
            experts = layer.experts
            assert experts.gate_up_proj.dtype == experts.down_proj.dtype == FP8
            for name, dim, parts in (("gate_up_proj", 1, 2), ("down_proj", 2, 1)):
                w = original[f"model.decoder.layers.{layer_id}.experts.{name}"]
                scale = getattr(experts, name + "_scale")
                torch.testing.assert_close(scale, w.abs().amax(dim=(1, 2)) / fp8_max, rtol=1e-6, atol=0)
                mine = torch.cat([p.chunk(tp, dim)[rank] for p in w.chunk(parts, dim)], dim)
                got = dequantize(getattr(experts, name), scale, None)
                assert rel_err(got, mine) < 0.04, (name, rel_err(got, mine))
                assert (got - mine).abs().max() <= 2 ** -4 * w.abs().max()  # e4m3: half an ulp of 3 mantissa bits
            x = torch.randn(50, hf.config.text_config.hidden_size, generator=torch.Generator().manual_seed(layer_id))
            ids = torch.arange(100).remainder(experts.num_local).view(50, 2)
            weights = torch.rand(50, 2, generator=torch.Generator().manual_seed(layer_id))
            want = experts_loop(x, weights, ids, dequantize(experts.gate_up_proj, experts.gate_up_proj_scale, None),
                                dequantize(experts.down_proj, experts.down_proj_scale, None), 0, experts.activation)
            with as_rank(rank, tp):  # a rank's partial output (the stand-in group's all-reduce returns it)
                assert torch.equal(experts(x, weights, ids), want)
        if tp == 1:
            weights, scales = expert_bytes(model)
            plain = DiffusionGemmaForBlockDiffusion(hf.config).eval()
            assert weights * 4 == expert_bytes(plain)[0] and scales == 2 * 4 * len(model.layers) * experts.num_local
