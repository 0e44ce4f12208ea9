"""Fine-tuning on a small folder of a held-out collection: none vs full vs LoRA.

The base is either an export given with ``--base-export`` (and the dataset it was trained on,
``--base-data``: for the measurement in bench/README.md, the reference recipe trained on
music21:all without Palestrina, ``bench/reference_model.sh`` with ``HELD_OUT=palestrina``), or
a stand-in (``--model``, default mini) trained here on music21 collections converted to MIDI (a
folder per collection, as a user's would be) without the held-out one. Then it is fine-tuned on
25 and on 100 pieces of the held-out collection, each folder prepared with the base's tokenizer
(``tokenizer_from``; the folder's name becomes a new collection label). Every contender trains
with early stopping on its own validation pieces (the best checkpoint is exported), and each
learning rate of its list is tried: the one with the lowest validation loss is the one
reported, so that no method is judged at another's learning rate. Reported per contender: bits
per note on unseen pieces of the held-out collection (with its label where the model has one),
on the base's own test split (forgetting), trainable parameters, checkpoint size (DeepSpeed's
files), peak RSS of the training process and its wall time; LoRA with each
``--embedding-rows`` setting. ``--shares`` prints instead the
trainable share of LoRA on the cluster's model sizes (built on the meta device).

    python bench/bench_finetune.py --midi ~/.cache/mtrain/music21-10.5.1 --held-out palestrina \
        --base-export runs/reference-nopal/export --base-data data/music21-nopal --out runs/ft
    python bench/bench_finetune.py --shares
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.reader import ShardReader, load_card, split_shares  # noqa: E402
from data_pipeline.tokenizer import MusicTokenizer  # noqa: E402
from mtrain.evaluation.likelihood import evaluate_pieces  # noqa: E402
from mtrain.exported.loading import load_exported  # noqa: E402

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}


def app(*args: str) -> tuple[float, int]:
    """Runs ``python -m <app> ...``; (wall seconds, peak RSS in MiB of its largest child)."""
    start = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.monotonic() - start, max(peak, before) // 1024


def link_folder(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = folder / f.name
        if not target.exists():
            target.symlink_to(f)
    return folder.parent


def prepare(source: Path, output: Path, *extra: str) -> Path:
    if not (output / "dataset.json").exists():
        app("data_pipeline.prepare", f"source={source}", f"output={output}", "workers=2",
            f"hydra.run.dir={output}.hydra", *extra)  # fmt: skip
    return output


def train(data: Path, run_dir: Path, steps: int, *extra: str) -> tuple[float, int]:
    return app(
        "mtrain.train", f"data.path={data}", f"run_dir={run_dir}",
        "deepspeed=cpu", "deepspeed.zero_stage=0", "trainer.micro_batch_size=8",
        f"trainer.global_batch_tokens={8 * 256}", f"trainer.max_steps={steps}",
        "trainer.log_every=20", "data.num_workers=1", "logger.mode=disabled",
        f"hydra.run.dir={run_dir}", *extra,
    )  # fmt: skip


def bits_per_note(model_dir: Path, dataset: Path, split: str) -> float:
    model, _ = load_exported(model_dir)
    tokenizer = MusicTokenizer.load(str(model_dir / "tokenizer"))
    card = load_card(str(dataset))
    reader = ShardReader(len(tokenizer.base))
    pieces = reader.pieces(split_shares(str(dataset), split, card))
    return evaluate_pieces(model, tokenizer, pieces, batch_size=16)["bits_per_note"]


def lora(rank: int, targets: str) -> list[str]:
    return ["finetune=lora", f"finetune.rank={rank}", f"finetune.alpha={2 * rank}",
            f"finetune.targets=[{targets}]"]  # fmt: skip


def shares() -> None:
    """LoRA's trainable share on the model sizes a cluster runs (and the reference's)."""
    import dataclasses

    import torch
    import yaml

    from mtrain.model import GPT, GPTConfig
    from mtrain.training.adapters import (
        FinetuneConfig,
        FinetuneMethod,
        add_adapters,
        trainable_share,
    )

    print("| model | targets | r | trainable | share |\n| --- | --- | --- | --- | --- |")
    for name in ("scaling", "small_20m", "gpt_125m", "gpt_350m", "gpt_760m"):
        shape = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
        if name == "scaling":
            shape = {"depth": 8, "aspect_ratio": 16, "max_seq_len": 256}
            name = "scaling depth 8 (the reference)"
        config = dataclasses.replace(GPTConfig(**shape), vocab_size=600)
        for targets in (["attn"], ["attn", "mlp"]):
            for rank in (8, 16):
                with torch.device("meta"):
                    model = GPT(config)
                cfg = FinetuneConfig(FinetuneMethod.lora, rank, 2 * rank, targets=targets)
                n, total = trainable_share(add_adapters(model, cfg, seed=0))
                print(f"| {name} | {'+'.join(targets)} | {rank} | {n:,} | {100 * n / total:.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", action="store_true", help="only the trainable shares")
    parser.add_argument("--midi", type=Path, help="MIDI folder per collection")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-ft"))
    parser.add_argument("--base-export", type=Path, help="a trained base (else one is trained)")
    parser.add_argument("--base-data", type=Path, help="the dataset --base-export trained on")
    parser.add_argument("--base", nargs="+", default=["oneills1850", "airdsAirs"])
    parser.add_argument("--held-out", default="essenFolksong")
    parser.add_argument("--model", default="mini", help="the stand-in base's shape")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300, help="at most, with early stopping")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--full-lrs", default="1e-4,3e-4", help="tried; the best by val loss")
    parser.add_argument("--lora-lrs", default="1e-3,3e-3")
    parser.add_argument("--targets", nargs="+", default=["attn,mlp"],
                        help="LoRA's finetune.targets, one set per contender")  # fmt: skip
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--embedding-rows", nargs="+", default=["none", "unlearned"],
                        help="finetune.embedding_rows, one LoRA contender each")  # fmt: skip
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--test-pieces", type=int, default=150)
    args = parser.parse_args()
    if args.shares:
        return shares()
    if args.midi is None:
        parser.error("--midi is required (a MIDI folder per collection)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.base_export:
        base_export, base_ds = args.base_export, args.base_data
        if base_ds is None:
            parser.error("--base-export needs --base-data (the dataset it trained on)")
    else:  # a stand-in: the chosen collections, linked as a user's folder (one per collection)
        for name in args.base:
            link_folder(sorted((args.midi / name).rglob("*.mid")), out / "base_midi" / name)
        base_ds = prepare(out / "base_midi", out / "base_ds", "split.val=0.02", "split.test=0.05")
        base_export = out / "base_export"
        if not (base_export / "model.safetensors").exists():
            wall, rss = train(base_ds, out / "base_run", args.base_steps, f"model={args.model}",
                              "optim.lr=3e-3", "optim.warmup_steps=50",
                              f"trainer.save_every={args.base_steps}")  # fmt: skip
            print(f"base: {args.base_steps} steps in {wall:.0f} s, peak RSS {rss} MiB", flush=True)
            app("mtrain.export", f"checkpoint={out / 'base_run'}", f"output={base_export}")
    held = sorted((args.midi / args.held_out).rglob("*.mid"))
    random.Random(0).shuffle(held)
    test = held[: args.test_pieces]
    test_folder = link_folder(test, out / "test_midi" / args.held_out)
    test_ds = prepare(test_folder, out / "test_ds", f"tokenizer_from={base_export}",
                      "split.val=0", "split.test=0.99")  # fmt: skip
    rows = [{"size": 0, "method": "none", "lr": None,
             "new": bits_per_note(base_export, test_ds, "test"),
             "control": bits_per_note(base_export, base_ds, "test"), "trainable": None,
             "ckpt_mb": None, "rss_mb": None, "wall_s": None, "steps": None}]  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    lrs = {"full": args.full_lrs.split(","), "lora": args.lora_lrs.split(",")}
    methods = {"full": ("full", [])}
    for targets in args.targets:
        for rank in args.ranks:
            name = f"lora r={rank} {targets.replace(',', '+')}"
            for which in args.embedding_rows:
                # (The names of runs made before the setting existed: none, and all.)
                suffix = {"none": "", "all": " +embedding"}.get(which, f" +{which} rows")
                methods[name + suffix] = (
                    "lora", [*lora(rank, targets), f"finetune.embedding_rows={which}"])  # fmt: skip
    stopping = [f"trainer.eval_every={args.eval_every}", "trainer.eval_batches=20",
                f"trainer.early_stop_patience={args.patience}",
                f"trainer.save_every={args.steps}", "optim.warmup_steps=10"]  # fmt: skip
    for size in args.sizes:
        pieces = held[args.test_pieces : args.test_pieces + size]
        ds = prepare(link_folder(pieces, out / f"ft{size}_midi" / args.held_out),
                     out / f"ft{size}_ds", f"tokenizer_from={base_export}", "split.val=0.15",
                     "split.test=0")  # fmt: skip
        for method, (kind, extra) in methods.items():
            tried = {}
            for lr in lrs[kind]:
                run_dir = (
                    out
                    / f"ft{size}-{method.replace(' ', '').replace('=', '').replace('+', '')}-lr{lr}"
                )
                if not (run_dir / "best.json").exists():
                    shutil.rmtree(run_dir, ignore_errors=True)
                    wall, rss = train(ds, run_dir, args.steps,
                                      f"init_from={base_export}", f"optim.lr={lr}", *stopping,
                                      *extra)  # fmt: skip
                    (run_dir / "bench.json").write_text(json.dumps({"wall": wall, "rss": rss}))
                best = json.loads((run_dir / "best.json").read_text())["best"]
                tried[lr] = (best["loss"], best["step"], run_dir)
                print(f"{size} {method} lr {lr}: best val loss {best['loss']:.4f} at step "
                      f"{best['step']}", flush=True)  # fmt: skip
            lr = min(tried, key=lambda k: tried[k][0])
            _, step, run_dir = tried[lr]
            timing = json.loads((run_dir / "bench.json").read_text())
            log = (run_dir / "train-rank0.log").read_text()
            trainable = None
            if "trainable" in log:
                trainable = log.split("parameters trainable (")[1].split(")")[0]
            ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
            ckpt_mb = sum(f.stat().st_size for f in ckpt.rglob("*.pt")) / 2**20
            export = run_dir / "export"
            if not (export / "model.safetensors").exists():
                app("mtrain.export", f"checkpoint={run_dir}", f"output={export}")
            rows.append({"size": size, "method": method, "lr": lr,
                         "new": bits_per_note(export, test_ds, "test"),
                         "control": bits_per_note(export, base_ds, "test"),
                         "trainable": trainable or "100%", "ckpt_mb": round(ckpt_mb, 3),
                         "rss_mb": timing["rss"], "wall_s": round(timing["wall"], 1),
                         "steps": step})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    report(rows)


def report(rows: list[dict]) -> None:
    print(
        "| pieces | method | lr | best step | bits/note new style | bits/note control | trainable "
        "| checkpoint MB | peak RSS MB | wall s |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        print(
            f"| {r['size']} | {r['method']} | {r['lr'] or '-'} | {r['steps'] or '-'} | "
            f"{r['new']:.3f} | {r['control']:.3f} | {r['trainable'] or '-'} | "
            f"{r['ckpt_mb'] or '-'} | {r['rss_mb'] or '-'} | {r['wall_s'] or '-'} |"
        )
    base = rows[0]
    for size in sorted({r["size"] for r in rows if r["size"]}):
        full = next(r for r in rows if r["size"] == size and r["method"] == "full")
        gain = base["new"] - full["new"]
        for r in rows:
            if r["size"] == size and r["method"] != "full":
                share = (base["new"] - r["new"]) / gain if gain > 0 else float("nan")
                print(f"{size} pieces, {r['method']}: {100 * share:.0f}% of full's gain; "
                      f"checkpoint {100 * r['ckpt_mb'] / full['ckpt_mb']:.1f}% of full's; "
                      f"forgetting {r['control'] - base['control']:+.3f} vs full's "
                      f"{full['control'] - base['control']:+.3f} bits/note")  # fmt: skip


if __name__ == "__main__":
    main()
