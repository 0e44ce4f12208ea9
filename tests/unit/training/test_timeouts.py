"""The waits' order: a collective's timeout outlasts a rank's storage retries and its step, and
no collective waits on a checkpoint's conversion; the ranks that wait for it watch rank 0's
word and its heartbeat instead, and give up only once rank 0 is silent."""

import json
import threading
import time
from threading import Event

import pytest

from data_pipeline.errors import ConfigError
from data_pipeline.retries import DEFAULT_RETRY_S, RETRY_ENV
from mtrain.data.loader import DataConfig
from mtrain.training.config import STEP_ROOM_S, DeepSpeedConfig, TrainConfig
from mtrain.training.resume import tell_converted, wait_for_conversion

REMOTE = "s3://bucket/dataset"


def config(path: str = REMOTE, timeout_s: int | None = None, retry_s: float | None = None):
    ds = DeepSpeedConfig() if timeout_s is None else DeepSpeedConfig(timeout_s=timeout_s)
    return TrainConfig(data=DataConfig(path=path, storage_retry_s=retry_s), deepspeed=ds)


def test_the_defaults_outlast_the_storage_budget_and_a_step(monkeypatch):
    monkeypatch.delenv(RETRY_ENV, raising=False)
    assert DeepSpeedConfig().timeout_s > DEFAULT_RETRY_S + STEP_ROOM_S
    config()


@pytest.mark.parametrize(
    ("timeout_s", "retry_s", "env", "budget"),
    [
        (600, None, None, "600 s"),  # the old default: equal to the storage budget
        (120, None, None, "600 s"),  # deepspeed=cpu against object storage
        (300, 200.0, None, "200 s"),
        (900, None, "1000", "1000 s"),
    ],
)
def test_a_collective_timeout_within_the_storage_budget_is_refused(
    monkeypatch, timeout_s, retry_s, env, budget
):
    if env is None:
        monkeypatch.delenv(RETRY_ENV, raising=False)
    else:
        monkeypatch.setenv(RETRY_ENV, env)
    with pytest.raises(ConfigError) as refused:
        config(timeout_s=timeout_s, retry_s=retry_s)
    message = str(refused.value)
    assert message.startswith(f"deepspeed.timeout_s={timeout_s} must exceed"), message
    assert "data.storage_retry_s" in message and f"{budget}) plus {STEP_ROOM_S} s" in message
    assert "\n" not in message


def test_the_refusal_names_a_timeout_that_passes(monkeypatch):
    monkeypatch.delenv(RETRY_ENV, raising=False)
    with pytest.raises(ConfigError) as refused:
        config(timeout_s=120, retry_s=60.0)
    fix = int(str(refused.value).split("set deepspeed.timeout_s=")[1].split()[0])
    config(timeout_s=fix, retry_s=60.0)
    with pytest.raises(ConfigError):
        config(timeout_s=fix - 1, retry_s=60.0)


def test_local_data_keeps_any_timeout(monkeypatch):
    monkeypatch.delenv(RETRY_ENV, raising=False)
    config(path="data/bach", timeout_s=20)  # a hang test's timeout, no object storage


# ---- waiting for rank 0's conversion ----------------------------------------------------------
def beating(path, stop: Event, every_s: float = 0.02) -> threading.Thread:
    """Rank 0's heartbeat thread: the file rewritten until ``stop``."""

    def run():
        while not stop.is_set():
            path.write_text(json.dumps({"time": time.time()}))
            time.sleep(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_wait_for_the_conversion_outlasts_the_silence_limit_while_rank_0_beats(tmp_path):
    outcome, beat, stop = tmp_path / "universal" / "step.converted", tmp_path / "rank0", Event()
    beating(beat, stop)
    tell_converted(outcome, "an earlier attempt", None)  # cut short before: not this one's word

    def convert():
        time.sleep(0.8)  # several times the silence limit
        tell_converted(outcome, "this attempt", "KeyError: 'param_shapes'")

    threading.Thread(target=convert, daemon=True).start()
    start = time.monotonic()
    failure = wait_for_conversion(outcome, "this attempt", beat, silent_s=0.2, poll_s=0.02)
    stop.set()
    assert failure == "KeyError: 'param_shapes'" and time.monotonic() - start >= 0.8
    assert json.loads(outcome.read_text()) == {"attempt": "this attempt", "failure": failure}


def test_a_wait_for_the_conversion_ends_once_rank_0_is_silent(tmp_path):
    beat, stop = tmp_path / "rank0", Event()
    beating(beat, stop)
    time.sleep(0.1)
    stop.set()  # rank 0 gone: its heartbeat no longer changes
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 0 stopped answering while converting"):
        wait_for_conversion(tmp_path / "never", "this attempt", beat, silent_s=0.3, poll_s=0.02)
    assert 0.25 <= time.monotonic() - start < 2
    with pytest.raises(RuntimeError, match="has not changed"):  # no heartbeat at all
        wait_for_conversion(tmp_path / "never", "x", tmp_path / "none", silent_s=0.1, poll_s=0.02)
