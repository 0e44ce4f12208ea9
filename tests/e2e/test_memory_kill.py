"""A rank killed by the kernel for memory, for real: one rank of a 2-rank run in a
memory-limited cgroup (v2 ``memory.max``, else v1), the survivor naming it and its limit, and
the requeued run taking the memory plan's advice under the same limit."""

import json

import pytest
from support import memory_cgroup
from support.trainings import losses, run, train_args

from mtrain.model import GPTConfig
from mtrain.training.config import DeepSpeedConfig
from mtrain.training.memory_plan import Layout, estimate

# Activations that dominate a rank's memory: 12 blocks over 16 x 512 tokens per micro batch.
SHAPE = {"n_layer": 12, "n_head": 4, "d_model": 96, "max_seq_len": 512}
MICRO = 16


def saving_on_paper(vocab_size: int) -> float:
    """What activation checkpointing saves per rank, in the memory plan's arithmetic."""
    model = GPTConfig(**SHAPE, vocab_size=vocab_size)

    def total(checkpointing: bool) -> float:
        layout = Layout(model, DeepSpeedConfig(), MICRO, 2, activation_checkpointing=checkpointing)
        return estimate(layout).total

    return total(False) - total(True)


def test_a_rank_killed_for_memory_is_named_and_the_requeue_takes_the_plans_advice(
    bach_dataset, tmp_path, monkeypatch
):
    cgroup, why = memory_cgroup.make()
    if cgroup is None:
        pytest.skip(why)
    try:
        run_dir = tmp_path / "run"
        args = train_args(
            bach_dataset,
            run_dir,
            "model=mini",
            *(f"model.{k}={v}" for k, v in SHAPE.items()),
            f"trainer.micro_batch_size={MICRO}",
            f"trainer.global_batch_tokens={2 * MICRO * SHAPE['max_seq_len']}",
            "trainer.save_every=1",
            "optim.warmup_steps=1",
            "data.num_workers=0",
            "logger.mode=disabled",
            # The rank in the cgroup plans with its limit; the user tries anyway.
            "deepspeed.check_memory=false",
        )
        script = ["tests/support/memory_cgroup.py", *args[1:]]  # args[0] is "-m"
        monkeypatch.setenv(memory_cgroup.PROCS_ENV, str(memory_cgroup.procs_file(cgroup)))
        monkeypatch.setenv(memory_cgroup.RANK_ENV, "1")

        # 1. Under a limit that holds it (and makes rank 1 plan as tightly as under the one to
        # come: the same host-memory policy): what rank 1 needs, and a checkpoint.
        memory_cgroup.set_limit(cgroup, 4 << 30)
        code, out = run([*script, "trainer.max_steps=1"], torchrun=True)
        assert code == 0, out[-3000:]
        needed = memory_cgroup.peak(cgroup)
        if needed is None:
            pytest.skip(f"{cgroup.path} does not report its peak")
        vocab = json.loads((run_dir / "model_config.json").read_text())["vocab_size"]
        # Below that by a quarter of what checkpointing saves on paper (which the measured
        # saving exceeds by far): the same step cannot fit, the advised one can.
        limit = int(needed - saving_on_paper(vocab) / 4)
        print(f"rank 1 needed {needed / 2**30:.2f} GiB; limit now {limit / 2**30:.2f} GiB")
        memory_cgroup.set_limit(cgroup, limit)

        # 2. Without: the kernel kills rank 1 in its first step; rank 0 names it and why.
        code, out = run([*script, "trainer.max_steps=2"], torchrun=True)
        assert code != 0, out[-3000:]
        assert (cgroup.oom_kills or 0) >= 1, out[-3000:]
        line = next((x for x in out.splitlines() if "a collective failed on rank 0" in x), "")
        assert "rank 1 stopped answering - killed for memory" in line, out[-4000:]
        assert f"its limit {limit / 2**30:.2f} GiB" in out, out[-4000:]
        assert "the kernel's OOM killer ended it in its memory cgroup" in out, out[-4000:]

        # 3. The requeue, under the same limit: the plan's advice taken, the run finished.
        code, out = run([*script, "trainer.max_steps=2"], torchrun=True)
        assert code == 0, out[-4000:]
        assert "resuming with trainer.activation_checkpointing=true" in out, out[-4000:]
        assert "lost rank 1 to the kernel's OOM killer" in out, out[-4000:]
        assert "resumed from" in out and "step_00000001" in out, out[-4000:]
        assert sorted(losses(run_dir)) == [1, 2]
    finally:
        memory_cgroup.remove(cgroup)
