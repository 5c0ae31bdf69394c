"""The FlashInfer backend on the CPU: its plans, run by a torch emulator of FlashInfer 0.7.2, against the SDPA
reference, and every FlashInfer call it makes against the installed 0.7.2 signatures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgl_diffusion.attention import FLASHINFER_DTYPES
from sgl_diffusion.attention.flashinfer import FlashInferBackend
from tests.attention import cases, flashinfer_api, flashinfer_emulator
from tests.attention.cases import LAYOUTS

GEOMETRIES = {"unit": [cases.SLIDING, cases.FULL], "real_head_dims": [cases.SLIDING_256, cases.FULL_512]}
API_DIR = Path(sys.prefix) / "flashinfer-api"  # where scripts/install.sh puts FlashInfer's Python API


def emulated(api, dtype=torch.bfloat16):
    return lambda kv, layers: FlashInferBackend(kv, layers, dtype, "cpu", api=api, workspace_bytes=0)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_mixed_batches_match_sdpa(layout, geometry):
    """Prefill, commit, canvases (context shorter and longer than the window, an empty one, one reading its own
    request's commit of the same forward) and image runs, on the sliding and the full geometry (K = V, head_dim
    512 included), computed from exactly what plan() hands FlashInfer: within 1e-5 of SDPA, KV exact. In float32,
    which FlashInfer has no kernels for, so that a key too many or too few cannot hide in bfloat16's rounding."""
    case = cases.make_case(layout, GEOMETRIES[geometry])
    out_err, kv_err = cases.compare(case, emulated(flashinfer_emulator.api(float32=True), torch.float32))
    assert out_err <= 1e-5 and kv_err == 0, (out_err, kv_err)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_mixed_batches_in_bfloat16_use_only_kernels_flashinfer_has(layout):
    """The same in the dtype a server plans FlashInfer with: every plan, run and merge is one 0.7.2 compiles
    (bfloat16 queries and outputs, contiguous merge inputs), and the outputs are SDPA's within bfloat16 rounding."""
    case = cases.make_case(layout, GEOMETRIES["real_head_dims"], dtype=torch.bfloat16)
    out_err, kv_err = cases.compare(case, emulated(flashinfer_emulator.api()))
    assert out_err <= 3e-2 and kv_err == 0, (out_err, kv_err)


def test_one_plan_per_forward_and_dense_masks_only_for_images():
    """plan() plans every wrapper once (4 per geometry for a mixed batch); forward() only runs them (5 launches
    per layer: encode, image, canvas ragged + paged prefix, merge); the only
    custom mask is the image prefill's [n, P' + n]; sm_scale is 1 and windows are W - 1 on causal sliding plans."""
    api = flashinfer_emulator.api()
    case = cases.make_case("mixed", GEOMETRIES["unit"], dtype=torch.bfloat16)
    kv = case.kv
    backend = emulated(api)(kv, case.layers)
    backend.plan(case.batch)
    plans = [a for name, a in api.calls if name.endswith(".plan")]
    assert len(plans) == 2 * 4 and len(api.calls) == len(plans)
    image = next(s for s in case.batch.segments if s.image_runs)
    for a in plans:
        assert a["sm_scale"] == 1.0
        if a["custom_mask"] is not None:
            sliding = a["num_kv_heads"] == cases.SLIDING.kv_heads
            visible = min(image.start_pos, cases.WINDOW - 1) if sliding else image.start_pos
            assert a["custom_mask"].numel() == image.num_tokens * (visible + image.num_tokens)
        elif a["causal"]:
            assert a["window_left"] == (cases.WINDOW - 1 if a["head_dim_qk"] == cases.SLIDING.head_dim else -1)
        else:
            assert a["window_left"] == -1
    for layer, (q, k, v) in zip(case.layers, case.qkv):
        backend.forward(q, k, v, layer, case.batch)
    assert not [name for name, _ in api.calls[len(plans):] if name.endswith(".plan")]
    runs = [name.split(".")[-1] for name, _ in api.calls[len(plans) :]]
    assert runs == ["run", "run", "run", "run", "merge_state_in_place"] * len(case.layers)  # encode, image, canvas x 2


def test_canvas_own_kv_is_planned_in_the_model_dtype_over_an_fp8_pool():
    """With an fp8 KV pool the paged plans declare fp8 and the ragged canvas plan the model's dtype: the canvas's
    own K/V are never written to the pool."""
    api = flashinfer_emulator.api()
    case = cases.make_case("mixed", GEOMETRIES["unit"], dtype=torch.bfloat16)
    pool_buffers = case.kv.buffers
    case.kv.buffers = lambda layer: tuple(b.to(torch.float8_e4m3fn) for b in pool_buffers(layer))
    emulated(api)(case.kv, case.layers).plan(case.batch)
    dtypes = {(name.split(".")[0], a["kv_data_type"]) for name, a in api.calls if name.endswith(".plan")}
    assert dtypes == {("BatchPrefillWithPagedKVCacheWrapper", torch.float8_e4m3fn),
                      ("BatchPrefillWithRaggedKVCacheWrapper", torch.bfloat16)}, dtypes


def test_forward_never_syncs_the_host():
    """Per layer, the backend itself reads no tensor value on the host (no .item(), .tolist(), boolean indexing)."""
    case = cases.make_case("mixed", GEOMETRIES["unit"], dtype=torch.bfloat16)
    backend = emulated(flashinfer_emulator.api())(case.kv, case.layers)
    backend.plan(case.batch)
    with cases.HostSyncs(paused=lambda: flashinfer_emulator.INSIDE > 0) as syncs:
        for layer, (q, k, v) in zip(case.layers, case.qkv):
            backend.forward(q, k, v, layer, case.batch)
    assert syncs.seen == []


def test_pinned_signatures_are_flashinfer_0_7_2():
    """The signatures the emulator binds every call against are those of the installed flashinfer-python 0.7.2
    (read in a child process: FlashInfer never loads into this one)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(API_DIR), os.environ.get("PYTHONPATH")]))}
    script = (
        "import inspect, json, flashinfer\n"
        "out = {'version': flashinfer.__version__}\n"
        f"for name in {sorted(flashinfer_api.PINNED)!r}:\n"
        "    obj = flashinfer\n"
        "    for part in name.split('.'): obj = getattr(obj, part)\n"
        "    out[name] = [(p.name, p.kind.name, None if p.default is p.empty else repr(p.default),\n"
        "                  p.default is p.empty) for p in inspect.signature(obj).parameters.values()]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"flashinfer-python 0.7.2 is not importable ({proc.stderr.strip().splitlines()[-1:]}); "
        f"install its API: pip install -U --no-deps --target {API_DIR} -r requirements/flashinfer-api.txt"
    )
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    assert real.pop("version") == "0.7.2"
    for name in flashinfer_api.PINNED:
        pinned = [(n, kind.name, None if default is flashinfer_api.REQUIRED else repr(default),
                   default is flashinfer_api.REQUIRED) for n, kind, default in flashinfer_api.PINNED[name]]  # fmt: skip
        assert [tuple(p) for p in real[name]] == pinned, name


def test_flashinfer_has_kernels_for_the_emulators_dtypes_only():
    """Why a float32 model leaves FlashInfer (attention.choose_attention_backend) and the emulator refuses float32:
    the installed 0.7.2's kernel name table (flashinfer.jit.utils, read in a child process) has the query dtypes
    FLASHINFER_DTYPES and the emulator's, and no float32 (plan() raised KeyError torch.float32)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(API_DIR), os.environ.get("PYTHONPATH")]))}
    script = "import flashinfer.jit.utils as u\nprint(sorted(str(d) for d in u.filename_safe_dtype_map))\n"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]
    compiled = set(json.loads(proc.stdout.strip().splitlines()[-1].replace("'", '"')))
    assert "torch.float32" not in compiled
    assert {f"torch.{name}" for name in FLASHINFER_DTYPES} == {str(d) for d in flashinfer_emulator.Q_DTYPES}
    assert {str(d) for d in flashinfer_emulator.KV_DTYPES} <= compiled


def test_the_emulator_refuses_a_plan_flashinfer_has_no_kernel_for():
    """A float32 model's plan fails in the emulator as in FlashInfer (plan() raised KeyError torch.float32), so an
    emulated run cannot vouch for what no kernel runs; api(float32=True) lifts it for precision checks only."""
    case = cases.make_case("mixed", GEOMETRIES["unit"])
    with pytest.raises(AssertionError, match="no torch.float32 kernels"):
        emulated(flashinfer_emulator.api(), torch.float32)(case.kv, case.layers).plan(case.batch)
    emulated(flashinfer_emulator.api(float32=True), torch.float32)(case.kv, case.layers).plan(case.batch)
