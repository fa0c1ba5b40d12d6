"""ResNetBlock and friends (chapter 2): Conv2d, GSC, Downsample, Upsample, ResNetBlock.

Shared by the U-Net (chapter 4, GroupNorm eps 1e-5, blocks that receive the time embedding)
and the VAE (chapter 5, eps 1e-6, no time embedding, an asymmetric-padding Downsample).
"""
import torch
import torch.nn.functional as F
from torch import nn

SMALL_MAP = 256  # pixels: at or below this, a 3x3 convolution runs faster as one matrix product (see Conv2d)


class Conv2d(nn.Conv2d):
    """nn.Conv2d, with the same weights and keys, that computes two cases as one matrix
    product when it runs on the CPU without gradients (appendix "Making it fast"):

    - a 1x1 convolution is W (O, C) @ x (B, C, H*W), which MKL's GEMM does ~2x faster at
      320 channels on 64x64 than oneDNN's convolution;
    - a 3x3 convolution whose output has <= SMALL_MAP pixels is W (O, C*9) @ unfold(x),
      where oneDNN spends half its time re-laying out the (large) weight on every call.

    Elsewhere (training, CUDA, other dtypes) it is nn.Conv2d. The sums run in another order,
    so the output differs from nn.Conv2d's by float32 rounding (~1e-6 relative)."""

    def forward(self, x):
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled() or self.groups != 1:
            return super().forward(x)
        B, C, H, W = x.shape
        O, k = self.out_channels, self.kernel_size
        weight = self.weight.view(O, -1)  # (O, C*k*k)
        if k == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
            h, w = H, W
            out = x.new_empty(B, O, H * W)
            for b, image in enumerate(x.flatten(2)):  # one GEMM per image: (O, C) @ (C, H*W) -> (O, H*W)
                torch.mm(weight, image, out=out[b])
        else:
            if isinstance(self.padding, str) or self.dilation != (1, 1):
                return super().forward(x)
            (p, q), (s, t) = self.padding, self.stride
            h, w = (H + 2 * p - k[0]) // s + 1, (W + 2 * q - k[1]) // t + 1
            if h * w > SMALL_MAP:
                return super().forward(x)
            cols = F.unfold(x, k, padding=self.padding, stride=self.stride)  # (B, C*k*k, h*w)
            cols = cols.transpose(0, 1).reshape(-1, B * h * w)  # (C*k*k, B*h*w): the batch side by side
            out = torch.mm(weight, cols)  # one GEMM for the whole batch reads the (large) weight once
            out = out.view(O, B, h * w).transpose(0, 1).contiguous()  # (O, B*h*w) -> (B, O, h*w)
        if self.bias is not None:
            out += self.bias[:, None]
        return out.view(B, O, h, w)


class GSC(nn.Module):
    """GroupNorm -> SiLU (Swish) -> Conv3x3: the smallest unit of SD's U-Net and VAE."""

    def __init__(self, in_channels, out_channels, groups=32, eps=1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv = Conv2d(in_channels, out_channels, 3, padding=1)

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
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

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
        self.conv = Conv2d(channels, channels, 3, padding=1)

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
        self.skip = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, temb=None):
        h = self.gsc1(x)
        if self.time_proj is not None:
            h += self.time_proj(F.silu(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1), added to every pixel
        h = self.gsc2(h)
        h += self.skip(x)  # in place on a fresh conv output: no extra (B, C, H, W) buffer
        return h
