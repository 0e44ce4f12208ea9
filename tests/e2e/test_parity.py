"""The trainer does what a plain PyTorch loop does: transformers' GPT-2, given the trainer's
initial weights and trained by hand on the same batches (AdamW, clipping, the same learning-rate
schedule), has the trainer's losses step for step. Speed is bench/bench_train.py's business;
this is the check that the trainer is fast at training the same thing."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from support.trainings import losses, run, train_args

from mtrain.data.loader import StreamingData
from mtrain.exported.transformers_format import to_hf
from mtrain.model import GPT
from mtrain.training.config import TrainConfig, batch_sizes
from mtrain.training.rng_state import seed_everything
from mtrain.training.schedule import lr_multiplier

STEPS = 12


def trained_config(run_dir) -> TrainConfig:
    """The trainer's whole config, as Hydra composed it for the run."""
    saved = OmegaConf.load(run_dir / "hydra" / "config.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))


def plain_gpt2_losses(cfg: TrainConfig, world: int) -> list[float]:
    """The losses of one process that reads every rank's batches of every step and averages
    their gradients, as the ranks' all-reduce does."""
    ranks = [
        StreamingData(cfg.data, cfg.model.max_seq_len, cfg.trainer.micro_batch_size, r, world)
        for r in range(world)
    ]
    cfg.model = cfg.model.with_vocab(ranks[0].tokenizer.vocab_size)
    seed_everything(cfg.trainer.seed)  # as the trainer seeds before building its model
    model = to_hf(GPT(cfg.model)).train()
    assert type(model).__name__ == "GPT2LMHeadModel"
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, cfg.trainer.max_steps, cfg.optim)
    )
    batches = [data.train_batches() for data in ranks]
    micro_batches = batch_sizes(cfg, world).grad_accum * world
    step_losses = []
    for _ in range(cfg.trainer.max_steps):
        total = 0.0
        for _ in range(micro_batches // world):
            for rank_batches in batches:
                inputs, targets = next(rank_batches)
                logits = model(inputs).logits
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
                (loss / micro_batches).backward()
                total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses.append(total / micro_batches)
    return step_losses


@pytest.mark.parametrize("ranks", [1, 2])
def test_trainer_losses_are_those_of_a_plain_gpt2_loop(bach_dataset, tmp_path, ranks):
    """On 2 ranks the gradients are the trainer's own all-reduce's, overlapped with the
    backward pass (mtrain.training.grad_sync)."""
    run_dir = tmp_path / "run"
    # GPT-2's architecture (learned positions, biases); a high learning rate, so that a
    # difference in the update shows in the next losses; accumulation over 2 micro batches
    # per rank on 1 rank, 1 on 2 (the same global batch).
    code, out = run(
        train_args(
            bach_dataset,
            run_dir,
            f"trainer.max_steps={STEPS}",
            "model.positional=learned",
            "model.bias=true",
            "deepspeed.zero_stage=0",
            "optim.lr=3e-3",
            "trainer.save_every=1000",
            "trainer.sample_every=0",
        ),
        ranks=ranks,
    )
    assert code == 0, out[-4000:]
    trained = losses(run_dir)
    plain = plain_gpt2_losses(trained_config(run_dir), ranks)
    assert plain[-1] < plain[0] - 0.5  # it learns: the comparison is not of two flat lines
    # Equal to float rounding (fused vs looped AdamW, the order of the norm's sum): 1e-7 seen.
    assert [trained[s] for s in range(1, STEPS + 1)] == pytest.approx(plain, rel=1e-5, abs=0)
