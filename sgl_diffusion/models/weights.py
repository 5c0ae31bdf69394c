"""Checkpoint name map: HF ``DiffusionGemmaForBlockDiffusion.save_pretrained`` keys -> our module tree.

The encoder and decoder share every text weight; the checkpoint stores them once under
``model.decoder.*``. Only the encoder's ``layer_scalar`` buffers are separate.

A parameter may carry a ``weight_loader(param, loaded)`` attribute (sglang's convention) that copies a checkpoint
tensor of another shape into it; ``pad_intermediate`` gives one to the parameters sglang pads.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import torch
from torch import nn

_ENCODER_SCALAR = re.compile(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")
# checkpoint projections that load into a part of one fused projection of ours (the vision tower is transformers')
_STACKED = re.compile(r"^(?!vision_tower\.|embed_vision\.)(.+)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$")
STACKED_INTO = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                "up_proj": "gate_up_proj"}  # fmt: skip
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


def load_checkpoint_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    loaded = set()
    for name, tensor in weights:
        param_name = checkpoint_name_to_param(name)
        if param_name is None:
            continue
        shard = None
        if m := _STACKED.match(param_name):
            param_name, shard = f"{m[1]}.{STACKED_INTO[m[2]]}.weight", m[2]
        target = targets[param_name]
        try:
            with torch.no_grad():
                if shard is None:
                    getattr(target, "weight_loader", copy_exact)(target, tensor)
                else:
                    target.shard_loader(target, tensor, shard)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        loaded.add((param_name, shard))
    expected = {(n, shard) for n, p in model.named_parameters() for shard in getattr(p, "shards", {None: None})}
    missing = sorted(f"{n}[{shard}]" if shard else n for n, shard in expected - loaded)
    if missing:
        raise ValueError(f"DiffusionGemma checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")


def copy_exact(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != model {tuple(param.shape)}")
    param.copy_(loaded)


def copy_padded(param: torch.Tensor, loaded: torch.Tensor, dim: int, parts: int = 1) -> None:
    """Copy ``loaded`` into ``param``, which may be longer along ``dim``: the rest is zeroed.

    ``parts`` > 1: ``dim`` holds that many fused pieces (gate rows, then up rows), each padded on its own.
    """
    if param.dim() != loaded.dim() or any(p != w for d, (p, w) in enumerate(zip(param.shape, loaded.shape)) if d != dim):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not fit model {tuple(param.shape)}")
    if param.shape[dim] % parts or loaded.shape[dim] % parts or loaded.shape[dim] > param.shape[dim]:
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not fit model {tuple(param.shape)} "
                         f"({parts} fused parts along dim {dim})")
    param.zero_()
    for dst, src in zip(param.chunk(parts, dim), loaded.chunk(parts, dim)):
        dst.narrow(dim, 0, src.shape[dim]).copy_(src)


def pad_intermediate(param: nn.Parameter, dim: int, parts: int = 1) -> nn.Parameter:
    """Let ``param`` load a checkpoint whose intermediate size (along ``dim``) is smaller than the model's.

    sglang pads the config's intermediate sizes on CPU (``adjust_config_with_unaligned_cpu_tp``: up to a multiple
    of 32 x TP) and the model is built from the padded config. Zero gate/up rows and zero down columns make a
    gated MLP compute exactly what the unpadded one does: gelu(0) * 0 = 0.
    """
    param.weight_loader = functools.partial(copy_padded, dim=dim, parts=parts)
    return param


def stack_shards(param: nn.Parameter, rows: dict[str, int], pad_dim: int | None = None) -> nn.Parameter:
    """Let ``param`` load several checkpoint tensors, one after the other along dim 0 (``rows`` each, in order).

    ``pad_dim`` 0: a shard may be shorter than its rows (sglang's padded intermediate sizes; the rest is zeroed);
    otherwise each must fit exactly.
    """
    offsets, start = {}, 0
    for name, n in rows.items():
        offsets[name] = (start, n)
        start += n
    assert start == param.shape[0], (rows, tuple(param.shape))
    param.shards = offsets

    def shard_loader(param: torch.Tensor, loaded: torch.Tensor, shard: str) -> None:
        begin, n = param.shards[shard]
        part = param.narrow(0, begin, n)
        copy_padded(part, loaded, dim=0) if pad_dim == 0 else copy_exact(part, loaded)

    param.shard_loader = shard_loader
    return param
