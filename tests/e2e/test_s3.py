"""Object storage for real: MIDI read from and shards written to an S3 server on loopback,
then read back through the s3:// URLs the trainer uses."""

import os

import boto3
import fsspec
import pytest
from support.apps import run_module
from support.datasets import iter_pieces, shard_urls
from support.s3_server import SECRET, moto_server, patched_environ

from data_pipeline.reader import load_card
from data_pipeline.tokenizer import MusicTokenizer


@pytest.fixture(scope="module")
def s3_env():
    with moto_server() as env, patched_environ(env):
        fsspec.config.conf.clear()
        yield env


def test_prepare_from_s3_to_s3_and_read_back(s3_env, midi_corpus, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="music")
    uploaded = 0
    for path in sorted(midi_corpus.rglob("*.mid")):
        s3.upload_file(str(path), "music", f"midi/{path.relative_to(midi_corpus)}")
        uploaded += 1

    proc = run_module(
        "data_pipeline.prepare",
        "source=s3://music/midi",
        "output=s3://music/datasets/demo",
        "shards.max_pieces=8",
        "workers=2",
        "tokenizer.learned.kind=bpe",
        "tokenizer.learned.size=600",
        f"hydra.run.dir={tmp_path / 'h'}",
        env={**os.environ, **s3_env},
    )
    assert SECRET not in proc.stdout + proc.stderr

    card = load_card("s3://music/datasets/demo")
    assert card["files"]["total"] == uploaded and card["files"]["ok"] == 40
    assert card["failures"]["total"] == uploaded - 41
    assert SECRET not in str(card)
    keys = {
        o["Key"] for o in s3.list_objects_v2(Bucket="music", Prefix="datasets/demo/")["Contents"]
    }
    for shard in card["splits"]["train"]["shards"]:
        assert f"datasets/demo/{shard['name']}" in keys
    assert not any(k.endswith(".partial") for k in keys)

    urls = shard_urls("s3://music/datasets/demo", "train", card)
    assert all(u.startswith("s3://music/datasets/demo/train-") for u in urls)
    pieces = list(iter_pieces(urls))
    assert len(pieces) == card["splits"]["train"]["pieces"]
    tok = MusicTokenizer.load("s3://music/datasets/demo/tokenizer")
    assert tok.hash == card["tokenizer"]["hash"] and tok.learned is not None
    tokens, _ = pieces[0]
    assert (tok.decode_base(tok.encode_base(tokens)) == tokens).all()
