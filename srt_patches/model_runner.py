"""Skip sglang's token-decode CUDA graphs for DiffusionGemma; keep its head counts through sglang's CPU TP padding.

Target: sglang.srt.model_executor.model_runner.ModelRunner.init_cuda_graphs
Checked against: sglang 0.5.23
Why: sglang captures graphs and warms kernels up by calling ``model.forward(input_ids, positions,
     forward_batch)``; our model runs canvas batches through its own runner and never takes a
     ForwardBatch, so capture would fail at startup on CUDA (and only wastes memory on CPU).
Remove when: the canvas runner captures its own graphs through a sglang extension point.

Target: sglang.srt.model_executor.model_runner.adjust_config_with_unaligned_cpu_tp
Checked against: sglang 0.5.23
Why: on the CPU, ModelRunner.load_model pads the config for the TP size. (1) sglang's config loader flattens
     ``text_config``'s per-layer head shapes into full/``swa_*`` attributes but leaves transformers' per-layer spec
     on the top-level config, where the padding's ``hasattr(hf_config, "num_key_value_heads")`` raises
     AmbiguousGlobalPerLayerAttributeError; the spec is dropped there too (the flat attributes say it all).
     (2) When the KV heads of the full layers (1 or 2) do not divide by the TP size, sglang pads the head counts
     (1 KV + 4 query heads become 2 + 8, zero heads computed on every rank); our QKVParallelLinear replicates
     those KV heads instead, so the checkpoint's head counts are put back. Intermediate sizes stay padded.
Remove when: sglang flattens the top-level config too and lets a model replicate KV heads on the CPU.

Target: sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater.update_weights_from_disk
Checked against: sglang 0.5.23
Why: when loading the new checkpoint fails (a tensor of another shape, missing weights), sglang rolls back by
     loading from ``model_config.model_path``, which it has already set to the new path: the rollback fails the
     same way and its exception ends the scheduler. The wrapper then rolls back from the path that was being
     served and answers ``success: false`` with the cause. When sglang cannot read the new checkpoint at all it
     answers ``success: false`` and keeps the weights, but not their path: the wrapper puts the served path back,
     or the next failed update would roll back to the unreadable one.
Remove when: sglang keeps the served path until the new weights have loaded.

Target: sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater.{update_weights_from_tensor,
        load_weights_from_distributed}
Checked against: sglang 0.5.23
Why: both hand ``model.load_weights`` some of the weights (a trainer's bucket), which our loader refuses for a
     checkpoint that lacks weights; they run with ``model.accepts_partial_weights`` set. sglang catches no error of
     the tensor update, so a tensor the model does not have (an unknown name, another shape) ended the scheduler:
     it answers ``success: false`` with the cause instead.
Remove when: sglang tells load_weights a partial update from a checkpoint load, and answers a failed tensor update.

Target: sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager.update_weights_from_tensor
Checked against: sglang 0.5.23
Why: the scheduler unpickles each rank's payload outside any try: a payload that is not a pickle of named tensors
     (or a list shorter than the TP size) raised in the scheduler and ended the server. Such a request now answers
     ``success: false`` with the cause; the rank meets the others at sglang's barrier, as a rank that loaded does.
Remove when: sglang answers a payload it cannot read with an error.

Target: sglang.srt.model_executor.model_runner_components.weight_exporter.WeightExporter.{
        init_weights_send_group_for_remote_instance, send_weights_to_remote_instance}
Checked against: sglang 0.5.23
Why: both answer ``(success, message)`` but assert their arguments first (a group name, one port per TP rank), and
     the send looks its group up with ``[]``: a send before its group was set up was a KeyError, and a bad argument
     an AssertionError, which ended the server. Those now answer ``success: false`` with the cause. On a CPU server
     both are refused: the group is NCCL's, set up on the CUDA device, and the scheduler waited for its peer.
Remove when: sglang checks these arguments without raising.
"""

from __future__ import annotations

import contextlib
import logging

from sglang.srt.plugins.hook_registry import HookType, plugin_hook

logger = logging.getLogger(__name__)
TARGETS = (
    "sglang.srt.model_executor.model_runner.ModelRunner.init_cuda_graphs",
    "sglang.srt.model_executor.model_runner.adjust_config_with_unaligned_cpu_tp",
    "sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater.update_weights_from_disk",
    "sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater.update_weights_from_tensor",
    "sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater.load_weights_from_distributed",
    "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager.update_weights_from_tensor",
    "sglang.srt.model_executor.model_runner_components.weight_exporter.WeightExporter."
    "init_weights_send_group_for_remote_instance",
    "sglang.srt.model_executor.model_runner_components.weight_exporter.WeightExporter.send_weights_to_remote_instance",
)
# (where, attribute) of the head counts sglang's CPU padding rewrites
HEAD_COUNTS = (
    ("model_config", "num_attention_heads"), ("model_config", "num_key_value_heads"),
    ("hf_config", "num_attention_heads"), ("hf_config", "num_key_value_heads"),
    ("hf_text_config", "num_attention_heads"), ("hf_text_config", "num_key_value_heads"),
    ("hf_text_config", "swa_num_attention_heads"), ("hf_text_config", "swa_num_key_value_heads"),
)  # fmt: skip
_ABSENT = object()


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


def adjust_config_with_unaligned_cpu_tp(original, model_config, load_config, tp_size):
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    if not serves_diffusion_model(model_config.hf_config):
        return original(model_config, load_config, tp_size)
    model_config.hf_config.per_layer_config = None  # (1) in the docstring
    owners = {"model_config": model_config, "hf_config": model_config.hf_config,
              "hf_text_config": model_config.hf_text_config}  # fmt: skip
    before = {(where, attr): getattr(owners[where], attr, _ABSENT) for where, attr in HEAD_COUNTS}
    model_config = original(model_config, load_config, tp_size)
    for (where, attr), value in before.items():  # (2)
        if value is _ABSENT:
            if hasattr(owners[where], attr):
                delattr(owners[where], attr)
        else:
            setattr(owners[where], attr, value)
    return model_config


def update_weights_from_disk(original, updater, model_path, load_format, *args, **kwargs):
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    if not serves_diffusion_model(updater.model_config.hf_config):
        return original(updater, model_path, load_format, *args, **kwargs)
    served_path = updater.model_config.model_path
    served_format = updater.get_model_runner().load_config.load_format
    try:
        loaded, message = original(updater, model_path, load_format, *args, **kwargs)
    except Exception as e:  # sglang's own rollback read the new path and failed again
        logger.warning("sgl-diffusion: weights from %s failed to load (%s); reloading %s", model_path, e, served_path)
        reloaded, message = original(updater, served_path, served_format)
        if not reloaded:
            raise RuntimeError(f"rolling back to {served_path} failed too: {message}") from e
        return False, f"Failed to update weights from {model_path}: {e}. Rolled back to {served_path}."
    if not loaded:  # it could not read the new checkpoint and kept the weights, but not the path they came from
        updater.model_config.model_path = served_path
    return loaded, message


def update_weights_from_tensor(original, updater, *args, **kwargs):
    model = updater.get_model()
    if not hasattr(model, "accepts_partial_weights"):
        return original(updater, *args, **kwargs)
    try:
        with _partial_weights(model):
            return original(updater, *args, **kwargs)
    except Exception as e:
        logger.warning("sgl-diffusion: weight update from tensors failed: %s", e)
        return False, (f"Failed to update weights from tensors: {e}. The tensors before it in this request were "
                       "loaded: send them again, or all weights.")


def load_weights_from_distributed(original, updater, *args, **kwargs):
    model = updater.get_model()
    if not hasattr(model, "accepts_partial_weights"):
        return original(updater, *args, **kwargs)
    with _partial_weights(model):
        return original(updater, *args, **kwargs)


def scheduler_update_weights_from_tensor(original, manager, recv_req):
    from sgl_diffusion.runtime.scheduler_hook import serves_diffusion_model

    if not serves_diffusion_model(manager.tp_worker.model_config.hf_config):
        return original(manager, recv_req)
    try:
        return original(manager, recv_req)
    except Exception as e:  # raised before sglang's barrier: the tensors could not be read (loading errors answer)
        import torch
        from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqOutput

        logger.warning("sgl-diffusion: the serialized tensors could not be read: %r", e)
        torch.distributed.barrier(group=manager.tp_cpu_group)
        return UpdateWeightsFromTensorReqOutput(
            success=False, message=f"Failed to read serialized_named_tensors: {e!r}. Send one "
            "MultiprocessingSerializer payload (base64 when over HTTP) per TP rank.")  # fmt: skip


def remote_instance_weights(original, exporter, *args, **kwargs):
    from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion

    model = exporter.get_model()
    if not isinstance(model, DiffusionGemmaForBlockDiffusion):
        return original(exporter, *args, **kwargs)
    if (device := _parameter_device(model)) != "cuda":  # the group would wait for a peer NCCL cannot serve
        return False, f"{original.__name__}: weights go to a remote instance over NCCL; this server runs on {device}"
    try:
        return original(exporter, *args, **kwargs)
    except (AssertionError, KeyError) as e:  # sglang's argument checks; it answers the failures of the transfer
        reason = f"no group named {e} was set up (/init_weights_send_group_for_remote_instance first)" if isinstance(
            e, KeyError) else str(e)  # fmt: skip
        return False, f"{original.__name__}: {reason}"


def _parameter_device(model) -> str:
    return next(model.parameters()).device.type


@contextlib.contextmanager
def _partial_weights(model):
    model.accepts_partial_weights = True
    try:
        yield
    finally:
        model.accepts_partial_weights = False


def register() -> None:
    plugin_hook(TARGETS[0], HookType.AROUND)(init_cuda_graphs)
    plugin_hook(TARGETS[1], HookType.AROUND)(adjust_config_with_unaligned_cpu_tp)
    plugin_hook(TARGETS[2], HookType.AROUND)(update_weights_from_disk)
    plugin_hook(TARGETS[3], HookType.AROUND)(update_weights_from_tensor)
    plugin_hook(TARGETS[4], HookType.AROUND)(load_weights_from_distributed)
    plugin_hook(TARGETS[5], HookType.AROUND)(scheduler_update_weights_from_tensor)
    for target in TARGETS[6:]:
        plugin_hook(target, HookType.AROUND)(remote_instance_weights)
