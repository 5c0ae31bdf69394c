from .entropy_bound import (
    SamplerRow,
    SamplingArgs,
    StepResult,
    init_canvas_noise,
    new_history,
    prepare,
    push_history,
    step,
    temperature,
)
from .params import DiffusionDefaults, DiffusionParams, InvalidDiffusionParams

__all__ = [
    "DiffusionDefaults",
    "DiffusionParams",
    "InvalidDiffusionParams",
    "SamplerRow",
    "SamplingArgs",
    "StepResult",
    "init_canvas_noise",
    "new_history",
    "prepare",
    "push_history",
    "step",
    "temperature",
]
