"""One prepared GPU check (run by bench/gpu.sh on a machine with one GPU, under 10 minutes):
tokens/s and MFU of gpt_125m and gpt_350m in bf16 under ZeRO-1 and ZeRO-3, torch.compile on and
off, the loader's share of step time, then a bf16 export of one run and generation from it.
Prints one table; every figure comes from the trainer's own per-step metrics (first steps left
out as warm-up and compilation).

    python bench/bench_gpu.py <dataset> [--steps 30] [--seq 1024] [--micro 8]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 8


def run(args: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}")
    return time.perf_counter() - started


def train(dataset: str, out: Path, model: str, stage: int, compiled: bool, a) -> dict:
    name = f"{model}-z{stage}-{'compiled' if compiled else 'eager'}"
    run_dir = out / name
    wall = run(
        [
            sys.executable,
            "-m",
            "mtrain.train",
            f"data.path={dataset}",
            f"run_dir={run_dir}",
            f"model={model}",
            f"model.max_seq_len={a.seq}",
            f"trainer.compile={str(compiled).lower()}",
            "deepspeed=zero3",
            f"deepspeed.zero_stage={stage}",
            "deepspeed.precision=bf16",
            f"trainer.max_steps={a.steps}",
            f"trainer.micro_batch_size={a.micro}",
            f"trainer.global_batch_tokens={a.micro * a.seq}",
            "trainer.eval_every=0",
            f"trainer.save_every={a.steps}",
            "trainer.sample_every=0",
            "trainer.log_every=10",
            "data.num_workers=4",
            "logger.mode=disabled",
        ],
        out / f"{name}.log",
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[WARMUP:]
    return {
        "run": name,
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["perf/mfu"] or 0.0 for r in steady),
        "data_wait": statistics.median(r["perf/data_wait_share"] for r in steady),
        "peak_gb": max(r["perf/peak_memory_gb"] for r in rows),
        "wall_s": wall,
        "loss": rows[-1]["train/loss"],
        "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("--out", default="/tmp/mtrain-gpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--models", default="gpt_125m,gpt_350m")
    a = parser.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in a.models.split(","):
        for stage in (1, 3):
            for compiled in (False, True):
                results.append(train(a.dataset, out, model, stage, compiled, a))
                print(json.dumps(results[-1]), flush=True)
    best = results[0]["run_dir"]
    export_s = run(
        [sys.executable, "-m", "mtrain.export", f"checkpoint={best}", f"output={out}/export"],
        out / "export.log",
    )
    generate_s = run(
        [
            sys.executable,
            "-m",
            "mtrain.generate",
            f"checkpoint={out}/export",
            f"output={out}/samples",
            "num_samples=4",
            "sampling.max_new_tokens=1024",
            "render.audio=false",
        ],
        out / "generate.log",
    )
    samples = json.loads((out / "samples" / "samples.json").read_text())
    print(
        f"\n{os.environ.get('GPU_NAME', 'GPU')}: bf16, seq {a.seq}, micro batch {a.micro}, "
        f"{a.steps} steps ({WARMUP} warm-up), median per step"
    )
    print(f"{'run':<28} {'tokens/s':>10} {'MFU':>6} {'data wait':>9} {'peak GB':>8} {'wall s':>7}")
    for r in results:
        print(
            f"{r['run']:<28} {r['tokens_per_s']:>10,.0f} {r['mfu']:>6.1%} "
            f"{r['data_wait']:>9.1%} {r['peak_gb']:>8.1f} {r['wall_s']:>7.0f}"
        )
    print(
        f"export of {Path(best).name} (bf16 checkpoint): {export_s:.0f} s; generation of 4 x "
        f"1024 tokens: {generate_s:.0f} s, {samples['tokens_per_s']:,.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
