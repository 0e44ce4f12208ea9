"""The DeepSpeed engine a run trains: built from the typed configs, and what it holds.

The model stays plain PyTorch (``mtrain.model``); the trainer builds it, and the engine wraps it
with ZeRO, mixed precision, AdamW and the learning-rate schedule, and the run-time knobs.
"""

import logging
from pathlib import Path

import torch

from mtrain.distributed import collectives, heartbeats
from mtrain.model import GPT
from mtrain.training.config import BatchSizes, TrainConfig
from mtrain.training.contrastive import CONTRASTIVE, ContrastiveGPT
from mtrain.training.deepspeed_config import deepspeed_config
from mtrain.training.memory_plan import ModelShape
from mtrain.training.rng_state import seed_everything
from mtrain.training.schedule import lr_multiplier

log = logging.getLogger(__name__)


def engine_config(cfg: TrainConfig, sizes: BatchSizes) -> dict:
    """DeepSpeed's config of the run: its ZeRO stage, precision, optimizer and batch, with
    buckets sized to the model and communication overlapped on GPUs."""
    shape = ModelShape.of(cfg.model)
    return deepspeed_config(cfg.deepspeed, cfg.optim, sizes, shape, collectives.on_gpu())


def new_model(cfg: TrainConfig, ds_config: dict) -> GPT:
    """A freshly initialised model, the same on every rank; built already partitioned
    (``deepspeed.zero.Init``) under ZeRO-3 with ``deepspeed.zero_init``."""
    import deepspeed

    seed_everything(cfg.trainer.seed)

    def build() -> GPT:
        if cfg.objective == CONTRASTIVE:
            return ContrastiveGPT(cfg.model, cfg.contrastive)
        return GPT(cfg.model)

    if cfg.deepspeed.zero_init and cfg.deepspeed.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return build()
    return build()


def build_engine(cfg: TrainConfig, model: GPT, ds_config: dict, rank: int):
    """(engine, lr scheduler) training ``model``, with the trainer's run-time knobs applied to
    it (activation checkpointing, compile); the process group must exist."""
    import deepspeed

    model.activation_checkpointing = cfg.trainer.activation_checkpointing
    max_steps = cfg.trainer.max_steps

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_multiplier(s, max_steps, cfg.optim)
        )

    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=model.param_groups(cfg.optim.weight_decay),
        config=ds_config,
        lr_scheduler=schedule,
    )
    if cfg.trainer.compile:
        # In place (nn.Module.compile, not a wrapper): parameter names, hence checkpoints and
        # exports, keep no "_orig_mod." prefix. The graphs are compiled at the first step.
        engine.compile()
    local, total = parameter_share(engine.module)
    log.info(
        "rank %d holds %d of %d parameter elements (%.1f%%)",
        rank,
        local,
        total,
        100 * local / total,
    )
    log.info(
        "activation checkpointing %s, torch.compile %s",
        "on" if model.activation_checkpointing else "off",
        "on" if cfg.trainer.compile else "off",
    )
    # What DeepSpeed made of the config's precision fields, read back from the engine.
    log.info(
        "gradients accumulated in %s, reduced over ranks in %s",
        str(engine.get_data_types()[1]).removeprefix("torch."),
        str(engine.communication_data_type).removeprefix("torch."),
    )
    seed_everything(cfg.trainer.seed + rank)  # different dropout per rank
    # A thread keeps <run>/heartbeat/rank<r> fresh; batch_loss records the step reached. A rank
    # whose collective fails reads them to name the peer that stopped answering.
    world = collectives.world_size()
    # Logs the suspects at 90% of the collective timeout, before NCCL's watchdog aborts.
    heartbeats.start(Path(cfg.run_dir), rank, world, stall_after_s=0.9 * cfg.deepspeed.timeout_s)
    return engine, scheduler


def batch_loss(engine, batch: tuple[torch.Tensor, torch.Tensor], device) -> torch.Tensor:
    """The mean next-token loss of one (inputs, targets) batch."""
    heartbeats.record_step(getattr(engine, "global_steps", 0))
    inputs, targets = (x.to(device, non_blocking=True) for x in batch)
    return engine(inputs, targets=targets).loss


def as_float(x) -> float | None:
    """A number DeepSpeed reports as a tensor, a float or None."""
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def state_megabytes(engine) -> float:
    """This rank's parameters (its partitions under ZeRO-3) plus its optimizer state, in MB."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    tensors = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += [p for group in inner.param_groups for p in group["params"]]
    tensors += [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    unique = {t.data_ptr(): t for t in tensors}  # a tensor shared by two lists counts once
    return sum(t.numel() * t.element_size() for t in unique.values()) / 2**20


def parameter_share(module: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements in the model): ZeRO-3 keeps a partition of each."""
    local = total = 0
    for p in module.parameters():
        full = getattr(p, "ds_numel", p.numel())
        total += full
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else full
    return local, total
