"""Tokenize + shard throughput of `data_pipeline.prepare` against MidiTok's plain loop.

The peer is the loop every MidiTok user writes, ``tokenizer(path)`` over the same files. The
pipeline runs with one and with two workers in interleaved rounds (1, 2, 1, 2, ...), so a noisy
machine slows both alike; the table gives each one's best round and the spread over rounds.
Rates are steady state: the workers' one-off start-up (importing MidiTok and torch) is
reported apart, as it does not grow with the corpus. Goals: one worker within 10% of the plain
loop; two workers at least 1.8x one worker.

    python bench/bench_prepare.py                        # 2000 procedural files, 3 rounds
    python bench/bench_prepare.py files=4000 rounds=5
    python bench/bench_prepare.py source=music21:oneills1850
"""

import logging
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from data_pipeline.config import PrepareConfig
from data_pipeline.slice_run import run_slice
from data_pipeline.sources import discover
from data_pipeline.tokenizer import build_base_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import midi_factory  # the tests' corpus generator


def plain_loop(cfg: PrepareConfig, paths: list[str]) -> float:
    tokenizer = build_base_tokenizer(cfg.tokenizer)
    start = time.perf_counter()
    for path in paths:
        try:
            tokenizer(path)
        except Exception:  # the pipeline quarantines these; the loop just skips them
            continue
    return time.perf_counter() - start


def cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def pipeline(cfg: PrepareConfig, workers: int) -> dict:
    """One run: steady seconds, start-up, and CPU seconds of the parent and of the workers."""
    parent, children = cpu_s(resource.RUSAGE_SELF), cpu_s(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as out:
        run = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(cfg), {"output": out, "workers": workers})
        )
        card = run_slice(run)
    return {
        "steady_s": card["throughput"]["seconds"] - card["throughput"]["startup_s"],
        "startup_s": card["throughput"]["startup_s"],
        "parent_cpu_s": cpu_s(resource.RUSAGE_SELF) - parent,
        "worker_cpu_s": cpu_s(resource.RUSAGE_CHILDREN) - children,
        "tokens": sum(s["tokens"] for s in card["splits"].values()),
    }


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    args = OmegaConf.from_dotlist(sys.argv[1:])
    files, rounds = int(args.pop("files", 2000)), int(args.pop("rounds", 3))
    with tempfile.TemporaryDirectory() as corpus:
        if "source" not in args:
            midi_factory.write_scale_corpus(Path(corpus), files, workers=2)
            args.source = corpus
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PrepareConfig), args))
        paths = [f.url for f in discover(cfg).files]  # converts a music21 corpus if not cached
        n = len(paths)
        loop_s = plain_loop(cfg, paths)
        runs = {1: [], 2: []}
        for r in range(rounds):
            for workers in (1, 2):
                runs[workers].append(pipeline(cfg, workers))
                print(f"round {r + 1}, {workers} worker(s): {runs[workers][-1]}", flush=True)
    one = [run["steady_s"] for run in runs[1]]
    two = [run["steady_s"] for run in runs[2]]
    tokens = runs[1][0]["tokens"]
    print(f"\n{n} files of {cfg.source}, {tokens} tokens kept, {rounds} interleaved rounds")
    print(f"{'run':<28} {'best s':>8} {'spread s':>11} {'files/s':>8} {'tokens/s':>9}")
    rows = [("miditok tokenizer(path) loop", [loop_s]), ("prepare, 1 worker", one)]
    for name, seconds in [*rows, ("prepare, 2 workers", two)]:
        best = min(seconds)
        print(
            f"{name:<28} {best:>8.2f} {spread(seconds):>11} {n / best:>8.1f} {tokens / best:>9.0f}"
        )
    ratios = [a / b for a, b in zip(one, two, strict=True)]
    print(f"\n1 worker vs plain loop: {loop_s / min(one):.2f}x (goal >= 0.90x)")
    print(
        f"2 workers vs 1 worker:  {min(one) / min(two):.2f}x best vs best, rounds "
        f"{spread(ratios)} (goal >= 1.80x)"
    )
    # Where the rest goes, in CPU seconds (which a busy machine does not inflate as it does
    # wall time): per file, a worker's work (read, hash, parse, tokenize, build the tar sample)
    # against the collector's serial work (gather results, append to shards and manifest).
    # With two workers on two cores the collector's share is what the speed-up loses.
    startup = statistics.mean(r["worker_cpu_s"] for r in runs[2]) - statistics.mean(
        r["worker_cpu_s"] for r in runs[1]
    )  # one more worker's imports: both runs tokenize the same files
    worker = (min(r["worker_cpu_s"] for r in runs[1]) - startup) / n * 1e3
    collector = min(r["parent_cpu_s"] for r in runs[2]) / n * 1e3
    print(
        f"CPU per file: worker {worker:.2f} ms, collector {collector:.2f} ms; worker start-up "
        f"{startup:.1f} CPU s, {spread([r['startup_s'] for r in runs[1] + runs[2]])} s wall"
    )
    print(
        f"2 workers on two otherwise idle cores: 2w / (w + c) = "
        f"{2 * worker / (worker + collector):.2f}x"
    )


if __name__ == "__main__":
    main()
