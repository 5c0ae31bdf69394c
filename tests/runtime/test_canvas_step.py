"""The graph-ready canvas step (runtime/canvas_step.py): its static layout computes what the mixed forward computes,
it compiles with fullgraph=True (no host sync, no data-dependent shape, no graph break) into graphs that later batch
sizes and prefix buckets reuse, and the runner sends it canvas-only rounds only."""

import pytest
import torch

from sgl_diffusion.runtime.canvas_batch import CanvasBatch, Segment
from sgl_diffusion.runtime.canvas_step import CanvasStep, CanvasStepPlanner, batch_bucket, prefix_bucket
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


def test_runner_sends_only_fitting_canvas_only_rounds_to_the_step(model, cached):
    kv, attn, prefixes = cached
    step = CountingStep(model, kv, "eager", batch_buckets=(1, 2))
    runner = DiffusionRunner(model, attn, step)
    segments, ids, soft = canvas_batch(model, prefixes[:2], first_step=True)
    runner.forward(CanvasBatch(segments, ids, soft))
    segments, ids, soft = canvas_batch(model, prefixes, first_step=True)
    runner.forward(CanvasBatch(segments, ids, soft))  # 3 canvases: past the largest bucket, the mixed forward
    encode = Segment("commit", 0, 4, 0, torch.empty(0, dtype=torch.long), torch.arange(900, 904))
    mixed = [encode, *canvas_batch(model, prefixes[:1], first_step=True)[0]]
    runner.forward(CanvasBatch(mixed, torch.zeros(4 + model.cfg.canvas_length, dtype=torch.long)))
    assert step.calls == [2]


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


def test_warm_up_compiles_both_graphs_before_serving(model, cached):
    """After warm_up, a batch of one and a batch of several canvases over a longer context compile nothing new."""
    from sgl_diffusion.sampling.params import DiffusionParams

    torch._dynamo.reset()
    kv, _, prefixes = cached
    step = CanvasStep(model, kv, "compile")
    step.warm_up(DiffusionParams(48, 0.1, 0.4, 0.8, 0.0, 1), "exact", 1)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 2
    for batch in (prefixes[2:], prefixes):
        step(*canvas_batch(model, batch, first_step=False))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
