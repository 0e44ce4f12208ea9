"""Time a checkpoint blocks training: the synchronous save (every rank waits for the last byte)
against the background save (``trainer.save_in_background``), in the same run of the bench,
on 2 CPU ranks; with each rank's peak resident memory and what the background write held.

    python bench/bench_checkpoint.py [data/bach] [--models small_20m gpt_760m] [--guard-gb 12]
        [override ...]

Each mode trains ``--steps`` steps saving every ``--save-every``; the last step's save is not
counted (a run's end waits for its write whatever the mode). Blocked time is read from the
trainer's own log lines and checked from outside: the gap in ``metrics.jsonl``'s clock after
a save step beyond the median step. gpt_760m needs ~16 GiB: run this inside a cgroup limit.
"""

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

from bench_memory import SEQ_LEN, run_measured

from mtrain.training.memory_plan import GiB

ENV_NOTE = "nothing set by hand (no MALLOC_* variables)"
SYNC = re.compile(r"saved checkpoint \S+step_(\d+) in ([\d.]+) s")
BACKGROUND = re.compile(r"saved checkpoint \S+step_(\d+) in the background in ([\d.]+) s; "
                        r"training was blocked ([\d.]+) s")  # fmt: skip
HELD = re.compile(r"step_(\d+): writing in the background \(([^)]*)\) after [\d.]+ s blocked "
                  r"\(the probe ([\d.]+) s, DeepSpeed's save ([\d.]+) s; (\d+) MiB")  # fmt: skip


def command(dataset: str, run_dir: Path, model: str, background: bool, args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "mtrain.train", f"data.path={dataset}", f"run_dir={run_dir}", f"model={model}",
            "deepspeed=cpu", "deepspeed.precision=bf16", f"model.max_seq_len={SEQ_LEN}",
            "trainer.micro_batch_size=1", f"trainer.global_batch_tokens={2 * SEQ_LEN}",
            f"trainer.max_steps={args.steps}", f"trainer.save_every={args.save_every}",
            "trainer.eval_every=0", "trainer.log_every=1", "optim.warmup_steps=1",
            "data.num_workers=1", "deepspeed.timeout_s=1800", "logger.mode=disabled",
            f"trainer.save_in_background={args.background if background else 'off'}",
            *args.extra]  # fmt: skip


def gaps_after_saves(run_dir: Path, saves: list[int]) -> list[float]:
    """Seconds between a save step's row and the next, beyond the median such gap."""
    rows = {r["step"]: r["time"] for r in map(json.loads, (run_dir / "metrics.jsonl").open())}
    gaps = {s: rows[s + 1] - rows[s] for s in rows if s + 1 in rows}
    plain = [g for s, g in gaps.items() if s not in saves] or [0.0]
    return [gaps[s] - statistics.median(plain) for s in saves if s in gaps]


def measure(dataset: str, model: str, background: bool, args, tmp: Path) -> dict:
    run_dir = tmp / f"{model}-{'background' if background else 'sync'}"
    log = tmp / f"{run_dir.name}.log"
    code, peaks = run_measured(command(dataset, run_dir, model, background, args),
                               args.guard_gb * GiB, log)  # fmt: skip
    text = log.read_text()
    if code != 0:
        print(text[-3000:])
        raise SystemExit(f"{model}: training exited {code}")
    # The last step's save is waited for whatever the mode: not counted.
    counted = list(range(args.save_every, args.steps - 1, args.save_every))
    if background:
        blocked = {int(s): float(b) for s, _, b in BACKGROUND.findall(text)}
        started = HELD.findall(text)
        held = {int(s): int(m) for s, _, _, _, m in started}
        parts = {int(s): (float(p), float(d)) for s, _, p, d, _ in started}
        modes = sorted({how for _, how, _, _, _ in started})
    else:
        blocked = {int(s): float(t) for s, t in SYNC.findall(text)}
        held, parts, modes = {}, {}, ["off"]
    return {
        "modes": modes,
        "blocked": [blocked[s] for s in counted],
        "parts": [parts[s] for s in counted if s in parts],  # (the probe, DeepSpeed's save)
        "gaps": gaps_after_saves(run_dir, counted),
        "held_mib": max(held.values(), default=0),
        "peaks": {r: b / GiB for r, b in sorted(peaks.ranks().items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", default="data/bach")
    parser.add_argument("--models", nargs="+", default=["small_20m", "gpt_760m"])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--guard-gb", type=float, default=12.0)
    parser.add_argument(
        "--background",
        choices=["auto", "staged", "live"],
        default="auto",
        help="the background mode measured against the synchronous save",
    )
    parser.add_argument("extra", nargs="*", help="more overrides of mtrain.train")
    args = parser.parse_args()
    print(f"bf16, ZeRO-3, 2 ranks, seq {SEQ_LEN}, micro batch 1; {ENV_NOTE}")
    with tempfile.TemporaryDirectory() as t:
        for model in args.models:
            sync = measure(args.dataset, model, False, args, Path(t))
            back = measure(args.dataset, model, True, args, Path(t))
            s, b = statistics.mean(sync["blocked"]), statistics.mean(back["blocked"])
            print(f"{model:<10} blocked per save: sync {s:.2f} s {sync['blocked']}, background "
                  f"{b:.2f} s {back['blocked']} -> {b / s:.1%} of sync")  # fmt: skip
            print(f"{'':<10} from metrics.jsonl gaps: sync {sync['gaps']}, background "
                  f"{back['gaps']}")  # fmt: skip
            print(f"{'':<10} background mode: {', '.join(back['modes'])}; blocked to start each "
                  f"write (the probe s, DeepSpeed's save s): {back['parts']}")  # fmt: skip
            print(f"{'':<10} held for the background write (rank 0): {back['held_mib']} MiB; "
                  f"peak GiB sync {sync['peaks']}, background {back['peaks']}")  # fmt: skip


if __name__ == "__main__":
    main()
