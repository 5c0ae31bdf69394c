"""Gemma 4 chat markup for sglang's frontend language (``import sglang as sgl``) programs.

The DSL renders chat turns on the client, from its own template table, and picks a template by
matching the served model path: ``diffusiongemma-...-it`` matches its Gemma 2/3 ``gemma-it`` rule,
and its ``gemma-4-it`` writes ``assistant`` and ``<image>`` where the checkpoint's template writes
``model`` and ``<|image|>``. Importing this module registers the checkpoint's markup as
``diffusiongemma`` and matches DiffusionGemma paths to it before sglang's own rules (a path naming the model,
or a DiffusionGemma checkpoint directory on the program's machine)::

    import sglang as sgl
    import sgl_diffusion.frontend  # noqa: F401

The assistant turn opens with the empty thought the checkpoint's template pre-fills when thinking
is off, so answers are not thoughts and every turn of a program renders the same prefix.
"""

from __future__ import annotations

import json
import pathlib
import re

from sglang.lang.chat_template import (
    ChatTemplate,
    ChatTemplateStyle,
    chat_template_registry,
    matching_function_registry,
    register_chat_template,
)

TEMPLATE_NAME = "diffusiongemma"
_MODEL_PATH = re.compile(r"diffusion[-_]?gemma", re.IGNORECASE)


def match_diffusion_gemma(model_path: str) -> str | None:
    return TEMPLATE_NAME if _MODEL_PATH.search(model_path) or _is_local_checkpoint(model_path) else None


def _is_local_checkpoint(model_path: str) -> bool:
    """A DiffusionGemma checkpoint directory on this machine, whatever its name (the server's model path, read where
    the program runs: a client beside the server, as with a local checkpoint)."""
    try:
        config = json.loads((pathlib.Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "diffusion_gemma"


if TEMPLATE_NAME not in chat_template_registry:
    register_chat_template(ChatTemplate(
        name=TEMPLATE_NAME,
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("<|turn>system\n", "<turn|>\n"),
            "user": ("<|turn>user\n", "<turn|>\n"),
            "assistant": ("<|turn>model\n<|channel>thought\n<channel|>", "<turn|>\n"),
        },
        stop_str=("<turn|>",),
        image_token="<|image|>",
        style=ChatTemplateStyle.PLAIN,
    ))
    matching_function_registry.insert(0, match_diffusion_gemma)  # before sglang's match_gemma claims the path
