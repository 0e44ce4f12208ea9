"""A chaos run: one training supervised as a Slurm requeue supervises it (started again
whenever it exits), hit by a seeded schedule of faults, then compared with the same training
undisturbed: every step logged once, and the same losses, weights and Adam moments bit for bit.

Each fault says how it was detected (by the training itself, from its own output) and how
many steps were computed twice because of it. Used by ``bench/chaos.py`` (the long run) and
``tests/e2e/test_chaos.py`` (a short one).
"""

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import psutil
import torch

from data_pipeline import storage
from support import memory_cgroup
from support.fault_proxy import FaultProxy
from support.s3_server import moto_server, patched_environ
from support.trainings import kill_tree, launch, losses, train_args

KINDS = (
    "kill_rank",  # kill -9 of one rank
    "kill_launcher",  # kill -9 of torchrun alone
    "stop_rank",  # SIGSTOP of one rank
    "preempt",  # SIGUSR1 to every rank, as Slurm's --signal
    "damage_checkpoint",  # bytes of the newest complete checkpoint changed between attempts
    "full_disk",  # the run's file system full during a save
    "other_world_size",  # a restart on one rank, then back on two
    "oom_kill",  # rank 1's cgroup limit lowered until the kernel kills it
    "storage_refuse",  # the object storage the shards are read from refuses connections
    "storage_reset",  # ... and resets them mid-transfer
)
# The run reads its shards from a loopback moto_server through the tests' fault proxy when
# the schedule holds one of these; an outage lasts until a rank has retried a read in it.
STORAGE = {"storage_refuse": ("refuse", {}), "storage_reset": ("reset", {"after": 4000})}
STORAGE_RETRY_S = 60  # the reads' retry budget: well over an outage
STALE_S = 5.0  # a stopped rank's heartbeat older than this is detected


@dataclass
class Fault:
    kind: str
    at_step: int
    last_step: int = 0  # the last step logged before it
    resumed_at: int | None = None  # where the next attempt that trained resumed
    detected: str = ""

    @property
    def recomputed(self) -> int | None:
        return None if self.resumed_at is None else self.last_step - self.resumed_at


@dataclass
class ChaosConfig:
    steps: int = 40
    save_every: int = 4
    faults: int = 20
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    extra: tuple[str, ...] = ()


def schedule(cfg: ChaosConfig) -> list[str]:
    """Every kind once (in a seeded order), then seeded picks, ``cfg.faults`` in all."""
    rng = random.Random(cfg.seed)
    kinds = list(cfg.kinds)
    rng.shuffle(kinds)
    return (kinds + [rng.choice(cfg.kinds) for _ in range(cfg.faults)])[: cfg.faults]


def run_args(dataset: Path | str, run_dir: Path, cfg: ChaosConfig) -> list[str]:
    storage = (
        # The collectives wait for a rank retrying a read (as mtrain's config requires).
        [f"data.storage_retry_s={STORAGE_RETRY_S}", f"deepspeed.timeout_s={STORAGE_RETRY_S + 121}"]
        if STORAGE.keys() & set(cfg.kinds)
        else ["deepspeed.timeout_s=60"]
    )
    return train_args(
        dataset,
        run_dir,
        f"trainer.max_steps={cfg.steps}",
        f"trainer.save_every={cfg.save_every}",
        "trainer.keep_last=2",
        "data.num_workers=0",
        "logger.mode=disabled",
        *storage,
        # A rank in a tight cgroup plans with it; the run goes on regardless.
        "deepspeed.check_memory=false",
        *cfg.extra,
    )


def ranks_of(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training ranks torchrun started, by rank."""
    found = {}
    for child in psutil.Process(proc.pid).children():
        with contextlib.suppress(psutil.Error):
            rank = child.environ().get("RANK")
            if rank is not None:
                found[int(rank)] = child
    return found


def last_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (OSError, ValueError):
        return 0


class Supervisor:
    """Starts the training again whenever it exits, until it finishes; injects the faults."""

    def __init__(self, dataset: Path, root: Path, cfg: ChaosConfig, say=print):
        self.dataset, self.root, self.cfg, self.say = dataset, root, cfg, say
        self.rng = random.Random(cfg.seed + 1)
        self.disk = root / "disk"
        self.run_dir = self.disk / "run"
        self.cgroup = None
        self.faults: list[Fault] = []
        self.previous: Fault | None = None  # the fault the running attempt follows
        self.outputs: list[str] = []
        self.data: Path | str = dataset  # s3:// through the proxy with storage faults
        self.proxy: FaultProxy | None = None
        self._stack = contextlib.ExitStack()
        self._log: Path | None = None  # the running attempt's output, readable as it runs

    # ---- the run ------------------------------------------------------------------------
    def __enter__(self):
        self.disk.mkdir(parents=True, exist_ok=True)
        if "full_disk" in self.cfg.kinds:
            made = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(self.disk)],
                capture_output=True,
                text=True,
            )
            if made.returncode != 0:
                raise RuntimeError(f"cannot mount a tmpfs: {made.stderr.strip()}")
        if "oom_kill" in self.cfg.kinds:
            self.cgroup, why = memory_cgroup.make("mtrain-chaos")
            if self.cgroup is None:
                raise RuntimeError(why)
            memory_cgroup.set_limit(self.cgroup, BASE_LIMIT)
            os.environ[memory_cgroup.PROCS_ENV] = str(memory_cgroup.procs_file(self.cgroup))
            os.environ[memory_cgroup.RANK_ENV] = "1"
        if STORAGE.keys() & set(self.cfg.kinds):
            self._serve_shards()
        return self

    def _serve_shards(self) -> None:
        """The dataset uploaded to a moto_server, read by the run through a FaultProxy: short
        timeouts and 4 KB ranged reads, so that an outage meets a read in flight or the
        next one."""
        direct = self._stack.enter_context(moto_server())
        self.proxy = FaultProxy(int(direct["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
        self._stack.callback(self.proxy.close)
        s3 = boto3.client(
            "s3",
            endpoint_url=direct["AWS_ENDPOINT_URL"],
            aws_access_key_id=direct["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=direct["AWS_SECRET_ACCESS_KEY"],
            region_name=direct["AWS_DEFAULT_REGION"],
        )
        s3.create_bucket(Bucket=BUCKET)
        for path in sorted(p for p in Path(self.dataset).rglob("*") if p.is_file()):
            s3.upload_file(str(path), BUCKET, f"ds/{path.relative_to(self.dataset)}")
        client = {**direct, "AWS_ENDPOINT_URL": self.proxy.endpoint}
        client |= {storage.TIMEOUT_ENV: "2", storage.BLOCK_ENV: "4096"}
        self._stack.enter_context(patched_environ(client))
        self.data = f"s3://{BUCKET}/ds"

    def __exit__(self, *exc):
        self._stack.close()
        if self.cgroup is not None:
            memory_cgroup.remove(self.cgroup)
            os.environ.pop(memory_cgroup.PROCS_ENV, None)
        if "full_disk" in self.cfg.kinds:
            subprocess.run(["umount", "-l", str(self.disk)], check=False)

    def start(self, ranks: int = 2) -> subprocess.Popen:
        args = run_args(self.data, self.run_dir, self.cfg)
        if self.cgroup is not None:
            args = ["tests/support/memory_cgroup.py", *args[1:]]
        self._log = self.root / f"attempt-{len(self.outputs) + 1:02d}.log"
        with self._log.open("w") as log:
            return launch(args, ranks=ranks, torchrun=True, stdout=log)

    def output(self) -> str:
        """The running (or last) attempt's output so far."""
        return self._log.read_text(errors="replace") if self._log else ""

    def finish(self, proc: subprocess.Popen, timeout: float = 120) -> str:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            proc.wait()
        out = self.output()
        self.outputs.append(out)
        self._learn(out)
        return out

    def _learn(self, out: str) -> None:
        """From the output of the attempt after a fault: where it resumed, and a damaged
        checkpoint found."""
        fault = self.previous
        if fault is None:
            return
        resumed = re.search(r"resumed from \S+ at step (\d+)", out)
        if fault.resumed_at is None and resumed:
            fault.resumed_at = int(resumed.group(1))
        elif fault.resumed_at is None and "training " in out:
            fault.resumed_at = 0
        if fault.kind == "damage_checkpoint" and "moved aside" not in fault.detected:
            fault.detected += detection("damage_checkpoint", out)

    def run(self) -> list[Fault]:
        """The whole chaos run: each fault once its step is reached, then to the end."""
        pending, proc = schedule(self.cfg), None
        while True:
            if pending and pending[0] in STORAGE and proc is None:
                # The requeued job meets the outage as it starts reading its shards.
                fault = Fault(pending.pop(0), last_step(self.run_dir))
                self.faults.append(fault)
                fault.last_step = fault.at_step
                proc = self._outage(None, fault)
                continue
            proc = proc or self.start()
            if not pending:
                out = self.finish(proc, timeout=900)
                if proc.returncode == 0 and last_step(self.run_dir) >= self.cfg.steps:
                    return self.faults
                raise AssertionError(f"the last attempt failed:\n{out[-4000:]}")
            kind = pending.pop(0)
            # After the first checkpoint: a fault before it only restarts from nothing.
            at = max(last_step(self.run_dir) + self.rng.randint(1, 3), self.cfg.save_every + 1)
            fault = Fault(kind, at)
            self.faults.append(fault)
            proc = self._inject(proc, fault)

    def _wait_step(self, proc: subprocess.Popen, step: int, timeout: float = 240) -> bool:
        deadline = time.monotonic() + timeout
        while last_step(self.run_dir) < step:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _wait_row_after(self, proc: subprocess.Popen, since: float, timeout: float = 240) -> bool:
        """Waits until the attempt has logged a step of its own (a row stamped after
        ``since``; rows of earlier attempts stay until it resumes)."""
        deadline = time.monotonic() + timeout
        metrics = self.run_dir / "metrics.jsonl"
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                rows = metrics.read_text().splitlines()
                if rows and json.loads(rows[-1])["time"] > since:
                    return True
            time.sleep(0.05)
        return False

    # ---- the faults ---------------------------------------------------------------------
    def _inject(self, proc: subprocess.Popen, fault: Fault) -> subprocess.Popen | None:
        """Injects ``fault`` once its step is logged (a restart on one rank is made and ended
        here too: ``_one_rank_and_back``); returns the attempt where it rides the fault out
        (a storage outage), else None (the next attempt is to start)."""
        if fault.kind == "full_disk":
            self._fill_disk_before(fault)
        if not self._wait_step(proc, fault.at_step):
            out = self.finish(proc)
            fault.last_step = last_step(self.run_dir)
            fault.detected = detection(fault.kind, out) or "the attempt ended before the fault"
            self.previous = fault
            self._after(fault)
            return None
        fault.last_step = last_step(self.run_dir)
        if fault.kind in STORAGE:
            return self._outage(proc, fault)
        ranks = ranks_of(proc)
        victim = self.rng.choice(sorted(ranks))
        if fault.kind == "kill_rank":
            ranks[victim].kill()
        elif fault.kind == "kill_launcher":
            os.kill(proc.pid, signal.SIGKILL)
            procs = list(ranks.values())
            _, alive = psutil.wait_procs(procs, timeout=30)
            fault.detected = (
                "the ranks died with their launcher (PR_SET_PDEATHSIG)"
                if not alive
                else f"{len(alive)} rank(s) outlived their launcher"
            )
        elif fault.kind == "stop_rank":
            ranks[victim].send_signal(signal.SIGSTOP)
            beat = self.run_dir / "heartbeat" / f"rank{victim}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and heartbeat_age(beat) < STALE_S:
                time.sleep(0.2)
            fault.detected = f"rank {victim}'s heartbeat stale for {heartbeat_age(beat):.0f} s"
            kill_tree(proc)
        elif fault.kind == "preempt":
            for rank in ranks.values():
                rank.send_signal(signal.SIGUSR1)
        elif fault.kind in ("damage_checkpoint", "other_world_size"):
            kill_tree(proc)
        elif fault.kind == "oom_kill":
            self._squeeze(proc)
        out = self.finish(proc)
        fault.last_step = max(fault.last_step, last_step(self.run_dir))
        fault.detected = fault.detected or detection(fault.kind, out) or "not seen"
        self.previous = fault
        self._after(fault)
        if fault.kind == "other_world_size":
            self._one_rank_and_back(fault)
        return None

    def _outage(self, proc: subprocess.Popen | None, fault: Fault) -> subprocess.Popen | None:
        """The storage refuses (or resets) connections until a rank has retried a read in
        the outage and a second more, at most ``OUTAGE_S`` (a training reads a shard now and
        then), then serves again; with no attempt running, the next one starts in it (and
        reads at once). Detected by the ranks' own retry warnings; the attempt goes on (no
        step recomputed) unless it ended, which would be a failure to ride the outage out."""
        mode, settings = STORAGE[fault.kind]
        self.proxy.set(mode, **settings)
        longest = OUTAGE_S
        if proc is None:
            proc, longest = self.start(), OUTAGE_S + 120  # the start's imports come first
        seen = len(self.output())
        start = time.monotonic()
        try:
            while time.monotonic() - start < longest and proc.poll() is None:
                if RETRY_SIGN in self.output()[seen:]:
                    time.sleep(1.0)
                    break
                time.sleep(0.1)
        finally:
            self.proxy.set("pass")
        outage_s = time.monotonic() - start
        went_on = self._wait_step(proc, last_step(self.run_dir) + 1)
        said = [x for x in self.output()[seen:].splitlines() if RETRY_SIGN in x]
        fault.detected = f"{len(said)} read(s) retried in a {outage_s:.1f} s outage: " + (
            said[0].split("] - ")[-1][:150] if said else "no read met it"
        )
        if went_on:
            fault.resumed_at = fault.last_step  # the same attempt: nothing recomputed
            return proc
        out = self.finish(proc)
        fault.detected += f"; the attempt ended: {out.strip().splitlines()[-1][:100]}"
        self.previous = fault
        return None

    def _after(self, fault: Fault) -> None:
        if fault.kind == "damage_checkpoint":
            newest = newest_complete(self.run_dir)
            if newest is not None:
                biggest = max((p for p in newest.rglob("*") if p.is_file()), key=file_size)
                data = bytearray(biggest.read_bytes())
                data[len(data) // 2] ^= 0xFF
                biggest.write_bytes(bytes(data))
                fault.detected = f"{newest.name}/{biggest.name} changed; "
        if fault.kind == "full_disk":
            resize(self.disk, 256 << 20)
        if fault.kind == "oom_kill" and self.cgroup is not None:
            memory_cgroup.set_limit(self.cgroup, BASE_LIMIT)

    def _fill_disk_before(self, fault: Fault) -> None:
        """Shrinks the file system to what is used and half a checkpoint: the next save
        fails for want of space."""
        newest = newest_complete(self.run_dir)
        size = sum(file_size(p) for p in newest.rglob("*")) if newest else 4 << 20
        used = (os.statvfs(self.disk).f_blocks - os.statvfs(self.disk).f_bfree) * os.statvfs(
            self.disk
        ).f_frsize
        resize(self.disk, used + size // 2)

    def _squeeze(self, proc: subprocess.Popen) -> None:
        """Lowers rank 1's cgroup limit to what it uses now, again and again, until the
        kernel kills it for memory (its next step's activations do not fit)."""
        cg = self.cgroup
        before = cg.oom_kills or 0
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if (cg.oom_kills or 0) > before:
                return
            with contextlib.suppress(OSError):
                memory_cgroup.set_limit(cg, (cg.usage or BASE_LIMIT) + (1 << 20))
            time.sleep(0.02)

    def _one_rank_and_back(self, fault: Fault) -> None:
        """An attempt on one rank (resumed from the two ranks' checkpoint, converted), ended
        by kill -9 before it saves; the next attempt is on two ranks again."""
        started = time.time()
        proc = self.start(ranks=1)
        ok = self._wait_row_after(proc, started)
        with contextlib.suppress(psutil.Error):  # it may have ended by itself
            kill_tree(proc)
        out = self.finish(proc)
        said = next((x for x in out.splitlines() if "now 1" in x and "resumed from" in x), "")
        fault.detected = (
            "resumed on 1 rank: " + said.split("written by ")[-1][:80]
            if ok and said
            else "the one-rank attempt did not resume"
        )


OUTAGE_S = 20.0  # the longest a storage outage lasts when no read meets it
# data_pipeline.retries' warning: "storage: read s3://... failed (what); retry 1 in 0.5 s ..."
RETRY_SIGN = "); retry "
BUCKET = "chaos"

# Rank 1's cgroup limit between squeezes: room for it, yet tight enough in the memory plan's
# eyes that freed memory goes back to the kernel (each step then maps its activations anew).
BASE_LIMIT = 3 << 29


# What in the training's own output (or torchrun's) says it met each kind of fault.
SIGNS = {
    "kill_rank": ("stopped answering", "exitcode  : -9"),
    "stop_rank": ("stopped answering", "no forward for"),
    "preempt": ("after a preemption signal",),
    "full_disk": ("no space left on the device",),
    "damage_checkpoint": ("is damaged",),
    "oom_kill": ("killed for memory",),
}


def detection(kind: str, out: str) -> str:
    """The first line of the output that shows the fault, shortened."""
    for sign in SIGNS.get(kind, ()):
        line = next((x for x in out.splitlines() if sign in x), None)
        if line is not None:
            text = line.split("] - ")[-1] if "] - " in line else line.strip()
            return text[:200]
    return ""


def heartbeat_age(path: Path) -> float:
    try:
        return time.time() - json.loads(path.read_text())["time"]
    except (OSError, ValueError, KeyError):
        return 0.0


def file_size(path: Path) -> int:
    return path.stat().st_size


def resize(mount: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def newest_complete(run_dir: Path) -> Path | None:
    done = sorted(p.parent for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))
    return done[-1] if done else None


def last_step_of_checkpoint(run_dir: Path) -> int:
    newest = newest_complete(run_dir)
    return int(newest.name.split("_")[1]) if newest else 0


@dataclass
class Comparison:
    steps_once: bool
    same_losses: bool
    same_state: bool
    differences: list[str] = field(default_factory=list)


def compare(chaos_run: Path, clean_run: Path, steps: int) -> Comparison:
    """Every step logged once, and the final checkpoints' weights and Adam moments (every
    tensor of DeepSpeed's optimizer states and the model states) equal bit for bit."""
    rows = [json.loads(x) for x in (chaos_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "train/loss" in r]
    a, b = losses(chaos_run), losses(clean_run)
    last = f"step_{steps:08d}"
    differences = []
    for path in sorted((clean_run / "checkpoints" / last).glob("*states.pt")):
        mine = torch.load(chaos_run / "checkpoints" / last / path.name, weights_only=False)
        theirs = torch.load(path, weights_only=False)
        differences += [f"{path.name}: {d}" for d in tensor_differences(mine, theirs, "")]
    return Comparison(
        steps_once=logged == list(range(1, steps + 1)),
        same_losses=a == b and len(a) == steps,
        same_state=not differences,
        differences=differences,
    )


def tensor_differences(a, b, where: str) -> list[str]:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where or "."]
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{where}/{k}: missing" for k in set(a) ^ set(b)]
        for k in set(a) & set(b):
            found += tensor_differences(a[k], b[k], f"{where}/{k}")
        return found
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in tensor_differences(x, y, f"{where}/{i}")]
    return []


def table(faults: list[Fault]) -> str:
    rows = ["| # | fault | at step | detected how | steps recomputed |", "| - | - | - | - | - |"]
    for i, f in enumerate(faults, 1):
        again = "-" if f.recomputed is None else str(f.recomputed)
        rows.append(f"| {i} | {f.kind} | {f.last_step} | {f.detected} | {again} |")
    return "\n".join(rows)
