"""Gradients averaged over ranks while the backward pass is still running (ZeRO-0, fp32).

DeepSpeed's stage 0 reduces the gradients after the backward pass, in one blocking all-reduce:
13% of a step of the tiny model on 2 CPU ranks, where DDP, which starts each reduction as soon
as its gradient is ready, loses almost nothing. Here each parameter's all-reduce starts from a
hook as soon as its gradient is accumulated, on the last micro batch of a step only, and the
trainer waits for them all before it clips. Other stages and precisions keep DeepSpeed's own
reduction (ZeRO 1-3 partition the gradients; the bf16/fp16 optimizers keep their own copies).
"""

import torch
import torch.distributed as dist

from mtrain.distributed import collectives
from mtrain.training.config import DeepSpeedConfig


class OverlappedAllReduce:
    """Averages every gradient over the ranks during the armed backward pass."""

    def __init__(self, module: torch.nn.Module, world_size: int):
        self.world_size = world_size
        self.armed = False
        self.pending: list[dist.Work] = []
        # parameters() yields a tied weight once; its hook fires once per backward, after both
        # uses' gradients are summed into it.
        for p in module.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._ready)

    def arm(self) -> None:
        """The next backward pass is the step's last: its gradients are the step's."""
        self.armed = True

    def _ready(self, p: torch.Tensor) -> None:
        if self.armed:
            p.grad.div_(self.world_size)
            self.pending.append(dist.all_reduce(p.grad, async_op=True))

    def wait(self) -> None:
        """Blocks until every gradient is the mean over ranks."""
        for work in self.pending:
            work.wait()
        self.pending.clear()
        self.armed = False


def take_gradient_reduction(engine, ds: DeepSpeedConfig) -> OverlappedAllReduce | None:
    """Takes the gradients' reduction over from DeepSpeed where the trainer clips (ZeRO-0,
    fp32): overlapped with the backward pass on several ranks, none on one (DeepSpeed would
    still flatten every gradient, all-reduce it over the one rank and copy it back). None
    where DeepSpeed keeps it."""
    if not ds.clips_in_trainer:
        return None
    engine.enable_backward_allreduce = False
    world = collectives.world_size()
    return OverlappedAllReduce(engine.module, world) if world > 1 else None
