"""The first GPU check (bench/gpu.sh runs it on one GPU, under 8 minutes on an H100): gpt_125m
in bf16 trained for a few steps under ZeRO-1 eager and under ZeRO-3 compiled, each exported,
the ZeRO-3 run resumed. Prints one table (tokens/s, MFU, the loader's share, peak memory
against the memory plan's estimate, the export's probe difference against its tolerance) and
writes it as JSON. Rates come from the trainer's own per-step metrics, warm-up steps left out.

    python bench/bench_gpu.py <dataset> [--steps 30] [--seq 1024] [--micro 8] [--out DIR]

On a CPU (the same path, small: ``--model tiny --seq 128 --micro 2 --steps 10``) it checks the
script and the wheel set, not the figures.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mtrain.model import GPTConfig
from mtrain.runs.run_dir import RunDir, model_shape
from mtrain.training.config import TrainConfig
from mtrain.training.memory_plan import GiB, estimate, training_layout

REPO = Path(__file__).resolve().parents[1]
WARMUP = 8  # steps left out of the rates: compilation, the loader's start, the allocator's
RESUMED_STEPS = 10
# One phase's limit: a hung phase must leave the others their time.
PHASE_TIMEOUT_S = 300
RUNS = {"z1-eager": ("zero1", False), "z3-compiled": ("zero3", True)}


def run(cmd: list[str], log: Path) -> tuple[bool, float]:
    """Runs ``cmd`` with its output in ``log``; (succeeded, seconds). The whole process group
    goes when it passes ``PHASE_TIMEOUT_S``."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=PHASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
            out.write(f"\nbench_gpu: stopped after {PHASE_TIMEOUT_S} s\n")
    wall = time.perf_counter() - started
    if code:
        print(f"failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}", file=sys.stderr)
    return code == 0, wall


def train(dataset: str, run_dir: Path, name: str, steps: int, a) -> tuple[bool, float]:
    deepspeed, compiled = RUNS[name]
    return run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
            "-m", "mtrain.train", f"data.path={dataset}", f"run_dir={run_dir}",
            f"model={a.model}", f"model.max_seq_len={a.seq}", f"deepspeed={deepspeed}",
            "deepspeed.precision=bf16", f"trainer.compile={str(compiled).lower()}",
            f"trainer.max_steps={steps}", f"trainer.save_every={a.steps}",
            f"trainer.micro_batch_size={a.micro}", f"trainer.global_batch_tokens={a.micro * a.seq}",
            "trainer.eval_every=0", "trainer.sample_every=0", "trainer.log_every=10",
            "optim.warmup_steps=10", "data.num_workers=4", "logger.mode=disabled",
        ],
        run_dir.parent / f"{run_dir.name}-{'resume' if steps > a.steps else 'train'}.log",
    )  # fmt: skip


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in RunDir(run_dir).metrics.read_text().splitlines()]


def planned_gib(run_dir: Path) -> float:
    """The memory plan's estimate for the run, from the config and model shape it saved."""
    run = RunDir(run_dir)
    saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run.train_config))
    cfg: TrainConfig = OmegaConf.to_object(saved)
    cfg.model = GPTConfig(**model_shape(json.loads(run.model_config.read_text())))
    return estimate(training_layout(cfg, 1)).total / GiB


def measure(run_dir: Path, wall: float) -> dict:
    metrics = rows(run_dir)
    steady = metrics[WARMUP:]
    peak = max(r["perf/peak_memory_gb"] for r in metrics)
    plan = planned_gib(run_dir)
    return {
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["perf/mfu"] or 0.0 for r in steady),
        "data_wait": statistics.median(r["perf/data_wait_share"] for r in steady),
        "peak_gib": peak,
        "plan_gib": plan,
        "peak_over_plan": peak / plan,
        "first_step_s": metrics[0]["perf/step_time_s"],
        "loss": metrics[-1]["train/loss"],
        "wall_s": wall,
    }


def export(run_dir: Path, out: Path) -> dict:
    ok, wall = run(
        [sys.executable, "-m", "mtrain.export", f"checkpoint={run_dir}", f"output={out}"],
        out.parent / f"{out.name}.log",
    )
    if not ok:  # a refusal names the difference and the tolerance in its last lines
        return {"exported": False, "wall_s": wall,
                "error": (out.parent / f"{out.name}.log").read_text()[-600:]}  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    return {
        "exported": True,
        "wall_s": wall,
        "probe_max_abs_diff": config["verified_logits_max_abs_diff"],
        "probe_tolerance": config["verified_logits_tolerance"],
        "probe_dtype": config["verified_logits_dtype"],
        "hf_max_abs_diff": config["hf_logits_max_abs_diff"],
    }


def resume(dataset: str, run_dir: Path, a) -> dict:
    before = rows(run_dir)
    ok, wall = train(dataset, run_dir, run_dir.name, a.steps + RESUMED_STEPS, a)
    after = [r for r in rows(run_dir) if r["step"] > a.steps] if ok else []
    steps = [r["step"] for r in after]
    expected = list(range(a.steps + 1, a.steps + RESUMED_STEPS + 1))  # each later step once
    log = (run_dir.parent / f"{run_dir.name}-resume.log").read_text()
    return {
        "run": run_dir.name,
        "ok": "resumed from" in log and steps == expected,
        "steps": steps,
        "loss_before": before[-1]["train/loss"],
        "loss_after": after[-1]["train/loss"] if after else None,
        "wall_s": wall,
    }


def table(report: dict) -> str:
    a = report["settings"]
    lines = [
        f"{report['device']}, {report['torch']}: {a['model']} bf16, seq {a['seq']} x micro batch "
        f"{a['micro']}, {a['steps']} steps (medians of steps {WARMUP + 1}-{a['steps']})",
        f"{'run':<12} {'tokens/s':>10} {'MFU':>6} {'data':>5} {'peak GiB':>9} {'plan GiB':>9} "
        f"{'train s':>8} {'export: probe diff / tolerance':>31} {'export s':>9}",
    ]
    for r in report["runs"]:
        if "tokens_per_s" not in r:
            lines.append(f"{r['run']:<12} failed: see {r['run']}-train.log")
            continue
        e = r["export"]
        probe = (f"{e['probe_max_abs_diff']:.2e} / {e['probe_tolerance']:.2e} ({e['probe_dtype']})"
                 if e.get("exported") else "refused" if e else "-")  # fmt: skip
        lines.append(
            f"{r['run']:<12} {r['tokens_per_s']:>10,.0f} {r['mfu']:>6.1%} {r['data_wait']:>5.0%} "
            f"{r['peak_gib']:>9.2f} {r['plan_gib']:>9.2f} {r['wall_s']:>8.0f} {probe:>31} "
            f"{e.get('wall_s', 0):>9.0f}"
        )
    if res := report.get("resume"):
        steps = res["steps"]
        lines.append(
            f"resume of {res['run']}: {'ok' if res['ok'] else 'FAILED'}, steps "
            f"{steps[0] if steps else '-'}..{steps[-1] if steps else '-'} in {res['wall_s']:.0f} s"
            f", loss {res['loss_before']:.3f} at the checkpoint, {res['loss_after'] or 0:.3f} after"
        )
    lines.append("peak: torch.cuda.max_memory_allocated (no CUDA context); plan: its estimate")
    return "\n".join(lines)


def save(report: dict, work: Path, out: str | None) -> None:
    """The report so far and the phases' logs, in ``out``: what a run stopped at the machine's
    time limit has done still comes back."""
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu-check.json").write_text(json.dumps(report, indent=2))
        for log in work.glob("*.log"):
            (Path(out) / log.name).write_text(log.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("--work", default="/tmp/mtrain-gpu", help="run directories and exports")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="report and logs (JSON)")
    parser.add_argument("--model", default="gpt_125m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=8)
    a = parser.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)  # a run left there would be resumed, not started
    work.mkdir(parents=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
        "torch": f"torch {torch.__version__}",
        "settings": {"model": a.model, "steps": a.steps, "seq": a.seq, "micro": a.micro},
        "runs": [],
    }
    for name in RUNS:
        run_dir = work / name
        ok, wall = train(a.dataset, run_dir, name, a.steps, a)
        result = {"run": name, **(measure(run_dir, wall) if ok else {})}
        result["export"] = export(run_dir, work / f"{name}-export") if ok else {}
        report["runs"].append(result)
        print(json.dumps(result), flush=True)
        save(report, work, a.out)
    if "tokens_per_s" in report["runs"][-1]:
        report["resume"] = resume(a.dataset, work / "z3-compiled", a)
        save(report, work, a.out)
    print(table(report))
    failed = [r["run"] for r in report["runs"] if not r.get("export", {}).get("exported")]
    if failed or not report.get("resume", {}).get("ok"):
        raise SystemExit(f"GPU check incomplete: {failed or 'the resume'} failed")


if __name__ == "__main__":
    main()
