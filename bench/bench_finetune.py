"""Fine-tuning on a small folder of a held-out collection: none vs full vs LoRA (two ranks).

A stand-in base (``--model``, default mini) is trained on music21 collections converted to
MIDI (a folder per collection, as a user's would be) without the held-out one; then fine-tuned
on 25 and on 100 pieces of the held-out collection, each folder prepared with the base's
tokenizer (``tokenizer_from``, a new collection label). Reported per contender: bits per note
on unseen pieces of the held-out collection (with its label where the model has one), on the
base's own test pieces of a control collection (forgetting), trainable parameters, checkpoint
size (DeepSpeed's files), peak RSS of the training process and its wall time.

    python bench/bench_finetune.py --midi <cache>/abc2midi-... --out /tmp/bench-ft
"""

import argparse
import json
import os
import random
import resource
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


def train(data: Path, run_dir: Path, args, steps: int, *extra: str) -> tuple[float, int]:
    return app(
        "mtrain.train", f"data.path={data}", f"run_dir={run_dir}", f"model={args.model}",
        "deepspeed=cpu", "deepspeed.zero_stage=0", "trainer.micro_batch_size=8",
        f"trainer.global_batch_tokens={8 * 256}", "trainer.eval_every=0",
        f"trainer.max_steps={steps}", f"trainer.save_every={steps}", "trainer.log_every=20",
        "data.num_workers=1", "logger.mode=disabled", f"hydra.run.dir={run_dir}", *extra,
    )  # fmt: skip


def bits_per_note(model_dir: Path, dataset: Path, split: str) -> float:
    model, _ = load_exported(model_dir)
    tokenizer = MusicTokenizer.load(str(model_dir / "tokenizer"))
    card = load_card(str(dataset))
    reader = ShardReader(len(tokenizer.base))
    pieces = reader.pieces(split_shares(str(dataset), split, card))
    return evaluate_pieces(model, tokenizer, pieces, batch_size=16)["bits_per_note"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--midi", type=Path, required=True, help="MIDI folder per collection")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-ft"))
    parser.add_argument("--base", nargs="+", default=["oneills1850", "airdsAirs"])
    parser.add_argument("--control", default="oneills1850")
    parser.add_argument("--held-out", default="essenFolksong")
    parser.add_argument("--model", default="mini")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--test-pieces", type=int, default=150)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # The base: the chosen collections, linked as a user's folder (a collection per folder).
    for name in args.base:
        link_folder(sorted((args.midi / name).rglob("*.mid")), out / "base_midi" / name)
    base_ds = prepare(out / "base_midi", out / "base_ds", "split.val=0.02", "split.test=0.05")
    base_export = out / "base_export"
    if not (base_export / "model.safetensors").exists():
        wall, rss = train(base_ds, out / "base_run", args, args.base_steps, "optim.lr=3e-3",
                          "optim.warmup_steps=50")  # fmt: skip
        print(f"base: {args.base_steps} steps in {wall:.0f} s, peak RSS {rss} MiB", flush=True)
        app("mtrain.export", f"checkpoint={out / 'base_run'}", f"output={base_export}")
    held = sorted((args.midi / args.held_out).rglob("*.mid"))
    random.Random(0).shuffle(held)
    test = held[: args.test_pieces]
    test_folder = link_folder(test, out / "test_midi" / "new")
    test_ds = prepare(test_folder, out / "test_ds", f"tokenizer_from={base_export}",
                      "split.val=0", "split.test=0.99")  # fmt: skip
    rows = [{"size": 0, "method": "none", "new": bits_per_note(base_export, test_ds, "test"),
             "control": bits_per_note(base_export, base_ds, "test"), "trainable": None,
             "ckpt_mb": None, "rss_mb": None, "wall_s": None}]  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    methods = {
        "full": ["optim.lr=3e-4"],
        "lora r=8": ["finetune=lora", "finetune.rank=8", "finetune.alpha=16", "optim.lr=3e-3"],
        "lora r=16": ["finetune=lora", "finetune.rank=16", "finetune.alpha=32", "optim.lr=3e-3"],
    }
    for size in args.sizes:
        pieces = held[args.test_pieces : args.test_pieces + size]
        ds = prepare(link_folder(pieces, out / f"ft{size}_midi" / "new"), out / f"ft{size}_ds",
                     f"tokenizer_from={base_export}", "split.val=0.1", "split.test=0")  # fmt: skip
        for method, extra in methods.items():
            run_dir = out / f"ft{size}-{method.replace(' ', '').replace('=', '')}"
            wall, rss = train(ds, run_dir, args, args.steps, f"init_from={base_export}",
                              "optim.warmup_steps=10", *extra)  # fmt: skip
            log = (run_dir / "train-rank0.log").read_text()
            trainable = None
            if "trainable" in log:
                trainable = log.split("parameters trainable (")[1].split(")")[0]
            ckpt = run_dir / "checkpoints" / f"step_{args.steps:08d}"
            ckpt_mb = sum(f.stat().st_size for f in ckpt.glob("*_states.pt")) / 2**20
            export = run_dir / "export"
            app("mtrain.export", f"checkpoint={run_dir}", f"output={export}")
            rows.append({"size": size, "method": method,
                         "new": bits_per_note(export, test_ds, "test"),
                         "control": bits_per_note(export, base_ds, "test"),
                         "trainable": trainable or "100%", "ckpt_mb": round(ckpt_mb, 3),
                         "rss_mb": rss, "wall_s": round(wall, 1)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(
        "| pieces | method | bits/note new style | bits/note control | trainable | checkpoint MB "
        "| peak RSS MB | wall s |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        print(
            f"| {r['size']} | {r['method']} | {r['new']:.3f} | {r['control']:.3f} | "
            f"{r['trainable'] or '-'} | {r['ckpt_mb'] or '-'} | {r['rss_mb'] or '-'} | "
            f"{r['wall_s'] or '-'} |"
        )


if __name__ == "__main__":
    main()
