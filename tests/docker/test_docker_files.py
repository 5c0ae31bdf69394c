"""docker/: the Dockerfiles' stages and pins, docker/memory.py against a hand count of the real checkpoint, and the
FlashInfer warm-up's plans at the real geometry (no docker, no GPU)."""

import copy
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from sgl_diffusion.attention import flashinfer_warmup as warmup
from tests.attention import flashinfer_emulator

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SGLANG_VERSION = "0.5.23"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, args = pending.strip().partition(" ")
            out.append((word.upper(), args.strip()))
        pending = ""
    return out


def stages(path: Path) -> tuple[dict[str, str], list[tuple[str, str, list[tuple[str, str]]]]]:
    """(global ARG defaults, [(stage name, FROM image, its instructions)])."""
    args, result = {}, []
    for word, rest in instructions(path):
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            result.append((name, parts[0], []))
        elif not result and word == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default.strip('"')
        elif result:
            result[-1][2].append((word, rest))
    return args, result


def runs(body) -> str:
    return "\n".join(rest for word, rest in body if word == "RUN")


def test_cuda_image_is_sglang_0_5_23_runtime_with_our_wheel_and_warm_kernels():
    args, parsed = stages(DOCKER / "Dockerfile")
    assert args["SGLANG_IMAGE"] == f"lmsysorg/sglang:v{SGLANG_VERSION}-runtime"
    assert [(name, image) for name, image, _ in parsed] == [("wheel", "${SGLANG_IMAGE}"),
                                                           ("runtime", "${SGLANG_IMAGE}")]
    wheel, runtime = parsed[0][2], parsed[1][2]
    assert "pip wheel --no-deps --wheel-dir /wheels ." in runs(wheel)
    assert ("COPY", "--from=wheel /wheels /tmp/wheels") in runtime
    run = runs(runtime)
    assert "pip install --no-cache-dir --no-deps /tmp/wheels/*.whl" in run  # sglang's stack stays as shipped
    assert "entry_points(group='sglang.srt.plugins')" in run
    assert "-m sgl_diffusion.attention.flashinfer_warmup --compile-only" in run
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert 'FLASHINFER_CUDA_ARCH_LIST="${CUDA_ARCHS}"' in env  # the server looks in the cache dir the build filled
    cmd = json.loads(next(rest for word, rest in runtime if word == "CMD"))
    assert cmd[:3] == ["python3", "-m", "sglang.launch_server"] and "0.0.0.0" in cmd
    # the wheel stage copies only what the dockerignore lets through
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for word, rest in wheel:
        if word == "COPY":
            for src in rest.split()[:-1]:
                assert f"!{src}" in ignore, src


def test_the_pins_agree_with_the_package():
    """The image's sglang is the one pyproject pins; the av pin is sglang 0.5.23's."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"sglang=={SGLANG_VERSION}"' in pyproject
    from importlib.metadata import requires, version

    assert version("sglang") == SGLANG_VERSION  # the installed one (read without importing sglang: 5 s)
    assert any(r.startswith("av==16.1.0") for r in requires("sglang"))
    assert "av==16.1.0" in runs(stages(DOCKER / "Dockerfile")[1][1][2])


def test_cpu_image_installs_like_the_readme_and_serves_the_tiny_checkpoint():
    _, parsed = stages(DOCKER / "Dockerfile.cpu")
    assert [(name, image) for name, image, _ in parsed] == [("cpu", "python:3.11-slim")]
    body = parsed[0][2]
    run = runs(body)
    assert "bash scripts/install.sh" in run
    assert ".venv/bin/python -m sgl_diffusion.entrypoints.tiny_checkpoint /models/dg-tiny" in run
    cmd = json.loads(next(rest for word, rest in body if word == "CMD"))
    assert cmd == ["python", "-m", "sglang.launch_server", "--model-path", "/models/dg-tiny", "--host", "0.0.0.0"]
    assert ("ENV", "PATH=/opt/sgl-diffusion/.venv/bin:$PATH") in body  # `python` is the venv's
    ignored = (DOCKER / "Dockerfile.cpu.dockerignore").read_text().split()
    assert ".venv" in ignored and "scripts" not in ignored and "sgl_diffusion" not in ignored


def test_readme_commands_use_the_images():
    text = (DOCKER / "README.md").read_text()
    for needle in ("-f docker/Dockerfile ", "-f docker/Dockerfile.cpu ", "--gpus", "--tp 2", "python docker/memory.py"):
        assert needle in text, needle
    assert "(docker/README.md)" in (ROOT / "README.md").read_text()


def test_every_documented_curl_with_a_body_sends_json():
    """sglang's endpoints read a JSON body only as application/json: curl's default form encoding is a 422."""
    for doc in (ROOT / "README.md", DOCKER / "README.md"):
        commands = doc.read_text().replace("\\\n", " ").splitlines()
        posts = [line for line in commands if "curl " in line and " -d " in line]
        assert posts, doc
        assert not [line for line in posts if "Content-Type: application/json" not in line], doc


# ---- memory ---------------------------------------------------------------------------------------------------


def load_memory():
    spec = importlib.util.spec_from_file_location("docker_memory", DOCKER / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def hand_count() -> dict:
    """The real checkpoint's parameters from its weight shapes (reference/diffusiongemma_arch.md section 2)."""
    h, inter, moe, experts, vocab = 2816, 2112, 704, 128, 262144
    sliding_attn = 4096 * h + 2 * 2048 * h + h * 4096 + 2 * 256  # q, k, v, o, q/k norms
    full_attn = 8192 * h + 1024 * h + h * 8192 + 2 * 512  # no v_proj
    mlp = 2 * inter * h + h * inter
    router = experts * h + h + experts  # proj, scale, per_expert_scale
    routed = experts * 2 * moe * h + experts * h * moe  # gate_up_proj, down_proj
    norms = 7 * h
    layers = 25 * (sliding_attn + mlp + router + routed + norms) + 5 * (full_attn + mlp + router + routed + norms)
    text = layers + vocab * h + h + (h + 3 * inter * h)  # + tied embedding, final norm, self-conditioning
    vision = 569_548_080 + 1152 * h  # tower (transformers, meta device) + embed_vision
    linear = (25 * (sliding_attn - 512) + 5 * (full_attn - 1024) + 30 * (mlp + routed)) + 3 * inter * h
    return {"total": text + vision, "linear": linear, "text": text}


def test_memory_numbers_equal_a_hand_count_of_the_real_checkpoint():
    memory = load_memory()
    arch, vision = memory.real_arch()
    p = memory.params(arch, vision)
    hand = hand_count()
    assert p.total == hand["total"] == 25_823_778_864  # transformers' meta-device count of the full model
    assert p.text_linear == hand["linear"]
    assert memory.weight_bytes(p, fp8=False) == 2 * hand["total"]  # 51.6 GB
    routed = 30 * 128 * 3 * 2816 * 704  # layers x experts x (gate, up, down) x hidden x moe_intermediate
    assert p.experts == routed
    # fp8: every text linear layer at 1 byte, the routed experts included (27.1 GB)
    assert memory.weight_bytes(p, fp8=True) == hand["linear"] + 2 * (hand["total"] - hand["linear"])
    # KV per token, bf16: K and V of every layer kind (full layers store the normed K and the rotated K apart)
    assert memory.kv_bytes_per_token(arch) == (5 * 2 * 2 * 512 * 2, 25 * 2 * 8 * 256 * 2) == (20480, 204800)
    assert memory.kv_bytes_per_token(arch, tp=2) == (5 * 2 * 1 * 512 * 2, 25 * 2 * 4 * 256 * 2)
    assert memory.kv_bytes_per_token(arch, tp=4) == (5 * 2 * 1 * 512 * 2, 25 * 2 * 2 * 256 * 2)  # full replicated
    margin = memory.margin_bytes(arch, canvases=8, fixed_gib=4, logit_buffers=3)
    assert margin == 4 * 2**30 + 8 * 3 * 256 * 262144 * 4
    r = memory.room(arch, p, "H100 80GB", 1, False, margin, 8192)
    assert r.kv_room == 81559 * 2**20 - 2 * hand["total"] - margin
    # sglang's hybrid SWA pool: each full-layer token brings 0.8 sliding-layer tokens (its default ratio)
    assert r.full_tokens == int(r.kv_room // (20480 + 0.8 * 204800))
    assert r.requests == pytest.approx(min(r.full_tokens / 8192, 0.8 * r.full_tokens / 1024))
    # at ratio window / context, the sliding layers hold exactly each request's window
    assert r.best_requests == pytest.approx(r.kv_room / (20480 * 8192 + 204800 * 1024), rel=1e-5)
    r2 = memory.room(arch, p, "H100 80GB", 2, False, margin, 8192)
    sharded = 2 * (hand["linear"] + 262144 * 2816)
    assert r2.weights == sharded // 2 + 2 * (hand["total"] - hand["linear"] - 262144 * 2816)


def test_memory_uses_sglang_s_swa_ratio_fallback():
    """The pool split memory.py assumes is sglang 0.5.23's --swa-full-tokens-ratio fallback (read, not imported)."""
    root = Path(importlib.util.find_spec("sglang").submodule_search_locations[0])
    source = (root / "srt/arg_groups/fields/schedule.py").read_text()
    field = source[source.index("swa_full_tokens_ratio: A["):]
    assert f"fallback={load_memory().SGLANG_SWA_RATIO}," in field[: field.index("] = None")]


def test_memory_reads_a_config_json():
    memory = load_memory()
    arch, vision = memory.from_config(str(ROOT / "sgl_diffusion/entrypoints/trained_tiny/config.json"))
    text = json.loads((ROOT / "sgl_diffusion/entrypoints/trained_tiny/config.json").read_text())["text_config"]
    assert (arch.hidden, arch.layers, arch.window) == (text["hidden_size"], text["num_hidden_layers"],
                                                       text["sliding_window"])  # fmt: skip
    assert memory.params(arch, vision).total > 0


# ---- the FlashInfer warm-up --------------------------------------------------------------------------------------


def test_warmup_plans_every_wrapper_at_the_real_geometry():
    """At the real geometry (16 query heads; 256 x 8 KV heads windowed 1024; 512 x 2 KV heads) and bf16, each geometry
    plans an encode (causal, window W - 1 on sliding layers), an image prefill (custom mask), the canvases' own
    K/V (ragged) and their prefixes (paged)."""
    plans = warmup.plan_calls()
    got = {(p.wrapper, p.num_qo_heads, p.num_kv_heads, p.head_dim, p.causal, p.window_left, p.custom_mask)
           for p in plans}  # fmt: skip
    expected = set()
    for kv, d, window_left in ((8, 256, 1023), (2, 512, -1)):
        expected |= {("paged", 16, kv, d, True, window_left, False), ("paged", 16, kv, d, False, -1, True),
                     ("ragged", 16, kv, d, False, -1, False), ("paged", 16, kv, d, False, -1, False)}  # fmt: skip
    assert got == expected and len(plans) == 8
    assert {(p.q_dtype, p.kv_dtype) for p in plans} == {(torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("archs, fa3", [({9}, True), ({10}, False), ({9, 10}, True)])
def test_warmup_modules_per_architecture(archs, fa3):
    """The head_dim 512 layers need one FA2 module (no window); the 256 ones FA2 with and without the window flag,
    plus FA3 for the ragged canvas wrapper on Hopper."""
    modules = {(m.backend, m.head_dim, m.sliding_window) for m in warmup.jit_modules(warmup.plan_calls(), archs)}
    expected = {("fa2", 256, True), ("fa2", 256, False), ("fa2", 512, False)}
    expected |= {("fa3", 256, False)} if fa3 else set()
    assert modules == expected


def test_compile_only_builds_each_module_with_flashinfer_s_arguments(monkeypatch):
    """With flashinfer's JIT generators stubbed: one spec per module, built, with get_batch_prefill_module's
    argument order (q, kv, o dtypes, int32 indices, head dims, no RoPE, window flag, no soft cap, no fp16 QK)."""
    built = []

    def spec(kind):
        def gen(*args):
            return types.SimpleNamespace(name=f"{kind}{args}", build=lambda: built.append((kind, args)))

        return gen

    stub = types.ModuleType("stub")
    stub._gen_batch_prefill_primary_module, stub.gen_batch_prefill_module = spec("primary"), spec("full")
    stub.gen_cascade_module = spec("cascade")
    for name in ("flashinfer", "flashinfer.jit", "flashinfer.jit.attention", "flashinfer.jit.attention.modules",
                 "flashinfer.jit.cascade"):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, stub)
    modules = warmup.jit_modules(warmup.plan_calls(), {9})
    warmup.compile_only(modules)
    bf16 = torch.bfloat16
    assert built[0] == ("cascade", ())
    assert set(built[1:]) == {
        ("primary", ("fa2", bf16, bf16, bf16, torch.int32, 256, 256, 0, True, False, False)),
        ("primary", ("fa2", bf16, bf16, bf16, torch.int32, 256, 256, 0, False, False, False)),
        ("full", ("fa3", bf16, bf16, bf16, torch.int32, 256, 256, 0, False, False, False)),
        ("primary", ("fa2", bf16, bf16, bf16, torch.int32, 512, 512, 0, False, False, False)),
    }


def test_warmup_batch_runs_through_the_backend_against_the_flashinfer_emulator():
    """The warm-up batch at the real geometry, planned and run by our backend on the emulated FlashInfer 0.7.2 (every
    call bound to its pinned signatures, in bfloat16 as on a GPU): all wrappers and the merge are called, outputs
    match SDPA's within bfloat16 rounding."""
    from sgl_diffusion.attention.sdpa import SdpaBackend

    api = flashinfer_emulator.api()
    bf16 = torch.bfloat16
    backend, batch, kv = warmup.make_backend(warmup.REAL_LAYERS, 64, api, "cpu", bf16, bf16, workspace_bytes=0)
    ref_kv = copy.deepcopy(kv)
    backend.plan(batch)
    ref = SdpaBackend(ref_kv, 1024)
    ref.plan(ref_batch := type(batch)(batch.segments, batch.input_ids))
    gen = torch.Generator().manual_seed(0)
    n = batch.input_ids.numel()
    for layer in warmup.REAL_LAYERS:
        q = (torch.randn(n, layer.num_heads, layer.head_dim, generator=gen) * layer.head_dim**-0.25).to(bf16)
        k = (torch.randn(n, layer.num_kv_heads, layer.head_dim, generator=gen) * layer.head_dim**-0.25).to(bf16)
        v = k if layer.sliding_window is None else torch.randn(k.shape, generator=gen).to(bf16)
        out, want = backend.forward(q, k, v, layer, batch), ref.forward(q, k, v, layer, ref_batch)
        assert (out.float() - want.float()).abs().max().item() <= 3e-2, layer
    names = [name.split(".")[-1] for name, _ in api.calls]
    assert names.count("plan") == 8 and names.count("merge_state_in_place") == 2


def test_warmup_cli_plan_only_and_refusals(capsys, monkeypatch):
    warmup.main(["--plan-only"])
    out = capsys.readouterr().out
    assert "head_dim 512" in out and "module: fa2 head_dim 512" in out
    monkeypatch.delenv("FLASHINFER_CUDA_ARCH_LIST", raising=False)
    with pytest.raises(SystemExit, match="FLASHINFER_CUDA_ARCH_LIST"):
        warmup.main(["--compile-only"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            warmup.main([])


def test_warmup_reads_a_checkpoint_s_geometry(tiny_checkpoint_dir):
    layers, canvas = warmup.model_layers(str(tiny_checkpoint_dir))
    cfg = json.loads((Path(tiny_checkpoint_dir) / "config.json").read_text())
    assert canvas == cfg["canvas_length"]
    assert [layer.sliding_window for layer in layers] == [cfg["text_config"]["sliding_window"], None]
