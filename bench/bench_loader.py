"""The training loader through one real DataLoader worker process, as the trainer runs it.

For each prepared dataset given (base or learned vocabulary), a fresh process reads training
batches (seq 512, micro batch 8) from ``StreamingData`` with one worker until it has as many
model tokens as ``--epochs`` epochs of the base tokens hold (a learned vocabulary's epochs are
shorter: more of them), the worker's start-up and first batch included; the time to the first
batch is also printed on its own. Rounds are interleaved.

``--against TREE`` runs the same measurement with another checkout's code (``PYTHONPATH``),
e.g. a git worktree of the commit a speed-up started from, on the datasets ``--against-data``
names (prepared by that code: artifacts of other versions may not load), one for each dataset;
each round's rate is divided by that round's rate of the other code.

    python bench/bench_loader.py data/bach [more datasets] [--epochs 20] [--rounds 3]
        [--against /tmp/old --against-data /tmp/old_bach ...]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ, MICRO = 512, 8


def child(path: str, epochs: int) -> None:
    """Runs in the measured process: prints model tokens/s and seconds to the first batch."""
    from mtrain.data.loader import DataConfig, StreamingData

    started = time.perf_counter()
    data = StreamingData(DataConfig(path=path, num_workers=1), SEQ, MICRO)
    budget = data.card["splits"]["train"]["tokens"] * epochs
    batches = data.train_batches()
    tokens, first = 0, None
    while tokens < budget:
        inputs, _ = next(batches)
        tokens += inputs.numel()
        first = first or time.perf_counter() - started
    print(tokens / (time.perf_counter() - started), first)


def measure(tree: Path, path: str, epochs: int) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", path, "--epochs", str(epochs)],
        env=env, cwd=tree, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"{tree} on {path}:\n{proc.stderr[-3000:]}")
    rate, first = proc.stdout.split()[-2:]
    return float(rate), float(first)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("datasets", nargs="*", default=["data/bach"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    parser.add_argument("--against-data", nargs="*", default=[])
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.epochs)
    args.datasets = [str(Path(p).resolve()) for p in args.datasets]
    others = [str(Path(p).resolve()) for p in args.against_data] or args.datasets
    if args.against and len(others) != len(args.datasets):
        parser.error("--against-data needs one dataset for each dataset")
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs: one DataLoader worker, "
          f"seq {SEQ}, micro batch {MICRO}, {args.epochs} base epochs of tokens, first batch "
          f"included; model tokens/s, median (spread) over {args.rounds} rounds")  # fmt: skip
    rates: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for path, other in zip(args.datasets, others, strict=True):
            rates.setdefault(path, []).append(measure(REPO, path, args.epochs))
            if args.against:
                rates.setdefault(f"{path} @against", []).append(
                    measure(args.against, other, args.epochs)
                )
    for path in args.datasets:
        mine = [r for r, _ in rates[path]]
        first = statistics.median(f for _, f in rates[path])
        line = (f"  {Path(path).name:<20} {statistics.median(mine):>11,.0f} ({min(mine):,.0f}-"
                f"{max(mine):,.0f}); first batch {first:.1f} s")  # fmt: skip
        if args.against:
            theirs = [r for r, _ in rates[f"{path} @against"]]
            ratios = [m / t for m, t in zip(mine, theirs, strict=True)]
            line += (f"; {args.against}: {statistics.median(theirs):,.0f} -> "
                     f"{statistics.median(ratios):.2f}x "
                     f"({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
        print(line)


if __name__ == "__main__":
    main()
