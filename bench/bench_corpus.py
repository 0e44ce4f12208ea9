"""A procedural corpus at scale through the Slurm array: ``slurm/prepare.sh`` on the loopback
cluster (``slurm/local-cluster.sh``), N array tasks and the merge, with a learned vocabulary.

Prints per task its files/s, files/s per core and peak memory (collector and largest worker),
then the shards, the merge and the vocabulary learning, and the end-to-end wall time. Needs
root and Debian's slurm-wlm (as ``tests/e2e/test_slurm.py``). The corpus is made once under
``work`` (100k files: ~290 MB, ~3 min on 2 cores) and reused.

    python bench/bench_corpus.py                      # 100k files, 4 tasks of 1 CPU
    python bench/bench_corpus.py files=20000 slices=2 work=/tmp/corpus-bench
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from data_pipeline.reader import load_card

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from support import midi_factory  # noqa: E402 - the tests' corpus generator

FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def job_state(env: dict, job: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True
    ).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")


def make_corpus(root: Path, files: int) -> None:
    if (root / ".complete").exists():
        return
    start = time.monotonic()
    size = midi_factory.write_scale_corpus(root, files, workers=os.cpu_count() or 1)
    (root / ".complete").touch()
    seconds = time.monotonic() - start
    print(f"corpus: {files} files, {size / 1e6:.0f} MB in {seconds:.0f} s")


def run_array(work: Path, corpus: Path, output: Path, slices: int, overrides: list[str]) -> float:
    """Submits the array and the merge on a fresh loopback cluster; returns the wall time."""
    cluster = REPO / "slurm" / "local-cluster.sh"
    where = work / "slurm"
    subprocess.run([str(cluster), "start", str(where)], check=True, capture_output=True)
    env = {
        **os.environ,
        "SLURM_CONF": str(where / "slurm.conf"),
        "MTRAIN_PYTHON": sys.executable,
        "SBATCH_ARGS": f"--cpus-per-task=1 --output={work}/%x-%j.out --chdir={REPO}",
    }
    try:
        start = time.monotonic()
        proc = subprocess.run(
            [str(REPO / "slurm" / "prepare.sh"), str(slices), f"source={corpus}",
             f"output={output}", *overrides],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        merge = proc.stdout.split("merge job ")[1].strip()
        while (state := job_state(env, merge)) != "COMPLETED":
            if state in FAILED or state == "":
                raise RuntimeError(f"merge job {merge} ended {state}; see {work}/*.out")
            time.sleep(2)
        return time.monotonic() - start
    finally:
        subprocess.run([str(cluster), "stop", str(where)], capture_output=True)


def report(card: dict, wall: float, work: Path) -> None:
    # files/s per core: wall rate over the task's CPUs; files/CPU s: over the CPU seconds its
    # collector and workers used (start-up and other slices' files included), which a busy
    # machine does not distort.
    print(f"\n{'task':>4} {'files':>7} {'seconds':>8} {'start-up':>8} {'files/s':>8} "
          f"{'per core':>8} {'files/CPU s':>11} {'RSS MiB':>14}")  # fmt: skip
    for s in card["slices"]:
        files = round(s["files_per_s"] * s["seconds"])
        rss, cpu = s["peak_rss_mb"], s.get("cpu_s")
        per_cpu = f"{files / sum(cpu.values()):>11.1f}" if cpu else f"{'-':>11}"
        print(
            f"{s['index']:>4} {files:>7} {s['seconds']:>8.0f} {s['startup_s']:>8.1f} "
            f"{s['files_per_s']:>8.1f} {s['files_per_s'] / s['workers']:>8.1f} {per_cpu} "
            f"{rss['collector']:>6} + {rss['worker']:>5}"
        )
    shards = [sh for split in card["splits"].values() for sh in split["shards"]]
    sizes = sorted(sh["bytes"] / 2**20 for sh in shards)
    files = card["files"]
    print(
        f"\nfiles: {files['total']} ({files['ok']} ok, {files['duplicates']} duplicates, "
        f"{files['quarantined']} quarantined: {json.dumps(card['failures']['by_reason'])})"
    )
    tokens = sum(split["tokens"] for split in card["splits"].values())
    print(
        f"shards: {len(shards)}, MiB min/median/max {sizes[0]:.1f}/"
        f"{statistics.median(sizes):.1f}/{sizes[-1]:.1f}; {tokens / 1e6:.1f}M tokens"
    )
    merge = card["merge"]
    logs = " ".join(p.read_text() for p in work.glob("mtrain-merge-*.out"))
    trained = re.findall(r"learned a \w+ vocabulary of \d+ pieces in ([\d.]+) s", logs)
    print(
        f"merge: {merge['seconds']:.1f} s, of it learned vocabulary {merge['learned_vocab_s']:.1f}"
        f" s (sentencepiece itself {trained[-1] if trained else '?'} s, the rest reading the"
        f" train shards), peak RSS {merge['peak_rss_mb']} MiB"
    )
    print(f"end to end (submit to merged): {wall:.0f} s")


def main() -> None:
    args = OmegaConf.from_dotlist(sys.argv[1:])
    files, slices = int(args.get("files", 100_000)), int(args.get("slices", 4))
    work = Path(args.get("work", "/tmp/mtrain-corpus-bench"))
    corpus, output = work / f"corpus-{files}", work / "dataset"
    make_corpus(corpus, files)
    shutil.rmtree(output, ignore_errors=True)
    for old in work.glob("*.out"):
        old.unlink()
    overrides = ["tokenizer.learned.kind=bpe", "tokenizer.learned.size=2000"]
    wall = run_array(work, corpus, output, slices, overrides)
    report(load_card(str(output)), wall, work)


if __name__ == "__main__":
    main()
