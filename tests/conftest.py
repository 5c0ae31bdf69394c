import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory):
    """Default-preset tiny DiffusionGemma checkpoint (seed 0), built once per test session."""
    # Imported here so test runs that never use the fixture don't pay for importing transformers.
    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))
