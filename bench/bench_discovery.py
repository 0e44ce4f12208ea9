"""Discovery measured on a prepared corpus: probes, a contrastive stage, retrieval and search.

Given a dataset (``--data``, e.g. ``music21:all`` prepared) and an exported language model
(``--model``), runs the apps as a user does and gathers one report (``<out>/discovery.md`` and
``discovery.json``):

1. ``lm``: ``mtrain.embed`` of the language model with the probe suite on every label kind,
   against its baselines (pitch-class histogram, handcrafted features, a randomly initialised
   model of its shape), over a random sample of ``--pieces`` pieces (``embed sample=``, seed
   ``--seed``: the same pieces for every feature and both models).
2. ``contrastive``: ``objective=contrastive init_from=<model>`` for as many steps as
   ``--contrastive-cpu-s`` CPU seconds buy (the CPU seconds of a step measured by a short run
   first), exported, then embedded as in 1 (the mean-pooled language model is one more
   baseline) with the rate at which two views of a held-out piece rank each other first.
3. ``index``: every piece (or a sample of ``--index-pieces``) embedded by the contrastive
   model (the language model without stage 2), probes off: embedding throughput (pieces/s of
   model time) and the faiss index's build time and query latency on the real pieces
   (``bench/bench_search.py --index``).
4. ``synthetic``: ``bench/bench_search.py --synthetic N`` at the model's width (exact and
   HNSW, which ``search_index`` picks past ``APPROXIMATE_FROM`` pieces): random vectors, and
   (after stage 3) vectors drawn like stage 3's real embeddings (``--like``).

A stage whose output is there is not run again (delete its directory to redo it). Run it
niced on a shared machine::

    nice -n 5 python bench/bench_discovery.py --data /work/data/music21_all \\
        --model runs/ref/export --out /tmp/discovery --pieces 2000 --contrastive-cpu-s 600
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
STAGES = ("lm", "contrastive", "index", "synthetic")
# The short contrastive run that measures a step's CPU seconds: its first steps (start-up,
# the first batches) are left out of the rate.
CALIBRATION_STEPS, CALIBRATION_SKIP = 8, 3
# Contrastive training: the rate the README's example uses.
CONTRASTIVE_LR = 3e-4
# The probe and retrieval scores' features, in report order (mtrain.evaluation.pooling).
SYMBOLIC = ("handcrafted", "pitch_classes")
GOAL_POINTS, GOAL_TASKS = 0.10, 3


def app(log: Path, *args: str) -> dict:
    """Runs ``python -m <app> ...`` with its output in ``log``; its wall and CPU seconds."""
    started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    print("$ python -m " + " ".join(args), flush=True)
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", *args], cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT
        )
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed ({proc.returncode}); its output: {log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": round(time.monotonic() - started, 1), "cpu_s": round(cpu, 1)}


def model_overrides(export: Path) -> list[str]:
    """The exported model's shape as ``model.*`` overrides (init_from needs the same shape)."""
    shape = json.loads((export / "config.json").read_text())["model"]
    return [
        f"model.{key}={'null' if value is None else value}"
        for key, value in shape.items()
        if key != "vocab_size"
    ]


def embed(args, out: Path, checkpoint: Path, *extra: str) -> dict:
    if not (out / "report.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        cost = app(
            out / "embed.log",
            "mtrain.embed",
            f"checkpoint={checkpoint}",
            f"data_path={args.data}",
            f"output={out}",
            "split=all",
            f"seed={args.seed}",
            f"handcrafted.cache_dir={args.out / 'handcrafted'}",
            f"handcrafted.workers={args.workers}",
            *extra,
        )
        (out / "cost.json").write_text(json.dumps(cost))
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "cost": json.loads((out / "cost.json").read_text())}


def train_contrastive(args, root: Path, steps: int) -> Path:
    seq = json.loads((args.model / "config.json").read_text())["model"]["max_seq_len"]
    app(
        root.with_suffix(".log"),
        "mtrain.train",
        f"data.path={args.data}",
        f"run_dir={root}",
        f"init_from={args.model}",
        "objective=contrastive",
        *model_overrides(args.model),
        "deepspeed=cpu",
        "deepspeed.zero_stage=0",
        f"trainer.max_steps={steps}",
        f"trainer.save_every={steps}",
        "trainer.eval_every=0",
        "trainer.log_every=10",
        f"trainer.micro_batch_size={args.pieces_per_step}",
        f"trainer.global_batch_tokens={args.pieces_per_step * 2 * seq}",
        f"optim.lr={CONTRASTIVE_LR}",
        f"optim.warmup_steps={max(1, steps // 20)}",
        "logger.mode=disabled",
        *args.train_override,
    )
    return root


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open() if '"train/loss"' in line]


def contrastive(args) -> dict:
    """Stage 2: the steps the CPU budget buys, the run, its export and its embedding."""
    export = args.out / "contrastive_export"
    if not (export / "config.json").exists():
        calibration = args.out / "contrastive_calibration"
        if not (calibration / "metrics.jsonl").exists():
            train_contrastive(args, calibration, CALIBRATION_STEPS)
        rows = [r for r in metrics(calibration) if r["step"] > CALIBRATION_SKIP]
        per_step = (rows[-1]["cpu_time"] - rows[0]["cpu_time"]) / (len(rows) - 1)
        steps = max(CALIBRATION_STEPS, int(args.contrastive_cpu_s / per_step))
        print(f"contrastive: {per_step:.2f} CPU s a step -> {steps} steps", flush=True)
        run = train_contrastive(args, args.out / "contrastive_run", steps)
        app(args.out / "export.log", "mtrain.export", f"checkpoint={run}", f"output={export}")
    rows = metrics(args.out / "contrastive_run")
    first, last = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10) :]
    training = {
        "steps": rows[-1]["step"],
        "cpu_s": round(rows[-1]["cpu_time"] - rows[0]["cpu_time"], 1),
        "loss_first_tenth": sum(r["train/loss"] for r in first) / len(first),
        "loss_last_tenth": sum(r["train/loss"] for r in last) / len(last),
        "pieces_per_step": args.pieces_per_step,
    }
    result = embed(args, args.out / "contrastive", export, f"sample={args.pieces}")
    return {**result, "training": training, "export": str(export)}


def search_bench(log: Path, *options: str) -> str:
    app(log, "bench.bench_search", *options)
    return log.read_text()


def index_stage(args, checkpoint: Path) -> dict:
    """Stage 3: every piece embedded (probes off), then the index's build and query times."""
    out = args.out / "index_all"
    sample = [] if args.index_pieces is None else [f"sample={args.index_pieces}"]
    result = embed(args, out, checkpoint, "probes=false", *sample)
    text = search_bench(args.out / "index_bench.log", "--index", str(out))
    found = re.search(
        r"build ([\d.]+) ms, query ([\d.]+) ms \(median\), itself first ([\d.]+)", text
    )
    report = result["report"]
    return {
        "pieces": report["pieces"],
        "pieces_per_s": report["pieces_per_s"],
        "kind": report["index"],
        "build_ms": float(found[1]),
        "query_ms": float(found[2]),
        "itself_first": float(found[3]),
        "cost": result["cost"],
    }


def synthetic_stage(args, dim: int) -> dict:
    """Random vectors (the worst case), and vectors drawn like stage 3's real embeddings."""
    kinds = {"random": ("--dim", str(dim))}
    real = args.out / "index_all" / "embeddings.npy"
    if real.exists():
        kinds["like the corpus"] = ("--like", str(real))
    runs = {}
    for kind, options in kinds.items():
        log = args.out / f"synthetic_{args.synthetic}{'_like' if '--like' in options else ''}.log"
        text = log.read_text() if log.exists() else ""
        if "hnsw efSearch" not in text:
            text = search_bench(log, "--synthetic", str(args.synthetic), *options)
        runs[kind] = text.strip().splitlines()
    return {"vectors": args.synthetic, "dim": dim, "runs": runs}


# ---- the report ------------------------------------------------------------------------------
def cell(row: dict, name: str) -> str:
    c = row.get(name)
    return "-" if c is None else f"{c['accuracy']:.3f} ± {c['std']:.3f}"


def probe_table(report: dict) -> list[str]:
    names = [n for n in report["features"] if any(n in row for row in report["probes"].values())]
    lines = [
        "| task (classes, pieces; majority) | "
        + " | ".join(report["features"][n] for n in names)
        + " |",
        "| --- " * (len(names) + 1) + "|",
    ]
    for kind, row in report["probes"].items():
        first = next(iter(row.values()))
        shape = f"{first['classes']}, {first['pieces']}; {first['majority']:.3f}"
        lines.append(f"| {kind} ({shape}) | " + " | ".join(cell(row, n) for n in names) + " |")
    return lines + [f"- not scored: {kind}: {why}" for kind, why in report["unscored"].items()]


def retrieval_row(report: dict, kind: str) -> str:
    row = report["retrieval"].get(kind, {})
    cells = [
        f"{report['features'][n]} {c['precision']:.3f}" for n, c in row.items() if "precision" in c
    ]
    chance = next((c["chance"] for c in row.values() if "chance" in c), None)
    return ", ".join(cells) + ("" if chance is None else f" (chance {chance:.3f})")


def goal(report: dict) -> dict:
    """The issue's goal on the contrastive report: >= GOAL_POINTS above the best symbolic
    baseline on >= GOAL_TASKS tasks, and above the mean-pooled language model on every task."""
    above_symbolic, above_lm = [], []
    for kind, row in report["probes"].items():
        best = max(row[n]["accuracy"] for n in SYMBOLIC if n in row)
        if row["model"]["accuracy"] >= best + GOAL_POINTS:
            above_symbolic.append(kind)
        if "language_model" in row and row["model"]["accuracy"] > row["language_model"]["accuracy"]:
            above_lm.append(kind)
    tasks = list(report["probes"])
    return {
        "tasks_10_points_above_symbolic": above_symbolic,
        "tasks_above_language_model": above_lm,
        "met": len(above_symbolic) >= GOAL_TASKS and len(above_lm) == len(tasks),
    }


def markdown(result: dict) -> str:
    lines = [f"# Discovery on {result['data']} ({result['model']})", ""]
    lines += [f"load average at the start {result['load_start']}, at the end {result['load_end']}"]
    for name, title in (("lm", "language model"), ("contrastive", "contrastive model")):
        if name not in result:
            continue
        report, cost = result[name]["report"], result[name]["cost"]
        lines += [
            "",
            f"## Probes of the {title}: {report['pieces']} pieces (a random sample, seed "
            f"{result['seed']}), stratified {report['folds']}-fold accuracy ± std",
            "",
            f"embed: {cost['cpu_s']:.0f} CPU s, {cost['wall_s']:.0f} s wall; model time "
            f"{report['pieces_per_s']:.1f} pieces/s",
            "",
            *probe_table(report),
            "",
            f"Retrieval by collection, leave-one-out precision@{report['k']}: "
            + retrieval_row(report, "collection"),
        ]
    if "contrastive" in result:
        c = result["contrastive"]
        t, report = c["training"], c["report"]
        rates = ", ".join(
            f"{report['features'][n]} {r:.3f}" for n, r in report["views_first"].items()
        )
        g = c["goal"]
        lines += [
            "",
            f"Contrastive training: {t['steps']} steps of {t['pieces_per_step']} pieces, "
            f"{t['cpu_s']:.0f} CPU s; loss {t['loss_first_tenth']:.3f} (first tenth) -> "
            f"{t['loss_last_tenth']:.3f} (last tenth)",
            "",
            f"Views of one piece ranking each other first ({report['views_of']['pieces']} "
            f"{'held-out' if report['views_of']['held_out'] else ''} pieces): {rates}",
            "",
            f"Goal: 10 points above the best symbolic baseline on "
            f"{len(g['tasks_10_points_above_symbolic'])} task(s) "
            f"({', '.join(g['tasks_10_points_above_symbolic']) or 'none'}; needs {GOAL_TASKS}); "
            f"above the mean-pooled language model on {len(g['tasks_above_language_model'])} of "
            f"{len(report['probes'])}: {'met' if g['met'] else 'not met'}",
        ]
    if "index" in result:
        i = result["index"]
        lines += [
            "",
            f"## Search: {i['pieces']} real pieces",
            "",
            f"embedding throughput {i['pieces_per_s']:.1f} pieces/s of model time "
            f"({i['cost']['cpu_s']:.0f} CPU s, {i['cost']['wall_s']:.0f} s wall for the run); "
            f"index {i['kind']}; rebuilt from its vectors in {i['build_ms']:.1f} ms; one query "
            f"{i['query_ms']:.3f} ms (median); each piece itself first {i['itself_first']:.3f}",
        ]
    if "synthetic" in result:
        s = result["synthetic"]
        for kind, run in s["runs"].items():
            lines += ["", f"## Search: {s['vectors']} synthetic vectors, {kind}", ""]
            lines += [f"    {line}" for line in run]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="an exported language model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pieces", type=int, default=2000, help="the probes' random sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contrastive-cpu-s", type=float, default=600.0)
    parser.add_argument(
        "--pieces-per-step",
        type=int,
        default=16,
        help="contrastive pieces a step, two views each: each view's negatives are the others",
    )
    parser.add_argument(
        "--train-override",
        action="append",
        default=[],
        help="an override of the contrastive run (e.g. contrastive.projection=128); repeatable",
    )
    parser.add_argument("--index-pieces", type=int, help="a sample for stage 3 (default: all)")
    parser.add_argument("--synthetic", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2, help="handcrafted feature processes")
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args()
    args.model, args.data, args.out = args.model.resolve(), args.data.resolve(), args.out.resolve()
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown {', '.join(sorted(unknown))}; choose from {STAGES}")
    for path, what in (
        (args.data / "dataset.json", "--data"),
        (args.model / "config.json", "--model"),
    ):
        if not path.exists():
            parser.error(f"{what}: {path} not found")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "data": str(args.data),
        "model": str(args.model),
        "seed": args.seed,
        "load_start": os.getloadavg(),
    }
    if "lm" in stages:
        result["lm"] = embed(args, args.out / "lm", args.model, f"sample={args.pieces}")
    if "contrastive" in stages:
        result["contrastive"] = contrastive(args)
        result["contrastive"]["goal"] = goal(result["contrastive"]["report"])
    if "index" in stages:
        export = args.out / "contrastive_export"
        result["index"] = index_stage(args, export if export.exists() else args.model)
    if "synthetic" in stages:
        dim = json.loads((args.model / "config.json").read_text())["model"]["d_model"]
        result["synthetic"] = synthetic_stage(args, dim)
    result["load_end"] = os.getloadavg()
    (args.out / "discovery.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / "discovery.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
