"""Serve a DiffusionGemma checkpoint on the CPU when the machine has no accelerator, with CPU defaults.

sglang stops with ``No accelerator (CUDA, ...) is available`` when ``--device`` is not given on such a machine.
For a local DiffusionGemma checkpoint (``architectures`` in its config.json) we pick the CPU instead, and
whenever a DiffusionGemma server runs on the CPU (picked here or given with ``--device cpu``) we fill in what
keeps a small machine responsive, each only when the user left it unset:

- ``--max-total-tokens``: on the CPU sglang sizes the KV pool from system RAM (mem_fraction_static of all of
  it: a 14 GB pool and 30 s of start-up on a 24 GiB machine, for a tiny checkpoint). We size it from the
  model instead (``cpu_max_total_tokens``). Not set when ``--mem-fraction-static`` is given: that asks
  sglang to size the pool from memory.
- ``--sleep-on-idle --disable-overlap-schedule``: no busy idle loop (sleeping with overlap on makes
  latency 10x worse).
- ``--skip-server-warmup``: the warm-up request costs a whole canvas on the CPU.
- ``SGLANG_CPU_OMP_THREADS_BIND``: with more ranks (``--dp-size`` x ``--tp-size``) than NUMA nodes, sglang
  stops unless told which cores each rank uses; the cores are split evenly between the ranks.
- ``SGLANG_NCCL_SO_PATH``, with ``--tp-size`` (or ``--pp-size``) above 1: sglang builds a PyNccl communicator
  for every group of more than one rank whenever it finds an NCCL library, and the ``nvidia-nccl`` wheel torch
  installs is one, so the first collective stops with "Expected a cuda device". Pointing the variable at a
  file that does not exist makes each communicator disable itself (sglang logs that it could not load NCCL),
  and the groups use gloo.

On every device, a float32 checkpoint left at ``--dtype auto`` is not served in float16 (sglang's rule for
float32 checkpoints; it keeps Gemma models out of it, by a model type ours does not match, because Gemma's activations
overflow float16): bfloat16 on an accelerator, as sglang serves Gemma, and float32 on the CPU, which computes it
natively (the tiny checkpoints are float32).

The three booleans are store_true flags with no opposite in sglang 0.5.23; an explicit ``--device``,
``--max-total-tokens`` or ``--mem-fraction-static`` always wins. Other models keep sglang's behaviour.

It runs at sglang's ``handle_missing_default_values`` resolution step (where sglang would pick the device),
registered through sglang's public ``register_resolution_hook`` by ``srt_patches.apply()``. Resolution runs
once, in the launcher (or the ``sglang.Engine`` process), so the log line is written once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from sgl_diffusion.models.config import DiffusionGemmaConfig

logger = logging.getLogger(__name__)

RESOLUTION_STEP = "handle_missing_default_values"
POOL_CONTEXTS = 2  # full-length requests the CPU pool holds: a long request never blocks a second one
POOL_RAM_FRACTION = 0.25  # of the RAM the weights leave free, at most
KV_ELEMENT_BYTES = 4  # float32, the widest KV dtype on the CPU: the RAM cap is an upper bound
CPU_FLAGS = ("sleep_on_idle", "disable_overlap_schedule", "skip_server_warmup")  # set True when left False
THREADS_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"
NCCL_ENV = "SGLANG_NCCL_SO_PATH"
NO_NCCL = "/nonexistent/sgl-diffusion-cpu-ranks-use-gloo/libnccl.so.2"
_registered = False


def register() -> None:
    """Install ``resolve_device`` at sglang's resolution step, once per process."""
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook

    try:
        register_resolution_hook(RESOLUTION_STEP)(resolve_device)
    except ValueError as e:  # SystemExit: sglang's load_plugins() logs and swallows Exceptions
        raise SystemExit(f"sgl-diffusion: cannot hook sglang's {RESOLUTION_STEP}: {e}") from e
    _registered = True


def resolve_device(server_args: Any, previous: Callable[[Any], None]) -> None:
    """sglang's ``handle_missing_default_values``, with the CPU fallback and CPU defaults for DiffusionGemma."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    cfg = resolving_view(server_args)
    hf_config = diffusion_gemma_config(cfg.model_path)
    if hf_config is None:
        previous(server_args)
        return
    fallback = cfg.device is None and not sglang_picks_a_device()
    if fallback:
        declare_resolution(server_args, __name__, device="cpu")
    previous(server_args)
    dtype = _dtype_for_float32(hf_config, cfg)
    if cfg.device != "cpu":
        if dtype:
            declare_resolution(server_args, __name__, dtype=dtype)
            logger.info("sgl-diffusion: a float32 DiffusionGemma checkpoint is served in %s, as sglang serves Gemma "
                        "(--dtype wins)", dtype)  # fmt: skip
        return
    defaults = {"dtype": dtype} if dtype else {}
    if cfg.max_total_tokens is None and cfg.mem_fraction_static is None:
        defaults["max_total_tokens"] = _max_total_tokens(hf_config, cfg)
    defaults |= {name: True for name in CPU_FLAGS if not getattr(cfg, name)}
    if defaults:
        declare_resolution(server_args, __name__, **defaults)
    bind = bind_threads(cfg.dp_size * cfg.tp_size * cfg.pp_size)
    nccl = keep_nccl_off(cfg.tp_size * cfg.pp_size)
    if fallback or defaults or bind or nccl:
        flags = " ".join(_flag(name, value) for name, value in defaults.items()) or "none (all given)"
        flags += f"; {THREADS_BIND_ENV}={bind}" if bind else ""
        flags += f"; {NCCL_ENV}={nccl} (gloo between ranks)" if nccl else ""
        reason = "no accelerator found: serving" if fallback else "serving"
        logger.log(logging.WARNING if fallback else logging.INFO,
                   "sgl-diffusion: %s DiffusionGemma on the CPU; CPU defaults applied: %s (a flag you give wins)",
                   reason, flags)  # fmt: skip


def diffusion_gemma_config(model_path: str):
    """The HF config of a local DiffusionGemma checkpoint directory, else None (other models, hub ids)."""
    from sgl_diffusion.runtime.scheduler_hook import ARCHITECTURE, serves_diffusion_model

    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    # NOTE: the architecture is read from the JSON first: AutoConfig on another model may run remote code
    try:
        architectures = json.loads(path.read_text()).get("architectures")
    except (ValueError, AttributeError):
        return None  # not our checkpoint; sglang reports a broken config.json its own way
    if ARCHITECTURE not in (architectures or ()):
        return None
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_path)
    return hf_config if serves_diffusion_model(hf_config) else None


def cpu_max_total_tokens(cfg: DiffusionGemmaConfig, context_len: int, free_bytes: int, weight_bytes: int,
                         ranks: int = 1) -> int:
    """KV pool tokens per rank on the CPU: ``POOL_CONTEXTS`` full-length requests, capped so the ``ranks`` pools
    take at most ``POOL_RAM_FRACTION`` of the RAM left free after each rank's weights, never less than one canvas.

    The per-token size counts K and V of every layer at full length in float32 (sglang's SWA pool holds
    fewer tokens for sliding layers, and bf16 halves it): the cap is an upper bound on the pool's RAM.
    """
    per_token = sum(2 * layer.num_kv_heads * layer.head_dim * KV_ELEMENT_BYTES for layer in cfg.layers)
    ram_cap = int(POOL_RAM_FRACTION * max(free_bytes - ranks * weight_bytes, 0)) // (ranks * per_token)
    return max(min(POOL_CONTEXTS * context_len, ram_cap), cfg.canvas_length)


def bind_threads(ranks: int, environ=None) -> str | None:
    """Set SGLANG_CPU_OMP_THREADS_BIND when ``ranks`` CPU ranks outnumber the NUMA nodes (sglang's default binds
    one rank per node, and stops otherwise) and the operator left it unset; returns the value set, else None.

    The scheduler processes inherit it: resolution runs in the launcher before they are started.
    """
    from sglang.srt.utils.common import get_cpu_ids_by_node

    environ = os.environ if environ is None else environ
    nodes = get_cpu_ids_by_node()
    if environ.get(THREADS_BIND_ENV) or ranks <= max(len(nodes), 1):
        return None
    environ[THREADS_BIND_ENV] = split_cores([int(c) for node in nodes for c in node.split(",")], ranks)
    return environ[THREADS_BIND_ENV]


def keep_nccl_off(group_ranks: int, environ=None) -> str | None:
    """Point SGLANG_NCCL_SO_PATH at no file when a group spans ``group_ranks`` > 1 CPU ranks and the operator left
    it unset, so that sglang's PyNccl communicators disable themselves; returns the value set, else None.

    Like SGLANG_CPU_OMP_THREADS_BIND, the scheduler processes inherit it (they are started after resolution).
    """
    environ = os.environ if environ is None else environ
    if environ.get(NCCL_ENV) or group_ranks <= 1:
        return None
    environ[NCCL_ENV] = NO_NCCL
    return NO_NCCL


def split_cores(cores: list[int], ranks: int) -> str:
    """``cores`` in ``ranks`` contiguous groups, sglang's ``a,b|c,d`` form; with fewer cores than ranks, ranks
    share them in turn."""
    if len(cores) < ranks:
        return "|".join(str(cores[r % len(cores)]) for r in range(ranks))
    size, extra = divmod(len(cores), ranks)
    groups, start = [], 0
    for r in range(ranks):
        end = start + size + (r < extra)
        groups.append(",".join(map(str, cores[start:end])))
        start = end
    return "|".join(groups)


def sglang_picks_a_device() -> bool:
    """True when sglang finds a device without --device: an accelerator, or the CPU by SGLANG_USE_CPU_ENGINE=1."""
    from sglang.srt.utils.common import get_device, is_cpu

    if is_cpu():
        return True  # checked first: get_device() would log its CPU warning a second time
    try:
        get_device()
    except RuntimeError:  # "No accelerator (CUDA, XPU, HPU, NPU, MUSA, MPS) or platform plugin is available."
        return False
    return True


def _max_total_tokens(hf_config, cfg) -> int:
    from sglang.srt.utils.common import get_free_cpu_memory
    from sglang.srt.utils.hf_transformers.common import get_context_length

    from sgl_diffusion.models.config import DiffusionGemmaConfig

    context_len = cfg.context_length or get_context_length(hf_config.text_config)
    weight_bytes = sum(p.stat().st_size for p in Path(cfg.model_path).glob("*.safetensors"))
    return cpu_max_total_tokens(DiffusionGemmaConfig.from_hf(hf_config), context_len, get_free_cpu_memory(),
                                weight_bytes, ranks=cfg.dp_size * cfg.tp_size * cfg.pp_size)  # fmt: skip


def _dtype_for_float32(hf_config, cfg) -> str | None:
    """The dtype a float32 checkpoint at ``--dtype auto`` is served in (None: another dtype, or one was given)."""
    if cfg.dtype != "auto":
        return None
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config.text_config, "dtype", None)
    if str(stored).removeprefix("torch.") not in ("float32", "float"):
        return None
    return "float32" if cfg.device == "cpu" else "bfloat16"


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    return flag if value is True else f"{flag} {value}"
