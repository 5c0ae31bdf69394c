"""Expert-parallel shards, one process: the deep preset's routed experts (8) built as each rank of `--ep-size 2`
(TP 2, whole experts split 4 + 4) and of TP 4 x EP 2 (whole experts split over 2 EP ranks, each block's
intermediate dim over 2 MoE-TP ranks) hold exactly their experts' weights from the checkpoint, and the ranks'
partial outputs sum to the unsharded experts' output.

As in test_tensor_parallel.py the collectives are the identity, so each rank's partial result can be compared;
sglang's own config derives moe_ep_size / moe_tp_size from ``--tp`` and ``--ep-size``.
"""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_model
from sgl_diffusion.models import parallel
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
from tests.models.test_weights import sglang_padded_config

LAYOUTS = [(2, 2), (4, 2)]  # (--tp, --ep-size): EP 2 alone, and TP 4 = EP 2 x MoE-TP 2


@contextlib.contextmanager
def as_rank(rank: int, tp: int, ep: int):
    """Inside the block, this process is ``rank`` of a TP group of ``tp`` served with ``--ep-size ep``, and the
    group's collectives return their input."""
    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    group = SimpleNamespace(world_size=tp, rank_in_group=rank, all_reduce=lambda x: x, all_gather=lambda x, dim: x)
    context = runtime_context.RuntimeContext(parallel=runtime_context.ParallelContext())
    context.set_server_args(ServerArgs(model_path="unused", tp_size=tp, ep_size=ep))
    context.parallel.override_permanently(tp_group=group, tp_rank=rank)
    with runtime_context.use_context(context):
        yield


@pytest.fixture(scope="module")
def hf():
    return build_tiny_model(0, "deep")


def each_rank(hf, tp: int, ep: int):
    """(rank, its model loaded from the whole checkpoint, the unsharded model with the same padding)."""
    config = sglang_padded_config(hf.config, tp)
    full = DiffusionGemmaForBlockDiffusion(config).eval()
    full.load_weights(hf.state_dict().items())
    for rank in range(tp):
        with as_rank(rank, tp, ep):
            model = DiffusionGemmaForBlockDiffusion(config).eval()
            model.load_weights(hf.state_dict().items())
        yield rank, model, full


@pytest.mark.parametrize("tp,ep", LAYOUTS)
def test_each_rank_holds_its_experts(hf, tp, ep):
    """EP rank r = rank // (tp / ep) holds experts 4r .. 4r + 3, whole under EP alone, else its MoE-TP rank's slice of
    their intermediate dim (gate rows, then up rows); the router and the rest of the layer are not split by EP."""
    moe_tp = tp // ep
    for rank, model, full in each_rank(hf, tp, ep):
        ep_rank, tp_rank = rank // moe_tp, rank % moe_tp
        experts, ref = model.layers[0].experts, full.layers[0].experts
        mine = slice(4 * ep_rank, 4 * ep_rank + 4)
        i = ref.down_proj.shape[-1] // moe_tp
        cols = slice(tp_rank * i, (tp_rank + 1) * i)
        gate, up = ref.gate_up_proj[mine].chunk(2, dim=1)
        assert experts.gate_up_proj.shape == (4, 2 * i, ref.gate_up_proj.shape[-1])
        assert torch.equal(experts.gate_up_proj, torch.cat([gate[:, cols], up[:, cols]], dim=1))
        assert torch.equal(experts.down_proj, ref.down_proj[mine][..., cols])
        # against the checkpoint itself: its experts are 24 wide, padded to 64 or 128 and split into slices of 64,
        # so MoE-TP rank 0 holds the 24 real columns of its 4 experts and any other rank only zero padding
        ckpt = {name: hf.state_dict()[f"model.decoder.layers.0.experts.{name}"][mine]
                for name in ("gate_up_proj", "down_proj")}
        real = ckpt["down_proj"].shape[-1]
        gate, up = experts.gate_up_proj.chunk(2, dim=1)
        held = (torch.cat([gate[:, :real], up[:, :real]], dim=1), experts.down_proj[..., :real])
        if tp_rank == 0:
            assert torch.equal(held[0], ckpt["gate_up_proj"]) and torch.equal(held[1], ckpt["down_proj"])
        else:
            assert not experts.gate_up_proj.any() and not experts.down_proj.any()
        assert torch.equal(model.layers[0].router.proj.weight, full.layers[0].router.proj.weight)
        # what the fused kernel (CUDA) gets: indices into this rank's experts, -1 for the other rank's
        ids = torch.tensor([[0, 3, 4, 7]])
        assert experts._local_ids(ids).tolist() == ([[0, 3, -1, -1]] if ep_rank == 0 else [[-1, -1, 0, 3]])


@pytest.mark.parametrize("tp,ep", LAYOUTS)
def test_partial_outputs_sum_to_the_unsharded_experts(hf, tp, ep):
    """Every layer's experts: the ranks' partial outputs (each only its experts' pairs) sum to the unsharded output,
    and a rank whose experts no token picked gives exactly 0."""
    torch.manual_seed(0)
    parts, want = [], None
    for rank, model, full in each_rank(hf, tp, ep):
        x = torch.randn(9, full.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
        if want is None:
            with parallel.sglang_runtime():
                routes = [layer.router(x) for layer in full.layers]
                want = [layer.experts(x, w, ids) for layer, (w, ids) in zip(full.layers, routes)]
        with as_rank(rank, tp, ep):
            parts.append([layer.experts(x, w, ids) for layer, (w, ids) in zip(model.layers, routes)])
            low = torch.zeros_like(routes[0][1])  # every pair routed to expert 0: EP rank 0's
            alone = model.layers[0].experts(x, routes[0][0], low)
            assert (rank // (tp // ep) == 0) or not alone.any()
    for layer, expected in enumerate(want):
        total = sum(part[layer] for part in parts)
        # sums of shards reduce in another order than one GEMM: a few float32 ulps apart (1.7e-6 on an AMX host)
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp,ep", [(1, 1), *LAYOUTS])
def test_dense_experts_compute_the_loop_on_every_shard(hf, tp, ep):
    """The sync-free form a compiled CPU step runs (every local expert over every token, each token's K outputs
    picked and summed in slot order) gives the loop's output on each rank's shard, other ranks' pairs at 0."""
    from sgl_diffusion.models.layers import experts_dense, experts_loop

    if tp > 1:
        models = [model for _, model, _ in each_rank(hf, tp, ep)]
    else:
        models = [DiffusionGemmaForBlockDiffusion(hf.config).eval()]
        models[0].load_weights(hf.state_dict().items())
    routed = []
    for model in models:
        gen = torch.Generator().manual_seed(1)
        cfg = model.cfg
        x = torch.randn(40, cfg.hidden_size, generator=gen)
        for layer in model.layers:
            experts = layer.experts
            assert experts.dense_when_compiled  # 8 experts, top 3: under 4x the routed work
            # K distinct experts per token, spread over all of them (a random tiny router favours a few)
            ids = torch.rand(40, cfg.num_experts, generator=gen).topk(cfg.top_k_experts).indices
            weights = torch.rand(40, cfg.top_k_experts, generator=gen)
            args = (x, weights, ids, experts.gate_up_proj, experts.down_proj, experts.first, experts.activation)
            want = experts_loop(*args)
            # float32 GEMMs of other shapes: rounding only
            torch.testing.assert_close(experts_dense(*args), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
            routed.append(bool(want.any()) == bool(experts.gate_up_proj.any()))  # a rank may hold padding only
    assert all(routed)  # every shard with weights computes something
