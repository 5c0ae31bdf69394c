"""Fixtures shared by the patch tests (fixtures, not importable helpers: tests/conftest.py is also named conftest)."""

import inspect
import pkgutil

import pytest


def _resolve(target: str):
    owner, _, name = target.rpartition(".")
    return getattr(pkgutil.resolve_name(owner), name)


def _holds_our_hook(fn) -> bool:
    cells = getattr(fn, "__closure__", None) or ()
    return any(getattr(c.cell_contents, "__module__", "").startswith("srt_patches.") for c in cells)


def _upstream(target: str):
    installed = _resolve(target)
    assert _holds_our_hook(installed), f"{target} is not wrapped by srt_patches"
    original = installed.__wrapped__
    assert not _holds_our_hook(original), f"{target} is wrapped by srt_patches more than once"
    return original


def _parameters(target: str) -> list[tuple[str, object]]:
    # inspect.signature follows upstream decorators' __wrapped__ (e.g. DynamicGradMode): the signature callers see.
    return [(p.name, p.default) for p in inspect.signature(_upstream(target)).parameters.values()]


@pytest.fixture(scope="module")
def applied():
    """srt_patches after apply(); the first call imports sglang's model registry (~10 s), later calls return at once."""
    import srt_patches

    srt_patches.apply()
    return srt_patches


@pytest.fixture
def resolve():
    """resolve(target): the attribute a dotted target names, resolved as HookRegistry and is_installed do."""
    return _resolve


@pytest.fixture
def holds_our_hook():
    """holds_our_hook(fn): fn is a HookRegistry wrapper whose closure holds a hook from srt_patches."""
    return _holds_our_hook


@pytest.fixture
def upstream(applied):
    """upstream(target): the sglang function under our one wrapper layer on target."""
    return _upstream


@pytest.fixture
def upstream_parameters(applied):
    """upstream_parameters(target): [(name, default), ...] of the upstream function (inspect.empty: no default)."""
    return _parameters
