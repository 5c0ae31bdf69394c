"""Which attention backend serves DiffusionGemma: the rule, and sglang's --attention-backend resolved in-process."""

import argparse
import os

import pytest
import torch

from sgl_diffusion.attention import BACKENDS, choose_attention_backend, create_attention_backend
from sgl_diffusion.attention.kv import TorchKVStore
from sgl_diffusion.attention.sdpa import SdpaBackend
from tests.attention import cases


@pytest.mark.parametrize("requested, device, interpreter, expected", [
    (None, "cpu", False, "torch_native"),
    ("torch_native", "cpu", False, "torch_native"),
    ("torch_native", "cuda", False, "torch_native"),
    ("triton", "cuda", False, "triton"),
    ("triton", "cpu", True, "triton"),
    ("flashinfer", "cuda", False, "flashinfer"),
])  # fmt: skip
def test_choice(requested, device, interpreter, expected):
    """An explicit name is honoured where it can run; none gives the SDPA reference off CUDA."""
    assert choose_attention_backend(requested, device, interpreter) == expected


@pytest.mark.parametrize("installed, dtype, expected", [
    (True, None, "flashinfer"), (True, torch.bfloat16, "flashinfer"), (True, torch.float16, "flashinfer"),
    (True, torch.float32, "triton"), (False, torch.bfloat16, "triton"),
])  # fmt: skip
def test_cuda_default_is_flashinfer_else_triton(monkeypatch, installed, dtype, expected):
    """On CUDA the default is FlashInfer, and Triton where flashinfer is not installed or the model is float32
    (FlashInfer 0.7.2 has no float32 kernels: its plan() raised KeyError torch.float32 on the first forward)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if installed else None)
                        if name == "flashinfer" else real(name, *a))  # fmt: skip
    assert choose_attention_backend(None, "cuda", dtype=dtype) == expected


def test_flashinfer_for_a_float32_model_says_what_to_pass():
    with pytest.raises(ValueError, match="no kernels for a torch.float32 model.*--attention-backend triton"):
        choose_attention_backend("flashinfer", "cuda", dtype=torch.float32)
    assert choose_attention_backend("flashinfer", "cuda", dtype=torch.bfloat16) == "flashinfer"



@pytest.mark.parametrize("requested, device, message", [
    ("flashinfer", "cpu", "needs CUDA"),
    ("triton", "cpu", "TRITON_INTERPRET=1"),
    ("fa3", "cuda", "flashinfer, triton, torch_native"),
    ("intel_amx", "cpu", "flashinfer, triton, torch_native"),
])  # fmt: skip
def test_impossible_choice_says_what_to_pass(requested, device, message):
    with pytest.raises(ValueError, match=message):
        choose_attention_backend(requested, device)


def test_created_backends():
    """Each name builds its own backend class (the Triton one without running a kernel)."""
    layers = cases.layers_of([cases.SLIDING, cases.FULL])
    kv = TorchKVStore(8, [(l.num_kv_heads, l.head_dim) for l in layers], torch.float32)
    sdpa = create_attention_backend("torch_native", kv, layers, torch.float32, "cpu")
    assert isinstance(sdpa, SdpaBackend) and sdpa.sliding_window == cases.WINDOW
    from sgl_diffusion.attention.triton import TritonBackend

    assert isinstance(create_attention_backend("triton", kv, layers, torch.float32, "cpu"), TritonBackend)
    assert set(BACKENDS) == {"flashinfer", "triton", "torch_native"}


# ---- sglang's server arguments, resolved in-process as sglang.launch_server resolves them -------------------------


@pytest.fixture
def resolve(tiny_checkpoint_dir, monkeypatch):
    """ServerArgs of ``--model-path <tiny> *argv`` resolved on the CPU; sglang's variables are restored after."""
    import srt_patches
    from sglang.srt.server_args import ServerArgs

    srt_patches.apply()
    saved = dict(os.environ)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def run(*argv):
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        args = parser.parse_args(["--model-path", str(tiny_checkpoint_dir), "--device", "cpu", *argv])
        server_args = ServerArgs.from_cli_args(args)
        server_args.resolve_once()
        return server_args

    yield run
    os.environ.clear()
    os.environ.update(saved)


def test_default_on_the_cpu_is_the_reference(resolve):
    """Without --attention-backend the engine runs SDPA, whatever sglang picks for its own runner: the record
    keeps the raw input (None), which is what the engine reads in the scheduler."""
    from sglang.srt.arg_groups.overrides import resolution_result

    from sgl_diffusion.runtime.scheduler_hook import attention_backend_name

    server_args = resolve()
    assert server_args.attention_backend is None
    assert resolution_result(server_args, "attention_backend") is not None  # sglang's own default, ignored
    assert attention_backend_name(server_args, "cpu") == "torch_native"


def test_flashinfer_on_the_cpu_stops_the_launcher(resolve):
    """--attention-backend flashinfer on the CPU fails while resolving the arguments, before any process starts."""
    with pytest.raises(ValueError, match="flashinfer needs CUDA"):
        resolve("--attention-backend", "flashinfer")


def test_triton_on_the_cpu_needs_the_interpreter(resolve, monkeypatch):
    """--attention-backend triton on the CPU is refused, unless TRITON_INTERPRET=1 (then it is what runs)."""
    from sgl_diffusion.runtime.scheduler_hook import attention_backend_name

    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve("--attention-backend", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention_backend_name(resolve("--attention-backend", "triton"), "cpu") == "triton"


@pytest.mark.parametrize("argv, message", [
    (("--attention-backend", "fa3"), "flashinfer, triton, torch_native"),
    (("--prefill-attention-backend", "torch_native"), "use --attention-backend"),
])  # fmt: skip
def test_other_choices_stop_the_launcher(resolve, argv, message):
    with pytest.raises(ValueError, match=message):
        resolve(*argv)


def test_check_sits_once_at_sglang_attention_step(resolve, monkeypatch):
    """sglang still has an overridable handle_attention_backend_compatibility step, and apply() run again (even with
    its guard reset) leaves our check registered there once."""
    import srt_patches
    from sglang.srt.arg_groups import attention_hook, resolution_hooks

    from sgl_diffusion.runtime import scheduler_hook

    assert attention_hook.handle_attention_backend_compatibility.__name__ == scheduler_hook.ATTENTION_STEP
    assert scheduler_hook.ATTENTION_STEP in resolution_hooks._OVERRIDABLE_HOOKS
    monkeypatch.setattr(srt_patches, "_applied", False)
    srt_patches.apply()
    hooks = resolution_hooks._HOOKS[scheduler_hook.ATTENTION_STEP]
    assert hooks.count(scheduler_hook.check_attention_backend) == 1
