import asyncio
import json
from inspect import Parameter
from types import SimpleNamespace

import pytest

from srt_patches import openai_stream

EMPTY = Parameter.empty
_TM = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
EXPECTED_PARAMETERS = {
    f"{_TM}.update_request_meta_info": [
        ("self", EMPTY), ("meta_info", EMPTY), ("state", EMPTY), ("customized_info", EMPTY), ("index", EMPTY),
    ],
    f"{_TM}.generate_request": [("self", EMPTY), ("obj", EMPTY), ("request", None)],
    "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._generate_chat_stream": [
        ("self", EMPTY), ("adapted_request", EMPTY), ("request", EMPTY),
    ],
    "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._generate_completion_stream": [
        ("self", EMPTY), ("adapted_request", EMPTY), ("request", EMPTY),
    ],
    "sglang.srt.entrypoints.openai.usage_processor.UsageProcessor.calculate_streaming_usage": [
        ("prompt_tokens", EMPTY), ("reasoning_tokens", EMPTY), ("completion_tokens", EMPTY), ("cached_tokens", EMPTY),
        ("n_choices", EMPTY),
    ],
    # the wrapper reads the built usage only
    "sglang.srt.entrypoints.openai.usage_processor.UsageProcessor.calculate_token_usage": [
        ("prompt_tokens", EMPTY), ("completion_tokens", EMPTY),
    ],
    "sglang.srt.entrypoints.openai.serving_responses.OpenAIServingResponses.create_responses": [
        ("self", EMPTY), ("request", EMPTY), ("raw_request", None),
    ],
    # the wrapper reads the built response's usage only
    "sglang.srt.entrypoints.openai.serving_responses.OpenAIServingResponses._build_response": [
        ("request", EMPTY), ("sampling_params", EMPTY), ("output", EMPTY), ("status", EMPTY),
    ],
}  # fmt: skip
DRAFT = {"canvas": 0, "step": 2, "token_ids": [5, 6], "text": "ab"}


def test_every_target_has_an_expected_signature():
    assert set(openai_stream.TARGETS) == set(EXPECTED_PARAMETERS)


@pytest.mark.parametrize("target", openai_stream.TARGETS)
def test_upstream_signature(target, upstream_parameters):
    expected = EXPECTED_PARAMETERS[target]
    assert upstream_parameters(target)[: len(expected)] == expected


@pytest.mark.parametrize("target", openai_stream.TARGETS)
def test_installed(target, applied):
    assert applied.is_installed(target)


def test_upstream_accumulates_customized_info(upstream):
    """Upstream appends every customized value to a growing list (why drafts bypass it: one draft replaces another)."""
    from sglang.srt.managers.tokenizer_manager import ReqState, TokenizerManager

    state = ReqState([], False, asyncio.Event(), None, None)
    meta = {}
    update = upstream(openai_stream.TARGETS[0])
    update(TokenizerManager, meta, state, {"k": [[1]]}, 0, None)
    update(TokenizerManager, meta, state, {"k": [[2]]}, 0, None)
    assert meta["k"] == [1, 2]


def test_meta_info_gets_the_latest_draft_only():
    """The draft of this chunk is set whole (not accumulated); other customized keys still reach the original."""
    seen = []

    def original(manager, meta_info, state, customized_info, index, finish_reason):
        seen.append(customized_info)

    meta = {}
    info = {"diffusion_draft": [None, DRAFT], "diffusion_steps": [[1], [2]]}
    openai_stream.update_request_meta_info(original, None, meta, None, info, 1, None)
    assert meta == {"diffusion_draft": DRAFT} and seen == [{"diffusion_steps": [[1], [2]]}]
    meta = {}
    openai_stream.update_request_meta_info(original, None, meta, None, info, 0, None)
    assert meta == {}


def _chunk(tokens, draft=None, finish=None, index=0):
    meta = {"id": "r1", "completion_tokens": tokens, "finish_reason": finish}
    if draft is not None:
        meta["diffusion_draft"] = draft
    return {"index": index, "text": "", "meta_info": meta}


async def _collect(agen):
    return [x async for x in agen]


def test_drafts_are_diverted_and_draft_only_chunks_dropped():
    """generate_request under a sink: drafts go to the sink; chunks that carried only a draft are dropped."""
    chunks = [_chunk(0, DRAFT), _chunk(0, DRAFT | {"step": 3}), _chunk(32), _chunk(32, DRAFT), _chunk(40, None, {"type": "length"})]

    async def original(manager, obj, request=None):
        for c in chunks:
            yield c

    async def run():
        sink = asyncio.Queue()
        token = openai_stream._draft_sink.set(sink)
        try:
            out = await _collect(openai_stream.generate_request(original, None, None))
        finally:
            openai_stream._draft_sink.reset(token)
        return out, [sink.get_nowait() for _ in range(sink.qsize())]

    out, drafts = asyncio.run(run())
    assert [c["meta_info"]["completion_tokens"] for c in out] == [32, 40]
    assert all("diffusion_draft" not in c["meta_info"] for c in out)
    assert [d["step"] for d in drafts] == [2, 3, 2] and drafts[0]["id"] == "r1" and drafts[0]["index"] == 0
    # without a sink the stream is untouched
    assert asyncio.run(_collect(openai_stream.generate_request(original, None, None))) == chunks


def _adapted(stream_drafts):
    return SimpleNamespace(sampling_params={"diffusion": {"stream_drafts": stream_drafts}})


def test_openai_stream_interleaves_draft_chunks():
    """The SSE stream gets a choices-less chunk with diffusion_draft for each draft, in order with the text chunks."""
    async def manager_stream():
        for c in (_chunk(0, DRAFT), _chunk(32), _chunk(32, DRAFT | {"canvas": 1}), _chunk(40, None, {"type": "stop"})):
            yield c

    async def original_sse(serving, adapted_request, request, raw_request):
        async for content in openai_stream.generate_request(lambda *a: manager_stream(), None, adapted_request):
            await asyncio.sleep(0)
            yield f"data: {json.dumps({'tokens': content['meta_info']['completion_tokens']})}\n\n"
        yield "data: [DONE]\n\n"

    request = SimpleNamespace(model="m")
    events = asyncio.run(_collect(openai_stream.completion_stream(original_sse, None, _adapted(True), request, None)))
    kinds = [("draft", json.loads(e[6:])["diffusion_draft"]["canvas"]) if "diffusion_draft" in e else e.strip()
             for e in events]
    assert kinds == [("draft", 0), 'data: {"tokens": 32}', ("draft", 1), 'data: {"tokens": 40}', "data: [DONE]"]
    first = json.loads(events[0][6:])
    assert first["choices"] == [] and first["object"] == "text_completion" and first["model"] == "m"
    # without stream_drafts the original stream is returned as is
    plain = asyncio.run(_collect(openai_stream.completion_stream(original_sse, None, _adapted(False), request, None)))
    assert all("diffusion_draft" not in e for e in plain) and len(plain) == 5  # 4 chunks + [DONE]


def test_openai_stream_error_propagates():
    """An exception in the wrapped stream reaches the client's iteration instead of hanging it."""
    async def broken(serving, adapted_request, request, raw_request):
        yield "data: {}\n\n"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(_collect(openai_stream.chat_stream(broken, None, _adapted(True), SimpleNamespace(model="m"), None)))


def _steps_chunk(steps, index=0, finish=None):
    chunk = _chunk(len(steps), None, finish, index)
    chunk["meta_info"]["diffusion_steps"] = steps
    return chunk


def _usage_stream(chunks):
    """An OpenAI stream builder as sglang's: it reads generate_request's chunks, then builds the usage chunk."""
    async def manager_stream():
        for c in chunks:
            yield c

    async def original_sse(serving, adapted_request, request, raw_request):
        async for content in openai_stream.generate_request(lambda *a: manager_stream(), None, adapted_request):
            yield f"data: {json.dumps({'tokens': content['meta_info']['completion_tokens']})}\n\n"
        usage = openai_stream.streaming_usage(lambda *a, **k: SimpleNamespace(completion_tokens=1), {}, {}, {}, {}, 1)
        yield f"data: {json.dumps({'usage': vars(usage)})}\n\n"

    return original_sse


@pytest.mark.parametrize("drafts", [False, True])
def test_a_streamed_usage_chunk_carries_the_diffusion_block(drafts):
    """Step counts as sglang accumulates them (the answer's so far, per choice): the usage chunk counts every canvas
    of every choice once, as the non-streamed usage does."""
    chunks = [_steps_chunk([3, 0]), _steps_chunk([2, 0, 0], index=1), _steps_chunk([3, 0, 4, 0]),
              _steps_chunk([2, 0, 0, 5], index=1, finish={"type": "length"})]  # fmt: skip
    events = asyncio.run(_collect(openai_stream.chat_stream(_usage_stream(chunks), None, _adapted(drafts),
                                                            SimpleNamespace(model="m"), None)))  # fmt: skip
    usage = json.loads(events[-1][6:])["usage"]
    assert usage["diffusion"] == {"canvases": 4, "denoise_steps": 14, "tokens_per_forward": round(8 / 14, 4)}
    assert usage["completion_tokens"] == 1  # sglang's figures are left as they are


@pytest.mark.parametrize("drafts", [False, True])
def test_continuous_usage_carries_the_block_of_its_own_choice(drafts):
    """With continuous_usage_stats each chunk's usage is its choice's so far, built right after the stream takes the
    choice's output: its diffusion block counts that choice's canvases only."""
    chunks = [_steps_chunk([3, 0]), _steps_chunk([2, 0, 0], index=1), _steps_chunk([3, 0, 4, 0]),
              _steps_chunk([2, 0, 0, 5], index=1, finish={"type": "length"})]  # fmt: skip

    async def manager_stream():
        for c in chunks:
            yield c

    async def original_sse(serving, adapted_request, request, raw_request):
        async for content in openai_stream.generate_request(lambda *a: manager_stream(), None, adapted_request):
            usage = openai_stream.token_usage(lambda *a, **k: SimpleNamespace(diffusion=None), 0, 0)
            yield f"data: {json.dumps({'index': content['index'], 'diffusion': usage.diffusion})}\n\n"

    events = asyncio.run(_collect(openai_stream.chat_stream(original_sse, None, _adapted(drafts),
                                                            SimpleNamespace(model="m"), None)))  # fmt: skip
    blocks = [json.loads(e[6:]) for e in events if '"index"' in e]
    assert [(b["index"], b["diffusion"]["canvases"], b["diffusion"]["denoise_steps"]) for b in blocks] == [
        (0, 1, 3), (1, 1, 2), (0, 2, 7), (1, 2, 7)]
    outside = openai_stream.token_usage(lambda *a, **k: SimpleNamespace(diffusion=None), 0, 0)
    assert outside.diffusion is None  # not an OpenAI stream of this task: untouched


def test_incremental_step_counts_add_up_and_other_models_get_none():
    chunks = [_steps_chunk([3, 0]), _steps_chunk([4])]  # --incremental-streaming-output: each chunk's own tokens
    chunks[1]["meta_info"]["completion_tokens"] = 3
    events = asyncio.run(_collect(openai_stream.completion_stream(_usage_stream(chunks), None, _adapted(False),
                                                                  SimpleNamespace(model="m"), None)))  # fmt: skip
    assert json.loads(events[-1][6:])["usage"]["diffusion"] == {"canvases": 2, "denoise_steps": 7,
                                                                "tokens_per_forward": round(3 / 7, 4)}  # fmt: skip
    no_steps = [_chunk(4, None, {"type": "stop"})]  # another model's chunks carry no step counts
    events = asyncio.run(_collect(openai_stream.completion_stream(_usage_stream(no_steps), None, _adapted(False),
                                                                  SimpleNamespace(model="m"), None)))  # fmt: skip
    assert "diffusion" not in json.loads(events[-1][6:])["usage"]


def test_outside_an_openai_stream_nothing_is_kept():
    """/generate and the Ollama routes call generate_request outside an OpenAI stream: their chunks pass untouched."""
    chunks = [_steps_chunk([3, 0])]

    async def original(manager, obj, request=None):
        for c in chunks:
            yield c

    assert asyncio.run(_collect(openai_stream.generate_request(original, None, None))) == chunks
    assert openai_stream._stream_steps.get() is None
