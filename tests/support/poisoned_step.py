"""Run as a script by test_train: a real DeepSpeed engine at a given ZeRO stage and precision,
on one rank or on the ranks torchrun starts; a step whose loss is poisoned with NaN (on the last
rank only: the others' losses stay finite) must leave the weights as they were on every rank,
and training goes on. Rank 0 prints one JSON line of what it saw.

    python tests/support/poisoned_step.py <zero stage> <precision> <port>
    torchrun --nproc-per-node=2 tests/support/poisoned_step.py <zero stage> <precision> <port>
"""

import json
import math
import os
import sys
import tempfile

import torch
from omegaconf import OmegaConf

from data_pipeline.launch import placement_from_env
from mtrain.distributed import collectives
from mtrain.training.config import TrainConfig, batch_sizes
from mtrain.training.engine import build_engine, engine_config, new_model
from mtrain.training.grad_sync import take_gradient_reduction
from mtrain.training.monitor import StepTimer
from mtrain.training.trainer import OptimizerStep


def main(stage: int, precision: str, port: str, run_dir: str) -> None:
    if "RANK" not in os.environ:  # not under torchrun: one rank
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1")
    place = placement_from_env()
    collectives.init(place, 120)
    shape = {"vocab_size": 50, "n_layer": 1, "n_head": 2, "d_model": 16, "max_seq_len": 8}
    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(TrainConfig),
            {
                "data": {"path": "unused"},
                "run_dir": run_dir,
                "model": shape,
                "deepspeed": {"zero_stage": stage, "precision": precision},
                # two micro batches a step on every rank
                "trainer": {"micro_batch_size": 2, "global_batch_tokens": 32 * place.world_size},
            },
        )
    )
    cfg.deepspeed.param_persistence_threshold = 0
    sizes = batch_sizes(cfg, place.world_size)
    ds_config = engine_config(cfg, sizes)
    engine, _ = build_engine(cfg, new_model(cfg, ds_config), ds_config, place.rank)
    poisoned = [False]
    forward = engine.module.forward

    def maybe_poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        return out._replace(loss=out.loss * math.nan) if poisoned[0] and last_rank else out

    last_rank = place.rank == place.world_size - 1

    engine.module.forward = maybe_poisoned
    # The trainer's own gradient reduction where it takes it (ZeRO-0 fp32 on several ranks).
    reduction = take_gradient_reduction(engine, cfg.deepspeed)
    step = OptimizerStep(
        engine, "cpu", sizes.grad_accum, 5, cfg.deepspeed.clips_in_trainer, 1.0, reduction
    )

    def batches():
        g = torch.Generator().manual_seed(place.rank)
        while True:
            x = torch.randint(0, 50, (2, 9), generator=g)
            yield x[:, :-1], x[:, 1:]

    def weights() -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        # ZeRO keeps fp32 master weights of its own; without ZeRO they are the parameters.
        full = [safe_get_full_fp32_param(p) if stage else p.detach() for p in engine.parameters()]
        return torch.cat([w.flatten() for w in full])

    stream = batches()
    first = step(stream, 1, StepTimer())
    before = weights().clone()
    poisoned[0] = True
    bad = step(stream, 2, StepTimer())
    poisoned[0] = False
    unchanged = torch.equal(before, weights())
    after = step(stream, 3, StepTimer())
    # Every rank must hold the same weights after all: the skip was agreed, not one rank's.
    mine = weights()
    theirs = [torch.empty_like(mine) for _ in range(place.world_size)]
    torch.distributed.all_gather(theirs, mine)
    if place.rank:
        return
    print(
        json.dumps(
            {
                "first_applied": first.applied,
                "bad_applied": bad.applied,
                "bad_nonfinite": bad.nonfinite,
                "unchanged": unchanged,
                "after_applied": after.applied,
                "after_loss": after.loss,
                "finite": bool(torch.isfinite(mine).all()),
                "ranks_agree": all(torch.equal(mine, t) for t in theirs),
                "overlapped": reduction is not None,
            }
        )
    )


if __name__ == "__main__":
    # The heartbeat thread may still write there while it goes.
    with tempfile.TemporaryDirectory(prefix="poisoned-", ignore_cleanup_errors=True) as run_dir:
        main(int(sys.argv[1]), sys.argv[2], sys.argv[3], run_dir)
