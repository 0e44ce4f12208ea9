"""train.sbatch's launch decisions (slurm/ranks.sh) in the environments Slurm gives a batch
script: ranks per node, the refusal of a job without GPUs, the CPUs of the launcher step.
tests/e2e/test_slurm.py submits the script itself to a loopback cluster."""

import os
import subprocess

from support.apps import REPO

RANKS = REPO / "slurm" / "ranks.sh"
# What a user's shell may hold, kept out: each case says its whole environment.
UNSET = ("MTRAIN_PROCS_PER_NODE", "DS_ACCELERATOR")


def decide(function: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in UNSET}
    return subprocess.run(
        ["bash", "-c", f'source "{RANKS}" && {function}'],
        env={**base, "SLURM_JOB_ID": "42", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def ranks(**env: str) -> int:
    proc = decide("ranks_per_node", **env)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_one_rank_per_gpu_allocated_on_the_node():
    assert ranks(SLURM_GPUS_ON_NODE="8") == 8
    assert ranks(SLURM_GPUS_ON_NODE="4", SLURM_GPUS_PER_NODE="4") == 4


def test_a_cpu_run_is_asked_for_by_ranks_or_by_the_accelerator():
    assert ranks(MTRAIN_PROCS_PER_NODE="2") == 2
    assert ranks(DS_ACCELERATOR="cpu") == 1
    assert ranks(DS_ACCELERATOR="cpu", MTRAIN_PROCS_PER_NODE="3") == 3
    assert ranks(SLURM_GPUS_ON_NODE="8", MTRAIN_PROCS_PER_NODE="4") == 4  # the override wins


def test_a_job_without_gpus_is_refused_in_one_line_unless_a_cpu_run_was_asked_for():
    for env in ({}, {"SLURM_GPUS_ON_NODE": "0"}, {"DS_ACCELERATOR": "cuda"}):
        proc = decide("ranks_per_node", **env)
        assert proc.returncode == 2 and proc.stdout == "", env
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("mtrain: job 42 has no GPU")
        assert "--gpus-per-node" in proc.stderr and "DS_ACCELERATOR=cpu" in proc.stderr


def test_a_rank_count_that_is_no_count_is_refused():
    for bad in ("0", "two", "-1", "2x"):
        proc = decide("ranks_per_node", MTRAIN_PROCS_PER_NODE=bad, SLURM_GPUS_ON_NODE="8")
        assert proc.returncode == 2 and proc.stdout == "", bad
        assert f"MTRAIN_PROCS_PER_NODE={bad}:" in proc.stderr


def test_the_launcher_step_gets_the_jobs_cpus():
    def cpus(**env: str) -> str:
        return decide("launcher_cpus", **env).stdout.strip()

    assert cpus(SLURM_CPUS_PER_TASK="64", SLURM_CPUS_ON_NODE="64") == "64"
    # Asked for with --cpus-per-gpu or --exclusive (no per-task count): all of the node's.
    assert cpus(SLURM_CPUS_ON_NODE="96", SLURM_CPUS_PER_GPU="12") == "96"
    assert cpus() == "1"
