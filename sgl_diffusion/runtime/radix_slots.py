"""KV slots from sglang's pools with its radix tree: prompts reuse cached prefixes, and a request's
committed context (prompt + committed canvases: ordinary causal KV) is inserted as soon as it is
encoded, so concurrent requests and the next turn of a conversation reuse it. A finished request's
last canvas is inserted when it is released, right after the forward that encoded it.

Each request owns one req_to_token row; the row holds the matched prefix (locked in the tree) and
the slots of every encode segment, so sglang's release/eviction/leak checks apply unchanged.
"""

from __future__ import annotations

import torch
from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX
from sglang.srt.mem_cache.common import checkpoint_kv_cache, evict_from_tree_cache, release_kv_cache
from sglang.srt.runtime_context import get_serving

from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest, KVSlots, Reservation


class RadixKVSlots(KVSlots):
    def __init__(self, tree_cache, req_to_token_pool, device):
        self.tree = tree_cache
        self.rows = req_to_token_pool
        self.allocator = tree_cache.token_to_kv_pool_allocator
        self.empty = torch.empty(0, dtype=torch.long, device=device)

    def reserve(self, dreq: DiffusionRequest, tokens: list[int], limit: int | None = None) -> Reservation | None:
        req = dreq.handle
        if req.kv.holds_kv:
            n = len(tokens) if limit is None else min(len(tokens), limit)
            return self._extend(req, n, slide_window=not dreq.finished)
        if self.rows.available_size() < 1:
            return None
        match_whole(req, self.tree)  # req.prefix_len, req.last_node
        reused = self.tree.prefix_device_indices(req).long() if req.prefix_len else self.empty
        # NOTE: pins the matched prefix until release; before allocating, whose eviction could otherwise take it
        lock = self.tree.lock(req.last_node)
        n = len(tokens) - req.prefix_len
        new = self._alloc(n if limit is None else min(n, limit))
        if new is None:
            self.tree.unlock(lock)
            return None
        req.lock = lock
        self.rows.alloc([req])
        end = req.prefix_len + new.numel()
        self.rows.write((req.kv.req_pool_idx, slice(0, end)), torch.cat([reused, new]).to(torch.int32))
        req.kv.kv_allocated_len = req.kv.kv_committed_len = end
        if not req.retracted_stain:  # a retracted request's re-encode reuses its own context, not a cached prompt
            req.cached_tokens += req.prefix_len
        req.already_computed = end
        return Reservation(reused, new)

    def encoded(self, dreq: DiffusionRequest) -> None:
        """Insert what the request has encoded so far (its prompt, then each committed canvas).

        NOTE: done right after the encode, while its sliding-window KV is still there: the tree can
        only hand a prefix out again if the window before its end is intact.
        """
        req = dreq.handle
        if req.finished():
            return
        if req.reasoning_tokens and get_serving().strip_thinking_cache:
            # --strip-thinking-cache: a reasoning answer stays the request's own, and sglang's release frees it past
            # the prompt (Req.owned_kv_len); in the tree, release would free those slots under the tree's feet
            return
        req.refresh_fill_ids()
        req.extend_end = req.kv.kv_committed_len
        branched = req.swa_branching_seqlen is not None
        checkpoint_kv_cache(req, self.tree)
        if branched and req.kv.cache_protected_len < req.kv.kv_committed_len:
            # NOTE: after a matched prefix sglang's SWA cache inserts only up to the branch point first. The rest
            # goes in now, while its window is live: left to the request, its sliding KV would be freed as the
            # canvases move on, and a repeat of this prompt would match only the shared prefix.
            checkpoint_kv_cache(req, self.tree)
        # NOTE: when the tree already held these tokens it points the row at its own slots and frees ours
        dreq.slots = self.rows.req_to_token[req.kv.req_pool_idx, : req.kv.kv_committed_len].long()

    def room(self) -> int:
        allocator, tree = self.allocator, self.tree
        if hasattr(allocator, "full_available_size"):
            # NOTE: the full layers' pool: the sliding layers' holds a request's prompt only until its next commit
            # gives back what lies outside the window (_extend), so it never stays short for long
            return allocator.full_available_size() + tree.full_evictable_size()
        return allocator.available_size() + tree.evictable_size()

    @property
    def caches_prefixes(self) -> bool:
        return self.tree.supports_prefix_sharing()  # False with --disable-radix-cache

    def release(self, dreq: DiffusionRequest, cache: bool = True) -> None:
        req = dreq.handle
        if req.kv.holds_kv:
            release_kv_cache(req, self.tree, checkpoint=cache)
        elif req.lock is not None:
            self.tree.unlock(req.lock)
            req.lock = None

    def forget(self, dreq: DiffusionRequest, cache: bool = False) -> None:
        self.release(dreq, cache)
        dreq.handle.reset_for_retract()  # sglang's own reset: the next reservation matches the tree again
        dreq.handle.is_retracted = False  # NOTE: that flag steers sglang's batch paths, which never see this Req

    def _extend(self, req, n: int, slide_window: bool) -> Reservation | None:
        start = req.kv.kv_committed_len
        if slide_window:
            # the canvas reads only the last window of sliding layers: give the rest of the SWA side back, before
            # allocating, so that a request whose context outgrew the window can make room for its own commit
            # NOTE: not for a finished request's last commit: it is released right after, and freeing would
            # also drop the window at the end of its prompt, which a repeated prompt needs to match
            self.tree.evict_sliding_windows(req, start)
        new = self._alloc(n)
        if new is None:
            return None
        self.rows.write((req.kv.req_pool_idx, slice(start, start + n)), new.to(torch.int32))
        req.kv.kv_allocated_len = req.kv.kv_committed_len = start + n
        return Reservation(self.empty, new)

    def _alloc(self, n: int) -> torch.Tensor | None:
        evict_from_tree_cache(self.tree, n)
        return self.allocator.alloc(n)


def match_whole(req, tree) -> None:
    """sglang's prefix match (``Req.init_next_round_input``) of the request's tokens in ``tree``, up to all of them.

    NOTE: sglang's ``Req._compute_max_prefix_len`` stops a match one token short of the input, whose logits a token
    step needs. A canvas reads only its context's KV, so a prompt the tree holds whole (a repeated prompt, parallel
    samples, a retracted request's context) is not encoded again: its first round runs the canvas alone, and a
    prefill-only request runs no forward. sglang's other caps (prompt logprobs from logprob_start_len) still apply.
    A /health_generate probe keeps sglang's match: its one-token prompt, cached after the first probe, must still
    run a forward, or the probe would answer without the model.
    """
    if str(req.rid).startswith(HEALTH_CHECK_RID_PREFIX):
        req.init_next_round_input(tree)
        return
    sglang_cap = type(req)._compute_max_prefix_len
    req._compute_max_prefix_len = lambda input_len: sglang_cap(req, input_len + 1)  # written against sglang 0.5.23
    try:
        req.init_next_round_input(tree)
    finally:
        del req._compute_max_prefix_len
