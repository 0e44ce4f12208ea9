"""Pretrain a GPT on prepared shards: ``python -m mtrain.train data.path=... model=tiny``.

Launch it with ``torchrun``, the ``deepspeed`` launcher or ``srun``; the config is validated
before any process group starts. The loop is ``mtrain.training.trainer.Trainer``.
"""

import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from data_pipeline.app import entry_point, in_multirun
from data_pipeline.launch import placement_from_env
from mtrain.data.loader import StreamingData
from mtrain.distributed import collectives
from mtrain.exported.loading import check_init_from, init_from_shape
from mtrain.runs.lock import RunDirTaken, RunLock, refuse_on_every_rank
from mtrain.training.adapters import target_layers
from mtrain.training.checkpointer import DiskFull
from mtrain.training.compute_budget import apply_budget
from mtrain.training.config import MOVED_KEYS, TrainConfig
from mtrain.training.contrastive import CONTRASTIVE
from mtrain.training.memory_plan import host_memory_policy, plan_training
from mtrain.training.trainer import NonFiniteLoss, Trainer

# What a rank raises between collectives, none of its own pending: the process group may end
# with it. Another error may leave one in flight (an asynchronous gradient all-reduce, a
# collective that failed), and ending the group could wait on it.
RAISED_TOGETHER = (RunDirTaken, DiskFull, NonFiniteLoss)
# What ends one point of a multirun and not the sweep: the next point may well train.
POINT_FAILURES = (RunDirTaken, NonFiniteLoss)


def place_sweep_point(cfg: TrainConfig) -> None:
    """In a multirun, each point trains in its own run directory, ``<run_dir>/<job number>``
    (conf/train.yaml's hydra.sweep), named ``<sweep>-<number>``; the sweep is its wandb group.
    The same command again resumes every point where it stopped."""
    if not in_multirun():
        return
    sweep = Path(cfg.run_dir).name
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    cfg.run_name = f"{sweep}-{HydraConfig.get().job.num}"
    cfg.logger.group = cfg.logger.group or sweep


def run(cfg: TrainConfig, overrides: list[str]) -> int:
    place = placement_from_env()
    place_sweep_point(cfg)
    # Before any process group exists: every rank fails fast on the same input error.
    collectives.refuse_cpu_with_gpus()
    views = cfg.contrastive.views(cfg.model.max_seq_len) if cfg.objective == CONTRASTIVE else None
    data = StreamingData(
        cfg.data,
        cfg.model.max_seq_len,
        cfg.trainer.micro_batch_size,
        place.rank,
        place.world_size,
        views,
    )
    if cfg.init_from:  # fine-tuning: the export's shape, and data in its tokenizer's ids
        cfg.model = init_from_shape(cfg.init_from, cfg.model, overrides)
        check_init_from(cfg.init_from, data.tokenizer)
        if cfg.finetune.adapters:
            target_layers(cfg.finetune, cfg.model)  # refused, listing the layers there are
    cfg.model = cfg.model.with_vocab(data.tokenizer.vocab_size)
    apply_budget(cfg)
    verdict = plan_training(cfg, place.world_size)
    trainer = Trainer(cfg, place, data, overrides)
    # Rank 0 takes the run directory before anything is written there; every rank checks that
    # its checkpoints fit this config. Other ranks learn of rank 0's refusal once the process
    # group exists, so that a refused job exits 2 on every rank.
    lock = RunLock(trainer.run_dir.lock, cfg.trainer.lock_stale_s)
    try:
        refusal = lock.acquire() if place.is_main else None
        if refusal is not None and place.world_size == 1:
            raise RunDirTaken(refusal)
        trainer.check_resumable()
        device = collectives.init(place, cfg.deepspeed.timeout_s)
        if device.type == "cpu":  # activations live in host memory: kept or given back
            host_memory_policy(verdict)
        try:
            refuse_on_every_rank(refusal)
            code = trainer.fit(device)
        except RAISED_TOGETHER:
            collectives.close()
            raise
        collectives.close()
        if code == cfg.trainer.preempt_exit_code:
            sys.exit(code)  # every point of a sweep waits for the requeue, not only this one
        return code
    finally:
        lock.release()


main = entry_point("train", TrainConfig, run, moved=MOVED_KEYS, point_failures=POINT_FAILURES)

if __name__ == "__main__":
    main()
