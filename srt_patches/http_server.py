"""Freeze the server's GC once its HTTP server answers, also when the warm-up is skipped.

Target: sglang.srt.entrypoints.http_server._freeze_gc_after_server_warmup
Checked against: sglang 0.5.23
Why: with ``--skip-server-warmup`` (a CPU default here: the warm-up request costs a whole canvas) sglang posts
     /freeze_gc before uvicorn listens, so every CPU server logged a "post-warmup freeze_gc failed" warning with a
     connection-refused traceback at start-up, and its processes' GC was never frozen. The post now waits until
     /model_info answers, as sglang's warm-up does before its request.
Remove when: sglang waits for its HTTP server before freezing the GC.
"""

from __future__ import annotations

import time

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

TARGETS = ("sglang.srt.entrypoints.http_server._freeze_gc_after_server_warmup",)
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


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(freeze_gc_after_server_warmup)
