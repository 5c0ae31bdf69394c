"""The Triton backend (sglang's extend kernel) against the SDPA reference, run by the Triton interpreter in float32.

The interpreter runs in a child process (interpreter.py); the interpreter's bf16 ``tl.dot`` is broken, so nothing
here says anything about bf16 on a GPU.
"""

import pytest

from tests.attention import cases, triton_checks
from tests.attention.cases import LAYOUTS


def planned(layout: str):
    """(backend, case) with the Triton backend planned for the case (no kernel runs)."""
    case = cases.make_case(layout, triton_checks.GEOMETRIES["unit"])
    backend = triton_checks.triton_backend(case.kv, case.layers)
    backend.plan(case.batch)
    return backend, case


def test_plan_uses_causal_and_window_flags_and_masks_only_image_segments():
    """Per geometry one launch per kind: encodes causal with window W - 1 on sliding layers (no mask, however long
    the prompt), canvases non-causal without a window, and a [n, P' + n] mask only for the image prefill."""
    backend, case = planned("mixed")
    image = next(s for s in case.batch.segments if s.image_runs)
    for group, plan in zip(backend.groups, case.batch.attn_metadata.groups):
        calls = {call.kind: call for call in plan.calls}
        assert list(calls) == ["encode", "image", "canvas"]
        sliding = group.window is not None
        assert calls["encode"].causal and calls["encode"].custom_mask is None
        assert calls["encode"].window == (cases.WINDOW - 1 if sliding else -1)
        assert not calls["canvas"].causal and calls["canvas"].window == -1 and calls["canvas"].custom_mask is None
        visible = min(image.start_pos, cases.WINDOW - 1) if sliding else image.start_pos
        assert calls["image"].custom_mask.numel() == image.num_tokens * (visible + image.num_tokens)
        assert not calls["image"].causal and calls["image"].window == -1


def test_forward_never_syncs_the_host():
    """Per layer, the backend reads no tensor value on the host (the kernel itself stubbed out)."""
    backend, case = planned("mixed")
    backend.kernel = lambda q, k, v, o, *args, **kwargs: o.zero_()
    with cases.HostSyncs() as syncs:
        for layer, (q, k, v) in zip(case.layers, case.qkv):
            backend.forward(q, k, v, layer, case.batch)
    assert syncs.seen == []


@pytest.mark.triton_interpret
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_mixed_batches_match_sdpa(interpreted, layout):
    """Prefill, commit, canvases (context shorter and longer than the window, an empty one, a canvas reading its
    own request's commit of the same forward) and image runs longer than the window, on a sliding (GQA 2:1) and
    a full (GQA 4:1, K = V) geometry, two layers each: outputs within 1e-5 and the written KV exact."""
    out_err, kv_err = interpreted(triton_checks.kernel_errors, layout, "unit")
    assert out_err <= 1e-5 and kv_err == 0, (out_err, kv_err)


@pytest.mark.triton_interpret
def test_real_head_dims_match_sdpa(interpreted):
    """The mixed batch at DiffusionGemma's head dims: 256 (sliding) and 512 with K = V (full)."""
    out_err, kv_err = interpreted(triton_checks.kernel_errors, "mixed", "real_head_dims")
    assert out_err <= 1e-5 and kv_err == 0, (out_err, kv_err)


@pytest.mark.triton_interpret
def test_tiny_checkpoint_mixed_forward_matches_sdpa(interpreted):
    """The whole tiny model through the Triton backend: a prefill, then one mixed forward (commit + next canvas,
    image prefill + its canvas, a canvas after an empty prompt): logits and KV within 1e-4 of the SDPA backend."""
    errors = interpreted(triton_checks.model_errors)
    assert max(errors.values()) <= 1e-4, errors
