"""Infills that end themselves: the share of fillings that close their middle (FIM_END) with
the gap's bar count, and that hold notes, with the sampling grammar and without it, in the
same run.

A gap of ``--bars`` bars at a seeded random place (one bar or more kept on either side) in
each of the first ``--pieces`` pieces of a dataset's ``--split``, filled ``--samples`` times
by ``--checkpoint`` at temperature ``--temperature`` (min-p as ``generate``'s default).

    python bench/bench_infill.py --checkpoint runs/quickstart/export --data data/bach
"""

import argparse
import json
import random
from pathlib import Path

import numpy as np

from data_pipeline.reader import ShardReader, load_card, split_shares
from mtrain.exported.loading import load_for_inference
from mtrain.generation.compose import DEFAULT_MIN_P
from mtrain.generation.infill import BarRange, gap_notes, infill, infill_request
from mtrain.generation.sampling import SamplingConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--pieces", type=int, default=20)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--bars", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--json")
    args = parser.parse_args()
    model, _, tokenizer, _ = load_for_inference(args.checkpoint, "cpu")
    card = load_card(args.data)
    reader = ShardReader(len(tokenizer.base))
    rng = random.Random(0)
    tallies = {}
    for masked in (False, True):
        sampling = SamplingConfig(temperature=args.temperature, min_p=DEFAULT_MIN_P, grammar=masked)
        tally = {"fillings": 0, "closed_at_gap": 0, "closed": 0, "with_notes": 0, "repairs": 0}
        rng.seed(0)
        pieces = reader.pieces(split_shares(args.data, args.split, card))
        used = 0
        for piece in pieces:
            if used == args.pieces:
                break
            bars = len(tokenizer.split_bars(piece.tokens))
            width = rng.choice(args.bars)
            if bars < width + 2:
                continue
            first = rng.randint(2, bars - width)
            gap = BarRange(first, first + width - 1)
            score = tokenizer.base_ids_to_midi(piece.tokens)
            request = infill_request(
                tokenizer, score, gap, piece.labels, model.config.max_seq_len, in_steps=True
            )
            used += 1
            for fill in infill(model, tokenizer, request, args.samples, sampling, args.samples):
                middle = np.array(fill.ids[fill.prompt_tokens :])
                closed = str(fill.stop) == "stop_token"
                written_bars = int(np.isin(tokenizer.decode_base(middle), tokenizer.bar_id).sum())
                tally["fillings"] += 1
                tally["closed"] += closed
                tally["closed_at_gap"] += closed and written_bars == width
                tally["with_notes"] += gap_notes(fill.score, tokenizer, request) > 0
                tally["repairs"] += fill.repairs
        tallies["masked" if masked else "unmasked"] = tally
    print(json.dumps(tallies, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(tallies, indent=2))


if __name__ == "__main__":
    main()
