"""Attention backends by sglang's ``--attention-backend`` names, created lazily (flashinfer and triton are
imported only when their backend is built)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sgl_diffusion.attention.base import AttnLayer, BaseAttnBackend, KVStore

# sglang's name -> what it runs here
BACKENDS = {
    "flashinfer": "FlashInfer 0.7.2 batch prefill (CUDA only)",
    "triton": "sglang's Triton extend kernel (CUDA; on the CPU only under TRITON_INTERPRET=1)",
    "torch_native": "torch SDPA, the reference (any device)",
}


# FlashInfer 0.7.2 compiles its prefill and merge kernels for these query/output dtypes only (no float32)
FLASHINFER_DTYPES = ("float16", "bfloat16")


def choose_attention_backend(requested: str | None, device: str, triton_interpreter: bool = False,
                             dtype: torch.dtype | None = None) -> str:
    """The backend for ``--attention-backend requested`` (None: not given) on ``device``, for a model in ``dtype``
    (None: not known yet).

    Defaults: FlashInfer on CUDA (Triton when flashinfer is not installed or the model is float32), the SDPA
    reference elsewhere. An impossible choice is a ValueError that says what to pass instead.
    """
    flashinfer_dtype = dtype is None or str(dtype).removeprefix("torch.") in FLASHINFER_DTYPES
    if requested is None:
        if device != "cuda":
            return "torch_native"
        installed = importlib.util.find_spec("flashinfer") is not None
        return "flashinfer" if installed and flashinfer_dtype else "triton"
    if requested not in BACKENDS:
        raise ValueError(f"sgl-diffusion serves DiffusionGemma with --attention-backend "
                         f"{', '.join(BACKENDS)}; got {requested!r}")  # fmt: skip
    if requested == "flashinfer" and device != "cuda":
        raise ValueError(f"--attention-backend flashinfer needs CUDA (device is {device}); "
                         f"use torch_native on the CPU")  # fmt: skip
    if requested == "flashinfer" and not flashinfer_dtype:
        raise ValueError(f"--attention-backend flashinfer has no kernels for a {dtype} model (FlashInfer 0.7.2 runs "
                         f"float16 and bfloat16); use --attention-backend triton, or --dtype bfloat16")  # fmt: skip
    if requested == "triton" and device != "cuda" and not triton_interpreter:
        raise ValueError(f"--attention-backend triton on {device} runs only under the Triton interpreter "
                         f"(TRITON_INTERPRET=1: slow, for checking kernels); use torch_native")  # fmt: skip
    return requested


def create_attention_backend(name: str, kv: KVStore, layers: Sequence[AttnLayer], dtype: torch.dtype,
                             device) -> BaseAttnBackend:
    """Backend ``name`` (a key of BACKENDS) over ``kv`` for the model's ``layers`` (``Attention.info``)."""
    if name == "flashinfer":
        from sgl_diffusion.attention.flashinfer import FlashInferBackend

        return FlashInferBackend(kv, layers, dtype, device)
    if name == "triton":
        from sgl_diffusion.attention.triton import TritonBackend

        return TritonBackend(kv, layers)
    if name == "torch_native":
        from sgl_diffusion.attention.sdpa import SdpaBackend

        windows = {layer.sliding_window for layer in layers} - {None}
        assert len(windows) <= 1, f"one sliding window per model, got {windows}"
        return SdpaBackend(kv, windows.pop() if windows else None)
    raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "choose_attention_backend", "create_attention_backend"]
