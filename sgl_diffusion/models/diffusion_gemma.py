"""DiffusionGemma: one Gemma-4 MoE weight stack used in two modes within one forward.

- encode (prefill / commit segments): causal (image runs bidirectional when the checkpoint says
  use_bidirectional_attention="vision"), writes KV, encoder layer scalars;
- denoise (canvas segments): self-conditioned input, bidirectional over [cached KV ; canvas], decoder
  layer scalars, final norm, tied LM head, fp32 softcap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from torch import nn

from sgl_diffusion.attention.base import BaseAttnBackend
from sgl_diffusion.models.config import DiffusionGemmaConfig
from sgl_diffusion.models.layers import Attend, DecoderLayer, RMSNorm, SelfConditioning, rope_cos_sin, rope_inv_freq
from sgl_diffusion.models.parallel import all_gather, all_reduce, in_sglang_runtime, tp_rank_size
from sgl_diffusion.models.weights import checkpoint_tensor, expect, load_checkpoint_weights
from sgl_diffusion.runtime.canvas_batch import CanvasBatch


class DiffusionGemmaForBlockDiffusion(nn.Module):
    # read by sglang's loader: a quantization config's ignored_layers name the checkpoint's unfused projections
    # (K=V layers' fused projection goes by qk_proj: they have no v_proj for an ignore list to name)
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "qk_proj": ["q_proj", "k_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}  # fmt: skip

    @in_sglang_runtime
    def __init__(self, config, quant_config=None, prefix: str = ""):
        """``quant_config``: sglang's (``--quantization fp8`` or a checkpoint's quantization_config); the attention
        and dense-MLP projections take its method, and an fp8 one keeps the routed experts in fp8 (layers.Experts).
        The embedding / LM head, router, norms and vision tower stay in the model dtype (layers.DecoderLayer)."""
        super().__init__()
        _refuse_quantization_without_kernels(quant_config)
        from transformers import AutoModel
        from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaMultimodalEmbedder

        self.hf_config = config
        self.cfg = cfg = DiffusionGemmaConfig.from_hf(config)
        _, tp = tp_rank_size()
        self.tp_size = tp  # read in forward as an int, not from sglang's context: a compiled step holds it
        if cfg.num_heads % tp:  # sglang's layers would only assert it
            raise ValueError(f"tensor parallelism: {tp} ranks do not divide the {cfg.num_heads} attention heads")
        # NOTE: vocab-parallel and tied to the LM head: each rank holds a slice of the vocab rows (padded to sglang's
        # multiple of 64 x TP with zero rows); the logits and the soft embeddings read only the real ones.
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        expect(self.embed_tokens.weight, {None: (cfg.vocab_size, cfg.hidden_size)})
        # NOTE: HF casts sqrt(H) to the weight dtype first: 53.066 becomes 53.0 in bf16.
        self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size**0.5), persistent=False)
        # the block size of an FP8 checkpoint's scales, for the tensors weights.py dequantizes at load (the experts
        # of a model built without an fp8 quant_config; with one, Experts reads quant_config.weight_block_size)
        self.fp8_block_size = (getattr(config, "quantization_config", None) or {}).get("weight_block_size")
        self.accepts_partial_weights = False  # see load_weights
        # NOTE: prefixes are the checkpoint's module names, which a quantization config's ignored_layers list
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, quant_config, f"model.decoder.layers.{i}")
                                    for i in range(cfg.num_layers))  # fmt: skip
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg, quant_config, "model.decoder.self_conditioning")
        # NOTE: kept in fp32 and out of the state dict; a bf16 inv_freq would blur long positions.
        self.inv_freq = {spec.sliding: rope_inv_freq(spec.rope, spec.head_dim) for spec in cfg.layers}
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.embed_vision = DiffusionGemmaMultimodalEmbedder(config.vision_config, config.text_config)

    # ---- inputs -------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale.to(self.embed_tokens.weight.dtype)

    @in_sglang_runtime
    def soft_embed(self, probs: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input from the previous step's probabilities: [..., V] -> [..., H].

        NOTE: under TP, an all-reduce of [..., H] partial products, not an all-gather of probabilities: every rank
        already holds whole rows of ``probs`` (the sampler needs them whole, for entropies and draws, so ``logits``
        gathers the vocab once), so each rank multiplies its vocab slice by its embedding rows and the ranks sum
        the products: H values a row cross the ranks instead of V.
        """
        shard = self.embed_tokens.shard_indices
        begin, end = shard.org_vocab_start_index, shard.org_vocab_end_index
        weight = self.embed_tokens.weight[: end - begin]  # this rank's real rows: ids [begin, end)
        partial = probs[..., begin:end].to(weight.dtype) @ weight
        return (all_reduce(partial) if self.tp_size > 1 else partial) * self.embed_scale.to(weight.dtype)

    def image_embeds(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor) -> torch.Tensor:
        """Soft tokens of a batch of images, flattened in order: [num_image_tokens, H]."""
        hidden = self.vision_tower(pixel_values=pixel_values, pixel_position_ids=image_position_ids).last_hidden_state
        return self.embed_vision(inputs_embeds=hidden).reshape(-1, self.cfg.hidden_size)

    # ---- forward ------------------------------------------------------------------------------

    @torch.no_grad()
    @in_sglang_runtime
    def forward(self, batch: CanvasBatch, attn: BaseAttnBackend) -> torch.Tensor | None:
        """Run every segment of ``batch``; return the canvas tokens' last hidden states [N_canvas, H]
        (None if no canvas). ``logits()`` turns them into logits; the runner does it in tiles."""
        x = self.embed(batch.input_ids)
        if batch.image_embeds is not None:
            x[self._image_token_mask(batch)] = batch.image_embeds.to(x.dtype)
        kinds = batch.token_kinds
        # which layer scalar each token takes: the decoder's on canvas tokens, the encoder's on the others
        decoder_rows = {"canvas": True, "encode": False}.get(kinds)
        if kinds == "canvas":  # NOTE: the common case once prompts are in: no gather/scatter of the canvas rows
            x = self.self_conditioning(x, batch.canvas_soft_embeds)
        elif kinds == "mixed":
            canvas_mask = batch.canvas_mask
            x[canvas_mask] = self.self_conditioning(x[canvas_mask], batch.canvas_soft_embeds)
            decoder_rows = canvas_mask[:, None]

        positions = batch.positions
        rope = self._rope(positions, x.dtype)
        if not self.cfg.bidirectional_images:
            batch = _causal_images(batch)  # the soft tokens are in x already; attention treats them as text
        attn.plan(batch)

        def attend(q, k, v, layer):
            return attn.forward(q, k, v, layer, batch)

        for layer, spec in zip(self.layers, self.cfg.layers):
            x = layer(x, *rope[spec.sliding], decoder_rows, attend)
        if kinds == "encode":
            return None
        return x if kinds == "canvas" else x[batch.canvas_mask]

    def denoise_step(self, ids: torch.Tensor, positions: torch.Tensor, soft_embeds: torch.Tensor, attend: Attend,
                     decoder: torch.Tensor | None = None):
        """A forward of whole canvases as a pure tensor function (runtime/canvas_step.py plans its inputs): ids and
        positions [n], self-conditioning input [n, H] (zeros on a first step: the same bits as no input, since
        MLP(pre_norm(0)) == 0), ``attend`` the step's static attention -> last hidden states [n, H]. ``decoder``
        [n, 1] bool: which tokens are canvas tokens in a round that also encodes (the others take no
        self-conditioning and the encoder's layer scalars; ``attend`` writes their KV); None: all are.

        NOTE: no host sync, no data-dependent shape, no Python branch on data, and no sglang context built inside,
        so it compiles with fullgraph=True and captures in a CUDA graph. The caller enters
        ``parallel.sglang_runtime()`` around it.
        """
        x = self.embed(ids)
        conditioned = self.self_conditioning(x, soft_embeds)
        x = conditioned if decoder is None else torch.where(decoder, conditioned, x)
        rope = self._rope(positions, x.dtype)
        for layer, spec in zip(self.layers, self.cfg.layers):
            x = layer(x, *rope[spec.sliding], True if decoder is None else decoder, attend)
        return x

    def _rope(self, positions: torch.Tensor, dtype) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin per layer kind (sliding or not) at ``positions``."""
        if next(iter(self.inv_freq.values())).device != positions.device:
            # NOTE: a dict does not follow model.to(device): moved once, before any graph capture (a host-to-device
            # copy inside a CUDA graph capture is an error)
            self.inv_freq = {sliding: inv.to(positions.device) for sliding, inv in self.inv_freq.items()}
        return {sliding: rope_cos_sin(inv, positions, dtype) for sliding, inv in self.inv_freq.items()}

    @in_sglang_runtime
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, tied LM head, fp32 softcap: [n, H] -> [n, V] float32, the whole vocab on every rank
        (each rank's vocab slice, all-gathered: every rank samples every canvas)."""
        cap = self.cfg.final_logit_softcapping
        weight = self.embed_tokens.weight  # this rank's vocab rows, padded: [V_padded / tp, H]
        if self.embed_tokens.tp_size == 1:
            weight = weight[: self.cfg.vocab_size]  # no GEMM columns for the padding rows: the unpadded GEMM's bits
        logits = self.norm(hidden) @ weight.T
        logits = (all_gather(logits) if self.tp_size > 1 else logits)[..., : self.cfg.vocab_size].float()
        return torch.tanh(logits / cap) * cap

    def _image_token_mask(self, batch: CanvasBatch) -> torch.Tensor:
        # NOTE: only image runs of prefill segments: random canvas noise can hold the image token id too.
        mask = torch.zeros(batch.num_tokens, dtype=torch.bool, device=batch.input_ids.device)
        for seg in batch.segments:
            for begin, end in seg.image_runs:
                mask[seg.offset + begin : seg.offset + end] = True
        return mask

    def pad_input_ids(self, input_ids, mm_inputs):
        """sglang's radix key for image prompts: image tokens become per-image hash values, so equal
        images share cached KV and different ones never do. The engine restores the ids to embed."""
        from sglang.srt.managers.mm_utils import pad_mm_tokens

        return pad_mm_tokens(input_ids, mm_inputs)

    def get_attention_sliding_window_size(self) -> int:
        """sglang sizes its sliding-window KV pool from this (exclusive window, like its in-tree Gemma 4)."""
        return self.cfg.sliding_window - 1

    # ---- loading ------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """A whole checkpoint (startup, /update_weights_from_disk), or some tensors when ``accepts_partial_weights``
        is set (sglang's tensor and distributed updates: srt_patches/model_runner.py sets it around them)."""
        load_checkpoint_weights(self, weights, self.fp8_block_size, whole=not self.accepts_partial_weights)

    def get_weights_by_name(self, name: str, truncate_size: int = 100, tp_size: int = 1) -> list:
        """sglang's /get_weights_by_name (RL trainers check a weight sync with it): checkpoint tensor ``name`` as
        this rank holds it (``tp_size`` is not needed: the loaders say which part), its first ``truncate_size``
        rows, in float32."""
        return checkpoint_tensor(self, name)[:truncate_size].float().tolist()


def _refuse_quantization_without_kernels(quant_config) -> None:
    """A CPU server runs sglang's fp8 linear method only on sglang's AMX CPU engine (SGLANG_USE_CPU_ENGINE=1 on a
    CPU with AMX: ``fp8_scaled_mm_cpu``); elsewhere on a CPU the weights load and quantize, and the first request
    fails in a Triton kernel ("0 active drivers"). Refuse at startup instead. Outside a server (no device in sglang's
    server args) nothing is refused: tests run the layers with a dequantizing stand-in."""
    from sglang.srt.runtime_context import get_server_args
    from sglang.srt.utils import cpu_has_amx_support, is_cpu

    if quant_config is None or get_server_args().device != "cpu" or (is_cpu() and cpu_has_amx_support()):
        return
    raise ValueError(
        f"{quant_config.get_name()} weights (--quantization, or the checkpoint's quantization_config) on the CPU need "
        "sglang's AMX kernels (SGLANG_USE_CPU_ENGINE=1 on a CPU with AMX); this CPU has none, so sglang's fp8 GEMMs "
        "cannot run here: serve a bf16 checkpoint without --quantization"
    )


def _causal_images(batch: CanvasBatch) -> CanvasBatch:
    """``batch`` without image runs, for a checkpoint whose use_bidirectional_attention is unset: transformers
    then encodes image tokens causally like text. Segments are copied; the caller's batch is untouched."""
    if not any(seg.image_runs for seg in batch.segments):
        return batch
    segments = [dataclasses.replace(seg, image_runs=()) for seg in batch.segments]
    return CanvasBatch(segments, batch.input_ids, batch.canvas_soft_embeds, batch.image_embeds)


EntryClass = DiffusionGemmaForBlockDiffusion
