"""Every script under bench/ runs at tiny sizes and prints what it promises, so a benchmark cannot rot unnoticed.

Figures are not checked (they are timings on a shared machine); the keys and the exit code are.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run(script, *args, timeout=300):
    proc = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def keys(out: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+): (-?[\d.e+-]+|nan|inf)$", out, re.M)}


def test_every_bench_script_has_a_smoke_test():
    """A new bench script needs a smoke test: some test module runs it by name (here, or beside what it measures,
    as tests/attention/test_bench_attention.py does)."""
    scripts = {p.name for p in BENCH.glob("*.py")} - {"common.py"}
    tests = "\n".join(p.read_text() for p in BENCH.parent.joinpath("tests").rglob("test_*.py"))
    assert not {s for s in scripts if f'"{s}"' not in tests}, scripts


def test_roofline_default_and_from_a_config(tiny_checkpoint_dir):
    """The 26B floor: an H100 FP8 forward at batch 1 is HBM-bound at ~8 ms, and vLLM's 1,008 tok/s sits below the
    bound; a checkpoint's config.json is read too."""
    out = keys(run("roofline.py"))
    assert 5 < out["floor_ms_per_forward_h100_fp8_b1"] < 12
    assert 0 < out["vllm_fraction_of_bound"] < 1
    tiny = run("roofline.py", "--config", tiny_checkpoint_dir / "config.json", "--batches", "1,8")
    assert "hidden 64, 6 layers (1 full)" in tiny


def test_roofline_reads_full_layer_fields_in_either_form(tmp_path):
    """The real 26B-A4B's config, with its full layers' head dim and KV heads as plain fields (transformers 5.11's
    ``global_head_dim``/``num_global_key_value_heads``) or as ``per_layer_config`` (5.19's), gives the built-in
    figures."""
    full = [5, 11, 17, 23, 29]
    text = {"hidden_size": 2816, "num_hidden_layers": 30, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 256, "intermediate_size": 2112, "num_experts": 128, "top_k_experts": 8,
            "moe_intermediate_size": 704, "vocab_size": 262144, "sliding_window": 1024,
            "layer_types": ["full_attention" if i in full else "sliding_attention" for i in range(30)]}
    plain = {**text, "global_head_dim": 512, "num_global_key_value_heads": 2}
    per_layer = {**text, "per_layer_config": {str(i): {"head_dim": 512, "num_key_value_heads": 2} for i in full}}
    default = run("roofline.py", "--batches", "1,64", "--context", "8192")
    for name, cfg in (("plain", plain), ("per_layer", per_layer)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"text_config": cfg}))
        assert run("roofline.py", "--config", path, "--batches", "1,64", "--context", "8192") == default, name


def test_bench_rounds_runs():
    """Mixed vs homogeneous rounds, steps per round, last-canvas commit: three sections at tiny sizes."""
    out = run("bench_rounds.py", "--preset", "default", "--requests", "3", "--arrival-gap", "1", "--max-steps", "3",
              "--repeats", "1", "--threads", "1")
    assert "mixed / homogeneous throughput" in out and "2. K=8" in out and "committed / dropped throughput" in out


@pytest.mark.slow
def test_bench_serving_runs(server, tiny_checkpoint_dir):
    """sglang's bench_serving client against a real server (the shared one, --url: compare.py's smoke test starts
    servers through bench/common.py), two concurrencies, one repeat."""
    out = run("bench_serving.py", "--url", server.url, "--model-dir", tiny_checkpoint_dir, "--concurrencies", "1,2",
              "--num-prompts", "2", "--output-len", "32", "--steps", "1", "--repeats", "1", timeout=600)
    assert re.search(r"^\s+2\s+[\d.]+\s+[\d.]+x", out, re.M), out


@pytest.mark.slow
def test_compare_prints_every_key(tiny_checkpoint_dir):
    """compare.py --quick on the random tiny checkpoint with 2 steps per canvas and 2 requests: both servers start
    and every key is printed last."""
    out = run("compare.py", "--quick", "--model-dir", tiny_checkpoint_dir, "--requests", "2", "--max-steps", "2",
              "--mem-batch", "5", timeout=900)
    got = keys(out)
    expected = {"speedup_vs_hf_n1", "speedup_vs_hf_n2", "tokens_per_forward", "batch8_over_batch1", "forwards_vs_ar",
                "wall_per_token_ms_ours", "wall_per_token_ms_ar", "overhead_ratio_b1", "overhead_ratio_b8",
                "round_overhead_ratio_b1", "round_overhead_ratio_b8", "peak_mem_per_canvas_mb", "mean_steps_per_canvas",
                "accuracy_ours", "accuracy_hf"}  # fmt: skip
    assert expected <= got.keys(), out
    assert got["mean_steps_per_canvas"] == 2.0  # a random model never stops early
    # the n=1 bounds: a request path on both servers, and rounds that cost at least their kernels
    assert got["request_path_ms_ar"] > 0 and got["request_path_ms_ours"] > 0, out
    assert got["request_path_ms_ar_after_hf"] > 0 and got["request_path_ms_ours_after_hf"] > 0, out
    assert got["speedup_vs_hf_n1_path_bound"] > got["speedup_vs_hf_n1_round_bound"] > 0, out
    assert got["round_ms_served_n1"] > 0 and got["round_ms_for_3x"] > 0, out
    assert got["round_non_kernel_ms_b1"] > 0, out
    assert got["round_ms_after_pause_b1"] > 0 and got["speedup_vs_hf_n1_round_bound_after_pause"] > 0, out
    last = out.strip().splitlines()[-len(expected) :]
    assert all(re.fullmatch(r"\w+: \S+", line) for line in last), last  # the keys come last


def test_bench_round_runs(tiny_checkpoint_dir):
    """Rounds, their parts and sampler steps at two batch sizes, and transformers' step, on a few rounds."""
    out = run("bench_round.py", "--model-dir", tiny_checkpoint_dir, "--batches", "1,2", "--rounds", "2",
              "--repeats", "1", "--sections")
    assert re.search(r"^ours batch 2: [\d.]+ \[", out, re.M) and "transformers batch 1:" in out, out
    assert re.search(r"^sampler batch 2: [\d.]+ \[", out, re.M), out
    assert re.search(r"^ours batch 2 sections \(cpu ms per round\): round [\d.]+, .*model forward [\d.]+", out, re.M), out


def test_bench_canvas_step_runs():
    """The side-by-side run of the canvas step's modes, uncompiled ones only (a compile takes tens of seconds): the
    static layout gives the mixed forward's tokens, the graphed counter rounds are reachable from the CLI."""
    out = keys(run("bench_canvas_step.py", "--modes", "mixed,static,counter", "--requests", "2", "--repeats", "1",
                   "--profile"))
    assert out["same_tokens_static"] == 2 and out["same_tokens_counter"] == 2
    assert {"speedup_n1_static", "ms_per_request_n1_mixed", "right_counter"} <= out.keys()
    # --profile: the GEMMs and SDPA were found; uncompiled modes run no inductor kernel and no compiled graph
    assert out["profile_static_gemm_attention_ms"] > 0 and out["profile_mixed_uniform_ms"] > 0
    assert out["profile_static_inductor_kernels_ms"] == 0 and out["profile_static_graph_calls"] == 0


def test_compare_times_a_judging_steps_forward(tiny_checkpoint_dir):
    """compare.py's round probe on the canvas step that decides inside its graph (a compiled server's in exact mode;
    run eagerly here, the compiled rounds are compare.py --torch-compile's): the forward it times is that step's,
    inside the round's wall time."""
    sys.path.insert(0, str(BENCH))
    try:
        import compare
    finally:
        sys.path.remove(str(BENCH))
    prompts = [[2, 5, 7, 9]] * 2
    got = compare.overhead_ratio(tiny_checkpoint_dir, prompts, batch=2, rounds=1, canvas_step="eager",
                                 pause_s=0.01, rounds_after_pause=2)
    assert 0 < got["forward"] < got["wall"] and got["kernels"] > 0
    assert got["after_pause"] > 0  # rounds ran after the pause
    # the forward alone, replayed without the sampler: it ran GEMMs and attention (no timing comparison: both sides
    # are noisy measurements)
    assert got["forward_alone_kernels"] > 0 and got["forward_ratio"] > 0
