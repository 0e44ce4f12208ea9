"""The process group DeepSpeed trains over (started from ``data_pipeline.launch``'s placement),
and the few collectives the trainer calls itself; each works without a group as one rank."""

import os
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist

from data_pipeline.launch import Placement
from mtrain.distributed import processes


def _first_node() -> str | None:
    """The first host of a Slurm allocation: the rendezvous when ranks are srun tasks."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist or "RANK" in os.environ:
        return None
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
    )
    return out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None


def launched() -> bool:
    """Whether a launcher started this process as one rank of a job (torchrun, deepspeed, srun)."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or "SLURM_STEP_ID" in env or "LOCAL_RANK" in env


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def init(place: Placement, timeout_s: int) -> torch.device:
    """Starts the process group (nccl on GPUs, gloo on CPU); returns this rank's device."""
    if launched():
        # A rank outlives a SIGKILLed torchrun (its own session) and would finish or hang on its
        # own, holding devices; with PR_SET_PDEATHSIG the kernel kills it with its launcher
        # (torchrun's agent, the deepspeed launcher, slurmstepd). SIGKILL, not SIGTERM: SIGTERM
        # starts a preemption checkpoint, a collective that cannot finish once peers are dying.
        # Not for a plain `python` run, whose parent (a shell, a notebook) is no launcher.
        processes.die_with_parent()
    if not on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", _first_node() or "127.0.0.1")
    # Under srun/submitit every task of a job derives the same port from the job id.
    job = os.environ.get("SLURM_JOB_ID")
    os.environ.setdefault("MASTER_PORT", str(20000 + int(job) % 20000) if job else "29500")
    for key, value in (
        ("RANK", place.rank),
        ("WORLD_SIZE", place.world_size),
        ("LOCAL_RANK", place.local_rank),
    ):
        os.environ.setdefault(key, str(value))
    import deepspeed
    import deepspeed.ops

    if not on_gpu():
        # On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce at every init (a minute or
        # more of g++); only its inference path uses it, training talks through gloo. Marking the op
        # unavailable, as it is on a machine without a compiler, skips the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend="nccl" if on_gpu() else "gloo",
        timeout=timedelta(seconds=timeout_s),
        rank=place.rank,
        world_size=place.world_size,
    )
    if on_gpu():
        torch.cuda.set_device(place.local_rank)
        return torch.device("cuda", place.local_rank)
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a signal may reach only some ranks)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(values: list[torch.Tensor | float]) -> list[float]:
    """Element-wise sums over ranks of a few numbers (tensors stay on their device until the
    one all-reduce), as floats: one collective and one host sync for all of them."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])
    if dist.is_initialized():
        t = t.to(_comm_device())
        dist.all_reduce(t)
    return t.tolist()


def world_size() -> int:
    """The number of ranks in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def mean_over_ranks(value: float) -> float:
    return sum_over_ranks([value])[0] / world_size()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def group_rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def from_rank_0(obj):
    """Rank 0's ``obj`` (picklable), on every rank."""
    if not dist.is_initialized():
        return obj
    shared = [obj]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
