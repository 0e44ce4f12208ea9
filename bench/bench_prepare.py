"""Tokenize + shard throughput of `data_pipeline.prepare` against MidiTok's plain loop.

The peer is the loop every MidiTok user writes, ``tokenizer(path)`` over the same files, run in
the same process a moment before, so the ratios hold on a noisy machine. Goals: one worker
within 10% of the plain loop; two workers at least 1.8x one worker.

    python bench/bench_prepare.py                       # the Bach chorales
    python bench/bench_prepare.py source=music21:oneills1850
"""

import logging
import sys
import tempfile
import time

from omegaconf import OmegaConf

from data_pipeline.config import PrepareConfig
from data_pipeline.slice_run import run_slice
from data_pipeline.sources import discover
from data_pipeline.tokenizer import build_base_tokenizer


def plain_loop(cfg: PrepareConfig, paths: list[str]) -> tuple[float, int]:
    tokenizer = build_base_tokenizer(cfg.tokenizer)
    tokens = 0
    start = time.perf_counter()
    for path in paths:
        try:
            tokens += len(tokenizer(path).ids)
        except Exception:  # the pipeline quarantines these; the loop just skips them
            continue
    return time.perf_counter() - start, tokens


def pipeline(cfg: PrepareConfig, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as out:
        run = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(cfg), {"output": out, "workers": workers})
        )
        card = run_slice(run)
    # Steady state: the workers' one-off start-up (importing MidiTok and torch, ~2 s) is
    # reported apart, as it does not grow with the corpus.
    steady = card["throughput"]["seconds"] - card["throughput"]["startup_s"]
    print(
        f"prepare, {workers} worker(s): {card['throughput']['seconds']:.2f} s end to end, "
        f"{card['throughput']['startup_s']:.2f} s of it worker start-up"
    )
    return steady, sum(s["tokens"] for s in card["splits"].values())


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(PrepareConfig), OmegaConf.from_dotlist(sys.argv[1:]))
    )
    paths = [f.url for f in discover(cfg).files]  # converts the corpus first if not cached
    n = len(paths)
    loop_s, loop_tokens = plain_loop(cfg, paths)
    one_s, one_tokens = pipeline(cfg, 1)
    two_s, _ = pipeline(cfg, 2)
    print(f"\n{n} files of {cfg.source}, {loop_tokens} tokens (pipeline kept {one_tokens})")
    print(f"{'run':<28} {'seconds':>8} {'files/s':>9} {'tokens/s':>10} {'ratio':>7}")
    for name, seconds, ref in [
        ("miditok tokenizer(path) loop", loop_s, loop_s),
        ("prepare, 1 worker", one_s, loop_s),
        ("prepare, 2 workers", two_s, loop_s),
    ]:
        print(
            f"{name:<28} {seconds:>8.2f} {n / seconds:>9.1f} "
            f"{loop_tokens / seconds:>10.0f} {ref / seconds:>6.2f}x"
        )
    print(f"\n1 worker vs plain loop: {loop_s / one_s:.2f}x (goal >= 0.90x)")
    print(f"2 workers vs 1 worker:  {one_s / two_s:.2f}x (goal >= 1.80x)")


if __name__ == "__main__":
    main()
