"""Let ``sampling_params["diffusion"]`` through the /generate schema check.

Target: sglang.srt.entrypoints.api_contract.generate_contract_error
Checked against: sglang 0.5.23
Why: /generate checks its body against a fixed (Rust) schema that rejects unknown sampling keys.
     The check runs on the body without ``diffusion``; the tokenizer-manager patch validates it.
Remove when: the schema accepts model-specific sampling parameters.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

TARGETS = ("sglang.srt.entrypoints.api_contract.generate_contract_error",)


def _without_diffusion(sampling):
    if isinstance(sampling, dict) and "diffusion" in sampling:
        return {k: v for k, v in sampling.items() if k != "diffusion"}
    return sampling


def generate_contract_error(original, body, *args, **kwargs):
    if isinstance(body, dict) and "sampling_params" in body:
        sampling = body["sampling_params"]
        stripped = [_without_diffusion(s) for s in sampling] if isinstance(sampling, list) else _without_diffusion(sampling)
        body = body | {"sampling_params": stripped}
    return original(body, *args, **kwargs)


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(generate_contract_error)
