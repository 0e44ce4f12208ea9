"""The process group DeepSpeed trains over (started from ``data_pipeline.launch``'s placement),
and the few collectives the trainer calls itself; each works without a group as one rank."""

import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from datetime import timedelta

import torch
import torch.distributed as dist

from data_pipeline.errors import InputError
from data_pipeline.launch import Placement
from mtrain.distributed import processes

# Where Slurm and CUDA say that GPUs were given to this job or process: counts (none: 0, also
# typed, "gpu:0", or empty) and device lists (none: empty, CUDA's "-1", Slurm's "NoDevFiles").
_GPU_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS_PER_NODE", "SLURM_GPUS")
_GPU_LISTS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")
_NO_COUNT = re.compile(r"\s*((\w+:)*0+)?\s*")
_NO_LIST = re.compile(r"(?i)\s*(-1.*|nodevfiles|none)?\s*")


def _first_node() -> str | None:
    """The first host of a Slurm allocation: the rendezvous when ranks are srun tasks."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist or "RANK" in os.environ:
        return None
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
    )
    return out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def launched() -> bool:
    """Whether a launcher started this process as one rank of a job (torchrun, deepspeed, srun)."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or "SLURM_STEP_ID" in env or "LOCAL_RANK" in env


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def gpus_allocated(env: Mapping[str, str]) -> list[str]:
    """The variables of ``env`` that give this process GPUs, as ``NAME=value``."""
    given = [(n, _NO_COUNT) for n in _GPU_COUNTS] + [(n, _NO_LIST) for n in _GPU_LISTS]
    return [f"{n}={env[n]}" for n, none in given if n in env and not none.fullmatch(env[n])]


def cpu_with_gpus_refusal(env: Mapping[str, str], cuda_available: bool) -> str | None:
    """Why a training must not start (None: it may): GPUs were allocated but torch cannot use
    CUDA (a CPU-only build on a GPU node, or no driver), so it would train on the CPU without a
    word. ``DS_ACCELERATOR=cpu`` asks for the CPU on purpose."""
    allocated = gpus_allocated(env)
    if cuda_available or env.get("DS_ACCELERATOR") == "cpu" or not allocated:
        return None
    build = "a CPU-only build" if torch.version.cuda is None else "no usable GPU or driver"
    return (
        f"GPUs were allocated ({', '.join(allocated)}) but torch {torch.__version__} cannot use "
        f'CUDA ({build}): install the CUDA build of torch (README, "On a GPU cluster: '
        'installing"), or set DS_ACCELERATOR=cpu to train on the CPU on purpose'
    )


def refuse_cpu_with_gpus() -> None:
    """Before any process group: refuses, in one line, to train on the CPU of a GPU
    allocation."""
    refusal = cpu_with_gpus_refusal(os.environ, torch.cuda.is_available())
    if refusal is not None:
        raise InputError(refusal)


def device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of the rank with ``local_rank`` on its node, among the ``device_count``
    it sees: its local rank where it sees all of the node's GPUs, 0 where each task sees its
    own (``srun --gpus-per-task=1``, submitit's ``gpus_per_task``)."""
    if device_count < 1:
        raise InputError(
            f"local rank {local_rank} sees no CUDA device: request a GPU for every task "
            "(--gpus-per-node, --gpus-per-task), or set DS_ACCELERATOR=cpu to train on the CPU"
        )
    return local_rank % device_count


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
    if place.world_size == 1 and not launched():
        # A lone process (plain `python`, each point of a local multirun) meets no one: any
        # free port, never a fixed one that another run on the machine may hold.
        os.environ["MASTER_PORT"] = _free_port()
    os.environ.setdefault("MASTER_PORT", str(20000 + int(job) % 20000) if job else "29500")
    for key, value in (
        ("RANK", place.rank),
        ("WORLD_SIZE", place.world_size),
        ("LOCAL_RANK", place.local_rank),
    ):
        os.environ.setdefault(key, str(value))
    device = torch.device("cpu")
    if on_gpu():
        device = torch.device("cuda", device_index(place.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        # DeepSpeed takes LOCAL_RANK for the CUDA device index (the process group's bound
        # device, the engine's, zero.Init's): under per-task binding it must be 0, not the
        # rank's place on the node.
        os.environ["LOCAL_RANK"] = str(device.index)
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
    return device


def close() -> None:
    """Ends the process group (NCCL warns at exit about one left open); only where every rank
    ends it together, with no collective pending."""
    if not dist.is_initialized():
        return
    # Through DeepSpeed where it started the group: it then drops the groups it cached (world,
    # data parallel), which a process that trains again (each point of a multirun) must not
    # meet. A DeepSpeed never imported started nothing.
    ds_comm = sys.modules.get("deepspeed.comm.comm")  # the module whose cdb is live
    if ds_comm is not None and ds_comm.cdb is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a signal may reach only some ranks)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(values: list[torch.Tensor | float]) -> list[float]:
    """Element-wise sums over ranks of a few numbers (tensors on any device, floats), as
    floats: one collective and one host sync for all of them."""
    if not dist.is_initialized():
        return stacked_on(values, torch.device("cpu")).tolist()
    t = stacked_on(values, _comm_device())
    dist.all_reduce(t)
    return t.tolist()


def stacked_on(values: list[torch.Tensor | float], device: torch.device) -> torch.Tensor:
    """``values`` as one float64 vector on ``device``: each moved there before they are
    stacked (a float is made on the CPU, a loss lives on the GPU, and a stack across devices
    fails)."""
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])


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


def gather_objects(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (of ``group``)."""
    if not dist.is_initialized():
        return [obj]
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def gather_to_rank_0(tensor: torch.Tensor, group=None) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (of one shape and dtype on every rank), in rank order, on
    rank 0 of ``group``; None on the others."""
    if not dist.is_initialized():
        return [tensor]
    main = dist.get_rank(group) == 0
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))] if main else None
    dst = 0 if group is None else dist.get_global_rank(group, 0)
    dist.gather(tensor, parts, dst=dst, group=group)
    return parts


def from_rank_0(obj, group=None):
    """Rank 0's ``obj`` (picklable), on every rank (of ``group``)."""
    if not dist.is_initialized():
        return obj
    shared = [obj]
    dist.broadcast_object_list(shared, src=0, group=group)
    return shared[0]


def new_gloo_group():
    """A process group of every rank over gloo (CPU objects, whatever the main backend),
    for a thread whose collectives must not interleave with the main group's; None without a
    process group. Collective: every rank creates it at the same point."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo")
