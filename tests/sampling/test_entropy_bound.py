"""Entropy-Bound sampler checked against transformers' own DiffusionGemma classes on random logits."""

import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from sgl_diffusion.sampling import entropy_bound as eb
from sgl_diffusion.sampling import (
    DiffusionParams,
    SamplerRow,
    init_canvas_noise,
    new_history,
    prepare,
    push_history,
    step,
    temperature,
)

C, V = 16, 64
BASE = DiffusionParams(max_denoising_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                       confidence_threshold=0.005, stability_threshold=1)


def params(**kw) -> DiffusionParams:
    return dataclasses.replace(BASE, **kw)


def random_logits(seed: int, batch: int = 1) -> torch.Tensor:
    """[B, C, V] softcapped logits whose sharpness varies by position, so entropies spread out."""
    g = torch.Generator().manual_seed(seed)
    sharpness = torch.logspace(-1, 1.5, C)[torch.randperm(C, generator=g)]
    logits = torch.randn(batch, C, V, generator=g) * sharpness[:, None]
    return 30.0 * torch.tanh(logits / 30.0)


def hf_scaled(logits: torch.Tensor, p: DiffusionParams, s: int) -> torch.Tensor:
    proc = LinearTemperatureScheduleLogitsProcessor(p.t_min, p.t_max, p.max_denoising_steps)
    return proc(None, logits, cur_step=torch.tensor(s, dtype=torch.int32))  # HF passes an int32 tensor


def hf_sampler(p: DiffusionParams) -> EntropyBoundSampler:
    config = EntropyBoundSamplerConfig(entropy_bound=p.entropy_bound)
    return EntropyBoundSampler(config, canvas_length=C, vocab_size=V, max_denoising_steps=p.max_denoising_steps)


def row(p: DiffusionParams, s: int, history: torch.Tensor | None = None) -> SamplerRow:
    return SamplerRow(p, s, new_history(p.stability_threshold, C) if history is None else history)


def run(logits, rows, generators=None):
    return step(logits, prepare(rows), generators or [None] * len(rows))


@pytest.mark.parametrize("t_min,t_max,n", [(0.4, 0.8, 48), (0.3, 1.7, 13), (0.05, 2.9, 1000), (0.7, 0.7, 5)])
def test_temperature_matches_hf_processor(t_min, t_max, n):
    """logits / temperature(s) equals HF's processor output bit for bit at every step s = N..1."""
    logits = random_logits(0)
    for s in range(n, 0, -1):
        ours = logits / temperature(s, n, t_min, t_max)
        assert torch.equal(ours, hf_scaled(logits, params(t_min=t_min, t_max=t_max, max_denoising_steps=n), s)), s


def test_batched_temperatures_are_hf_per_row():
    """prepare() gives each row HF's temperature for its own (s, N, t_min, t_max), bit for bit, in any row order."""
    rows = [row(params(t_min=0.3, t_max=1.7, max_denoising_steps=13), 5), row(BASE, 48), row(BASE, 7),
            row(params(t_min=0.05, t_max=2.9, max_denoising_steps=1000), 999), row(BASE, 1)]
    logits = random_logits(8, batch=len(rows))
    temp = prepare(rows).temperature
    for b, r in enumerate(rows):
        assert torch.equal(logits[b : b + 1] / temp[b], hf_scaled(logits[b : b + 1], r.params, r.step_remaining)), b


class ArithmeticOps(TorchDispatchMode):
    """Records the arithmetic ops that run, with each operand's kind: a tensor's dtype and device, or a number."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.div, torch.ops.aten.mul, torch.ops.aten.add):
            self.ops.append((func.overloadpacket.__name__, *(
                (a.dtype, a.device.type, "wrapped" if a.dim() == 0 and a.device.type == "cpu" else "tensor")
                if isinstance(a, torch.Tensor) else (type(a).__name__, a) for a in args)))
        return func(*args, **(kwargs or {}))


def test_temperature_runs_hf_ops_on_the_logits_device():
    """The schedule is HF's own expression evaluated where the logits live: the same ops, in the same order, with an
    int32 step tensor on that device and Python numbers elsewhere. (On CUDA, `step / N` with a CPU-scalar N is a
    multiply by 1/N; computing on the CPU and copying would differ from HF there by an ulp on some steps.)"""
    device = torch.device("meta")  # stands for CUDA: a device tensor that is not the CPU
    p = params(t_min=0.3, t_max=1.7, max_denoising_steps=13)
    with ArithmeticOps() as hf_ops:
        LinearTemperatureScheduleLogitsProcessor(p.t_min, p.t_max, 13)(
            None, torch.empty(1, C, V, device=device), cur_step=torch.tensor(5, dtype=torch.int32, device=device))
    with ArithmeticOps() as ours:
        temp = prepare([row(p, 5, new_history(1, C, device)), row(p, 9, new_history(1, C, device))]).temperature
    assert temp.device == device and temp.dtype == torch.float32
    assert hf_ops.ops[0] == ("div", (torch.int32, "meta", "tensor"), ("int", 13))
    assert ours.ops == hf_ops.ops[:-1]  # HF's last op is `scores / temperature`


def test_temperature_endpoints():
    """First step gives t_max (0.8), last gives t_min + (t_max - t_min) / N (0.4 + 0.4/48), batched or not."""
    batched = temperature([48, 1], [48, 48], [0.4, 0.4], [0.8, 0.8])
    assert batched.dtype == torch.float32 and batched[0].item() == pytest.approx(0.8, abs=1e-7)
    assert batched[1].item() == pytest.approx(0.4 + 0.4 / 48, abs=1e-7)
    assert torch.equal(batched, torch.stack([temperature(48, 48, 0.4, 0.8), temperature(1, 48, 0.4, 0.8)]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bound", [1e-4, 0.1, 0.5, 3.0, 1e6])
def test_acceptance_matches_hf_sampler(seed, bound):
    """The accepted mask equals EntropyBoundSampler.accept_canvas's for several logits, bounds and steps."""
    p = params(entropy_bound=bound)
    logits = random_logits(seed, batch=2)
    for s in (48, 20, 1):
        sampler = hf_sampler(p)
        canvas = torch.zeros(2, C, dtype=torch.long)
        sampler.accept_canvas(canvas, canvas, hf_scaled(logits, p, s), s)
        ours = run(logits, [row(p, s), row(p, s)]).accepted
        assert torch.equal(ours, sampler.accepted_token_mask)
        assert ours.all() == (bound == 1e6)  # the bound actually bites (or not) as intended


def test_acceptance_bound_is_inclusive():
    """A bound equal to cumsum - current at the k-th lowest entropy accepts k+1 tokens; one ulp less accepts k."""
    p, s, k = params(), 30, 4
    scaled = hf_scaled(random_logits(3), p, s)
    entropy = torch.distributions.Categorical(logits=scaled).entropy()[0]
    sorted_entropy = entropy.sort().values
    lhs = sorted_entropy.cumsum(0) - sorted_entropy
    assert lhs[k] > lhs[k - 1]
    ulp = (torch.nextafter(lhs[k], lhs[k] + 1) - lhs[k]).item()
    cases = [
        (lhs[k].item(), k + 1),
        (torch.nextafter(lhs[k], lhs[k - 1]).item(), k),
        (lhs[k].item() - ulp / 4, k + 1),  # HF rounds a Python-float bound to fp32 before comparing
    ]
    for bound, expected in cases:
        sampler = hf_sampler(params(entropy_bound=bound))
        sampler.accept_canvas(torch.zeros(1, C, dtype=torch.long), torch.zeros(1, C, dtype=torch.long), scaled, s)
        ours = run(random_logits(3), [row(params(entropy_bound=bound), s)]).accepted
        assert ours.sum().item() == expected
        assert torch.equal(ours, sampler.accepted_token_mask)


def test_mean_entropy_matches_hf_categorical():
    """mean_entropy equals the stopping criterion's mean Categorical(logits / T) entropy bit for bit."""
    for seed in range(5):
        logits, s = random_logits(seed, batch=3), 48 - 9 * seed
        want = torch.distributions.Categorical(logits=hf_scaled(logits, BASE, s)).entropy().mean(-1)
        assert torch.equal(run(logits, [row(BASE, s)] * 3).mean_entropy, want), seed


def test_at_least_one_token_accepted():
    """With bound 0, even flat logits (all entropies equal) or random ones accept exactly one token per row."""
    p = params(entropy_bound=0.0)
    logits = torch.cat([torch.zeros(1, C, V), random_logits(4)])
    accepted = run(logits, [row(p, 10), row(p, 10)]).accepted
    assert accepted.sum(-1).tolist() == [1, 1]


def _pattern_logits(pattern: torch.Tensor, confident: bool) -> torch.Tensor:
    """[1, C, V] logits whose argmax is `pattern` [C]; near-zero entropy when confident."""
    g = torch.Generator().manual_seed(int(pattern.sum()))
    logits = torch.randn(1, C, V, generator=g) * (0.1 if confident else 1.0)
    logits[0, torch.arange(C), pattern] = 25.0 if confident else 3.0
    return logits


@pytest.mark.parametrize("threshold", [0, 1, 2])
@pytest.mark.parametrize("confident", [True, False])
def test_stop_rule_matches_hf_criteria(threshold, confident):
    """done (before the last step) equals StableAndConfidentStoppingCriteria over a sequence of argmax canvases."""
    p = params(stability_threshold=threshold, max_denoising_steps=10)
    a, b = torch.arange(C) % V, (torch.arange(C) * 7 + 3) % V
    hf = StableAndConfidentStoppingCriteria(threshold, p.confidence_threshold)
    history, got, want = new_history(threshold, C), [], []
    for s, pattern in zip(range(10, 2, -1), [a, a, b, b, b, a, a, a]):
        logits = _pattern_logits(pattern, confident)
        scaled = hf_scaled(logits, p, s)
        want.append(hf(scaled.argmax(-1), scaled).item())
        result = run(logits, [row(p, s, history)])
        history = push_history(history, result.argmax[0])
        got.append(result.done.item())
    assert got == want
    assert any(want) == confident  # the sequence does trigger a stop when confident


def test_last_step_forces_done():
    """An unstable, unconfident row is done on its last step (s == 1) and not before."""
    p = params(stability_threshold=2)
    logits = random_logits(5, batch=2)
    result = run(logits, [row(p, 2), row(p, 1)])
    assert result.done.tolist() == [False, True] and not result.stable.any()


def test_mixed_batch_equals_rows_alone():
    """Rows at different steps with different params and histories give the same results batched as alone."""
    rows = [
        row(params(stability_threshold=0, confidence_threshold=10.0), 48),
        row(params(t_min=0.2, t_max=1.5, max_denoising_steps=20, entropy_bound=0.8, stability_threshold=1), 7),
        row(params(entropy_bound=2.0, stability_threshold=2, confidence_threshold=10.0), 3),
    ]
    logits = random_logits(6, batch=3)
    # give row 2 a history equal to its own argmax, so stability is exercised on both sides
    alone_argmax = run(logits[2:3], [rows[2]]).argmax[0]
    rows[2] = rows[2]._replace(history=torch.stack([alone_argmax, alone_argmax]))

    seeds = [11, 22, 33]
    batched = run(logits, rows, [torch.Generator().manual_seed(x) for x in seeds])
    for b, (r, seed) in enumerate(zip(rows, seeds)):
        alone = run(logits[b : b + 1], [r], [torch.Generator().manual_seed(seed)])
        for name, got, want in zip(alone._fields, batched, alone):
            assert torch.equal(got[b : b + 1], want), (b, name)
    assert batched.stable.tolist() == [True, False, True]
    assert batched.done.tolist() == [True, False, True]


def test_self_conditioning_probs_are_computed_in_the_model_dtype_like_hf():
    """HF keeps `logits / T` in the model dtype D and its decoder takes softmax(float32(.)).to(D): in bf16 the logits
    are rounded before the softmax. In fp32 that is the sampling softmax itself."""
    p, s = params(), 20
    logits = random_logits(9, batch=2) * 2.5  # up to 75 once divided by T, where bf16 spacing is 0.5
    scaled = hf_scaled(logits, p, s)
    hf_bf16 = scaled.to(torch.bfloat16).softmax(dim=-1, dtype=torch.float32).to(torch.bfloat16)
    got = run_dtype(logits, [row(p, s)] * 2, torch.bfloat16).self_conditioning_probs
    assert got.dtype == torch.bfloat16 and torch.equal(got, hf_bf16)
    assert not torch.equal(got, torch.softmax(scaled, dim=-1).to(torch.bfloat16))  # the order matters
    fp32 = run_dtype(logits, [row(p, s)] * 2, torch.float32).self_conditioning_probs
    assert torch.equal(fp32, scaled.softmax(dim=-1, dtype=torch.float32))


def test_a_temperature_that_overflows_fp16_feeds_the_argmax_one_hot_not_nan():
    """Temperature 0 (1e-6) in an fp16 model: logits / T overflow fp16, and HF's self-conditioning softmax is NaN
    there (the next forward's logits with it: a 500 through the server). Those positions take the T -> 0 limit, the
    argmax's one-hot, in the exact step and in the compiled round's `decide` alike; a request beside them at an
    ordinary temperature keeps HF's fp16 bits."""
    from sgl_diffusion.sampling import graph_sampler as gs

    logits, s = random_logits(5, batch=2), 20
    cold, warm = params(t_min=1e-6, t_max=1e-6), params()
    assert hf_scaled(logits[:1], cold, s).to(torch.float16).softmax(-1, dtype=torch.float32).isnan().any(-1).all()
    got = run_dtype(logits, [row(cold, s), row(warm, s)], torch.float16)
    one_hot = torch.nn.functional.one_hot(got.argmax[0], V).to(torch.float16)
    hf_warm = hf_scaled(logits[1:], warm, s).to(torch.float16).softmax(-1, dtype=torch.float32).to(torch.float16)
    assert torch.equal(got.self_conditioning_probs[0], one_hot)
    assert torch.equal(got.self_conditioning_probs[1:], hf_warm)
    state = gs.graph_state([cold, warm], [0, 1], [0, 0], [s, s], [new_history(1, C)] * 2, "cpu")
    assert torch.equal(gs.decide(logits, state, torch.float16).self_conditioning_probs, got.self_conditioning_probs)


def run_dtype(logits, rows, dtype):
    return step(logits, prepare(rows), [None] * len(rows), self_conditioning_dtype=dtype)


def test_step_does_not_modify_inputs():
    """step leaves the logits, the args and the generators' stream owners untouched (works on copies)."""
    logits = random_logits(7, batch=2)
    args = prepare([row(params(stability_threshold=2), 5, torch.randint(0, V, (2, C))), row(params(), 9)])
    before = (logits.clone(), [None if t is None else t.clone() for t in args])
    step(logits, args, [None, None])
    assert torch.equal(logits, before[0])
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(args, before[1]))


def test_init_canvas_noise_draws_like_hf_then_overwrites_prefix():
    """The first canvas draws HF's randint(0, V, (1, C)) and only then writes init_canvas over its prefix."""
    torch.manual_seed(123)
    hf_noise = hf_sampler(BASE).initialize_canvas(batch_size=1, device="cpu")[0]
    hf_next = torch.rand(3)
    g = torch.Generator().manual_seed(123)
    canvas = init_canvas_noise(C, V, g, init_canvas=[5, 6, 7])
    assert canvas[:3].tolist() == [5, 6, 7] and torch.equal(canvas[3:], hf_noise[3:])
    assert torch.equal(torch.rand(3, generator=g), hf_next)  # same amount of RNG consumed


def _fake_decoder(canvas: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """[1, C, V] logits that depend on the canvas, so any divergence in canvases shows up in later logits."""
    return 30.0 * torch.tanh((base + 4.0 * torch.nn.functional.one_hot(canvas, V)) / 30.0)


def test_rng_matches_hf_generate_loop():
    """Two canvases (the second stops early) reproduce HF's loop with torch.manual_seed bit for bit."""
    p, seed, n = params(max_denoising_steps=8, stability_threshold=1, confidence_threshold=0.005), 1234, 8
    g = torch.Generator().manual_seed(0)
    bases = [torch.randn(n, 1, C, V, generator=g) * 2.0,  # canvas 1: never confident, runs all 8 steps
             torch.randn(n, 1, C, V, generator=g) * 0.1]
    bases[1][:, 0, torch.arange(C), torch.arange(C)] = 40.0  # canvas 2: confident and stable -> early stop

    # HF, op for op as DiffusionGemmaGenerationMixin._denoising_step with batch size 1 and the global RNG
    torch.manual_seed(seed)
    sampler, proc = hf_sampler(p), LinearTemperatureScheduleLogitsProcessor(p.t_min, p.t_max, n)
    criteria = StableAndConfidentStoppingCriteria(p.stability_threshold, p.confidence_threshold)
    hf_trace = []
    for base in bases:
        current = sampler.initialize_canvas(1, "cpu")
        criteria.reset()
        hf_trace.append(current.clone())
        for s in range(n, 0, -1):
            cur_step = torch.tensor(s, dtype=torch.int32)
            scaled = proc(None, _fake_decoder(current, base[n - s]), cur_step=cur_step)
            probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
            denoiser = torch.multinomial(probs.view(-1, V), num_samples=1).squeeze(-1).view(1, C)
            argmax = scaled.argmax(-1)
            current = sampler.renoise_canvas(sampler.accept_canvas(current, denoiser, scaled, cur_step), cur_step)
            finished = criteria(argmax, scaled)
            hf_trace += [current.clone(), argmax.clone(), finished.clone()]
            if finished.all():
                break

    # ours, with a private generator; the global RNG is reseeded to something else to prove it is not used
    torch.manual_seed(seed + 1)
    gen, trace, rejected = torch.Generator().manual_seed(seed), [], 0
    for base in bases:
        canvas, history = init_canvas_noise(C, V, gen)[None], new_history(p.stability_threshold, C)
        trace.append(canvas.clone())
        for s in range(n, 0, -1):
            result = run(_fake_decoder(canvas, base[n - s]), [row(p, s, history)], [gen])
            history = push_history(history, result.argmax[0])
            canvas = result.next_canvas
            rejected += (~result.accepted).sum().item()
            trace += [canvas.clone(), result.argmax.clone(), result.done & (s > 1)]  # HF's flag excludes s == 1
            if result.done.all():
                break

    assert len(trace) == len(hf_trace) < 2 * (1 + 3 * n)  # same length, and canvas 2 did stop early
    assert rejected > 0  # renoised positions are visible in the compared canvases
    for i, (got, want) in enumerate(zip(trace, hf_trace)):
        assert torch.equal(got, want), i


@pytest.mark.parametrize("chunk", [1 << 16, 3 * V + 5])  # one chunk; chunks that split a canvas and span two
def test_multinomial_rows_is_torch_multinomial_per_row(monkeypatch, chunk):
    """The CPU draw equals one torch.multinomial per row bit for bit, and leaves every generator where it would."""
    monkeypatch.setattr(eb, "DRAW_CHUNK", chunk)
    assert eb._exponential_is_neg_log1p()  # else the fallback (torch.multinomial itself) would be tested
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(3, C, V, generator=g) * torch.rand(3, C, 1, generator=g) * 8, dim=-1)
    probs[1, :, 7] = 0  # a banned token
    for seed in range(20):
        gens, refs = ([torch.Generator().manual_seed(seed + b) for b in range(3)] for _ in range(2))
        want = torch.stack([torch.multinomial(probs[b], 1, generator=refs[b]).squeeze(-1) for b in range(3)])
        assert torch.equal(eb.multinomial_rows(probs, gens), want)
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, refs))
    with pytest.raises(RuntimeError, match="nan"):
        eb.multinomial_rows(torch.full((1, C, V), float("nan")), [None])


def test_exponential_near_a_float32_midpoint_is_glibc_rounded():
    """Values within a few float64 ulps of a float32 rounding midpoint take glibc's log1p, as exponential_ does."""
    mids = [(1.0 + (2 * k + 1) * 2.0**-24) * 2.0**e for k in range(50) for e in (-3, 0, 2)]  # float32 midpoints
    u = torch.tensor([-math.expm1(-m) for m in mids], dtype=torch.float64)  # -log1p(-u) lands next to each one
    want = torch.tensor([-math.log1p(-x) for x in u.tolist()], dtype=torch.float64).to(torch.float32)
    assert torch.equal(eb._exponential_(u.clone()), want)
