"""The overlapped gradient reduction (ZeRO-0): two real gloo ranks, each with its own micro
batches; after the armed backward pass every gradient is the mean over ranks of the
accumulated gradients, exactly what each rank computes alone from both ranks' batches."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtrain.model import GPT, GPTConfig
from mtrain.training.grad_sync import OverlappedAllReduce

WORLD, MICRO_BATCHES = 2, 3
CFG = GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=12)


def batches(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, 50, (2, 12), generator=generator) for _ in range(MICRO_BATCHES)]


def accumulate(model: GPT, rank: int) -> None:
    for idx in batches(rank):
        model(idx[:, :-1], targets=idx[:, 1:]).loss.backward()


def rank_main(rank: int, store_path: str, results) -> None:
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = GPT(CFG)
    # The expected mean: both ranks' accumulated gradients, computed here alone.
    expected = {}
    for other in range(WORLD):
        model.zero_grad(set_to_none=True)
        accumulate(model, other)
        for name, p in model.named_parameters():
            expected[name] = expected.get(name, 0) + p.grad / WORLD
    model.zero_grad(set_to_none=True)
    reduction = OverlappedAllReduce(model, WORLD)
    for micro, idx in enumerate(batches(rank)):
        if micro == MICRO_BATCHES - 1:  # only the step's last backward reduces
            reduction.arm()
        model(idx[:, :-1], targets=idx[:, 1:]).loss.backward()
    reduction.wait()
    worst = max(
        ((p.grad - expected[name]).abs().max().item() for name, p in model.named_parameters()),
        default=0.0,
    )
    results.put((rank, worst, len(reduction.pending), reduction.armed))
    dist.destroy_process_group()


def test_armed_backward_leaves_the_mean_of_every_ranks_accumulated_gradients(tmp_path):
    context = mp.get_context("spawn")
    results = context.Queue()
    procs = [
        context.Process(target=rank_main, args=(rank, str(tmp_path / "store"), results))
        for rank in range(WORLD)
    ]
    for proc in procs:
        proc.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert [rank for rank, *_ in got] == [0, 1]
    for _, worst, pending, armed in got:
        # Summation order differs from the local sum: equal to float rounding.
        assert worst < 1e-6 and pending == 0 and not armed
