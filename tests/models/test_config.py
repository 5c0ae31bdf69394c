"""Our frozen model config reads both config shapes the model is built from."""

from sglang.srt.utils.hf_transformers_utils import get_config
from transformers import AutoConfig

from sgl_diffusion.models.config import DiffusionGemmaConfig


def test_sglang_flattened_config_gives_the_same_layers(tiny_checkpoint_dir):
    """sglang's loader flattens per_layer_config into full + swa_* attributes; the layer specs must not change."""
    ours = DiffusionGemmaConfig.from_hf(AutoConfig.from_pretrained(tiny_checkpoint_dir))
    via_sglang = DiffusionGemmaConfig.from_hf(get_config(str(tiny_checkpoint_dir), trust_remote_code=False))
    assert via_sglang == ours
    assert {(s.sliding, s.head_dim, s.num_kv_heads) for s in ours.layers} == {(True, 16, 2), (False, 32, 1)}
    assert [s.rope.proportional for s in ours.layers] == [not s.sliding for s in ours.layers]
