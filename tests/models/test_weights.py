"""Checkpoint loading: padded intermediate sizes (what sglang's CPU path builds) load exactly; wrong shapes fail."""

import copy
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.configs.update_config import DEFAULT_MOE_PADDING_SIZE, update_intermediate_size

from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_model
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
from tests.models.test_parity import assert_prefill_and_first_canvas_match, prompt_ids


def sglang_padded_config(hf_config, tp: int):
    """The config sglang's CPU path hands the model (adjust_config_with_unaligned_cpu_tp's intermediate padding)."""
    config = copy.deepcopy(hf_config)
    model_config = SimpleNamespace(hf_config=config, hf_text_config=config.text_config)
    for attr in ("moe_intermediate_size", "intermediate_size"):
        update_intermediate_size(model_config, attr, tp * DEFAULT_MOE_PADDING_SIZE)
    return config


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_padded_intermediate_sizes_compute_the_unpadded_model(tp):
    """Dense (48) and expert (24) widths padded to sglang's multiple of 32 x TP load with zeros and give HF's KV
    and first-canvas logits."""
    hf = build_tiny_model(0, "unaligned")
    config = sglang_padded_config(hf.config, tp)
    text = config.text_config
    assert text.intermediate_size % (32 * tp) == 0 and text.intermediate_size > 48
    assert text.moe_intermediate_size % (32 * tp) == 0 and text.moe_intermediate_size > 24
    ours = DiffusionGemmaForBlockDiffusion(config).eval()
    ours.load_weights(hf.state_dict().items())
    experts = ours.layers[0].experts
    assert experts.down_proj.shape[-1] == text.moe_intermediate_size
    assert not experts.down_proj[..., 24:].any() and not experts.gate_up_proj[:, 24 : text.moe_intermediate_size].any()

    assert_prefill_and_first_canvas_match(hf, ours, prompt_ids(ours.cfg.sliding_window + 5, ours.cfg.vocab_size), 1e-5)


@pytest.mark.parametrize("name, shape", [
    ("model.decoder.layers.0.experts.down_proj", (4, 64, 40)),  # wider than the model: not a padding
    ("model.decoder.layers.0.experts.down_proj", (4, 60, 32)),  # another hidden size
    ("model.decoder.layers.0.mlp.gate_proj.weight", (128, 60)),
    ("model.decoder.layers.0.self_attn.q_proj.weight", (60, 64)),  # no padding allowed off intermediate sizes
    ("model.decoder.layers.0.experts.gate_up_proj", (4, 63, 64)),  # gate and up cannot be split evenly
])  # fmt: skip
def test_a_checkpoint_tensor_that_does_not_fit_is_refused(name, shape):
    """Only intermediate dimensions may be smaller than the model's; anything else names the tensor and fails."""
    hf = build_tiny_model(0, "default")
    ours = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    weights = dict(hf.state_dict()) | {name: torch.zeros(shape)}
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        ours.load_weights(weights.items())


def test_get_weights_by_name_gives_back_every_checkpoint_tensor():
    """/get_weights_by_name at TP 1: every checkpoint key, tied ones included, reads back as saved (the fused q/k/v
    and gate/up parts cut out of their projections, padding left out), truncated to its first rows."""
    hf = build_tiny_model(0, "unaligned")
    ours = DiffusionGemmaForBlockDiffusion(sglang_padded_config(hf.config, 1)).eval()
    state = hf.state_dict()
    ours.load_weights(state.items())
    before = {n: p.clone() for n, p in ours.state_dict().items()}
    for name, tensor in state.items():
        assert torch.equal(torch.tensor(ours.get_weights_by_name(name, truncate_size=10**6)), tensor.float()), name
    assert torch.equal(torch.tensor(ours.get_weights_by_name("lm_head.weight", 3)), state["lm_head.weight"][:3])
    assert all(torch.equal(p, before[n]) for n, p in ours.state_dict().items())  # the probe put every weight back
    with pytest.raises(KeyError, match="not a weight"):
        ours.get_weights_by_name("model.decoder.layers.0.self_attn.qkv_proj.weight")


def test_a_checkpoint_must_be_whole_a_trainers_bucket_need_not():
    """A load must cover every weight, unless ``accepts_partial_weights`` is set (sglang's tensor and distributed
    updates, which send buckets): then the tensors sent are loaded, fused parts included, and the rest stay."""
    hf = build_tiny_model(0, "default")
    ours = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    state = hf.state_dict()
    ours.load_weights(state.items())
    k, down = "model.decoder.layers.1.self_attn.k_proj.weight", "model.decoder.layers.0.experts.down_proj"
    bucket = {k: state[k] + 1, down: state[down] * 2}
    with pytest.raises(ValueError, match="checkpoint lacks"):
        ours.load_weights(bucket.items())
    ours.load_weights(state.items())
    before = {n: p.clone() for n, p in ours.state_dict().items()}
    ours.accepts_partial_weights = True
    ours.load_weights(bucket.items())
    for name, tensor in bucket.items():
        assert torch.equal(torch.tensor(ours.get_weights_by_name(name, truncate_size=10**6)), tensor), name
    changed = {n for n, p in ours.state_dict().items() if not torch.equal(p, before[n])}
    assert changed == {"layers.1.self_attn.qkv_proj.weight", "layers.0.experts.down_proj"}
    q = "model.decoder.layers.1.self_attn.q_proj.weight"  # the other parts of the fused projection stay
    assert torch.equal(torch.tensor(ours.get_weights_by_name(q, truncate_size=10**6)), state[q])
