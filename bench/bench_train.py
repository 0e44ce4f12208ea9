"""Training throughput on CPU, every figure against peers measured in the same run.

Like for like: every contender (fp32, the same shape, seq, micro batch, AdamW, clipping at 1.0)
fetches its batches from the same kind of loader (``StreamingData``, one DataLoader worker
process) and is timed per optimizer step with the fetch included; the first steps are left
out of every median alike (warm-up), start-up is reported on its own. Rounds are interleaved
(trainer, then the peers, then again) so that the machine's drift hits all of them.

1. One process: mtrain's trainer (ZeRO-0) vs mtrain's model in a plain PyTorch loop vs
   transformers' ``GPT2LMHeadModel`` in the same loop (goals: trainer >= 1.0x GPT-2 at
   small_20m, >= 0.95x at tiny).
2. Two processes (``--ranks 2``): the trainer under ZeRO-0, 1 and 3 vs DDP + GPT-2 in the plain
   loop (goals: ZeRO-0/1 >= 0.95x, ZeRO-3 >= 0.90x at small_20m).
3. The loader alone: tokens/s of one DataLoader worker process over whole epochs, first batch
   included, against what the trainer consumes.

    python bench/bench_train.py data/bach [--rounds 2] [--steps 20] [--shapes tiny,small_20m]
        [--ranks 1,2]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WARMUP = 5
CPU_ENV = {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
# The shapes: seq 512, micro batch 8 for both.
SHAPES = {
    "tiny": {"n_layer": 2, "n_head": 2, "d_model": 64},
    "small_20m": {"n_layer": 6, "n_head": 8, "d_model": 512},
}
SEQ, MICRO = 512, 8


def threads(ranks: int) -> str:
    return str(max(1, (os.cpu_count() or 2) // ranks))


def trainer_run(dataset: str, run_dir: Path, shape: str, ranks: int, stage: int, steps: int):
    """(median tokens/s over all ranks from the trainer's own per-step metrics, start-up s)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", "-m", "mtrain.train", f"data.path={dataset}",
           f"run_dir={run_dir}", f"model={shape}", f"model.max_seq_len={SEQ}",
           "deepspeed=cpu", f"deepspeed.zero_stage={stage}", f"trainer.max_steps={steps}",
           f"trainer.micro_batch_size={MICRO}",
           f"trainer.global_batch_tokens={MICRO * SEQ * ranks}", "trainer.eval_every=0",
           "trainer.save_every=100000", "trainer.sample_every=0", "optim.warmup_steps=5",
           "data.num_workers=1", "logger.mode=disabled"]  # fmt: skip
    env = {**os.environ, **CPU_ENV, "OMP_NUM_THREADS": threads(ranks)}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["perf/step_time_s"] for r in rows]
    return statistics.median(r["perf/tokens_per_s"] for r in rows[WARMUP:]), wall - sum(step_s)


def plain_loop_run(dataset: str, shape: str, kind: str, ranks: int, steps: int) -> float:
    """The peer in its own process(es), like the trainer: ``kind`` is ``gpt2`` or ``mtrain``;
    with 2 ranks DDP over gloo. Returns the median tokens/s over all ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", __file__, "--peer", kind, "--shapes", shape,
           "--steps", str(steps), dataset]  # fmt: skip
    env = {**os.environ, **CPU_ENV, "OMP_NUM_THREADS": threads(ranks)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return float(proc.stdout.strip().splitlines()[-1])


def peer(dataset: str, shape: str, kind: str, steps: int) -> None:
    """Runs inside torchrun: one plain training loop per rank, prints tokens/s (rank 0)."""
    import torch.distributed as dist

    from mtrain.data import DataConfig, StreamingData
    from mtrain.model import GPT, GPTConfig

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    data = StreamingData(DataConfig(path=dataset, num_workers=1), SEQ, MICRO, rank, world)
    torch.manual_seed(0)
    dims = SHAPES[shape]
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=data.tokenizer.vocab_size, n_positions=SEQ, n_embd=dims["d_model"],
            n_layer=dims["n_layer"], n_head=dims["n_head"], activation_function="gelu",
            resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        ))  # fmt: skip
    else:
        model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, max_seq_len=SEQ, **dims))
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    batches = data.train_batches()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        inputs, targets = next(batches)
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        reported = loss.detach()
        if world > 1:  # the mean loss a trainer would report
            dist.all_reduce(reported)
        reported.item()
        times.append(time.perf_counter() - start)
    if rank == 0:
        print(MICRO * SEQ * world / statistics.median(times[WARMUP:]))
    if world > 1:
        dist.destroy_process_group()


def loader_rate(dataset: str, epochs: int = 1) -> tuple[float, float]:
    """(tokens/s of one DataLoader worker process over whole epochs, first batch included;
    seconds to the first batch). The loader is infinite: an epoch is the train split's
    tokens, counted from the dataset card."""
    from mtrain.data import DataConfig, StreamingData

    data = StreamingData(DataConfig(path=dataset, num_workers=1), SEQ, MICRO)
    # Base-vocabulary tokens per epoch: a learned vocabulary packs them into fewer, and
    # transposition leaves the count alone; whole epochs either way at most one batch over.
    budget = data.card["splits"]["train"]["tokens"] * epochs
    started = time.perf_counter()
    batches = data.train_batches()
    next(batches)
    first = time.perf_counter() - started
    tokens = MICRO * SEQ
    while tokens < budget:
        inputs, _ = next(batches)
        tokens += inputs.numel()
    return tokens / (time.perf_counter() - started), first


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}" if len(values) > 1 else ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", nargs="?", default="data/bach")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shapes", default="tiny,small_20m")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--peer", choices=["gpt2", "mtrain"])
    args = parser.parse_args()
    if args.peer:
        return peer(args.dataset, args.shapes, args.peer, args.steps)
    shapes, ranks = args.shapes.split(","), [int(r) for r in args.ranks.split(",")]
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs, fp32, seq {SEQ}, "
          f"micro batch {MICRO}, {args.steps} steps ({WARMUP} warm-up), {args.rounds} rounds, "
          f"median tokens/s (spread over rounds)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for world in ranks:
            stages = [0] if world == 1 else [0, 1, 3]
            peers = ["mtrain", "gpt2"] if world == 1 else ["gpt2"]
            for shape in shapes:
                got: dict[str, list[float]] = {}
                startup = []
                for r in range(args.rounds):
                    for stage in stages:
                        run_dir = Path(tmp) / f"{shape}-{world}-{stage}-{r}"
                        rate, start_s = trainer_run(
                            args.dataset, run_dir, shape, world, stage, args.steps
                        )
                        got.setdefault(f"trainer ZeRO-{stage}", []).append(rate)
                        startup.append(start_s)
                    for kind in peers:
                        name = f"{kind} loop" + (" DDP" if world > 1 else "")
                        rate = plain_loop_run(args.dataset, shape, kind, world, args.steps)
                        got.setdefault(name, []).append(rate)
                reference = statistics.median(got[f"gpt2 loop{' DDP' if world > 1 else ''}"])
                print(f"\n{shape}, {world} process(es); trainer start-up "
                      f"{statistics.median(startup):.1f} s (not in the rates)")  # fmt: skip
                for name, rates in got.items():
                    rate = statistics.median(rates)
                    print(f"  {name:<18} {rate:>10,.0f} tok/s ({spread(rates)})  "
                          f"{rate / reference:.2f}x GPT-2")  # fmt: skip
        consumed = None
        if "tiny" in shapes:
            rate, _ = trainer_run(args.dataset, Path(tmp) / "consumed", "tiny", 1, 0, args.steps)
            consumed = rate
        per_worker, first = loader_rate(args.dataset)
        line = (f"\nloader: {per_worker:,.0f} tokens/s per DataLoader worker over a whole epoch "
                f"(first batch after {first:.1f} s, included)")  # fmt: skip
        if consumed:
            line += f" = {per_worker / consumed:.1f}x what the trainer consumes at tiny"
        print(line)


if __name__ == "__main__":
    main()
