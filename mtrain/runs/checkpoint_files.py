"""A checkpoint's files: complete (its marker, written last) and intact (each file's size and
CRC-32 as the marker records them)."""

import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path

from mtrain.distributed import collectives
from mtrain.runs.run_dir import CheckpointDir, RunDir

log = logging.getLogger(__name__)

CHUNK = 8 << 20


def complete_newest_first(run: RunDir, quiet: bool = False) -> Iterator[CheckpointDir]:
    """The checkpoints with their marker, newest first; incomplete ones met on the way are
    named (unless ``quiet``) and skipped."""
    for ckpt in reversed(run.checkpoint_dirs()):
        if ckpt.complete:
            yield ckpt
        elif not quiet:
            log.warning(
                "ignoring checkpoint %s: no %s marker (the run stopped while saving it)",
                ckpt.path,
                ckpt.marker.name,
            )


def latest_complete(run: RunDir, quiet: bool = False) -> CheckpointDir | None:
    """The newest checkpoint with its marker; incomplete newer ones are named and skipped."""
    return next(complete_newest_first(run, quiet), None)


def crc32(path: Path) -> str:
    """CRC-32 because it is cheap (several times SHA-256's and BLAKE2b's rate: bench/README.md)
    and the threat is bit rot and truncation, not an adversary."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def _my_share(names: list[str], sizes: list[int]) -> list[int]:
    """The indices of the files this rank checksums: the largest first, each to the rank with
    the fewest bytes so far (the same split on every rank)."""
    me, assigned = collectives.group_rank(), [0] * collectives.world_size()
    mine = []
    for i in sorted(range(len(names)), key=lambda i: (-sizes[i], names[i])):
        rank = assigned.index(min(assigned))
        assigned[rank] += sizes[i]
        if rank == me:
            mine.append(i)
    return mine


def checksums(ckpt: CheckpointDir) -> dict[str, dict]:
    """Size and CRC-32 of every file in the checkpoint (but the marker), by relative name;
    collective: the files are shared out among the ranks by size (a shared file system is
    assumed) and rank 0 gathers the sums, so no rank reads the whole checkpoint."""
    files = sorted(p for p in ckpt.path.rglob("*") if p.is_file() and p != ckpt.marker)
    names = [p.relative_to(ckpt.path).as_posix() for p in files]
    sizes = [p.stat().st_size for p in files]
    part = {names[i]: {"size": sizes[i], "crc32": crc32(files[i])} for i in _my_share(names, sizes)}
    merged = {name: entry for p in collectives.gather_objects(part) for name, entry in p.items()}
    return dict(sorted(merged.items()))


def recorded(ckpt: CheckpointDir) -> dict[str, dict] | None:
    """The files the marker lists; None for a marker written before checksums were."""
    return json.loads(ckpt.marker.read_text()).get("files")


def damage(ckpt: CheckpointDir) -> list[str] | None:
    """What is wrong with a complete checkpoint's files ([] when intact; None when its marker
    has no checksums); collective: each rank checks its share, every rank gets the whole list."""
    files = recorded(ckpt)
    if files is None:
        return None
    names = sorted(files)
    problems = []
    for i in _my_share(names, [files[n]["size"] for n in names]):
        name, want = names[i], files[names[i]]
        path = ckpt.path / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{name} has {size} bytes, the marker says {want['size']}")
        elif (got := crc32(path)) != want["crc32"]:
            problems.append(f"{name} has CRC-32 {got}, the marker says {want['crc32']}")
    return sorted(p for part in collectives.gather_objects(problems) for p in part)


def latest_intact(run: RunDir, move_aside: bool) -> tuple[CheckpointDir | None, list[str]]:
    """The newest complete checkpoint whose files match its marker, and what was skipped on
    the way (``name: why``). ``move_aside``: rank 0 renames each damaged one
    (``step_*.damaged``), so a requeue does not meet it again; collective when there are ranks.
    Rank 0 lists the checkpoints and the others take its list: a rank's own listing of a shared
    file system may be stale, and every rank must check the same ones in the same order."""
    skipped = []
    names = None
    if collectives.group_rank() == 0:
        names = [ckpt.path.name for ckpt in complete_newest_first(run)]
    for ckpt in (CheckpointDir(run.checkpoints / name) for name in collectives.from_rank_0(names)):
        problems = damage(ckpt)
        if problems is None:
            log.info("%s has no checksums (saved by an older mtrain): not verified", ckpt.path)
            return ckpt, skipped
        if not problems:
            return ckpt, skipped
        why = "; ".join(problems)
        if move_aside:
            if collectives.group_rank() == 0:
                aside = ckpt.damaged
                ckpt.path.rename(aside)
                log.error("checkpoint %s is damaged (%s): moved aside to %s", ckpt.path, why, aside)
            collectives.barrier()
        else:
            log.warning("skipping damaged checkpoint %s: %s", ckpt.path, why)
        skipped.append(f"{ckpt.path.name}: {why}")
    return None, skipped


def file_names(ckpt: CheckpointDir) -> list[str]:
    """The checkpoint's files as its marker lists them (the same on every rank, however stale
    a rank's view of the directory), or as listed for a marker without checksums."""
    return list(recorded(ckpt) or (p.name for p in ckpt.path.iterdir()))


def world_size_of(ckpt: CheckpointDir) -> int:
    """How many ranks saved the checkpoint: its trainer states."""
    return sum(1 for n in file_names(ckpt) if n.startswith("trainer_state_rank"))


def size_of(ckpt: CheckpointDir) -> int:
    return sum(p.stat().st_size for p in ckpt.path.rglob("*") if p.is_file())
