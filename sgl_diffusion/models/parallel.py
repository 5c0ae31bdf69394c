"""The model's view of sglang's tensor-parallel group, in a server and in any other process.

In a server, sglang publishes its runtime config and creates the TP group before the model is built, and its
parallel layers (``QKVParallelLinear``, ``RowParallelLinear``, ...) shard themselves over that group. Elsewhere
(the offline engine, parity tests, bench/) nothing is published, and those layers fail on construction and on
forward ("config namespace 'parallel' not published"). There, ``sglang_runtime()`` activates a private sglang
runtime context holding sglang's defaults and a single-rank TP group, for the duration of the block only: the
layers build unsharded and every collective below is skipped. The model enters it around its constructor and
its public methods (``in_sglang_runtime``); a server's published config is used as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from types import SimpleNamespace

import torch


@contextlib.contextmanager
def sglang_runtime():
    """Within the block, sglang's runtime config reads succeed: the server's own where one is published, else
    sglang's defaults (no deterministic mode, no fused all-reduce, no symmetric memory, one TP rank)."""
    from sglang.srt import runtime_context

    if runtime_context.get_context().is_config_namespace_published("exec"):
        yield
        return
    with runtime_context.use_context(_default_context()):
        yield


def in_sglang_runtime(method):
    """Decorate a model method that builds or runs sglang layers: it runs inside ``sglang_runtime()``."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():  # a compiled step runs inside its caller's context (dynamo cannot build one)
            return method(*args, **kwargs)
        with sglang_runtime():
            return method(*args, **kwargs)

    return wrapper


def tp_rank_size() -> tuple[int, int]:
    """(rank, size) of this process in sglang's TP group; (0, 1) outside a server. Call inside ``sglang_runtime()``."""
    from sglang.srt.runtime_context import get_parallel

    group = get_parallel().tp_group
    return group.rank_in_group, group.world_size


@dataclasses.dataclass(frozen=True)
class MoeRanks:
    """This process's place in sglang's MoE split of the TP group: ``ep_size`` expert-parallel ranks, each holding
    a contiguous block of whole experts, times ``tp_size`` MoE-TP ranks splitting those experts' intermediate dim.
    tp_size * ep_size is the TP group's size, and the partial outputs of all of them sum over the TP group."""

    ep_rank: int
    ep_size: int
    tp_rank: int
    tp_size: int


def moe_ranks() -> MoeRanks:
    """sglang's ``moe_ep_size`` / ``moe_tp_size`` (``--ep-size``; moe_tp_size = tp / ep) and this TP rank's place in
    them. Call inside ``sglang_runtime()``.

    NOTE: the ranks are derived from the TP rank with sglang's own layout (``derive_spawn_ranks``: MoE-TP groups are
    contiguous TP ranks, EP groups strided by moe_tp_size), not read from ``get_parallel().moe_ep_rank``: that one is
    written only in a server, and a bare process or a test knows just its TP rank.
    """
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    if parallel.moe_dp_size != 1:
        raise ValueError(f"DiffusionGemma's experts take no MoE data parallelism (moe_dp_size {parallel.moe_dp_size})")
    rank, size = tp_rank_size()
    ep_size, moe_tp = parallel.moe_ep_size, parallel.moe_tp_size
    if ep_size * moe_tp != size:
        raise ValueError(f"--ep-size {ep_size} x MoE TP {moe_tp} is not the TP size {size}")
    return MoeRanks(ep_rank=rank // moe_tp, ep_size=ep_size, tp_rank=rank % moe_tp, tp_size=moe_tp)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the TP ranks (``x`` itself on one rank)."""
    from sglang.srt.distributed.communication_op import tensor_model_parallel_all_reduce

    return x if tp_rank_size()[1] == 1 else tensor_model_parallel_all_reduce(x)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """The ranks' ``x`` concatenated along the last dim, in rank order (``x`` itself on one rank)."""
    from sglang.srt.distributed.communication_op import tensor_model_parallel_all_gather

    return x if tp_rank_size()[1] == 1 else tensor_model_parallel_all_gather(x, dim=-1)


@functools.cache
def _default_context():
    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    context = runtime_context.RuntimeContext(parallel=runtime_context.ParallelContext())
    # NOTE: ServerArgs defaults, never resolved: no model config is read and nothing is loaded
    context.set_server_args(ServerArgs(model_path="sgl-diffusion/no-server"))
    # one rank: the layers build unsharded and nothing is ever reduced or gathered
    context.parallel.override_permanently(tp_group=SimpleNamespace(world_size=1, rank_in_group=0), tp_rank=0)
    return context
