"""Graph-mode Entropy-Bound sampler (sampling/graph_sampler.py): the counter-based generator, and the step checked
against exact mode (entropy_bound.step) with the random phases stubbed the same way on both sides."""

import dataclasses
import math

import pytest
import torch

from sgl_diffusion.sampling import entropy_bound as eb
from sgl_diffusion.sampling import graph_sampler as gs
from sgl_diffusion.sampling.params import DiffusionParams

BASE = DiffusionParams(max_denoising_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                       confidence_threshold=0.005, stability_threshold=1)
M32 = 0xFFFFFFFF


def params(**kw) -> DiffusionParams:
    return dataclasses.replace(BASE, **kw)


def random_logits(seed: int, batch: int, c: int, v: int) -> torch.Tensor:
    """[B, C, V] softcapped logits whose sharpness varies by position, so entropies spread out."""
    g = torch.Generator().manual_seed(seed)
    sharpness = torch.logspace(-1, 1.5, c)[torch.randperm(c, generator=g)]
    return 30.0 * torch.tanh(torch.randn(batch, c, v, generator=g) * sharpness[:, None] / 30.0)


def state_for(ps, seeds, steps, c, canvas_index=None, histories=None):
    histories = histories or [eb.new_history(p.stability_threshold, c) for p in ps]
    return gs.graph_state(ps, seeds, canvas_index or [0] * len(ps), steps, histories, "cpu")


def uniforms(seed, canvas, step, position, cols, stream=0):
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return gs.counter_uniform(t(seed), t(canvas), t(step), t(position), cols, stream)


# ----------------------------------------------------------------------------------------------------------------
# the generator


def murmur3_reference(words, seed=0):
    """MurmurHash3_x86_32 of little-endian 32-bit words, Appleby's reference in plain Python integers."""
    rotl = lambda x, r: ((x << r) | (x >> (32 - r))) & M32  # noqa: E731
    h = seed & M32
    for k in words:
        k = (k & M32) * 0xCC9E2D51 & M32
        k = rotl(k, 15) * 0x1B873593 & M32
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & M32
    h ^= 4 * len(words)
    h ^= h >> 16
    h = h * 0x85EBCA6B & M32
    h ^= h >> 13
    h = h * 0xC2B2AE35 & M32
    return h ^ (h >> 16)


def test_murmur3_matches_published_vectors_and_reference():
    """The int64 implementation (no overflowing product) is MurmurHash3_x86_32: published vectors and a reference."""
    vectors = [([], 0, 0), ([], 1, 0x514E28B7), ([0], 0, 0x2362F9DE), ([0x61616161], 0x9747B28C, 0x5A97808A)]
    for words, seed, want in vectors:
        assert gs.murmur3_words(words, seed).item() == want == murmur3_reference(words, seed)
    g = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**62), 2**62, (7, 500), generator=g)
    words[:, :4] = torch.tensor([0, M32, -1, 2**63 - 1])  # extremes, negative values use their low 32 bits
    got = gs.murmur3_words(list(words), seed=0x9747B28C).tolist()
    assert got == [murmur3_reference([w & M32 for w in col], 0x9747B28C) for col in words.T.tolist()]


def test_counter_uniform_is_the_documented_key_layout():
    """u[r, j] = (k + 0.5) / 2^52, k = lane0 << 20 | lane1 >> 12, lane l = murmur3([seed lo, seed hi, canvas, step,
    2 * stream + l, position, j]): negative and high-bit seeds included."""
    seeds, canvas, step, pos, cols, stream = [-5, 2**40 + 3, 7], [0, 3, 2**33], [48, 1, 12], [0, 255, 9], 6, 1
    got = uniforms(seeds, canvas, step, pos, cols, stream)
    assert got.dtype == torch.float64 and got.shape == (3, cols)
    for r in range(3):
        for j in range(cols):
            key = [seeds[r] & M32, (seeds[r] >> 32) & M32, canvas[r], step[r], 2 * stream, pos[r], j]
            a = murmur3_reference(key)
            b = murmur3_reference(key[:4] + [2 * stream + 1] + key[5:])
            assert got[r, j].item() == ((a << 20 | b >> 12) + 0.5) * 2.0**-52, (r, j)


def test_uniforms_are_strictly_inside_the_unit_interval():
    """The extreme hashes map to 2^-53 and 1 - 2^-53 (so -log u is finite and > 0); a large sample has mean 1/2 and
    variance 1/12 within 5 sigma."""
    lo = gs._to_uniform(torch.tensor([0]), torch.tensor([0])).item()
    hi = gs._to_uniform(torch.tensor([M32]), torch.tensor([M32])).item()
    assert (lo, hi) == (2.0**-53, 1 - 2.0**-53)
    assert 0 < -math.log(hi) and math.isfinite(-math.log(lo))
    n_rows, cols = 64, 4096
    u = uniforms(list(range(n_rows)), [0] * n_rows, [1] * n_rows, [0] * n_rows, cols).flatten()
    n = u.numel()
    assert 0 < u.min().item() and u.max().item() < 1
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # Var of (u - 1/2)^2 is 1/80 - 1/144


def test_draws_are_deterministic_and_fresh():
    """Same (seed, canvas, step, position, stream) -> the same uniforms; changing any one of them changes every
    uniform of the row (no shared values), whichever of its 32 bits (or the seed's high word) changes."""
    key = dict(seed=[123456789], canvas=[2], step=[17], position=[5], stream=0)

    def draw(**kw):
        k = {**key, **kw}
        return uniforms(k["seed"], k["canvas"], k["step"], k["position"], 512, k["stream"])

    base = draw()
    assert torch.equal(base, draw())
    changes = [dict(seed=[123456788]), dict(seed=[123456789 + 2**32]), dict(seed=[123456789 - 2**63]),
               dict(canvas=[3]), dict(canvas=[2 + 2**31]), dict(step=[16]), dict(position=[6]),
               dict(position=[5 + 2**20]), dict(stream=1)]
    for change in changes:
        other = draw(**change)
        assert not torch.isin(other, base).any(), change
    # vocab ids: no two columns of a row share a value
    assert base.unique().numel() == base.numel()


@pytest.mark.parametrize("stream", [0, 1])
def test_uniform_columns_and_rows_are_uncorrelated(stream):
    """Adjacent vocab ids and adjacent positions give uncorrelated uniforms (|corr| < 5 / sqrt(n))."""
    rows = 256
    u = uniforms([7] * rows, [0] * rows, [3] * rows, list(range(rows)), 512, stream)
    n = u[:, :-1].numel()
    col_corr = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1].item()
    row_corr = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1].item()
    assert abs(col_corr) < 5 / math.sqrt(n) and abs(row_corr) < 5 / math.sqrt(n)


def test_draws_use_the_documented_streams():
    """Candidates: stream 0, argmax probs / -log u over vocab ids; renoise: stream 1, floor(u * V) at vocab id 0;
    initial noise: stream 2 at step 0. Distinct streams, so a position's noise is independent of its candidate."""
    rows, c, v = 3, 16, 50
    state = state_for([BASE] * rows, [1, -2, 2**40], [48, 7, 1], c, canvas_index=[0, 5, 1])
    keys = [x[:, None].expand(rows, c).flatten() for x in (state.seed, state.canvas_index, state.step_remaining)]
    pos = torch.arange(c).repeat(rows)
    probs = torch.softmax(random_logits(2, rows, c, v), dim=-1)
    u0 = gs.counter_uniform(*keys, pos, v, 0)
    assert torch.equal(gs.counter_multinomial(probs, state).flatten(), (probs.flatten(0, 1) / -u0.log()).argmax(-1))
    u1 = gs.counter_uniform(*keys, pos, 1, 1)[:, 0]
    assert torch.equal(gs.counter_noise(state, c, v).flatten(), (u1 * v).floor().long())
    u2 = gs.counter_uniform(*keys[:2], torch.zeros_like(pos), pos, 1, 2)[:, 0]
    assert torch.equal(gs.graph_init_noise(state, c, v).flatten(), (u2 * v).floor().long())


def binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_candidate_draw_follows_the_probabilities():
    """Stream 0 over probs [.5, .25, .125, .0625, .0625, 0] at 4 x 1000 positions x 25 steps: every frequency is
    within 5 binomial sigmas (seeds fixed: deterministic), and the zero-probability token is never drawn."""
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    rows, c, steps = 4, 1000, 25
    probs = p.expand(rows, c, 6)
    state = state_for([BASE] * rows, [11, -22, 2**40, 44], [48] * rows, c)
    counts = torch.zeros(6, dtype=torch.long)
    for s in range(1, steps + 1):
        st = state._replace(step_remaining=torch.full((rows,), s, dtype=torch.int32))
        counts += torch.bincount(gs.counter_multinomial(probs, st).flatten(), minlength=6)
    n = rows * c * steps
    assert counts[5] == 0
    for v in range(5):
        assert binomial_ok(counts[v].item(), n, p[v].item()), (v, counts.tolist())


def test_candidate_draw_does_not_depend_on_chunking():
    """The draw is the same in one chunk, one position per chunk, and chunks that split rows unevenly."""
    probs = torch.softmax(random_logits(1, 3, 16, 50), dim=-1)
    state = state_for([BASE] * 3, [1, 2, 3], [48, 7, 1], 16)
    one = gs.counter_multinomial(probs, state)
    for chunk in (1, 50, 7 * 50 + 13, 48 * 50):
        assert torch.equal(gs.counter_multinomial(probs, state, draw_chunk=chunk), one), chunk


def test_noise_ids_are_uniform_and_in_range():
    """Stream 1 ids over V = 7 (not a power of two) at 4 x 1000 positions x 25 steps: in [0, V), each id within 5
    sigmas of n / V. The initial-canvas noise (stream 2) is in range, uniform, and a different stream."""
    rows, c, v, steps = 4, 1000, 7, 25
    state = state_for([BASE] * rows, [5, 6, 7, 8], [48] * rows, c)
    counts = torch.zeros(v, dtype=torch.long)
    for s in range(1, steps + 1):
        noise = gs.counter_noise(state._replace(step_remaining=torch.full((rows,), s, dtype=torch.int32)), c, v)
        assert noise.dtype == torch.int64 and noise.shape == (rows, c)
        assert noise.min() >= 0 and noise.max() < v
        counts += torch.bincount(noise.flatten(), minlength=v)
    assert all(binomial_ok(x, rows * c * steps, 1 / v) for x in counts.tolist()), counts.tolist()
    init = gs.graph_init_noise(state, c, v)
    assert init.min() >= 0 and init.max() < v
    assert all(binomial_ok(x, rows * c, 1 / v) for x in torch.bincount(init.flatten(), minlength=v).tolist())
    assert (init != gs.counter_noise(state, c, v)).float().mean() > 0.5


# ----------------------------------------------------------------------------------------------------------------
# the step

C, V = 16, 50


def mixed_batch():
    """3 rows with different params, steps and histories, fixed positions on row 1 and a banned token on row 2."""
    ps = [params(stability_threshold=2, confidence_threshold=10.0),
          params(t_min=0.3, t_max=1.7, max_denoising_steps=13, entropy_bound=0.8),
          params(t_min=0.05, t_max=2.9, max_denoising_steps=30, entropy_bound=2.0, stability_threshold=0)]
    g = torch.Generator().manual_seed(3)
    histories = [torch.randint(0, V, (2, C), generator=g), torch.randint(0, V, (1, C), generator=g),
                 eb.new_history(0, C)]
    fixed = torch.zeros(3, C, dtype=torch.bool)
    fixed[1, [0, 4, 9]] = True
    fixed_tokens = torch.zeros(3, C, dtype=torch.long)
    fixed_tokens[1, [0, 4, 9]] = torch.tensor([3, 49, 7])
    banned = torch.zeros(3, V, dtype=torch.bool)
    banned[2, [1, 2]] = True
    return ps, [101, -7, 2**35], [0, 2, 1], [40, 5, 1], histories, fixed, fixed_tokens, banned


def window(state: gs.GraphSamplerState, b: int) -> torch.Tensor:
    """Row b's history, [k_b, C]."""
    k = int(state.stability_threshold[b])
    return state.history[b, state.history.shape[1] - k:]


def test_batch_independence():
    """Each row's results (draws included) and new state are identical alone (B=1) and in batches in any order."""
    ps, seeds, canvas, steps, histories, fixed, fixed_tokens, banned = mixed_batch()
    logits = random_logits(4, 3, C, V)

    def run(order):
        st = gs.graph_state([ps[i] for i in order], [seeds[i] for i in order], [canvas[i] for i in order],
                            [steps[i] for i in order], [histories[i] for i in order], "cpu")
        return gs.graph_step(logits[order], st, fixed=fixed[order], fixed_tokens=fixed_tokens[order],
                             banned=banned[order])

    full, full_state = run([0, 1, 2])
    assert not full.accepted.all()  # noise shows in next_canvas
    for order in ([2, 0, 1], [1, 2], [0], [1], [2]):
        out, state = run(order)
        for i, b in enumerate(order):
            for name, got, want in zip(out._fields, out, full):
                assert torch.equal(got[i], want[b]), (order, b, name)
            assert torch.equal(window(state, i), window(full_state, b))
            for name in ("seed", "canvas_index", "step_remaining", "max_steps", "t_min", "t_max"):
                assert torch.equal(getattr(state, name)[i], getattr(full_state, name)[b]), name


def test_compiled_fullgraph_step_equals_eager():
    """torch.compile(graph_step, fullgraph=True, dynamic=False) traces without a graph break (no host sync, no
    data-dependent shape) and, fed its own state for a second step, matches eager: tokens exactly, floats closely."""
    ps, seeds, canvas, steps, histories, fixed, fixed_tokens, banned = mixed_batch()
    state = gs.graph_state(ps, seeds, canvas, steps, histories, "cpu")
    compiled = torch.compile(gs.graph_step, fullgraph=True, dynamic=False)
    eager_state = compiled_state = state
    for i in range(2):
        logits = random_logits(10 + i, 3, C, V)
        want, eager_state = gs.graph_step(logits, eager_state, fixed=fixed, fixed_tokens=fixed_tokens)
        got, compiled_state = compiled(logits, compiled_state, fixed=fixed, fixed_tokens=fixed_tokens)
        for name in ("next_canvas", "argmax", "accepted", "stable", "done"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (i, name)
        torch.testing.assert_close(got.self_conditioning_probs, want.self_conditioning_probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.mean_entropy, want.mean_entropy, rtol=1e-5, atol=1e-6)
        for name, a, b in zip(state._fields, compiled_state, eager_state):
            assert torch.equal(a, b), (i, name)
    assert eager_state.step_remaining.tolist() == [38, 3, 1]


def test_step_does_not_modify_inputs_and_clamps_past_the_last_step():
    """graph_step leaves its inputs alone; a row stepped past its last step repeats it (step_remaining stays 1, same
    draws, done) with static shapes."""
    ps, seeds, canvas, steps, histories, fixed, fixed_tokens, banned = mixed_batch()
    state = gs.graph_state(ps, seeds, canvas, steps, histories, "cpu")
    logits = random_logits(5, 3, C, V)
    before = [t.clone() for t in (logits, fixed, fixed_tokens, banned, *state)]
    out, new = gs.graph_step(logits, state, fixed=fixed, fixed_tokens=fixed_tokens, banned=banned)
    assert all(torch.equal(a, b) for a, b in zip(before, (logits, fixed, fixed_tokens, banned, *state)))
    again, newer = gs.graph_step(logits, new, fixed=fixed, fixed_tokens=fixed_tokens, banned=banned)
    assert new.step_remaining[2] == newer.step_remaining[2] == 1 and again.done[2] and out.done[2]
    assert torch.equal(again.next_canvas[2], out.next_canvas[2])


def test_graph_state_layout():
    """graph_state stacks histories right-aligned in a [B, K, C] block of -1 and keeps the request values."""
    ps, seeds, canvas, steps, histories, *_ = mixed_batch()
    state = gs.graph_state(ps, seeds, canvas, steps, histories, "cpu")
    assert state.history.shape == (3, 2, C) and torch.equal(state.history[0], histories[0])
    assert torch.equal(state.history[1, 1], histories[1][0]) and (state.history[1, 0] == -1).all()
    assert (state.history[2] == -1).all() and state.seed.tolist() == seeds
    assert state.t_min.dtype == torch.float64 and state.t_min.tolist() == [p.t_min for p in ps]
    torch.manual_seed(0)
    first = gs.graph_state([BASE], [None], [0], [48], [eb.new_history(1, C)], "cpu").seed
    second = gs.graph_state([BASE], [None], [0], [48], [eb.new_history(1, C)], "cpu").seed
    assert first.dtype == torch.int64 and first.item() != second.item()  # an unseeded row gets a random seed


def fake_decoder(canvas: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """[B, C, V] logits that depend on the canvas, so a divergence in canvases shows up in later logits."""
    return 30.0 * torch.tanh((base + 4.0 * torch.nn.functional.one_hot(canvas, V)) / 30.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_with_exact_mode_over_a_schedule(monkeypatch, dtype):
    """With the random phases stubbed alike (the candidate draw: graph mode's own on both sides; the noise: the same
    per-row torch generators), graph_step equals entropy_bound.step bit for bit at every step of a 48-step schedule:
    temperature, argmax, self-conditioning probs, accepted, entropy, stable, done, next canvas; and its advanced state
    (histories, step_remaining) equals the runner's bookkeeping for exact mode."""
    ps, seeds, canvas_index, steps, histories, fixed, fixed_tokens, banned = mixed_batch()
    ps[0] = params(stability_threshold=2, confidence_threshold=0.3)  # lets row 0 stop on stable + confident
    steps = [48, 13, 30]
    rows_fixed = [fixed[b] if fixed[b].any() else None for b in range(3)]
    rows_banned = [tuple(banned[b].nonzero().flatten().tolist()) for b in range(3)]

    state = gs.graph_state(ps, seeds, canvas_index, steps, histories, "cpu")
    current = {}  # the graph state of the step being run, for the exact side's stubbed draw
    monkeypatch.setattr(eb, "multinomial_rows", lambda probs, gens: gs.counter_multinomial(probs, current["state"]))
    graph_gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    monkeypatch.setattr(gs, "counter_noise", lambda st, c, v, *a: torch.cat(
        [torch.randint(0, v, (1, c), generator=g) for g in graph_gens]))
    exact_gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]

    g = torch.Generator().manual_seed(0)
    bases = torch.randn(48, 3, C, V, generator=g) * torch.tensor([1.0, 2.0, 0.5])[:, None, None]
    bases[:, 0, torch.arange(C), torch.arange(C)] += 12.0  # row 0 grows confident
    canvas = torch.randint(0, V, (3, C), generator=g)
    hist, s_left = list(histories), list(steps)
    rejected, done_early = 0, False
    for i in range(48):
        logits = fake_decoder(canvas, bases[i])
        rows = [eb.SamplerRow(ps[b], max(s_left[b], 1), hist[b], rows_fixed[b],
                              fixed_tokens[b] if rows_fixed[b] is not None else None, rows_banned[b])
                for b in range(3)]
        args = eb.prepare(rows)
        assert torch.equal(gs.graph_temperature(state, "cpu"), args.temperature), i
        current["state"] = state
        want = eb.step(logits, args, exact_gens, self_conditioning_dtype=dtype)
        got, state = gs.graph_step(logits, state, dtype, fixed=fixed, fixed_tokens=fixed_tokens, banned=banned)
        for name, a, b in zip(want._fields, got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), (i, name)
        hist = [eb.push_history(hist[b], want.argmax[b]) for b in range(3)]
        s_left = [s - 1 for s in s_left]
        for b in range(3):
            assert torch.equal(window(state, b), hist[b]), (i, b)
            assert (state.history[b, : state.history.shape[1] - hist[b].shape[0]] == -1).all(), (i, b)
        assert state.step_remaining.tolist() == [max(s, 1) for s in s_left]
        rejected += (~want.accepted).sum().item()
        done_early |= bool(want.done[0]) and s_left[0] > 0
        canvas = want.next_canvas
    assert rejected > 0 and done_early  # renoise and the stable + confident stop are exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decide_then_exact_draws_is_the_exact_step(dtype):
    """What a compiled server's canvas step does in exact mode: `decide` (inside the graph), then each row's draws
    from its own generator and `renoise` (after it) give entropy_bound.step's every field bit for bit, fixed
    positions and banned tokens included, over a schedule in which rows stop, reject and renoise; the generators end
    in the same states (the same draws, in the same order)."""
    ps, seeds, canvas_index, steps, histories, fixed, fixed_tokens, banned = mixed_batch()
    steps = [48, 13, 30]
    rows_fixed = [fixed[b] if fixed[b].any() else None for b in range(3)]
    rows_banned = [tuple(banned[b].nonzero().flatten().tolist()) for b in range(3)]
    want_gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    got_gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    g = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, V, (3, C), generator=g)
    hist, s_left, rejected = list(histories), list(steps), 0
    for i in range(12):
        logits = fake_decoder(canvas, torch.randn(3, C, V, generator=g) * torch.tensor([1.0, 2.0, 0.5])[:, None, None])
        rows = [eb.SamplerRow(ps[b], max(s_left[b], 1), hist[b], rows_fixed[b],
                              fixed_tokens[b] if rows_fixed[b] is not None else None, rows_banned[b])
                for b in range(3)]  # fmt: skip
        want = eb.step(logits, eb.prepare(rows), want_gens, self_conditioning_dtype=dtype)
        state = gs.graph_state(ps, seeds, canvas_index, [max(s, 1) for s in s_left], hist, "cpu")
        decision = gs.decide(logits, state, dtype, fixed, fixed_tokens, banned)
        sampled = eb.multinomial_rows(decision.probs, got_gens)
        got = gs.renoise(decision, sampled, eb.noise_rows(got_gens, C, V, "cpu"), fixed, fixed_tokens)
        for name, a, b in zip(want._fields, got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), (i, name)
        hist = [eb.push_history(hist[b], want.argmax[b]) for b in range(3)]
        s_left = [s - 1 for s in s_left]
        rejected += (~want.accepted).sum().item()
        canvas = want.next_canvas
    assert rejected > 0
    for a, b in zip(got_gens, want_gens):
        assert torch.equal(a.get_state(), b.get_state())


def test_temperature_and_done_rule_match_exact_mode():
    """For rows at every step s = N..1 of several (N, t_min, t_max) in one batch, graph mode's temperature equals
    entropy_bound's bit for bit, and done equals entropy_bound's: on the last step, or stable and confident."""
    schedules = [(0.4, 0.8, 48), (0.3, 1.7, 13), (0.05, 2.9, 1000), (0.7, 0.7, 5), (0.1, 0.35, 7)]
    ps, ss = [], []
    for t_min, t_max, n in schedules:
        for s in range(n, 0, -1):
            ps.append(params(t_min=t_min, t_max=t_max, max_denoising_steps=n))
            ss.append(s)
    state = state_for(ps, list(range(len(ps))), ss, C)
    want = eb.temperature(ss, [p.max_denoising_steps for p in ps], [p.t_min for p in ps], [p.t_max for p in ps])
    assert torch.equal(gs.graph_temperature(state, "cpu"), want)

    # done: rows confident or not, stable or not, at their last step or before
    pattern = torch.arange(C) % V
    confident = torch.randn(1, C, V, generator=torch.Generator().manual_seed(1)) * 0.1
    confident[0, torch.arange(C), pattern] = 25.0
    vague = random_logits(2, 1, C, V)
    cases = [(confident, True, 5), (confident, False, 5), (vague, True, 5), (confident, False, 1), (vague, True, 1),
             (confident, True, 1), (vague, False, 2)]
    p = params(max_denoising_steps=10, stability_threshold=1)
    logits = torch.cat([x for x, _, _ in cases])
    histories = [pattern[None].clone() if stable else torch.full((1, C), -1) for _, stable, _ in cases]
    steps = [s for _, _, s in cases]
    vague_argmax = (vague / eb.temperature(5, 10, 0.4, 0.8)).argmax(-1)
    histories = [vague_argmax if x is vague and stable else h for (x, stable, _), h in zip(cases, histories)]
    state = state_for([p] * len(cases), list(range(len(cases))), steps, C, histories=histories)
    got, _ = gs.graph_step(logits, state)
    want = eb.step(logits, eb.prepare([eb.SamplerRow(p, s, h) for s, h in zip(steps, histories)]), [None] * len(cases))
    assert torch.equal(got.done, want.done) and torch.equal(got.stable, want.stable)
    assert torch.equal(got.mean_entropy, want.mean_entropy)
    assert got.done.tolist() == [True, False, False, True, True, True, False]


# ----------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def one_hot_decoder(canvas: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """fake_decoder without F.one_hot's host-side range check, so it can be captured."""
    hot = (torch.arange(base.shape[-1], device=base.device) == canvas[..., None]).to(base.dtype)
    return 30.0 * torch.tanh((base + 4.0 * hot) / 30.0)


@cuda
def test_cuda_draws_equal_cpu_draws():
    """The generator is integer arithmetic: the same uniforms, noise and (here) candidates on CUDA as on the CPU."""
    ps, seeds, canvas, steps, histories, *_ = mixed_batch()
    cpu = gs.graph_state(ps, seeds, canvas, steps, histories, "cpu")
    dev = gs.graph_state(ps, seeds, canvas, steps, histories, "cuda")
    for stream in (0, 1, 2):
        a = gs.counter_uniform(cpu.seed, cpu.canvas_index, cpu.step_remaining, torch.arange(3), 4096, stream)
        b = gs.counter_uniform(dev.seed, dev.canvas_index, dev.step_remaining, torch.arange(3, device="cuda"), 4096,
                               stream)
        assert torch.equal(a, b.cpu()), stream
    probs = torch.softmax(random_logits(1, 3, C, V), dim=-1)
    assert torch.equal(gs.counter_multinomial(probs, cpu), gs.counter_multinomial(probs.cuda(), dev).cpu())
    assert torch.equal(gs.counter_noise(cpu, C, V), gs.counter_noise(dev, C, V).cpu())


@cuda
def test_cuda_temperature_is_hf_on_cuda():
    """On CUDA, graph_temperature equals entropy_bound's (HF's ops evaluated on CUDA) bit for bit."""
    ps, ss = [], []
    for t_min, t_max, n in [(0.4, 0.8, 48), (0.3, 1.7, 13), (0.05, 2.9, 1000), (0.7, 0.7, 5), (0.1, 0.35, 7)]:
        ps += [params(t_min=t_min, t_max=t_max, max_denoising_steps=n)] * n
        ss += list(range(n, 0, -1))
    state = gs.graph_state(ps, [0] * len(ps), [0] * len(ps), ss, [eb.new_history(1, C)] * len(ps), "cuda")
    want = eb.temperature(ss, [p.max_denoising_steps for p in ps], [p.t_min for p in ps], [p.t_max for p in ps],
                          device="cuda")
    assert torch.equal(gs.graph_temperature(state, "cuda"), want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_compiled_temperature_is_hf(device):
    """Compiled (inductor's C++ or Triton), the schedule still rounds as HF's eager ops on the device."""
    ps, ss = [], []
    for t_min, t_max, n in [(0.4, 0.8, 48), (0.3, 1.7, 13), (0.05, 2.9, 1000), (0.7, 0.7, 5), (0.1, 0.35, 7)]:
        ps += [params(t_min=t_min, t_max=t_max, max_denoising_steps=n)] * n
        ss += list(range(n, 0, -1))
    state = gs.graph_state(ps, [0] * len(ps), [0] * len(ps), ss, [eb.new_history(1, C)] * len(ps), device)
    compiled = torch.compile(gs.graph_temperature, fullgraph=True, dynamic=False)(state, device)
    want = eb.temperature(ss, [p.max_denoising_steps for p in ps], [p.t_min for p in ps], [p.t_max for p in ps],
                          device=device)
    assert torch.equal(compiled, want)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_parity_with_exact_mode(monkeypatch, dtype):
    """The stubbed-RNG parity of test_parity_with_exact_mode_over_a_schedule, on CUDA, 12 steps."""
    ps, seeds, canvas_index, steps, histories, fixed, fixed_tokens, banned = mixed_batch()
    dev = "cuda"
    fixed, fixed_tokens, banned = fixed.to(dev), fixed_tokens.to(dev), banned.to(dev)
    rows_fixed = [fixed[b] if fixed[b].any() else None for b in range(3)]
    rows_banned = [tuple(banned[b].nonzero().flatten().tolist()) for b in range(3)]
    histories = [h.to(dev) for h in histories]
    state = gs.graph_state(ps, seeds, canvas_index, steps, histories, dev)
    current = {}
    monkeypatch.setattr(eb, "multinomial_rows", lambda probs, gens: gs.counter_multinomial(probs, current["state"]))
    graph_gens = [torch.Generator(dev).manual_seed(s) for s in (1, 2, 3)]
    monkeypatch.setattr(gs, "counter_noise", lambda st, c, v, *a: torch.cat(
        [torch.randint(0, v, (1, c), generator=g, device=dev) for g in graph_gens]))
    exact_gens = [torch.Generator(dev).manual_seed(s) for s in (1, 2, 3)]
    g = torch.Generator().manual_seed(0)
    bases = (torch.randn(12, 3, C, V, generator=g) * 2).to(dev)
    canvas = torch.randint(0, V, (3, C), generator=g).to(dev)
    hist, s_left = list(histories), list(steps)
    for i in range(12):
        logits = one_hot_decoder(canvas, bases[i])
        rows = [eb.SamplerRow(ps[b], max(s_left[b], 1), hist[b], rows_fixed[b],
                              fixed_tokens[b] if rows_fixed[b] is not None else None, rows_banned[b])
                for b in range(3)]
        current["state"] = state
        want = eb.step(logits, eb.prepare(rows), exact_gens, self_conditioning_dtype=dtype)
        got, state = gs.graph_step(logits, state, dtype, fixed=fixed, fixed_tokens=fixed_tokens, banned=banned)
        for name, a, b in zip(want._fields, got, want):
            assert torch.equal(a, b), (i, name)
        hist = [eb.push_history(hist[b], want.argmax[b]) for b in range(3)]
        s_left = [s - 1 for s in s_left]
        canvas = want.next_canvas


def run_steps(n, canvas, state, bases, fixed, fixed_tokens, banned):
    outs = []
    for i in range(n):
        result, state = gs.graph_step(one_hot_decoder(canvas, bases[i]), state, fixed=fixed, fixed_tokens=fixed_tokens,
                                      banned=banned)
        canvas = result.next_canvas
        outs.append((result.next_canvas, result.argmax, result.accepted, result.done, result.mean_entropy))
    return outs, state


@cuda
def test_cuda_no_sync_and_graph_capture_of_several_steps():
    """An eager step never syncs the host (sync debug mode 'error'), and 3 steps captured in one CUDA graph, replayed
    twice with the state carried over, equal 6 eager steps."""
    ps, seeds, canvas_index, steps, histories, fixed, fixed_tokens, banned = mixed_batch()
    dev = "cuda"
    fixed, fixed_tokens, banned = fixed.to(dev), fixed_tokens.to(dev), banned.to(dev)
    state = gs.graph_state(ps, seeds, canvas_index, [40, 13, 30], histories, dev)
    g = torch.Generator().manual_seed(0)
    bases = (torch.randn(6, 3, C, V, generator=g) * 2).to(dev)
    canvas0 = torch.randint(0, V, (3, C), generator=g).to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager, _ = run_steps(6, canvas0, state, bases, fixed, fixed_tokens, banned)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    static_canvas = canvas0.clone()
    static_state = gs.GraphSamplerState(*[t.clone() for t in state])
    static_bases = bases[:3].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_steps(3, static_canvas, static_state, static_bases, fixed, fixed_tokens, banned)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs, new_state = run_steps(3, static_canvas, static_state, static_bases, fixed, fixed_tokens, banned)
    for replay in range(2):
        static_bases.copy_(bases[3 * replay : 3 * replay + 3])
        graph.replay()
        for i in range(3):
            for j, (a, b) in enumerate(zip(outs[i], eager[3 * replay + i])):
                assert torch.equal(a, b), (replay, i, j)
        gs.update_state_(static_state, new_state)
        static_canvas.copy_(outs[-1][0])


@cuda
def test_cuda_compiled_step_equals_eager():
    """torch.compile(fullgraph=True) on CUDA (inductor/Triton) against eager: tokens equal, floats close."""
    ps, seeds, canvas, steps, histories, fixed, fixed_tokens, banned = mixed_batch()
    dev = "cuda"
    fixed, fixed_tokens = fixed.to(dev), fixed_tokens.to(dev)
    state = gs.graph_state(ps, seeds, canvas, steps, histories, dev)
    compiled = torch.compile(gs.graph_step, fullgraph=True, dynamic=False)
    eager_state = compiled_state = state
    for i in range(2):
        logits = random_logits(10 + i, 3, C, V).to(dev)
        want, eager_state = gs.graph_step(logits, eager_state, fixed=fixed, fixed_tokens=fixed_tokens)
        got, compiled_state = compiled(logits, compiled_state, fixed=fixed, fixed_tokens=fixed_tokens)
        for name in ("next_canvas", "argmax", "accepted", "stable", "done"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (i, name)
        torch.testing.assert_close(got.self_conditioning_probs, want.self_conditioning_probs, rtol=1e-5, atol=1e-6)
        for a, b in zip(compiled_state, eager_state):
            assert torch.equal(a, b), i
