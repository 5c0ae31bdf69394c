"""Tensor parallelism on CPU: `--tp 2` (two ranks, gloo), and `--tp 2 --ep-size 2`, serve the tiny checkpoints with
the tokens of `--tp 1`."""

import hashlib

import pytest
import requests

from tests.server.conftest import Server

pytestmark = pytest.mark.slow

# 40 tokens span two 32-token canvases: the second is denoised after a commit re-encoded the first
SEEDED = {"max_new_tokens": 40, "ignore_eos": True, "diffusion": {"max_denoising_steps": 2}}
UNSEEDED_RID = "tensor-parallel-unseeded"


def rid_seed(rid: str) -> int:
    """The seed ranks share for an unseeded request (runtime/scheduler_hook.py)."""
    return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "little") >> 1


def generate(url, **body):
    resp = requests.post(f"{url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def answers(url, ranks: int) -> list[list[int]]:
    """Seeded answers: three requests one after the other, two in one batch (they share forwards), and one
    unseeded request, which the ranks seed alike (a single server gets that seed explicitly)."""
    out = []
    for seed, text in [(0, "tensor parallel 0"), (1, "tensor parallel 1"), (2, "tensor parallel 2"), (7, ["a", "b"])]:
        result = generate(url, text=text, sampling_params=SEEDED | {"diffusion": SEEDED["diffusion"] | {"seed": seed}})
        out += [r["output_ids"] for r in result] if isinstance(text, list) else [result["output_ids"]]
    diffusion = SEEDED["diffusion"] | ({} if ranks > 1 else {"seed": rid_seed(UNSEEDED_RID)})
    result = generate(url, text="unseeded", rid=UNSEEDED_RID, sampling_params=SEEDED | {"diffusion": diffusion})
    return out + [result["output_ids"]]


@pytest.fixture(scope="module")
def deep_checkpoint_dir(tmp_path_factory):
    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("deep_checkpoint"), preset="deep")


def served_by_two_ranks(model_dir, *extra_args: str, rank_label: str = "TP1") -> list[list[int]]:
    # NOTE: no CPU variable given: the package sets the thread binding and keeps NCCL off by itself
    srv = Server(model_dir, "--tp", "2", *extra_args)
    try:
        got = answers(srv.url, ranks=2)
        with open(srv.log_path) as log:
            text = log.read()
    finally:
        srv.stop()
    assert rank_label in text and "SGLANG_NCCL_SO_PATH=" in text
    return got


def test_default_preset(server, tiny_checkpoint_dir):
    """Full layers with 1 KV head (replicated on both ranks), sliding layers with 2 (one per rank)."""
    assert served_by_two_ranks(tiny_checkpoint_dir) == answers(server.url, ranks=1)


def test_deep_preset_expert_parallel(deep_checkpoint_dir):
    """`--tp 2 --ep-size 2`: attention split as the default preset's is not (full layers with 2 KV heads, one per
    rank; sliding layers with 1, replicated), and each rank holds 4 of the 8 experts whole and computes only the
    pairs routed to them. (The deep preset's expert TP with its 24 -> 64 padding: tests/models/test_tensor_parallel.py;
    a third two-rank server here would add a minute to the suite.)"""
    single = Server(deep_checkpoint_dir)
    try:
        want = answers(single.url, ranks=1)
    finally:
        single.stop()
    assert served_by_two_ranks(deep_checkpoint_dir, "--ep-size", "2", rank_label="TP1 EP1") == want
