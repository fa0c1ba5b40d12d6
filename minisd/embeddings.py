"""The time embedding (chapter 1): a timestep t becomes a vector every ResNetBlock receives.

`timestep_embedding` is the fixed sinusoidal part (the seed's `time_step_embedding`, with the
seed's `cat([cos, sin])` order: diffusers' `flip_sin_to_cos=True, downscale_freq_shift=0`, as
SD uses); `TimestepEmbedding` is the learned Linear-SiLU-Linear that follows it.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of timesteps t (B,) -> (B, dim): [cos(t*f_i), sin(t*f_i)], f_i = max_period^(-i/half)."""
    if dim % 2:
        raise ValueError(f"the timestep embedding needs an even dim, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, 1) * (1, half) -> (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear: the learned part of the time embedding (320 -> 1280 -> 1280 in SD 1.5)."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))
