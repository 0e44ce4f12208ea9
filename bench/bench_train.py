"""Training throughput on CPU, every figure against peers measured in the same run.

Like for like: every contender (fp32, the same shape, seq, micro batch, AdamW, clipping at 1.0)
fetches its batches from the same kind of loader (``StreamingData``, one DataLoader worker
process) and is timed per optimizer step with the fetch included; the first steps are left
out alike (warm-up), the rates are over the rest (start-up is reported on its own), by the wall
clock and by rank 0's CPU time. Rounds are interleaved (trainer, then the peers, then again) so
that the machine's drift hits all of them, and each round's rates are divided by that round's
GPT-2 loop: the ratios' median and spread are printed beside the rates'. On a busy machine
only the CPU-time rates mean anything, and only with ``--threads 1`` (threads of one rank would
spin waiting for each other, CPU time that is the machine's business, not the trainer's).

1. One process: mtrain's trainer (ZeRO-0) vs mtrain's model in a plain PyTorch loop vs
   transformers' ``GPT2LMHeadModel`` in the same loop (goals: trainer >= 1.0x GPT-2 at
   small_20m, >= 0.95x at tiny).
2. Two processes (``--ranks 2``): the trainer under ZeRO-0, 1 and 3 vs DDP + GPT-2 in the plain
   loop (goals: ZeRO-0/1 >= 0.95x, ZeRO-3 >= 0.90x at small_20m).
``--kept-peers`` adds the GPT-2 loop with the trainer's own host-memory setting
(``mtrain.distributed.host_memory``: freed activations kept for the next step) as one more
contender: what
that setting alone is worth to a plain loop.

3. The loader alone: tokens/s of one DataLoader worker process over whole epochs, first batch
   included, against what the trainer consumes.

    python bench/bench_train.py data/bach [--rounds 3] [--steps 30] [--shapes tiny,small_20m]
        [--ranks 1,2] [--stages 0,1,3] [--threads 1] [--kept-peers]
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
from typing import NamedTuple

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


# OMP threads per rank: the cores shared out, unless --threads says (1: CPU-time rates that a
# busy machine leaves alone; more threads would spin on each other's cores).
THREADS: int | None = None


def threads(ranks: int) -> str:
    return str(THREADS or max(1, (os.cpu_count() or 2) // ranks))


class Rate(NamedTuple):
    """Tokens/s over all ranks after the warm-up: by the wall clock, and by rank 0's CPU time
    (times the ranks): the one that a busy machine leaves alone, with one thread per rank."""

    wall: float
    cpu: float


def trainer_run(
    dataset: str, run_dir: Path, shape: str, ranks: int, stage: int, steps: int
) -> tuple[Rate, float]:
    """(rate, start-up s). The rate is over the clocks from the end of the warm-up to the last
    step, as metrics.jsonl stamps them: whatever the trainer does between steps (reporting,
    its own step timer's pauses) counts, as in the peers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", "-m", "mtrain.train", f"data.path={dataset}",
           f"run_dir={run_dir}", f"model={shape}", f"model.max_seq_len={SEQ}",
           "deepspeed=cpu", f"deepspeed.zero_stage={stage}", f"trainer.max_steps={steps}",
           f"trainer.micro_batch_size={MICRO}",
           f"trainer.global_batch_tokens={MICRO * SEQ * ranks}", "trainer.eval_every=0",
           "trainer.save_every=100000", "trainer.sample_every=0", "optim.warmup_steps=5",
           "data.num_workers=1", "logger.mode=disabled"]  # fmt: skip
    env = {**os.environ, **CPU_ENV, "OMP_NUM_THREADS": threads(ranks)}
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = MICRO * SEQ * ranks * (len(rows) - WARMUP)
    wall, cpu = (rows[-1][clock] - rows[WARMUP - 1][clock] for clock in ("time", "cpu_time"))
    startup = rows[0]["time"] - rows[0]["perf/step_time_s"] - started
    return Rate(tokens / wall, tokens / cpu), startup


def plain_loop_run(dataset: str, shape: str, kind: str, ranks: int, steps: int) -> Rate:
    """The peer in its own process(es), like the trainer: ``kind`` is ``gpt2`` or ``mtrain``;
    with 2 ranks DDP over gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", __file__, "--peer", kind, "--shapes", shape,
           "--steps", str(steps), dataset]  # fmt: skip
    env = {**os.environ, **CPU_ENV, "OMP_NUM_THREADS": threads(ranks)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return Rate(*map(float, proc.stdout.strip().splitlines()[-1].split()))


def peer(dataset: str, shape: str, kind: str, steps: int) -> None:
    """Runs inside torchrun: one plain training loop per rank; rank 0 prints its rates.
    ``kind``: gpt2 or mtrain, with ``-kept`` the trainer's host-memory setting too."""
    import torch.distributed as dist

    from mtrain.distributed.host_memory import keep_freed_memory

    kind, _, kept = kind.partition("-")
    if kept:
        keep_freed_memory()

    from data_pipeline.launch import placement_from_env
    from mtrain.data.loader import DataConfig, StreamingData
    from mtrain.model import GPT, GPTConfig

    place = placement_from_env()
    rank, world = place.rank, place.world_size
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
    for step in range(steps):
        if step == WARMUP:
            wall, cpu = time.perf_counter(), time.process_time()
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
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if rank == 0:  # over the steps after the warm-up, as the trainer's
        tokens = MICRO * SEQ * world * (steps - WARMUP)
        print(tokens / wall, tokens / cpu)
    if world > 1:
        dist.destroy_process_group()


def loader_rate(dataset: str, epochs: int = 1) -> tuple[float, float]:
    """(tokens/s of one DataLoader worker process over whole epochs, first batch included;
    seconds to the first batch). The loader is infinite: an epoch is the train split's
    tokens, counted from the dataset card."""
    from mtrain.data.loader import DataConfig, StreamingData

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


def spread(values: list[float], form: str = ",.0f") -> str:
    return f"{min(values):{form}}-{max(values):{form}}" if len(values) > 1 else ""


def summary(rates: list[float], reference: list[float]) -> str:
    """Median rate and its ratio to the reference, with their spreads over rounds. Each
    round's rate is divided by that round's reference: drift between rounds cancels out."""
    ratios = [rate / ref for rate, ref in zip(rates, reference, strict=True)]
    return (f"  {statistics.median(rates):>9,.0f} ({spread(rates)}) "
            f"{statistics.median(ratios):.2f}x ({spread(ratios, '.2f')})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", nargs="?", default="data/bach")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--shapes", default="tiny,small_20m")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--stages", default="0,1,3", help="ZeRO stages with 2+ ranks")
    parser.add_argument("--threads", type=int, help="OMP threads per rank")
    parser.add_argument("--kept-peers", action="store_true", help="+ GPT-2 loop, kept memory")
    parser.add_argument("--peer", choices=["gpt2", "mtrain", "gpt2-kept"])
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    if args.peer:
        return peer(args.dataset, args.shapes, args.peer, args.steps)
    shapes, ranks = args.shapes.split(","), [int(r) for r in args.ranks.split(",")]
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs, fp32, seq {SEQ}, "
          f"micro batch {MICRO}, {args.steps} steps ({WARMUP} warm-up), {args.rounds} rounds, "
          f"{args.threads or 'cores / ranks'} thread(s) per rank; tokens/s by the wall "
          f"clock, then by rank 0's CPU time, each as median (spread) over rounds and x GPT-2 "
          f"in the same round")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for world in ranks:
            stages = [0] if world == 1 else [int(s) for s in args.stages.split(",")]
            peers = ["mtrain", "gpt2"] if world == 1 else ["gpt2"]
            peers += ["gpt2-kept"] if args.kept_peers else []
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
                        name = f"{kind} loop".replace("-kept loop", " loop, kept memory")
                        name += " DDP" if world > 1 else ""
                        rate = plain_loop_run(args.dataset, shape, kind, world, args.steps)
                        got.setdefault(name, []).append(rate)
                reference = got[f"gpt2 loop{' DDP' if world > 1 else ''}"]
                print(f"\n{shape}, {world} process(es); trainer start-up "
                      f"{statistics.median(startup):.1f} s (not in the rates)")  # fmt: skip
                for name, rates in got.items():
                    print(f"  {name:<28}" + "".join(
                        summary([getattr(r, clock) for r in rates],
                                [getattr(r, clock) for r in reference])
                        for clock in Rate._fields))  # fmt: skip
        consumed = None
        if "tiny" in shapes:
            rate, _ = trainer_run(args.dataset, Path(tmp) / "consumed", "tiny", 1, 0, args.steps)
            consumed = rate.wall
        per_worker, first = loader_rate(args.dataset)
        line = (f"\nloader: {per_worker:,.0f} tokens/s per DataLoader worker over a whole epoch "
                f"(first batch after {first:.1f} s, included)")  # fmt: skip
        if consumed:
            line += f" = {per_worker / consumed:.1f}x what the trainer consumes at tiny"
        print(line)


if __name__ == "__main__":
    main()
