"""srt_patches.apply(): the plugin entry point, its idempotency and its refusal to run half-patched."""

from importlib.metadata import entry_points

import pytest


@pytest.fixture
def hook_registry():
    """sglang's HookRegistry, with its registered hooks restored after the test (re-running apply adds duplicates)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    hooks = {target: list(entries) for target, entries in HookRegistry._hooks.items()}
    patched = set(HookRegistry._patched)
    yield HookRegistry
    HookRegistry._hooks.clear()
    HookRegistry._hooks.update(hooks)
    HookRegistry._patched.clear()
    HookRegistry._patched.update(patched)


def _all_targets(srt_patches):
    return [t for m in srt_patches.PATCH_MODULES for t in m.TARGETS]


def test_entry_point_is_apply():
    """sglang discovers apply() as our `sglang.srt.plugins` entry point."""
    import srt_patches

    [ep] = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "sgl_diffusion"]
    assert ep.load() is srt_patches.apply


def test_apply_registers_the_model(applied):
    """apply() puts DiffusionGemma into sglang's model registry."""
    from sglang.srt.models.registry import ModelRegistry

    from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion

    assert ModelRegistry.models["DiffusionGemmaForBlockDiffusion"] is DiffusionGemmaForBlockDiffusion


def test_apply_installs_every_target(applied):
    """After apply() every target of every patch module is installed."""
    targets = _all_targets(applied)
    assert len(targets) == len(set(targets)) == 54
    assert all(applied.is_installed(t) for t in targets)


def test_apply_twice_keeps_one_wrapper_layer(applied, monkeypatch, hook_registry, resolve, upstream):
    """Calling apply() again, even with its guard reset, leaves the same single wrapper over each original."""
    targets = _all_targets(applied)
    before = {t: resolve(t) for t in targets}
    originals = {t: upstream(t) for t in targets}
    applied.apply()
    monkeypatch.setattr(applied, "_applied", False)
    applied.apply()
    for t in targets:
        assert resolve(t) is before[t], t
        assert upstream(t) is originals[t], t  # upstream() also asserts __wrapped__ holds none of our hooks
    assert applied._applied is True


def test_apply_exits_when_a_target_is_missing(applied, monkeypatch, hook_registry):
    """A target that did not get its wrapper makes apply() raise SystemExit naming it, and stay unapplied."""
    victim = applied.tokenizer_manager.TARGETS[0]
    real = applied.is_installed
    monkeypatch.setattr(applied, "is_installed", lambda t: t != victim and real(t))
    monkeypatch.setattr(applied, "_applied", False)
    with pytest.raises(SystemExit, match=victim.rpartition(".")[2]):
        applied.apply()
    assert applied._applied is False


def test_missing_target_is_not_swallowed_by_load_plugins(applied, monkeypatch, hook_registry):
    """sglang's load_plugins() logs and swallows Exceptions, but our SystemExit still stops the process."""
    import sglang.srt.plugins as plugins

    victim = applied.scheduler.TARGETS[0]
    real = applied.is_installed
    monkeypatch.setattr(applied, "is_installed", lambda t: t != victim and real(t))
    monkeypatch.setattr(applied, "_applied", False)
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    monkeypatch.setattr(plugins, "load_plugins_by_group", lambda *a, **k: {"sgl_diffusion": (applied.apply, None)})
    with pytest.raises(SystemExit):
        plugins.load_plugins()


def test_a_patch_whose_register_fails_is_not_swallowed_by_load_plugins(applied, monkeypatch, hook_registry):
    """A patch module whose register() raises (an upstream key or import gone) stops the process too, instead of
    sglang logging it and serving DiffusionGemma with only the patches registered before it."""
    import sglang.srt.plugins as plugins

    def broken():
        raise KeyError("_serialize_usage")

    monkeypatch.setattr(applied.openai_protocol, "register", broken)
    monkeypatch.setattr(applied, "_applied", False)
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    monkeypatch.setattr(plugins, "load_plugins_by_group", lambda *a, **k: {"sgl_diffusion": (applied.apply, None)})
    with pytest.raises(SystemExit, match="srt_patches.openai_protocol"):
        plugins.load_plugins()


def test_is_installed_is_false_for_an_unpatched_function(applied):
    """is_installed() is False for an sglang function we do not wrap (it is not always True)."""
    assert not applied.is_installed("sglang.srt.managers.scheduler.Scheduler.on_idle")
    assert not applied.is_installed("sglang.srt.entrypoints.openai.protocol.CompletionRequest.model_dump")
