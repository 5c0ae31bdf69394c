"""sgl-diffusion's hold on sglang 0.5.23.

``apply()`` is the package's ``sglang.srt.plugins`` entry point: sglang calls it once per process
(launcher, scheduler, detokenizer) before it builds its server arguments. It registers our model
through sglang's public registry, our CPU fallback and attention-backend check through its public
resolution hooks (sgl_diffusion.runtime.cpu_defaults, runtime.scheduler_hook.check_attention_backend),
then installs the patches of this folder, one module per upstream area, for the places that have no
extension point. A patch that fails to install stops the process: sglang would only log it and serve
wrong output.
"""

from __future__ import annotations

import logging
import os

from srt_patches import (
    api_contract, control_requests, data_parallel_controller, http_server, model_runner, ollama, openai_protocol,
    openai_stream, scheduler, serving_chat, session, tokenizer_manager,
)

PATCH_MODULES = (
    scheduler, model_runner, tokenizer_manager, api_contract, openai_protocol, serving_chat, openai_stream,
    data_parallel_controller, control_requests, ollama, http_server, session,
)
_applied = False
MM_PROCESSOR_PACKAGE_ENV = "SGLANG_EXTERNAL_MM_PROCESSOR_PACKAGE"
MM_PROCESSOR_PACKAGE = "sgl_diffusion.multimodal"


def apply() -> None:
    global _applied
    _use_our_mm_processor()  # NOTE: on every call: the environment is not ours alone, a caller may have reset it
    if _applied:
        return
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sgl_diffusion.runtime import cpu_defaults, scheduler_hook

    ModelRegistry.register("sgl_diffusion.models", overwrite=True, strict=True)
    cpu_defaults.register()
    scheduler_hook.register_attention_check()
    for module in PATCH_MODULES:
        try:
            module.register()
        except Exception as e:  # an upstream change under a patch (a renamed key, a moved import)
            raise SystemExit(f"sgl-diffusion: could not patch {module.__name__}: {e!r}; "
                             "is sglang 0.5.23 installed?") from e
    HookRegistry.apply_hooks()
    missing = [t for m in PATCH_MODULES for t in m.TARGETS if not is_installed(t)]
    if missing:
        # SystemExit, not an Exception: sglang's load_plugins() logs and swallows Exceptions.
        raise SystemExit(f"sgl-diffusion: could not patch {missing}; is sglang 0.5.23 installed?")
    _applied = True


def _use_our_mm_processor() -> None:
    # sglang's extension point for multimodal processors is this variable, read when its tokenizer
    # manager starts; child processes inherit it. Ours replaces sglang's DiffusionGemma processor.
    current = os.environ.setdefault(MM_PROCESSOR_PACKAGE_ENV, MM_PROCESSOR_PACKAGE)
    if current != MM_PROCESSOR_PACKAGE:
        logging.getLogger(__name__).warning(
            "%s=%s: DiffusionGemma image budgets and video need %s", MM_PROCESSOR_PACKAGE_ENV, current,
            MM_PROCESSOR_PACKAGE)


def is_installed(target: str) -> bool:
    """True when ``target`` (a dotted path) is wrapped by one of our hooks.

    HookRegistry wraps with functools.wraps(original), so the hook itself sits in the wrapper's closure.
    """
    import pkgutil

    owner, _, name = target.rpartition(".")
    attr = getattr(pkgutil.resolve_name(owner), name)
    cells = getattr(attr, "__closure__", None) or ()
    return any(getattr(c.cell_contents, "__module__", "").startswith("srt_patches.") for c in cells)
