"""The layout of a training run's directory: the one place that spells its paths.

``model_config.json`` and ``tokenizer/`` (what an export needs besides the weights),
``checkpoints/step_00001000/`` (a damaged one moved aside: ``step_00001000.damaged``),
``metrics.jsonl``, ``wandb_run_id``, ``samples/step_00001000/``, ``export/`` and ``LOCK`` (who
trains in it now); old runs and tests read this layout, so it does not change.
"""

import re
from dataclasses import dataclass
from pathlib import Path

_STEP, _CHECKPOINTS, _MARKER = "step_", "checkpoints", "COMPLETE"
# Where a run directory's complete checkpoints are, in words for messages.
COMPLETE_CHECKPOINTS = f"{_CHECKPOINTS}/{_STEP}*/{_MARKER}"
_STEP_NAME = re.compile(rf"{_STEP}\d{{8}}")
# Run-time knobs that model_config.json (and an export's config.json, which copies it) held
# beside the model's shape while they were model keys: no part of the shape, dropped when read.
_RUN_TIME_KNOBS = ("activation_checkpointing", "compile")


def model_shape(recorded: dict) -> dict:
    """The model shape a ``model_config.json`` (or an export's config) records, without the
    run-time knobs older ones hold beside it: those runs still resume, those exports load."""
    return {key: value for key, value in recorded.items() if key not in _RUN_TIME_KNOBS}


def _step_name(step: int) -> str:
    return f"{_STEP}{step:08d}"


@dataclass
class CheckpointDir:
    """One checkpoint, ``checkpoints/step_00001000/``: DeepSpeed's files, a trainer state per
    rank, the probe batch's logits and, written last, the ``COMPLETE`` marker."""

    path: Path

    def __post_init__(self):
        self.path = Path(self.path)

    @property
    def marker(self) -> Path:
        return self.path / _MARKER

    @property
    def complete(self) -> bool:
        return self.marker.exists()

    @property
    def named_as_step(self) -> bool:
        """Named like a checkpoint (complete or not), not like a run directory."""
        return self.path.name.startswith(_STEP)

    @property
    def probe(self) -> Path:
        return self.path / "probe.pt"

    def trainer_state(self, rank: int) -> Path:
        return self.path / f"trainer_state_rank{rank}.pt"

    @property
    def damaged(self) -> Path:
        """Where a checkpoint that fails verification is moved aside (never deleted); a
        number is added when that name is taken."""
        aside = self.path.with_name(f"{self.path.name}.damaged")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.damaged{n}")
        return aside

    @property
    def export(self) -> Path:
        """Where an export of this checkpoint alone goes."""
        return self.path / "export"

    @property
    def universal(self) -> Path:
        """Where a resume on another number of ranks converts it to DeepSpeed's universal
        (world-size-free) layout, removed once loaded; outside ``checkpoints/``, whose
        directories are all checkpoints."""
        return self.run.root / "universal" / self.path.name

    @property
    def converted(self) -> Path:
        """Rank 0's word that the conversion to ``universal`` ended (the attempt, the failure or
        none), for the ranks that wait for it; removed with it."""
        return self.universal.with_name(f"{self.path.name}.converted")

    @property
    def run(self) -> "RunDir":
        return RunDir(self.path.parent.parent)


@dataclass
class RunDir:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    @property
    def model_config(self) -> Path:
        """The model shape with its vocabulary size, as JSON."""
        return self.root / "model_config.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def best(self) -> Path:
        """The validation record of the run: its first and best val loss, as JSON."""
        return self.root / "best.json"

    @property
    def adapter_base(self) -> Path:
        """The exported model an adapter run trains over (path and weights digest), as JSON."""
        return self.root / "adapter_base.json"

    @property
    def train_config(self) -> Path:
        """The training config as Hydra composed it (conf/train.yaml's hydra.output_subdir)."""
        return self.root / "hydra" / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / _CHECKPOINTS

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.checkpoints / _step_name(step))

    def checkpoint_dirs(self) -> list[CheckpointDir]:
        """Every checkpoint directory, complete or not, oldest first (not those moved aside)."""
        paths = sorted(
            p
            for p in self.checkpoints.glob(f"{_STEP}*")
            if _STEP_NAME.fullmatch(p.name) and p.is_dir()
        )
        return [CheckpointDir(p) for p in paths]

    @property
    def metrics(self) -> Path:
        """One JSON line of metrics per optimizer step."""
        return self.root / "metrics.jsonl"

    @property
    def lock(self) -> Path:
        """Who trains in this run directory now (``run_lock.RunLock``)."""
        return self.root / "LOCK"

    def heartbeat(self, rank: int) -> Path:
        """Rank ``rank``'s heartbeat file (``heartbeats.Heartbeat``): who stopped answering."""
        return self.root / "heartbeat" / f"rank{rank}"

    @property
    def memory_kill(self) -> Path:
        """The last rank the kernel killed for memory, as its survivors saw it: a requeued
        attempt takes the memory plan's advice (``memory_plan.plan_training``)."""
        return self.root / "heartbeat" / "killed_for_memory.json"

    @property
    def wandb_run_id(self) -> Path:
        return self.root / "wandb_run_id"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def samples_at(self, step: int) -> Path:
        return self.samples / _step_name(step)

    @property
    def export(self) -> Path:
        """Where the newest checkpoint is exported to when a run directory is given."""
        return self.root / "export"
