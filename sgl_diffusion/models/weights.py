"""Checkpoint name map: HF ``DiffusionGemmaForBlockDiffusion.save_pretrained`` keys -> our module tree.

The encoder and decoder share every text weight; the checkpoint stores them once under
``model.decoder.*``. Only the encoder's ``layer_scalar`` buffers are separate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

_ENCODER_SCALAR = re.compile(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")
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
        target = targets[param_name]
        if target.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        loaded.add(param_name)
    missing = {n for n, _ in model.named_parameters()} - loaded
    if missing:
        raise ValueError(f"DiffusionGemma checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:5]}")
