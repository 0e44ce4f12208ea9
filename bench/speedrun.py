"""The speedrun: wall-clock on this machine's 2 CPU cores, from an empty run directory, until a
model's test bits per note on the Bach chorales reach a target (the quickstart's 4.90).

    python bench/speedrun.py data/bach --recipes quickstart record --seeds 0 1 2
    python bench/speedrun.py data/bach --recipes quickstart one_rank wsd --seeds 0

Each recipe (``RECIPES``: the quickstart's training, each change on its own, and the record,
which combines them) trains from an empty run directory with a checkpoint every
``--check-every`` steps and nothing else (no validation, no samples: the same for every
recipe). Afterwards every checkpoint is exported and scored on the test split (every piece,
as ``mtrain.evaluate`` scores them); the time to the target is the wall clock from launching
the training to the end of the first step whose checkpoint reaches it (start-up included,
the scoring not). Per recipe: the median over seeds and the spread, and the ratio of the
baseline's median to it (``--baseline``, measured in the same run of the bench; ``packed``,
the quickstart's recipe as it was before the loader shuffled its windows, by default).
"""

import argparse
import json
import os
import shutil
import statistics
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

# The quickstart's training (bin/quickstart) without its validation and samples.
QUICKSTART = [
    "model=mini", "deepspeed=cpu", "trainer.micro_batch_size=4",
    "trainer.global_batch_tokens=2048", "optim.warmup_steps=50", "optim.lr=2e-3",
    "data.infill_rate=0.1", "trainer.max_steps=1200",
]  # fmt: skip
# name: (ranks, overrides replacing the quickstart's of the same key, or added)
RECIPES: dict[str, tuple[int, list[str]]] = {
    "quickstart": (2, []),
    # The quickstart as it was before the loader shuffled its packed windows (session 6): a
    # step's windows then continued the pieces of the step before.
    "packed": (2, ["data.window_shuffle=1"]),
    # One process with both cores' threads: no ZeRO-3 gathers, no gradient all-reduce.
    "one_rank": (1, ["deepspeed.zero_stage=0"]),
    # Warmup-stable-decay: the high rate held until the last fifth (optim=wsd).
    "wsd": (2, ["optim.schedule=wsd"]),
    "lr_4e-3": (2, ["optim.lr=4e-3"]),
    "batch_4096": (2, ["trainer.global_batch_tokens=4096", "trainer.micro_batch_size=8"]),
    # A shorter schedule: the rate decays to its end sooner.
    "steps_800": (2, ["trainer.max_steps=800"]),
    "one_rank_800": (1, ["deepspeed.zero_stage=0", "trainer.max_steps=800"]),
    "record": (1, ["deepspeed.zero_stage=0", "optim.schedule=wsd", "optim.lr=4e-3"]),
}


def with_changes(base: list[str], changes: list[str]) -> list[str]:
    keys = {c.split("=")[0] for c in changes}
    return [o for o in base if o.split("=")[0] not in keys] + changes


def train(dataset: str, run_dir: Path, recipe: str, seed: int, every: int) -> float:
    """Trains from an empty ``run_dir``; returns the wall-clock time of the launch."""
    ranks, changes = RECIPES[recipe]
    overrides = with_changes(QUICKSTART, changes)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": str(2 // ranks)}  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", "-m", "mtrain.train", f"data.path={dataset}",
           f"run_dir={run_dir}", *overrides, f"trainer.seed={seed}",
           f"trainer.save_every={every}", "trainer.keep_last=1000",
           "trainer.eval_every=0", "trainer.sample_every=0", "trainer.log_every=100",
           "logger.mode=disabled", f"hydra.run.dir={run_dir}"]  # fmt: skip
    launched = time.time()
    log = run_dir.parent / f"{run_dir.name}.log"
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code.returncode:
        raise SystemExit(f"{recipe} seed {seed} exited {code.returncode}: see {log}")
    return launched


def bits_per_note(export: Path, dataset: str) -> float:
    model, _ = load_exported(export)
    tokenizer = MusicTokenizer.load(str(export / "tokenizer"))
    card = load_card(dataset)
    pieces = ShardReader(len(tokenizer.base)).pieces(split_shares(dataset, "test", card))
    return evaluate_pieces(model, tokenizer, pieces, batch_size=16)["bits_per_note"]


def time_to_target(
    run_dir: Path, launched: float, dataset: str, target: float, scored: dict[int, float]
) -> dict:
    """The first checkpoint that reaches ``target``, found by bisection over the checkpoints
    (test bits per note fall with the steps of a run: the curve scored is reported).
    ``scored``: checkpoint index -> bits per note already measured (filled in)."""
    times = {r["step"]: r["time"] for r in map(json.loads, (run_dir / "metrics.jsonl").open())}
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))

    def bits(i: int) -> float:
        ckpt = ckpts[i]
        if i not in scored:
            export = run_dir / "exports" / ckpt.name
            command = [sys.executable, "-m", "mtrain.export", f"checkpoint={ckpt}",
                       f"output={export}"]  # fmt: skip
            subprocess.run(command, cwd=REPO, check=True, capture_output=True)
            scored[i] = bits_per_note(export, dataset)
        return scored[i]

    low, high = 0, len(ckpts)  # the first index at or under the target, len(ckpts) if none
    while low < high:
        middle = (low + high) // 2
        if bits(middle) <= target:
            high = middle
        else:
            low = middle + 1
    curve = [(int(ckpts[i].name.split("_")[1]), round(b, 3)) for i, b in sorted(scored.items())]
    if low == len(ckpts):
        return {"seconds": None, "step": None, "bits": min(scored.values()), "curve": curve}
    step = int(ckpts[low].name.split("_")[1])
    return {"seconds": times[step] - launched, "step": step, "bits": scored[low], "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", default="data/bach")
    parser.add_argument("--recipes", nargs="+", default=["quickstart", "record"],
                        choices=sorted(RECIPES))  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[4.90],
                        help="test bits per note; one table each, from the same runs")  # fmt: skip
    parser.add_argument("--check-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("/tmp/speedrun"))
    parser.add_argument("--baseline", default="packed",
                        help="the recipe the others are timed against, when it runs")  # fmt: skip
    args = parser.parse_args()
    results: dict[float, dict[str, list[dict]]] = {t: {} for t in args.targets}
    for seed in args.seeds:  # seed by seed: a recipe's runs spread over the bench's time
        for recipe in args.recipes:
            run_dir = args.out / f"{recipe}-seed{seed}"
            launched = train(args.dataset, run_dir, recipe, seed, args.check_every)
            scored: dict[int, float] = {}
            for target in args.targets:
                found = time_to_target(run_dir, launched, args.dataset, target, scored)
                found.update(recipe=recipe, seed=seed, target=target)
                results[target].setdefault(recipe, []).append(found)
                print(json.dumps(found), flush=True)
    named = {str(t): by_recipe for t, by_recipe in results.items()}
    (args.out / "results.json").write_text(json.dumps(named, indent=2))
    for target, by_recipe in results.items():
        table(by_recipe, target, args)


def table(results: dict[str, list[dict]], target: float, args) -> None:
    baseline = args.baseline if args.baseline in results else next(iter(results))
    reference = None
    print(f"\ntarget {target} test bits per note on {args.dataset}; seeds {args.seeds}")
    print(f"| recipe | median s | spread s | steps | vs {baseline} |")
    print("| --- | --- | --- | --- | --- |")
    ordered = [baseline] + [r for r in results if r != baseline]
    for recipe, runs in ((r, results[r]) for r in ordered):
        seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
        if len(seconds) < len(runs):
            print(f"| {recipe} | not reached by {len(runs) - len(seconds)} seed(s) "
                  f"(best {min(r['bits'] for r in runs):.3f}) | | | |")  # fmt: skip
            continue
        median = statistics.median(seconds)
        reference = median if recipe == baseline else reference
        ratio = f"{reference / median:.2f}x" if reference else "-"
        steps = "/".join(str(r["step"]) for r in runs)
        print(f"| {recipe} | {median:.0f} | {min(seconds):.0f}-{max(seconds):.0f} | {steps} | "
              f"{ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
