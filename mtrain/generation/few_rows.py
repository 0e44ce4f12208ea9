"""Decoding's matrix products on a CPU: the few rows of a decoding step through a faster GEMM,
swapped into a model's blocks for sampling; training and GPUs keep ``nn.Linear``'s path."""

import torch
from torch import nn


class FewRowLinear(nn.Linear):
    """``nn.Linear``, faster for the handful of rows of a decoding step on CPU.

    With so few rows, reading the weights is the whole cost, and MKL's fp32 GEMM reads them
    faster computing (W x^T)^T than x W^T; a lone row is paired with a zero row to take that
    GEMM rather than a slower matrix-vector path (figures: bench/README.md). With gradients, or
    on a GPU, nn.Linear's own path runs.
    """

    FEW_ROWS = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if torch.is_grad_enabled() or x.device.type != "cpu" or rows > self.FEW_ROWS:
            return super().forward(x)
        flat = x.reshape(rows, self.in_features)
        if rows == 1:
            flat = torch.cat([flat, torch.zeros_like(flat)])
        y = (self.weight @ flat.t())[:, :rows].t().contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def use_few_row_linears(model: nn.Module) -> None:
    """Gives the blocks' linear layers ``FewRowLinear``'s forward, in place: the same parameters,
    names and state dict, so a model being trained can be sampled from too."""
    for module in model.modules():
        if type(module) is nn.Linear and module is not getattr(model, "lm_head", None):
            module.__class__ = FewRowLinear
