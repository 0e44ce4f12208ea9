"""Resuming a run: whether its checkpoint fits this config, and loading it on as many ranks or
converted for another number."""

import argparse
import contextlib
import io
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data_pipeline.errors import InputError
from mtrain.distributed import collectives, heartbeats
from mtrain.runs.checkpoint_files import file_names, latest_complete, latest_intact, world_size_of
from mtrain.runs.run_dir import CheckpointDir, RunDir, model_shape
from mtrain.training.adapters import has_frozen
from mtrain.training.rng_state import PICKLED_RNG_TYPES, seed_everything, set_rng_state

log = logging.getLogger(__name__)

# A rank waiting for rank 0's conversion gives up when rank 0's heartbeat (rewritten every
# second, by a thread) has not changed for this long: long enough for a file system's caches.
RANK_0_SILENT_S = 120.0


class Resumed(NamedTuple):
    ckpt: CheckpointDir | None
    client: dict
    # This rank's trainer state; on another number of ranks, every old rank's (without RNG).
    rank_states: list[dict]
    skipped: list[str]
    # How many ranks saved the checkpoint.
    saved_by: int = 0
    # Saved by another number of ranks: its state converted for these (False: an exact resume),
    # and what the conversion did, in words.
    resharded: bool = False
    conversion: str = ""


def resume_latest(engine, run: RunDir, seed: int) -> Resumed:
    """The newest intact checkpoint of ``run``, loaded into the engine, with its client state
    and this rank's state (None and empty when there is none), and the damaged ones skipped.

    A checkpoint resumes on another number of ranks too: its partitioned state is converted to
    DeepSpeed's universal layout (one file per parameter and state, world-size-free) and loaded
    from there, and the data loader deals anew what the old ranks' positions left of each
    epoch."""
    ckpt, skipped = latest_intact(run, move_aside=True)
    if ckpt is None:
        return Resumed(None, {}, [], skipped)
    saved_by = world_size_of(ckpt)
    if saved_by == collectives.world_size():
        client, rank_state = load(engine, ckpt)
        return Resumed(ckpt, client, [rank_state], skipped, saved_by)
    client, conversion = load_resharded(engine, ckpt)
    states = [load_trainer_state(ckpt.trainer_state(r)) for r in range(saved_by)]
    # The old ranks' RNG streams do not map onto the new ranks: each draws a fresh one,
    # from the seed, the step and its rank (the same on a second resume from here).
    fresh = np.random.SeedSequence([seed, client["step"], collectives.group_rank()])
    seed_everything(int(fresh.generate_state(1)[0]))
    states = [{k: v for k, v in s.items() if k != "rng"} for s in states]
    return Resumed(ckpt, client, states, skipped, saved_by, True, conversion)


def load(engine, ckpt: CheckpointDir) -> tuple[dict, dict]:
    """Restores model, optimizer and scheduler into the engine from a checkpoint saved by as
    many ranks; returns the client state and this rank's trainer state (RNG restored
    already)."""
    _, client_state = engine.load_checkpoint(
        str(ckpt.path.parent),
        tag=ckpt.path.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=not has_frozen(engine.module),  # a frozen base was not saved
    )
    rank_state = load_trainer_state(ckpt.trainer_state(engine.global_rank))
    set_rng_state(rank_state.pop("rng"))
    return client_state or {}, rank_state


def load_resharded(engine, ckpt: CheckpointDir) -> tuple[dict, str]:
    """Restores, like ``load``, a checkpoint that another number of ranks saved; returns the
    client state and what was done, in words. Partitioned state (ZeRO-1/2/3, or ZeRO-0's bf16
    optimizer) is converted by rank 0 to DeepSpeed's universal layout (``ds_to_universal``,
    one parameter at a time: peak memory is one old rank's optimizer file plus one parameter)
    and every rank loads its new partition from there; ZeRO-0 without it saved the whole state
    once and loads as it is. Collective."""
    saved_by = world_size_of(ckpt)
    if not any(n.endswith("optim_states.pt") and "/" not in n for n in file_names(ckpt)):
        _, client_state = engine.load_checkpoint(
            str(ckpt.path.parent),
            tag=ckpt.path.name,
            load_lr_scheduler_states=True,
            load_module_strict=not has_frozen(engine.module),
        )
        return client_state or {}, f"whole ZeRO-0 state of {saved_by} rank(s), nothing to convert"
    universal, start, ranks = ckpt.universal, time.monotonic(), collectives.world_size()
    # The conversion of a large model may outlast deepspeed.timeout_s, so no collective waits
    # on it: the other ranks watch the file system for rank 0's word, which names this attempt
    # (one an attempt cut short left behind is not it).
    attempt = collectives.from_rank_0(uuid.uuid4().hex)
    with heartbeats.no_stall_while():
        if collectives.group_rank() == 0:
            log.info("converting %s, saved by %d rank(s), for %d", ckpt.path, saved_by, ranks)
            failure = convert_to_universal(ckpt, universal)
            tell_converted(ckpt.converted, attempt, failure)
        else:
            failure = wait_for_conversion(ckpt.converted, attempt, ckpt.run.heartbeat(0))
    if failure is not None:
        raise RuntimeError(f"cannot convert {ckpt.path} for {ranks} ranks: {failure}")
    converted_s = time.monotonic() - start
    # DeepSpeed reads this switch of its config at load time only; it is set for this one load.
    engine._config.load_universal_checkpoint = True
    try:
        _, client_state = engine.load_checkpoint(
            str(universal.parent),
            tag=universal.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not has_frozen(engine.module),
        )
    finally:
        engine._config.load_universal_checkpoint = False
    collectives.barrier()
    if collectives.group_rank() == 0:
        shutil.rmtree(universal.parent, ignore_errors=True)
    stage = engine.zero_optimization_stage()
    return client_state or {}, (
        f"converted ZeRO-{stage} state of {saved_by} rank(s) to the universal layout in "
        f"{converted_s:.1f} s, loaded in {time.monotonic() - start - converted_s:.1f} s"
    )


def tell_converted(outcome: Path, attempt: str, failure: str | None) -> None:
    """Rank 0's word that its conversion ended, written whole (renamed into place)."""
    outcome.parent.mkdir(parents=True, exist_ok=True)
    partial = outcome.with_suffix(".partial")
    partial.write_text(json.dumps({"attempt": attempt, "failure": failure}))
    partial.replace(outcome)


def wait_for_conversion(
    outcome: Path,
    attempt: str,
    rank_0_beat: Path,
    silent_s: float = RANK_0_SILENT_S,
    poll_s: float = 1.0,
) -> str | None:
    """Waits for rank 0's word on ``attempt`` (``tell_converted``) and returns its failure
    (None: converted). However long a conversion takes, rank 0 beats every second meanwhile:
    a heartbeat unchanged for ``silent_s`` is a rank 0 gone or frozen, and the wait ends."""
    started = heard = said = time.monotonic()
    last_beat = None
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            told = json.loads(outcome.read_text())
            if told["attempt"] == attempt:
                return told["failure"]
        now = time.monotonic()
        try:
            beat = rank_0_beat.read_text()
        except OSError:
            beat = None
        if beat is not None and beat != last_beat:
            last_beat, heard = beat, now
        elif now - heard > silent_s:
            raise RuntimeError(
                f"rank 0 stopped answering while converting the checkpoint: its heartbeat "
                f"{rank_0_beat} has not changed for {now - heard:.0f} s (waited "
                f"{now - started:.0f} s); restart the job"
            )
        if now - said >= 60:
            log.info("waiting for rank 0 to convert the checkpoint (%.0f s)", now - started)
            said = now
        time.sleep(poll_s)


def convert_to_universal(ckpt: CheckpointDir, universal: Path) -> str | None:
    """Runs DeepSpeed's converter in this process, its progress bars kept out of the logs;
    returns why it failed (None: it did not)."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(universal.parent, ignore_errors=True)  # a conversion cut short before
    args = argparse.Namespace(
        input_folder=str(ckpt.path),
        output_folder=str(universal),
        # One process: the rank's own (worker pools would fork a process holding the group).
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # ZeRO-1/2 checkpoints lack the (version-only, without tensor parallelism) universal
        # info the converter asks for; ZeRO-3's path does not read it.
        inject_missing_state=True,
    )
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            ds_to_universal.main(args)
    except Exception as exc:  # said on every rank, which all stop
        log.debug("ds_to_universal said:\n%s", said.getvalue())
        return f"{type(exc).__name__}: {exc}"
    return None


def load_trainer_state(path: Path) -> dict:
    """A rank's trainer state, unpickled only as plain data (numpy's RNG types allowed for
    checkpoints saved before the state was stored as lists)."""
    with torch.serialization.safe_globals(PICKLED_RNG_TYPES):
        return torch.load(path, weights_only=True)


def check_resumable(run: RunDir, model: dict, tokenizer_hash: str) -> bool:
    """Whether ``run`` has a checkpoint to resume (False: a fresh run); refuses with an
    InputError, naming both values, a run saved with another model shape or tokenizer. Another
    number of ranks is no reason: ``Checkpointer.resume`` converts the state for them (and
    ``batch_sizes`` has checked already that they keep the global batch). Reads only: nothing in
    the run directory changes."""
    ckpt = latest_complete(run, quiet=True)
    if ckpt is None:
        return False
    problems = []
    if run.model_config.exists():
        saved = model_shape(json.loads(run.model_config.read_text()))
        ours = json.loads(json.dumps(model))
        for key in sorted(set(saved) | set(ours)):
            if saved.get(key) != ours.get(key):
                problems.append(f"model.{key}: run {saved.get(key)!r}, now {ours.get(key)!r}")
    artifact = run.tokenizer / "artifact.json"
    if artifact.exists() and (saved := json.loads(artifact.read_text())["hash"]) != tokenizer_hash:
        problems.append(f"tokenizer: run {saved[:12]}, this dataset's {tokenizer_hash[:12]}")
    if problems:
        raise InputError(
            f"run_dir {run.root} cannot resume from {ckpt.path.name} with this config: "
            f"{'; '.join(problems)}; give a new run_dir=, or fine-tune from an export of this run "
            f"(python -m mtrain.export checkpoint={run.root} output=<dir>, then init_from=<dir>)"
        )
    return True
