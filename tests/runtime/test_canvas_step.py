"""The graph-ready canvas step (runtime/canvas_step.py): its static layout computes what the mixed forward computes,
for canvas-only rounds and for rounds that also encode (prefills and commits in rows of C tokens, their KV written
as the mixed forward writes it), it compiles with fullgraph=True (no host sync, no data-dependent shape, no graph
break) into graphs that later batch sizes and prefix buckets reuse, and the runner sends it the rounds it takes."""

import copy
import dataclasses

import pytest
import torch

from sgl_diffusion.attention.sdpa import SdpaBackend
from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
from sgl_diffusion.runtime.canvas_step import (
    PREFILL_TOKENS_LIMIT,
    CanvasStep,
    CanvasStepPlanner,
    batch_bucket,
    prefix_bucket,
)
from sgl_diffusion.runtime.runner import DiffusionRunner
from tests.models.test_parity import make_pair, our_kv, prefill, prompt_ids, rel_err

# three requests' contexts: shorter than the window, past it, and past the first full-attention bucket (64)
CONTEXTS = (5, 40, 90)


@pytest.fixture(scope="module")
def model():
    return make_pair("default")[1]


@pytest.fixture(scope="module")
def cached(model):
    """A KV store holding the three contexts at interleaved, non-contiguous slots: (kv, attn, prefix slots)."""
    kv, attn = our_kv(model, num_slots=1024)
    prefixes = []
    for i, length in enumerate(CONTEXTS):
        slots = torch.arange(length) * 3 + i + 1  # slot 0 stays unwritten: the padding rows point there
        ids = prompt_ids(length, model.cfg.vocab_size, seed=i)
        seg = Segment("prefill", 0, length, 0, torch.empty(0, dtype=torch.long), slots)
        model(CanvasBatch([seg], ids), attn)
        prefixes.append(slots)
    return kv, attn, prefixes


def canvas_batch(model, prefixes, first_step: bool, seed=0):
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    segments = [Segment("canvas", i, cfg.canvas_length, p.numel(), p) for i, p in enumerate(prefixes)]
    ids = torch.randint(0, cfg.vocab_size, (len(prefixes) * cfg.canvas_length,), generator=gen)
    soft = None if first_step else torch.randn(ids.numel(), cfg.hidden_size, generator=gen)
    return segments, ids, soft


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("buckets", [None, (4,)])
def test_static_step_computes_the_mixed_forward(model, cached, first_step, buckets):
    """Canvases over short, windowed and bucket-crossing contexts, with or without a self-conditioning input, padded
    to a batch bucket with a dummy canvas or not: the step's hidden states are the mixed forward's."""
    kv, attn, prefixes = cached
    segments, ids, soft = canvas_batch(model, prefixes, first_step)
    want = model(CanvasBatch(segments, ids, soft), attn)
    got = CanvasStep(model, kv, "eager", buckets)(segments, ids, soft)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5


def encode_batch(model, prefixes, first_step: bool, seed=0) -> CanvasBatch:
    """A round with every kind of row: a 45-token prompt (two rows, the second padded), request 1's commit and its
    next canvas (which reads that commit), request 0's canvas, a 40-token prompt after a 20-token cached prefix (its
    second row sees the window across the two), and a 7-token commit (a finished answer's last canvas)."""
    c, vocab = model.cfg.canvas_length, model.cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    none = torch.empty(0, dtype=torch.long)
    commit = torch.arange(700, 700 + c)
    segments = [
        Segment("prefill", 0, 45, 0, none, torch.arange(600, 645)),
        Segment("commit", 1, c, CONTEXTS[1], prefixes[1], commit),
        Segment("canvas", 1, c, CONTEXTS[1] + c, torch.cat([prefixes[1], commit])),
        Segment("canvas", 2, c, CONTEXTS[0], prefixes[0]),
        Segment("prefill", 3, 40, 20, prefixes[2][:20], torch.arange(800, 840)),
        Segment("commit", 4, 7, CONTEXTS[2], prefixes[2], torch.arange(900, 907)),
    ]
    ids = torch.randint(0, vocab, (sum(seg.num_tokens for seg in segments),), generator=gen)
    soft = None if first_step else torch.randn(2 * c, model.cfg.hidden_size, generator=gen)
    return CanvasBatch(segments, ids, soft)


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("buckets", [None, (16,)])
def test_round_that_encodes_computes_the_mixed_forward(model, cached, first_step, buckets):
    """Prefills (one after a cached prefix), commits (whole and partial) and canvases in one round, padded to a batch
    bucket or not: the canvases' hidden states and every KV row the round writes are the mixed forward's, and
    nothing else in the KV store changes but row 0, the padding row."""
    kv, _, prefixes = cached
    want_kv, got_kv = copy.deepcopy(kv), copy.deepcopy(kv)
    want = model(encode_batch(model, prefixes, first_step), SdpaBackend(want_kv, model.cfg.sliding_window))
    got = CanvasStep(model, got_kv, "eager", buckets).encode_round(encode_batch(model, prefixes, first_step))
    assert got.shape == want.shape == (2 * model.cfg.canvas_length, model.cfg.hidden_size)
    assert rel_err(got, want) < 1e-5
    written = torch.cat([torch.arange(600, 645), torch.arange(700, 700 + model.cfg.canvas_length),
                         torch.arange(800, 840), torch.arange(900, 907)])  # fmt: skip
    for got_buf, want_buf, before in zip(got_kv.k + got_kv.v, want_kv.k + want_kv.v, kv.k + kv.v):
        assert rel_err(got_buf[written], want_buf[written]) < 1e-5
        assert not torch.equal(got_buf[written], before[written])
        untouched = torch.ones(before.shape[0], dtype=torch.bool)
        untouched[written] = untouched[0] = False
        assert torch.equal(got_buf[untouched], before[untouched])


def test_round_that_encodes_alone_returns_nothing_and_writes_its_kv(model, cached):
    """A round of commits only (finished answers' last canvases): no hidden states, the KV of the mixed forward."""
    kv, _, prefixes = cached
    want_kv, got_kv = copy.deepcopy(kv), copy.deepcopy(kv)

    def batch():
        return CanvasBatch([Segment("commit", 0, 7, CONTEXTS[2], prefixes[2], torch.arange(900, 907))],
                           torch.arange(7) + 11)  # fmt: skip

    assert model(batch(), SdpaBackend(want_kv, model.cfg.sliding_window)) is None
    assert CanvasStep(model, got_kv, "eager").encode_round(batch()) is None
    for got_buf, want_buf in zip(got_kv.k + got_kv.v, want_kv.k + want_kv.v):
        assert rel_err(got_buf[900:907], want_buf[900:907]) < 1e-5


def test_a_lone_commit_fits_a_bucket_of_one(model, cached):
    """Under CUDA graphs' buckets a one-row round stays one row (a compiled CPU step pads it to two); warm-up runs
    with a single bucket of 1 (--cuda-graph-max-bs-decode 1)."""
    from sgl_diffusion.sampling.params import DiffusionParams

    kv, _, prefixes = cached
    got_kv, want_kv = copy.deepcopy(kv), copy.deepcopy(kv)
    step = CanvasStep(model, got_kv, "eager", batch_buckets=(1,))

    def lone():
        return CanvasBatch([Segment("commit", 0, 7, CONTEXTS[2], prefixes[2], torch.arange(900, 907))],
                           torch.arange(7) + 11)  # fmt: skip

    assert step.accepts_batch(lone()) and step.planner.batch_shape(lone())[0] == 1
    assert CanvasStep(model, kv, "compile").planner.batch_shape(lone())[0] == 2
    assert step.encode_round(lone()) is None
    model(lone(), SdpaBackend(want_kv, model.cfg.sliding_window))
    for got_buf, want_buf in zip(got_kv.k + got_kv.v, want_kv.k + want_kv.v):
        assert rel_err(got_buf[900:907], want_buf[900:907]) < 1e-5
    step.warm_up(DiffusionParams(48, 0.1, 0.4, 0.8, 0.0, 1), "exact", 1)


def test_round_that_encodes_writes_an_fp8_kv_cache(model, cached):
    """An fp8 KV cache (--kv-cache-dtype fp8_e4m3: sglang's buffers are float8_e4m3fn views): the graphed round
    stores a commit's K/V as the mixed forward stores it, and its canvas reads it back. (A prompt's later rows read
    its earlier ones from the fp8 cache, as a chunked prefill does, where the mixed forward keeps them exact.)"""
    kv, _, prefixes = cached
    fp8 = copy.deepcopy(kv)
    fp8.k = [t.to(torch.float8_e4m3fn) for t in fp8.k]
    fp8.v = [t.to(torch.float8_e4m3fn) for t in fp8.v]
    want_kv, got_kv = copy.deepcopy(fp8), copy.deepcopy(fp8)
    c = model.cfg.canvas_length
    commit = torch.arange(700, 700 + c)

    def batch():
        segments = [Segment("commit", 1, c, CONTEXTS[1], prefixes[1], commit),
                    Segment("canvas", 1, c, CONTEXTS[1] + c, torch.cat([prefixes[1], commit]))]  # fmt: skip
        return CanvasBatch(segments, torch.arange(2 * c) + 11)

    want = model(batch(), SdpaBackend(want_kv, model.cfg.sliding_window))
    got = CanvasStep(model, got_kv, "eager").encode_round(batch())
    assert rel_err(got, want) < 1e-5
    for got_buf, want_buf in zip(got_kv.k + got_kv.v, want_kv.k + want_kv.v):
        assert got_buf.dtype == torch.float8_e4m3fn
        assert rel_err(got_buf[commit].float(), want_buf[commit].float()) < 1e-2  # an fp8 step apart at most


def test_encode_rows_layout(model, cached):
    """Rows of C tokens: a prompt's second row sees the cached prefix and the first row, causally, within the window
    on sliding groups; padding tokens and canvases write to row 0; canvases see their whole context; a dummy row of
    the batch bucket sees its own keys only."""
    kv, _, prefixes = cached
    c, w = model.cfg.canvas_length, model.cfg.sliding_window
    planner = CanvasStepPlanner(model, kv, batch_buckets=(16,))
    inputs, canvas_rows = planner.plan_batch(encode_batch(model, prefixes, first_step=False))
    # rows: prompt (2), commit, canvas, canvas, prompt after a prefix (2), partial commit, then 8 dummies
    assert inputs.shape == (16, w - 1, 128, "encode") and canvas_rows.tolist() == [3, 4]
    assert inputs.decoder.view(16, c)[:, 0].tolist() == [i in (3, 4) for i in range(16)]
    [(sliding, s_rows, s_mask, s_writes), (full, f_rows, f_mask, f_writes)] = sorted(
        zip(planner.groups, inputs.rows, inputs.key_masks, inputs.writes), key=lambda g: g[0].window is None)
    second = 6  # the 40-token prompt's second row: tokens 32..39 after a 20-token prefix
    context = torch.cat([prefixes[2][:20], torch.arange(800, 832)])
    assert torch.equal(f_rows[second, :52], context) and f_mask[second, :, :52].all()
    assert not f_mask[second, :, 52:128].any()
    assert torch.equal(s_rows[second, : w - 1], context[-(w - 1) :])
    # query q sees the last w - 1 - q context keys and its own keys 0..q
    for q in (0, 5, c - 1):
        assert s_mask[second, q, : w - 1].tolist() == [j >= q for j in range(w - 1)]
        assert f_mask[second, q, 128:].tolist() == [j <= q for j in range(c)]
    assert s_mask[second, c - 1, w - 1 :].tolist() == [c - 1 - w < j <= c - 1 for j in range(c)]
    for writes in (s_writes, f_writes):
        rows = writes.view(16, c)
        assert rows[1, : 45 - c].tolist() == list(range(600 + c, 645)) and not rows[1, 45 - c :].any()
        assert not rows[3:5].any() and not rows[8:].any()
        assert rows[7, :7].tolist() == list(range(900, 907))
    assert f_mask[3, :, : CONTEXTS[1] + c].all() and not f_mask[3, :, CONTEXTS[1] + c : 128].any()
    assert f_mask[3, :, 128:].all()  # a canvas sees all of itself
    assert not f_mask[9, :, :128].any() and torch.equal(f_mask[9, :, 128:], torch.ones(c, c, dtype=torch.bool).tril())
    assert inputs.positions.view(16, c)[6, 0] == 20 + c


def test_plan_layout(model, cached):
    """Sliding groups see the last W - 1 context rows, full groups all of them padded to a power-of-two bucket;
    padding rows are masked out and a dummy canvas sees only its own keys."""
    kv, _, prefixes = cached
    planner = CanvasStepPlanner(model, kv, batch_buckets=(4,))
    segments, ids, soft = canvas_batch(model, prefixes, first_step=False)
    inputs = planner.plan(segments, ids, soft)
    c, w = model.cfg.canvas_length, model.cfg.sliding_window
    [(sliding, s_rows, s_mask), (full, f_rows, f_mask)] = sorted(
        zip(planner.groups, inputs.rows, inputs.key_masks), key=lambda g: g[0].window is None)
    assert sliding.window == w and full.window is None
    assert s_rows.shape == (4, w - 1) and f_rows.shape == (4, 128)  # the longest context, 90, is in bucket 128
    for b, prefix in enumerate(prefixes):
        visible = prefix[-(w - 1) :]
        assert torch.equal(s_rows[b, : visible.numel()], visible)
        assert s_mask[b, : visible.numel()].all() and not s_mask[b, visible.numel() : w - 1].any()
        assert torch.equal(f_rows[b, : prefix.numel()], prefix)
        assert f_mask[b, : prefix.numel()].all() and not f_mask[b, prefix.numel() : 128].any()
    for mask, width in ((s_mask, w - 1), (f_mask, 128)):
        assert mask[:, width:].all()  # every canvas sees its own C keys
        assert not mask[3, :width].any()  # the dummy sees nothing else
    assert inputs.positions.view(4, c)[1, 0] == CONTEXTS[1] and not inputs.ids[3 * c :].any()
    assert not inputs.soft_embeds[3 * c :].any()
    # the same shape refills the same buffers in place (a CUDA graph reads them there)
    again = planner.plan(*canvas_batch(model, prefixes[::2], first_step=True))  # contexts 5 and 90: bucket 128
    assert again is inputs and not again.soft_embeds.any()
    for rows, mask in zip(again.rows, again.key_masks):
        assert not mask[2:, : rows.shape[1]].any()  # the third canvas is a dummy now


def test_buckets():
    assert [prefix_bucket(n) for n in (0, 1, 64, 65, 128, 129, 5000)] == [64, 64, 64, 128, 128, 256, 8192]
    assert [batch_bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert batch_bucket(5, None) == 5
    with pytest.raises(ValueError, match="exceed"):
        batch_bucket(9, (1, 2, 4, 8))


def test_compiled_step_is_one_graph_and_matches_eager(model, cached):
    """fullgraph=True compiles the step (a graph break or a host sync would raise), its outputs are eager's within
    float32 rounding, and a later batch of another size over another prefix bucket reuses the compiled graph."""
    torch._dynamo.reset()  # graphs compiled for other models in this process count towards dynamo's recompile limit
    kv, _, prefixes = cached
    compiled, eager = CanvasStep(model, kv, "compile"), CanvasStep(model, kv, "eager")
    segments, ids, soft = canvas_batch(model, prefixes[:2], first_step=False)  # contexts 5 and 40: bucket 64
    assert rel_err(compiled(segments, ids, soft), eager(segments, ids, soft)) < 1e-5
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    segments, ids, soft = canvas_batch(model, prefixes, first_step=True, seed=1)  # 3 canvases, bucket 128
    assert rel_err(compiled(segments, ids, soft), eager(segments, ids, soft)) < 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


class CountingStep(CanvasStep):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __call__(self, segments, ids, soft_embeds):
        self.calls.append(len(segments))
        return super().__call__(segments, ids, soft_embeds)

    def encode_round(self, batch):
        self.calls.append(batch.token_kinds)
        return super().encode_round(batch)


def test_runner_sends_the_step_the_rounds_that_fit(model, cached):
    """Canvas-only rounds within the batch buckets, and rounds that encode whose rows fit them and whose prompts are
    short; rounds with images, long prompts or too many rows run the mixed forward."""
    kv, attn, prefixes = cached
    c = model.cfg.canvas_length
    step = CountingStep(model, copy.deepcopy(kv), "eager", batch_buckets=(1, 2, 4))
    runner = DiffusionRunner(model, attn, step)
    segments, ids, soft = canvas_batch(model, prefixes[:2], first_step=True)
    runner.forward(CanvasBatch(segments, ids, soft))
    segments, ids, soft = canvas_batch(model, [*prefixes, prefixes[0], prefixes[1]], first_step=True)
    runner.forward(CanvasBatch(segments, ids, soft))  # 5 canvases: past the largest bucket, the mixed forward
    none = torch.empty(0, dtype=torch.long)

    def encoding(kind, n, canvases=1, image_runs=()):
        encode = Segment(kind, 0, n, 0, none, torch.arange(300, 300 + n), image_runs)
        canvas = canvas_batch(model, prefixes[:canvases], first_step=True)[0]
        return CanvasBatch([encode, *canvas], torch.zeros(n + canvases * c, dtype=torch.long))

    runner.forward(encoding("commit", 4))
    runner.forward(encoding("prefill", 40, canvases=2))  # 2 rows of prompt, 2 canvases: bucket 4
    runner.forward(encoding("prefill", 4, canvases=3, image_runs=((0, 2),)))  # images: the mixed forward
    runner.forward(encoding("prefill", 3 * c))  # 4 rows: fits
    assert step.calls == [2, "mixed", "mixed", "mixed"]
    runner.forward(encoding("prefill", 4 * c))  # 5 rows: the mixed forward
    assert len(step.calls) == 4
    compiled = CanvasStep(model, kv, "compile")  # no buckets: prompts up to PREFILL_TOKENS_LIMIT tokens
    assert compiled.accepts_batch(encoding("prefill", 4 * c)) and compiled.accepts_batch(encoding("commit", c))
    assert not compiled.accepts_batch(encoding("prefill", PREFILL_TOKENS_LIMIT + 1))
    graphs = CanvasStep(model, kv, "cuda_graph", (1, 2, 4))  # never constructed on a CPU server: a planning check
    assert graphs.accepts_batch(encoding("commit", c)) and not graphs.accepts_batch(encoding("prefill", 4))


def test_masks_over_budget_run_the_mixed_forward(model, cached, monkeypatch):
    """Every row of a round that encodes carries a [C, P + C] mask built on the host, and one SDPA call scores every
    row's queries against its keys: past MASK_BUDGET_BYTES pairs (many canvases over long contexts) a round, canvases
    alone or encoding, runs the mixed forward (per-request attention, paged kernels on a GPU) instead."""
    from sgl_diffusion.runtime import canvas_step

    kv, attn, prefixes = cached
    c = model.cfg.canvas_length
    step = CountingStep(model, copy.deepcopy(kv), "eager")
    batch = encode_batch(model, prefixes, first_step=False)
    rows, _, widest, _ = step.planner.batch_shape(batch)
    need = rows * c * (widest + c)
    monkeypatch.setattr(canvas_step, "MASK_BUDGET_BYTES", need)
    assert step.accepts_batch(batch)
    monkeypatch.setattr(canvas_step, "MASK_BUDGET_BYTES", need - 1)
    assert not step.accepts_batch(batch)

    runner = DiffusionRunner(model, attn, step)
    segments, ids, soft = canvas_batch(model, prefixes, first_step=False)
    rows, _, widest = step.planner.shape(segments)
    assert widest > 64  # a full group's context past the first bucket: the budget is the widest group's
    monkeypatch.setattr(canvas_step, "MASK_BUDGET_BYTES", rows * c * (widest + c))
    want = runner.forward(CanvasBatch(segments, ids, soft))
    monkeypatch.setattr(canvas_step, "MASK_BUDGET_BYTES", rows * c * (widest + c) - 1)
    got = runner.forward(CanvasBatch(segments, ids, soft))
    assert step.calls == [len(segments)]  # the second round ran the mixed forward
    assert rel_err(got, want) < 1e-5


def test_judging_runner_steps_as_the_exact_sampler(model, cached):
    """A judging step (a compiled CPU server's in exact mode, run eagerly here) decides inside the step and the
    runner draws after it: canvas-only rounds (with later steps frozen once rows are done), a round that encodes
    beside two canvases, one that only commits, and a round with a banned token (the eager sampler over the judged
    hidden states) leave every canvas state, generator and KV row as the plain step and the exact sampler do, bit for
    bit."""
    from sgl_diffusion.runtime.runner import CanvasState, make_generator
    from sgl_diffusion.sampling.params import DiffusionParams

    kv, _, prefixes = cached
    cfg = model.cfg
    params = DiffusionParams(2, 0.1, 0.4, 0.8, 0.0, 1)  # two steps: the third step of a round is frozen

    def run(judge: bool):
        got_kv = copy.deepcopy(kv)
        step = CanvasStep(model, got_kv, "eager", judge=judge)
        judged = []
        step.judged = lambda batch, state, fn=step.judged: judged.append(state is not None) or fn(batch, state)
        runner = DiffusionRunner(model, SdpaBackend(got_kv, cfg.sliding_window), step)
        states = [CanvasState.first(params, make_generator(seed, "cpu"), cfg.canvas_length, cfg.vocab_size, "cpu")
                  for seed in (5, 6)]  # fmt: skip

        def canvases(extra_steps: int):
            ids, soft = runner.canvas_inputs(states)
            segments = [Segment("canvas", i, cfg.canvas_length, p.numel(), p) for i, p in enumerate(prefixes[:2])]
            return runner.run(CanvasBatch(segments, ids, soft), states, extra_steps)

        done = [canvases(extra_steps=2)]
        first = states
        states = [CanvasState.first(params, s.generator, cfg.canvas_length, cfg.vocab_size, "cpu") for s in states]
        done.append(runner.run(encode_batch(model, prefixes, first_step=True), states))
        lone = Segment("commit", 0, 7, CONTEXTS[2], prefixes[2], torch.arange(900, 907))
        done.append(runner.run(CanvasBatch([lone], torch.arange(7) + 11), []))
        states[1].banned = (3, 4)
        done.append(canvases(extra_steps=0))
        # stability windows shorter than the graph's history (padded), then one longer (the eager sampler)
        for k in (0, 2):
            states = [CanvasState.first(dataclasses.replace(params, stability_threshold=k), make_generator(7 + i, "cpu"),
                                        cfg.canvas_length, cfg.vocab_size, "cpu") for i in (k, k + 1)]  # fmt: skip
            done.append(canvases(extra_steps=1))
        return done, first + states, got_kv, judged

    want_done, want, want_kv, none = run(judge=False)
    got_done, got, got_kv, judged = run(judge=True)
    # dummy rows decide for the lone commit, a banned token's round and the rounds deeper than the graph's history
    assert none == [] and judged == [True, True, True, True, False, False, True, True, False, False]
    assert got_done == want_done and want_done[0] == [True, True]
    assert [int(s.steps_taken) for s in want[:2]] == [2, 2]  # the round's third step was frozen
    for a, b in zip(got, want):
        for name in ("canvas", "argmax", "history", "soft_embeds", "steps_taken", "accepted"):
            assert torch.equal(torch.as_tensor(getattr(a, name)), torch.as_tensor(getattr(b, name))), name
        assert a.step_remaining == b.step_remaining
        assert torch.equal(a.generator.get_state(), b.generator.get_state())
    for a, b in zip(got_kv.k + got_kv.v, want_kv.k + want_kv.v):
        assert torch.equal(a, b)


def test_rounds_the_eager_sampler_steps_decide_for_two_dummy_rows(model, cached, monkeypatch):
    """A judging step's round whose canvases the eager sampler steps (here a banned token) runs the LM head over two
    dummy rows in the graph, not over every canvas twice; a round it decides runs it once over its canvases. Judging
    is for float32 models only (compiled, inductor drops the bf16 rounding of transformers' self-conditioning input)."""
    from sgl_diffusion.runtime.runner import CanvasState, make_generator
    from sgl_diffusion.sampling.params import DiffusionParams

    kv, _, prefixes = cached
    cfg = model.cfg
    c = cfg.canvas_length
    rows = []
    monkeypatch.setattr(model, "logits", lambda hidden, fn=model.logits: rows.append(hidden.shape[0]) or fn(hidden))
    runner = DiffusionRunner(model, SdpaBackend(kv, cfg.sliding_window), CanvasStep(model, kv, "eager", judge=True))
    params = DiffusionParams(48, 0.1, 0.4, 0.8, 0.0, 1)
    states = [CanvasState.first(params, make_generator(i, "cpu"), c, cfg.vocab_size, "cpu") for i in range(3)]
    segments = [Segment("canvas", i, c, p.numel(), p) for i, p in enumerate(prefixes)]
    runner.run(CanvasBatch(segments, *runner.canvas_inputs(states)), states)
    states[2].banned = (3,)
    runner.run(CanvasBatch(segments, *runner.canvas_inputs(states)), states)
    assert rows == [3 * c, 2 * c, 3 * c]
    assert not CanvasStep(copy.deepcopy(model).to(torch.bfloat16), kv, "compile", judge=True).judges
    assert CanvasStep(model, kv, "compile", judge=True).judges


@pytest.mark.parametrize("judge", [False, True])
def test_a_canvas_done_early_in_a_round_stays_done(model, cached, judge):
    """A canvas that stops on the stability rule at a round's first step is frozen for the round's later steps: it
    keeps its state and is reported done, though a step on its next canvas would not have stopped it."""
    from sgl_diffusion.runtime.runner import CanvasState, make_generator
    from sgl_diffusion.sampling.params import DiffusionParams

    kv, _, prefixes = cached
    cfg = model.cfg
    params = DiffusionParams(48, 0.1, 0.4, 0.8, 1e9, 1)  # always confident: stable means done
    runner = DiffusionRunner(model, SdpaBackend(kv, cfg.sliding_window), CanvasStep(model, kv, "eager", judge=judge))
    segments = [Segment("canvas", 0, cfg.canvas_length, prefixes[0].numel(), prefixes[0])]

    def state():
        return CanvasState.first(params, make_generator(3, "cpu"), cfg.canvas_length, cfg.vocab_size, "cpu")

    def run(s, extra_steps):
        return runner.run(CanvasBatch(segments, *runner.canvas_inputs([s])), [s], extra_steps)

    probe = state()
    assert run(probe, 0) == [False]  # its first step's argmax differs from the empty history
    first_argmax = probe.history.clone()
    assert run(probe, 0) == [False]  # and the second step's from the first's: the next canvas does not stop
    s = state()
    s.history = first_argmax  # the same canvas and draws as the probe: stable, so done, at its first step
    assert run(s, extra_steps=2) == [True]
    assert int(s.steps_taken) == 1 and torch.equal(s.history, first_argmax)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (unverified on one so far)")
def test_cuda_graph_replay_matches_eager():
    """bf16 (a float32 model's experts run the host-syncing loop, which no CUDA graph holds): captured once, then
    replays over refilled buffers match the eager step."""
    model = make_pair("default")[1].cuda().to(torch.bfloat16)
    kv, attn = our_kv(model)
    kv.k = [t.cuda().to(torch.bfloat16) for t in kv.k]
    kv.v = [t.cuda().to(torch.bfloat16) for t in kv.v]
    slots = prefill(model, attn, prompt_ids(40, model.cfg.vocab_size).cuda()).cuda()
    graphed, eager = CanvasStep(model, kv, "cuda_graph", (1, 2)), CanvasStep(model, kv, "eager")
    for seed in range(3):  # capture, then replays over refilled buffers
        segments, ids, soft = canvas_batch(model, [slots], first_step=seed == 0, seed=seed)
        ids, soft = ids.cuda(), None if soft is None else soft.cuda().to(torch.bfloat16)
        assert rel_err(graphed(segments, ids, soft).float(), eager(segments, ids, soft).float()) < 2e-2
    assert len(graphed._graphs) == 1  # one shape, captured once


def test_server_picks_the_canvas_step_from_its_flags(model, cached):
    """--enable-torch-compile compiles the step on a CPU; without it, or under --tp > 1, there is none."""
    from types import SimpleNamespace

    from sgl_diffusion.runtime.scheduler_hook import graphed_canvas_step

    kv = cached[0]
    args = SimpleNamespace(enable_torch_compile=True, tp_size=1, disable_cuda_graph=False,
                           cuda_graph_max_bs_decode=None, cuda_graph_bs_decode=None)  # fmt: skip
    step = graphed_canvas_step(model, kv, args, torch.device("cpu"))
    assert step.mode == "compile" and step.planner.batch_buckets is None
    assert graphed_canvas_step(model, kv, SimpleNamespace(**{**vars(args), "tp_size": 2}), torch.device("cpu")) is None
    off = SimpleNamespace(**{**vars(args), "enable_torch_compile": False})
    assert graphed_canvas_step(model, kv, off, torch.device("cpu")) is None


def test_warm_up_compiles_every_graph_before_serving(model, cached, monkeypatch):
    """A compiled server's judging step (exact mode): after warm_up, a batch of one and a batch of several canvases
    over a longer context, and rounds that encode (nine rows, or one), compile nothing new, with or without sampler
    rows, with the checkpoint's stability window or a shorter one; the compiled round that encodes computes the eager
    one, its sampler decision included. Its graphs guard their inputs, not the model's modules, and a weight swapped
    in is read without a recompile."""
    from sgl_diffusion.runtime import canvas_step
    from sgl_diffusion.runtime.runner import CanvasState
    from sgl_diffusion.sampling import graph_sampler as gs
    from sgl_diffusion.sampling.params import DiffusionParams

    kept_by_graph, guard_filter = [], canvas_step.GUARD_FILTER

    def recording_filter(entries):
        keep = guard_filter(entries)
        kept_by_graph.append([(entry.name, kept) for entry, kept in zip(entries, keep, strict=True)])
        return keep

    monkeypatch.setattr(canvas_step, "GUARD_FILTER", recording_filter)
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # the module's earlier tests compile too
    kv, _, prefixes = cached
    step = CanvasStep(model, kv, "compile", judge=True)
    params = DiffusionParams(48, 0.1, 0.4, 0.8, 0.0, 1)
    step.warm_up(params, "exact", 1)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 2
    for batch in (prefixes[2:], prefixes):
        step(*canvas_batch(model, batch, first_step=False))
    c, vocab_size = model.cfg.canvas_length, model.cfg.vocab_size
    states = [CanvasState.first(params, None, c, vocab_size, "cpu") for _ in range(3)]
    state = gs.graph_state([params] * 3, [0] * 3, [0] * 3, [48, 30, 1], [s.history for s in states], "cpu")
    step.judged(CanvasBatch(*canvas_batch(model, prefixes, first_step=False)), state)
    shallow = [dataclasses.replace(params, stability_threshold=0)] * 3  # no history: padded to the graph's depth
    step.judged(CanvasBatch(*canvas_batch(model, prefixes, first_step=False)),
                gs.graph_state(shallow, [0] * 3, [0] * 3, [48, 30, 1], [s.history[:0] for s in states], "cpu"))
    kv_before = copy.deepcopy(kv)
    judged = step.judged(encode_batch(model, prefixes, first_step=False), gs.GraphSamplerState(*(t[:2] for t in state)))
    lone = CanvasBatch([Segment("commit", 0, 7, CONTEXTS[2], prefixes[2], torch.arange(900, 907))], torch.arange(7))
    assert step.encode_round(lone) is None  # one row
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    kv.k, kv.v = kv_before.k, kv_before.v  # the module's other tests read the cached contexts only
    eager = CanvasStep(model, copy.deepcopy(kv), "eager", judge=True)
    want = eager.judged(encode_batch(model, prefixes, first_step=False), gs.GraphSamplerState(*(t[:2] for t in state)))
    assert rel_err(judged.hidden, want.hidden) < 1e-5 and rel_err(judged.soft, want.soft) < 1e-5
    assert rel_err(judged.decision.probs, want.decision.probs) < 1e-5
    assert (judged.decision.argmax == want.decision.argmax).float().mean() > 0.95  # near-ties may round either way
    assert judged.decision.done.tolist() == want.decision.done.tolist() == [False, False]
    # the graphs guard the step's inputs, not the model's modules: a weight swapped in (same shape) is read by the
    # same graph at its next call
    norm = model.layers[-1].post_feedforward_layernorm
    weight = norm.weight
    try:
        norm.weight = torch.nn.Parameter(weight.detach() * 1.5, requires_grad=weight.requires_grad)
        swapped = step(*canvas_batch(model, prefixes, first_step=False))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
        want = CanvasStep(model, kv, "eager")(*canvas_batch(model, prefixes, first_step=False))
    finally:
        norm.weight = weight
    assert rel_err(swapped, want) < 1e-5
    assert rel_err(swapped, step(*canvas_batch(model, prefixes, first_step=False))) > 1e-2
    assert len(kept_by_graph) == frames - graphs_before  # every graph's guards went through the filter
    for guards in kept_by_graph:
        on_model = [kept for name, kept in guards if name.startswith("fn.args[0]")]  # the partial's model argument
        on_inputs = [kept for name, kept in guards if name.startswith("args[")]
        assert len(on_model) > 1000 and not any(on_model)
        assert on_inputs and all(on_inputs)
