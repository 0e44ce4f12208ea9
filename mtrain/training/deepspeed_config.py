"""The DeepSpeed JSON config, generated from the typed configs (one source of truth)."""

from mtrain.training.config import BatchSizes, DeepSpeedConfig, OptimConfig, Precision
from mtrain.training.memory_plan import ModelShape, zero_buckets


def deepspeed_config(
    ds: DeepSpeedConfig, optim: OptimConfig, sizes: BatchSizes, shape: ModelShape | None = None
) -> dict:
    """``shape``: the model's, to size ZeRO's buckets from it (DeepSpeed's GPU-sized defaults
    without it)."""
    zero: dict = {"stage": ds.zero_stage}
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
