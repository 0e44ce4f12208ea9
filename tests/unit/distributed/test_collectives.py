"""The rules the GPU path rests on, checked without a GPU: a collective's inputs all on the
communication device, the CUDA device a rank takes under per-task binding, and the refusal to
train on the CPU of a GPU allocation; and the few collectives in a real one-rank gloo group."""

import pytest
import torch
import torch.distributed as dist
from support.trainings import CPU_ENV

from data_pipeline.errors import InputError
from mtrain.distributed import collectives


def test_every_value_is_moved_to_the_communication_device_before_the_stack():
    # A step's loss sums live on the GPU and the preemption flag is a float: on the meta device
    # (a device that is not the CPU, as a GPU is not), stacking before moving fails.
    loss_sum = torch.zeros((), dtype=torch.float64, device="meta")
    nonfinite = torch.zeros((), dtype=torch.float64, device="meta")
    values = [loss_sum, nonfinite, 1.0, torch.tensor(2.0)]
    with pytest.raises(RuntimeError):
        torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])
    stacked = collectives.stacked_on(values, torch.device("meta"))
    assert stacked.device.type == "meta" and stacked.shape == (4,)
    assert stacked.dtype == torch.float64


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    collectives.close()


def test_the_collectives_take_tensors_and_floats_and_the_group_ends(one_rank_group):
    assert collectives.sum_over_ranks([torch.tensor(2.5), 1.0, torch.tensor(True)]) == [2.5, 1, 1]
    assert collectives.any_rank(True) and not collectives.any_rank(False)
    assert collectives.from_rank_0({"step": 3}) == {"step": 3}
    assert collectives.gather_objects("a") == ["a"]
    collectives.barrier()
    collectives.close()
    assert not dist.is_initialized()
    assert collectives.sum_over_ranks([torch.tensor(1.5), 2.0]) == [1.5, 2.0]  # without a group


@pytest.mark.parametrize(
    ("local_rank", "devices", "index"),
    [(0, 8, 0), (5, 8, 5), (5, 1, 0), (7, 1, 0), (9, 8, 1), (3, 2, 1)],
)
def test_the_device_index_is_the_local_rank_among_the_devices_a_rank_sees(
    local_rank, devices, index
):
    # srun --gpus-per-task=1 / submitit's gpus_per_task: each rank sees one GPU, index 0.
    assert collectives.device_index(local_rank, devices) == index


def test_no_device_to_take_is_refused():
    with pytest.raises(InputError, match=r"local rank 2 sees no CUDA device.*DS_ACCELERATOR=cpu"):
        collectives.device_index(2, 0)


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_GPUS_ON_NODE": "8"},
        {"SLURM_JOB_GPUS": "0"},  # a list: GPU 0
        {"SLURM_STEP_GPUS": "0,1"},
        {"SLURM_GPUS_PER_TASK": "1"},
        {"SLURM_GPUS_PER_NODE": "a100:4"},
        {"SLURM_GPUS": "gpu:16"},
        {"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
        {"CUDA_VISIBLE_DEVICES": "GPU-5c1f0d9e"},
    ],
)
def test_gpus_allocated_with_cuda_unavailable_are_refused_in_one_line(env):
    refusal = collectives.cpu_with_gpus_refusal(env, cuda_available=False)
    assert refusal is not None and "\n" not in refusal
    name, value = next(iter(env.items()))
    assert f"GPUs were allocated ({name}={value})" in refusal
    assert "install the CUDA build of torch" in refusal and "On a GPU cluster" in refusal
    assert "DS_ACCELERATOR=cpu" in refusal
    assert collectives.cpu_with_gpus_refusal(env, cuda_available=True) is None
    # The CPU tests, and slurm/env.sh on a node without GPUs, ask for the CPU on purpose.
    assert collectives.cpu_with_gpus_refusal({**env, **CPU_ENV}, cuda_available=False) is None


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"SLURM_GPUS_ON_NODE": "0"},
        {"SLURM_GPUS_PER_NODE": "gpu:0"},
        {"SLURM_JOB_GPUS": ""},
        {"CUDA_VISIBLE_DEVICES": ""},
        {"CUDA_VISIBLE_DEVICES": "-1"},
        {"CUDA_VISIBLE_DEVICES": "NoDevFiles"},
        {"SLURM_CPUS_ON_NODE": "8", "SLURM_NTASKS": "2"},
    ],
)
def test_no_gpu_allocated_trains_on_the_cpu(env):
    assert collectives.gpus_allocated(env) == []
    assert collectives.cpu_with_gpus_refusal(env, cuda_available=False) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch can use CUDA")
def test_this_cpu_torch_refuses_a_gpu_allocation(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    with pytest.raises(InputError, match=r"SLURM_GPUS_ON_NODE=4\) but torch .* \(a CPU-only build"):
        collectives.refuse_cpu_with_gpus()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    collectives.refuse_cpu_with_gpus()
