"""The grammar-constrained commit of a canvas: one left-to-right pass over the committed step's logits.

A canvas is denoised in parallel, so a grammar cannot mask "the next token" while it is drawn. It acts when the
canvas is committed instead: position by position, left to right, the pass takes the best token (the highest
logit) that the grammar matcher allows after everything committed before it, accepts it into the matcher, and
stops where the matcher terminates (it has accepted a stop token). Every committed token is thus one the
matcher accepted: the output is always a valid prefix, and a complete document once the matcher terminates.

The best allowed token is found cheaply: one top-k of the logits for all positions (one device sync), then on the
host the first candidate whose bit is set in the matcher's bitmask; only a position where no candidate is allowed
costs a masked argmax over the whole vocabulary on the device (a second sync). Both give the masked argmax.

Pure tensor code plus the matcher, duck-typed as sglang's ``BaseGrammarObject`` (``allocate_vocab_mask``,
``fill_vocab_mask``, ``accept_token``, ``is_terminated``) with xgrammar's packed int32 bitmask; nothing here
imports sglang.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

DEFAULT_CANDIDATES = 8  # top-k logits tried against the bitmask before the full masked argmax


class GrammarCommit(NamedTuple):
    tokens: list[int]  # committed tokens from position `start` on, each accepted into the matcher
    changed: int | None  # first position whose token differs from the argmax (None: the grammar changed none)
    terminated: bool  # the matcher accepted a stop token (the last of `tokens`): the document is complete
    fallbacks: int  # positions that needed the full masked argmax (no top-k candidate was allowed)


class GrammarDeadEnd(RuntimeError):
    """The matcher allows no token at all (it is neither terminated nor able to continue)."""


def grammar_commit(
    logits: torch.Tensor,
    argmax: Sequence[int],
    grammar,
    start: int = 0,
    stop: int | None = None,
    *,
    candidates: int = DEFAULT_CANDIDATES,
    stop_at_change: bool = False,
) -> GrammarCommit:
    """Commit positions [start, stop) of a canvas under ``grammar``, which is advanced (tokens accepted).

    ``logits`` [C, V] fp32 of the committed step (any temperature: only their order is used); ``argmax`` [C]
    the sampler's committed argmax (to report ``changed``). Stops early after a terminating token, or, with
    ``stop_at_change``, right after the first token the grammar changed (the caller may re-denoise the rest).
    """
    stop = logits.shape[0] if stop is None else stop
    vocab = logits.shape[-1]
    if stop <= start:
        return GrammarCommit([], None, False, 0)
    mask = grammar.allocate_vocab_mask(vocab, 1, "cpu")  # [1, ceil(V / 32)] int32 bitmask, bit set = allowed
    if mask.dtype != torch.int32:
        raise TypeError(f"constrained canvases need a packed int32 bitmask (xgrammar); got {mask.dtype}")
    words = mask.numpy()[0]  # a view: fill_vocab_mask writes through it
    top = logits[start:stop].topk(min(candidates, vocab), dim=-1).indices.tolist()  # one sync for the canvas

    tokens, changed, fallbacks = [], None, 0
    for j, pos in enumerate(range(start, stop)):
        grammar.fill_vocab_mask(mask, 0)
        token = next((t for t in top[j] if (int(words[t >> 5]) >> (t & 31)) & 1), None)
        if token is None:
            fallbacks += 1
            token = _masked_argmax(logits[pos], mask[0])
        grammar.accept_token(token)
        tokens.append(token)
        if changed is None and token != argmax[pos]:
            changed = pos
        if grammar.is_terminated():
            return GrammarCommit(tokens, changed, True, fallbacks)
        if stop_at_change and changed is not None:
            break
    return GrammarCommit(tokens, changed, False, fallbacks)


def allowed_tokens(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """Unpack a [ceil(V / 32)] int32 bitmask into [V] bool (True = allowed), on ``words``' device."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    # NOTE: >> on int32 is arithmetic (a negative word shifts in ones); & 1 keeps only the bit asked for
    return ((words[:, None] >> shifts) & 1).flatten()[:vocab].bool()


def _masked_argmax(row: torch.Tensor, words: torch.Tensor) -> int:
    allowed = allowed_tokens(words.to(row.device), row.shape[-1])
    if not bool(allowed.any()):
        raise GrammarDeadEnd("the grammar allows no token here")
    return int(row.masked_fill(~allowed, float("-inf")).argmax())
