"""The trainer for real: DeepSpeed on CPU (gloo), 2 ranks under torchrun, real Bach shards.

Each test launches the same command a user types. Runs are tiny (the `tiny` model, a few
dozen steps) so the whole file stays within a few minutes on two cores.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.apps import REPO, free_port
from support.trainings import CPU_ENV, kill_tree, launch, losses, run, train_args
from support.wandb_records import history

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.exported.loading import load_exported
from mtrain.exported.writing import exported_model_dir
from mtrain.generation.compose import DEFAULT_MIN_P, compose
from mtrain.generation.sampling import SamplingConfig


@pytest.fixture(scope="module")
def uninterrupted(bach_dataset, tmp_path_factory) -> Path:
    """60 steps in one go under ZeRO-3 with 2 ranks: the reference run."""
    run_dir = tmp_path_factory.mktemp("train") / "straight"
    code, out = run(
        train_args(
            bach_dataset,
            run_dir,
            "trainer.max_steps=60",
            "trainer.save_every=5",
            "trainer.eval_every=10",
            "trainer.sample_every=30",
            "trainer.sample_tokens=48",
        )
    )
    assert code == 0, out[-4000:]
    return run_dir


def test_zero3_loss_falls_and_parameters_are_partitioned(uninterrupted):
    loss = losses(uninterrupted)
    assert sorted(loss) == list(range(1, 61))
    assert loss[60] < loss[1] - 1.0, loss
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perf/tokens_per_s"] > 0 and r["perf/mfu"] is None for r in rows)
    assert "val/loss" in rows[9] and rows[9]["val/perplexity"] > 1
    shares = []
    for rank in (0, 1):
        log = (uninterrupted / f"train-rank{rank}.log").read_text()
        line = next(x for x in log.splitlines() if "parameter elements" in x)
        shares.append(float(line.split("(")[1].split("%")[0]))
    assert all(40 <= s <= 60 for s in shares), shares  # each rank about half


def test_kill_and_restart_resumes_with_identical_losses(bach_dataset, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    args = train_args(
        bach_dataset,
        run_dir,
        "trainer.max_steps=60",
        "trainer.save_every=5",
        "trainer.eval_every=10",
    )
    proc = launch(args)
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").exists() or max(losses(run_dir)) < 12:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    kill_tree(proc)  # kill -9 every process of the job at once: no chance to save
    proc.communicate()
    # A half-written newer checkpoint (no marker) must be ignored, not loaded.
    (run_dir / "checkpoints" / "step_00000059").mkdir()
    code, out = run(args)
    assert code == 0, out[-4000:]
    assert "ignoring checkpoint" in out and "step_00000059" in out
    resumed = int(out.split("resumed from ")[1].split("step_")[1][:8])
    assert 10 <= resumed < 60
    expected, got = losses(uninterrupted), losses(run_dir)
    steps = range(resumed + 1, 61)
    assert [f"{got[s]:.4f}" for s in steps] == [f"{expected[s]:.4f}" for s in steps]


# Slurm's --signal=USR1 (slurm/train.sbatch) and submitit's timeout warning USR2.
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2], ids=["USR1", "USR2"])
def test_a_preemption_signal_checkpoints_and_exits_with_the_requeue_code(
    bach_dataset, tmp_path, sig
):
    run_dir = tmp_path / "preempted"
    proc = launch(
        train_args(
            bach_dataset,
            run_dir,
            "trainer.max_steps=500",
            "trainer.save_every=1000",
            "deepspeed=zero0",
        ),
        ranks=1,
    )
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").exists() or max(losses(run_dir)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    saved = sorted((run_dir / "checkpoints").glob("step_*/COMPLETE"))
    assert len(saved) == 1
    assert int(saved[0].parent.name.split("_")[1]) == max(losses(run_dir))


# ZeRO-0 on 2 ranks trains in test_parity (its losses those of a plain loop), test_finetune
# and the tests below; ZeRO-3 in the reference run.
@pytest.mark.parametrize("stage", [1, 2])
def test_other_zero_stages_train(bach_dataset, tmp_path, stage):
    code, out = run(
        train_args(
            bach_dataset, tmp_path / "run", "trainer.max_steps=4", f"deepspeed.zero_stage={stage}"
        )
    )
    assert code == 0, out[-4000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]


def test_wandb_offline_run_holds_the_metrics(uninterrupted):
    runs = list((uninterrupted / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert runs[0].name.endswith((uninterrupted / "wandb_run_id").read_text())
    rows = history(uninterrupted)
    assert [r["_step"] for r in rows] == list(range(1, 61))
    expected = losses(uninterrupted)
    assert [r["train/loss"] for r in rows] == pytest.approx([expected[s] for s in range(1, 61)])
    assert all("perf/tokens_per_s" in r and "train/grad_norm" in r for r in rows)


def test_training_samples_come_from_the_model_being_trained(uninterrupted):
    """Rank 0's samples at step 60 are the ones the step-60 export draws with the same seed:
    the ZeRO-3 partitions were gathered whole into the sampling copy."""
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "samples/notes" in r] == [30, 60]
    samples = uninterrupted / "samples" / "step_00000060"
    assert sorted(p.name for p in samples.glob("sample-*.mid")) == ["sample-0.mid", "sample-1.mid"]
    drawn = [row["ids"] for row in json.loads((samples / "samples.json").read_text())]

    # <run>/export, made here or by the evaluation below: each reuses the other's.
    model_dir = exported_model_dir(uninterrupted)
    model, meta = load_exported(model_dir)
    assert meta["step"] == 60
    tokenizer = MusicTokenizer.load(str(model_dir / "tokenizer"))
    sampling = SamplingConfig(max_new_tokens=48, min_p=DEFAULT_MIN_P, seed=60)
    again = compose(model, tokenizer, [tokenizer.bos_id], 2, sampling, 2)
    assert [piece.ids for piece in again] == drawn


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_stpes=3", "trainer.max_stpes"),
        ("optim.lr=fast", "optim.lr"),
        ("trainer.global_batch_tokens=1000", "trainer.global_batch_tokens=1000 is not a multiple"),
        ("deepspeed.zero_stage=5", "deepspeed.zero_stage=5 must be 0, 1, 2 or 3"),
        ("model=gpt_9t", "model"),
    ],
)
def test_bad_override_is_rejected_before_launch(bach_dataset, tmp_path, override, message):
    start = time.monotonic()
    code, out = run([*train_args(bach_dataset, tmp_path / "run"), override], ranks=1)
    assert code != 0 and message in out, out[-3000:]
    assert "init_distributed" not in out and time.monotonic() - start < 60


def test_export_consolidates_zero3_and_matches_transformers(zero3_export, tuned_from_export):
    """ZeRO-3 shards -> one safetensors file and a GPT-2 checkpoint, all with the logits the
    training engine computed on the probe batch (conftest's ``zero3_export``: 6 steps of GPT-2's
    shape on 2 ranks, exported by ``python -m mtrain.export``)."""
    import torch
    from transformers import GPT2LMHeadModel

    run_dir, export_dir = zero3_export["run"], zero3_export["export"]
    model, meta = load_exported(export_dir)
    assert meta["step"] == 6 and meta["hf_architecture"] == "GPT2LMHeadModel"
    assert meta["verified_logits_max_abs_diff"] < 1e-5
    probe = torch.load(run_dir / "checkpoints" / "step_00000006" / "probe.pt")
    hf = GPT2LMHeadModel.from_pretrained(export_dir / "hf").eval()
    with torch.no_grad():
        ours = model(probe["inputs"]).logits
        theirs = hf(probe["inputs"]).logits
    torch.testing.assert_close(ours, probe["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, probe["logits"], atol=1e-4, rtol=0)
    assert (export_dir / "tokenizer" / "artifact.json").exists()

    # Fine-tuning starts from the exported weights: its first loss is the trained model's
    # (before any update, whatever the learning rate; test_zero_init checks the same run's
    # weights).
    assert losses(tuned_from_export["run"])[1] < losses(run_dir)[1] - 0.3


def test_export_refuses_a_run_without_complete_checkpoints(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_00000005").mkdir(parents=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtrain.export",
            f"checkpoint={tmp_path / 'run'}",
            f"output={tmp_path / 'out'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr + proc.stdout


def test_evaluate_reports_bits_per_note_and_second(uninterrupted, bach_dataset, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtrain.evaluate",
            f"checkpoint={uninterrupted}",
            f"data_path={bach_dataset}",
            f"output={tmp_path}",
            # The likelihood alone: the samples' metrics are test_evaluate_app's and
            # test_bf16_zero3's (the default 16 samples would be drawn for nothing here).
            "music.num_samples=0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    lik = report["likelihood"]
    card = json.loads((bach_dataset / "dataset.json").read_text())["splits"]["test"]
    assert lik["pieces"] == card["pieces"] and lik["notes"] == card["notes"]
    # Every token of every piece scored once: its tokens, plus BOS, labels and EOS.
    labels = 3  # collection, composer, genre
    assert lik["tokens"] == card["tokens"] + card["pieces"] * (1 + labels)
    bits = lik["nll_per_token_nats"] * lik["tokens"] / math.log(2)
    assert lik["bits_per_note"] == pytest.approx(bits / card["notes"])
    assert lik["bits_per_second"] == pytest.approx(bits / card["duration_s"], rel=1e-3)
    shares = [row["share_of_bits"] for row in lik["by_token_type"].values()]
    assert sum(shares) == pytest.approx(1.0)
    assert {"Pitch", "Duration", "Position", "conditioning"} <= set(lik["by_token_type"])
    assert "| bits_per_note |" in (tmp_path / "report.md").read_text()
    # A whole split scored: the export's model card shows it.
    model_card = (Path(uninterrupted) / "export" / "hf" / "README.md").read_text()
    assert f"**{lik['bits_per_note']:.3f} bits per note**" in model_card
    assert f"data.path={bach_dataset}" in model_card  # the command that trained it

    # The n-gram floor scores the same documents and targets, with no model.
    floor = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtrain.evaluate",
            "baseline=ngram",
            f"data_path={bach_dataset}",
            f"output={tmp_path / 'ngram'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert floor.returncode == 0, floor.stderr[-3000:]
    ngram = json.loads((tmp_path / "ngram" / "report.json").read_text())["likelihood"]
    assert (ngram["tokens"], ngram["notes"]) == (lik["tokens"], lik["notes"])
    assert 0 < ngram["bits_per_note"] < 12 and ngram["model"]["order"] == 5
    assert list(ngram["by_collection"]) == ["bach"]


@pytest.mark.parametrize(
    ("stage", "precision", "ranks"), [(0, "fp32", 1), (3, "bf16", 1), (0, "fp32", 2)]
)
def test_a_step_with_a_nan_loss_leaves_the_weights_alone_under_a_real_engine(
    stage, precision, ranks
):
    """ZeRO-3 in bf16 (the default) relies on DeepSpeed's own check of the gradient norm,
    ZeRO-0 in fp32 on the trainer's; on 2 ranks ZeRO-0's gradients are reduced by the trainer
    during the backward pass, and only the last rank's loss is NaN: both ranks must skip."""
    script = REPO / "tests" / "support" / "poisoned_step.py"
    port = str(free_port())
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                     f"--master-port={port}"]  # fmt: skip
    proc = subprocess.run(
        [*launcher, str(script), str(stage), precision, port],
        env={**os.environ, **CPU_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["first_applied"] and not seen["bad_applied"] and seen["bad_nonfinite"] == 2
    assert seen["unchanged"] and seen["finite"] and seen["ranks_agree"]
    assert seen["after_applied"] and math.isfinite(seen["after_loss"])
    assert seen["overlapped"] == (ranks > 1 and stage == 0)
