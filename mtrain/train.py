"""Pretrain a GPT on prepared shards: ``python -m mtrain.train data.path=... model=tiny``.

Launch it with ``torchrun``, the ``deepspeed`` launcher or ``srun``; the config is validated
before any process group starts. The loop is ``mtrain.trainer.Trainer``.
"""

from data_pipeline.app import entry_point
from mtrain import distributed
from mtrain.config import TrainConfig
from mtrain.data import StreamingData
from mtrain.trainer import Trainer


def run(cfg: TrainConfig, overrides: list[str]) -> int:
    place = distributed.placement_from_env()
    # Before any process group exists: every rank fails fast on the same input error.
    data = StreamingData(
        cfg.data, cfg.model.max_seq_len, cfg.trainer.micro_batch_size, place.rank, place.world_size
    )
    cfg.model = cfg.model.with_vocab(data.tokenizer.vocab_size)
    trainer = Trainer(cfg, place, data, overrides)
    device = distributed.init(place, cfg.deepspeed.timeout_s)
    return trainer.fit(device)


main = entry_point("train", TrainConfig, run)

if __name__ == "__main__":
    main()
