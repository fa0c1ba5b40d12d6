"""The VAE (chapter 5): Encoder -> DiagonalGaussian -> Decoder, SD's `AutoencoderKL`.

The encoder turns an image (B, 3, H, W) in [-1, 1] into a Gaussian over latents
(B, c, H/f, W/f); the decoder turns latents back into an image. SD 1.5: f = 8, c = 4, so
a 512x512 image becomes 4x64x64 latents. The U-Net works on latents multiplied by
`scaling_factor` (0.18215 for SD), so `decode` takes latents already divided by it.
Built from chapter 2's GSC / ResNetBlock / Downsample / Upsample (GroupNorm eps 1e-6, no
time embedding) and chapter 3's SpatialSelfAttention.
"""
import json
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .attention import SpatialSelfAttention
from .resnet import GSC, Conv2d, Downsample, ResNetBlock, Upsample


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of an AutoencoderKL. f = 2 ** (len(block_out_channels) - 1): every block but
    the last halves the image."""
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2          # ResNetBlocks per encoder block (decoder: one more)
    latent_channels: int = 4           # c
    in_channels: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215    # latents for the U-Net = scaling_factor * z
    sample_size: int = 512             # the image size the VAE was made for

    @property
    def factor(self):
        """f, the downsampling factor: image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls):
        """Stable Diffusion 1.x's VAE: 83,653,863 parameters, f = 8, c = 4."""
        return cls()

    @classmethod
    def tiny(cls):
        """A few-thousand-parameter VAE with SD's structure (f = 2), for fast tests."""
        return cls(block_out_channels=(8, 16), layers_per_block=1, norm_groups=4, sample_size=16)

    @classmethod
    def course(cls):
        """The course VAE: 32x32 course images -> 4x8x8 latents (f = 4, c = 4).

        Narrow (16/32/32 channels, 242k parameters), one ResNetBlock per encoder block,
        so that training fits in minutes on a CPU core. Its scaling factor is measured
        after training (1/std of the latents, chapter 5) and stored in the checkpoint."""
        return cls(block_out_channels=(16, 32, 32), layers_per_block=1, norm_groups=8,
                   scaling_factor=1.0, sample_size=32)

    @classmethod
    def from_diffusers(cls, config):
        """From a diffusers `vae/config.json` (a path or the dict read from it)."""
        if not isinstance(config, dict):
            with open(config) as f:
                config = json.load(f)
        kinds = set(config.get("down_block_types", ["DownEncoderBlock2D"])) | \
            set(config.get("up_block_types", ["UpDecoderBlock2D"]))
        if kinds != {"DownEncoderBlock2D", "UpDecoderBlock2D"} or config.get("act_fn", "silu") != "silu":
            raise ValueError(f"not an SD-style AutoencoderKL config (blocks {sorted(kinds)}, "
                             f"act_fn {config.get('act_fn')!r}): minisd builds only the SD 1.x/2.x VAE (the same in both)")
        if config.get("use_quant_conv", True) is False or config.get("use_post_quant_conv", True) is False:
            raise ValueError("this VAE has no quant_conv/post_quant_conv (an SD3/Flux-style VAE); "
                             "minisd builds only the SD 1.x/2.x VAE, which has both")
        return cls(block_out_channels=tuple(config["block_out_channels"]),
                   layers_per_block=config.get("layers_per_block", 1),
                   latent_channels=config.get("latent_channels", 4),
                   in_channels=config.get("in_channels", 3),
                   norm_groups=config.get("norm_num_groups", 32),
                   scaling_factor=config.get("scaling_factor", 0.18215),
                   sample_size=config.get("sample_size", 512))

    def to_json(self):
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text):
        d = json.loads(text)
        d["block_out_channels"] = tuple(d["block_out_channels"])
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class DiagonalGaussian:
    """The encoder's output: a Gaussian with its own mean and variance per latent number.

    `moments` (B, 2c, h, w) is split into mean and log-variance; the log-variance is
    clamped to [-30, 20] as SD does, so exp() can neither underflow to 0 nor overflow."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, 2c, h, w) -> 2 x (B, c, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        """z = mean + std * eps, eps ~ N(0, I) (the reparameterisation trick). eps is drawn on
        the generator's device (a CPU generator gives the same latents on any device)."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self):
        """The most likely latents: the mean (what SD's img2img and our training targets use)."""
        return self.mean

    def kl(self):
        """KL(N(mean, var) || N(0, I)) per image, summed over the latent: (B,)."""
        return 0.5 * (self.mean ** 2 + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class MidBlock(nn.Module):
    """ResNetBlock -> SpatialSelfAttention -> ResNetBlock, at the lowest resolution."""

    def __init__(self, channels, groups, eps):
        super().__init__()
        self.resnets = nn.ModuleList([ResNetBlock(channels, channels, groups=groups, eps=eps),
                                      ResNetBlock(channels, channels, groups=groups, eps=eps)])
        self.attention = SpatialSelfAttention(channels, groups=groups, eps=eps)

    def forward(self, x):
        x = self.resnets[0](x)
        x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """The encoder's block: `layers` ResNetBlocks, then (except in the last block) the
    VAE's asymmetric-padding Downsample. No time embedding, no attention."""

    def __init__(self, in_channels, out_channels, layers, downsample, groups, eps):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResNetBlock(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=eps)
            for i in range(layers))
        self.downsample = Downsample(out_channels, asymmetric=True) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsample(x) if self.downsample is not None else x


class UpBlock(nn.Module):
    """The decoder's block: `layers` ResNetBlocks, then (except in the last block) Upsample.
    Unlike the U-Net's UpBlock it gets no skip features: the VAE has no skip connections."""

    def __init__(self, in_channels, out_channels, layers, upsample, groups, eps):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResNetBlock(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=eps)
            for i in range(layers))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsample(x) if self.upsample is not None else x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2c, H/f, W/f): conv_in, DownBlocks, MidBlock, GSC.

    SD 1.5 has 4 DownBlocks (128, 256, 512, 512 channels), of which the first 3 downsample."""

    def __init__(self, config):
        super().__init__()
        ch, g, eps = config.block_out_channels, config.norm_groups, config.norm_eps
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, i < len(ch) - 1, g, eps)
            for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], g, eps)
        self.out = GSC(ch[-1], 2 * config.latent_channels, g, eps)  # GroupNorm, SiLU, conv_out

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.out(self.mid_block(x))


class Decoder(nn.Module):
    """Latents (B, c, h, w) -> image (B, 3, f*h, f*w): conv_in, MidBlock, UpBlocks, GSC.

    The mirror of the Encoder, with one ResNetBlock more per block (3 in SD 1.5)."""

    def __init__(self, config):
        super().__init__()
        ch, g, eps = tuple(reversed(config.block_out_channels)), config.norm_groups, config.norm_eps
        self.conv_in = Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, eps)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, i < len(ch) - 1, g, eps)
            for i in range(len(ch)))
        self.out = GSC(ch[-1], config.in_channels, g, eps)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.out(x)


class AutoencoderKL(nn.Module):
    """SD's VAE: `encode` -> DiagonalGaussian, `decode` latents -> image (chapter 5).

    Between them sit two 1x1 convs that SD inherited from VQ-GAN: `quant_conv` on the
    moments (2c -> 2c) and `post_quant_conv` on the latents (c -> c).

    `use_tiling = True` (diffusers' `enable_tiling()`) encodes and decodes anything larger
    than `config.sample_size` (in pixels; sample_size / f in latents) in overlapping tiles of
    that size, so that memory stops growing with the image: see `tiled`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)
        self.use_tiling = False

    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    def encode(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over (B, c, H/f, W/f)."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects images (B, {self.config.in_channels}, H, W) in [-1, 1], "
                             f"got shape {tuple(images.shape)}")
        tile = self.config.sample_size  # in pixels
        if self.use_tiling and max(images.shape[2:]) > tile:
            moments = tiled(lambda x: self.quant_conv(self.encoder(x)), images, tile, tile // self.config.factor)
        else:
            moments = self.quant_conv(self.encoder(images))
        return DiagonalGaussian(moments)

    def decode(self, latents):
        """Latents (B, c, h, w), already divided by scaling_factor -> images (B, 3, f*h, f*w)."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"decode expects latents (B, {self.config.latent_channels}, h, w), "
                             f"got shape {tuple(latents.shape)}")
        tile = self.config.sample_size // self.config.factor  # in latents
        if self.use_tiling and max(latents.shape[2:]) > tile:
            return tiled(lambda z: self.decoder(self.post_quant_conv(z)), latents, tile, self.config.sample_size)
        return self.decoder(self.post_quant_conv(latents))


TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor: neighbouring tiles share a quarter of a tile


def tiled(run, x, tile_in, tile_out):
    """`run` (a map from tile_in x tile_in tiles to tile_out x tile_out ones) applied to a large
    x in overlapping tiles, as diffusers' `tiled_decode` / `_tiled_encode`.

    A tile starts every 3/4 tile (the last ones in a row may be cut short by the edge). Each
    output tile's first quarter is cross-faded with the end of the tile above and of the tile
    to its left (already faded themselves), and its first 3/4 are kept. Not equal to running
    on the whole: each tile sees only its own neighbourhood (and its own GroupNorm statistics)."""
    stride = int(tile_in * (1 - TILE_OVERLAP))
    fade = int(tile_out * TILE_OVERLAP)
    keep = tile_out - fade
    rows = [[run(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    for i, row in enumerate(rows):
        for j, out in enumerate(row):
            if i > 0:
                cross_fade(rows[i - 1][j], out, fade, dim=2)
            if j > 0:
                cross_fade(row[j - 1], out, fade, dim=3)
    return torch.cat([torch.cat([out[:, :, :keep, :keep] for out in row], dim=3) for row in rows], dim=2)


def cross_fade(a, b, n, dim):
    """In place: b's first n rows (dim 2) or columns (dim 3) := a's last n ones * (1 - w) + b's * w,
    w = 0, 1/n, ..., (n-1)/n (diffusers' `blend_v` / `blend_h`; n shrinks to fit a short tile)."""
    n = min(a.shape[dim], b.shape[dim], n)
    w = torch.arange(n, dtype=torch.float64) / n  # in float64, as diffusers' Python floats
    w = w.view(n, 1) if dim == 2 else w           # broadcast over the other spatial axis
    head = b.narrow(dim, 0, n)
    head.copy_(a.narrow(dim, a.shape[dim] - n, n) * (1 - w).to(b.device, b.dtype) + head * w.to(b.device, b.dtype))
