"""The sbatch scripts on a real Slurm: a one-machine cluster (slurmctld + slurmd) on loopback.

Skipped, with the reason, where Debian's slurm-wlm is not installed (.ci/run installs it).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import midi_factory
from support.apps import REPO, run_module
from support.datasets import comparable

from data_pipeline.reader import load_card
from mtrain.evaluation.music_metrics import METRICS

pytestmark = pytest.mark.skipif(
    shutil.which("slurmctld") is None or shutil.which("sbatch") is None,
    reason="Slurm is not installed (apt-get install -y --no-install-recommends slurm-wlm)",
)
TRAIN = (
    "model=tiny",
    "deepspeed=cpu",
    "trainer.micro_batch_size=4",
    "trainer.global_batch_tokens=1024",
    "data.num_workers=1",
    "optim.warmup_steps=2",
    "trainer.log_every=10",
)
# What a CPU partition passes: train.sbatch's header asks each node for 8 GPUs and 64 CPUs
# (this cluster's environment also says DS_ACCELERATOR=cpu and 2 ranks per node).
CPU_JOB = ("--gpus-per-node=0", "--cpus-per-task=1")


@contextmanager
def local_cluster(
    where: Path, nodes: int = 1, ranks_per_node: int = 2, gpus: int = 0, **extra_env: str
):
    """A running loopback cluster; yields the environment a client needs. The daemons (and a
    second node's network namespace) are stopped by PID afterwards. ``gpus``: each node
    declares that many placeholder GPUs and 8 CPUs per GPU (slurm/local-cluster.sh)."""
    script = REPO / "slurm" / "local-cluster.sh"
    declared = {"MTRAIN_SLURM_GPUS": str(gpus), "MTRAIN_SLURM_CPUS": str(8 * gpus)} if gpus else {}
    subprocess.run(
        [str(script), "start", str(where)],
        check=True,
        capture_output=True,
        timeout=60,
        env={**os.environ, "MTRAIN_SLURM_NODES": str(nodes), **declared},
    )
    try:
        yield {
            **os.environ,
            "SLURM_CONF": str(where / "slurm.conf"),
            "MTRAIN_PYTHON": sys.executable,
            "MTRAIN_PROCS_PER_NODE": str(ranks_per_node),
            "DS_ACCELERATOR": "cpu",
            "WANDB_MODE": "offline",
            **extra_env,
        }
    finally:
        subprocess.run([str(script), "stop", str(where)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def sbatch(env: dict, *args: str) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={REPO}", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip().split(";")[0]


def job_field(env: dict, job: str, field: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True
    ).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{field}=")), "")


def wait_for(env: dict, job: str, states: set[str], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_field(env, job, "JobState")
        if state in states:
            return state
        assert state not in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}, state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {job_field(env, job, 'JobState')} after {timeout} s")


def steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_sbatch_runs_two_ranks_to_completion(slurm, bach_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(
        slurm,
        f"--output={tmp_path}/%j.out",
        *CPU_JOB,
        "slurm/train.sbatch",
        f"data.path={bach_dataset}",
        f"run_dir={run_dir}",
        "trainer.max_steps=12",
        *TRAIN,
    )
    assert wait_for(slurm, job, {"COMPLETED"}) == "COMPLETED"
    log = (tmp_path / f"{job}.out").read_text()
    assert "1 node(s) x 2 rank(s)" in log and "1 CPU(s) and 0 GPU(s) per node" in log
    assert "step 12/12" in log
    assert steps(run_dir) == list(range(1, 13))
    assert (run_dir / "checkpoints" / "step_00000012" / "COMPLETE").exists()
    assert (run_dir / "train-rank1.log").exists()
    # The evaluation job exports that run, scores the test split and writes samples.
    job = sbatch(
        slurm,
        f"--output={tmp_path}/%j.out",
        "slurm/eval.sbatch",
        str(run_dir),
        f"data_path={bach_dataset}",
    )
    assert wait_for(slurm, job, {"COMPLETED"}) == "COMPLETED"
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["step"] == 12 and report["likelihood"]["bits_per_note"] > 0
    assert set(report["music"]["features"]) == set(METRICS)
    assert len(list((run_dir / "samples" / "eval").glob("sample-*.mid"))) == 8


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, bach_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(
        slurm,
        f"--output={tmp_path}/%j.out",
        *CPU_JOB,
        "slurm/train.sbatch",
        f"data.path={bach_dataset}",
        f"run_dir={run_dir}",
        "trainer.max_steps=150",
        "trainer.save_every=1000",
        *TRAIN,
    )
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").exists() or len(steps(run_dir)) < 10:
        assert time.monotonic() < deadline
        assert job_field(slurm, job, "JobState") in {"PENDING", "CONFIGURING", "RUNNING"}
        time.sleep(0.2)
    # What --signal=B:USR1@<s> does before the time limit: USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    # Requeued, the job is held until its old credential expires (cred_expire=10 s here).
    wait_for(slurm, job, {"PENDING"}, timeout=120)
    assert wait_for(slurm, job, {"COMPLETED"}) == "COMPLETED"
    assert job_field(slurm, job, "Restarts") == "1"
    log = (tmp_path / f"{job}.out").read_text()
    assert "exiting with 75" in log and "requeueing job" in log and "resumed from" in log
    assert steps(run_dir) == list(range(1, 151))  # no step lost, none repeated
    run_ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert run_ids == {(run_dir / "wandb_run_id").read_text()}  # one wandb run, resumed


def test_prepare_array_and_merge_equal_a_single_prepare(slurm, midi_corpus, tmp_path):
    single = tmp_path / "single"
    run_module(
        "data_pipeline.prepare",
        f"source={midi_corpus}",
        f"output={single}",
        "workers=1",
        "shards.max_pieces=8",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    sliced = tmp_path / "sliced"
    proc = subprocess.run(
        [
            str(REPO / "slurm" / "prepare.sh"),
            "2",
            f"source={midi_corpus}",
            f"output={sliced}",
            "shards.max_pieces=8",
        ],
        env={
            **slurm,
            "SBATCH_ARGS": f"--output={tmp_path}/%x-%j.out --chdir={REPO}",
            "MTRAIN_LOG_DIR": str(tmp_path / "logs"),
        },
        capture_output=True,
        text=True,
        check=True,
    )
    merge_job = proc.stdout.split("merge job ")[1].strip()
    assert wait_for(slurm, merge_job, {"COMPLETED"}) == "COMPLETED"
    assert comparable(load_card(str(sliced))) == comparable(load_card(str(single)))
    assert len(load_card(str(sliced))["slices"]) == 2


def test_prepare_array_at_scale_streams_and_learns_a_bounded_vocabulary(slurm, tmp_path):
    """bench/bench_corpus.py's path at CI size: a procedural corpus with bad files and
    duplicates, three array tasks and the merge, a BPE vocabulary learned from a bounded
    sample of pieces; every file accounted for, no task's memory near a corpus-sized one."""
    files = 1200
    corpus, out = tmp_path / "corpus", tmp_path / "ds"
    midi_factory.write_scale_corpus(corpus, files, workers=2)
    proc = subprocess.run(
        [
            str(REPO / "slurm" / "prepare.sh"),
            "3",
            f"source={corpus}",
            f"output={out}",
            "tokenizer.learned.kind=bpe",
            "tokenizer.learned.size=1000",
            "tokenizer.learned.max_pieces=400",
        ],
        env={
            **slurm,
            "SBATCH_ARGS": f"--cpus-per-task=1 --output={tmp_path}/%x-%j.out --chdir={REPO}",
        },
        capture_output=True,
        text=True,
        check=True,
    )
    merge_job = proc.stdout.split("merge job ")[1].strip()
    assert wait_for(slurm, merge_job, {"COMPLETED"}) == "COMPLETED"
    card = load_card(str(out))
    assert card["files"]["total"] == files
    assert len((out / "manifest.jsonl").read_text().splitlines()) == files
    assert card["files"]["duplicates"] > 0
    assert {"empty", "not_midi", "parse_error", "no_notes"} <= set(card["failures"]["by_reason"])
    assert card["tokenizer"]["learned_vocab_size"] == 1000
    assert [s["index"] for s in card["slices"]] == [0, 1, 2]
    for task in card["slices"]:
        # Interpreter, MidiTok and torch: ~250 MiB at any corpus size (bench/bench_corpus.py).
        assert task["peak_rss_mb"]["collector"] < 600, task
        assert task["peak_rss_mb"]["worker"] < 600, task


@pytest.mark.parametrize(
    ("script", "args"),
    [
        (
            "slurm/train.sbatch",
            [*CPU_JOB, "model=gpt_350m", "data.path=s3://ds/v1", "trainer.max_steps=20000"],
        ),
        ("slurm/prepare.sbatch", ["--array=0-7", "source=s3://corpus/midi", "output=s3://ds/v1"]),
        ("slurm/merge.sbatch", ["output=s3://ds/v1"]),
        ("slurm/eval.sbatch", ["runs/mtrain-1", "data_path=s3://ds/v1"]),
    ],
)
def test_every_script_passes_sbatch_test_only(slurm, script, args):
    options = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if not a.startswith("--")]
    proc = subprocess.run(
        ["sbatch", "--test-only", *options, script, *overrides],
        cwd=REPO,
        env=slurm,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr


def test_an_impossible_request_is_refused_not_left_pending(slurm):
    proc = subprocess.run(
        ["sbatch", "--test-only", "--nodes=2", *CPU_JOB, "slurm/train.sbatch"],
        cwd=REPO,
        env=slurm,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Node count specification invalid" in proc.stderr


LAUNCHER = """#!/usr/bin/env bash
echo "launcher: $*"
scontrol show step "$SLURM_JOB_ID.$SLURM_STEP_ID" | grep -o 'Tres[A-Za-z]*=[^ ]*'
"""


def test_train_sbatch_asks_for_gpus_and_refuses_a_job_without_them(tmp_path):
    """On a node that declares 8 GPUs and 64 CPUs, the header's own request (no option on the
    sbatch line, no CPU run asked for): 8 ranks, and a launcher step that holds the node's
    CPUs and GPUs. The launcher is a stand-in that reports the step Slurm gave it; no rank
    starts. The same job with --gpus-per-node=0 fails at once, in one line, before any step."""
    stand_in = tmp_path / "python"
    stand_in.write_text(LAUNCHER)
    stand_in.chmod(0o755)
    with local_cluster(tmp_path / "cluster", gpus=8) as cluster:
        asked_cpu = ("MTRAIN_PROCS_PER_NODE", "DS_ACCELERATOR")
        env = {k: v for k, v in cluster.items() if k not in asked_cpu}
        env["MTRAIN_PYTHON"] = str(stand_in)
        job = sbatch(env, f"--output={tmp_path}/%j.out", "slurm/train.sbatch", "model=gpt_125m")
        assert wait_for(env, job, {"COMPLETED"}, timeout=60) == "COMPLETED"
        assert job_field(env, job, "MinMemoryNode") == "0"  # --mem=0: all of the node's memory
        log = (tmp_path / f"{job}.out").read_text()
        assert "1 node(s) x 8 rank(s)" in log and "64 CPU(s) and 8 GPU(s) per node" in log
        assert "--nproc-per-node=8" in log and "-m mtrain.train model=gpt_125m" in log
        assert "TresPerStep=cpu:64" in log and "TresPerNode=gres:gpu:8" in log

        refused = sbatch(env, f"--output={tmp_path}/%j.out", *CPU_JOB, "slurm/train.sbatch")
        assert wait_for(env, refused, {"FAILED"}, timeout=60) == "FAILED"
        assert job_field(env, refused, "ExitCode") == "2:0"
        lines = (tmp_path / f"{refused}.out").read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"mtrain: job {refused} has no GPU")


def test_submitit_sweep_runs_each_job_with_slurm_ranks(slurm, bach_dataset, tmp_path):
    """--multirun over the submitit launcher: one Slurm job per point, 2 tasks per job that are
    the ranks themselves (no torchrun inside). submitit's client polls sacct, which needs an
    accounting database this cluster lacks, so the test watches the runs and stops the client."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtrain.train",
            "--multirun",
            "hydra/launcher=slurm",
            "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=10",
            f"run_dir={sweep}",
            f"data.path={bach_dataset}",
            "trainer.max_steps=5",
            "optim.lr=1e-3,3e-4",
            *TRAIN,
        ],
        cwd=REPO,
        env={**slurm, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        runs = [sweep / "0", sweep / "1"]  # each point's run directory, <run_dir>/<job number>
        while not all((r / "checkpoints" / "step_00000005" / "COMPLETE").exists() for r in runs):
            assert time.monotonic() < deadline, "sweep jobs did not finish"
            time.sleep(1)
    finally:
        client.terminate()
        client.wait(timeout=30)
    for run in runs:
        assert steps(run) == [1, 2, 3, 4, 5]
        assert (run / "train-rank1.log").exists()  # two ranks, from SLURM_PROCID
    overrides = [(sweep / str(n) / "hydra" / "overrides.yaml").read_text() for n in (0, 1)]
    assert any("optim.lr=0.001" in o for o in overrides)
    assert any("optim.lr=0.0003" in o for o in overrides)


def two_nodes(tmp_path: Path):
    """A second slurmd in its own network namespace, one rank per node."""
    return local_cluster(
        tmp_path / "cluster", nodes=2, ranks_per_node=1, GLOO_SOCKET_IFNAME="mtrain0"
    )


def train_on_two_nodes(env: dict, tmp_path: Path, dataset, run_dir: Path, *extra: str) -> str:
    return sbatch(
        env,
        "--nodes=2",
        f"--output={tmp_path}/%j.out",
        *CPU_JOB,
        "slurm/train.sbatch",
        f"data.path={dataset}",
        f"run_dir={run_dir}",
        *extra,
        *TRAIN,
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="a second node needs root and iproute2 for its network namespace",
)
def test_two_nodes_train_across_a_network_namespace(bach_dataset, tmp_path):
    """A second slurmd in its own network namespace, reached over a veth pair: one rank per
    node, the rendezvous and gloo traffic go between the two addresses."""
    run_dir = tmp_path / "run"
    with two_nodes(tmp_path) as env:
        job = train_on_two_nodes(env, tmp_path, bach_dataset, run_dir, "trainer.max_steps=8")
        assert wait_for(env, job, {"COMPLETED"}) == "COMPLETED"
    log = (tmp_path / f"{job}.out").read_text()
    assert "2 node(s) x 1 rank(s), master 10.77.0." in log
    assert steps(run_dir) == list(range(1, 9))
    shares = [(run_dir / f"train-rank{r}.log").read_text() for r in (0, 1)]
    assert all("(50.0%)" in s for s in shares)  # ZeRO-3 partitioned across the two nodes


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="a second node needs root and iproute2 for its network namespace",
)
def test_a_requeue_on_fewer_nodes_resumes_the_run(bach_dataset, tmp_path):
    """A job started on both nodes (one rank each) is preempted; while it is requeued, node2
    is drained and the job asks for ``--nodes=1-2`` (Slurm gives a range as many nodes as are
    free when it starts): it comes back on one node and goes on from the 2-rank ZeRO-3
    checkpoint."""
    run_dir = tmp_path / "run"
    with two_nodes(tmp_path) as env:
        job = train_on_two_nodes(
            env, tmp_path, bach_dataset, run_dir, "trainer.max_steps=40", "trainer.save_every=1000"
        )
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").exists() or len(steps(run_dir)) < 5:
            assert time.monotonic() < deadline
            assert job_field(env, job, "JobState") in {"PENDING", "CONFIGURING", "RUNNING"}
            time.sleep(0.2)
        subprocess.run(
            ["scontrol", "update", "nodename=node2", "state=drain", "reason=elastic-test"],
            env=env,
            check=True,
        )
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
        wait_for(env, job, {"PENDING"}, timeout=120)
        # The task count of the first start (2 nodes x 1) stays with a requeued job, and would
        # keep asking for 2 nodes: it goes too.
        subprocess.run(
            ["scontrol", "update", f"jobid={job}", "numnodes=1-2", "numtasks=1"],
            env=env,
            check=True,
        )
        assert wait_for(env, job, {"COMPLETED"}) == "COMPLETED"
    log = (tmp_path / f"{job}.out").read_text()
    assert "restart 0: 2 node(s) x 1 rank(s)" in log and "restart 1: 1 node(s)" in log
    assert "written by 2 rank(s), now 1: converted ZeRO-3 state" in log
    assert steps(run_dir) == list(range(1, 41))  # no step lost, none repeated
