"""What only a GPU can show about our CUDA attention paths, in one run of a few minutes; prints a summary, keys last.

    bash bench/gpu_carry.sh                                        # here: sglang's Triton kernel files + stubs
    PYTHONPATH=.gpu_carry python3 bench/gpu_check.py --out "$OUT"  # on a GPU host without sglang
    TRITON_INTERPRET=1 .venv/bin/python bench/gpu_check.py --device cpu --quick   # CPU smoke run (CI)

Parts (``--parts``, default all; each catches its own exceptions, so one failure hides nothing else):

- ``triton``: the Triton backend (sglang's extend kernel) against the SDPA reference backend, on every layout of
  tests/attention/cases.py (mixed prefill/commit/image/canvas batches, canvases only, encodes only) and both
  geometries of tests/attention/triton_checks.py ("unit": GQA 2:1 sliding + 4:1 full K = V; "real_head_dims": 256 /
  512). Per case: max |out - ref|, relative (Frobenius) error, max |KV - ref KV|. In float32 (the reference: SDPA in
  float32, math kernel, no TF32) and, on CUDA, in bfloat16 (the reference: SDPA in float32 on the same bf16-rounded
  inputs, so only the kernel's own rounding counts; torch's bf16 SDPA on the same inputs is printed as a yardstick).
  Tolerances (why):
    * float32, dots in IEEE fp32 (TRITON_F32_DEFAULT=ieee, set here): out <= 1e-4. Only the summation order differs
      from the reference (the CPU interpreter gets ~2e-6); a wrong mask, window or index moves outputs by >= 1e-2.
    * float32 with TF32 dots (if the knob is not honoured): out <= 1e-2, rel <= 5e-3 (TF32 keeps 10 mantissa bits).
    * bfloat16: out <= 3e-2 and rel <= 1e-2. bf16 keeps 8 significant bits (eps 2^-8 = 3.9e-3): rounding the output
      alone costs up to half an ULP (|out| < 4 here: ULP <= 1.6e-2), and the kernel also rounds the probabilities to
      bf16 before P.V; 3e-2 is ~2 ULPs of the largest outputs and 1e-2 ~2.5 eps, while a dropped or extra key among
      the <= 40 keys of these cases moves outputs by ~1e-1.
    * KV written: exact (0) in both dtypes: the backend copies k/v into the pool, no arithmetic.
  A kernel configuration the GPU cannot hold (triton OutOfResources) is reported as "oor" and fails only in bf16, the
  dtype served (compiled here for sm_90 with triton 3.6, the largest, fp32 at head_dim 512, needs 204,928 bytes of
  shared memory, under Hopper's 232,448). On CUDA the kernels are first compiled in parallel processes
  (--prewarm-workers): the fp32 ones at head_dim 256 / 512 take 20-45 s each, ~4 min in a row.
- ``graph``: CUDA-graph capture of Triton-backend forwards (plan outside the graph): canvases only at the real
  geometry (one sliding and one full layer, canvases with empty / short / long contexts), and the mixed layout (KV
  writes inside the graph). Replay, compare with eager; change q/k/v in place, replay, compare again (bit-exact), and
  check the output changed. CUDA only.
- ``timing``: one DiffusionGemma-sized canvas attention call on the Triton backend in bf16 (sliding: 16 heads, 8 KV
  heads, head_dim 256, window 1024, so at most 1023 visible cached tokens; full: 16 heads, 2 KV heads, head_dim 512,
  K = V), canvases of 256 tokens, 1 and 8 canvases each over its own context of 1k / 8k / 32k tokens; timed with
  triton.testing.do_bench (median, L2 flushed between runs), next to torch SDPA on the same math (gather the visible
  prefix KV, concatenate the canvas KV, one mask-free softmax) with and without the gather. Prints ms and achieved
  TB/s of KV read (unique bytes of the visible prefix K+V and the canvas K+V; "all" adds q and the output), and the
  output's difference to SDPA (bf16 tolerances as above). On the CPU: unit shapes, wall-clock, a smoke run.
- ``flashinfer``: the ``triton`` comparison (real head dims, bf16) with the FlashInfer backend, if ``flashinfer`` is
  importable (wheels under .gpu_carry/whl are pip-installed to /tmp/site first). Import or JIT failure: a skip.
  Under a time budget (--flashinfer-budget-s).

Not covered: the whole tiny model through the Triton backend (tests/attention/triton_checks.model_errors) needs
sglang's layers, which the GPU host lacks; the CPU interpreter test covers it in float32.

Results go to --out DIR/gpu_check.json after every part. Exit status 0 only if every attempted part passed (a skipped
part is not a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # sgl_diffusion and tests/ need no install (the GPU host has none)
if importlib.util.find_spec("sglang") is None and (ROOT / ".gpu_carry" / "sglang").is_dir():
    sys.path.insert(1, str(ROOT / ".gpu_carry"))  # sglang's kernel files carried by bench/gpu_carry.sh

PARTS = ("triton", "graph", "timing", "flashinfer")
TOL = {  # (max abs, max relative) error of the outputs; KV must be exact
    "float32_ieee": (1e-4, 1e-4),
    "float32_tf32": (1e-2, 5e-3),
    "bfloat16": (3e-2, 1e-2),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="cpu: a smoke run under TRITON_INTERPRET=1 (set here), float32, unit shapes")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="fewer timing shapes (CPU: the smallest run)")
    parser.add_argument("--out", default=None, help="write DIR/gpu_check.json (after every part)")
    parser.add_argument("--budget-s", type=float, default=330, help="soft deadline for the whole run: parts left "
                        "when it has passed are skipped, long loops stop early (each says so)")
    parser.add_argument("--flashinfer-budget-s", type=float, default=150, help="hard limit for the flashinfer part")
    parser.add_argument("--prewarm-workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)),
                        help="CUDA: processes compiling the triton part's kernels in parallel first (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    return args


ARGS = parse_args()
if ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined (kernels import lazily)
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # float32 tl.dot in IEEE fp32, not TF32 (see the docstring)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if ARGS.device == "auto":
    ARGS.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ARGS.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device(ARGS.device)
CUDA = DEVICE.type == "cuda"
T0 = time.time()
RESULTS: dict = {"parts": {}}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def elapsed() -> float:
    return time.time() - T0


def over_budget() -> bool:
    return elapsed() > ARGS.budget_s


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def write_json() -> None:
    if ARGS.out:
        out = Path(ARGS.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(RESULTS, indent=1, default=str))
        tmp.replace(out / "gpu_check.json")


def environment() -> dict:
    import triton

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
           "device": str(DEVICE), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
           "TRITON_F32_DEFAULT": os.environ.get("TRITON_F32_DEFAULT"), "fp32_dot": fp32_dot()}  # fmt: skip
    try:
        import sglang

        env["sglang"] = getattr(sglang, "__file__", None)
    except Exception as e:  # noqa: BLE001
        env["sglang"] = f"not importable: {e!r}"
    if CUDA:
        props = torch.cuda.get_device_properties(DEVICE)
        env |= {"gpu": props.name, "capability": ".".join(map(str, torch.cuda.get_device_capability(DEVICE))),
                "gpu_mem_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}  # fmt: skip
    return env


def fp32_dot() -> str:
    """How Triton computes float32 tl.dot here: "ieee" when the knob is honoured (or the interpreter), else "tf32"."""
    if not CUDA:
        return "ieee"  # the interpreter computes dots in numpy float32
    try:
        import triton

        return "ieee" if triton.knobs.language.fp32_default == "ieee" else "tf32"
    except Exception:  # noqa: BLE001
        return "tf32"


# ---- cases on the device ----------------------------------------------------------------------------------------


def moved(case, device, dtype):
    """A copy of a tests.attention.cases.Case with every tensor on ``device``, values cast to ``dtype`` (K = V kept)."""
    from sgl_diffusion.attention.kv import TorchKVStore
    from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
    from tests.attention.cases import Case

    segments = [Segment(s.kind, s.req_index, s.num_tokens, s.start_pos, s.prefix_slots.to(device),
                        None if s.new_slots is None else s.new_slots.to(device), s.image_runs)
                for s in case.batch.segments]  # fmt: skip
    batch = CanvasBatch(segments, case.batch.input_ids.to(device))
    kv = TorchKVStore(0, [], dtype, device)
    kv.k = [t.to(device, dtype) for t in case.kv.k]
    kv.v = [t.to(device, dtype) for t in case.kv.v]
    qkv = []
    for q, k, v in case.qkv:
        k2 = k.to(device, dtype)
        qkv.append((q.to(device, dtype), k2, k2 if v is k else v.to(device, dtype)))
    return Case(batch, case.layers, kv, qkv)


@contextlib.contextmanager
def exact_reference():
    """SDPA in true float32 on CUDA: the math kernel, no TF32 matmuls."""
    if not CUDA:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def errors(outs, kv, ref_outs, ref_kv) -> dict:
    out_abs = out_rel = 0.0
    for o, r in zip(outs, ref_outs):
        d = o.float() - r.float()
        out_abs = max(out_abs, d.abs().max().item())
        out_rel = max(out_rel, (d.norm() / r.float().norm().clamp_min(1e-30)).item())
    kv_abs = max(((a.float() - b.float()).abs().max().item() if a.numel() else 0.0)
                 for bufs, refs in ((kv.k, ref_kv.k), (kv.v, ref_kv.v)) for a, b in zip(bufs, refs))  # fmt: skip
    return {"out_abs": out_abs, "out_rel": out_rel, "kv_abs": kv_abs}


def is_oor(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfResources"


def compare_cases(make_backend, dtypes, geometries, label: str) -> dict:
    """Every layout x ``geometries`` x ``dtypes``: the backend against the float32 SDPA reference."""
    from tests.attention import cases
    from tests.attention.triton_checks import GEOMETRIES

    rows, failed = [], 0
    for geometry in geometries:
        for layout in sorted(cases.LAYOUTS):
            base = cases.make_case(layout, GEOMETRIES[geometry], seed=ARGS.seed)
            for dt in dtypes:
                if over_budget():
                    rows.append({"geometry": geometry, "layout": layout, "dtype": dt, "status": "skip (budget)"})
                    continue
                dtype = getattr(torch, dt)
                inp = moved(base, DEVICE, dtype)
                with exact_reference():
                    ref_outs, ref_kv = cases.run_backend(moved(inp, DEVICE, torch.float32), cases.reference)
                tol_key = dt if dt == "bfloat16" else f"float32_{fp32_dot()}"
                atol, rtol = TOL[tol_key]
                row = {"geometry": geometry, "layout": layout, "dtype": dt, "tol_abs": atol, "tol_rel": rtol}
                t = time.time()
                try:
                    outs, kv = cases.run_backend(inp, make_backend)
                    sync()
                    row |= errors(outs, kv, ref_outs, ref_kv)
                    ok = row["out_abs"] <= atol and row["out_rel"] <= rtol and row["kv_abs"] == 0
                    row["status"] = "pass" if ok else "FAIL"
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    if is_oor(e) and dt == "float32":
                        row["status"] = "oor"
                    else:
                        row["status"] = "ERROR"
                        log(traceback.format_exc())
                row["seconds"] = round(time.time() - t, 2)  # includes Triton compiles on first use
                if dt == "bfloat16" and CUDA:  # yardstick: torch's own bf16 SDPA on the same inputs
                    try:
                        s_outs, s_kv = cases.run_backend(inp, cases.reference)
                        row["sdpa_bf16_out_abs"] = errors(s_outs, s_kv, ref_outs, ref_kv)["out_abs"]
                    except Exception as e:  # noqa: BLE001 (the yardstick failing is not the backend's failure)
                        log(f"  torch bf16 sdpa failed: {type(e).__name__}: {str(e)[:200]}")
                failed += row["status"] not in ("pass", "oor", "skip (budget)")
                rows.append(row)
                log(f"  {label:10s} {geometry:14s} {layout:9s} {dt:8s} {row['status']:5s} "
                    + (f"out {row['out_abs']:.2e} rel {row['out_rel']:.2e} kv {row['kv_abs']:.1e}"
                       if "out_abs" in row else row.get("error", ""))
                    + (f"  (torch bf16 sdpa: {row['sdpa_bf16_out_abs']:.2e})" if "sdpa_bf16_out_abs" in row else "")
                    + f"  [{row.get('seconds', 0):.1f} s]")  # fmt: skip
    summary = {"cases": rows, "failed": failed, "ran": sum("out_abs" in r for r in rows),
               "skipped": sum(r["status"] == "skip (budget)" for r in rows)}
    for dt in dtypes:
        done = [r for r in rows if r["dtype"] == dt and "out_abs" in r]
        for key in ("out_abs", "out_rel", "kv_abs"):
            summary[f"{dt}_max_{key}"] = max((r[key] for r in done), default=float("nan"))
        if dt == "bfloat16":
            summary["sdpa_bf16_max_out_abs"] = max((r.get("sdpa_bf16_out_abs", 0) for r in done), default=float("nan"))
        summary[f"{dt}_oor"] = sum(r["status"] == "oor" for r in rows if r["dtype"] == dt)
    summary["status"] = "fail" if failed or summary["ran"] == 0 else "pass"
    return summary


# ---- parts ------------------------------------------------------------------------------------------------------


def part_triton() -> dict:
    from tests.attention.triton_checks import triton_backend

    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        return {"status": "skip", "reason": "on the CPU the Triton kernel runs only under TRITON_INTERPRET=1"}
    dtypes = ["float32", "bfloat16"] if CUDA else ["float32"]  # the interpreter's bf16 tl.dot is broken
    geometries = ["unit", "real_head_dims"]
    log(f"  float32 dots: {fp32_dot()}; tolerances (abs, rel): "
        + ", ".join(f"{k} {v}" for k, v in TOL.items()))
    prewarmed = None
    if CUDA and ARGS.prewarm_workers > 0:
        try:
            prewarmed = prewarm(dtypes, geometries)
        except Exception as e:  # noqa: BLE001 (the cases then compile their kernels themselves)
            log(traceback.format_exc())
            prewarmed = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    result = compare_cases(triton_backend, dtypes, geometries, "triton")
    result["prewarm"] = prewarmed
    return result


# ---- parallel compilation of the kernels the triton part launches ---------------------------------------------
# The float32 kernels at head_dim 256 / 512 take 20-50 s each to compile (IEEE fp32 dots unroll into FMAs; measured
# with triton 3.6 for sm_90 on a CPU); serially that is most of a run. So the launches are first recorded on CPU
# tensors (no GPU work), and every distinct configuration is compiled in parallel worker processes against the
# device's target (warmup=True: compile only), filling Triton's on-disk cache; the cases then load, not compile.


def _specialization(args, kwargs) -> tuple:
    """What Triton specializes a launch on (dtypes, 16-byte alignment, ints == 1 / % 16, constexprs), roughly."""
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append((str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            sig.append(repr(a) if not isinstance(a, float) else "float")
        else:
            sig.append(("int", a == 1, a % 16 == 0))
    return tuple(sig) + tuple(sorted((k, repr(v)) for k, v in kwargs.items()))


def record_launches(run) -> list[tuple]:
    """(args, kwargs, grid) of every distinct launch of sglang's extend kernel while ``run()`` runs (nothing runs)."""
    from sglang.kernels.ops.attention import extend_attention as ext

    real, seen, launches = ext._fwd_kernel, set(), []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                sig = _specialization(args, kwargs)
                if sig not in seen:
                    seen.add(sig)
                    launches.append((args, kwargs, grid))

            return launch

    ext._fwd_kernel = Recorder()
    try:
        run()
    finally:
        ext._fwd_kernel = real
    return launches


def _compile_one(target: tuple, args, kwargs, grid) -> tuple[float, int]:
    """In a worker process: compile one launch of the extend kernel for ``target`` (no device used)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class TargetOnly:  # what JITFunction.warmup asks of a driver
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget(*target)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(TargetOnly())
    from sglang.kernels.ops.attention import extend_attention as ext

    t = time.time()
    kernel = ext._fwd_kernel.warmup(*args, grid=grid, **kwargs)
    return time.time() - t, int(kernel.metadata.shared)


def prewarm(dtypes, geometries) -> dict:
    import concurrent.futures as cf
    import multiprocessing

    from tests.attention import cases
    from tests.attention.triton_checks import GEOMETRIES, triton_backend

    t0 = time.time()

    def run_all():
        for geometry in geometries:
            for layout in sorted(cases.LAYOUTS):
                base = cases.make_case(layout, GEOMETRIES[geometry], seed=ARGS.seed)
                for dt in dtypes:
                    cases.run_backend(moved(base, torch.device("cpu"), getattr(torch, dt)), triton_backend)

    launches = record_launches(run_all)
    cap = torch.cuda.get_device_capability(DEVICE)
    target = ("cuda", cap[0] * 10 + cap[1], 32)
    workers = min(ARGS.prewarm_workers, len(launches))
    deadline = max(30.0, ARGS.budget_s * 0.45 - elapsed())
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(_compile_one, target, *launch) for launch in launches]
    done, pending = cf.wait(futures, timeout=deadline)
    results = [f.result() for f in done if f.exception() is None]
    errors = [repr(f.exception())[:300] for f in done if f.exception() is not None]
    if pending:  # left to the cases, which compile what is missing themselves
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
    pool.shutdown(wait=not pending, cancel_futures=True)
    limit = getattr(torch.cuda.get_device_properties(DEVICE), "shared_memory_per_block_optin", None)
    out = {"launches": len(launches), "workers": workers, "compiled": len(results), "unfinished": len(pending),
           "errors": errors[:3], "seconds": round(time.time() - t0, 1),
           "slowest_compile_s": round(max((r[0] for r in results), default=0), 1),
           "max_shared_bytes": max((r[1] for r in results), default=0), "shared_limit_bytes": limit}  # fmt: skip
    log(f"  prewarm: {out}")
    return out


REAL = dict(heads=16, sliding=(8, 256), full=(2, 512), window=1024, canvas=256)
TINY = dict(heads=4, sliding=(2, 16), full=(1, 32), window=8, canvas=8)


def canvas_problem(shape: dict, geometry: str, prefixes: list[int], dtype, seed: int):
    """One attention layer (``geometry``: "sliding" or "full") and a batch of canvases, canvas i over a context of
    its own of prefixes[i] cached tokens (contiguous slots). Returns (layer, kv, batch, q, k, v)."""
    from sgl_diffusion.attention.base import AttnLayer
    from sgl_diffusion.attention.kv import TorchKVStore
    from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment

    kv_heads, head_dim = shape[geometry]
    sliding = geometry == "sliding"
    layer = AttnLayer(0, shape["heads"], kv_heads, head_dim, shape["window"] if sliding else None)
    torch.manual_seed(seed)
    scale = head_dim**-0.25  # logits of unit spread
    kv = TorchKVStore(max(1, sum(prefixes)), [(kv_heads, head_dim)], dtype, DEVICE)
    kv.k[0].normal_(0, scale)
    if sliding:
        kv.v[0].normal_()
    else:
        kv.v[0].copy_(kv.k[0])  # K = V (the pool still has both buffers)
    segments, start = [], 0
    for i, p in enumerate(prefixes):
        slots = torch.arange(start, start + p, device=DEVICE)
        segments.append(Segment("canvas", i, shape["canvas"], p, slots))
        start += p
    n = shape["canvas"] * len(prefixes)
    batch = CanvasBatch(segments, torch.zeros(n, dtype=torch.long, device=DEVICE))
    q = torch.randn(n, layer.num_heads, head_dim, device=DEVICE, dtype=dtype) * scale
    k = torch.randn(n, kv_heads, head_dim, device=DEVICE, dtype=dtype) * scale
    v = k if not sliding else torch.randn(n, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    return layer, kv, batch, q, k, v


def part_graph() -> dict:
    if not CUDA:
        return {"status": "skip", "reason": "CUDA graphs need CUDA"}
    from sgl_diffusion.attention.base import AttnLayer
    from sgl_diffusion.attention.kv import TorchKVStore
    from sgl_diffusion.attention.triton import TritonBackend
    from tests.attention import cases
    from tests.attention.triton_checks import GEOMETRIES

    checks = {}
    # 1. canvases only, real geometry: one sliding + one full layer in one backend (two groups, one plan)
    prefixes = [0, 700, 3000]  # an empty context, one shorter and one longer than the sliding window
    sl = canvas_problem(REAL, "sliding", prefixes, torch.bfloat16, ARGS.seed)
    fu = canvas_problem(REAL, "full", prefixes, torch.bfloat16, ARGS.seed + 1)
    layers = [sl[0], AttnLayer(1, *[getattr(fu[0], f) for f in ("num_heads", "num_kv_heads", "head_dim",
                                                                   "sliding_window")])]  # fmt: skip
    kv = TorchKVStore(0, [], torch.bfloat16, DEVICE)
    kv.k, kv.v = [sl[1].k[0], fu[1].k[0]], [sl[1].v[0], fu[1].v[0]]
    qkv = [sl[3:], fu[3:]]
    checks["canvases_real"] = graph_check(TritonBackend(kv, layers), sl[2], layers, qkv, kv, k_eq_v=[False, True])
    # 2. the mixed layout (KV writes inside the graph), real head dims
    case = moved(cases.make_case("mixed", GEOMETRIES["real_head_dims"], seed=ARGS.seed), DEVICE, torch.bfloat16)
    kv2 = copy.deepcopy(case.kv)
    k_eq_v = [v is k for _, k, v in case.qkv]
    qkv2 = [(q.clone(), k.clone(), None) for q, k, v in case.qkv]
    qkv2 = [(q, k, k if same else v.clone()) for (q, k, _), (_, _, v), same in zip(qkv2, case.qkv, k_eq_v)]
    checks["mixed_real_head_dims"] = graph_check(TritonBackend(kv2, case.layers), case.batch, case.layers, qkv2, kv2,
                                                 k_eq_v)  # fmt: skip
    ok = all(c["status"] == "pass" for c in checks.values())
    return {"status": "pass" if ok else "fail", "checks": checks,
            "max_diff": max(c.get("max_diff", float("nan")) for c in checks.values())}


def graph_check(backend, batch, layers, qkv, kv, k_eq_v) -> dict:
    """Plan eagerly, capture every layer's forward in one CUDA graph, replay against eager before and after
    changing the inputs in place."""
    from sgl_diffusion.runtime.canvas_batch import CanvasBatch

    batch = CanvasBatch(batch.segments, batch.input_ids)
    backend.plan(batch)

    def eager():
        return [backend.forward(q, k, v, layer, batch) for layer, (q, k, v) in zip(layers, qkv)]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for _ in range(2):
            eager()
    torch.cuda.current_stream().wait_stream(stream)
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outs = eager()
    graph.replay()
    sync()
    first = [o.clone() for o in static_outs]
    diff_before = max((a.float() - b.float()).abs().max().item() for a, b in zip(first, eager()))
    gen = torch.Generator(device=DEVICE).manual_seed(1234)
    for (q, k, v), same in zip(qkv, k_eq_v):
        scale = q.shape[-1] ** -0.25
        q.copy_(torch.randn(q.shape, generator=gen, device=DEVICE) * scale)
        k.copy_(torch.randn(k.shape, generator=gen, device=DEVICE) * scale)
        if not same:
            v.copy_(torch.randn(v.shape, generator=gen, device=DEVICE))
    graph.replay()
    sync()
    replayed = [o.clone() for o in static_outs]
    kv_after_graph = [t.clone() for t in kv.k + kv.v]
    ref = eager()
    sync()
    diff_after = max((a.float() - b.float()).abs().max().item() for a, b in zip(replayed, ref))
    kv_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(kv_after_graph, kv.k + kv.v))
    changed = max((a.float() - b.float()).abs().max().item() for a, b in zip(replayed, first))
    ok = diff_before == 0 and diff_after == 0 and kv_diff == 0 and changed > 0
    result = {"status": "pass" if ok else "fail", "diff_before_change": diff_before, "diff_after_change": diff_after,
              "kv_diff": kv_diff, "output_changed_by": changed, "max_diff": max(diff_before, diff_after, kv_diff)}
    log(f"  graph {result}")
    return result


def sdpa_canvas(q, k, v, k_buf, v_buf, idx, canvases: int, canvas: int):
    """torch SDPA on the canvases' math: [visible prefix KV (gathered) ; canvas KV], no mask. Returns [N, H, D]."""
    h, d = q.shape[1:]
    kvh = k.shape[1]
    keys = torch.cat([k_buf[idx], k.view(canvases, canvas, kvh, d)], 1).transpose(1, 2)
    vals = torch.cat([v_buf[idx], v.view(canvases, canvas, kvh, d)], 1).transpose(1, 2)
    return sdpa_gathered(q, keys, vals, canvases, canvas)


def sdpa_gathered(q, keys, vals, canvases: int, canvas: int):
    h, d = q.shape[1:]
    o = F.scaled_dot_product_attention(q.view(canvases, canvas, h, d).transpose(1, 2), keys, vals, scale=1.0,
                                       enable_gqa=True)  # fmt: skip
    return o.transpose(1, 2).reshape(canvases * canvas, h, d)


def bench(fn) -> float:
    """Milliseconds per call: triton's do_bench median on CUDA (L2 flushed between calls), wall-clock on the CPU."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def part_timing() -> dict:
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        return {"status": "skip", "reason": "on the CPU the Triton kernel runs only under TRITON_INTERPRET=1"}
    shape = REAL if CUDA else TINY
    dtype = torch.bfloat16 if CUDA else torch.float32
    batches = [1, 8] if CUDA else [1, 2]
    prefixes = ([1024, 8192] if ARGS.quick else [1024, 8192, 32768]) if CUDA else [5, 20]
    atol, rtol = TOL["bfloat16"] if CUDA else TOL["float32_ieee"]
    rows, failed = [], 0
    log(f"  {'layer':8s} {'B':>2s} {'prefix':>6s} {'visible':>7s} {'triton ms':>10s} {'KV TB/s':>8s} {'all TB/s':>8s} "
        f"{'sdpa+gather ms':>14s} {'sdpa ms':>8s} {'sdpa/triton':>11s} {'max|diff|':>9s} {'rel':>8s}")
    for geometry in ("sliding", "full"):
        for p in prefixes:
            if over_budget():
                rows.append({"geometry": geometry, "prefix": p, "status": "skip (budget)"})
                log(f"  {geometry} prefix {p}: skipped (over the run's budget)")
                continue
            try:
                layer, kv, batch_all, q_all, k_all, v_all = canvas_problem(shape, geometry, [p] * max(batches), dtype,
                                                                           ARGS.seed)  # fmt: skip
            except torch.cuda.OutOfMemoryError as e:
                rows.append({"geometry": geometry, "prefix": p, "status": "ERROR", "error": repr(e)[:300]})
                failed += 1
                continue
            for b in batches:
                row = {"geometry": geometry, "canvases": b, "prefix": p}
                try:
                    row |= time_one(shape, layer, kv, batch_all, q_all, k_all, v_all, b, p, atol, rtol)
                except Exception as e:  # noqa: BLE001
                    log(traceback.format_exc())
                    row |= {"status": "ERROR", "error": f"{type(e).__name__}: {str(e)[:300]}"}
                failed += row["status"] != "pass"
                rows.append(row)
                if "triton_ms" in row:
                    log(f"  {geometry:8s} {b:2d} {p:6d} {row['visible']:7d} {row['triton_ms']:10.4f} "
                        f"{row['triton_kv_tbps']:8.3f} {row['triton_all_tbps']:8.3f} {row['sdpa_gather_ms']:14.4f} "
                        f"{row['sdpa_ms']:8.4f} {row['sdpa_gather_ms'] / row['triton_ms']:11.2f} "
                        f"{row['max_diff']:9.2e} {row['rel_diff']:8.1e}  {row['status']}")  # fmt: skip
                else:
                    log(f"  {geometry:8s} {b:2d} {p:6d}  {row['status']} {row.get('error', '')}")
            del kv, batch_all, q_all, k_all, v_all
            if CUDA:
                torch.cuda.empty_cache()
    done = [r for r in rows if "triton_ms" in r]
    ratios = [r["sdpa_gather_ms"] / r["triton_ms"] for r in done if r["sdpa_gather_ms"] == r["sdpa_gather_ms"]]
    return {"status": "fail" if failed or not done else "pass", "rows": rows, "failed": failed,
            "max_diff": max((r["max_diff"] for r in done), default=float("nan")),
            "max_rel_diff": max((r["rel_diff"] for r in done), default=float("nan")),
            "best_kv_tbps": max((r["triton_kv_tbps"] for r in done), default=float("nan")),
            "sdpa_over_triton_geomean": math.exp(statistics.fmean(map(math.log, ratios))) if ratios else float("nan"),
            **{f"triton_ms_{r['geometry']}_b{r['canvases']}_p{r['prefix']}": r["triton_ms"] for r in done}}


def time_one(shape, layer, kv, batch_all, q_all, k_all, v_all, b, p, atol, rtol) -> dict:
    from sgl_diffusion.attention.triton import TritonBackend
    from sgl_diffusion.runtime.canvas_batch import CanvasBatch

    c = shape["canvas"]
    n = b * c
    q, k = q_all[:n], k_all[:n]
    v = k if v_all is k_all else v_all[:n]
    batch = CanvasBatch(batch_all.segments[:b], batch_all.input_ids[:n])
    backend = TritonBackend(kv, [layer])
    backend.plan(batch)
    fn = lambda: backend.forward(q, k, v, layer, batch)  # noqa: E731
    out = fn()
    visible = p if layer.sliding_window is None else min(p, layer.sliding_window - 1)
    idx = torch.stack([s.prefix_slots[s.start_pos - visible:] for s in batch.segments])  # [B, visible]
    k_buf, v_buf = kv.buffers(0)
    ref = sdpa_canvas(q, k, v, k_buf, v_buf, idx, b, c)
    sync()
    d = out.float() - ref.float()
    max_diff = d.abs().max().item()
    rel = (d.norm() / ref.float().norm()).item()
    triton_ms = bench(fn)
    try:
        sdpa_gather_ms = bench(lambda: sdpa_canvas(q, k, v, k_buf, v_buf, idx, b, c))
        kvh, hd = k.shape[1:]
        gathered = [torch.cat([buf[idx], t.view(b, c, kvh, hd)], 1).transpose(1, 2).contiguous()
                    for buf, t in ((k_buf, k), (v_buf, v))]  # [B, KV, visible + c, D] keys, values
        sdpa_ms = bench(lambda: sdpa_gathered(q, *gathered, b, c))
        gathered.clear()
    except Exception as e:  # noqa: BLE001 (the yardstick failing is not our failure)
        log(f"  sdpa timing failed: {type(e).__name__}: {str(e)[:200]}")
        sdpa_gather_ms = sdpa_ms = float("nan")
    el = q.element_size()
    kv_bytes = 2 * b * (visible + c) * layer.num_kv_heads * layer.head_dim * el  # K and V, prefix + canvas
    all_bytes = kv_bytes + 2 * n * layer.num_heads * layer.head_dim * el  # + q read, o written
    ok = max_diff <= atol and rel <= rtol
    return {"status": "pass" if ok else "FAIL", "visible": visible, "triton_ms": triton_ms,
            "triton_kv_tbps": kv_bytes / (triton_ms * 1e-3) / 1e12,
            "triton_all_tbps": all_bytes / (triton_ms * 1e-3) / 1e12,
            "kv_bytes": kv_bytes, "all_bytes": all_bytes, "sdpa_gather_ms": sdpa_gather_ms, "sdpa_ms": sdpa_ms,
            "max_diff": max_diff, "rel_diff": rel, "tol_abs": atol, "tol_rel": rtol}  # fmt: skip


def install_carried_wheels() -> str | None:
    """pip-install .gpu_carry/whl/*.whl into /tmp/site (once) and put it on sys.path; a note of what happened."""
    wheels = sorted((ROOT / ".gpu_carry" / "whl").glob("*.whl"))
    if not wheels:
        return None
    site = Path("/tmp/site")
    if not (site / "flashinfer").exists():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--target", str(site), *map(str, wheels)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return f"pip install of {len(wheels)} carried wheels failed: {proc.stderr[-500:]}"
    sys.path.insert(0, str(site))
    return f"installed {len(wheels)} carried wheels to {site}"


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def handler(signum, frame):
        raise Timeout(f"over the {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def part_flashinfer() -> dict:
    if not CUDA:
        return {"status": "skip", "reason": "FlashInfer needs CUDA"}
    note = install_carried_wheels()
    try:
        import flashinfer
    except Exception as e:  # noqa: BLE001
        return {"status": "skip", "reason": f"flashinfer not importable ({type(e).__name__}: {str(e)[:200]}); "
                                            f"wheels: {note or 'none carried'}"}  # fmt: skip
    from sgl_diffusion.attention.flashinfer import FlashInferBackend

    def make(kv, layers):
        return FlashInferBackend(kv, layers, torch.bfloat16, DEVICE)

    budget = min(ARGS.flashinfer_budget_s, max(10.0, ARGS.budget_s + 60 - elapsed()))
    try:
        with time_limit(budget):
            result = compare_cases(make, ["bfloat16"], ["real_head_dims"], "flashinfer")
    except Timeout as e:
        return {"status": "skip", "reason": f"JIT/run {e}", "version": getattr(flashinfer, "__version__", "?")}
    result["version"] = getattr(flashinfer, "__version__", "?")
    if result["ran"] == 0:  # every case failed before comparing: import/JIT trouble, not numerics
        errs = [r.get("error", "") for r in result["cases"]]
        return {"status": "skip", "reason": f"no case ran (JIT?): {errs[0] if errs else ''}", **result}
    return result


def main() -> int:
    RESULTS["environment"] = environment()
    RESULTS["args"] = {k: v for k, v in vars(ARGS).items()}
    log(f"gpu_check on {DEVICE}: " + ", ".join(f"{k} {v}" for k, v in RESULTS["environment"].items()))
    write_json()
    runners = {"triton": part_triton, "graph": part_graph, "timing": part_timing, "flashinfer": part_flashinfer}
    for part in ARGS.parts:
        log(f"\n== {part} ({elapsed():.0f} s in)")
        t = time.time()
        if over_budget():
            result = {"status": "skip", "reason": f"over the run's budget ({ARGS.budget_s:.0f} s)"}
        else:
            try:
                result = runners[part]()
            except Exception as e:  # noqa: BLE001
                log(traceback.format_exc())
                result = {"status": "fail", "error": f"{type(e).__name__}: {str(e)[:500]}",
                          "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        result["seconds"] = round(time.time() - t, 1)
        RESULTS["parts"][part] = result
        log(f"== {part}: {result['status'].upper()} in {result['seconds']} s"
            + (f" ({result['reason']})" if "reason" in result else "")
            + (f" ({result['error']})" if "error" in result else ""))
        write_json()
        if CUDA:
            torch.cuda.empty_cache()
    ok = all(r["status"] in ("pass", "skip") for r in RESULTS["parts"].values())
    RESULTS["all_passed"] = ok
    RESULTS["elapsed_s"] = round(elapsed(), 1)
    write_json()
    print_summary(ok)
    return 0 if ok else 1


def print_summary(ok: bool) -> None:
    parts = RESULTS["parts"]
    log("\nsummary: " + ", ".join(f"{p} {r['status'].upper()}" + (f" ({r['reason']})" if "reason" in r else "")
                                  for p, r in parts.items()))  # fmt: skip
    code = {"pass": 1, "fail": 0, "skip": -1}
    keys = {}
    for part, r in parts.items():
        keys[f"{part}_passed"] = code[r["status"]]  # 1 pass, 0 fail, -1 skipped
        keys[f"{part}_seconds"] = r["seconds"]
    if "triton" in parts and "cases" in parts["triton"]:
        t = parts["triton"]
        for key, value in t.items():
            if key.startswith(("float32_", "bfloat16_", "sdpa_bf16_")):
                keys[f"triton_{key}"] = value
        keys["triton_cases_failed"] = t["failed"]
        keys["triton_cases_skipped"] = t["skipped"]  # over the run's budget (--budget-s): not compared
    if "graph" in parts and "max_diff" in parts["graph"]:
        keys["graph_max_diff"] = parts["graph"]["max_diff"]
    if "timing" in parts and "rows" in parts["timing"]:
        t = parts["timing"]
        for key in ("max_diff", "max_rel_diff", "best_kv_tbps", "sdpa_over_triton_geomean"):
            keys[f"timing_{key}"] = t[key]
        keys |= {f"timing_{k}": v for k, v in t.items() if k.startswith("triton_ms_")}
    if "flashinfer" in parts and "cases" in parts["flashinfer"]:
        for key in ("bfloat16_max_out_abs", "bfloat16_max_out_rel", "bfloat16_max_kv_abs"):
            keys[f"flashinfer_{key}"] = parts["flashinfer"].get(key, float("nan"))
    keys["all_passed"] = int(ok)
    keys["elapsed_s"] = RESULTS["elapsed_s"]
    for key, value in keys.items():
        log(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
