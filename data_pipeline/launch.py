"""Where this process sits in a launched job, read from the launcher's environment before any
process group exists: ``torchrun`` and the ``deepspeed`` launcher set RANK/WORLD_SIZE/LOCAL_RANK,
``srun`` (one task per device) and submitit Slurm's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID.
"""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def placement_from_env() -> Placement:
    env = os.environ
    if "RANK" in env:
        return Placement(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Placement(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    return Placement(0, 1, 0)
