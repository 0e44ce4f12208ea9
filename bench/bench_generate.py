"""Generation and musical-metric speed, each against a peer measured in the same run.

1. Tokens/s generating exactly ``--tokens`` new tokens (1024) per row: mtrain's ``generate``
   with the KV cache vs without it (goal >= 5x), and vs Hugging Face ``transformers``'
   ``GPT2LMHeadModel.generate`` (its own KV cache) on the same exported weights (goal >=
   1.0x). The model is the ``small_20m`` shape with learned positions and a REMI-sized
   vocabulary, seeded random weights saved and loaded the way ``mtrain.export`` does, or an
   exported model given with ``--checkpoint``. Each method runs ``--repeats`` times,
   interleaved, and keeps its best; the uncached loop, minutes long, runs once.
2. Pieces/s and notes/s of the full musical metric set (``music_metrics.compute_all``) over
   procedural pieces (tests/support/midi_factory.py) and, with ``--dataset``, a prepared dataset.

    python bench/bench_generate.py
    python bench/bench_generate.py --batch 1 4 --json gen.json
    python bench/bench_generate.py --checkpoint exports/run1 --uncached-tokens 256
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_model

from data_pipeline.config import TokenizerConfig
from data_pipeline.tokenizer import SPECIAL_TOKENS, build_base_tokenizer
from mtrain.evaluation.music_metrics import METRICS, compute_all
from mtrain.exported.loading import load_exported
from mtrain.exported.transformers_format import to_hf
from mtrain.exported.writing import CONFIG, WEIGHTS
from mtrain.generation.decoding import decode
from mtrain.generation.sampling import SamplingConfig
from mtrain.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
PAD, BOS, EOS = (SPECIAL_TOKENS.index(name) for name in ("PAD", "BOS", "EOS"))
GREEDY_CHECK = 32  # tokens both libraries decode greedily, to show the weights are the same
LABELS = {
    "cached": "mtrain, KV cache",
    "hf": "HF generate, its cache",
    "uncached": "mtrain, no cache",
    "cached_at_uncached_length": "mtrain, KV cache",
}


def exported_model(args, tmp: Path) -> tuple[GPT, Path]:
    """The model as ``mtrain.export`` leaves it, and the directory it was loaded from."""
    if args.checkpoint:
        return load_exported(args.checkpoint)[0], Path(args.checkpoint)
    shape = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model" / f"{args.model}.yaml"))
    vocab_size = len(build_base_tokenizer(TokenizerConfig()).vocab)
    cfg = GPTConfig(
        **{
            **shape,
            "vocab_size": vocab_size,
            "positional": "learned",
            "max_seq_len": max(shape["max_seq_len"], 1 + args.tokens),
        }
    )
    torch.manual_seed(args.seed)
    out = tmp / "export"
    out.mkdir()
    save_model(GPT(cfg), str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps({"model": dataclasses.asdict(cfg)}))
    return load_exported(out)[0], out


def hf_peer(model: GPT, export_dir: Path, tmp: Path):
    """The transformers model of the export's ``hf/`` (written here when missing)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hf_dir = export_dir / "hf"
    if not (hf_dir / "config.json").exists():
        hf_dir = tmp / "hf"
        to_hf(model).save_pretrained(str(hf_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    hf.generation_config.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return hf


def ours(model: GPT, batch: int, tokens: int, sampling: SamplingConfig, cached: bool) -> None:
    sampling = dataclasses.replace(sampling, max_new_tokens=tokens)
    rows = decode(model, [[BOS]] * batch, sampling, None, banned_ids=[EOS], use_cache=cached)
    assert all(len(row.tokens) == tokens for row in rows), "a row stopped early"


def theirs(hf, batch: int, tokens: int, sampling: SamplingConfig) -> torch.Tensor:
    """HF generate with its cache; min_new_tokens bans EOS as ``banned_ids`` does ours."""
    torch.manual_seed(sampling.seed)
    greedy = sampling.temperature == 0
    prompt = torch.full((batch, 1), BOS)
    with torch.inference_mode():
        out = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_k=None if greedy else sampling.top_k,
            top_p=None,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            use_cache=True,
        )
    assert out.shape == (batch, 1 + tokens), out.shape
    return out[:, 1:]


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def greedy_agreement(model: GPT, hf) -> int:
    """How many leading greedy tokens the two libraries agree on: the same weights agree on
    all but a near-tie of two logits."""
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=GREEDY_CHECK)
    mine = decode(model, [[BOS]], greedy, None, banned_ids=[EOS])[0].tokens
    peer = theirs(hf, 1, GREEDY_CHECK, greedy)[0].tolist()
    return next((i for i, (a, b) in enumerate(zip(mine, peer, strict=True)) if a != b), len(mine))


def bench_batch(args, model: GPT, hf, batch: int, sampling: SamplingConfig) -> dict:
    """Best seconds of each method at one batch size, methods interleaved."""
    methods = {
        "cached": lambda n: ours(model, batch, n, sampling, cached=True),
        "hf": lambda n: theirs(hf, batch, n, sampling),
    }
    for run in methods.values():
        run(16)  # warm-up: allocator, oneDNN/MKL kernels, HF's generation config
    best = {name: float("inf") for name in methods}
    for _ in range(args.repeats):
        for name, run in methods.items():
            best[name] = min(best[name], seconds(lambda run=run: run(args.tokens)))
    result = {name: {"tokens": args.tokens, "seconds": s} for name, s in best.items()}
    if args.uncached_tokens and batch in args.uncached_batch:
        n = args.uncached_tokens
        result["uncached"] = {
            "tokens": n,
            "seconds": seconds(lambda: ours(model, batch, n, sampling, cached=False)),
        }
        if n != args.tokens:  # the cache's speed-up is compared at the same length
            short = min(seconds(lambda: methods["cached"](n)) for _ in range(args.repeats))
            result["cached_at_uncached_length"] = {"tokens": n, "seconds": short}
    for row in result.values():
        row["tokens_per_s"] = batch * row["tokens"] / row["seconds"]
    return result


def ratios(result: dict) -> dict:
    """The cache's speed-up at the uncached loop's length, and mtrain against HF."""
    out = {}
    if "uncached" in result:
        cached = result.get("cached_at_uncached_length", result["cached"])
        out["cached_vs_uncached"] = cached["tokens_per_s"] / result["uncached"]["tokens_per_s"]
    if "hf" in result:
        out["cached_vs_hf"] = result["cached"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    return out


def pass_or_miss(ratio: float, goal: float) -> str:
    return f"{ratio:.2f}x (goal >= {goal:.1f}x: {'PASS' if ratio >= goal else 'MISS'})"


def generation_report(args, model: GPT, hf) -> dict:
    cfg = model.config
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(
        f"model: {cfg.n_layer} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"positional={cfg.positional}; fp32, "
        f"{torch.get_num_threads()} threads; temperature {sampling.temperature}, top_k "
        f"{sampling.top_k}, prompt [BOS], EOS banned so every row gets {args.tokens} tokens"
    )
    report = {
        "model": dataclasses.asdict(cfg),
        "sampling": dataclasses.asdict(sampling),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "load_average_before": os.getloadavg()[0],
        "batches": {},
    }
    agree = greedy_agreement(model, hf)
    print(f"same weights: greedy decoding agrees on {agree}/{GREEDY_CHECK} tokens with HF")
    report["greedy_agreement"] = agree
    print(f"\n{'batch':>5} {'method':<30} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for batch in args.batch:
        result = bench_batch(args, model, hf, batch, sampling)
        for name, row in result.items():
            print(
                f"{batch:>5} {LABELS[name]:<30} {row['tokens']:>7} {row['seconds']:>8.2f} "
                f"{row['tokens_per_s']:>9.1f}"
            )
        report["batches"][batch] = {**result, "ratios": ratios(result)}
    report["load_average_after"] = os.getloadavg()[0]
    print()
    for batch, row in report["batches"].items():
        if "cached_vs_uncached" in row["ratios"]:
            verdict = pass_or_miss(row["ratios"]["cached_vs_uncached"], 5.0)
            print(
                f"batch {batch}, KV cache vs none at {row['uncached']['tokens']} tokens: {verdict}"
            )
        if "cached_vs_hf" in row["ratios"]:
            verdict = pass_or_miss(row["ratios"]["cached_vs_hf"], 1.0)
            print(f"batch {batch}, mtrain vs HF generate at {args.tokens} tokens: {verdict}")
    print(
        f"1-minute load average {report['load_average_before']:.1f} before, "
        f"{report['load_average_after']:.1f} after; this bench's own {report['threads']} "
        "threads count for about as many, more means other work shared the CPU"
    )
    return report


def dataset_scores(path: str, limit: int) -> list:
    """Up to ``limit`` training pieces of a prepared dataset, decoded to scores."""
    from data_pipeline.reader import SKIP, ShardReader, split_shares
    from mtrain.data.loader import DataConfig, open_dataset

    card, tokenizer = open_dataset(DataConfig(path=path))
    reader = ShardReader(len(tokenizer.base), SKIP)
    scores = []
    for shard in split_shares(path, "train", card):
        for piece in reader.read(shard):
            if piece is not None:
                scores.append(tokenizer.base_ids_to_midi(piece.tokens))
            if len(scores) == limit:
                return scores
    return scores


def metrics_row(name: str, scores: list) -> dict:
    """Seconds of compute_all over ``scores`` (best of two passes), and of each metric."""
    best = min(seconds(lambda: [compute_all(s) for s in scores]) for _ in range(2))
    notes = sum(t.note_num() for s in scores for t in s.tracks if not t.is_drum)
    per_metric = {
        metric: seconds(lambda f=f: [f(s) for s in scores]) / len(scores)
        for metric, f in METRICS.items()
    }
    print(
        f"{name:<28} {len(scores):>7} {notes / len(scores):>7.0f} "
        f"{len(scores) / best:>9.1f} {notes / best:>11,.0f}"
    )
    return {
        "pieces": len(scores),
        "pitched_notes": notes,
        "seconds": best,
        "pieces_per_s": len(scores) / best,
        "notes_per_s": notes / best,
        "seconds_per_piece_by_metric": per_metric,
    }


def metrics_report(args) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from support.midi_factory import piece

    from data_pipeline.midi_file import read_score

    # Through a MIDI file and back, as the metrics see generated music; 8 to 64 bars.
    procedural = [
        read_score(piece(seed, bars=8 + seed % 57).dumps_midi()) for seed in range(args.pieces)
    ]
    print(f"\nmusical metrics, all {len(METRICS)} of compute_all, one process:")
    print(f"{'pieces':<28} {'count':>7} {'notes':>7} {'pieces/s':>9} {'notes/s':>11}")
    report = {"procedural": metrics_row("procedural (midi_factory)", procedural)}
    if args.dataset:
        report["dataset"] = metrics_row(args.dataset, dataset_scores(args.dataset, args.pieces))
    slowest = sorted(
        report["procedural"]["seconds_per_piece_by_metric"].items(), key=lambda kv: -kv[1]
    )[:3]
    print(
        "slowest metrics (ms per piece): "
        + ", ".join(f"{name} {s * 1e3:.2f}" for name, s in slowest)
    )
    return report


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="an exported model dir instead of random weights")
    p.add_argument("--model", default="small_20m", help="conf/model shape (default small_20m)")
    p.add_argument("--tokens", type=int, default=1024, help="new tokens per row")
    p.add_argument(
        "--uncached-tokens",
        type=int,
        default=None,
        help="new tokens for the uncached loop (default --tokens; 0 skips it)",
    )
    p.add_argument(
        "--uncached-batch",
        type=int,
        nargs="+",
        default=[1],
        help="batch sizes that also time the uncached loop (default 1)",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pieces", type=int, default=300, help="pieces for the metrics")
    p.add_argument("--dataset", help="a prepared dataset whose pieces are also measured")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.uncached_tokens is None:
        args.uncached_tokens = args.tokens
    return args


def main() -> None:
    args = parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, export_dir = exported_model(args, Path(tmp))
        limit = model.config.max_seq_len - 1
        if max(args.tokens, args.uncached_tokens) > limit:
            sys.exit(
                f"the model holds {limit + 1} positions: at most {limit} new tokens after BOS; "
                "pass a smaller --tokens and --uncached-tokens"
            )
        hf = hf_peer(model, export_dir, Path(tmp))
        result["generation"] = generation_report(args, model, hf)
    result["metrics"] = metrics_report(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nresults in {args.json}")


if __name__ == "__main__":
    main()
