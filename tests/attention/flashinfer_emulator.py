"""FlashInfer 0.7.2 in plain torch, for the CPU: the wrappers and the merge our FlashInfer backend calls.

It computes attention from exactly the tensors the backend hands to ``plan()`` and ``run()``, with
FlashInfer's documented semantics (read from flashinfer/prefill.py and cascade.py of the 0.7.2 wheel):

- paged KV in NHD layout (3-D buffers read as pages of one token), pages of ``page_size`` tokens: a request's keys are its pages
  ``paged_kv_indices[indptr[r]:indptr[r + 1]]`` in order, the last one holding ``last_page_len`` tokens;
- ``causal``: query i of a request with qo_len queries and kv_len keys sits at kv_len - qo_len + i
  (bottom-right aligned) and keeps keys up to it; ``window_left`` w >= 0 keeps keys at or after that
  position - w (in every mask mode: attention/variants.cuh); ``custom_mask`` (bool, row-major [qo_len, kv_len]
  per request, concatenated) replaces the causal flag;
- ``sm_scale`` defaults to 1/sqrt(head_dim); GQA maps query head h to KV head h // (H / KV);
- ``return_lse``: the log-sum-exp of the scaled logits in base 2 (FlashInfer's ``lse_base="log2"``),
  -inf for a query that sees no key, whose output is 0; ``merge_state_in_place`` merges in base 2.

Every call is bound against the pinned 0.7.2 signatures (``flashinfer_api.py``) and its arguments checked
the way FlashInfer checks them (int32 indices, dtypes it has kernels for and as planned, shapes), and an ``auto`` wrapper is fixed
to FA3 or FA2 at its first plan as on an SM90 GPU (FA3: head_dim 64/128/256, no custom mask), so a later
plan FA3 cannot serve fails here as it would there. ``calls`` records every call for the tests.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from tests.attention.flashinfer_api import signature

FA3_HEAD_DIMS = (64, 128, 256)
# what 0.7.2's JIT tables compile (flashinfer/jit/utils.py): no float32 queries, outputs or merged states
Q_DTYPES = (torch.float16, torch.bfloat16)
KV_DTYPES = (*Q_DTYPES, torch.float8_e4m3fn, torch.float8_e5m2)
INSIDE = 0  # > 0 while an emulated call runs (its own host work is not the backend's)
FLOAT32 = False  # api(float32=True): run float32 plans too, to check a plan's semantics at float32 precision


def _emulated(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        global INSIDE
        INSIDE += 1
        try:
            return fn(*args, **kwargs)
        finally:
            INSIDE -= 1

    return inner


def _bind(name: str, *args, **kwargs) -> dict:
    bound = signature(name).bind(*args, **kwargs)  # TypeError on a renamed, missing or extra argument
    bound.apply_defaults()
    return dict(bound.arguments)


def _attend(q, k, v, allowed, sm_scale):
    """q [n, H, D], k/v [m, KV, D], allowed [n, m] bool -> out [n, H, D], lse [n, H] base 2 (float32)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    logits = torch.einsum("nhd,mhd->hnm", q.float(), k) * sm_scale
    logits = logits.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [H, n], -inf where nothing is allowed
    probs = torch.where(torch.isinf(lse)[..., None], 0.0, torch.exp(logits - lse[..., None]))
    out = torch.einsum("hnm,mhd->nhd", probs, v)
    return out, (lse / math.log(2)).T.contiguous()


class _Wrapper:
    NAME = ""

    def __init__(self, *args, **kwargs):
        a = _bind(f"{self.NAME}.__init__", self, *args, **kwargs)
        assert a["kv_layout"] == "NHD" and not a["use_cuda_graph"]
        self.backend = a["backend"]
        self.plan_args = None
        self.calls = CALLS

    def _plan_common(self, a: dict, kv_len: list[int]) -> None:
        qo = a["qo_indptr"]
        assert qo.dtype == torch.int32 and qo.dim() == 1, qo
        d_qk, d_vo = a["head_dim_qk"], a["head_dim_vo"] or a["head_dim_qk"]
        assert d_qk == d_vo, "K = V head dims only"
        assert a["num_qo_heads"] % a["num_kv_heads"] == 0
        use_mask = a["custom_mask"] is not None
        assert a["packed_custom_mask"] is None, "pass the bool mask: plan mispacks pre-packed offsets (0.7.2)"
        if use_mask:
            m = a["custom_mask"]
            qo_len = (qo[1:] - qo[:-1]).tolist()
            assert m.dtype == torch.bool and m.numel() == sum(x * y for x, y in zip(qo_len, kv_len)), m.shape
        if self.backend == "auto":  # fixed at the first plan, as FlashInfer does (SM90)
            self.backend = "fa3" if d_qk in FA3_HEAD_DIMS and not use_mask else "fa2"
        assert self.backend in ("fa2", "fa3"), self.backend
        if self.backend == "fa3":
            assert d_qk in FA3_HEAD_DIMS and not use_mask, f"FA3 cannot serve head_dim {d_qk} / custom masks"
        if not FLOAT32:  # a real plan() raises KeyError on any other dtype
            assert a["q_data_type"] in Q_DTYPES, f"FlashInfer has no {a['q_data_type']} kernels"
            assert (a["kv_data_type"] or a["q_data_type"]) in KV_DTYPES, a["kv_data_type"]
        for key in ("pos_encoding_mode", "logits_soft_cap", "prefix_len_ptr", "rope_scale", "rope_theta"):
            assert a[key] in ("NONE", None, 0.0), (key, a[key])
        self.plan_args = a
        self.kv_len = kv_len
        self.calls.append((f"{self.NAME}.plan", a))

    def _allowed(self, r: int, qo_len: int, kv_len: int, device) -> torch.Tensor:
        a = self.plan_args
        pos = kv_len - qo_len + torch.arange(qo_len, device=device)[:, None]
        key = torch.arange(kv_len, device=device)[None, :]
        if a["custom_mask"] is not None:  # MaskMode::kCustom: the causal flag is not read
            start = sum(x * y for x, y in zip(self.qo_lens[:r], self.kv_len[:r]))
            allowed = a["custom_mask"][start : start + qo_len * kv_len].view(qo_len, kv_len).to(device).clone()
        else:
            allowed = torch.ones(qo_len, kv_len, dtype=torch.bool, device=device)
            if a["causal"]:
                assert kv_len >= qo_len, "FlashInfer: causal needs kv_len >= qo_len"
                allowed &= key <= pos
        if a["window_left"] >= 0:  # variants.cuh: kv_idx + qo_len + window_left >= kv_len + qo_idx
            allowed &= key >= pos - a["window_left"]
        return allowed

    def _run(self, a: dict, q, keys_of) -> torch.Tensor | tuple:
        p = self.plan_args
        assert p is not None, "run before plan"
        assert a["lse_base"] == "log2" and a["lse_layout"] == "NH" and a.get("window_left") in (None, p["window_left"])
        assert q.dtype == p["q_data_type"], (q.dtype, p["q_data_type"])
        qo = p["qo_indptr"].tolist()
        assert q.shape == (qo[-1], p["num_qo_heads"], p["head_dim_qk"]), (q.shape, qo[-1])
        sm_scale = p["sm_scale"] if p["sm_scale"] is not None else 1 / math.sqrt(p["head_dim_qk"])
        self.qo_lens = [b - a_ for a_, b in zip(qo, qo[1:])]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for r in range(len(qo) - 1):
            k, v = keys_of(r)
            allowed = self._allowed(r, qo[r + 1] - qo[r], k.shape[0], q.device)
            out[qo[r] : qo[r + 1]], lse[qo[r] : qo[r + 1]] = _attend(q[qo[r] : qo[r + 1]], k, v, allowed, sm_scale)
        if a["out"] is not None:
            assert a["out"].shape == q.shape and a["out"].dtype == q.dtype and a["out"].is_contiguous()
            a["out"].copy_(out)
            out = a["out"]
        else:
            out = out.to(q.dtype)
        self.calls.append((f"{self.NAME}.run", a))
        return (out, lse) if a["return_lse"] else out


class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
    NAME = "BatchPrefillWithPagedKVCacheWrapper"

    @_emulated
    def plan(self, *args, **kwargs):
        a = _bind(f"{self.NAME}.plan", self, *args, **kwargs)
        indptr, indices, last = a["paged_kv_indptr"], a["paged_kv_indices"], a["paged_kv_last_page_len"]
        assert indptr.dtype == indices.dtype == last.dtype == torch.int32
        assert len(indptr) == len(a["qo_indptr"]) and len(last) == len(indptr) - 1
        assert indices.numel() == indptr[-1].item()
        pages = (indptr[1:] - indptr[:-1]).tolist()
        assert all(n >= 1 for n in pages), "every request needs at least one page"
        assert all(1 <= x <= a["page_size"] for x in last.tolist())
        kv_len = [(n - 1) * a["page_size"] + x for n, x in zip(pages, last.tolist())]
        self._plan_common(a, kv_len)

    @_emulated
    def run(self, *args, **kwargs):
        a = _bind(f"{self.NAME}.run", self, *args, **kwargs)
        p = self.plan_args
        k_cache, v_cache = a["paged_kv_cache"]
        if k_cache.dim() == 3:  # FlashInfer's _expand_4d: [pages, KV, D] is NHD with page_size 1
            k_cache, v_cache = k_cache.unsqueeze(-3), v_cache.unsqueeze(-3)
        shape = (p["page_size"], p["num_kv_heads"], p["head_dim_qk"])
        assert k_cache.shape[1:] == v_cache.shape[1:] == shape, (k_cache.shape, shape)
        assert k_cache.dtype == v_cache.dtype == (p["kv_data_type"] or p["q_data_type"])
        indptr, indices = p["paged_kv_indptr"].tolist(), p["paged_kv_indices"].to(k_cache.device).long()

        def keys_of(r):
            pages = indices[indptr[r] : indptr[r + 1]]
            n = self.kv_len[r]
            return k_cache[pages].flatten(0, 1)[:n], v_cache[pages].flatten(0, 1)[:n]

        return self._run(a, a["q"], keys_of)


class BatchPrefillWithRaggedKVCacheWrapper(_Wrapper):
    NAME = "BatchPrefillWithRaggedKVCacheWrapper"

    @_emulated
    def plan(self, *args, **kwargs):
        a = _bind(f"{self.NAME}.plan", self, *args, **kwargs)
        kv = a["kv_indptr"]
        assert kv.dtype == torch.int32 and len(kv) == len(a["qo_indptr"])
        self._plan_common(a, (kv[1:] - kv[:-1]).tolist())

    @_emulated
    def run(self, *args, **kwargs):
        a = _bind(f"{self.NAME}.run", self, *args, **kwargs)
        p = self.plan_args
        k, v = a["k"], a["v"]
        assert k.dtype == v.dtype == (p["kv_data_type"] or p["q_data_type"])
        assert k.shape[1:] == v.shape[1:] == (p["num_kv_heads"], p["head_dim_qk"])
        kv = p["kv_indptr"].tolist()
        assert k.shape[0] == kv[-1]
        return self._run(a, a["q"], lambda r: (k[kv[r] : kv[r + 1]], v[kv[r] : kv[r + 1]]))


@_emulated
def merge_state_in_place(*args, **kwargs) -> None:
    """v <- merge of (v, s) and (v_other, s_other), s <- merged base-2 LSE; rows where ``mask`` is False untouched."""
    a = _bind("merge_state_in_place", *args, **kwargs)
    v, s, vo, so = a["v"], a["s"], a["v_other"], a["s_other"]
    assert v.shape == vo.shape and s.shape == so.shape == v.shape[:2]
    assert s.dtype == so.dtype == torch.float32 and v.dtype == vo.dtype
    if not FLOAT32:  # the merge kernel's dtype dispatch and CHECK_INPUT (cascade.cu)
        assert v.dtype in Q_DTYPES, f"merge_state_in_place has no {v.dtype} kernel"
        assert all(t.is_contiguous() for t in (v, s, vo, so)), "merge_state_in_place takes contiguous tensors"
    m = torch.maximum(s, so)
    m = torch.where(torch.isinf(m), 0.0, m)  # both -inf: weights 0, output 0
    w, wo = torch.exp2(s - m), torch.exp2(so - m)
    total = w + wo
    merged = (v.float() * w[..., None] + vo.float() * wo[..., None]) / total.clamp_min(1e-30)[..., None]
    keep = torch.ones(v.shape[0], dtype=torch.bool, device=v.device) if a["mask"] is None else a["mask"]
    v[keep] = merged[keep].to(v.dtype)
    s[keep] = (m + torch.log2(total))[keep]
    CALLS.append(("merge_state_in_place", a))


CALLS: list[tuple[str, dict]] = []


def api(float32: bool = False) -> SimpleNamespace:
    """A fresh emulated ``flashinfer`` module (its call log emptied); ``float32``: also run float32 plans, which
    FlashInfer itself refuses, so that a plan's semantics can be checked at float32 precision."""
    global FLOAT32
    FLOAT32 = float32
    CALLS.clear()
    return SimpleNamespace(
        BatchPrefillWithPagedKVCacheWrapper=BatchPrefillWithPagedKVCacheWrapper,
        BatchPrefillWithRaggedKVCacheWrapper=BatchPrefillWithRaggedKVCacheWrapper,
        merge_state_in_place=merge_state_in_place, calls=CALLS,
    )  # fmt: skip
