"""Log-probabilities of chosen tokens and the top-k alternatives, from one step's logits at temperature 1.

Committed tokens take them from the step whose argmax was committed (the canvas's last denoise step); scored
prompt tokens from a one-step canvas (runtime/constraints.py says which). Temperature 1 is the model's own
distribution: the sampling schedule's temperatures change neither the argmax nor these numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenLogprobs(NamedTuple):
    token: list[float]  # [n] log p of each chosen token
    top_values: list[list[float]]  # [n][k] the k largest log p, descending ([] per row when k = 0)
    top_ids: list[list[int]]  # [n][k] their token ids


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_k: int) -> TokenLogprobs:
    """``logits`` [n, V] (softcapped, temperature 1), ``tokens`` [n] int64 on the same device; one sync."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp.clamp_(min=torch.finfo(logp.dtype).min)  # as sglang: -inf (a masked or underflowed token) stays finite
    chosen = logp.gather(-1, tokens[:, None].to(logp.device))[:, 0]
    if top_k <= 0:
        return TokenLogprobs(chosen.tolist(), [[] for _ in range(logits.shape[0])], [[] for _ in range(logits.shape[0])])
    top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    return TokenLogprobs(chosen.tolist(), top.values.tolist(), top.indices.tolist())
