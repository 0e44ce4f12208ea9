"""Bar controls: how often a generated bar meets the value asked of it (MidiTok's computation
on the generated bar), held by the sampling mask (the default), left to the model alone, and
unasked (the baseline), in the same run.

For each attribute ``--checkpoint`` was trained to control, the values at the 10th, 50th and
90th percentiles of the bars of ``--data``'s ``--split`` (distinct values; a flag: 0 and 1)
are asked of bars 2 to 1 + ``--bars-per-piece`` of pieces composed from BOS, until ``--bars``
bars per value; every mode composes the same pieces (same seeds). Beside each: the CPU time,
and the nats per token the model gives the music drawn (mask and controls aside): what holding
a value costs in the model's own judgement.

    python bench/bench_controls.py --checkpoint runs/controls/export --data data/bach
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline.bar_controls import ATTRIBUTES, bar_values
from data_pipeline.reader import ShardReader, load_card, split_shares
from mtrain.evaluation.likelihood import IGNORE, window_nats
from mtrain.exported.loading import load_for_inference
from mtrain.generation.compose import DEFAULT_MIN_P, compose
from mtrain.generation.controls import ControlPlan, outcomes, parse_controls
from mtrain.generation.sampling import SamplingConfig

MODES = ("held", "asked", "unasked")


def order(value: str) -> float:
    return float(value.rstrip("+"))


def asked_values(tokenizer, data: str, split: str, names: list[str]) -> dict[str, list[str]]:
    """Per attribute: the distinct values at the 10th, 50th and 90th percentiles of the
    split's bars, as MidiTok computes them."""
    reader = ShardReader(len(tokenizer.base))
    seen = {name: [] for name in names}
    attributes = [ATTRIBUTES[n] for n in names]
    for piece in reader.pieces(split_shares(data, split, load_card(data))):
        bars = len(tokenizer.split_bars(piece.tokens))
        for values in bar_values(tokenizer.base_ids_to_midi(piece.tokens), bars, attributes):
            for name, value in values.items():
                seen[name].append(value)
    picked = {}
    for name, values in seen.items():
        ranked = sorted(values, key=order)
        quantiles = [ranked[int(q * (len(ranked) - 1))] for q in (0.1, 0.5, 0.9)]
        picked[name] = sorted(set(quantiles), key=order)
    return picked


@torch.no_grad()
def nats_per_token(model, pieces, skip: set[int]) -> float:
    """The model's mean loss on the tokens it drew (prompt and control tokens aside)."""
    length = model.config.max_seq_len
    total, count = 0.0, 0
    for piece in pieces:
        ids = np.array(piece.ids[: length + 1], dtype=np.int64)
        targets = ids[1:].copy()
        targets[: piece.prompt_tokens - 1] = IGNORE
        targets[np.isin(targets, list(skip))] = IGNORE
        nll, _, scored = window_nats(model, [(ids[:-1], targets)])
        total, count = total + float(nll[scored].sum()), count + int(scored.sum())
    return total / max(1, count)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--bars", type=int, default=200, help="asked bars per value")
    parser.add_argument("--bars-per-piece", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-new-tokens", type=int, default=600)
    parser.add_argument("--json")
    args = parser.parse_args()
    model, _, tokenizer, _ = load_for_inference(args.checkpoint, "cpu")
    index = tokenizer.control_index
    names = [a.name for a in ATTRIBUTES.values() if a.tokens and set(a.tokens) <= set(index)]
    values = asked_values(tokenizer, args.data, args.split, names)
    print(json.dumps({"asked_values": values}))
    pieces = math.ceil(args.bars / args.bars_per_piece)
    last = 1 + args.bars_per_piece
    sampling = SamplingConfig(
        temperature=args.temperature, min_p=DEFAULT_MIN_P, max_new_tokens=args.max_new_tokens
    )
    rows, controls_ids = [], set(index.values())
    for name in names:
        for value in values[name]:
            text = f"2-{last}:{name}={value}"
            asked = parse_controls(text)
            row = {"attribute": name, "value": value, "controls": text}
            plans = {
                "held": ControlPlan.of(tokenizer, text),
                "asked": ControlPlan.of(tokenizer, text, held=False),
                "unasked": None,
            }
            for mode, controls in plans.items():
                started = time.process_time()
                composed = compose(
                    model,
                    tokenizer,
                    [tokenizer.bos_id],
                    pieces,
                    sampling,
                    args.batch_size,
                    max_bars=last,
                    controls=controls,
                )
                found = [o for piece in composed for o in outcomes(piece.score, asked)]
                row[mode] = {
                    "bars": len(found),
                    "met": sum(o.met for o in found),
                    "share": float(np.mean([o.met for o in found])),
                    # Bars MidiTok gives no value: not written (the piece ended before them),
                    # empty, or holding a single note; they count as not met.
                    "no_value": sum(o.got is None for o in found),
                    "repairs": sum(p.repairs for p in composed),
                    "cpu_s": round(time.process_time() - started, 1),
                    "nats_per_token": round(nats_per_token(model, composed, controls_ids), 4),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| attribute | asked value | held by the mask | the model alone | unasked (baseline) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        cells = []
        for mode in MODES:
            m = row[mode]
            cells.append(
                f"{m['met']}/{m['bars']} ({m['share']:.0%}); {m['nats_per_token']:.2f} nats/token, "
                f"{m['cpu_s']} CPU s"
            )
        print(f"| {row['attribute']} | {row['value']} | {' | '.join(cells)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
