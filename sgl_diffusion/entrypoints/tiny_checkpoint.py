"""Deterministic tiny DiffusionGemma checkpoint for tests, built with transformers' own classes.

    python -m sgl_diffusion.entrypoints.tiny_checkpoint OUT_DIR [--seed N] [--preset default|deep|unaligned]
    python -m sgl_diffusion.entrypoints.tiny_checkpoint OUT_DIR --trained [--seed N] [--retrain] [--ship]

writes config.json + model.safetensors (DiffusionGemmaForBlockDiffusion.save_pretrained), generation_config.json
with the real checkpoint's sampler defaults, and a Gemma4Processor (Gemma-4-style tokenizer with the official
Gemma 4 chat template, tiny-patch image processor, video processor, audio feature extractor) in a few seconds.
Weights are random but scaled so that numeric parity tests are meaningful: every norm weight, router scale and
layer_scalar is randomized (encoder and decoder layer_scalar sets differ) and logits are well away from the softcap.
With ``--trained`` the weights are instead trained on generated tasks (``tiny_training.py``): a model that
converges, as the real one does, with the same files. The default recipe's (seed 0) weights ship with the package
and are copied in seconds; another seed, ``--retrain`` or ``--ship`` trains (about 16 minutes on one CPU core).
"""

import argparse
import pathlib

import torch
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
    Gemma4AudioFeatureExtractor,
    Gemma4ImageProcessor,
    Gemma4Processor,
    Gemma4VideoProcessor,
    GemmaTokenizer,
)

# ---- tokenizer -------------------------------------------------------------------------------------------------

BASE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0..4, as in the real vocab
GEMMA4_SPECIALS = [
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|tool_response>", "<tool_response|>",
    "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", '<|"|>', "<|image>", "<|image|>", "<image|>",
    "<|audio>", "<|audio|>", "<audio|>", "<|video|>",
]  # fmt: skip
# Named special tokens exactly as the Gemma 4 converter registers them (Gemma4Processor reads image_token,
# boi_token, eoi_token, audio/boa/eoa_token from the tokenizer); `<|video|>` is added by the processor itself.
NAMED_SPECIALS = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>", "eoc_token": "<channel|>",
    "think_token": "<|think|>", "escape_token": '<|"|>', "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>", "stc_token": "<|tool_call>", "etc_token": "<tool_call|>",
    "std_token": "<|tool>", "etd_token": "<tool|>",
}  # fmt: skip
# Multi-char pieces, each built by a chain of (prefix, next char) merges. "▁the" comes first so that its
# ("▁", "t") merge outranks thought's ("t", "h"); no other chain's first pair occurs inside another piece.
PIECES = ["▁the", "user", "model", "system", "thought"]


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # The normalizer maps " " to "▁", so "▁" stands for the space; everything else falls back to <0xNN> bytes.
    tokens = [*BASE_SPECIALS, *GEMMA4_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), "\n", "▁"]
    tokens += [chr(c) for c in range(0x21, 0x7F)]
    merges = [(piece[:i], piece[i]) for piece in PIECES for i in range(1, len(piece))]
    tokens += [left + right for left, right in merges]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def build_tiny_tokenizer() -> GemmaTokenizer:
    """Offline tokenizers-backed Gemma tokenizer: BPE + byte fallback, Gemma 4 specials, Gemma 4 chat template."""
    vocab, merges = _vocab_and_merges()
    tok = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=False,  # like Gemma 4: the chat template writes <bos> itself
        padding_side="left",
        extra_special_tokens=NAMED_SPECIALS,
        chat_template=GEMMA4_CHAT_TEMPLATE,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|video|>"]})
    return tok


def build_tiny_processor() -> Gemma4Processor:
    # max_soft_tokens=70 is the smallest budget the Gemma 4 processors accept; with 4 px patches pooled 2x2 a
    # 32x48 image becomes 48x80 px = 60 soft tokens.
    vision = dict(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),  # required by Gemma4Processor; DiffusionGemma has no audio
        image_processor=Gemma4ImageProcessor(**vision),
        tokenizer=build_tiny_tokenizer(),
        video_processor=Gemma4VideoProcessor(**vision),
        chat_template=GEMMA4_CHAT_TEMPLATE,
        image_seq_length=70,
    )


# ---- model -----------------------------------------------------------------------------------------------------

_DEFAULT_TEXT = dict(
    num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, global_head_dim=32, num_global_key_value_heads=1, num_experts=4, top_k_experts=2,
    moe_intermediate_size=32, sliding_window=16,
)  # fmt: skip
# Second parity configuration: the layer pattern twice, another width, MQA (8:1) on sliding layers, 2 KV heads of
# dim 64 on full layers, more experts with an odd top-k, a different window.
PRESETS = {
    "default": _DEFAULT_TEXT,
    "deep": _DEFAULT_TEXT | dict(
        num_hidden_layers=12, hidden_size=96, intermediate_size=192, num_attention_heads=8, num_key_value_heads=1,
        global_head_dim=64, num_global_key_value_heads=2, num_experts=8, top_k_experts=3,
        moe_intermediate_size=24, sliding_window=24,
    ),
    # Dense and expert widths that are not multiples of sglang's CPU alignment (32 x TP): the server pads them.
    "unaligned": _DEFAULT_TEXT | dict(intermediate_size=48, moe_intermediate_size=24),
    # What tiny_training.py trains (1.7M text parameters): twice the width, transformers' own init, and the real
    # checkpoint's window-to-canvas ratio (1024 / 256 = 128 / 32). Random weights of this preset are not a test model.
    "trained": _DEFAULT_TEXT | dict(
        hidden_size=128, intermediate_size=256, head_dim=32, global_head_dim=64, moe_intermediate_size=64,
        sliding_window=128, initializer_range=0.02,
    ),
}  # fmt: skip
INIT_STD = 0.3  # std 0.02 gives near-uniform logits that hide bugs; 0.3 gives logits with std ~2-3 (cap 30)


def tiny_config(preset: str = "default", **text_overrides) -> DiffusionGemmaConfig:
    """Config of a preset; text_overrides replace DiffusionGemmaTextConfig kwargs (e.g. sliding_window=8)."""
    vocab, _ = _vocab_and_merges()
    text = PRESETS[preset] | text_overrides
    n_layers = text["num_hidden_layers"]
    text_config = dict(
        vocab_size=len(vocab),
        layer_types=[("full_attention" if i % 6 == 5 else "sliding_attention") for i in range(n_layers)],
        max_position_embeddings=4096,
        initializer_range=INIT_STD,
        use_bidirectional_attention="vision",
        final_logit_softcapping=30.0,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<eos>"],
        bos_token_id=vocab["<bos>"],
    ) | text
    vision_config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, patch_size=4, pooling_kernel_size=2, standardize=True, initializer_range=INIT_STD,
        position_embedding_size=160,  # > 140, the longest image side in patches the 70-token budget allows
    )  # fmt: skip
    return DiffusionGemmaConfig(
        text_config=text_config,
        vision_config=vision_config,
        canvas_length=32,
        image_token_id=vocab["<|image|>"],
        boi_token_id=vocab["<|image>"],
        eoi_token_id=vocab["<image|>"],
        initializer_range=text_config["initializer_range"],
        eos_token_id=_eos_ids(vocab),
        vision_soft_tokens_per_image=70,
        architectures=["DiffusionGemmaForBlockDiffusion"],
    )


def _eos_ids(vocab: dict[str, int]) -> list[int]:
    return [vocab["<eos>"], vocab["<turn|>"], vocab["<|tool_response>"]]


@torch.no_grad()
def _randomize(model: DiffusionGemmaForBlockDiffusion, seed: int) -> None:
    # Overwrite every weight from a private generator: HF init draws from the global RNG and leaves all scale
    # parameters at exactly 1, where bugs like w vs (1 + w) or a skipped norm are invisible.
    gen = torch.Generator().manual_seed(seed)
    for _, param in model.named_parameters():  # tied parameters are listed once
        if param.dim() == 1:  # RMSNorm weights, router.scale, router.per_expert_scale: multiplicative
            param.uniform_(0.5, 1.5, generator=gen)
        else:
            param.normal_(0.0, INIT_STD, generator=gen)
    for name, buf in model.named_buffers():
        if name.endswith("layer_scalar"):  # disjoint ranges, so a port that swaps the two sets fails
            low = 0.6 if ".encoder." in name else 1.1
            buf.uniform_(low, low + 0.3, generator=gen)
        elif name.endswith("std_scale"):
            buf.uniform_(0.5, 1.5, generator=gen)
        elif name.endswith("std_bias"):
            buf.normal_(0.0, INIT_STD, generator=gen)


def tiny_generation_config() -> DiffusionGemmaGenerationConfig:
    """The real checkpoint's generation_config.json values, with this tokenizer's ids."""
    vocab, _ = _vocab_and_merges()
    return DiffusionGemmaGenerationConfig(
        max_new_tokens=256,
        max_denoising_steps=48,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
        eos_token_id=_eos_ids(vocab),
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<bos>"],
    )


def build_tiny_model(seed: int = 0, preset: str = "default", **text_overrides) -> DiffusionGemmaForBlockDiffusion:
    """Float32 eval-mode model whose weights depend only on seed, preset and overrides."""
    with torch.random.fork_rng(devices=[]):  # HF init consumes global RNG; leave the caller's stream untouched
        model = DiffusionGemmaForBlockDiffusion(tiny_config(preset, **text_overrides)).float()
    _randomize(model, seed)
    model.generation_config = tiny_generation_config()
    return model.eval()


def build_tiny_checkpoint(out_dir, seed: int = 0, preset: str = "default") -> pathlib.Path:
    """Write model, generation config, tokenizer, chat template and processor files into out_dir."""
    out = pathlib.Path(out_dir)
    build_tiny_model(seed, preset).save_pretrained(out)
    build_tiny_processor().save_pretrained(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(set(PRESETS) - {"trained"}), default="default")
    parser.add_argument("--trained", action="store_true",
                        help="the 'trained' preset, trained on generated tasks (tiny_training.py), not random weights "
                             "(the shipped weights when they are this recipe's)")  # fmt: skip
    parser.add_argument("--retrain", action="store_true", help="with --trained: train even if the weights ship")
    parser.add_argument("--ship", action="store_true", help="with --trained: train, then replace the shipped weights")
    args = parser.parse_args(argv)
    if args.trained:
        from sgl_diffusion.entrypoints.tiny_training import (
            TrainRecipe, build_trained_checkpoint, copy_shipped, ship, shipped_digest)  # fmt: skip

        recipe = TrainRecipe(seed=args.seed)
        if args.retrain or args.ship or shipped_digest() != recipe.digest():
            print(build_trained_checkpoint(args.out_dir, recipe))
        else:
            print(copy_shipped(args.out_dir))
        if args.ship:
            ship(args.out_dir)
    else:
        print(build_tiny_checkpoint(args.out_dir, args.seed, args.preset))


# Verbatim copy of Google's Gemma 4 chat_template.jinja, large-model variant (gemma-4-31B-it / 26B-A4B-it, which the
# DiffusionGemma converter copies): without enable_thinking the generation prompt pre-seeds an empty thought
# channel. Source: llama.cpp models/templates/google-gemma-4-31B-it.jinja (as of ggml-org PR #21704).
GEMMA4_CHAT_TEMPLATE = r"""{%- macro format_parameters(properties, required) -%}
    {%- set standard_keys = ['description', 'type', 'properties', 'required', 'nullable'] -%}
    {%- set ns = namespace(found_first=false) -%}
    {%- for key, value in properties | dictsort -%}
        {%- set add_comma = false -%}
        {%- if key not in standard_keys -%}
            {%- if ns.found_first %},{% endif -%}
            {%- set ns.found_first = true -%}
            {{ key }}:{
            {%- if value['description'] -%}
                description:<|"|>{{ value['description'] }}<|"|>
                {%- set add_comma = true -%}
            {%- endif -%}
            {%- if value['type'] | upper == 'STRING' -%}
                {%- if value['enum'] -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    enum:{{ format_argument(value['enum']) }}
                {%- endif -%}
            {%- elif value['type'] | upper == 'ARRAY' -%}
                {%- if value['items'] is mapping and value['items'] -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    items:{
                    {%- set ns_items = namespace(found_first=false) -%}
                    {%- for item_key, item_value in value['items'] | dictsort -%}
                        {%- if item_value is not none -%}
                            {%- if ns_items.found_first %},{% endif -%}
                            {%- set ns_items.found_first = true -%}
                            {%- if item_key == 'properties' -%}
                                properties:{
                                {%- if item_value is mapping -%}
                                    {{- format_parameters(item_value, value['items']['required'] | default([])) -}}
                                {%- endif -%}
                                }
                            {%- elif item_key == 'required' -%}
                                required:[
                                {%- for req_item in item_value -%}
                                    <|"|>{{- req_item -}}<|"|>
                                    {%- if not loop.last %},{% endif -%}
                                {%- endfor -%}
                                ]
                            {%- elif item_key == 'type' -%}
                                {%- if item_value is string -%}
                                    type:{{ format_argument(item_value | upper) }}
                                {%- else -%}
                                    type:{{ format_argument(item_value | map('upper') | list) }}
                                {%- endif -%}
                            {%- else -%}
                                {{ item_key }}:{{ format_argument(item_value) }}
                            {%- endif -%}
                        {%- endif -%}
                    {%- endfor -%}
                    }
                {%- endif -%}
            {%- endif -%}
            {%- if value['nullable'] %}
                {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                nullable:true
            {%- endif -%}
            {%- if value['type'] | upper == 'OBJECT' -%}
                {%- if value['properties'] is defined and value['properties'] is mapping -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    properties:{
                    {{- format_parameters(value['properties'], value['required'] | default([])) -}}
                    }
                {%- elif value is mapping -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    properties:{
                    {{- format_parameters(value, value['required'] | default([])) -}}
                    }
                {%- endif -%}
                {%- if value['required'] -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    required:[
                    {%- for item in value['required'] | default([]) -%}
                        <|"|>{{- item -}}<|"|>
                        {%- if not loop.last %},{% endif -%}
                    {%- endfor -%}
                    ]
                {%- endif -%}
            {%- endif -%}
            {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
            type:<|"|>{{ value['type'] | upper }}<|"|>}
        {%- endif -%}
    {%- endfor -%}
{%- endmacro -%}
{%- macro format_function_declaration(tool_data) -%}
    declaration:{{- tool_data['function']['name'] -}}{description:<|"|>{{- tool_data['function']['description'] -}}<|"|>
    {%- set params = tool_data['function']['parameters'] -%}
    {%- if params -%}
        ,parameters:{
        {%- if params['properties'] -%}
            properties:{ {{- format_parameters(params['properties'], params['required']) -}} },
        {%- endif -%}
        {%- if params['required'] -%}
            required:[
            {%- for item in params['required'] -%}
                <|"|>{{- item -}}<|"|>
                {{- ',' if not loop.last -}}
            {%- endfor -%}
            ],
        {%- endif -%}
        {%- if params['type'] -%}
            type:<|"|>{{- params['type'] | upper -}}<|"|>}
        {%- endif -%}
    {%- endif -%}
    {%- if 'response' in tool_data['function'] -%}
        {%- set response_declaration = tool_data['function']['response'] -%}
        ,response:{
        {%- if response_declaration['description'] -%}
            description:<|"|>{{- response_declaration['description'] -}}<|"|>,
        {%- endif -%}
        {%- if response_declaration['type'] | upper == 'OBJECT' -%}
            type:<|"|>{{- response_declaration['type'] | upper -}}<|"|>}
        {%- endif -%}
    {%- endif -%}
    }
{%- endmacro -%}
{%- macro format_argument(argument, escape_keys=True) -%}
    {%- if argument is string -%}
        {{- '<|"|>' + argument + '<|"|>' -}}
    {%- elif argument is boolean -%}
        {{- 'true' if argument else 'false' -}}
    {%- elif argument is mapping -%}
        {{- '{' -}}
        {%- set ns = namespace(found_first=false) -%}
        {%- for key, value in argument | dictsort -%}
            {%- if ns.found_first %},{% endif -%}
            {%- set ns.found_first = true -%}
            {%- if escape_keys -%}
                {{- '<|"|>' + key + '<|"|>' -}}
            {%- else -%}
                {{- key -}}
            {%- endif -%}
            :{{- format_argument(value, escape_keys=escape_keys) -}}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif argument is sequence -%}
        {{- '[' -}}
        {%- for item in argument -%}
            {{- format_argument(item, escape_keys=escape_keys) -}}
            {%- if not loop.last %},{% endif -%}
        {%- endfor -%}
        {{- ']' -}}
    {%- else -%}
        {{- argument -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- if '<|channel>' in part -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- else -%}
            {%- set ns.result = ns.result + part -%}
        {%- endif -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}

{%- macro format_tool_response_block(tool_name, response) -%}
    {{- '<|tool_response>' -}}
    {%- if response is mapping -%}
        {{- 'response:' + tool_name + '{' -}}
        {%- for key, value in response | dictsort -%}
            {{- key -}}:{{- format_argument(value, escape_keys=False) -}}
            {%- if not loop.last %},{% endif -%}
        {%- endfor -%}
        {{- '}' -}}
    {%- else -%}
        {{- 'response:' + tool_name + '{value:' + format_argument(response, escape_keys=False) + '}' -}}
    {%- endif -%}
    {{- '<tool_response|>' -}}
{%- endmacro -%}

{%- set ns = namespace(prev_message_type=None) -%}
{%- set loop_messages = messages -%}
{{- bos_token -}}
{#- Handle System/Tool Definitions Block -#}
{%- if (enable_thinking is defined and enable_thinking) or tools or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\n' -}}

    {#- Inject Thinking token at the very top of the FIRST system turn -#}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- '<|think|>\n' -}}
        {%- set ns.prev_message_type = 'think' -%}
    {%- endif -%}

    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {{- messages[0]['content'] | trim -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}

    {%- if tools -%}
        {%- for tool in tools %}
            {{- '<|tool>' -}}
            {{- format_function_declaration(tool) | trim -}}
            {{- '<tool|>' -}}
        {%- endfor %}
        {%- set ns.prev_message_type = 'tool' -%}
    {%- endif -%}

    {{- '<turn|>\n' -}}
{%- endif %}

{#- Pre-scan: find last user message index for reasoning guard -#}
{%- set ns_turn = namespace(last_user_idx=-1) -%}
{%- for i in range(loop_messages | length) -%}
    {%- if loop_messages[i]['role'] == 'user' -%}
        {%- set ns_turn.last_user_idx = i -%}
    {%- endif -%}
{%- endfor -%}

{#- Loop through messages -#}
{%- for message in loop_messages -%}
    {%- if message['role'] != 'tool' -%}
    {%- set ns.prev_message_type = None -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {#- Detect continuation: suppress duplicate <|turn>model when previous non-tool message was also assistant -#}
    {%- set prev_nt = namespace(role=None, found=false) -%}
    {%- if loop.index0 > 0 -%}
        {%- for j in range(loop.index0 - 1, -1, -1) -%}
            {%- if not prev_nt.found -%}
                {%- if loop_messages[j]['role'] != 'tool' -%}
                    {%- set prev_nt.role = loop_messages[j]['role'] -%}
                    {%- set prev_nt.found = true -%}
                {%- endif -%}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- set continue_same_model_turn = (role == 'model' and prev_nt.role == 'assistant') -%}
    {%- if not continue_same_model_turn -%}
        {{- '<|turn>' + role + '\n' }}
    {%- endif -%}

    {#- Render reasoning/reasoning_content as thinking channel -#}
    {%- set thinking_text = message.get('reasoning') or message.get('reasoning_content') -%}
    {%- if thinking_text and loop.index0 > ns_turn.last_user_idx and message.get('tool_calls') -%}
        {{- '<|channel>thought\n' + thinking_text + '\n<channel|>' -}}
    {%- endif -%}

            {%- if message['tool_calls'] -%}
                {%- for tool_call in message['tool_calls'] -%}
                    {%- set function = tool_call['function'] -%}
                    {{- '<|tool_call>call:' + function['name'] + '{' -}}
                    {%- if function['arguments'] is mapping -%}
                        {%- set ns_args = namespace(found_first=false) -%}
                        {%- for key, value in function['arguments'] | dictsort -%}
                            {%- if ns_args.found_first %},{% endif -%}
                            {%- set ns_args.found_first = true -%}
                            {{- key -}}:{{- format_argument(value, escape_keys=False) -}}
                        {%- endfor -%}
                    {%- elif function['arguments'] is string -%}
                        {{- function['arguments'] -}}
                    {%- endif -%}
                    {{- '}<tool_call|>' -}}
                {%- endfor -%}
                {%- set ns.prev_message_type = 'tool_call' -%}
            {%- endif -%}

            {%- set ns_tr_out = namespace(flag=false) -%}
            {%- if message.get('tool_responses') -%}
                {#- Legacy: tool_responses embedded on the assistant message (Google/Gemma native) -#}
                {%- for tool_response in message['tool_responses'] -%}
                    {{- format_tool_response_block(tool_response['name'] | default('unknown'), tool_response['response']) -}}
                    {%- set ns_tr_out.flag = true -%}
                    {%- set ns.prev_message_type = 'tool_response' -%}
                {%- endfor -%}
            {%- elif message.get('tool_calls') -%}
                {#- OpenAI Chat Completions: forward-scan consecutive role:tool messages -#}
                {%- set ns_tool_scan = namespace(stopped=false) -%}
                {%- for k in range(loop.index0 + 1, loop_messages | length) -%}
                    {%- if ns_tool_scan.stopped -%}
                    {%- elif loop_messages[k]['role'] != 'tool' -%}
                        {%- set ns_tool_scan.stopped = true -%}
                    {%- else -%}
                        {%- set follow = loop_messages[k] -%}
                        {#- Resolve tool_call_id to function name -#}
                        {%- set ns_tname = namespace(name=follow.get('name') | default('unknown')) -%}
                        {%- for tc in message['tool_calls'] -%}
                            {%- if tc.get('id') == follow.get('tool_call_id') -%}
                                {%- set ns_tname.name = tc['function']['name'] -%}
                            {%- endif -%}
                        {%- endfor -%}
                        {#- Handle content as string or content-parts array -#}
                        {%- set tool_body = follow.get('content') -%}
                        {%- if tool_body is string -%}
                            {{- format_tool_response_block(ns_tname.name, tool_body) -}}
                        {%- elif tool_body is sequence and tool_body is not string -%}
                            {%- set ns_txt = namespace(s='') -%}
                            {%- for part in tool_body -%}
                                {%- if part.get('type') == 'text' -%}
                                    {%- set ns_txt.s = ns_txt.s + (part.get('text') | default('')) -%}
                                {%- endif -%}
                            {%- endfor -%}
                            {{- format_tool_response_block(ns_tname.name, ns_txt.s) -}}
                        {%- else -%}
                            {{- format_tool_response_block(ns_tname.name, tool_body) -}}
                        {%- endif -%}
                        {%- set ns_tr_out.flag = true -%}
                        {%- set ns.prev_message_type = 'tool_response' -%}
                    {%- endif -%}
                {%- endfor -%}
            {%- endif -%}

            {%- if message['content'] is string -%}
                {%- if role == 'model' -%}
                    {{- strip_thinking(message['content']) -}}
                {%- else -%}
                    {{- message['content'] | trim -}}
                {%- endif -%}
            {%- elif message['content'] is sequence -%}
                {%- for item in message['content'] -%}
                    {%- if item['type'] == 'text' -%}
                        {%- if role == 'model' -%}
                            {{- strip_thinking(item['text']) -}}
                        {%- else -%}
                            {{- item['text'] | trim -}}
                        {%- endif -%}
                    {%- elif item['type'] == 'image' -%}
                        {{- '<|image|>' -}}
                        {%- set ns.prev_message_type = 'image' -%}
                    {%- elif item['type'] == 'audio' -%}
                        {{- '<|audio|>' -}}
                        {%- set ns.prev_message_type = 'audio' -%}
                    {%- elif item['type'] == 'video' -%}
                        {{- '<|video|>' -}}
                        {%- set ns.prev_message_type = 'video' -%}
                    {%- endif -%}
                {%- endfor -%}
            {%- endif -%}

        {%- if ns.prev_message_type == 'tool_call' and not ns_tr_out.flag -%}
            {{- '<|tool_response>' -}}
        {%- elif not (ns_tr_out.flag and not message.get('content')) -%}
            {{- '<turn|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
    {%- if ns.prev_message_type != 'tool_response' and ns.prev_message_type != 'tool_call' -%}
        {{- '<|turn>model\n' -}}
        {%- if not enable_thinking | default(false) -%}
            {{- '<|channel>thought\n<channel|>' -}}
        {%- endif -%}
    {%- endif -%}
{%- endif -%}
"""


if __name__ == "__main__":
    main()
