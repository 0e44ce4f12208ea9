"""The sampling grammar: what it changes in the music and what it costs, each against the same
sampling without it, in the same run.

1. Outcome: ``--samples`` pieces of ``--tokens`` new tokens at temperature ``--temperature``
   (no top-k/p, no min-p: the model's whole distribution) from ``--checkpoint`` (an exported
   model, e.g. one barely trained) or, without one, an untrained GPT (2 blocks of 32, wide
   initialisation, REMI), masked and unmasked: tokens repaired after the fact, and pieces that
   came out without a note.
2. The mask alone: CPU time per step of ``Cursor.constrain``, ``settle`` and ``read`` around
   random logits over REMI's vocabulary, 400 steps, a fresh table (states built as met).
3. Cost: milliseconds per new token at batch ``--batch`` for the ``--model`` shape (seeded
   random weights, REMI vocabulary), ``--cost-tokens`` new tokens per run, masked vs
   unmasked, and masked with bar controls held on every bar (``bar_guard``), ``--repeats``
   runs each, interleaved, best kept. Every state's mask is worked out the first time it is
   met, inside the timed run (a fresh table each run).

    python bench/bench_grammar.py --checkpoint runs/barely/export
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_pipeline.config import TokenizerConfig
from data_pipeline.tokenizer import MusicTokenizer, build_base_tokenizer
from mtrain.data.controls import AttributeControlsConfig, with_controls
from mtrain.exported.loading import load_for_inference
from mtrain.generation.compose import compose
from mtrain.generation.controls import ControlPlan, Steering
from mtrain.generation.decoding import decode
from mtrain.generation.grammar import Cursor, piece_grammar
from mtrain.generation.sampling import SamplingConfig
from mtrain.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]


def outcome(args) -> dict:
    if args.checkpoint:
        model, _, tokenizer, _ = load_for_inference(args.checkpoint, "cpu")
    else:
        tokenizer = MusicTokenizer(build_base_tokenizer(TokenizerConfig()), [])
        torch.manual_seed(0)
        shape = GPTConfig(tokenizer.vocab_size, n_layer=2, n_head=2, d_model=32, init_std=0.2)
        model = GPT(shape).eval()
    found = {}
    for masked in (False, True):
        sampling = SamplingConfig(
            temperature=args.temperature, max_new_tokens=args.tokens, seed=0, grammar=masked
        )
        pieces = compose(model, tokenizer, [tokenizer.bos_id], args.samples, sampling, 8)
        found["masked" if masked else "unmasked"] = {
            "repairs": sum(p.repairs for p in pieces),
            "repairs_per_sample": [p.repairs for p in pieces],
            "without_notes": sum(p.score.note_num() == 0 for p in pieces),
            "notes_per_sample": [p.score.note_num() for p in pieces],
            "stopped_by": [str(p.stop) for p in pieces],
        }
    return found


def mask_alone(steps: int = 400) -> dict:
    tokenizer = MusicTokenizer(build_base_tokenizer(TokenizerConfig()), [])
    generator = torch.Generator().manual_seed(0)
    found = {}
    for rows in (1, 4):
        table = piece_grammar(tokenizer)
        cursor = Cursor(table, rows)
        spent = 0
        for _ in range(steps):
            logits = torch.randn(rows, tokenizer.vocab_size, generator=generator)
            started = time.process_time_ns()
            logits = cursor.constrain(logits)
            spent += time.process_time_ns() - started
            drawn = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
            started = time.process_time_ns()
            for row, token in enumerate(cursor.settle(drawn).tolist()):
                cursor.read(row, token)
            spent += time.process_time_ns() - started
        found[f"batch_{rows}"] = {"us_per_step": spent / steps / 1e3, "states": len(table.states)}
    return found


def cost(args) -> dict:
    plain = MusicTokenizer(build_base_tokenizer(TokenizerConfig()), [])
    # The same vocabulary with bar-control tokens, for the third contender: the grammar with
    # asked controls held on every bar (``bar_guard``) besides it.
    controls = AttributeControlsConfig(attributes=["note_density", "polyphony_max"])
    tokenizer = with_controls(plain, controls)
    plan = ControlPlan.of(tokenizer, "1-64:note_density=8,1-64:polyphony_max=2")
    shape = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model" / f"{args.model}.yaml"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**shape, "vocab_size": tokenizer.vocab_size})).eval()
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.cost_tokens)
    best = {"unmasked": float("inf"), "masked": float("inf"), "masked_held_controls": float("inf")}
    banned = list(tokenizer.control_index.values())
    for repeat in range(args.repeats):
        for name in best:
            grammar = piece_grammar(tokenizer) if name != "unmasked" else None
            steering = None
            if name == "masked_held_controls":
                steering = Steering(plan, tokenizer, grammar.bar_openers, args.batch)
            seeded = dataclasses.replace(sampling, seed=repeat)
            started = time.perf_counter()
            rows = decode(
                model,
                [[tokenizer.bos_id]] * args.batch,
                seeded,
                banned_ids=[] if steering else banned,
                grammar=grammar,
                steering=steering,
            )
            elapsed = time.perf_counter() - started
            new = sum(len(r.tokens) for r in rows) / args.batch
            best[name] = min(best[name], 1000 * elapsed / new)
    return {
        "model": args.model,
        "batch": args.batch,
        "ms_per_token": best,
        "mask_overhead": best["masked"] / best["unmasked"] - 1,
        "held_controls_overhead": best["masked_held_controls"] / best["unmasked"] - 1,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="exported model for the outcome (else untrained)")
    parser.add_argument("--skip-cost", action="store_true", help="outcome and mask alone only")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--temperature", type=float, default=1.2)
    parser.add_argument("--model", default="small_20m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cost-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = {"outcome": outcome(args), "mask_alone": mask_alone()}
    if not args.skip_cost:
        report["cost"] = cost(args)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
