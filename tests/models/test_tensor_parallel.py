"""Tensor-parallel shards, one process: the model built as each rank of a TP group of 2 holds the slices of the
unsharded model's weights that make its partial results add up (or concatenate) to the unsharded ones.

The collectives are replaced by the identity, so each rank's partial result can be compared; the real group
(gloo, two processes) is exercised by tests/server/test_tensor_parallel.py.
"""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_model
from sgl_diffusion.models import parallel
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
from tests.models.test_weights import sglang_padded_config

TP = 2


@contextlib.contextmanager
def as_rank(rank: int, size: int):
    """Inside the block, sglang's layers and ours see this process as ``rank`` of a TP group of ``size`` whose
    collectives return their input: a rank's outputs are its partial results."""
    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    group = SimpleNamespace(world_size=size, rank_in_group=rank, all_reduce=lambda x: x, all_gather=lambda x, dim: x)
    context = runtime_context.RuntimeContext(parallel=runtime_context.ParallelContext())
    context.set_server_args(ServerArgs(model_path="unused", tp_size=size))
    context.parallel.override_permanently(tp_group=group, tp_rank=rank)
    with runtime_context.use_context(context):
        yield


@pytest.fixture(scope="module")
def deep():
    """The deep preset, padded as sglang pads it for TP 2 (experts 24 -> 64 wide), and its unsharded model."""
    hf = build_tiny_model(0, "deep")
    config = sglang_padded_config(hf.config, TP)
    full = DiffusionGemmaForBlockDiffusion(config).eval()
    full.load_weights(hf.state_dict().items())
    return hf, config, full


def each_rank(hf, config):
    """(rank, that rank's model, loaded from the whole checkpoint), inside ``as_rank``."""
    for rank in range(TP):
        with as_rank(rank, TP):
            model = DiffusionGemmaForBlockDiffusion(config).eval()
            model.load_weights(hf.state_dict().items())
            yield rank, model


def test_each_rank_holds_its_slice(deep):
    """Query heads and the expert intermediate dim are split; the full layers' 2 KV heads are split, the sliding
    layers' single KV head is replicated on both ranks."""
    hf, config, full = deep
    sliding, ref = full.layers[0].self_attn, full.layers[0].experts
    assert sliding.heads == (8, 1, 1) and full.layers[5].self_attn.heads == (8, 2, 0)
    q, i = 4 * sliding.info.head_dim, ref.down_proj.shape[-1] // TP
    gate, up = ref.gate_up_proj.chunk(2, dim=1)
    for rank, model in each_rank(hf, config):
        attn, experts = model.layers[0].self_attn, model.layers[0].experts
        assert attn.heads == (4, 1, 1) and model.layers[5].self_attn.heads == (4, 1, 0)
        qkv = attn.qkv_proj.weight
        assert torch.equal(qkv[:q], sliding.qkv_proj.weight[rank * q : (rank + 1) * q])
        assert torch.equal(qkv[q:], sliding.qkv_proj.weight[2 * q :])  # the one K and V head, on both ranks
        assert torch.equal(experts.down_proj, ref.down_proj[..., rank * i : (rank + 1) * i])
        mine = slice(rank * i, (rank + 1) * i)
        assert torch.equal(experts.gate_up_proj, torch.cat([gate[:, mine], up[:, mine]], dim=1))


def test_partial_results_add_up_to_the_unsharded_model(deep):
    """Routed experts, the dense MLP and the self-conditioning input sum over the ranks, and the LM head's vocab
    slices concatenate, each to the unsharded model's result (float32, up to summation order)."""
    hf, config, full = deep
    torch.manual_seed(0)
    x = torch.randn(7, config.text_config.hidden_size)
    probs = torch.softmax(torch.randn(7, config.text_config.vocab_size), -1)
    layer = full.layers[0]
    weights, ids = layer.router(x)
    with parallel.sglang_runtime():
        want = [layer.experts(x, weights, ids), layer.mlp(x), full.soft_embed(probs), full.logits(x)]
    parts = []
    for rank, model in each_rank(hf, config):
        with as_rank(rank, TP):
            mine = model.layers[0]
            parts.append([mine.experts(x, weights, ids), mine.mlp(x), model.soft_embed(probs), model.logits(x)])
    for i in range(3):
        # two shards' partial sums reduce in another order than one GEMM: a few float32 ulps (6e-6 on an AMX host)
        torch.testing.assert_close(parts[0][i] + parts[1][i], want[i], rtol=2e-5, atol=5e-5)
    # each rank's logits: its slice of the padded vocab (rank 1's ends in padding), in rank order
    vocab = config.text_config.vocab_size
    torch.testing.assert_close(torch.cat([parts[0][3], parts[1][3]], -1)[:, :vocab], want[3])


def test_get_weights_by_name_gives_each_rank_its_part(deep):
    """/get_weights_by_name under TP 2 answers with the part of the checkpoint tensor a rank holds, padding left
    out: query rows and intermediate widths split (the parts concatenate to the checkpoint's), the sliding layers'
    one KV head whole on both ranks. The experts' 24 real widths, padded to 64, all sit on rank 0: rank 1 holds
    padding only, and answers with nothing."""
    hf, config, _ = deep
    state = {name: tensor.float() for name, tensor in hf.state_dict().items()}
    prefix = "model.decoder.layers.0."
    names = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight", "experts.down_proj",
             "experts.gate_up_proj")  # fmt: skip
    parts = {name: [] for name in names}
    for _, model in each_rank(hf, config):
        for name in names:
            parts[name].append(torch.tensor(model.get_weights_by_name(prefix + name, truncate_size=10**6)))
    want = {name: state[prefix + name] for name in names}
    assert [part.numel() for part in parts["experts.down_proj"]][1:] == [0]
    parts = {name: [part for part in got if part.numel()] for name, got in parts.items()}
    assert torch.equal(torch.cat(parts["self_attn.q_proj.weight"]), want["self_attn.q_proj.weight"])
    assert all(torch.equal(part, want["self_attn.k_proj.weight"]) for part in parts["self_attn.k_proj.weight"])
    assert torch.equal(torch.cat(parts["mlp.down_proj.weight"], dim=1), want["mlp.down_proj.weight"])
    assert torch.equal(torch.cat(parts["experts.down_proj"], dim=2), want["experts.down_proj"])
    gate_up = [part.chunk(2, dim=1) for part in parts["experts.gate_up_proj"]]  # each rank: its gate rows, its up rows
    rebuilt = torch.cat([torch.cat([gate for gate, _ in gate_up], 1), torch.cat([up for _, up in gate_up], 1)], 1)
    assert torch.equal(rebuilt, want["experts.gate_up_proj"])
