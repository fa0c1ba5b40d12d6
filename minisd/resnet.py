"""ResNetBlock and friends (chapter 2): GSC, Downsample, Upsample, ResNetBlock.

Shared by the U-Net (chapter 4, GroupNorm eps 1e-5, blocks that receive the time embedding)
and the VAE (chapter 5, eps 1e-6, no time embedding, an asymmetric-padding Downsample).
"""
import torch.nn.functional as F
from torch import nn


class GSC(nn.Module):
    """GroupNorm -> SiLU (Swish) -> Conv3x3: the smallest unit of SD's U-Net and VAE."""

    def __init__(self, in_channels, out_channels, groups=32, eps=1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.silu(self.norm(x), inplace=True))  # in place: the norm's output is ours to reuse


class Downsample(nn.Module):
    """Halve H and W with a stride-2 Conv3x3.

    The U-Net's pads 1 on every side (`asymmetric=False`); the VAE's pads only right and
    bottom by 1, then convolves without padding (`asymmetric=True`). Same output size for
    even inputs, different numbers.
    """

    def __init__(self, channels, asymmetric=False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x):
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a Conv3x3.

    `size` (H, W) instead sets the output size: the U-Net passes the size of the skip tensor
    waiting above, which is 2H - 1 rather than 2H where a Downsample met an odd size."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class ResNetBlock(nn.Module):
    """GSC -> (+ Linear(SiLU(temb))) -> GSC -> + skip, the skip a 1x1 conv when channels change.

    `temb_channels=None` gives the VAE's block, which has no time embedding.
    """

    def __init__(self, in_channels, out_channels, temb_channels=None, groups=32, eps=1e-5):
        super().__init__()
        self.gsc1 = GSC(in_channels, out_channels, groups, eps)
        self.time_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.gsc2 = GSC(out_channels, out_channels, groups, eps)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, temb=None):
        h = self.gsc1(x)
        if self.time_proj is not None:
            h += self.time_proj(F.silu(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1), added to every pixel
        h = self.gsc2(h)
        h += self.skip(x)  # in place on a fresh conv output: no extra (B, C, H, W) buffer
        return h
