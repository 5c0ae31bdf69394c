"""sglang's HTTP server: freeze the GC once it answers, also when the warm-up is skipped; bad input to its utility
routes is a 400; /server_info shows no credentials.

Target: sglang.srt.entrypoints.http_server._freeze_gc_after_server_warmup
Checked against: sglang 0.5.23
Why: with ``--skip-server-warmup`` (a CPU default here: the warm-up request costs a whole canvas) sglang posts
     /freeze_gc before uvicorn listens, so every CPU server logged a "post-warmup freeze_gc failed" warning with a
     connection-refused traceback at start-up, and its processes' GC was never frozen. The post now waits until
     /model_info answers, as sglang's warm-up does before its request.
Remove when: sglang waits for its HTTP server before freezing the GC.

Target: sglang.srt.entrypoints.http_server.launch_server
Checked against: sglang 0.5.23
Why: four routes let the error of a bad argument escape as an HTTP 500 with a traceback in the log: an unknown parser
     name on /parse_function_call and /separate_reasoning (ValueError from the parser), an unknown level on
     /configure_logging (ValueError from logging), an unknown parameter on /vertex_generate (TypeError from
     GenerateReqInput). Before the server starts, an exception handler is added to sglang's app that answers those
     errors of those routes with a 400 and the message; any other error still is a 500.
Remove when: these routes check their arguments.

Targets: sglang.srt.entrypoints.http_server.build_server_info,
         sglang.srt.managers.tokenizer_control_mixin.TokenizerControlMixin.get_internal_state (what /server_info and
         /get_server_info answer: the server's arguments, and each scheduler's as its ``internal_states``)
Checked against: sglang 0.5.23
Why: they return every server argument and the launch command, redacting only watermark secrets: any holder of the
     ordinary --api-key read the --admin-api-key there (and the SSL key password), then called the admin routes.
     Those values are redacted, in the fields and in the launch command, for every model the server runs.
Remove when: sglang redacts its credentials from /server_info.

Target: sglang.srt.entrypoints.http_server.validation_exception_handler (replaced on the app in launch_server)
Checked against: sglang 0.5.23
Why: a body that fails validation (JSON cut short, a field of the wrong type) is a 400 whose message is the error's
     ``str``, which names the route's source file and line in the installed sglang (``File "/.../http_server.py",
     line 928, in generate_request``): any client learned the server's install path. sglang scrubs it for
     /v1/messages only. The handler now gets the same errors with the route's path alone (``Endpoint: POST
     /generate``), for every model the server runs; sglang builds the answer as before.
Remove when: sglang leaves the source location out of its validation messages.

Target: sglang.srt.entrypoints.http_server.serve_generate_request
Checked against: sglang 0.5.23
Why: a streamed /generate starts its HTTP 200 before the request is checked, so a refusal (a bad sampling or diffusion
     parameter) came as a 200 whose stream held the error event (``"code": 400``) and ``[DONE]``; unstreamed, the same
     body is a 400. sglang's OpenAI routes read the first chunk before they answer ("to trigger validation before
     HTTP 200 is sent"); so does this wrapper, and when that chunk is the error it answers with its status and sglang's
     unstreamed error body. An error later in the stream stays in it. Every model's server.
Remove when: sglang's /generate checks a streamed request before it starts the stream.
"""

from __future__ import annotations

import time

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

TARGETS = (
    "sglang.srt.entrypoints.http_server._freeze_gc_after_server_warmup",
    "sglang.srt.entrypoints.http_server.launch_server",
    "sglang.srt.entrypoints.http_server.build_server_info",
    "sglang.srt.managers.tokenizer_control_mixin.TokenizerControlMixin.get_internal_state",
    "sglang.srt.entrypoints.http_server.serve_generate_request",
)
SECRET_FIELDS = ("api_key", "admin_api_key", "ssl_keyfile_password")  # server arguments /server_info must not show
REDACTED = "<redacted>"
# route -> (the error its bad arguments raise, text that error's message holds then)
BAD_ARGUMENT_ERRORS = {
    "/parse_function_call": (ValueError, "Unsupported tool_call_parser"),
    "/separate_reasoning": (ValueError, "Unsupported model type"),
    "/configure_logging": (ValueError, "Unknown level"),
    "/vertex_generate": (TypeError, "unexpected keyword argument"),
}
WAIT_S, POLL_S = 120, 0.5  # sglang's warm-up waits up to 120 s for /model_info


def freeze_gc_after_server_warmup(original, server_args):
    from sglang.srt.runtime_context import get_serving

    if get_serving().skip_server_warmup and _serves_diffusion(server_args):
        _wait_until_answering(server_args)
    return original(server_args)


def _serves_diffusion(server_args) -> bool:
    from sglang.srt.arg_groups.overrides import model_config_of

    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    return serves_diffusion_model(model_config_of(server_args).hf_config)


def _wait_until_answering(server_args) -> None:
    import requests
    from sglang.srt.arg_groups.serving_hook import ssl_verify_of

    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            requests.get(server_args.url() + "/model_info", timeout=5, verify=ssl_verify_of(server_args))
            return  # any HTTP answer (a 401 without the API key too) means uvicorn listens
        except requests.exceptions.RequestException:
            time.sleep(POLL_S)


def launch_server(original, server_args, *args, **kwargs):
    from fastapi.exceptions import RequestValidationError
    from sglang.srt.entrypoints.http_server import app

    app.add_exception_handler(RequestValidationError, validation_error_without_source)
    if _serves_diffusion(server_args):
        for error in {error for error, _ in BAD_ARGUMENT_ERRORS.values()}:
            app.add_exception_handler(error, bad_argument_is_a_400)  # NOTE: before the app starts, which freezes them
    return original(server_args, *args, **kwargs)


async def bad_argument_is_a_400(request, exc):
    from fastapi.responses import ORJSONResponse

    route = request.url.path.removeprefix(request.scope.get("root_path", ""))
    error, text = BAD_ARGUMENT_ERRORS.get(route, (None, None))
    if error is None or not isinstance(exc, error) or text not in str(exc):
        raise exc  # not a bad argument: sglang's 500, as before
    return ORJSONResponse({"error": {"message": str(exc)}}, status_code=400)


async def validation_error_without_source(request, exc):
    from fastapi.exceptions import RequestValidationError
    from sglang.srt.entrypoints import http_server

    route = {"path": exc.endpoint_path} if exc.endpoint_path else None
    without_source = RequestValidationError(exc.errors(), body=exc.body, endpoint_ctx=route)
    return await http_server.validation_exception_handler(request, without_source)


async def serve_generate_request(original, obj, request):
    from fastapi.responses import StreamingResponse
    from sglang.srt.entrypoints import http_server

    response = await original(obj, request)
    if not isinstance(response, StreamingResponse):
        return response
    stream = response.body_iterator
    try:
        first = await anext(stream)
    except StopAsyncIteration:  # the client left before anything was sent: sglang ends the stream quietly
        return response
    if (error := _stream_error(first)) is not None:
        await stream.aclose()
        return http_server._create_error_response(StreamRefusal(error.get("message"), error.get("code", 400)))
    response.body_iterator = _chained(first, stream)
    return response


class StreamRefusal(ValueError):
    def __init__(self, message, status_code):
        super().__init__(message)
        self.status_code = status_code


def _stream_error(chunk) -> dict | None:
    """The error of sglang's error event (``data: {"error": {...}}``), else None."""
    import orjson

    if not isinstance(chunk, bytes) or not chunk.startswith(b'data: {"error"'):
        return None
    return orjson.loads(chunk[len(b"data: ") :])["error"]


async def _chained(first, rest):
    yield first
    async for chunk in rest:
        yield chunk


def server_info_without_secrets(info: dict, *args, **kwargs) -> dict:
    for field in SECRET_FIELDS:
        if info.get(field) is not None:
            info[field] = REDACTED
    if isinstance(info.get("launch_command"), str):
        info["launch_command"] = redact_command_line(info["launch_command"])
    return info


async def internal_states_without_secrets(original, manager, *args, **kwargs) -> list:
    return [server_info_without_secrets(state) for state in await original(manager, *args, **kwargs)]


def redact_command_line(command: str) -> str:
    """``command`` with the values of the secret flags (``--api-key X`` and ``--api-key=X`` forms) redacted."""
    flags = {"--" + field.replace("_", "-") for field in SECRET_FIELDS}
    words = command.split(" ")
    for i, word in enumerate(words):
        flag, eq, _ = word.partition("=")
        if eq and flag in flags:
            words[i] = f"{flag}={REDACTED}"
        elif i and words[i - 1] in flags:
            words[i] = REDACTED
    return " ".join(words)


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(freeze_gc_after_server_warmup)
    plugin_hook(TARGETS[1], HookType.AROUND)(launch_server)
    plugin_hook(TARGETS[2], HookType.AFTER)(server_info_without_secrets)
    plugin_hook(TARGETS[3], HookType.AROUND)(internal_states_without_secrets)
    plugin_hook(TARGETS[4], HookType.AROUND)(serve_generate_request)
