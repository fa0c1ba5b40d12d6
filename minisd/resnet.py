"""ResNetBlock and friends (chapter 2): Conv2d, GSC, Downsample, Upsample, ResNetBlock.

Shared by the U-Net (chapter 4, GroupNorm eps 1e-5, blocks that receive the time embedding)
and the VAE (chapter 5, eps 1e-6, no time embedding, an asymmetric-padding Downsample).
"""
import torch
import torch.nn.functional as F
from torch import nn

SMALL_MAP = 256  # pixels: at or below this, a 3x3 convolution runs faster as one matrix product (see Conv2d)
LARGE_WEIGHT = 2**16  # weights: below this many, oneDNN's convolution stays the faster one (the course's U-Net)
FAST_CPU = True  # minisd's CPU inference paths (appendix "Making it fast"); benchmark.plain_kernels turns them off


def cpu_inference(x):
    """Whether minisd's CPU speed paths apply to x: float32 on the CPU, without gradients. They
    compute the same function in another order (float32 rounding apart)."""
    return FAST_CPU and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


class Conv2d(nn.Conv2d):
    """nn.Conv2d, with the same weights and keys, that computes two cases as one matrix
    product when it runs on the CPU without gradients (appendix "Making it fast"):

    - a 1x1 convolution is W (O, C) @ x (B, C, H*W), which MKL's GEMM does ~2x faster at
      320 channels on 64x64 than oneDNN's convolution;
    - a 3x3 convolution whose output has <= SMALL_MAP pixels is W (O, C*9) @ unfold(x),
      where oneDNN spends half its time re-laying out the (large) weight on every call.

    Elsewhere (training, CUDA, other dtypes, channels-last memory, weights under LARGE_WEIGHT, batches over 8 for
    the 1x1 case, whose loop over images would cost more than it saves) it is nn.Conv2d. The sums run in another order,
    so the output differs from nn.Conv2d's by float32 rounding (~1e-6 relative)."""

    def forward(self, x):
        if (not cpu_inference(x) or self.groups != 1 or self.weight.numel() < LARGE_WEIGHT
                or not (x.is_contiguous() and self.weight.is_contiguous())):
            return super().forward(x)  # channels-last memory too: oneDNN's own layout, not a (O, C*k*k) matrix
        B, C, H, W = x.shape
        O, k = self.out_channels, self.kernel_size
        weight = self.weight.view(O, -1)  # (O, C*k*k)
        if k == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and B <= 8:
            h, w = H, W
            out = x.new_empty(B, O, H * W)
            for b, image in enumerate(x.flatten(2)):  # one GEMM per image: (O, C) @ (C, H*W) -> (O, H*W)
                torch.mm(weight, image, out=out[b])
        else:
            if isinstance(self.padding, str) or self.dilation != (1, 1) or k == (1, 1):
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
        if size is not None and tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
        if cpu_inference(x) and type(self.conv) is Conv2d and x.shape[-2] * x.shape[-1] > SMALL_MAP:
            return self.phases(x)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def phases(self, x):
        """The same as conv(interpolate(x)), computed on the small map (appendix "Making it fast").

        Output pixel (2i+a, 2j+b) of the 3x3 conv over the doubled map sees only the 2x2 input
        pixels from (i-1+a, j-1+b): taps that land on the same input pixel can be summed first.
        So each of the four phases (a, b) is a 2x2 conv of x, and one conv with the four stacked
        does them all: 16 multiply-adds per output pixel and channel pair instead of 36."""
        B, C, H, W = x.shape
        w = self.conv.weight  # (O, C, 3, 3)
        O = w.shape[0]
        # a = 0: kernel row 0 lands on input row i-1, rows 1 and 2 on row i; a = 1: rows 0 and 1 on i, row 2 on i+1
        rows = [torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
                torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2)]  # each (O, C, 2, 3)
        kernels = [torch.stack([r[..., 0], r[..., 1] + r[..., 2]], 3) if b == 0 else
                   torch.stack([r[..., 0] + r[..., 1], r[..., 2]], 3) for r in rows for b in (0, 1)]
        bias = None if self.conv.bias is None else self.conv.bias.repeat(4)
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), torch.cat(kernels), bias)  # (B, 4*O, H+1, W+1): all phases
        out = x.new_empty(B, O, H, 2, W, 2)
        for k, (a, b) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            out[:, :, :, a, :, b] = y[:, k * O:(k + 1) * O, a:a + H, b:b + W]  # phase (a, b) -> pixels (2i+a, 2j+b)
        return out.view(B, O, 2 * H, 2 * W)


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
