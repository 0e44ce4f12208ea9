"""Every random number generator a run draws from (Python's, numpy's, torch's CPU and CUDA
ones): seeded together, and their state saved and restored with a checkpoint."""

import random

import numpy as np
import torch

# What trainer states saved before the RNG state was stored as plain lists hold: numpy's RNG
# state as numpy objects, allowed through ``torch.load(weights_only=True)`` and nothing more.
PICKLED_RNG_TYPES = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state as lists, ints and tensors (``torch.load(weights_only=True)`` reads
    them)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [name, torch.from_numpy(np_keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This rank's device only: which devices a process sees may change on a requeue.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restores ``rng_state()`` (or the tuples older checkpoints hold)."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state_for(state["cuda"], torch.cuda.current_device()))


def cuda_state_for(saved: torch.Tensor | list[torch.Tensor], device: int) -> torch.Tensor:
    """The CUDA RNG state to restore on ``device``: the one saved, or, from the list of every
    visible device's state that older checkpoints hold, ``device``'s entry (the first when
    fewer devices were visible then)."""
    if isinstance(saved, torch.Tensor):
        return saved
    return saved[device] if device < len(saved) else saved[0]
