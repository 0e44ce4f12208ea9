"""Training throughput and ZeRO-3 memory on CPU, each against a peer measured in the same run.

1. mtrain's trainer (1 process, DeepSpeed, fp32) vs a plain PyTorch loop training Hugging Face
   ``GPT2LMHeadModel`` of the same shape on the same batches: tokens/s ratio (goal >= 1.2x),
   for ``tiny`` and a ~20M-parameter model.
2. ZeRO-3 per-rank parameter + optimizer memory with 2 ranks vs 1 (goal about 0.5x).
3. Loader tokens/s per worker from local shards (and from S3 with ``--s3``) vs what the trainer
   consumes (goal >= 20x on CPU), and how many workers would feed 8 H100s.

    python bench/bench_train.py data/bach
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 30
CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def trainer_run(dataset: str, run_dir: Path, ranks: int, *overrides: str) -> tuple[float, str]:
    """Median tokens/s of the trainer's own per-step log (first steps left out) and its logs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", "-m", "mtrain.train", f"data.path={dataset}",
           f"run_dir={run_dir}", f"trainer.max_steps={STEPS}", "trainer.eval_every=0",
           "trainer.save_every=100000", "optim.warmup_steps=5", "data.num_workers=1",
           "logger.mode=disabled", *overrides]  # fmt: skip
    env = {**os.environ, **CPU_ENV, "OMP_NUM_THREADS": str(max(1, 2 // ranks))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = "".join((run_dir / f"train-rank{r}.log").read_text() for r in range(ranks))
    return statistics.median(r["perf/tokens_per_s"] for r in rows[5:]), logs


def hf_loop(dataset: str, model_overrides: dict, micro_batch: int) -> float:
    """The peer: GPT2LMHeadModel of the same shape, torch AdamW, same batches, plain loop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mtrain.data import DataConfig, StreamingData

    data = StreamingData(DataConfig(path=dataset, num_workers=1), model_overrides["max_seq_len"],
                         micro_batch)  # fmt: skip
    torch.manual_seed(0)
    d = model_overrides["d_model"]
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=data.tokenizer.vocab_size, n_positions=model_overrides["max_seq_len"],
        n_embd=d, n_layer=model_overrides["n_layer"], n_head=model_overrides["n_head"],
        activation_function="gelu", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
    ))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    batches = data.train_batches()
    times = []
    for _ in range(STEPS):
        inputs, targets = next(batches)
        start = time.perf_counter()
        loss = model(input_ids=inputs, labels=None).logits
        loss = torch.nn.functional.cross_entropy(loss.view(-1, loss.size(-1)), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return inputs.numel() / statistics.median(times[5:])


def measure_throughput(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int) -> float:
    """Tokens per second a loader alone delivers over ``steps`` batches, timed from its first
    batch so that worker start-up is left out."""
    batches = iter(batches)
    next(batches)
    start, tokens = time.perf_counter(), 0
    for inputs, _ in islice(batches, steps):
        tokens += inputs.numel()
    return tokens / (time.perf_counter() - start)


def loader_report(dataset: str, consumed: float) -> None:
    """One loader process (num_workers=0, so the number is per worker) against the trainer."""
    from mtrain.data import DataConfig, StreamingData

    data = StreamingData(DataConfig(path=dataset, num_workers=0), 128, 8)
    per_worker = measure_throughput(data.train_batches(), 300)
    # gpt_350m in bf16 at 45% MFU on one H100: tokens/s = 0.45 * 989e12 / flops per token.
    from mtrain.flops import flops_per_token
    from mtrain.model import GPTConfig

    cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size, n_layer=24, n_head=16, d_model=1024,
                    max_seq_len=1024)  # fmt: skip
    h100 = 0.45 * 989e12 / flops_per_token(cfg, 1024)
    print(
        f"\nloader, local shards: {per_worker:,.0f} tokens/s per worker = "
        f"{per_worker / consumed:.0f}x what the trainer consumes on this CPU (goal >= 20x); "
        f"8 H100s training gpt_350m at 45% MFU eat {8 * h100:,.0f} tokens/s: "
        f"{8 * h100 / per_worker:.1f} workers"
    )


SHAPES = {
    "tiny": {"n_layer": 2, "n_head": 2, "d_model": 64, "max_seq_len": 128},
    "small_20m": {"n_layer": 6, "n_head": 8, "d_model": 512, "max_seq_len": 256},
}


def main() -> None:
    dataset = sys.argv[1] if len(sys.argv) > 1 else "data/bach"
    torch.set_num_threads(2)
    print(f"{'model':<10} {'trainer tok/s':>14} {'HF loop tok/s':>14} {'ratio':>7}")
    consumption = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            micro = 8
            tokens = micro * shape["max_seq_len"]
            ours, _ = trainer_run(dataset, Path(tmp) / name, 1, f"model={name}",
                                  "deepspeed=cpu", "deepspeed.zero_stage=0",
                                  f"trainer.micro_batch_size={micro}",
                                  f"trainer.global_batch_tokens={tokens}")  # fmt: skip
            peer = hf_loop(dataset, shape, micro)
            consumption[name] = ours
            print(f"{name:<10} {ours:>14,.0f} {peer:>14,.0f} {ours / peer:>6.2f}x")
        loader_report(dataset, consumption["tiny"])

        memory = {}
        for ranks in (1, 2):
            _, logs = trainer_run(dataset, Path(tmp) / f"mem{ranks}", ranks, "model=small_20m",
                                  "deepspeed=cpu", "trainer.micro_batch_size=2",
                                  f"trainer.global_batch_tokens={2 * 256 * ranks}")  # fmt: skip
            found = re.findall(r"rank 0 holds ([\d.]+) MB of parameters and optimizer", logs)
            memory[ranks] = float(found[0])
        print(
            f"\nZeRO-3 parameters + optimizer state per rank (small_20m): 1 rank "
            f"{memory[1]:.1f} MB, 2 ranks {memory[2]:.1f} MB: {memory[2] / memory[1]:.2f}x "
            "(goal ~0.5x)"
        )


if __name__ == "__main__":
    main()
