"""Object storage that fails for a while: a real S3 server (moto_server) behind a
fault-injecting proxy of our own refuses, resets, stalls and throttles connections; reads are
retried and resume at the right piece, and a training rides out an outage."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import fsspec
import pytest
import s3fs
from support.apps import REPO, free_port, run_module
from support.datasets import write_shards
from support.fault_proxy import FaultProxy
from support.midi_factory import write_corpus
from support.s3_server import SECRET, moto_server, patched_environ

from data_pipeline import retries, storage
from data_pipeline.reader import CorruptShardError, ShardReader, shard_shares

BUCKET = "shards"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto_server behind a FaultProxy; the clients talk to the proxy, with 1 s timeouts and
    16 KB ranged reads (so a shard is read in several requests and can break mid-shard)."""
    with moto_server() as env:
        proxy = FaultProxy(int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
        client_env = {
            **env,
            "AWS_ENDPOINT_URL": proxy.endpoint,
            storage.TIMEOUT_ENV: "1",
            storage.BLOCK_ENV: "16384",
        }
        try:
            with patched_environ(client_env):
                fsspec.config.conf.clear()
                s3fs.S3FileSystem.clear_instance_cache()
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(
                    Bucket=BUCKET
                )
                yield proxy, client_env, env
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            proxy.close()


@pytest.fixture(scope="module")
def remote_shards(s3) -> list:
    output = f"s3://{BUCKET}/ds"
    return shard_shares(output, write_shards(output))


def keys(pieces) -> list[tuple[str, bytes]]:
    return [(p.key, p.tokens.tobytes()) for p in pieces]


FAULTS = {
    # mode: (seconds, proxy settings, retries expected)
    "refuse": (2.0, {}, True),
    "reset": (2.0, {"after": 6000}, True),
    "stall": (4.0, {}, True),  # a 1 s read timeout fires after ~2 s
    "slow": (2.0, {"rate": 40_000}, False),
}


@pytest.mark.parametrize("mode", list(FAULTS))
def test_reads_survive_storage_faults_without_skipping_or_repeating(
    s3, remote_shards, mode, caplog
):
    proxy = s3[0]
    expected = keys(ShardReader().pieces(remote_shards))
    assert len(expected) == 30
    seconds, settings, retries_expected = FAULTS[mode]
    reader = ShardReader(retry_s=60)
    pieces = reader.pieces(remote_shards)
    got = keys(next(pieces) for _ in range(4))  # partway into the first shard
    start = time.monotonic()
    timer = proxy.fault_for(mode, seconds, **settings)
    try:
        with caplog.at_level(logging.WARNING, logger="data_pipeline.retries"):
            got += keys(pieces)
    finally:
        timer.cancel()
        proxy.set("pass")
    assert got == expected  # nothing skipped, nothing repeated, same order
    assert not reader.damaged and reader.corrupt.value == 0
    if retries_expected:
        assert reader.retries.value > 0
        assert time.monotonic() - start >= seconds * 0.8  # it waited the outage out
        assert "s3://shards/ds/train-00000" in caplog.text and "retry 1" in caplog.text
    assert SECRET not in caplog.text


def test_an_outage_longer_than_the_budget_fails_naming_the_shard(s3, remote_shards):
    proxy = s3[0]
    proxy.set("refuse")
    try:
        reader = ShardReader(on_corrupt="skip", retry_s=1.5)
        with pytest.raises(retries.StorageUnavailable, match=r"train-000000\.tar failed"):
            list(reader.pieces(remote_shards))
    finally:
        proxy.set("pass")
    assert reader.corrupt.value == 0  # an outage is not damage
    assert reader.retries.value >= 1


def test_writes_and_listings_are_retried(s3, caplog):
    proxy = s3[0]
    url = f"s3://{BUCKET}/misc/card.json"
    timer = proxy.fault_for("refuse", 1.5)
    try:
        with caplog.at_level(logging.WARNING, logger="data_pipeline.retries"):
            storage.write_bytes(url, b"{}")
    finally:
        timer.cancel()
        proxy.set("pass")
    assert "write s3://shards/misc/card.json failed" in caplog.text
    timer = proxy.fault_for("reset", 1.5, after=0)
    try:
        assert storage.exists(url) and storage.read_bytes(url) == b"{}"
        assert storage.list_files(f"s3://{BUCKET}/misc", (".json",)) == [url]
    finally:
        timer.cancel()
        proxy.set("pass")
    assert not storage.exists(f"s3://{BUCKET}/misc/none.json")  # a 404 is no outage


def test_missing_objects_are_not_retried(s3):
    before = retries.retries_total
    reader = ShardReader(retry_s=60)
    share = shard_shares(f"s3://{BUCKET}/nowhere", [{"name": "x.tar", "pieces": 1}])[0]
    with pytest.raises(CorruptShardError, match=r"x\.tar"):
        list(reader.read(share))
    assert retries.retries_total == before and reader.retries.value == 0


# --- training through an outage --------------------------------------------------------------


def _train(run: Path, env: dict, proxy: FaultProxy | None = None) -> list[dict]:
    """A short training from s3:// through the proxy; with ``proxy``, 6 s of refused
    connections and then 3 s of connections reset mid-transfer once training is under way."""
    cmd = [
        sys.executable,
        "-m",
        "mtrain.train",
        f"data.path=s3://{BUCKET}/train-ds",
        f"run_dir={run}",
        "model=tiny",
        "deepspeed=cpu",
        "deepspeed.zero_stage=0",
        "trainer.max_steps=30",
        "trainer.save_every=1000",
        "trainer.eval_every=0",
        "trainer.log_every=1",
        "trainer.micro_batch_size=4",
        "trainer.global_batch_tokens=512",
        "optim.lr=3e-3",
        "optim.warmup_steps=5",
        "data.num_workers=0",
        "data.shuffle_buffer=4",
        "data.storage_retry_s=120",
        "deepspeed.timeout_s=300",  # above the retry budget and a step, as the config requires
        "logger.mode=disabled",
    ]
    with (run.parent / f"{run.name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            if proxy is not None:
                metrics = run / "metrics.jsonl"
                deadline = time.monotonic() + 120
                while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
                proxy.set("refuse")
                time.sleep(6)
                proxy.set("reset", after=4000)
                time.sleep(3)
                proxy.set("pass")
            assert proc.wait(timeout=240) == 0, (run.parent / f"{run.name}.log").read_text()[-3000:]
        finally:
            proxy and proxy.set("pass")
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def test_training_rides_out_an_outage_with_the_same_loss_curve(s3, tmp_path):
    proxy, client_env, direct = s3
    root = tmp_path
    write_corpus(root / "midi", 24)
    run_module(
        "data_pipeline.prepare",
        f"source={root / 'midi'}",
        f"output={root / 'ds'}",
        "workers=1",
        "shards.max_pieces=2",
        "split.val=0.1",
        "split.test=0.1",
        f"hydra.run.dir={root / 'hydra'}",
    )
    s3c = boto3.client("s3", endpoint_url=direct["AWS_ENDPOINT_URL"])
    for path in sorted((root / "ds").rglob("*")):
        if path.is_file():
            s3c.upload_file(str(path), BUCKET, f"train-ds/{path.relative_to(root / 'ds')}")
    shutil.rmtree(root / "ds")
    env = {
        **os.environ,
        **client_env,
        storage.TIMEOUT_ENV: "2",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "MASTER_PORT": str(free_port()),
    }
    clean = _train(root / "clean", env)
    env["MASTER_PORT"] = str(free_port())
    faulty = _train(root / "faulty", env, proxy)
    assert [r["step"] for r in faulty] == [r["step"] for r in clean] and len(clean) == 30
    assert [r["train/loss"] for r in faulty] == [r["train/loss"] for r in clean]
    assert faulty[-1]["data/storage_retries"] > 0 and clean[-1]["data/storage_retries"] == 0
    assert SECRET not in (root / "faulty.log").read_text()
