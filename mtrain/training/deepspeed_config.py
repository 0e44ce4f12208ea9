"""The DeepSpeed JSON config, generated from the typed configs (one source of truth)."""

from mtrain.training.config import BatchSizes, DeepSpeedConfig, OptimConfig, Precision
from mtrain.training.memory_plan import ModelShape, zero_buckets


def deepspeed_config(
    ds: DeepSpeedConfig,
    optim: OptimConfig,
    sizes: BatchSizes,
    shape: ModelShape | None = None,
    on_gpu: bool = False,
) -> dict:
    """``shape``: the model's, to size ZeRO's buckets from it (DeepSpeed's GPU-sized defaults
    without it); ``on_gpu``: whether the ranks train on GPUs (``overlap_comm``)."""
    zero: dict = {"stage": ds.zero_stage}
    if ds.overlaps_reduction(on_gpu):
        zero["overlap_comm"] = True
    if shape is not None and ds.zero_stage > 0:
        zero |= zero_buckets(shape).as_deepspeed(ds.zero_stage)
    if ds.zero_stage == 3:
        zero |= {
            "stage3_param_persistence_threshold": ds.param_persistence_threshold,
            "stage3_gather_16bit_weights_on_model_save": False,
        }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        **gradient_precision(ds),
        "train_micro_batch_size_per_gpu": sizes.micro_batch_size,
        "gradient_accumulation_steps": sizes.grad_accum,
        "train_batch_size": sizes.micro_batch_size * sizes.grad_accum * sizes.world_size,
        "gradient_clipping": 0.0 if ds.clips_in_trainer else optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == Precision.bf16},
        "fp16": {"enabled": ds.precision == Precision.fp16, "loss_scale": 0},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": [optim.beta1, optim.beta2],
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # torch's AdamW instead of DeepSpeed's fused kernel: no 2-minute JIT build,
                # and a resumed run reproduces the uninterrupted one bit for bit. Its fused
                # implementation (CPU and GPU): one kernel over all tensors, several times
                # faster than the default per-tensor loop on CPU (bench/README.md).
                "torch_adam": True,
                "adam_w_mode": True,
                "fused": True,
            },
        },
        "steps_per_print": 10**9,  # the trainer logs its own metrics
        "wall_clock_breakdown": False,
    }


def gradient_precision(ds: DeepSpeedConfig) -> dict:
    """Where a half-precision run sums its gradients in fp32: over ranks always
    (``communication_data_type``), over micro batches where ZeRO partitions the gradients
    (``data_types.grad_accum_dtype``, see ``DeepSpeedConfig.accumulates_in_fp32``).
    DeepSpeed's default for both is the model's precision: a bf16 sum keeps 8 bits, so the
    small gradients' contributions round away over ranks and micro batches; an fp16 sum of
    loss-scaled gradients overflows (a skipped step) sooner than an fp32 one. Both half
    precisions follow one rule; fp32 doubles the gradients' communication volume.

    The micro batches' gradients add up in the model's precision under ZeRO-0 and ZeRO-1:
    without ZeRO DeepSpeed refuses the mix ("unsupported mix of model_dtype and
    grad_accum_dtype"); under ZeRO-1 it would hold an unpartitioned fp32 copy of every gradient
    on each rank, and in bf16 switch to its ZeRO-1 bf16 optimizer, whose checkpoints its own
    ``zero_to_fp32`` cannot merge (the export) and which reduces only after the backward pass.
    ZeRO-2 is the stage for long accumulations in half precision."""
    if not ds.half_precision:
        return {}
    fp32: dict = {"communication_data_type": "fp32"}
    if ds.accumulates_in_fp32:
        fp32["data_types"] = {"grad_accum_dtype": "fp32"}
    return fp32
