"""Pretrain a GPT on prepared shards: ``python -m mtrain.train data.path=... model=tiny``.

Launch it with ``torchrun``, the ``deepspeed`` launcher or ``srun``; the config is validated
before any process group starts. The loop is ``mtrain.training.trainer.Trainer``.
"""

from data_pipeline.app import entry_point
from data_pipeline.launch import placement_from_env
from mtrain.data.loader import StreamingData
from mtrain.distributed import collectives, host_memory
from mtrain.runs.lock import RunDirTaken, RunLock, refuse_on_every_rank
from mtrain.training.checkpointer import DiskFull
from mtrain.training.config import MOVED_KEYS, TrainConfig
from mtrain.training.contrastive import CONTRASTIVE
from mtrain.training.memory_plan import check_fits, training_layout
from mtrain.training.trainer import NonFiniteLoss, Trainer

# What a rank raises between collectives, none of its own pending: the process group may end
# with it. Another error may leave one in flight (an asynchronous gradient all-reduce, a
# collective that failed), and ending the group could wait on it.
RAISED_TOGETHER = (RunDirTaken, DiskFull, NonFiniteLoss)


def run(cfg: TrainConfig, overrides: list[str]) -> int:
    place = placement_from_env()
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
    cfg.model = cfg.model.with_vocab(data.tokenizer.vocab_size)
    if cfg.deepspeed.check_memory:
        check_fits(training_layout(cfg, place.world_size))
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
        if device.type == "cpu":  # activations live in host memory: reuse them step to step
            host_memory.keep_freed_memory()
        try:
            refuse_on_every_rank(refusal)
            code = trainer.fit(device)
        except RAISED_TOGETHER:
            collectives.close()
            raise
        collectives.close()
        return code
    finally:
        lock.release()


main = entry_point("train", TrainConfig, run, moved=MOVED_KEYS)

if __name__ == "__main__":
    main()
