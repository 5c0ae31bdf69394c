"""Skip sglang's token-decode CUDA graphs (and the eager warm-up forward) for DiffusionGemma.

Target: sglang.srt.model_executor.model_runner.ModelRunner.init_cuda_graphs
Checked against: sglang 0.5.23
Why: sglang captures graphs and warms kernels up by calling ``model.forward(input_ids, positions,
     forward_batch)``; our model runs canvas batches through its own runner and never takes a
     ForwardBatch, so capture would fail at startup on CUDA (and only wastes memory on CPU).
Remove when: the canvas runner captures its own graphs through a sglang extension point.
"""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

logger = logging.getLogger(__name__)
TARGETS = ("sglang.srt.model_executor.model_runner.ModelRunner.init_cuda_graphs",)


def init_cuda_graphs(original, runner, *args, **kwargs):
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    if not serves_diffusion_model(runner.model_config.hf_config):
        return original(runner, *args, **kwargs)
    from sglang.srt.model_executor.graph_memory_usage import empty_graph_memory_usage, empty_graph_time_usage

    logger.info("sgl-diffusion: sglang's decode CUDA graphs do not apply to canvas batches; not capturing them")
    runner.eager_runner = runner.prefill_cuda_graph_runner = runner.decode_cuda_graph_runner = None
    runner.decode_cuda_graph_captured = False
    runner.decode_cuda_graph_capture_bs = []
    runner.graph_memory_usage = empty_graph_memory_usage()
    runner.graph_time_usage = empty_graph_time_usage()


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(init_cuda_graphs)
