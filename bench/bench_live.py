"""Live call and response (``mtrain.generation.live``): a MIDI file replayed as live input bar
by bar, the model answering each bar with one of its own, note by note. Per model: the
latency of each answered note (from the moment the musician's bar has arrived for the first
note of an answer, from the previous note for the others), the time to hear a bar, and the
time per decoded token, as p50 / p99 over the session, on this CPU, batch 1.

The trained checkpoint answers with music; the ``--shapes`` (conf/model) are the same shapes
untrained with the checkpoint's tokenizer, for the latency of their size (a step costs the
same whatever the weights; the notes per token differ, so their per-note figures are rough).

    python bench/bench_live.py --checkpoint runs/quickstart/export --data data/bach
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from data_pipeline.reader import ShardReader, load_card, split_shares
from mtrain.exported.loading import load_for_inference
from mtrain.generation.compose import DEFAULT_MIN_P
from mtrain.generation.live import LiveSession
from mtrain.generation.sampling import SamplingConfig
from mtrain.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent


def percentiles(values: list[float]) -> dict:
    ms = np.array(values) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "count": len(values)}  # fmt: skip


def session(model, tokenizer, bars: list[np.ndarray], sampling: SamplingConfig) -> dict:
    live = LiveSession(model, tokenizer, sampling)
    first, later, hearing, per_token, notes = [], [], [], [], []
    for bar in bars:
        started = time.perf_counter()
        live.hear(bar)
        heard = time.perf_counter()
        hearing.append(heard - started)
        tokens_before, last = len(live.ids), heard
        answer = list(live.answer())
        done = time.perf_counter()
        for i, note in enumerate(answer):
            (first if i == 0 else later).append(note.ready_at - last)
            last = note.ready_at
        drawn = len(live.ids) - tokens_before
        if drawn:
            per_token.append((done - heard) / drawn)
        notes.append(len(answer))
    return {
        "first_note": percentiles(first),
        "next_note": percentiles(later),
        "hear_bar": percentiles(hearing),
        "per_token": percentiles(per_token),
        "answered_bars": len(bars),
        "notes_per_answer": round(float(np.mean(notes)), 1),
        "silent_answers": int(sum(n == 0 for n in notes)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an export (REMI)")
    parser.add_argument("--data", required=True, help="the dataset the input piece comes from")
    parser.add_argument("--split", default="test")
    parser.add_argument("--bars", type=int, default=16, help="bars the musician plays")
    parser.add_argument("--shapes", nargs="*", default=["mini", "small_20m"])
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained, _, tokenizer, _ = load_for_inference(args.checkpoint, "cpu")
    reader = ShardReader(len(tokenizer.base))
    for piece in reader.pieces(split_shares(args.data, args.split, load_card(args.data))):
        bars = tokenizer.split_bars(piece.tokens)
        if len(bars) > args.bars:  # the first is what precedes bar 1: nothing to hear
            break
    bars = [b for b in bars if len(b) and b[0] == tokenizer.bar_id][: args.bars]
    print(f"input: {piece.meta.get('name', piece.key)}, {len(bars)} bars")
    sampling = SamplingConfig(temperature=args.temperature, min_p=DEFAULT_MIN_P)
    models = {"trained": trained}
    for shape_name in args.shapes:
        shape = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model" / f"{shape_name}.yaml"))
        torch.manual_seed(0)
        models[shape_name] = GPT(GPTConfig(**{**shape, "vocab_size": tokenizer.vocab_size}))
    found = {}
    for name, model in models.items():
        session(model, tokenizer, bars[:2], sampling)  # warm-up: first calls allocate
        found[name] = {"params": sum(p.numel() for p in model.parameters()),
                       **session(model, tokenizer, bars, sampling)}  # fmt: skip
        print(json.dumps({name: found[name]}), flush=True)
    print()
    print("| model | parameters | first note | next note | hear a bar | per token |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, f in found.items():
        cells = [f"{f[k]['p50_ms']} / {f[k]['p99_ms']} ms"
                 for k in ("first_note", "next_note", "hear_bar", "per_token")]  # fmt: skip
        print(f"| {name} | {f['params'] / 1e6:.2f}M | {' | '.join(cells)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
