import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaGenerationConfig,
    DynamicCache,
    EntropyBoundSamplerConfig,
)

from sgl_diffusion.entrypoints import tiny_checkpoint as tc

SOFTCAP = 30.0
USER_TURN = "<bos><|turn>user\nWrite a long essay about Portugal.<turn|>\n"


def _hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _prompt_and_canvas(vocab_size, seed=0):
    # 40 prompt tokens > sliding window 16/24; ids >= 24 skip the pad/eos/special ids.
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(24, vocab_size, (2, 40), generator=gen), torch.randint(0, vocab_size, (2, 32), generator=gen)


@torch.no_grad()
def _denoise_logits(model, input_ids, canvas, **kwargs):
    cache = DynamicCache(config=model.config.text_config)
    return model(input_ids=input_ids, decoder_input_ids=canvas, past_key_values=cache, **kwargs).logits


def _tiny_image(seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (32, 48, 3), dtype=np.uint8))


def test_saved_files(tiny_checkpoint_dir):
    """The directory holds config, weights, generation config, tokenizer, chat template and processor files."""
    names = {p.name for p in tiny_checkpoint_dir.iterdir()}
    assert {
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "processor_config.json",
    } <= names  # fmt: skip
    config = json.loads((tiny_checkpoint_dir / "config.json").read_text())
    assert config["architectures"] == ["DiffusionGemmaForBlockDiffusion"]
    assert config["model_type"] == "diffusion_gemma" and config["canvas_length"] == 32
    assert (tiny_checkpoint_dir / "chat_template.jinja").read_text() == tc.GEMMA4_CHAT_TEMPLATE


def test_same_seed_is_byte_identical_and_seeds_differ(tiny_checkpoint_dir, tmp_path):
    """Rebuilding with seed 0 reproduces every file byte for byte; seed 1 changes only the weights."""
    same = _hashes(tc.build_tiny_checkpoint(tmp_path / "same", seed=0))
    assert same == _hashes(tiny_checkpoint_dir)
    other = _hashes(tc.build_tiny_checkpoint(tmp_path / "other", seed=1))
    assert other["model.safetensors"] != same["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in same.items() if k != "model.safetensors"
    }


def test_build_leaves_global_rng_untouched():
    """Building a model does not advance the caller's torch RNG stream."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tc.build_tiny_model(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_reload_gives_identical_logits(tiny_checkpoint_dir):
    """from_pretrained restores the exact weights (incl. both layer_scalar sets) and all encoder/decoder ties."""
    loaded = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_checkpoint_dir).eval()
    built = tc.build_tiny_model(seed=0)
    prompt, canvas = _prompt_and_canvas(built.config.text_config.vocab_size)
    assert torch.equal(_denoise_logits(loaded, prompt, canvas), _denoise_logits(built, prompt, canvas))
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight
    enc_layer, dec_layer = loaded.model.encoder.language_model.layers[5], loaded.model.decoder.layers[5]
    assert enc_layer.experts.gate_up_proj is dec_layer.experts.gate_up_proj
    assert not torch.equal(enc_layer.layer_scalar, dec_layer.layer_scalar)


@pytest.mark.parametrize("preset", ["default", "deep"])
def test_logits_are_well_conditioned(preset):
    """Denoise-step logits are finite, spread out, far from the softcap and have a clear argmax, with and without
    self-conditioning."""
    model = tc.build_tiny_model(seed=0, preset=preset)
    prompt, canvas = _prompt_and_canvas(model.config.text_config.vocab_size)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        first = model(input_ids=prompt, decoder_input_ids=canvas, past_key_values=cache).logits
        second = model(past_key_values=cache, decoder_input_ids=canvas, self_conditioning_logits=first / 0.8).logits
    for logits in (first, second):
        assert torch.isfinite(logits).all()
        assert logits.std(-1).min() > 1.0
        assert (logits.abs() > 0.9 * SOFTCAP).float().mean() < 0.001
        top2 = logits.topk(2, dim=-1).values
        assert (top2[..., 0] - top2[..., 1]).median() > 0.1
        assert logits.argmax(-1).unique().numel() > 16  # not one token everywhere
    assert not torch.allclose(first, second, atol=1e-3)  # self-conditioning has an effect


def test_scale_parameters_are_randomized():
    """No multiplicative parameter is left at its init value of 1, and encoder/decoder layer_scalars differ."""
    model = tc.build_tiny_model(seed=0)
    one_dim = {name: p for name, p in model.named_parameters() if p.dim() == 1}
    assert any(".router.per_expert_scale" in n for n in one_dim)
    assert any("self_conditioning.pre_norm" in n for n in one_dim)
    assert all(not torch.any(p == 1.0) for p in one_dim.values())
    buffers = dict(model.named_buffers())
    enc = torch.cat([b for n, b in buffers.items() if n.endswith("layer_scalar") and ".encoder." in n])
    dec = torch.cat([b for n, b in buffers.items() if n.endswith("layer_scalar") and ".decoder." in n])
    assert len(enc) == len(dec) == 6 and enc.max() < dec.min()
    assert enc.unique().numel() == 6  # per-layer values
    assert not torch.any(buffers["model.encoder.vision_tower.std_scale"] == 1.0)


def test_generation_config(tiny_checkpoint_dir):
    """generation_config.json carries the real checkpoint's sampler defaults with this tokenizer's ids."""
    gen = DiffusionGemmaGenerationConfig.from_pretrained(tiny_checkpoint_dir)
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    assert isinstance(gen.sampler_config, EntropyBoundSamplerConfig) and gen.sampler_config.entropy_bound == 0.1
    assert (gen.max_new_tokens, gen.max_denoising_steps, gen.t_min, gen.t_max) == (256, 48, 0.4, 0.8)
    assert (gen.stability_threshold, gen.confidence_threshold) == (1, 0.005)
    assert gen.eos_token_id == tok.convert_tokens_to_ids(["<eos>", "<turn|>", "<|tool_response>"]) == [1, 6, 10]
    assert gen.pad_token_id == tok.pad_token_id == 0 and gen.bos_token_id == tok.bos_token_id == 2


def test_tokenizer_special_ids_and_vocab_size(tiny_checkpoint_dir):
    """Specials have the documented ids, encode as single tokens, and the model vocab equals the tokenizer size."""
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    config = json.loads((tiny_checkpoint_dir / "config.json").read_text())
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]) == [0, 1, 2, 3, 4]
    for offset, special in enumerate(tc.GEMMA4_SPECIALS):
        assert tok.encode(special) == [5 + offset], special
    for piece in ["user", "model", "system", "thought", " the", "\n"]:
        assert len(tok.encode(piece)) == 1, piece
    assert len(tok) == config["text_config"]["vocab_size"] == max(tok.get_vocab().values()) + 1
    image_ids = tok.convert_tokens_to_ids(["<|image|>", "<|image>", "<image|>"])
    assert image_ids == [config["image_token_id"], config["boi_token_id"], config["eoi_token_id"]]
    assert (tok.image_token_id, tok.boi_token, tok.eoi_token) == (config["image_token_id"], "<|image>", "<image|>")


@pytest.mark.parametrize(
    "text, byte_fallback",
    [
        ("Hello, world!\n  Two  spaces, {braces} ~`|\\^ and the end.\n\n", False),
        ("a\ttab and a bell\x07", True),  # ASCII outside the printable pieces
        ("Olá, 世界 — naïve café 🙂 ∑", True),
    ],
)
def test_tokenizer_round_trip(tiny_checkpoint_dir, text, byte_fallback):
    """Text survives encode/decode exactly; characters without a piece go through <0xNN> byte fallback."""
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids)) == byte_fallback
    assert tok.unk_token_id not in ids


def test_chat_template_non_thinking(tiny_checkpoint_dir):
    """Default generation prompt pre-seeds an empty thought channel and tokenizes turn markers as single tokens."""
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    chat = [{"role": "user", "content": "Write a long essay about Portugal."}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == USER_TURN + "<|turn>model\n<|channel>thought\n<channel|>"
    ids = tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    ids_of = tok.convert_tokens_to_ids
    assert ids[:4] == ids_of(["<bos>", "<|turn>", "user", "\n"])
    assert ids[-9:] == ids_of(["<turn|>", "\n", "<|turn>", "model", "\n", "<|channel>", "thought", "\n", "<channel|>"])


def test_chat_template_thinking(tiny_checkpoint_dir):
    """enable_thinking adds a <|think|> system turn and leaves the model turn open."""
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    chat = [{"role": "user", "content": "Write a long essay about Portugal."}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert text == "<bos><|turn>system\n<|think|>\n<turn|>\n" + USER_TURN[len("<bos>") :] + "<|turn>model\n"


def test_chat_template_system_and_history(tiny_checkpoint_dir):
    """System messages open the system turn; earlier thoughts are stripped from assistant history."""
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<|channel>thought\nThey greet me.<channel|>Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    body = "<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\nBye<turn|>\n<|turn>model\n"
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|turn>system\nBe brief.<turn|>\n" + body + "<|channel>thought\n<channel|>"
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert text == "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n" + body


def test_chat_template_tool_calls(tiny_checkpoint_dir):
    """Tool declarations, calls and responses render in Gemma 4 syntax and round-trip through the tokenizer."""
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}]  # fmt: skip
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lisbon"}}}
    chat = [
        {"role": "user", "content": "Weather in Lisbon?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = tok.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<bos><|turn>system\n<|tool>declaration:get_weather{description:<|\"|>Weather for a city")
    assert text.endswith(
        "<|turn>model\n<|tool_call>call:get_weather{city:<|\"|>Lisbon<|\"|>}<tool_call|>"
        "<|tool_response>response:get_weather{value:<|\"|>sunny<|\"|>}<tool_response|>"
    )
    assert tok.decode(tok.encode(text)) == text


def test_processor_image_tokens_and_model_forward(tiny_checkpoint_dir):
    """AutoProcessor expands an image into <|image> + n x <|image|> + <image|>, and the HF model consumes it."""
    processor = AutoProcessor.from_pretrained(tiny_checkpoint_dir)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_checkpoint_dir).eval()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|turn>user\n<|image|>What is this?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    inputs = processor(text=[text], images=[[_tiny_image()]], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    n_soft = ids.count(model.config.image_token_id)
    assert n_soft == inputs["mm_token_type_ids"].sum().item() == 60
    first = ids.index(model.config.image_token_id)
    assert ids[first - 1] == model.config.boi_token_id and ids[first + n_soft] == model.config.eoi_token_id
    canvas = torch.arange(32).unsqueeze(0) + 30
    mm = {k: inputs[k] for k in ("pixel_values", "image_position_ids", "mm_token_type_ids", "attention_mask")}
    logits = _denoise_logits(model, inputs["input_ids"], canvas, **mm)
    assert logits.shape == (1, 32, model.config.text_config.vocab_size) and torch.isfinite(logits).all()
    other_image = processor(text=[text], images=[[_tiny_image(1)]], return_tensors="pt")
    other = {**mm, "pixel_values": other_image["pixel_values"]}
    assert not torch.allclose(logits, _denoise_logits(model, inputs["input_ids"], canvas, **other), atol=1e-3)


def test_layer_pattern_and_weight_layout(tiny_checkpoint_dir):
    """5 sliding + 1 full layer; full layers are K=V (no v_proj) with the global head dim; experts are 3-D."""
    config = json.loads((tiny_checkpoint_dir / "config.json").read_text())["text_config"]
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config["per_layer_config"] == {"5": {"head_dim": 32, "num_key_value_heads": 1}}
    assert config["rope_parameters"]["full_attention"]["rope_type"] == "proportional"
    with safe_open(str(tiny_checkpoint_dir / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    prefix = "model.decoder.layers"
    for i in range(5):
        assert shapes[f"{prefix}.{i}.self_attn.v_proj.weight"] == (2 * 16, 64)
    assert f"{prefix}.5.self_attn.v_proj.weight" not in shapes
    assert shapes[f"{prefix}.5.self_attn.k_proj.weight"] == (1 * 32, 64)
    assert shapes[f"{prefix}.5.self_attn.q_proj.weight"] == (4 * 32, 64)
    assert shapes[f"{prefix}.0.experts.gate_up_proj"] == (4, 2 * 32, 64)
    assert shapes[f"{prefix}.0.experts.down_proj"] == (4, 64, 32)
    for side in ("encoder.language_model", "decoder"):
        assert all(f"model.{side}.layers.{i}.layer_scalar" in shapes for i in range(6))
    assert not any(k.startswith(("lm_head", "model.encoder.language_model.layers.0.self_attn")) for k in shapes)


def test_deep_preset_is_a_second_configuration():
    """The deep preset repeats the layer pattern and changes heads, GQA ratios, experts, top-k and window."""
    default, deep = (tc.tiny_config(preset).text_config.to_dict() for preset in ("default", "deep"))
    assert deep["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 2
    assert deep["vocab_size"] == default["vocab_size"]
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_experts", "top_k_experts",
                  "moe_intermediate_size", "sliding_window"):  # fmt: skip
        assert deep[field] != default[field], field
    # serialized keys are zero-padded to the widest layer index
    assert deep["per_layer_config"] == {i: {"head_dim": 64, "num_key_value_heads": 2} for i in ("05", "11")}
    assert tc.tiny_config("default", sliding_window=8).text_config.sliding_window == 8


def test_cli(tmp_path, capsys):
    """The command-line entry point writes the requested preset and prints the output directory."""
    tc.main([str(tmp_path / "ckpt"), "--seed", "3", "--preset", "deep"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 12
