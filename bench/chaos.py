"""A long chaos run: one 2-rank training supervised as a Slurm requeue (started again whenever
it exits), a seeded schedule of faults of every kind in ``tests/support/chaos.py``, then the
same training undisturbed; prints each fault (detected how, steps recomputed) and whether
every step was logged once with the same losses, weights and Adam moments bit for bit.

    python bench/chaos.py [data/bach] [--faults 20] [--steps 150] [--seed 0] [override ...]

Root only (a tmpfs for the full disk, a memory cgroup for the OOM kill). The storage faults
read the shards from a loopback moto_server (the dev extra) through the tests' fault proxy;
the undisturbed run reads them from disk. Give the schedule room: about 7 steps a fault.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.chaos import ChaosConfig, Supervisor, compare, run_args, table
from support.trainings import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", default="data/bach")
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("extra", nargs="*", help="more overrides of mtrain.train")
    args = parser.parse_args()
    cfg = ChaosConfig(args.steps, args.save_every, args.faults, args.seed, extra=tuple(args.extra))
    dataset = Path(args.dataset).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.monotonic()
        with Supervisor(dataset, root / "chaos", cfg) as supervisor:
            faults = supervisor.run()
            chaos_s = time.monotonic() - start
            code, out = run(run_args(dataset, root / "clean", cfg), ranks=2, timeout=1800)
            assert code == 0, out[-3000:]
            result = compare(supervisor.run_dir, root / "clean", cfg.steps)
        kinds = sorted({f.kind for f in faults})
        print(f"{len(faults)} faults of {len(kinds)} kinds over {cfg.steps} steps (seed "
              f"{cfg.seed}), {len(supervisor.outputs)} attempts, {chaos_s:.0f} s")  # fmt: skip
        print(table(faults))
        again = sum(f.recomputed or 0 for f in faults)
        print(f"steps recomputed in all: {again}; every step logged once: {result.steps_once}; "
              f"same losses: {result.same_losses}; same weights and Adam moments: "
              f"{result.same_state}")  # fmt: skip
        for line in result.differences[:20]:
            print("  differs:", line)


if __name__ == "__main__":
    main()
