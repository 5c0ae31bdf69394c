"""Checkpoint name map: HF ``DiffusionGemmaForBlockDiffusion.save_pretrained`` keys -> our module tree.

The encoder and decoder share every text weight; the checkpoint stores them once under
``model.decoder.*``. Only the encoder's ``layer_scalar`` buffers are separate.

Parameters of sglang's parallel layers load through their own ``weight_loader`` (sglang's convention: it takes
this rank's shard; fused projections take a shard id). Before it, each checkpoint tensor is checked against the
full, unsharded shape the model declared for it (``expect``) and, along a padded intermediate dim, zero-padded to
it: sglang's CPU path pads intermediate sizes (``adjust_config_with_unaligned_cpu_tp``: up to a multiple of
32 x TP), and zero gate/up rows and zero down columns make a gated MLP compute exactly what the unpadded one
does (gelu(0) * 0 = 0). Padding here, not in sglang's loaders, gives the same result on every device.

FP8 checkpoints (sglang's format: float8_e4m3fn weights, each with a ``weight_scale_inv`` [rows / bn, cols / bk]
of block scales or a per-tensor ``weight_scale``): the projections built with sglang's fp8 method load weight and
scales through their own loaders, and so do fp8 routed experts (``layers.Experts``: their scales are named
``gate_up_proj_scale_inv`` / ``gate_up_proj_scale``; the loaders below slice them). An fp8 tensor whose parameter
is not fp8 (the experts of a model built without an fp8 quant_config, and anything the model keeps in full
precision) is dequantized here, once its scale has arrived too: weight.float() * scale, expanded over its blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

_ENCODER_SCALAR = re.compile(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")
# checkpoint projections that load into a part of one fused projection of ours (the vision tower is transformers')
_STACKED = re.compile(r"^(?!vision_tower\.|embed_vision\.)(.+)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\."
                      r"(weight|weight_scale|weight_scale_inv|input_scale)$")
# fp8 routed experts' scales (layers.Experts): block scales (_scale_inv) or one per expert (_scale)
_EXPERT_SCALE = re.compile(r"\.experts\.(gate_up|down)_proj_scale(_inv)?$")
# a quantized projection's scale parameters, beside its weight (sglang's fp8 names)
SCALES = ("weight_scale", "weight_scale_inv", "input_scale")
# checkpoint projection -> (our fused projection, sglang's shard id for its weight_loader)
STACKED_INTO = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}  # fmt: skip
_PREFIXES = (
    ("model.decoder.", ""),
    ("model.encoder.vision_tower.", "vision_tower."),
    ("model.encoder.embed_vision.", "embed_vision."),
)


def checkpoint_name_to_param(name: str) -> str | None:
    """Our parameter name for a checkpoint key, or None for keys that are tied duplicates."""
    if m := _ENCODER_SCALAR.match(name):
        return f"layers.{m.group(1)}.encoder_layer_scalar"
    for src, dst in _PREFIXES:
        if name.startswith(src):
            return dst + name[len(src) :]
    if name == "lm_head.weight" or name.startswith("model.encoder.language_model."):
        return None  # tied to model.decoder.*
    raise KeyError(f"unexpected DiffusionGemma checkpoint key: {name}")


def fused_part(param_name: str) -> tuple[str, str | int | None]:
    """(our parameter, sglang's shard id) for a checkpoint projection that loads into part of a fused one; else
    (``param_name``, None)."""
    if m := _STACKED.match(param_name):
        fused, shard = STACKED_INTO[m[2]]
        return f"{m[1]}.{fused}.{m[3]}", shard
    return param_name, None


def load_checkpoint_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                            block_size: list[int] | None = None, whole: bool = True) -> None:
    """``block_size``: the checkpoint's fp8 [bn, bk] (quantization_config's weight_block_size), for the tensors
    dequantized here; None: per-tensor scales. ``whole``: ``weights`` must cover every parameter (a checkpoint); else
    they update some of them (a trainer's bucket)."""
    params = dict(model.named_parameters())
    targets = params | dict(model.named_buffers())
    loaded, pending = set(), _Dequantizer(targets, block_size)
    for name, tensor in weights:
        param_name = checkpoint_name_to_param(name)
        if param_name is None:
            continue
        param_name, shard = fused_part(param_name)
        target = targets.get(param_name)
        if target is None or (tensor.dtype == FP8 and target.dtype != FP8):
            param_name, tensor = pending.add(param_name, shard, tensor)
            if tensor is None:  # its weight or its scale is still to come
                continue
            target = targets[param_name]
        try:
            with torch.no_grad():
                load_one(target, tensor, shard, is_scale=_is_scale(param_name))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        loaded.add((param_name, shard))
    pending.check_done()
    if not whole:
        return
    expected = set()
    for n, p in params.items():
        if getattr(p, "computed_at_load", False):  # online fp8 experts' scales: their weights' loaders set them
            continue
        module, _, leaf = n.rpartition(".")
        owner = params[f"{module}.weight"] if leaf in SCALES else p  # a scale has one part per part of its weight
        expected |= {(n, shard) for shard in getattr(owner, "checkpoint_shapes", (None,))}
    missing = sorted(f"{n}[{shard}]" if shard is not None else n for n, shard in expected - loaded)
    if missing:
        raise ValueError(f"DiffusionGemma checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")


FP8 = torch.float8_e4m3fn


def checkpoint_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The part of checkpoint tensor ``name`` that this rank's loaded ``model`` holds (its TP or EP slice, padding
    left out), read back through the same loaders that put it there: ones are loaded in its place (zero-padded, as at
    load), and the indices they reach along each dim are cut out of the parameter's own values, then put back.
    Tied keys (``lm_head.weight``, the encoder's copies) read the weight they are tied to; KeyError for a name the
    model does not hold."""
    tied = "model.decoder.embed_tokens.weight" if name == "lm_head.weight" else name
    if not _ENCODER_SCALAR.match(name):
        tied = tied.replace("model.encoder.language_model.", "model.decoder.", 1)
    param_name, shard = fused_part(checkpoint_name_to_param(tied))
    target = (dict(model.named_parameters()) | dict(model.named_buffers())).get(param_name)
    if target is None or _is_scale(param_name):
        raise KeyError(f"{name}: not a weight this model exports")
    if getattr(target, "checkpoint_shapes", None) is None:  # unsharded: the checkpoint tensor is the whole of it
        return target.detach().clone()
    if shard not in getattr(target, "loaded_shapes", {}):  # e.g. our fused name, or a part the checkpoint lacks
        raise KeyError(f"{name}: not a weight this model exports")
    with torch.no_grad():
        raw = target.data.view(torch.uint8) if target.element_size() == 1 else target.data  # fp8: compare bytes
        kept = target.detach().clone()
        raw.zero_()
        load_one(target, torch.ones(target.loaded_shapes[shard], dtype=torch.float32).to(target.dtype), shard)
        reached = raw != 0
        target.copy_(kept)
    for dim in range(kept.dim()):
        keep = reached.movedim(dim, 0).flatten(1).any(1).nonzero().squeeze(1)
        kept = kept.index_select(dim, keep)
    return kept


def _is_scale(param_name: str) -> bool:
    """A quantized projection's scale, or an fp8 expert tensor's (``experts.gate_up_proj_scale_inv``)."""
    return param_name.rsplit(".", 1)[-1] in SCALES or _EXPERT_SCALE.search(param_name) is not None


class _Dequantizer:
    """Pairs fp8 tensors meant for full-precision parameters with their scales (in either order) and dequantizes."""

    def __init__(self, targets: dict[str, torch.Tensor], block_size: list[int] | None):
        self.targets, self.block_size = targets, block_size
        self.weights, self.scales = {}, {}  # (param name, shard) -> fp8 tensor / its scale

    def add(self, param_name: str, shard, tensor: torch.Tensor) -> tuple[str, torch.Tensor | None]:
        """(the parameter to load, its dequantized tensor), or (name, None) while its pair is incomplete."""
        if tensor.dtype == FP8:
            self.weights[(param_name, shard)] = tensor
            key = (param_name, shard)
        else:
            key = self._scaled(param_name, shard)
            if key is None:  # an activation scale: nothing to do for a weight kept in full precision
                return param_name, None
            self.scales[key] = tensor
        if key in self.weights and key in self.scales:
            return key[0], dequantize(self.weights.pop(key), self.scales.pop(key), self.block_size)
        return param_name, None

    def _scaled(self, scale_name: str, shard):
        """(weight name, shard) a full-precision parameter's scale belongs to; None for an activation scale."""
        if scale_name.endswith(".input_scale"):
            return None
        for suffix in ("_scale_inv", "_scale"):
            if scale_name.endswith(suffix) and scale_name.removesuffix(suffix) in self.targets:
                return scale_name.removesuffix(suffix), shard
        raise KeyError(f"checkpoint tensor for no model parameter: {scale_name}")

    def check_done(self) -> None:
        if self.weights or self.scales:
            unpaired = sorted(self.weights | self.scales)[:5]
            raise ValueError(f"fp8 checkpoint tensors without their scale or weight: {unpaired}")


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block_size: list[int] | None) -> torch.Tensor:
    """weight.float() * scale [fp32]: ``scale`` per tensor ([] or [1]), per leading index ([E]: per expert), or per
    [bn, bk] block of the last two dims ([..., ceil(rows / bn), ceil(cols / bk)])."""
    w, s = weight.float(), scale.float()
    s = s.reshape(s.shape + (1,) * (w.dim() - s.dim()))
    for dim, block in zip((-2, -1), block_size or (None, None)):
        if s.shape[dim] not in (1, w.shape[dim]):
            size = block or -(-w.shape[dim] // s.shape[dim])
            s = s.repeat_interleave(size, dim).narrow(dim, 0, w.shape[dim])
    return w * s


def load_one(param: torch.Tensor, loaded: torch.Tensor, shard: str | int | None, is_scale: bool = False) -> None:
    """Check ``loaded`` against the shape ``param`` expects for ``shard``, then hand it to the param's loader."""
    if is_scale:  # a quantized projection's scale: sglang's loader takes this rank's scales for the shard
        return param.weight_loader(param, loaded) if shard is None else param.weight_loader(param, loaded, shard)
    shapes = getattr(param, "checkpoint_shapes", None)
    if shapes is None:  # a plain parameter or buffer: the checkpoint tensor is the whole of it
        if shard is not None:
            raise ValueError(f"model parameter {tuple(param.shape)} is not a fused projection")
        return copy_exact(param, loaded)
    if shard not in shapes:
        raise ValueError(f"the model's projection has no {shard!r} part")
    full = fit(loaded, shapes[shard], param.pad_dim, param.pad_parts)
    param.loaded_shapes = getattr(param, "loaded_shapes", {}) | {shard: tuple(loaded.shape)}  # for checkpoint_tensor
    param.weight_loader(param, full) if shard is None else param.weight_loader(param, full, shard)


def expect(param: nn.Parameter, shapes: dict, pad_dim: int | None = None, parts: int = 1) -> nn.Parameter:
    """Declare the unsharded checkpoint shape of each part of ``param`` (``{None: shape}`` for an unfused one;
    sglang's shard ids for a fused projection). Along ``pad_dim`` a checkpoint tensor may be shorter (the model's
    intermediate size is padded); ``parts`` > 1: that dim holds that many fused pieces (gate rows, then up rows),
    each padded on its own."""
    param.checkpoint_shapes, param.pad_dim, param.pad_parts = shapes, pad_dim, parts
    return param


def fit(loaded: torch.Tensor, shape: tuple[int, ...], pad_dim: int | None, parts: int = 1) -> torch.Tensor:
    """``loaded``, zero-padded along ``pad_dim`` to ``shape`` (each of its ``parts`` on its own); ValueError when
    it does not fit."""
    bad = f"checkpoint shape {tuple(loaded.shape)} does not fit model {tuple(shape)}"
    if loaded.dim() != len(shape) or any(w != s for d, (w, s) in enumerate(zip(loaded.shape, shape)) if d != pad_dim):
        raise ValueError(bad)
    if pad_dim is None or loaded.shape[pad_dim] == shape[pad_dim]:
        return loaded
    if shape[pad_dim] % parts or loaded.shape[pad_dim] % parts or loaded.shape[pad_dim] > shape[pad_dim]:
        raise ValueError(f"{bad} ({parts} fused parts along dim {pad_dim})")
    full = loaded.new_zeros(shape)
    for dst, src in zip(full.chunk(parts, pad_dim), loaded.chunk(parts, pad_dim)):
        dst.narrow(pad_dim, 0, src.shape[pad_dim]).copy_(src)
    return full


def copy_exact(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != model {tuple(param.shape)}")
    param.copy_(loaded)


def load_rank_slice(param: torch.Tensor, loaded: torch.Tensor, dim: int, parts: int, rank: int, size: int) -> None:
    """Copy this rank's slice of the full ``loaded`` into ``param`` [..., parts * n / size, ...] along ``dim``:
    of each of the ``parts`` fused pieces, the rank's contiguous ``1/size``."""
    for dst, src in zip(param.chunk(parts, dim), loaded.chunk(parts, dim)):
        n = dst.shape[dim]
        dst.copy_(src.narrow(dim, rank * n, n))


def load_experts_slice(param: torch.Tensor, loaded: torch.Tensor, first: int, dim: int, parts: int, rank: int,
                       size: int) -> None:
    """Routed experts: of the full ``loaded`` [E, ...], this expert-parallel rank's ``param.shape[0]`` experts from
    ``first`` on, each sliced along ``dim`` as ``load_rank_slice`` slices (``rank`` of ``size`` MoE-TP ranks)."""
    load_rank_slice(param, loaded.narrow(0, first, param.shape[0]), dim, parts, rank, size)


def load_experts_fp8(param: torch.Tensor, loaded: torch.Tensor, slicer, scale: torch.Tensor, first: int,
                     online: bool) -> None:
    """fp8 routed experts: an fp8 checkpoint tensor is sliced as it is (``slicer``: the ``load_experts_slice`` of
    this parameter; its scale loads on its own). Online (``--quantization fp8`` on a bf16 / fp32 checkpoint), each
    of this rank's experts is quantized as sglang's online fp8 quantizes a tensor (``input_to_float8``: scale =
    amax / e4m3 max, over the whole expert, so every MoE-TP rank holds the same scale) into ``scale`` [E_local]."""
    if loaded.dtype == FP8:
        if online:
            raise ValueError("fp8 expert tensor in a checkpoint without an fp8 quantization_config")
        return slicer(param, loaded)
    if not online:
        raise ValueError(f"the fp8 checkpoint's expert tensor is {loaded.dtype}, not float8_e4m3fn: quantize it, or "
                         "name the layer's experts in the quantization_config's ignored_layers")
    from sglang.srt.layers.quantization.fp8_utils import input_to_float8

    mine = loaded.narrow(0, first, param.shape[0])
    quantized = torch.empty(mine.shape, dtype=FP8, device=mine.device)
    for e in range(mine.shape[0]):
        quantized[e], scale[e] = input_to_float8(mine[e], FP8)
    slicer(param, quantized, first=0)  # this rank's experts already


def load_experts_block_scale(param: torch.Tensor, loaded: torch.Tensor, num_experts: int, slicer) -> None:
    """Block scales [E, rows / bn, cols / bk] of fp8 experts, sliced as their weight is (``slicer``), in blocks."""
    sizes = [num_experts, *param.shape[1:]]
    for dim in (1, 2):
        if slicer.keywords["dim"] == dim:
            sizes[dim] *= slicer.keywords["size"]
    if tuple(loaded.shape) != tuple(sizes):
        raise ValueError(f"fp8 expert block scales {tuple(loaded.shape)} do not fit the model's {tuple(sizes)} "
                         "(weight_block_size, or the experts' sizes, differ from the checkpoint's)")
    slicer(param, loaded.float())


def load_experts_tensor_scale(param: torch.Tensor, loaded: torch.Tensor, num_experts: int, first: int) -> None:
    """Per-tensor scale of fp8 experts: one for all of them ([] or [1]) or one per expert ([E]) -> this rank's."""
    flat = loaded.float().reshape(-1)
    if flat.numel() == 1:
        flat = flat.expand(num_experts)
    if flat.numel() != num_experts:
        raise ValueError(f"fp8 expert scale {tuple(loaded.shape)}: want one scale, or one per expert ({num_experts})")
    param.copy_(flat.narrow(0, first, param.shape[0]))
