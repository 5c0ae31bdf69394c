import pytest


@pytest.fixture(scope="module")
def model():
    """Our model with the default tiny preset's weights (seed 0), as transformers builds them."""
    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_model
    from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion

    hf = build_tiny_model(0, "default")
    ours = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    ours.load_weights(hf.state_dict().items())
    return ours
