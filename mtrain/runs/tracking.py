"""Weights & Biases, from rank 0 only; offline unless asked, so it works with no network.

The run id is kept in the run directory (and in every checkpoint), so a resumed or requeued job
continues the same wandb run; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads later.
"""

import atexit
import logging
import os
import queue
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from mtrain.runs.run_dir import RunDir

log = logging.getLogger(__name__)
# Keys whose values must never reach wandb, whatever a user puts in the environment.
# Words of a key name that make its value a secret: ``hf_token``, ``aws_secret_access_key``,
# ``apiKey``; whole words only, so ``tokenizer``, ``tokens_per_s`` and ``global_batch_tokens``,
# which runs are compared by, stay readable.
_SECRET_WORDS = {"key", "secret", "token", "password", "passwd", "credential", "credentials"}


class WandbMode(Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "mtrain"
    entity: str | None = None
    # Runs of one experiment share a group; the overrides become tags.
    group: str | None = None
    tags: list[str] = field(default_factory=list)


def names_a_secret(key: str) -> bool:
    """Whether a config key's name says its value is a credential."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower())
    return not _SECRET_WORDS.isdisjoint(words)


def scrub(config: dict) -> dict:
    """A copy of the config without anything that looks like a credential."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out[k] = scrub(v)
        elif names_a_secret(k):
            out[k] = "<redacted>"
        else:
            out[k] = v
    return out


class Tracker:
    def __init__(
        self,
        cfg: LoggerConfig,
        run_name: str,
        run_dir: RunDir,
        config: dict,
        run_id: str | None,
        overrides: list[str],
    ):
        self.run = None
        if cfg.mode == WandbMode.disabled:
            return
        import wandb

        id_file = run_dir.wandb_run_id
        if run_id is None and id_file.exists():
            run_id = id_file.read_text().strip()
        run_id = run_id or secrets.token_hex(4)  # wandb's id format: 8 [0-9a-z]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir.root),
            mode=cfg.mode.value,
            group=cfg.group or run_name.rsplit("-", 1)[0],
            tags=(cfg.tags or [o[:64] for o in overrides if "=" in o][:20]),
            config=scrub(config),
        )
        log.info("wandb run %s (%s) in %s", run_id, cfg.mode.value, self.run.dir)
        # wandb serialises each row and hands it to its service in the caller's thread: a
        # thread of the tracker's does it, off the step.
        self._rows: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send, name="wandb-log", daemon=True)
        self._sender.start()
        # A run that ends without finish() (preempted, failed) still logs what it queued:
        # before wandb's own exit hook, registered earlier (atexit runs hooks last in, first).
        atexit.register(self._flush)

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, metrics: dict, step: int) -> None:
        """Queues a row (a copy: the caller may go on changing its dict); rows reach wandb in
        the order logged."""
        if self.run is not None:
            self._rows.put(({k: v for k, v in metrics.items() if v is not None}, step))

    def _send(self) -> None:
        while (row := self._rows.get()) is not None:
            try:
                self.run.log(row[0], step=row[1])
            except Exception:  # a row wandb refuses must not stop the rows after it
                log.exception("wandb could not log step %d", row[1])

    def _flush(self) -> None:
        """Waits until every queued row is with wandb."""
        if self._sender.is_alive():
            self._rows.put(None)
            self._sender.join()

    def finish(self) -> None:
        if self.run is not None:
            self._flush()
            self.run.finish()


def table(rows: list[dict]):
    """A wandb table of rows that share their keys (the first row's keys are the columns)."""
    import wandb

    return wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])


def log_report(
    cfg: LoggerConfig,
    name: str,
    out: Path,
    config: dict,
    overrides: list[str],
    summary: dict,
    media: Callable[[], dict] = dict,
) -> None:
    """A finished job's report (generate, evaluate) as one wandb run named ``name`` in ``out``:
    ``summary`` goes to the run's summary, ``media()`` (tables, images, audio; built only when
    wandb is on) is logged once."""
    # The job's output directory keeps its wandb files and run id as a run directory does.
    tracker = Tracker(cfg, name, RunDir(out), config, None, overrides)
    if tracker.run is None:
        return
    logged = media()
    if logged:
        tracker.run.log(logged)
    tracker.run.summary.update(summary)
    tracker.finish()
