"""Helpers shared by the bench scripts: a server subprocess, the machine's load, medians with their spread."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

# What a DiffusionGemma server on the CPU runs with (the flags it would pick by itself, spelled out).
CPU_FLAGS = ("--device", "cpu", "--max-total-tokens", "8192", "--skip-server-warmup", "--sleep-on-idle",
             "--disable-overlap-schedule")  # fmt: skip
# sglang serves ordinary models on the CPU only with its CPU engine and an importable sgl_kernel
# (reference/cpu_feasibility.md); bench/stubs holds an import-only sgl_kernel.
STUBS = Path(__file__).resolve().parent / "stubs"


# the GEMM and attention kernels (torch.profiler event names): the compute a forward cannot do without
KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::baddbmm",
           "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")  # fmt: skip


def kernel_ms(prof) -> float:
    """Self time of the KERNELS in a torch.profiler trace, ms: what ``prof.key_averages()`` gives (tests/bench checks
    it), from the raw events. torch builds a Python event for every op of the trace first: 2 to 7 s for a trace of
    compare.py's requests on the 2-core machine, a sixth of a ``--quick`` run.

    As torch's ``EventList._populate_cpu_children``: a synchronous CPU event's parent is the innermost event of its
    thread whose interval holds it whole; its self time is its duration less its children's.
    """
    from torch.autograd import DeviceType
    from torch.autograd.profiler import _filter_name

    threads: dict[int, list[tuple[int, int, str]]] = {}
    for event in prof.profiler.kineto_results.events():
        if (event.device_type() != DeviceType.CPU or event.is_async() or event.is_hidden_event()
                or event.start_thread_id() != event.end_thread_id() or _filter_name(event.name())):  # fmt: skip
            continue
        threads.setdefault(event.start_thread_id(), []).append((event.start_ns(), event.end_ns(), event.name()))
    total_ns = 0
    for events in threads.values():
        events.sort(key=lambda e: (e[0], -e[1]))
        open_events: list[list] = []  # [end, is a kernel, its time less its children's so far]
        for start, end, name in events:
            while open_events and (start >= open_events[-1][0] or end > open_events[-1][0]):
                _, is_kernel, self_ns = open_events.pop()
                total_ns += self_ns if is_kernel else 0
            if open_events:
                open_events[-1][2] -= end - start
            open_events.append([end, name in KERNELS, end - start])
        total_ns += sum(self_ns for _, is_kernel, self_ns in open_events if is_kernel)
    return total_ns / 1e6


def free_port() -> int:
    """Below the kernel's ephemeral range (no outgoing connection takes it before the server binds it) and below
    sglang's own nccl ports (22000-29999)."""
    from sglang.srt.utils.network import get_free_port_below_ephemeral

    return get_free_port_below_ephemeral(low=10000, high=21999)


def start_server(model_dir, log_path, extra=(), threads: int = 0, env: dict[str, str] | None = None,
                 timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """``python -m sglang.launch_server`` on ``model_dir`` (CPU flags, a free port); returns (process, URL) once
    /health answers. ``threads`` > 0 sets OMP_NUM_THREADS (torch's intra-op threads in the scheduler)."""
    proc, url = launch_server(model_dir, log_path, extra, threads, env)
    wait_healthy(proc, url, log_path, timeout)
    return proc, url


def launch_server(model_dir, log_path, extra=(), threads: int = 0, env: dict[str, str] | None = None):
    """Start the server without waiting (start several, then ``wait_healthy`` on each): (process, URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), *CPU_FLAGS, *extra]  # fmt: skip
    full_env = dict(os.environ) | (env or {})
    if threads > 0:
        full_env["OMP_NUM_THREADS"] = str(threads)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=full_env)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, log_path, timeout: float = 300) -> None:
    """Until the server's own process listens on ``url``'s port and /health answers (which alone could be another
    process's answer, had it taken the port first)."""
    port = int(url.rsplit(":", 1)[1])
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(log_path) as log:
            text = log.read()
        if "error while attempting to bind on address" in text:
            stop_server(proc)
            raise SystemExit(f"another process took the server's port; run again. See {log_path}")
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if listens(proc.pid, port) and requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"server not healthy after {timeout:.0f} s; see {log_path}")


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` (sglang's HTTP server runs in the launcher's) listens on ``port``."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:  # it has just exited
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


def ar_server_env() -> dict[str, str]:
    """Environment for sglang's own token-by-token server on the CPU (an ordinary model such as Llama)."""
    path = os.environ.get("PYTHONPATH")
    return {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(STUBS) + (os.pathsep + path if path else "")}


def stop_server(proc: subprocess.Popen) -> None:
    stop_servers([proc])


def stop_servers(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every server first, then wait: sglang's shutdown takes seconds, mostly waiting."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def load_average() -> str:
    """Other processes on the machine skew CPU timings; the load average makes that visible."""
    return "loadavg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_spread(values) -> tuple[float, float, float]:
    """(median, min, max)."""
    values = list(values)
    return statistics.median(values), min(values), max(values)


def fmt_spread(values, scale: float = 1.0, digits: int = 1) -> str:
    med, lo, hi = median_spread(v * scale for v in values)
    return f"{med:.{digits}f} [{lo:.{digits}f}..{hi:.{digits}f}]"


# ---- tiny random models (bench_rounds.py) -------------------------------------------------------------------------

# HF's generation config requires confidence_threshold > 0; mean entropy never gets below this on a random model.
NO_EARLY_STOP = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny


def make_pair(args):
    """transformers' model and ours on the same random tiny weights (build_tiny_model(args.seed, args.preset))."""
    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_model
    from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion

    hf = build_tiny_model(args.seed, args.preset, **args.overrides)
    if args.canvas_length is not None:
        hf.config.canvas_length = args.canvas_length  # read by HF generate and by our config; no weight depends on it
    ours = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def prompt_ids(length: int, vocab: int, seed: int) -> list[int]:
    import torch

    # NOTE: ids 0..23 are special tokens (pad, eos, image, ...); a prompt of ordinary tokens avoids image handling.
    return torch.randint(24, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
