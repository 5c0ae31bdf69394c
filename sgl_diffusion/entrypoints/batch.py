"""Run an OpenAI Batch API file through an offline sglang Engine.

    python -m sgl_diffusion.entrypoints.batch --model-path DIR --input IN.jsonl --output OUT.jsonl [sglang args]

Every other argument is a sglang server argument (``python -m sglang.launch_server --help``); ``--log-level``
defaults to ``error`` here, as for ``sglang.Engine``.

Local media: image and video paths (and ``file://`` URLs) in the bodies are read only inside the input file's own
directory (relative paths are relative to it), unless ``SGL_DIFFUSION_ALLOWED_LOCAL_MEDIA_PATHS`` is set (then it
alone decides; set it empty to allow none). The rest of the server's media policy applies unchanged (README
"Security").

Input: one request per line, ``{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
with ``url`` ``/v1/chat/completions`` or ``/v1/completions``. ``body`` is what the server takes on that route,
``diffusion`` included; it goes through sglang's own OpenAIServingChat / OpenAIServingCompletion, so the
answer is the server's. Blank lines are ignored. Up to ``--max-in-flight`` requests run at once (continuous
batching in the scheduler); a progress bar on stderr shows requests/s and generated tokens/s.

Output: one line per input line, in completion order, Batch API style:
``{"id": "batch_req_...", "custom_id": "a", "response": {"status_code": 200, "request_id": "...", "body": {...}},
"error": null}``. Errors follow the Batch API's split:

- the route answered (``response`` set, ``error`` null): status 200 with the chat.completion /
  text_completion body, or the server's error body (``{"object": "error", "message", "type", "code"}``)
  with status 400 for a body that fails validation, a streamed request or a request the engine refuses
  (e.g. ``diffusion.max_denoising_steps: 0``), 500 for an internal error;
- the line never reached a route (``response`` null, ``error: {"code", "message"}``): ``invalid_json``,
  ``missing_custom_id`` and ``duplicate_custom_id`` (the first line with an id is run, later ones are
  not), which also carry ``line`` (1-based, as in Batch API validation errors), and ``invalid_url`` /
  ``invalid_method``.

Resume: rows are appended and flushed one by one, so an interrupted job loses only the requests in flight.
Run the same command again: ids that have a row in OUT (and line errors already reported, by line number)
are skipped, a truncated last line in OUT is cut off. SIGTERM stops taking new requests and lets those in
flight finish. Exit codes: 0 when every line has a row (error rows included), 2 for a usage error (e.g. no
input file), 143 after SIGTERM and 130 after Ctrl-C (run the same command again to resume), 1 when the engine
does not start (the rows of the lines that never reach a route are still written).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import pathlib
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import sglang

ROUTES = ("/v1/chat/completions", "/v1/completions")
DEFAULT_MAX_IN_FLIGHT = 128
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    line: int
    custom_id: str
    url: str
    body: Any  # validated by the route's pydantic request model, like an HTTP body


@dataclasses.dataclass(frozen=True)
class Done:
    """What OUT already answers: request results by custom_id, line errors by input line."""

    custom_ids: frozenset[str]
    lines: frozenset[int]

    @classmethod
    def read(cls, path: pathlib.Path) -> Done:
        """Rows of ``path``; cuts a truncated last line off the file (a kill mid-write)."""
        if not path.exists():
            return cls(frozenset(), frozenset())
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with path.open("r+b") as f:
                f.truncate(len(complete))
        custom_ids, lines = set(), set()
        for n, text in enumerate(complete.splitlines(), 1):
            try:
                row = orjson.loads(text)
                line = (row.get("error") or {}).get("line")
                custom_id = row["custom_id"]
            except (orjson.JSONDecodeError, AttributeError, KeyError):
                logger.warning("%s:%d is not an output row; ignored", path, n)
                continue
            if isinstance(line, int):
                lines.add(line)
            elif isinstance(custom_id, str):
                custom_ids.add(custom_id)
        return cls(frozenset(custom_ids), frozenset(lines))


def plan(input_path: pathlib.Path, done: Done) -> Iterator[BatchRequest | dict]:
    """Input lines not answered in ``done``, in order: a request to run, or the error row of a bad line."""
    seen: set[str] = set()
    with input_path.open("rb") as f:
        for line, text in enumerate(f, 1):
            if not text.strip() or line in done.lines:
                continue
            try:
                item = orjson.loads(text)
            except orjson.JSONDecodeError as e:
                yield error_row(None, "invalid_json", f"line {line} is not JSON: {e}", line=line)
                continue
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not custom_id:
                yield error_row(None, "missing_custom_id", f"line {line} has no string custom_id", line=line)
            elif custom_id in seen:
                yield error_row(custom_id, "duplicate_custom_id", f"custom_id {custom_id!r} is repeated on "
                                f"line {line}; only its first line is run", line=line)  # fmt: skip
            else:
                seen.add(custom_id)
                if custom_id not in done.custom_ids:
                    yield _route(line, custom_id, item)


def _route(line: int, custom_id: str, item: dict) -> BatchRequest | dict:
    url, method = item.get("url"), item.get("method", "POST")
    if url not in ROUTES:
        return error_row(custom_id, "invalid_url", f"url must be one of {list(ROUTES)}, got {url!r}")
    if method != "POST":
        return error_row(custom_id, "invalid_method", f"method must be POST, got {method!r}")
    return BatchRequest(line, custom_id, url, item.get("body"))


def error_row(custom_id: str | None, code: str, message: str, line: int | None = None) -> dict:
    error = {"code": code, "message": message} | ({"line": line} if line is not None else {})
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None, "error": error}


def response_row(custom_id: str, status_code: int, body: dict) -> dict:
    request_id = body.get("id") if status_code == 200 else None
    response = {"status_code": status_code, "request_id": request_id or uuid.uuid4().hex, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": None}


class BatchRunner:
    """Answers BatchRequests with the server's OpenAI handlers, on the Engine's tokenizer manager; relative media
    paths in the bodies name files in ``media_dir`` (the input file's directory)."""

    def __init__(self, engine: sglang.Engine, media_dir: pathlib.Path):
        from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
        from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion

        self.media_dir = media_dir
        manager, templates = engine.tokenizer_manager, engine.template_manager
        # Built as sglang's http_server builds them, so our serving_chat patch applies the same way.
        self._routes = {
            "/v1/chat/completions": (ChatCompletionRequest, manager.serving_chat_class(manager, templates)),
            "/v1/completions": (CompletionRequest, OpenAIServingCompletion(manager, templates)),
        }

    async def answer(self, request: BatchRequest) -> dict:
        from pydantic import ValidationError
        from sglang.srt.utils.json_response import model_json_response

        model, serving = self._routes[request.url]
        if not isinstance(request.body, dict):  # sglang's chat validators call body.get: a 500, not a 400
            return response_row(request.custom_id, 400, _bad_request(
                f"body must be a JSON object with the {request.url} request (got {type(request.body).__name__})"))
        anchor_relative_media(request.body, self.media_dir)
        try:
            parsed = model.model_validate(request.body)
        except ValidationError as e:  # the server's RequestValidationError handler answers 400 too
            return response_row(request.custom_id, 400, _bad_request(str(e)))
        if parsed.stream:
            return response_row(request.custom_id, 400, _bad_request("stream is not supported in a batch"))
        # raw_request=None: sglang reads it only for HTTP headers and client-disconnect checks
        http = model_json_response(await serving.handle_request(parsed, None))
        return response_row(request.custom_id, http.status_code, orjson.loads(http.body))


def anchor_relative_media(body: dict, base: pathlib.Path) -> None:
    """Relative image and video paths in a chat body name files beside the input file, wherever the job runs."""
    from sgl_diffusion.multimodal.media_policy import is_relative_path

    for message in body.get("messages") if isinstance(body.get("messages"), list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            for key in ("image_url", "video_url") if isinstance(part, dict) else ():
                media = part.get(key)
                if isinstance(media, dict) and is_relative_path(media.get("url")):
                    media["url"] = str(base / media["url"])
                elif is_relative_path(media):
                    part[key] = str(base / media)


@dataclasses.dataclass
class Summary:
    written: int = 0
    failed: int = 0  # rows with an error or a non-200 response
    skipped: int = 0  # rows OUT held before the run
    stopped: bool = False  # SIGTERM: requests were left for a resumed run


class _Output:
    """Appends rows to OUT, one flushed line each, and counts them on the progress bar."""

    def __init__(self, file, bar, summary: Summary):
        self._file, self._bar, self._summary, self._tokens = file, bar, summary, 0

    def write(self, row: dict) -> None:
        self._file.write(orjson.dumps(row) + b"\n")
        self._file.flush()  # NOTE: resume trusts every complete line, so a row goes out whole, at once
        self._summary.written += 1
        if row["error"] is not None or row["response"]["status_code"] != 200:
            self._summary.failed += 1
        else:
            self._tokens += (row["response"]["body"].get("usage") or {}).get("completion_tokens", 0)
        elapsed = max(self._bar.format_dict["elapsed"], 1e-6)
        self._bar.set_postfix_str(f"{self._tokens / elapsed:.1f} tok/s", refresh=False)
        self._bar.update()


async def run_batch(
    engine: sglang.Engine, input_path: pathlib.Path, output_path: pathlib.Path,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, progress: bool = True,
) -> Summary:  # fmt: skip
    """Append a row to ``output_path`` for every input line that has none yet; see the module docstring."""
    from tqdm import tqdm

    runner, summary = BatchRunner(engine, input_path.resolve().parent), Summary()
    done = Done.read(output_path)
    summary.skipped = len(done.custom_ids) + len(done.lines)
    todo = sum(1 for _ in plan(input_path, done))  # two passes: only the bodies in flight stay in memory
    slots, tasks = asyncio.Semaphore(max_in_flight), set()
    with output_path.open("ab") as file, tqdm(total=todo, unit="req", disable=not progress, file=sys.stderr) as bar:
        out = _Output(file, bar, summary)

        async def run_one(request: BatchRequest) -> None:
            try:
                out.write(await runner.answer(request))
            except Exception as e:  # handle_request catches its own; this keeps one row per line regardless
                logger.exception("custom_id %s failed", request.custom_id)
                out.write(response_row(request.custom_id, 500, _error_body(str(e), "InternalServerError", 500)))
            finally:
                slots.release()

        for item in plan(input_path, done):
            if isinstance(item, dict):
                out.write(item)
                continue
            await slots.acquire()
            if engine.tokenizer_manager.gracefully_exit:  # set by sglang's SIGTERM handler
                summary.stopped = True
                break
            task = asyncio.create_task(run_one(item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return summary


def write_line_errors(input_path: pathlib.Path, output_path: pathlib.Path) -> int:
    """Append the rows of the lines that never reach a route (they need no engine); returns their count."""
    rows = [item for item in plan(input_path, Done.read(output_path)) if isinstance(item, dict)]
    with output_path.open("ab") as file:
        for row in rows:
            file.write(orjson.dumps(row) + b"\n")
    return len(rows)


def _bad_request(message: str) -> dict:
    from http import HTTPStatus

    return _error_body(message, HTTPStatus.BAD_REQUEST.phrase, 400)


def _error_body(message: str, err_type: str, code: int) -> dict:
    from sglang.srt.entrypoints.openai.protocol import ErrorResponse

    return ErrorResponse(message=message, type=err_type, code=code).model_dump()


def build_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(
        prog="python -m sgl_diffusion.entrypoints.batch", description=__doc__.splitlines()[0],
        epilog="All other arguments are sglang's server arguments.")  # fmt: skip
    batch = parser.add_argument_group("batch")
    batch.add_argument("--input", type=pathlib.Path, required=True, help="OpenAI Batch API JSONL")
    batch.add_argument("--output", type=pathlib.Path, required=True, help="rows are appended; existing ids are skipped")
    batch.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT, help="requests submitted at once")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    ServerArgs.add_cli_args(parser)
    parser.set_defaults(log_level="error")  # as sglang.Engine: a long job's stderr is the progress bar
    return parser


def allow_input_directory(input_path: pathlib.Path, environ: dict | None = None) -> None:
    """Local media in the bodies may come from the input file's directory, unless the operator set the variable."""
    from sgl_diffusion.env import env_name

    environ = os.environ if environ is None else environ
    environ.setdefault(env_name("allowed_local_media_paths"), str(input_path.resolve().parent))


def main(argv: list[str] | None = None) -> int:
    import sglang
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger
    from tqdm import tqdm

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if "--config" in argv:
        argv = ConfigArgumentMerger(parser).merge_config_with_args(argv)
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"--input {args.input}: no such file")
    if args.max_in_flight < 1:
        parser.error("--max-in-flight must be at least 1")
    # NOTE: rows appended to the input would be read back as lines to answer, each adding another row, without end
    if args.output.exists() and args.output.samefile(args.input):
        parser.error(f"--output {args.output} is the input file: write the rows to another file")
    if not args.output.parent.is_dir():
        parser.error(f"--output {args.output}: no such directory {args.output.parent}")
    if args.output.is_dir():
        parser.error(f"--output {args.output} is a directory: name the file to write the rows to")

    allow_input_directory(args.input)  # NOTE: before the Engine, whose tokenizer manager (here) reads it
    # tqdm's default lock is a multiprocessing semaphore, owned by the resource tracker that Engine.shutdown
    # kills with our other children; freeing it at exit would then print a traceback. One process, one bar.
    tqdm.set_lock(threading.RLock())
    # NOTE: before ServerArgs, as sglang.launch_server does: plugins (ours) may hook its __post_init__
    load_plugins()
    try:
        engine = sglang.Engine(server_args=ServerArgs.from_cli_args(args))
    except Exception:
        written = write_line_errors(args.input, args.output)
        print(f"{args.output}: the engine did not start; wrote the {written} rows that need no engine",
              file=sys.stderr)  # fmt: skip
        raise
    try:
        summary = engine.loop.run_until_complete(
            run_batch(engine, args.input, args.output, args.max_in_flight, progress=not args.no_progress))
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to resume into {args.output}", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        engine.shutdown()
    stopped = "; stopped by SIGTERM, run again to resume" if summary.stopped else ""
    print(f"{args.output}: {summary.written} rows written ({summary.failed} errors), {summary.skipped} were "
          f"already there{stopped}", file=sys.stderr)  # fmt: skip
    return 128 + signal.SIGTERM if summary.stopped else 0


if __name__ == "__main__":
    sys.exit(main())
