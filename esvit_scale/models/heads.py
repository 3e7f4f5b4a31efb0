"""The projection head shared in shape by the view and the region head (separate weights)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear(in, out, bias=False) with weight = g * v / ||v|| per output row.

    Written out instead of torch's weight_norm parametrisation so that ZeRO-3 partitions plain
    parameters. With `fix_norm` (norm_last_layer), g stays 1 and gets no gradient.
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)
        return F.linear(x, weight)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over every leading position of (..., C), always with the statistics of the batch at hand (no
    running statistics: the EMA teacher has no use for them and they would have to be averaged too)."""

    def __init__(self, dim: int):
        super().__init__(dim, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class ProjectionHead(nn.Module):
    """(..., in_dim) -> (..., out_dim): MLP(in, hidden, hidden, bottleneck) -> L2-normalise -> WeightNormLinear.

    With `batchnorm` (DINO's use_bn_in_head) each hidden layer is batch-normalised: the head then sees how the
    images of a batch differ rather than what they share, which keeps it from mapping every image to one output
    when the backbone's features share a large common part (small, uniform images; see docs/training.md)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = False, batchnorm: bool = False):
        super().__init__()
        def hidden(fan_in: int) -> list[nn.Module]:       # no module at all when off: the parameter names stay
            norm = [TokenBatchNorm(hidden_dim)] if batchnorm else []
            return [nn.Linear(fan_in, hidden_dim), *norm, nn.GELU()]
        self.mlp = nn.Sequential(*hidden(in_dim), *hidden(hidden_dim), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
