"""`python -m minisd benchmark`: minisd vs diffusers on the same random weights, side by side.

Each component is one function (`bench_unet`, ...) that builds both models from the same
weight file, runs them interleaved in one process and prints medians and ratios.
"""
import math

import torch


def random_weights(model, seed=0):
    """Random weights for every tensor of `model` (may be on the meta device), under its own
    keys: fan-in-scaled normal weights, norms near 1, small biases. Activations stay O(1)
    through the 860M-parameter U-Net, and nothing is random-initialised twice."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, p in model.state_dict().items():
        if p.ndim >= 2:
            sd[key] = torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:]))
        elif "norm" in key and key.endswith("weight"):
            sd[key] = 1 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(p.shape, generator=g)
    return sd
