"""The scheduler hook: sglang's Scheduler process runs our canvas engine instead of its token loop.

sglang keeps everything around the forward: request intake and validation, the Req lifecycle,
KV pools, aborts, the detokenizer stream. ``DiffusionEngine`` takes requests from the scheduler's
waiting queue into the canvas policy, runs one mixed forward per round and hands committed
canvases back to each Req, so sglang's own stop checks and output streamer apply. Requests with a
grammar wait in sglang's grammar queue until it is compiled, as in sglang's own loop; their matcher
then rides on the request (runtime/constraints.py), and logprobs go into the Req fields sglang's
streamer reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

import torch
from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX
from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sgl_diffusion.attention import BACKENDS, choose_attention_backend, create_attention_backend
from sgl_diffusion.attention.kv import SglangKVStore
from sgl_diffusion.runtime.drafts import DraftOutputStreamer, make_draft
from sgl_diffusion.runtime.req_logprobs import hand_over_logprobs, set_prompt_logprobs
from sgl_diffusion.env import SamplerEnv
from sgl_diffusion.models import fused_moe
from sgl_diffusion.runtime.canvas_step import CanvasStep
from sgl_diffusion.runtime.runner import DiffusionRunner
from sgl_diffusion.runtime.metrics import DiffusionMetrics, report_round
from sgl_diffusion.runtime.radix_slots import RadixKVSlots
from sgl_diffusion.runtime.scheduler_policy import CanvasScheduler, DiffusionRequest
from sgl_diffusion.sampling.params import DiffusionDefaults, DiffusionParams

GRAMMAR_BACKEND_ERROR = "constrained canvases need sglang's xgrammar (or llguidance) grammar backend"

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)

ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"
PARAMS_KEY = "sgl_diffusion"  # where validated `diffusion` params travel inside SamplingParams.custom_params
LOAD_PUBLISH_INTERVAL_S = 0.05  # sglang's own refresh floor while a batch stalls (LOAD_STALL_REFRESH_S)
# --kv-cache-dtype values stored one value per element, no scales: the pool buffers are K and V themselves
PLAIN_KV_CACHE_DTYPES = ("auto", "bf16", "bfloat16", "fp8_e4m3", "fp8_e5m2")
ATTENTION_STEP = "handle_attention_backend_compatibility"  # sglang resolution step checked by check_attention_backend
STEPS_KEY = "diffusion_steps"  # per-token meta_info: a canvas's denoise steps, on its first token
# a round as sglang's profiler sees it: --profile-by-stage counts rounds as decode steps (a round mixes prefills,
# commits and denoise steps, and a canvas is decoded)
CANVAS_ROUND = SimpleNamespace(forward_mode=ForwardMode.DECODE)
_attention_check_registered = False


def serves_diffusion_model(hf_config) -> bool:
    return ARCHITECTURE in (getattr(hf_config, "architectures", None) or [])


def load_defaults(model_path: str, revision: str | None = None) -> DiffusionDefaults:
    """The sampler settings of the checkpoint's generation_config.json: a local directory's, or a Hub id's (from the
    cache sglang loads the model from, fetched if it is not there yet); without one, transformers' defaults."""
    from transformers.utils import cached_file

    path = cached_file(model_path, "generation_config.json", revision=revision,
                       _raise_exceptions_for_missing_entries=False)  # fmt: skip
    return DiffusionDefaults.from_generation_config(json.loads(Path(path).read_text()) if path else {})


def requested_attention_backend(server_args) -> str | None:
    """``--attention-backend`` as the user gave it (None: not given), refusing the split flags.

    NOTE: sglang 0.5.23's ServerArgs record keeps the raw input in its fields (resolved values live in
    the runtime context's bags), so this is None when sglang filled in its own default (triton for
    DiffusionGemma on CUDA, intel_amx / torch_native on the CPU), which our backends do not follow.
    """
    split = {name: getattr(server_args, name) for name in ("prefill_attention_backend", "decode_attention_backend")}
    if any(split.values()):
        flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in split.items() if value)
        raise ValueError(f"sgl-diffusion runs every segment of a forward on one attention backend: "
                         f"use --attention-backend instead of {flags}")  # fmt: skip
    return server_args.attention_backend


def attention_backend_name(server_args, device: str, dtype: torch.dtype | None = None) -> str:
    return choose_attention_backend(requested_attention_backend(server_args), device,
                                    triton_interpreter=os.environ.get("TRITON_INTERPRET") == "1",
                                    dtype=dtype)  # fmt: skip


def check_attention_backend(server_args: Any, previous: Callable[[Any], None]) -> None:
    """sglang's ``handle_attention_backend_compatibility`` step, after a check of our own for DiffusionGemma:
    an attention backend we cannot run (flashinfer on the CPU, an unknown name) stops the launcher here,
    before any process starts."""
    from sglang.srt.arg_groups.overrides import model_config_of, resolving_view

    model_config = model_config_of(server_args)
    if serves_diffusion_model(model_config.hf_config):
        attention_backend_name(server_args, resolving_view(server_args).device, model_config.dtype)
    previous(server_args)


def register_attention_check() -> None:
    """Install ``check_attention_backend`` at sglang's resolution step, once per process."""
    global _attention_check_registered
    if _attention_check_registered:
        return
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook

    try:
        register_resolution_hook(ATTENTION_STEP)(check_attention_backend)
    except ValueError as e:  # SystemExit: sglang's load_plugins() logs and swallows Exceptions
        raise SystemExit(f"sgl-diffusion: cannot hook sglang's {ATTENTION_STEP}: {e}") from e
    _attention_check_registered = True


def graphed_canvas_step(model, kv, server_args, device: torch.device, rng: str = "exact") -> CanvasStep | None:
    """The canvas step ``--enable-torch-compile`` asks for (runtime/canvas_step.py): compiled on a CPU (with the exact
    sampler's decision inside), CUDA graphs per batch bucket on CUDA (sglang's ``--cuda-graph-bs-decode`` /
    ``--cuda-graph-max-bs-decode``; larger rounds run eagerly); None without the flag."""
    if not server_args.enable_torch_compile:
        return None
    if server_args.tp_size > 1:
        logger.warning("sgl-diffusion: --enable-torch-compile is ignored with --tp %d: the canvas step is graphed on "
                       "one rank only (its all-reduces are not in the graph); canvases run eagerly", server_args.tp_size)
        return None
    if device.type == "cuda":
        if server_args.disable_cuda_graph:
            logger.warning("sgl-diffusion: --enable-torch-compile with --disable-cuda-graph: canvases run eagerly")
            return None
        if not fused_moe.applies(model.embed_tokens.weight):
            logger.warning("sgl-diffusion: no CUDA graphs for a %s model (its experts run a loop that syncs the "
                           "host); canvases run eagerly", model.embed_tokens.weight.dtype)
            return None
        largest = server_args.cuda_graph_max_bs_decode or 64
        buckets = server_args.cuda_graph_bs_decode or [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= largest]
        return CanvasStep(model, kv, "cuda_graph", buckets)
    return CanvasStep(model, kv, "compile", judge=rng == "exact")


class DiffusionEngine:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        runner = scheduler.tp_worker.model_runner
        model = runner.model
        self.device = torch.device(scheduler.device)
        self.attention_backend = attention_backend_name(scheduler.server_args, self.device.type,
                                                        model.embed_tokens.weight.dtype)
        attn = create_attention_backend(self.attention_backend, SglangKVStore(runner.token_to_kv_pool),
                                        [layer.self_attn.info for layer in model.layers],
                                        model.embed_tokens.weight.dtype, self.device)  # fmt: skip
        logger.info("sgl-diffusion: attention backend %s: %s", self.attention_backend,
                    BACKENDS[self.attention_backend])  # fmt: skip
        self.defaults = load_defaults(scheduler.server_args.model_path, scheduler.server_args.revision)
        self.cfg = model.cfg
        rng = SamplerEnv.from_environ().rng
        # sglang's knob for "decode steps per scheduling round", read as denoise steps per round
        steps_per_round = max(1, scheduler.server_args.num_continuous_decode_steps)
        canvas_step = graphed_canvas_step(model, attn.kv, scheduler.server_args, self.device, rng)
        if canvas_step is not None:
            started = time.perf_counter()
            params = DiffusionParams.from_request(None, self.defaults, vocab_size=self.cfg.vocab_size,
                                                  canvas_length=self.cfg.canvas_length)
            with torch.inference_mode():  # as sglang's event loop runs: graphs guard on it, and would compile again
                canvas_step.warm_up(params, rng, steps_per_round)
            logger.info("sgl-diffusion: canvas step warmed up in %.1f s", time.perf_counter() - started)
        self.policy = CanvasScheduler(
            DiffusionRunner(model, attn, canvas_step, rng),
            RadixKVSlots(scheduler.tree_cache, scheduler.req_to_token_pool, self.device),
            self._accept_canvas,
            self.device,
            steps_per_round=steps_per_round,
            prefill_chunk=scheduler.chunked_prefill_size,  # None when --chunked-prefill-size is -1
        )
        collector = getattr(scheduler.metrics_reporter, "metrics_collector", None)
        self.metrics = DiffusionMetrics(collector.labels) if collector is not None else None
        if scheduler.metrics_reporter.enable_mfu_metrics:
            # its estimates count one token per sequence per decode step, and read a ScheduleBatch the loop never builds
            logger.warning("sgl-diffusion: --enable-mfu-metrics is ignored: sglang's estimates are token-by-token")
            scheduler.metrics_reporter.enable_mfu_metrics = False
        self.drafts = None  # a DraftOutputStreamer once a request asks for drafts
        # /v1/loads counts running requests from sglang's running_batch, which the canvas loop never fills, and
        # waiting ones from its waiting queue, which no longer holds those the policy keeps until they can start
        scheduler.load_inquirer = dataclasses.replace(
            scheduler.load_inquirer, get_running_batch=lambda: SimpleNamespace(reqs=self.split_reqs()[0]),
            get_waiting_queue=lambda: [*scheduler.waiting_queue, *self.split_reqs()[1]])
        self._last_load_publish = 0.0

    def publish_load(self) -> None:
        """Refresh /v1/loads while busy (sglang publishes from its own batch loop), at most every 50 ms."""
        now = time.monotonic()
        if now - self._last_load_publish >= LOAD_PUBLISH_INTERVAL_S:
            self._last_load_publish = now
            self.scheduler.publish_load_snapshot(force=True)

    @property
    def reqs(self) -> list[Req]:
        return [r.handle for r in self.policy.running]

    def split_reqs(self) -> tuple[list[Req], list[Req]]:
        """(the policy's requests that hold KV, those it holds until KV or a round's prefill budget lets them start:
        not yet started, or retracted; sglang's own loop keeps these in its waiting queue)."""
        running, held = [], []
        for dreq in self.policy.running:
            (running if dreq.slots is not None else held).append(dreq.handle)
        return running, held

    def has_work(self) -> bool:
        return bool(self.policy.running) or self.scheduler.grammar_manager.has_waiting_grammars()

    def admit_compiled_grammars(self) -> None:
        """Move requests whose grammar finished compiling (or failed: they carry their 400) from sglang's grammar
        queue to its waiting queue, as sglang's own ``_get_new_batch_prefill_raw`` does."""
        manager = self.scheduler.grammar_manager
        if manager.has_waiting_grammars():
            for req in manager.get_ready_grammar_requests():
                self.scheduler._add_request_to_queue(req)

    def admit(self) -> None:
        """Move waiting Reqs into the canvas policy, FIFO, within sglang's request and prefill budgets.

        The rest stay in sglang's waiting queue (reported as waiting, aborted by sglang as usual).
        """
        room = self.scheduler.max_running_requests - len(self.policy.running)
        budget = self.scheduler.max_prefill_tokens
        taken = 0
        for req in self.scheduler.waiting_queue:
            if taken >= room or (taken and len(req.origin_input_ids) > budget):
                break
            taken += 1
            budget -= len(req.origin_input_ids)
            max_new_tokens = req.sampling_params.max_new_tokens
            if str(req.rid).startswith(HEALTH_CHECK_RID_PREFIX):
                max_new_tokens = 0  # a prefill proves the loop and the model are alive; a canvas costs 48 forwards
            prompt = list(req.origin_input_ids)
            try:
                # admission refuses it too; here it would reach the Req's list slices and end the scheduler
                if type(max_new_tokens) is not int:
                    raise ValueError(f"max_new_tokens must be an integer, not {max_new_tokens!r}")
                runs, embeds = self._images(req, prompt)
                params = self._params(req)
                if params.infill is not None:  # the template decides the output's length (cut by max_new_tokens)
                    max_new_tokens = req.sampling_params.max_new_tokens = min(max_new_tokens, len(params.infill))
                dreq = DiffusionRequest(prompt, params, max_new_tokens, req, runs, embeds, **self._asks(req, params))
            except Exception as e:  # one bad request must not take the scheduler down
                logger.exception("sgl-diffusion: rejecting request %s", req.rid)
                req.finished_reason = FINISH_ABORT(f"invalid request: {e}", HTTPStatus.BAD_REQUEST)
                self.scheduler.output_streamer.stream_output([req], False)
                continue
            if req.return_logprob and dreq.score_from is None:
                set_prompt_logprobs(req)
            self.policy.add(dreq)
        del self.scheduler.waiting_queue[:taken]

    def step(self) -> None:
        """plan -> forward -> sample -> commit -> stream -> free."""
        self._drop_aborted()
        if not self.policy.running:
            self._report_in_flight()
            return
        self._before_forward()
        round_start = time.perf_counter()
        try:
            out = self.policy.step()
        except Exception as e:  # a bug must cost the requests of this round, not the whole server
            logger.exception("sgl-diffusion: forward round failed; aborting its requests")
            for dreq in list(self.policy.running):
                reason = FINISH_ABORT(f"internal error: {e}", HTTPStatus.INTERNAL_SERVER_ERROR)
                self._abort(dreq, reason, cache=False)  # its KV may be half written: keep it out of the tree
            self._report_in_flight()  # NOTE: the loop goes idle now, and only a round reports the gauges
            if not device_works(self.policy.device):
                raise RuntimeError("the device fails since this round failed: ending the scheduler, as sglang does on "
                                   "any failure, so the server stops instead of answering every request with a 500 "
                                   "(and /health_generate with a 200)") from e  # fmt: skip
            return
        self._stamp_stages(out, round_start)
        if self.metrics is not None and out.prefill_tokens:
            self.metrics.prefill_round(out.prefill_tokens)
        for dreq in out.exhausted:  # it holds all the KV it could get and needs more: it would wait forever
            self._abort(dreq, FINISH_ABORT(
                "KV cache exhausted: the request needs more KV than the server's pool holds (--max-total-tokens; the "
                "sliding-window layers' pool is --swa-full-tokens-ratio of it)", HTTPStatus.SERVICE_UNAVAILABLE))
        self._report_in_flight()
        reqs = [r.handle for r, _ in out.committed]
        if self.drafts is not None:  # a draft of the canvas just committed, still unsent (sglang held its chunk back)
            for req in reqs:
                self.drafts.drafts.pop(req.rid, None)
        reqs += [r for r in self._collect_drafts() if r not in reqs]
        hand_over_logprobs([r for r, _ in out.committed] + out.finished)
        for dreq in out.finished:
            dreq.handle.grammar = None  # the matcher's state is not needed past the answer
            if not dreq.handle.finished():  # prefill-only requests (max_new_tokens=0) never saw a canvas
                dreq.handle.finished_reason = FINISH_LENGTH(length=len(dreq.handle.output_ids))
            if dreq.handle not in reqs:
                reqs.append(dreq.handle)
        # before the stream: a client that has its answer finds the round in the metrics and KV events
        running, held = self.split_reqs()
        report_round(self.scheduler, out, running, graphed=self.policy.runner.canvas_step is not None, held=held)
        if reqs:
            self.scheduler.output_streamer.stream_output(reqs, any(r.return_logprob for r in reqs))

    # ---- helpers ------------------------------------------------------------------------------

    def _before_forward(self) -> None:
        """What sglang's ``run_batch`` does before a forward: count it (``/start_profile``'s ``start_step`` and
        ``num_steps`` count forwards), start or stop the profiler, and sleep as ``/slow_down`` asked."""
        scheduler = self.scheduler
        scheduler.forward_ct += 1
        scheduler._sched_idled = False
        scheduler.profiler_manager._profile_batch_predicate(CANVAS_ROUND)
        if scheduler.forward_sleep_time is not None:
            logger.info("sgl-diffusion: sleeping %ss before the round (/slow_down)", scheduler.forward_sleep_time)
            time.sleep(scheduler.forward_sleep_time)

    def _stamp_stages(self, out, round_start: float) -> None:
        """Stamp what sglang's batch loop stamps on a request's time_stats (its queue-time and per-stage histograms on
        /metrics, and its traces): the wait ends with the round that begins encoding the prompt, each chunk but the
        last with its round, the prefill with the round that encodes its end, the request with its answer. A
        retracted request waits again (sglang re-queues it), until the round that re-encodes it: meta_info.queue_time
        counts both waits."""
        for dreq in out.retracted:
            dreq.handle.time_stats.set_wait_queue_entry_time()
        for dreq in out.started:
            dreq.handle.time_stats.set_forward_entry_time(round_start)
        for dreq in out.chunked:  # sglang's chunked_prefill stage: one sample per chunk before the last
            dreq.handle.time_stats.set_last_chunked_prefill_finish_time()
        for dreq in (*self.policy.running, *out.finished):
            stats = dreq.handle.time_stats
            if not dreq.prefilling and stats.forward_entry_time and not stats.prefill_finished_time:
                stats.set_prefill_finished_time()
        for dreq in out.finished:
            dreq.handle.time_stats.set_completion_time()

    def _report_in_flight(self) -> None:
        if self.metrics is not None:
            running = self.policy.running
            self.metrics.in_flight(sum(r.state is not None for r in running), sum(r.grammar is not None for r in running))

    def _collect_drafts(self) -> list[Req]:
        """Queue the current argmax canvas of every streamed request that asked for drafts (a host sync each)."""
        wanting = [d for d in self.policy.running if d.params.stream_drafts and d.handle.stream
                   and d.state is not None and d.state.argmax is not None]
        if not wanting or self.scheduler.output_streamer.rust_server is not None:  # Rust egress has no such channel
            return []
        if self.drafts is None:
            self.drafts = DraftOutputStreamer.replacing(self.scheduler.output_streamer)
            self.scheduler.output_streamer = self.drafts
        for dreq in wanting:
            req = dreq.handle
            canvas_index = len(req.output_ids) // self.cfg.canvas_length  # earlier canvases were committed whole
            self.drafts.drafts[req.rid] = make_draft(req, dreq.state.argmax.tolist(), canvas_index,
                                                     int(dreq.state.steps_taken), self.scheduler.tokenizer)
        return [d.handle for d in wanting]

    def _asks(self, req: Req, params: DiffusionParams) -> dict:
        """What a Req asks of its canvases beyond free generation (DiffusionRequest's keyword fields)."""
        asks = {}
        if req.grammar is not None:
            if req.grammar.allocate_vocab_mask(self.cfg.vocab_size, 1, "cpu").dtype != torch.int32:
                raise ValueError(GRAMMAR_BACKEND_ERROR)
            asks["grammar"] = req.grammar
        if req.return_logprob:
            asks["logprobs"] = req.logprob.top_logprobs_num
            if 0 <= req.logprob_start_len < len(req.origin_input_ids):
                asks["score_from"] = req.logprob_start_len
        if params.infill is not None:  # EOS inside a hole would end the request before the template is complete
            eos = set(self.defaults.eos_token_ids) | set(req.eos_token_ids or ()) | set(
                req.sampling_params.stop_token_ids or ())
            asks["banned"] = tuple(sorted(eos))
        return asks

    def _params(self, req: Req) -> DiffusionParams:
        raw = (req.sampling_params.custom_params or {}).get(PARAMS_KEY)
        if raw is not None:
            params = DiffusionParams.from_json(raw)
        else:
            params = DiffusionParams.from_request(None, self.defaults, vocab_size=self.cfg.vocab_size,
                                                  canvas_length=self.cfg.canvas_length)
        if params.seed is None and self.scheduler.tp_size > 1:
            # NOTE: every TP rank samples every canvas and embeds its own copy of it: an unseeded request draws from
            # a seed all ranks share (its rid's hash: random per request), or the ranks' canvases would drift apart
            digest = hashlib.blake2b(str(req.rid).encode(), digest_size=8).digest()
            params = dataclasses.replace(params, seed=int.from_bytes(digest, "little") >> 1)
        return params

    def _images(self, req: Req, prompt: list[int]):
        """Bidirectional image runs of the prompt and their soft tokens, in prompt order.

        NOTE: sglang replaced the image tokens of ``origin_input_ids`` with per-image hash values (the
        radix key, see ``pad_input_ids``); ``prompt`` gets the image token id back for the embedding.
        """
        mm = req.multimodal_inputs
        items = _items_in(mm.mm_items, prompt) if mm is not None else []
        if not items:
            return (), None
        runs = sorted((b, e + 1) for item in items for b, e in item.offsets)  # offsets are inclusive
        for b, e in runs:
            prompt[b:e] = [self.cfg.image_token_id] * (e - b)
        model = self.policy.runner.model
        dtype = model.embed_tokens.weight.dtype
        embeds = torch.cat([
            model.image_embeds(item.feature.to(self.device, dtype), item.image_position_ids.to(self.device))
            for item in items
        ])
        if embeds.shape[0] != sum(e - b for b, e in runs):
            raise ValueError(f"{embeds.shape[0]} image soft tokens for {sum(e - b for b, e in runs)} image positions")
        return tuple(runs), embeds

    def _accept_canvas(self, dreq: DiffusionRequest, canvas: list[int]) -> tuple[list[int], bool]:
        """Hand a committed canvas to the Req: sglang's own EOS / stop / length checks decide what stays."""
        req = dreq.handle
        before = len(req.output_ids)
        state = dreq.state
        req.output_ids.extend(canvas)
        with _earliest_stop_first(req, len(canvas)):
            req.update_finish_state(new_accepted_len=len(canvas))
        # NOTE: sglang admits prompt + max_new_tokens <= context_len, so the tokens a canvas commits always fit; its
        # positions past the context (the last canvas's, partly committed) need no KV. Only no room at all ends it.
        if not req.finished() and req.seqlen >= self.scheduler.model_config.context_len:
            req.finished_reason = FINISH_LENGTH(length=len(req.output_ids))
        end = req.finished_len if req.finished() and req.finished_len is not None else len(req.output_ids)
        # NOTE: the canvas past the stop is no output: a session's next turn appends output_ids to its history
        # (sglang's SessionController reads no finished_len), and got the rest of the canvas (pads, a cut stop string)
        del req.output_ids[end:]
        if end > before:  # usage.reasoning_tokens, counted as sglang's loop counts an accepted run of tokens
            self.scheduler.batch_result_processor._maybe_update_reasoning_tokens(req, list(req.output_ids[before:end]))
        steps = int(state.steps_taken)
        # meta_info["diffusion_steps"], one value per output token: the denoise steps of the token's canvas
        # on the canvas's first token, 0 on the others (so the sum is the forwards spent, the nonzeros the canvases)
        info = req.customized_info if req.customized_info is not None else {}
        info.setdefault(STEPS_KEY, []).extend([steps] + [0] * (end - before - 1) if end > before else [])
        req.customized_info = info
        if self.metrics is not None:
            self.metrics.canvas_done(steps, end - before, int(state.accepted) / max(steps, 1))
        return req.output_ids[before:end], req.finished()

    def _drop_aborted(self) -> None:
        for dreq in list(self.policy.running):
            if dreq.handle.to_finish is not None:
                self._abort(dreq, dreq.handle.to_finish)

    def _abort(self, dreq: DiffusionRequest, reason, cache: bool = True) -> None:
        req = dreq.handle
        # NOTE: sent, not decided: a round that fails may have decided some answers (dreq.finished) before any was sent
        if req.finished_output:  # answered already, only its last canvas was left to encode: nothing to tell the client
            self.policy.abort(dreq, cache)
            return
        req.finished_reason, req.to_finish = reason, None
        req.grammar = None
        self.policy.abort(dreq, cache)
        self.scheduler.output_streamer.stream_output([req], req.return_logprob)


def device_works(device) -> bool:
    """Whether a small computation still runs on ``device``. A CUDA error that poisons the context (an illegal address,
    an ECC error) fails every later round, while each failed round still answers its requests, with a 500, and
    /health_generate's probe, whose answer is all sglang's health check waits for."""
    try:
        torch.ones(1, device=device).add_(1).item()  # the host sync reports an earlier asynchronous error
        return True
    except Exception:
        logger.exception("sgl-diffusion: the device fails a one-element add")
        return False


def _items_in(items, prompt: list[int]) -> list:
    """The media items placed in ``prompt``: those whose positions hold their pad values (sglang's radix keys). A
    session turn with an ``offset`` keeps the history's items (sglang hands the last turn's on whole) though the offset
    cut the history short: an item past the offset is not in the prompt, and one the offset cuts into has no meaning
    (a 400)."""
    kept = []
    for item in items:
        positions = [p for start, end in item.offsets for p in range(start, end + 1)]  # offsets are inclusive
        if item.pad_value is None:  # not padded: where the offsets say
            held = [p < len(prompt) for p in positions]
        else:
            pads = {item.pad_value, *(item.pad_values or ())}
            held = [p < len(prompt) and prompt[p] in pads for p in positions]
        if all(held):
            kept.append(item)
        elif any(held):
            raise ValueError("session_params.offset cuts into an image of the session's history: give an offset "
                             "before or after it")  # fmt: skip
    return kept


@contextlib.contextmanager
def _earliest_stop_first(req, new_len: int):
    """sglang's finish check looks at every new token for stop strings first, taking the first string *in the
    request's list* it finds, and only then for stop tokens: right for one token a step, wrong for a canvas, where a
    later-listed string, or a stop token (EOS, ``stop_token_ids``), may occur earlier. Token by token the earliest
    stop ends the request, so while the canvas is checked the earliest string is put first, and the strings are
    hidden when a stop token ends before all of them (a string ending on the same token wins, as in sglang)."""
    stops = req.sampling_params.stop_strs
    tail = req.tail_str(new_len) if stops else ""
    present = [s for s in stops if s in tail]
    token_end = _stop_token_end(req, new_len) if present else None
    if len(present) + (token_end is not None) < 2:  # nothing to order
        yield
        return
    ends = {s: req._locate_str_stop_finished_len(new_len, stop_str=s) for s in present}
    first = min(present, key=ends.__getitem__)  # ties keep the list's order, as token by token
    strings_first = token_end is None or ends[first] <= token_end
    req.sampling_params.stop_strs = [first] + [s for s in stops if s != first] if strings_first else []
    try:
        yield
    finally:
        req.sampling_params.stop_strs = stops


def _stop_token_end(req, new_len: int) -> int | None:
    """The output length through the first stop token among the last ``new_len`` tokens (sglang's own check, its
    verdict undone), or None."""
    reason, length = req.finished_reason, req.finished_len
    matched = req._check_token_based_finish(req.output_ids[-new_len:])
    end = req.finished_len if matched else None
    req.finished_reason, req.finished_len = reason, length
    return end


def check_supported(scheduler: Scheduler) -> None:
    """Refuse, at startup, the sglang modes the canvas loop does not implement."""
    from sglang.srt.disaggregation.utils import DisaggregationMode

    unsupported = {
        "PD disaggregation": scheduler.disaggregation_mode != DisaggregationMode.NULL,
        "pipeline parallelism": scheduler.server_args.pp_size > 1,
        "PD multiplexing": scheduler.enable_pdmux,
        # the canvas forward never sets up sglang's LoRA batch info: adapters would be ignored, or their layers fail
        "LoRA adapters": scheduler.enable_lora,
        # a streaming session hands each turn's KV row to the session when sglang's batch allocates it; our KV slots
        # allocate rows themselves, so the first turn's release failed and the idle leak check ended the server
        "streaming sessions (--enable-streaming-session; sessions without it work)":
            scheduler.server_args.enable_streaming_session,
        # the canvas loop neither drafts nor verifies tokens: the draft worker would only hold memory
        "speculative decoding": not scheduler.spec_algorithm.is_none(),
        # host-memory KV (HiCache) needs sglang's batch loop to load prefixes back and acknowledge write-throughs
        "hierarchical KV cache": scheduler.enable_hierarchical_cache,
        # sglang's in-tree dLLM loop for this model: ours replaces it (its page size, one block, is refused below)
        "sglang's dLLM loop (--dllm-algorithm; ours replaces it)": scheduler.server_args.dllm_algorithm is not None,
        # KV slots are allocated token by token and the attention kernels index the pool per token (page size 1)
        f"KV pages of {scheduler.page_size} tokens (--page-size; 1 works)": scheduler.page_size != 1,
        # one MHA pool for all layers has the full layers' KV shape, which the sliding layers' K/V do not fit (Gemma 4's
        # global layers have other head counts and dims); every request would fail
        "one KV pool for sliding and full layers (--disable-hybrid-swa-memory)":
            scheduler.server_args.disable_hybrid_swa_memory,
        # the canvas forward reads and writes the pool's buffers as plain K/V tensors: block-scaled and packed caches
        # (mxfp8, nvfp4, fp4_mx_block16) keep scales only sglang's kernels read, and a pool with a KV quant method
        # hands out dequantized copies, so writes into them would be lost
        f"a quantized KV cache (--kv-cache-dtype {scheduler.server_args.kv_cache_dtype})": _quantized_kv(scheduler),
        # the watermark biases sglang's token sampler, which the canvas sampler replaces: answers would go out unmarked
        "watermarking (--enable-watermark)": scheduler.server_args.enable_watermark,
    }
    if on := [name for name, enabled in unsupported.items() if enabled]:
        raise RuntimeError(f"sgl-diffusion does not support {', '.join(on)} for {ARCHITECTURE} yet")


def _quantized_kv(scheduler: Scheduler) -> bool:
    if scheduler.server_args.kv_cache_dtype not in PLAIN_KV_CACHE_DTYPES:
        return True
    method = scheduler.token_to_kv_pool_allocator.get_kvcache().get_kv_cache_quant_method()
    return method is not None and method.name != "unquantized"


def run_event_loop(scheduler: Scheduler) -> None:
    """Replaces sglang's scheduler event loop for DiffusionGemma."""
    engine = DiffusionEngine(scheduler)
    scheduler.diffusion_engine = engine
    logger.info("sgl-diffusion: serving %s canvas by canvas", ARCHITECTURE)
    with torch.inference_mode():
        while not scheduler.gracefully_exit:
            scheduler.ingest_requests()
            if scheduler._engine_paused:
                engine.publish_load()  # /v1/loads shows what waits
                scheduler.maybe_sleep_on_idle()  # until the next message (/continue_generation): no busy loop
                continue
            engine.admit_compiled_grammars()
            engine.admit()
            if engine.has_work():
                engine.step()
                engine.publish_load()
                # sglang answers queued /health_generate probes after each batch; a long canvas must not starve them
                scheduler.maybe_send_health_check_signal()
            else:
                scheduler._sched_idled = True
                scheduler.on_idle()
