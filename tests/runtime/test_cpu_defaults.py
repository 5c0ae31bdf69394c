"""The CPU fallback: sglang's server arguments resolved in-process (no server), and the pool-size rule."""

import argparse
import inspect
import json
import logging
import os

import pytest

from sgl_diffusion.runtime import cpu_defaults

GiB = 1 << 30
CPU_DEFAULTS = {"dtype": "float32", "max_total_tokens": 8192, "sleep_on_idle": True, "disable_overlap_schedule": True,
                "skip_server_warmup": True}  # fmt: skip  # the tiny checkpoint: float32, 2 contexts of 4096


@pytest.fixture(autouse=True)
def environ_kept():
    """sglang's resolution sets SGLANG_* variables; servers that later tests start must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def applied():
    """The plugin as sglang loads it (registers the resolution hook)."""
    import srt_patches

    srt_patches.apply()


@pytest.fixture
def no_accelerator(applied):
    if cpu_defaults.sglang_picks_a_device():
        pytest.skip("an accelerator (or SGLANG_USE_CPU_ENGINE=1) is present: sglang picks the device itself")


@pytest.fixture
def ample_ram(monkeypatch):
    """Free RAM pinned at 64 GiB, so the pool size does not depend on this machine."""
    from sglang.srt.utils import common

    monkeypatch.setattr(common, "get_free_cpu_memory", lambda: 64 * GiB)


def resolve(*argv):
    """ServerArgs from a command line, resolved as sglang.launch_server resolves them; returns the record."""
    server_args = plain_args(*argv)
    server_args.resolve_once()
    return server_args


def plain_args(*argv):
    """ServerArgs from a command line, not resolved."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(list(argv)))


def resolved(server_args, *fields):
    from sglang.srt.arg_groups.overrides import resolution_result

    return {name: resolution_result(server_args, name) for name in fields}


def our_declarations(server_args) -> list[dict]:
    overrides = getattr(server_args, "_resolved_overrides", None) or ()
    return [fields for source, fields in overrides if source == cpu_defaults.__name__]


def our_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == cpu_defaults.__name__]


def test_upstream_step_is_still_where_the_device_is_picked(applied):
    """sglang still resolves a missing --device in handle_missing_default_values(server_args), an overridable
    step, and our hook is registered there exactly once (apply() may run more than once per process)."""
    from sglang.srt.arg_groups import resolution_hooks, serving_hook

    step = serving_hook.handle_missing_default_values
    assert list(inspect.signature(step).parameters) == ["server_args"]
    assert "device=get_device()" in inspect.getsource(step)
    assert cpu_defaults.RESOLUTION_STEP == step.__name__ and step.__name__ in resolution_hooks._OVERRIDABLE_HOOKS
    assert resolution_hooks._HOOKS[step.__name__].count(cpu_defaults.resolve_device) == 1
    cpu_defaults.register()
    assert resolution_hooks._HOOKS[step.__name__].count(cpu_defaults.resolve_device) == 1


def test_plain_command_picks_the_cpu_with_defaults(no_accelerator, ample_ram, tiny_checkpoint_dir, caplog):
    """`--model-path DIR` alone, without an accelerator: the CPU, the CPU defaults, one log line naming them."""
    caplog.set_level(logging.INFO)
    server_args = resolve("--model-path", str(tiny_checkpoint_dir))
    assert resolved(server_args, "device", *CPU_DEFAULTS) == {"device": "cpu", **CPU_DEFAULTS}
    [line] = our_log(caplog)
    assert "no accelerator found" in line and "--max-total-tokens 8192 --sleep-on-idle" in line


@pytest.mark.parametrize("argv, expected, fallback", [
    (("--max-total-tokens", "4096"), CPU_DEFAULTS | {"max_total_tokens": 4096}, True),
    (("--mem-fraction-static", "0.5"), CPU_DEFAULTS | {"max_total_tokens": None}, True),
    (("--device", "cpu", "--sleep-on-idle"), CPU_DEFAULTS, False),
    (("--dtype", "bfloat16"), CPU_DEFAULTS | {"dtype": "bfloat16"}, True),
])  # fmt: skip
def test_explicit_flags_win(no_accelerator, ample_ram, tiny_checkpoint_dir, caplog, argv, expected, fallback):
    """A value the user gives is kept, and the log line names only what we filled in; --mem-fraction-static
    leaves the pool to sglang; an explicit --device cpu still gets the CPU defaults, logged as a choice."""
    caplog.set_level(logging.INFO)
    server_args = resolve("--model-path", str(tiny_checkpoint_dir), *argv)
    assert resolved(server_args, "device", *CPU_DEFAULTS) == {"device": "cpu", **expected}
    [line] = our_log(caplog)
    assert ("no accelerator found" in line) == fallback
    given = [arg for arg in argv if arg.startswith("--") and arg != "--device"]
    assert given and not [flag for flag in given if flag in line]
    declared = {name for fields in our_declarations(server_args) for name in fields}
    assert not declared & {flag[2:].replace("-", "_") for flag in given}


@pytest.fixture
def llama_dir(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 128}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_other_models_keep_sglangs_behaviour(no_accelerator, llama_dir, caplog):
    """A non-DiffusionGemma checkpoint without an accelerator still stops with sglang's own error."""
    caplog.set_level(logging.INFO)
    with pytest.raises(RuntimeError, match="No accelerator"):
        resolve("--model-path", str(llama_dir))
    assert our_log(caplog) == []


def test_other_models_on_the_cpu_get_no_defaults(applied, llama_dir, caplog):
    """`--device cpu` with a non-DiffusionGemma checkpoint: nothing of ours is declared."""
    from sglang.srt.server_args import ServerArgs

    caplog.set_level(logging.INFO)
    server_args = ServerArgs(model_path=str(llama_dir), device="cpu")
    cpu_defaults.resolve_device(server_args, lambda _: None)
    assert our_declarations(server_args) == [] and our_log(caplog) == []


@pytest.mark.parametrize("argv, ours", [((), [{"dtype": "bfloat16"}]), (("--dtype", "float16"), [])])
def test_an_accelerator_gets_sglangs_device_and_gemmas_dtype(applied, monkeypatch, tiny_checkpoint_dir, caplog, argv,
                                                            ours):
    """With an accelerator, DiffusionGemma gets sglang's device and no CPU defaults; a float32 checkpoint is served in
    bfloat16 as sglang serves Gemma (its own rule, float16, does not know our model type), unless --dtype is given."""
    from sglang.srt.arg_groups.overrides import declare_resolution

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(cpu_defaults, "sglang_picks_a_device", lambda: True)
    server_args = plain_args("--model-path", str(tiny_checkpoint_dir), *argv)
    cpu_defaults.resolve_device(server_args, lambda sa: declare_resolution(sa, "sglang", device="cuda"))
    assert server_args._resolved_overrides[0] == ("sglang", {"device": "cuda"})
    assert our_declarations(server_args) == ours
    assert len(our_log(caplog)) == len(ours) and all("bfloat16" in line for line in our_log(caplog))


def test_pool_size_rule(hf_config):
    """Two full contexts; capped at a quarter of the RAM the weights leave (float32 K and V of every layer);
    never under one canvas."""
    from sgl_diffusion.models.config import DiffusionGemmaConfig

    cfg = DiffusionGemmaConfig.from_hf(hf_config)
    per_token = 5 * 2 * 2 * 16 * 4 + 2 * 1 * 32 * 4  # five sliding layers (2 heads x 16) and one full (1 x 32)
    assert cpu_defaults.cpu_max_total_tokens(cfg, 4096, 64 * GiB, 0) == 8192
    assert cpu_defaults.cpu_max_total_tokens(cfg, 4096, 4000 * per_token + 1000, 1000) == 1000
    assert cpu_defaults.cpu_max_total_tokens(cfg, 4096, GiB, 2 * GiB) == cfg.canvas_length
    # two replicas: each holds the weights and a pool, within the same quarter of the RAM
    assert cpu_defaults.cpu_max_total_tokens(cfg, 4096, 8000 * per_token + 2000, 1000, ranks=2) == 1000


@pytest.mark.parametrize("cores, ranks, want", [
    ([0, 1], 2, "0|1"),
    ([0, 1, 2, 3, 4], 2, "0,1,2|3,4"),
    ([0, 1], 4, "0|1|0|1"),  # more ranks than cores: they share them in turn
])  # fmt: skip
def test_cores_are_split_between_ranks(cores, ranks, want):
    assert cpu_defaults.split_cores(cores, ranks) == want


def test_threads_bound_only_when_ranks_outnumber_numa_nodes(monkeypatch):
    """sglang binds one rank per NUMA node by itself and stops with more ranks; the operator's value is kept."""
    from sglang.srt.utils import common

    monkeypatch.setattr(common, "get_cpu_ids_by_node", lambda: ["0,1,2,3"])  # one node of four cores
    env = {}
    assert cpu_defaults.bind_threads(1, env) is None and env == {}
    assert cpu_defaults.bind_threads(2, env) == "0,1|2,3" and env == {"SGLANG_CPU_OMP_THREADS_BIND": "0,1|2,3"}
    env = {"SGLANG_CPU_OMP_THREADS_BIND": "1|3"}
    assert cpu_defaults.bind_threads(2, env) is None and env == {"SGLANG_CPU_OMP_THREADS_BIND": "1|3"}


def test_nccl_kept_off_only_for_groups_of_several_ranks():
    """A TP (or PP) group of more than one CPU rank gets an NCCL path that loads nothing, so its groups use gloo;
    the operator's value is kept."""
    env = {}
    assert cpu_defaults.keep_nccl_off(1, env) is None and env == {}
    assert cpu_defaults.keep_nccl_off(2, env) == cpu_defaults.NO_NCCL
    assert env == {"SGLANG_NCCL_SO_PATH": cpu_defaults.NO_NCCL}
    assert not os.path.exists(cpu_defaults.NO_NCCL)
    env = {"SGLANG_NCCL_SO_PATH": "/opt/nccl/libnccl.so.2"}
    assert cpu_defaults.keep_nccl_off(2, env) is None and env == {"SGLANG_NCCL_SO_PATH": "/opt/nccl/libnccl.so.2"}


def test_tensor_parallel_sets_both_variables(no_accelerator, ample_ram, tiny_checkpoint_dir, caplog, monkeypatch):
    """`--tp 2` alone: the launcher sets the thread binding and the NCCL path before sglang starts the ranks, and
    the log line names them."""
    from sglang.srt.utils import common

    monkeypatch.setattr(common, "get_cpu_ids_by_node", lambda: ["0,1"])
    for name in ("SGLANG_CPU_OMP_THREADS_BIND", "SGLANG_NCCL_SO_PATH"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.INFO)
    resolve("--model-path", str(tiny_checkpoint_dir), "--tp", "2")
    assert os.environ["SGLANG_CPU_OMP_THREADS_BIND"] == "0|1"
    assert os.environ["SGLANG_NCCL_SO_PATH"] == cpu_defaults.NO_NCCL
    [line] = our_log(caplog)
    assert "SGLANG_CPU_OMP_THREADS_BIND=0|1" in line and "SGLANG_NCCL_SO_PATH=" in line


@pytest.fixture
def hf_config(tiny_checkpoint_dir):
    return cpu_defaults.diffusion_gemma_config(str(tiny_checkpoint_dir))
