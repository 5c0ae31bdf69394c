"""A single-process engine on plain tensors: the scheduler policy without sglang.

Used by the parity tests and ``bench/`` to run whole generations against transformers' ``generate``.
"""

from __future__ import annotations

import torch

from sgl_diffusion.attention.kv import TorchKVStore
from sgl_diffusion.attention.sdpa import SdpaBackend
from sgl_diffusion.runtime.canvas_step import CanvasStep, StepMode
from sgl_diffusion.runtime.runner import DiffusionRunner
from sgl_diffusion.runtime.scheduler_policy import CanvasScheduler, DiffusionRequest, KVSlots, Reservation, eos_sink
from sgl_diffusion.sampling.params import DiffusionParams


class FreeListSlots(KVSlots):
    """Slots from a free list; no prefix cache."""

    def __init__(self, num_slots: int, device):
        # NOTE: slots 1..num_slots; slot 0 is the padding slot, as in sglang's pools (graphed rounds write padding
        # tokens' KV there)
        self.free_slots = torch.arange(1, num_slots + 1, device=device)
        self.empty = torch.empty(0, dtype=torch.long, device=device)

    def reserve(self, req, tokens, limit=None):
        n = len(tokens) if limit is None else min(len(tokens), limit)
        if n > self.free_slots.numel():
            return None
        slots, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        return Reservation(self.empty, slots)

    def room(self):
        return self.free_slots.numel()

    def release(self, req, cache=True):
        self.free_slots = torch.cat([self.free_slots, req.slots])


class OfflineEngine:
    def __init__(self, model, eos_token_ids=(), num_slots: int = 4096, steps_per_round: int = 1,
                 mixed_rounds: bool = True, canvas_step: StepMode | None = None, rng: str = "exact",
                 prefill_chunk: int | None = None):
        """``canvas_step``: run canvas-only rounds through the static step in this mode (runtime/canvas_step.py);
        None: every round through the model's mixed forward. ``rng``: the sampler's (env.SamplerEnv)."""
        cfg = model.cfg
        device = model.embed_tokens.weight.device
        dtype = model.embed_tokens.weight.dtype
        kv = TorchKVStore(num_slots + 1, [(s.num_kv_heads, s.head_dim) for s in cfg.layers], dtype, device)
        self.slots = FreeListSlots(num_slots, device)
        self.num_slots = num_slots
        step = None if canvas_step is None else CanvasStep(model, kv, canvas_step, judge=rng == "exact")
        runner = DiffusionRunner(model, SdpaBackend(kv, cfg.sliding_window), step, rng)
        self.scheduler = CanvasScheduler(runner, self.slots, eos_sink(eos_token_ids), device, steps_per_round,
                                         mixed_rounds, prefill_chunk)

    def generate(self, requests: list[DiffusionRequest]) -> list[list[int]]:
        for req in requests:
            self.scheduler.add(req)
        while self.scheduler.running:
            if self.scheduler.step().exhausted:
                raise MemoryError(f"a request needs more KV than the engine's {self.num_slots} slots")
        return [req.output_ids for req in requests]
