import argparse
import inspect
from inspect import Parameter
from types import SimpleNamespace

import pytest
import torch

from srt_patches import scheduler

EMPTY = Parameter.empty
_S = "sglang.srt.managers.scheduler.Scheduler"
# The loop dispatcher must take only the scheduler (run_event_loop gets it alone); the idle/in-flight queries
# keep their exact parameters because the wrappers forward them and combine the results.
_DISPATCH = "sglang.srt.managers.scheduler._dispatch_event_loop_once"
EXPECTED_PARAMETERS = {
    _DISPATCH: [("scheduler", EMPTY)],
    f"{_S}.collect_inflight_reqs": [("self", EMPTY)],
    f"{_S}.is_fully_idle": [("self", EMPTY), ("for_health_check", False), ("ignore_waiting", False)],
    f"{_S}.pause_generation": [("self", EMPTY), ("recv_req", EMPTY)],
}
DIFFUSION_HF = SimpleNamespace(architectures=["DiffusionGemmaForBlockDiffusion"])
OTHER_HF = SimpleNamespace(architectures=["LlamaForCausalLM"])


class FakePolicy:
    def __init__(self, holding_kv: bool):
        self.holding_kv, self.retracted = holding_kv, 0

    def holds_kv(self) -> bool:
        return self.holding_kv

    def retract(self) -> None:
        self.retracted += 1


class FakeEngine:
    def __init__(self, reqs=(), holding_kv=None):
        self.reqs = list(reqs)
        self.policy = FakePolicy(bool(self.reqs) if holding_kv is None else holding_kv)

    def has_work(self) -> bool:
        return bool(self.reqs)


class Original:
    """A fake original: records its arguments, returns a fixed value."""

    def __init__(self, value=None):
        self.value = value
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.value


@pytest.fixture
def run_event_loop(monkeypatch):
    """Replaces sgl_diffusion's event loop with a recorder of the schedulers it is given."""
    from sgl_diffusion.runtime import scheduler_hook

    calls = []
    monkeypatch.setattr(scheduler_hook, "run_event_loop", lambda s, *a, **k: calls.append((s, a, k)) or "ran")
    monkeypatch.setattr(scheduler_hook, "check_supported", lambda s: None)
    return calls


def _scheduler(hf_config=DIFFUSION_HF, **attrs):
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config), **attrs)


def test_every_target_has_an_expected_signature():
    """Each target the module declares is covered by the signature table of this file."""
    assert set(scheduler.TARGETS) == set(EXPECTED_PARAMETERS)


@pytest.mark.parametrize("target", scheduler.TARGETS)
def test_upstream_signature(target, upstream_parameters):
    """The upstream method still has exactly the parameters the wrapper relies on."""
    assert upstream_parameters(target) == EXPECTED_PARAMETERS[target]


@pytest.mark.parametrize("target", scheduler.TARGETS)
def test_installed(target, applied):
    """apply() leaves our wrapper on the target."""
    assert applied.is_installed(target)


def test_event_loop_keeps_sglang_loop_for_other_models(run_event_loop):
    """For a non-diffusion model the wrapper runs the original loop and never ours."""
    original = Original("upstream")
    fake = _scheduler(OTHER_HF)
    assert scheduler.event_loop(original, fake) == "upstream"
    assert original.calls == [((fake,), {})] and run_event_loop == []


def test_event_loop_runs_canvas_loop_for_diffusion_gemma(run_event_loop):
    """For DiffusionGemma the wrapper runs sgl_diffusion's loop on the scheduler and not the original."""
    original = Original("upstream")
    fake = _scheduler(DIFFUSION_HF)
    assert scheduler.event_loop(original, fake) == "ran"
    assert original.calls == [] and run_event_loop == [(fake, (), {})]


def test_installed_dispatch_runs_canvas_loop(applied, run_event_loop):
    """sglang's dispatch_event_loop, as installed, hands a DiffusionGemma scheduler to our loop."""
    from sglang.srt.managers import scheduler as upstream

    fake = _scheduler(DIFFUSION_HF, server_args=SimpleNamespace(enable_pd_role_switch=False))
    upstream.dispatch_event_loop(fake)
    assert run_event_loop == [(fake, (), {})]


def test_unsupported_modes_refused_at_startup():
    """PD disaggregation, pipeline parallelism, PD multiplexing, LoRA adapters, speculative decoding, the
    hierarchical KV cache, sglang's own dLLM loop, KV pages of more than one token, one KV pool for all layers, a
    quantized KV cache and streaming sessions stop the scheduler with a clear error; the flags checked are the ones sglang sets."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import get_kv_cache_quant_method
    from sglang.srt.managers import scheduler as sglang_scheduler
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sgl_diffusion.runtime.scheduler_hook import PLAIN_KV_CACHE_DTYPES, check_supported

    plain_pool = MHATokenToKVPool(16, 1, torch.float32, 2, 8, 2, "cpu", False)
    served = {"pp_size": 1, "kv_cache_dtype": "auto", "disable_hybrid_swa_memory": False, "dllm_algorithm": None,
              "enable_streaming_session": False, "enable_watermark": False}

    def modes(pool=plain_pool, args=None, **changed):
        return SimpleNamespace(**({"disaggregation_mode": DisaggregationMode.NULL, "enable_pdmux": False,
                                   "enable_lora": False, "spec_algorithm": SpeculativeAlgorithm.from_string(None),
                                   "enable_hierarchical_cache": False, "page_size": 1,
                                   "server_args": SimpleNamespace(**(served | (args or {}))),
                                   "token_to_kv_pool_allocator": SimpleNamespace(get_kvcache=lambda: pool)}
                                  | changed))

    refused = [
        ("PD disaggregation", modes(disaggregation_mode=DisaggregationMode.PREFILL)),
        ("pipeline parallelism", modes(args={"pp_size": 2})),
        ("PD multiplexing", modes(enable_pdmux=True)),
        ("LoRA adapters", modes(enable_lora=True)),
        ("speculative decoding", modes(spec_algorithm=SpeculativeAlgorithm.from_string("NGRAM"))),
        ("hierarchical KV cache", modes(enable_hierarchical_cache=True)),
        (r"KV pages of 16 tokens \(--page-size; 1 works\)", modes(page_size=16)),
        (r"sglang's dLLM loop \(--dllm-algorithm", modes(args={"dllm_algorithm": "LowConfidence"})),
        ("--disable-hybrid-swa-memory", modes(args={"disable_hybrid_swa_memory": True})),
        (r"streaming sessions \(--enable-streaming-session", modes(args={"enable_streaming_session": True})),
        (r"watermarking \(--enable-watermark\)", modes(args={"enable_watermark": True})),
    ]
    for message, scheduler in refused:
        with pytest.raises(RuntimeError, match=message):
            check_supported(scheduler)
    # a pool with a KV quant method hands out dequantized copies: K written into one never reaches the cache
    fp4 = get_kv_cache_quant_method("fp4_mx_block16", num_layers=2, device="cpu", page_size=1)
    quantized = MHATokenToKVPool(16, 1, torch.float4_e2m1fn_x2, 2, 32, 2, "cpu", False, quant_method=fp4)
    quantized.get_key_buffer(0)[3] = 1.0
    assert not (quantized.get_key_buffer(0)[3] == 1).all()
    with pytest.raises(RuntimeError, match=r"quantized KV cache \(--kv-cache-dtype auto\)"):
        check_supported(modes(pool=quantized))  # the pool decides, whatever the flag says
    # every --kv-cache-dtype sglang offers: the plain ones pass, the block-scaled and packed ones are refused
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    choices = next(a.choices for a in parser._actions if "--kv-cache-dtype" in a.option_strings)
    assert set(PLAIN_KV_CACHE_DTYPES) < set(choices)
    for choice in choices:
        if choice in PLAIN_KV_CACHE_DTYPES:
            check_supported(modes(args={"kv_cache_dtype": choice}))
        else:
            with pytest.raises(RuntimeError, match=f"quantized KV cache \\(--kv-cache-dtype {choice}\\)"):
                check_supported(modes(args={"kv_cache_dtype": choice}))
    check_supported(modes())
    source = inspect.getsource(sglang_scheduler.Scheduler)
    for flag in ("disaggregation_mode", "enable_pdmux", "enable_lora", "spec_algorithm", "enable_hierarchical_cache",
                 "page_size"):
        assert f"self.{flag} = " in source
    assert set(served) <= {a.dest for a in parser._actions}


def test_collect_inflight_reqs_adds_engine_reqs():
    """In-flight requests are sglang's plus the canvas engine's; without an engine, sglang's alone."""
    original = Original({"a", "b"})
    with_engine = _scheduler(diffusion_engine=FakeEngine(["b", "c"]))
    assert scheduler.collect_inflight_reqs(original, with_engine) == {"a", "b", "c"}
    assert scheduler.collect_inflight_reqs(original, _scheduler()) == {"a", "b"}
    assert scheduler.collect_inflight_reqs(original, _scheduler(diffusion_engine=FakeEngine())) == {"a", "b"}


def test_installed_collect_inflight_reqs(applied):
    """Scheduler.collect_inflight_reqs, as installed, returns sglang's batch reqs plus the engine's."""
    from sglang.srt.managers.scheduler import Scheduler

    fake = _scheduler(
        diffusion_engine=FakeEngine(["canvas-req"]),
        _collect_inflight_batches=lambda: [SimpleNamespace(reqs=["batch-req"]), None],
    )
    assert Scheduler.collect_inflight_reqs(fake) == {"batch-req", "canvas-req"}


@pytest.mark.parametrize(
    "upstream_idle, engine, idle",
    [(True, None, True), (False, None, False), (True, FakeEngine(), True), (True, FakeEngine(["r"]), False),
     (False, FakeEngine(), False), (False, FakeEngine(["r"]), False)],
)  # fmt: skip
def test_is_fully_idle_requires_idle_engine(upstream_idle, engine, idle):
    """Fully idle means sglang is idle and the canvas engine (if any) has no work."""
    original = Original(upstream_idle)
    fake = _scheduler(**({} if engine is None else {"diffusion_engine": engine}))
    assert scheduler.is_fully_idle(original, fake) is idle


def test_is_fully_idle_forwards_arguments():
    """for_health_check / ignore_waiting reach the original unchanged."""
    original = Original(True)
    fake = _scheduler(diffusion_engine=FakeEngine())
    scheduler.is_fully_idle(original, fake, for_health_check=True)
    scheduler.is_fully_idle(original, fake, False, ignore_waiting=True)
    assert original.calls == [((fake, True, False), {}), ((fake, False, True), {})]


@pytest.mark.parametrize("holding_kv, ignore_waiting, idle",
                         [(False, True, True), (True, True, False), (False, False, False)])  # fmt: skip
def test_a_paused_flush_waits_only_for_requests_that_hold_kv(holding_kv, ignore_waiting, idle):
    """sglang flushes a paused server (ignore_waiting: retracted requests wait in its queue, holding no KV) after a
    weight update: our running requests count as waiting once a retract gave their KV back."""
    fake = _scheduler(diffusion_engine=FakeEngine(["r"], holding_kv=holding_kv))
    assert scheduler.is_fully_idle(Original(True), fake, ignore_waiting=ignore_waiting) is idle


@pytest.mark.parametrize("mode, retracts", [("retract", 1), ("in_place", 0)])
def test_a_retracting_pause_retracts_the_canvas_requests(mode, retracts):
    """pause_generation runs sglang's pause, then (mode "retract" only) the engine's retract."""
    original, engine = Original(), FakeEngine(["r"])
    fake, req = _scheduler(diffusion_engine=engine), SimpleNamespace(mode=mode)
    scheduler.pause_generation(original, fake, req)
    assert original.calls == [((fake, req), {})] and engine.policy.retracted == retracts
    scheduler.pause_generation(original, _scheduler(), req)  # another model: sglang's pause only


@pytest.mark.parametrize(
    "target, hook",
    [(_DISPATCH, scheduler.event_loop),
     (f"{_S}.collect_inflight_reqs", scheduler.collect_inflight_reqs),
     (f"{_S}.is_fully_idle", scheduler.is_fully_idle),
     (f"{_S}.pause_generation", scheduler.pause_generation)],
)  # fmt: skip
def test_each_target_wears_its_own_hook(applied, resolve, target, hook):
    """The wrapper installed on each target calls the hook meant for it (not another target's)."""
    cells = [c.cell_contents for c in resolve(target).__closure__]
    assert hook in cells
