"""Infill templates: text with holes, laid out as the positions a request's canvases fix or leave free.

    "def add(a, b):\\n    {{hole:16}}\\n"  ->  fixed "def add(a, b):\\n    ", 16 free positions, fixed "\\n"

Markers: ``{{hole}}`` (DEFAULT_HOLE_TOKENS free positions), ``{{hole:N}}`` (N free positions); ``{{{{`` is a
literal ``{{``. Every other ``{{...}}`` is an error. Text pieces are tokenized one by one, without special
tokens, and must decode back to themselves, so the fixed pieces of the output are byte-identical to the template.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from .params import InvalidDiffusionParams

DEFAULT_HOLE_TOKENS = 32
MAX_HOLE_TOKENS = 1 << 20  # all holes together; past any context (the context check names the real limit)
FREE = -1  # a free position in a layout
_HOLE = re.compile(r"hole(?::(.*))?", re.DOTALL)


def parse_template(template) -> list[str | int]:
    """Pieces of a template: str for fixed text, int for a hole of that many tokens. Raises InvalidDiffusionParams
    naming the problem."""
    if not isinstance(template, str) or not template:
        raise InvalidDiffusionParams(f"diffusion.infill.template must be a non-empty string (got {template!r:.80})")
    pieces: list[str | int] = []
    text, i = [], 0
    while i < len(template):
        if template.startswith("{{{{", i):
            text.append("{{")
            i += 4
        elif template.startswith("{{", i):
            end = template.find("}}", i + 2)
            if end < 0:
                raise InvalidDiffusionParams(f"diffusion.infill.template has an unclosed marker at offset {i} "
                                             "(a literal '{{' is written '{{{{')")
            marker = template[i + 2 : end]
            pieces.extend(["".join(text)] if text else [])
            text = []
            pieces.append(_hole_length(marker))
            i = end + 2
        else:
            text.append(template[i])
            i += 1
    if text:
        pieces.append("".join(text))
    if not any(isinstance(p, int) for p in pieces):
        raise InvalidDiffusionParams("diffusion.infill.template has no hole: mark the free span with {{hole}} or "
                                     "{{hole:N}}")
    return pieces


def layout(pieces: Sequence[str | int], tokenize: Callable[[str], list[int]], decode: Callable[[list[int]], str]
           ) -> tuple[int, ...]:
    """The template's positions: a text piece's token ids, FREE for each hole position."""
    if sum(p for p in pieces if isinstance(p, int)) > MAX_HOLE_TOKENS:
        raise InvalidDiffusionParams(f"diffusion.infill.template has more than {MAX_HOLE_TOKENS} hole tokens")
    out: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            out += [FREE] * piece
            continue
        ids = list(tokenize(piece))
        if decode(ids) != piece:
            raise InvalidDiffusionParams(f"diffusion.infill.template piece {piece!r:.60} does not decode back to "
                                         "itself once tokenized")
        out += ids
    return tuple(out)


def _hole_length(marker: str) -> int:
    m = _HOLE.fullmatch(marker)
    if m is None:
        raise InvalidDiffusionParams(f"diffusion.infill.template has an unknown marker {{{{{marker[:40]}}}}}: "
                                     "only {{hole}} and {{hole:N}}")
    if m.group(1) is None:
        return DEFAULT_HOLE_TOKENS
    if not re.fullmatch(r"[1-9][0-9]{0,6}", m.group(1)):
        raise InvalidDiffusionParams(f"diffusion.infill.template has a malformed hole length in "
                                     f"{{{{{marker[:40]}}}}}: N must be a positive integer")
    return int(m.group(1))
