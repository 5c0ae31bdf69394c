"""Patches for the places where sglang 0.5.23 has no extension point.

``apply()`` is the package's ``sglang.srt.plugins`` entry point: sglang calls it once per process
(launcher, scheduler, detokenizer) before it builds its server arguments.
"""

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _applied = True
