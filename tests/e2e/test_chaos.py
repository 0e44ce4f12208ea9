"""A short chaos run: a 2-rank training, reading its shards from a real S3 server (moto_server)
through the tests' fault proxy, restarted after each of two faults (a restart on one rank and
back, a preemption) and riding out a third (the storage resetting connections) ends with every
step logged once and the weights, Adam moments and losses of the undisturbed run (reading the
same shards from disk), bit for bit. The long run, every kind of fault: bench/chaos.py."""

from support.chaos import ChaosConfig, Supervisor, compare, run_args, table
from support.trainings import run

KINDS = ("other_world_size", "preempt", "storage_reset")


def test_a_few_faults_leave_the_training_bit_for_bit_as_undisturbed(bach_dataset, tmp_path):
    cfg = ChaosConfig(steps=8, save_every=2, faults=len(KINDS), seed=3, kinds=KINDS)
    with Supervisor(bach_dataset, tmp_path / "chaos", cfg) as supervisor:
        faults = supervisor.run()
    code, out = run(run_args(bach_dataset, tmp_path / "clean", cfg))
    assert code == 0, out[-3000:]
    print(table(faults))
    assert sorted(f.kind for f in faults) == sorted(KINDS)
    detected = {f.kind: f.detected for f in faults}
    assert detected["other_world_size"].startswith("resumed on 1 rank: 2 rank(s)"), table(faults)
    assert "after a preemption signal" in detected["preempt"], table(faults)
    assert "retried" in detected["storage_reset"] and "no read" not in detected["storage_reset"]
    assert next(f for f in faults if f.kind == "storage_reset").recomputed == 0
    result = compare(supervisor.run_dir, tmp_path / "clean", cfg.steps)
    assert result.steps_once and result.same_losses, table(faults)
    assert result.same_state, result.differences[:10]
