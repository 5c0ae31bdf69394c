"""CPU micro-bench of the offline engine on a tiny random DiffusionGemma (no checkpoint, no server).

    .venv/bin/python bench/bench_offline.py --preset deep --steps 8 --canvases 4 --batch 8 --repeats 3 --threads 1

(bench/RESULTS.md also runs it with --wide, with --preset default --steps 4 --assert-parity, and with
--canvas-length 256.) Three comparisons, one summary line each; both sides of a ratio are timed in the same run,
alternating after one warm-up of each, and each figure is the median of --repeats runs (at least 5 for the
cheap comparison 3):

1. ours vs HF: `OfflineEngine.generate` vs transformers' `DiffusionGemmaForBlockDiffusion.generate` on the same
   weights, prompt and seed, batch 1, --canvases canvases of exactly --steps denoise steps. Adaptive stopping is
   off: HF's config rejects confidence_threshold=0, so both sides get the smallest normal float32 (a canvas would
   stop early only below 1.2e-38 nats of mean entropy), and the denoise forwards are counted on both sides and
   asserted to be canvases * steps. EOS is an id outside the vocabulary, so every canvas is kept.
   HF always generates whole canvases (ceil(max_new_tokens / C) of them, overshooting max_new_tokens up to C - 1
   tokens) while we cut at max_new_tokens; here max_new_tokens = canvases * C, so both return the same tokens count.
   The token lists are compared: bit-identical is expected on the "default" preset; on the deeper or wider models
   float rounding (different kernels: SDPA vs eager attention, per-expert matmuls vs grouped_mm) flips a
   multinomial draw after a few self-conditioned steps (see tests/models/test_parity.py), so the line reports the
   first divergence, and --assert-parity turns a mismatch into a failure.
2. batch --batch vs batch 1, ours: aggregate generated tokens/s of --batch concurrent requests (distinct prompts
   and seeds) in one engine vs one request alone. Request 0's tokens are compared with its solo run (reported, not
   asserted: batching changes GEMM shapes and so rounding, which the same chaos amplifies).
3. canvas vs token by token: one denoise forward over a C-position canvas vs C causal 1-token "commit" forwards
   (an autoregressive-style pass over the same C tokens through the same model and SDPA backend), after the same
   cached prompt. The 1-token forwards compute no LM head, so this ratio is, if anything, flattering to token by
   token.

Model: build_tiny_model(seed 0, --preset) plus --wide (WIDE below) and --override KEY=VALUE text-config overrides;
canvas length C = --canvas-length (the tiny presets use 32, the real checkpoint 256). Float32 on CPU, --threads
intra-op threads (default torch's; 1 is steadier when other processes share the cores). These are CPU figures on a
tiny random model: they show Python/dispatch overhead and per-forward parallelism, not GPU throughput of the real
26B checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

from sgl_diffusion.attention.kv import TorchKVStore
from sgl_diffusion.attention.sdpa import SdpaBackend
from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_model
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
from sgl_diffusion.runtime.offline import OfflineEngine
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams

# HF's generation config requires confidence_threshold > 0; mean entropy never gets below this on these models.
NO_EARLY_STOP = float(torch.finfo(torch.float32).tiny)
# Wider layers on the same layer pattern, so matmuls rather than Python dispatch dominate a forward (~67M params).
WIDE = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
            global_head_dim=128, moe_intermediate_size=256)  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hf, ours = make_pair(args)
    cfg = ours.cfg
    c = cfg.canvas_length
    vision = ("vision_tower", "embed_vision")
    n_params = sum(t.numel() for n, t in ours.named_parameters() if not n.startswith(vision))
    print(f"config: preset={args.preset} overrides={args.overrides} layers={cfg.num_layers} "
          f"hidden={cfg.hidden_size} vocab={cfg.vocab_size} C={c} text params={n_params / 1e6:.1f}M | "
          f"steps={args.steps} canvases={args.canvases} prompt={args.prompt_len} batch={args.batch} "
          f"repeats={args.repeats} | torch {torch.__version__} "
          f"threads={torch.get_num_threads()} transformers {transformers.__version__} | {load_average()}")

    gen = hf.generation_config
    gen.max_denoising_steps, gen.confidence_threshold = args.steps, NO_EARLY_STOP
    gen.max_new_tokens = args.canvases * c
    gen.eos_token_id = [cfg.vocab_size + 1]  # never sampled: every canvas is generated and kept
    defaults = DiffusionDefaults.from_generation_config(json.loads(gen.to_json_string()))
    engine = OfflineEngine(ours, eos_token_ids=())
    denoise_steps = count_denoise_steps(engine)
    prompts = [prompt_ids(args.prompt_len, cfg.vocab_size, seed=100 + i) for i in range(args.batch)]

    def params(seed):
        raw = {"seed": seed, "max_denoising_steps": args.steps, "confidence_threshold": NO_EARLY_STOP}
        return DiffusionParams.from_request(raw, defaults, vocab_size=cfg.vocab_size, canvas_length=c)

    def run_ours(n):
        reqs = [DiffusionRequest(prompts[i], params(args.seed + i), args.canvases * c) for i in range(n)]
        denoise_steps[0] = 0
        out = engine.generate(reqs)
        assert denoise_steps[0] == n * args.canvases * args.steps, ("ours stopped early", denoise_steps[0])
        return out

    def run_hf():
        torch.manual_seed(args.seed)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompts[0]]), generation_config=gen, return_dict_in_generate=True)
        tokens = out.sequences[0, args.prompt_len :].tolist()
        # tokens_per_forward = non-pad tokens / denoise forwards (pad can be sampled like any other id)
        passes = round(sum(t != gen.pad_token_id for t in tokens) / out.tokens_per_forward[0].item())
        assert passes == args.canvases * args.steps, ("HF stopped early", passes)
        return [tokens]

    # 1. ours vs HF, batch 1
    (t_ours, got), (t_hf, ref) = timed_pair(lambda: run_ours(1), run_hf, args.repeats)
    tok_ours, tok_hf = count(got) / t_ours, count(ref) / t_hf
    match = parity(got[0], ref[0])
    print(f"[1] ours vs HF generate, batch 1, {args.canvases}x{c} tokens at {args.steps} steps: "
          f"ours {tok_ours:.1f} tok/s ({t_ours * 1e3:.0f} ms), HF {tok_hf:.1f} tok/s ({t_hf * 1e3:.0f} ms), "
          f"ratio ours/HF = {tok_ours / tok_hf:.2f}x | {match}")
    if args.assert_parity:
        assert got[0] == ref[0], match

    # 2. batch N vs batch 1, ours
    (t_b, out_b), (t_1, out_1) = timed_pair(lambda: run_ours(args.batch), lambda: run_ours(1), args.repeats)
    tok_b, tok_1 = count(out_b) / t_b, count(out_1) / t_1
    # NOTE: not asserted: a bigger batch changes GEMM shapes, hence float rounding, and a flipped draw then spreads.
    alone = parity(out_b[0], out_1[0]).replace("tokens", "request 0 tokens vs alone:", 1)
    print(f"[2] ours batch {args.batch} vs batch 1: {tok_b:.1f} vs {tok_1:.1f} tok/s aggregate "
          f"({t_b * 1e3:.0f} vs {t_1 * 1e3:.0f} ms per generate), ratio = {tok_b / tok_1:.2f}x "
          f"(ideal {args.batch}x) | {alone}")

    # 3. one canvas forward vs C single-token forwards
    t_canvas, t_tokens = canvas_vs_tokens(ours, prompts[0], args.repeats)
    ratio = t_tokens / t_canvas
    print(f"[3] one canvas forward ({c} positions) {t_canvas * 1e3:.1f} ms vs {c} causal 1-token forwards "
          f"{t_tokens * 1e3:.1f} ms ({t_tokens / c * 1e3:.1f} ms each): ratio = {ratio:.1f}x "
          f"(a canvas costs less forward time than token-by-token while steps per canvas < {ratio:.1f}, "
          f"plus one commit forward; here steps={args.steps})")
    print(f"done | {load_average()}")


# ---- helpers ---------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="deep", choices=["default", "deep"])
    p.add_argument("--wide", action="store_true", help=f"apply the WIDE overrides: {WIDE}")
    p.add_argument("--override", action="append", default=[], metavar="KEY=INT",
                   help="text-config override passed to build_tiny_model, e.g. num_hidden_layers=6 (repeatable)")
    p.add_argument("--canvas-length", type=int, default=None, help="canvas length C (default: the preset's, 32)")
    p.add_argument("--steps", type=int, default=8, help="denoise steps per canvas (adaptive stopping off)")
    p.add_argument("--canvases", type=int, default=4, help="canvases per request")
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median), after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--assert-parity", action="store_true", help="fail unless ours == HF token for token (batch 1)")
    args = p.parse_args()
    args.overrides = (WIDE if args.wide else {}) | {k: int(v) for k, v in (o.split("=", 1) for o in args.override)}
    return args


def make_pair(args):
    """HF model and ours on the same weights, as in tests/models/test_parity.py."""
    hf = build_tiny_model(args.seed, args.preset, **args.overrides)
    if args.canvas_length is not None:
        hf.config.canvas_length = args.canvas_length  # read by HF generate and by our config; no weight depends on it
    ours = DiffusionGemmaForBlockDiffusion(hf.config).eval()
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def count_denoise_steps(engine: OfflineEngine) -> list[int]:
    """Wrap the engine's runner so that counter[0] counts canvas denoise steps (one per canvas per forward)."""
    counter, runner = [0], engine.scheduler.runner
    run = runner.run

    def counting_run(batch, states):
        counter[0] += len(states)
        return run(batch, states)

    runner.run = counting_run
    return counter


def load_average() -> str:
    """Other processes on the machine skew CPU timings; the load average makes that visible."""
    with open("/proc/loadavg") as f:
        return "loadavg " + " ".join(f.read().split()[:3])


def prompt_ids(length: int, vocab: int, seed: int) -> list[int]:
    # NOTE: ids 0..23 are special tokens (pad, eos, image, ...); a prompt of ordinary tokens avoids image handling.
    return torch.randint(24, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def timed_pair(fn_a, fn_b, repeats: int):
    """Warm both up, then alternate a, b `repeats` times; ((median s, last output) for a, same for b)."""
    out_a, out_b = fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out_a = fn_a()
        t1 = time.perf_counter()
        out_b = fn_b()
        t2 = time.perf_counter()
        times_a.append(t1 - t0)
        times_b.append(t2 - t1)
    return (statistics.median(times_a), out_a), (statistics.median(times_b), out_b)


def count(outputs: list[list[int]]) -> int:
    return sum(len(o) for o in outputs)


def parity(got: list[int], ref: list[int]) -> str:
    if got == ref:
        return f"tokens identical ({len(got)})"
    first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    return f"tokens differ from position {first} of {len(ref)} (lengths {len(got)}/{len(ref)})"


def canvas_vs_tokens(model, prompt: list[int], repeats: int) -> tuple[float, float]:
    """Median seconds of one canvas denoise forward and of C 1-token commit forwards, after a cached prompt."""
    cfg = model.cfg
    c, p = cfg.canvas_length, len(prompt)
    kv = TorchKVStore(p + c, [(s.num_kv_heads, s.head_dim) for s in cfg.layers], torch.float32)
    attn = SdpaBackend(kv, cfg.sliding_window)
    prompt_slots = torch.arange(p)
    none = torch.empty(0, dtype=torch.long)
    model(CanvasBatch([Segment("prefill", 0, p, 0, none, prompt_slots)], torch.tensor(prompt)), attn)

    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (c,), generator=gen)
    soft = torch.randn(c, cfg.hidden_size, generator=gen)  # a later step's self-conditioning input

    def canvas_step():
        model.logits(model(CanvasBatch([Segment("canvas", 0, c, p, prompt_slots)], tokens, soft), attn))

    def token_by_token():
        # NOTE: each forward writes one slot after the prompt; a repeat overwrites the same slots with the same KV.
        for i in range(c):
            seg = Segment("commit", 0, 1, p + i, torch.arange(p + i), torch.tensor([p + i]))
            model(CanvasBatch([seg], tokens[i : i + 1]), attn)

    (t_canvas, _), (t_tokens, _) = timed_pair(canvas_step, token_by_token, max(repeats, 5))
    return t_canvas, t_tokens


if __name__ == "__main__":
    main()
