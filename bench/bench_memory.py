"""The largest model this machine holds under ZeRO-3: per-rank peak memory measured against
the memory plan's estimate (mtrain.training.memory_plan), and step times, for a
train -> checkpoint -> resume -> export -> generate cycle on 2 CPU ranks.

    python bench/bench_memory.py [data/bach] [override ...] [--models small_20m gpt_760m]
        [--steps 3] [--phases train resume export generate] [--guard-gb 9]

gpt_760m under 8 GiB per process (issue 13): ``python bench/bench_memory.py data/bach
deepspeed.precision=bf16 --models gpt_760m --steps 2 --guard-gb 8``.

Peaks are each process's kernel-kept high-water mark (VmHWM), read every half second; a run
whose process passes ``--guard-gb`` is stopped (the machine's memory is shared).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
from omegaconf import OmegaConf

from mtrain.model import GPTConfig
from mtrain.training.config import DeepSpeedConfig, Precision
from mtrain.training.memory_plan import GiB, Layout, estimate

REPO = Path(__file__).resolve().parents[1]
# glibc raises its mmap threshold up to 32 MB as big blocks are freed; tensors of a few MB then
# come from arenas that fragment (+25% peak RSS measured at 170M parameters). A fixed 64 KiB
# threshold returns every freed tensor to the kernel, at the price of page faults (steps ~2x
# slower at 170M parameters on this CPU).
CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # fmt: skip
SEQ_LEN = 128


@dataclass
class Peaks:
    """Peak resident memory (bytes) of each process of a tree, by pid, with its command."""

    bytes: dict[int, int] = field(default_factory=dict)
    what: dict[int, str] = field(default_factory=dict)

    def ranks(self) -> dict[int, int]:
        """Peak per training rank (processes started with a RANK in their environment)."""
        return {int(self.what[pid].removeprefix("rank ")): peak for pid, peak in
                self.bytes.items() if self.what[pid].startswith("rank ")}  # fmt: skip

    @property
    def highest(self) -> int:
        return max(self.bytes.values(), default=0)


def high_water_mark(proc: psutil.Process) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_measured(cmd: list[str], guard_bytes: float, log: Path) -> tuple[int, Peaks]:
    """Runs ``cmd``; (exit code, per-process peaks). Stops the whole tree when a process passes
    ``guard_bytes``."""
    peaks = Peaks()
    with log.open("w") as out:
        top = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **CPU_ENV}, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        root = psutil.Process(top.pid)
        while top.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for proc in tree:
                try:
                    peak = high_water_mark(proc)
                    if proc.pid not in peaks.what:
                        # The launcher's children are the ranks; their loader workers (which
                        # inherit RANK too) are not.
                        rank = proc.environ().get("RANK")
                        is_rank = rank is not None and proc.ppid() == top.pid
                        peaks.what[proc.pid] = f"rank {rank}" if is_rank else proc.name()
                except (OSError, psutil.Error):
                    continue
                peaks.bytes[proc.pid] = max(peaks.bytes.get(proc.pid, 0), peak)
            if peaks.highest > guard_bytes:
                os.killpg(top.pid, 9)
                top.wait()
                print(f"  stopped: a process passed {guard_bytes / GiB:.1f} GiB")
                return -9, peaks
            time.sleep(0.5)
    return top.returncode, peaks


def train_command(dataset: str, run_dir: Path, model: str, steps: int, extra: list[str]):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "mtrain.train", f"data.path={dataset}", f"run_dir={run_dir}", f"model={model}",
            "deepspeed=cpu", f"model.max_seq_len={SEQ_LEN}", "trainer.micro_batch_size=1",
            "trainer.activation_checkpointing=true", f"trainer.global_batch_tokens={2 * SEQ_LEN}",
            f"trainer.max_steps={steps}", f"trainer.save_every={steps}", "trainer.eval_every=0",
            "trainer.log_every=1", "optim.warmup_steps=1", "data.num_workers=1",
            # A step of gpt_760m on one core per rank takes minutes, and so does a save.
            "deepspeed.timeout_s=1800", "logger.mode=disabled", *extra]  # fmt: skip


def planned(dataset: str, model: str, extra: list[str]) -> float:
    """The memory plan's estimate (bytes per rank) for the layout ``train_command`` runs."""
    vocab = json.loads((Path(dataset) / "tokenizer" / "artifact.json").read_text())["vocab_size"]
    shape = OmegaConf.merge(
        OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml"),
        OmegaConf.from_dotlist([x.removeprefix("model.") for x in extra if x.startswith("model.")]),
    )
    cfg = GPTConfig(**OmegaConf.to_container(shape), vocab_size=vocab)
    cfg = replace(cfg, max_seq_len=SEQ_LEN)
    precision = next((x.split("=")[1] for x in extra if x.startswith("deepspeed.precision=")),
                     "fp32")  # fmt: skip
    ds = DeepSpeedConfig(precision=Precision(precision), param_persistence_threshold=0)
    return estimate(Layout(cfg, ds, 1, 2, activation_checkpointing=True)).total


def step_times(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r]


def cycle(dataset: str, model: str, steps: int, extra: list[str], guard: float, tmp: Path,
          only: list[str]):  # fmt: skip
    """train -> resume -> export -> generate for one model; prints one row per phase."""
    run, export = tmp / model, tmp / f"{model}-export"
    est = planned(dataset, model, extra)
    phases = [
        ("train", train_command(dataset, run, model, steps, extra)),
        ("resume", train_command(dataset, run, model, steps + 2, extra)),
        ("export", [sys.executable, "-m", "mtrain.export", f"checkpoint={run}",
                    f"output={export}"]),
        ("generate", [sys.executable, "-m", "mtrain.generate", f"checkpoint={export}",
                      f"output={tmp / 'samples'}", "num_samples=1", "batch_size=1",
                      "sampling.max_new_tokens=16", "render.audio=false",
                      "render.piano_roll=false"]),
    ]  # fmt: skip
    for phase, cmd in phases:
        if phase not in only:
            continue
        start = time.perf_counter()
        code, peaks = run_measured(cmd, guard, tmp / f"{model}-{phase}.log")
        wall = time.perf_counter() - start
        ranks = peaks.ranks()
        shown = ", ".join(f"rank {r} {b / GiB:.2f}" for r, b in sorted(ranks.items()))
        others = max((b for pid, b in peaks.bytes.items() if not peaks.what[pid].startswith(
            "rank ")), default=0)  # fmt: skip
        ratio = f"{max(ranks.values()) / est:.2f}" if ranks else "-"
        print(f"{model:<10} {phase:<9} exit {code:>3}  peak GiB: {shown or '-'}; other "
              f"processes {others / GiB:.2f}; estimate {est / GiB:.2f} (measured/estimate "
              f"{ratio}); {wall:.0f} s")  # fmt: skip
        if phase in ("train", "resume") and code == 0:
            times = step_times(run)
            print(f"{'':<10} step time median {statistics.median(times):.1f} s over "
                  f"{len(times)} steps (first {times[0]:.1f} s)")  # fmt: skip
        if code != 0:
            print((tmp / f"{model}-{phase}.log").read_text()[-3000:])
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", default="data/bach")
    parser.add_argument("--models", nargs="+", default=["small_20m", "gpt_760m"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--guard-gb", type=float, default=9.0)
    parser.add_argument("--phases", nargs="+", default=["train", "resume", "export", "generate"])
    parser.add_argument("extra", nargs="*", help="more overrides of mtrain.train")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").is_dir() else None) as t:
        for model in args.models:
            cycle(args.dataset, model, args.steps, args.extra, args.guard_gb * GiB, Path(t),
                  args.phases)  # fmt: skip


if __name__ == "__main__":
    main()
