"""A stand-in for the DeepSpeed engine in the optimizer step's bookkeeping tests: each forward
returns the next scripted loss; like DeepSpeed's ZeRO optimizers, a step whose micro batches
gave a non-finite loss (hence non-finite gradients) is not applied."""

import math
from types import SimpleNamespace

import torch


class ScriptedEngine:
    def __init__(self, losses: list[float], grad_accum: int, grad_norm: float | None = 0.5):
        self.losses = iter(losses)
        self.grad_accum, self.grad_norm = grad_accum, grad_norm
        self.backwards: list[float] = []
        self.micro_steps = 0
        self.applied: list[bool] = []

    def __call__(self, inputs, targets):
        return SimpleNamespace(loss=torch.tensor(next(self.losses)))

    def backward(self, loss):
        self.backwards.append(loss.item())

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum == 0:
            self.applied.append(all(map(math.isfinite, self.backwards[-self.grad_accum :])))

    def was_step_applied(self) -> bool:
        return self.applied[-1]

    def get_global_grad_norm(self):
        return None if self.grad_norm is None else torch.tensor(self.grad_norm)


def micro_batches():
    while True:
        yield torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
