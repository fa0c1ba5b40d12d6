"""The U-Net (chapter 4): SD's noise predictor, eps (or v) = unet(latents, t, context).

An encoder of CrossAttnDownBlocks and a DownBlock, a CrossAttnMidBlock, and a decoder of an
UpBlock and CrossAttnUpBlocks that concatenates the encoder's skip features on channels.
`UNetConfig.sd15()` is the real 859,520,964-parameter model, `UNetConfig.sd21()` SD 2.1's
865,910,724 (chapter 11: what changed); `UNetConfig.tiny()` the same code with small numbers.
"""
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .attention import SpatialTransformer
from .embeddings import TimestepEmbedding, timestep_embedding
from .resnet import GSC, Conv2d, Downsample, ResNetBlock, Upsample


@dataclass(frozen=True)
class UNetConfig:
    """The numbers that make a U-Net: channels and attention per resolution level, from the top."""

    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple = (320, 640, 1280, 1280)
    cross_attention: tuple = (True, True, True, False)  # down block i has SpatialTransformers (up blocks mirror)
    heads: tuple = (8, 8, 8, 8)                          # attention heads per down block (up blocks mirror)
    layers_per_block: int = 2                             # ResNetBlocks per down block (up blocks have one more)
    context_dim: int = 768                                # CLIP ViT-L/14's width
    groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 64                                 # latent size the model was trained at (512 px / 8)
    linear_projection: bool = False                       # SD 2.x: Linear proj_in/proj_out in SpatialTransformers
    upcast_attention: bool = False                        # SD 2.1: attention in float32 under float16

    def __post_init__(self):
        n = len(self.block_channels)
        if len(self.cross_attention) != n or len(self.heads) != n:
            raise ValueError(f"block_channels, cross_attention and heads need one entry per block ({n}), got "
                             f"{len(self.block_channels)}, {len(self.cross_attention)}, {len(self.heads)}")
        for c in self.block_channels:
            if c % self.groups:
                raise ValueError(f"{c} channels cannot be split into {self.groups} GroupNorm groups")

    def __repr__(self):
        """The dataclass repr, but SD 2.x's two switches only where they are on."""
        shown = [f.name for f in fields(self) if f.name not in ("linear_projection", "upcast_attention")
                 or getattr(self, f.name)]
        return f"UNetConfig({', '.join(f'{name}={getattr(self, name)!r}' for name in shown)})"

    @classmethod
    def sd15(cls):
        """Stable Diffusion 1.5's U-Net (the same for 1.1-1.4)."""
        return cls()

    @classmethod
    def sd21(cls):
        """Stable Diffusion 2.1's (768-v) U-Net: 64-wide heads (5, 10, 20, 20 of them), OpenCLIP's
        1024-wide context, linear projections, upcast attention, 96x96 latents (768 px)."""
        return cls(heads=(5, 10, 20, 20), context_dim=1024, sample_size=96, linear_projection=True,
                   upcast_attention=True)

    @classmethod
    def tiny(cls):
        """A 1.5M-parameter U-Net with every kind of block (3 levels: multiples of 4), for tests and demos."""
        return cls(block_channels=(32, 64, 64), cross_attention=(True, True, False), heads=(2, 2, 2),
                   layers_per_block=1, context_dim=32, groups=8, sample_size=16)

    @classmethod
    def from_diffusers(cls, config):
        """Read a diffusers `unet/config.json` (a path or a dict) of an SD 1.x- or 2.x-style U-Net."""
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        c = {k: v for k, v in config.items() if not k.startswith("_")}
        for key, value in c.items():
            if key not in _DIFFUSERS_KEYS:
                raise ValueError(f"unet config: unknown key {key!r}; minisd reads SD 1.x- and 2.x-style "
                                 "UNet2DConditionModel configs")
            if isinstance(value, (list, tuple)) and len(set(value)) == 1 and key in _FIXED:
                value = value[0]  # e.g. transformer_layers_per_block: [1, 1, 1, 1] is 1
            if key in _FIXED and value != _FIXED[key]:
                raise ValueError(f"unet config: {key}={value!r} is not supported; minisd's U-Net is SD 1.x's "
                                 f"and SD 2.x's, with {key}={_FIXED[key]!r}")
        down = list(c.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        up = list(c.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
        mirror = [t.replace("Down", "Up") for t in reversed(down)]
        if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or up != mirror:
            raise ValueError(f"unet config: down_block_types {down} / up_block_types {up} are not supported; "
                             "minisd needs CrossAttnDownBlock2D/DownBlock2D and the same blocks mirrored going up")
        channels = tuple(c.get("block_out_channels", (320, 640, 1280, 1280)))
        heads = c.get("attention_head_dim", 8)  # in SD 1.x and 2.x configs this is the number of heads
        if c.get("num_attention_heads") is not None:
            raise ValueError("unet config: num_attention_heads is not supported (diffusers rejects it too); "
                             "SD configs give the number of heads as attention_head_dim")
        heads = (heads,) * len(channels) if isinstance(heads, int) else tuple(heads)
        layers = c.get("layers_per_block", 2)
        context = c.get("cross_attention_dim", 1280)
        if not isinstance(layers, int) or not isinstance(context, int):
            raise ValueError("unet config: per-block layers_per_block / cross_attention_dim lists are not "
                             "supported; SD 1.x and 2.x use one number for each")
        size = c.get("sample_size", 64)
        return cls(in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4),
                   block_channels=channels, cross_attention=tuple(t == "CrossAttnDownBlock2D" for t in down),
                   heads=heads, layers_per_block=layers, context_dim=context,
                   groups=c.get("norm_num_groups", 32), norm_eps=c.get("norm_eps", 1e-5),
                   sample_size=size if isinstance(size, int) else size[0],
                   linear_projection=bool(c.get("use_linear_projection", False)),
                   upcast_attention=bool(c.get("upcast_attention", False)))

    def to_json(self):
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text):
        d = json.loads(text)
        return cls(**{f.name: tuple(d[f.name]) if isinstance(d[f.name], list) else d[f.name]
                      for f in fields(cls) if f.name in d})

    def to_diffusers(self):
        """The same architecture as keyword arguments of diffusers' UNet2DConditionModel
        (for building the reference model in parity tests and benchmarks)."""
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.cross_attention]
        return dict(sample_size=self.sample_size, in_channels=self.in_channels, out_channels=self.out_channels,
                    down_block_types=down, up_block_types=[t.replace("Down", "Up") for t in reversed(down)],
                    block_out_channels=list(self.block_channels), layers_per_block=self.layers_per_block,
                    norm_num_groups=self.groups, norm_eps=self.norm_eps, cross_attention_dim=self.context_dim,
                    attention_head_dim=list(self.heads), use_linear_projection=self.linear_projection,
                    upcast_attention=self.upcast_attention)


# UNet2DConditionModel's options that SD 1.x and 2.x leave at these values; anything else is refused.
_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}
_DIFFUSERS_KEYS = set(_FIXED) | {
    "sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim",
    "num_attention_heads", "use_linear_projection", "upcast_attention",
}


class DownBlock(nn.Module):
    """ResNetBlocks, then a Downsample (except at the lowest level); every output is a skip."""

    def __init__(self, in_channels, out_channels, temb_channels, layers, downsample, groups=32, eps=1e-5):
        super().__init__()
        self.resnets = nn.ModuleList(ResNetBlock(in_channels if i == 0 else out_channels, out_channels,
                                                 temb_channels, groups, eps) for i in range(layers))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x, temb, context=None):
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class CrossAttnDownBlock(DownBlock):
    """(ResNetBlock + SpatialTransformer) x layers, then a Downsample; every output is a skip."""

    def __init__(self, in_channels, out_channels, temb_channels, layers, downsample, heads, context_dim,
                 groups=32, eps=1e-5, linear=False, upcast=False):
        super().__init__(in_channels, out_channels, temb_channels, layers, downsample, groups, eps)
        self.attentions = nn.ModuleList(SpatialTransformer(out_channels, context_dim, heads, groups, linear, upcast)
                                        for _ in range(layers))

    def forward(self, x, temb, context=None):
        skips = []
        for resnet, attention in zip(self.resnets, self.attentions):
            x = attention(resnet(x, temb), context)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class CrossAttnMidBlock(nn.Module):
    """ResNetBlock -> SpatialTransformer -> ResNetBlock, at the lowest resolution."""

    def __init__(self, channels, temb_channels, heads, context_dim, groups=32, eps=1e-5, linear=False, upcast=False):
        super().__init__()
        self.resnet1 = ResNetBlock(channels, channels, temb_channels, groups, eps)
        self.attention = SpatialTransformer(channels, context_dim, heads, groups, linear, upcast)
        self.resnet2 = ResNetBlock(channels, channels, temb_channels, groups, eps)

    def forward(self, x, temb, context):
        return self.resnet2(self.attention(self.resnet1(x, temb), context), temb)


class UpBlock(nn.Module):
    """ResNetBlocks that each first concatenate an encoder skip on channels, then an Upsample
    (except at the top level).

    `in_channels` is the width of this level's encoder output, `prev_channels` the width
    coming up from below; the last ResNetBlock takes the skip from the level above.
    """

    def __init__(self, in_channels, out_channels, prev_channels, temb_channels, layers, upsample,
                 groups=32, eps=1e-5):
        super().__init__()
        resnets = []
        for i in range(layers):
            skip = in_channels if i == layers - 1 else out_channels
            below = prev_channels if i == 0 else out_channels
            resnets.append(ResNetBlock(below + skip, out_channels, temb_channels, groups, eps))
        self.resnets = nn.ModuleList(resnets)
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x, skips, temb, context=None):
        for resnet in self.resnets:
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)  # (B, C, H, W) + (B, C_skip, H, W)
        if self.upsample is not None:
            x = self.upsample(x, skips[-1].shape[-2:])  # up to the size of the next skip
        return x


class CrossAttnUpBlock(UpBlock):
    """(concat skip -> ResNetBlock -> SpatialTransformer) x layers, then an Upsample."""

    def __init__(self, in_channels, out_channels, prev_channels, temb_channels, layers, upsample, heads,
                 context_dim, groups=32, eps=1e-5, linear=False, upcast=False):
        super().__init__(in_channels, out_channels, prev_channels, temb_channels, layers, upsample, groups, eps)
        self.attentions = nn.ModuleList(SpatialTransformer(out_channels, context_dim, heads, groups, linear, upcast)
                                        for _ in range(layers))

    def forward(self, x, skips, temb, context=None):
        for resnet, attention in zip(self.resnets, self.attentions):
            x = attention(resnet(torch.cat([x, skips.pop()], dim=1), temb), context)
        if self.upsample is not None:
            x = self.upsample(x, skips[-1].shape[-2:])
        return x


def down_blocks(c):
    """The encoder of a U-Net with config `c`: one DownBlock or CrossAttnDownBlock per level
    (also ControlNet's trainable copy, chapter 14)."""
    ch, n, temb = c.block_channels, len(c.block_channels), 4 * c.block_channels[0]
    attn = (c.linear_projection, c.upcast_attention)  # SD 2.x's two changes to every SpatialTransformer
    blocks = nn.ModuleList()
    for i in range(n):
        args = (ch[max(i - 1, 0)], ch[i], temb, c.layers_per_block, i < n - 1)
        if c.cross_attention[i]:
            blocks.append(CrossAttnDownBlock(*args, c.heads[i], c.context_dim, c.groups, c.norm_eps, *attn))
        else:
            blocks.append(DownBlock(*args, c.groups, c.norm_eps))
    return blocks


def mid_block(c):
    """The mid block of a U-Net with config `c` (also ControlNet's trainable copy)."""
    return CrossAttnMidBlock(c.block_channels[-1], 4 * c.block_channels[0], c.heads[-1], c.context_dim, c.groups,
                             c.norm_eps, c.linear_projection, c.upcast_attention)


class UNet(nn.Module):
    """SD 1.x and 2.x's U-Net: predicts the noise (or v) in latents (B, 4, H, W) at timestep t
    given a text context (B, 77, 768; 1024 for SD 2.x). Any H and W: where a Downsample meets an odd size it rounds up, and
    each Upsample then lands on the size of the skip it meets (as diffusers does)."""

    def __init__(self, config=None):
        super().__init__()
        self.config = c = config or UNetConfig.sd15()
        ch, n = c.block_channels, len(c.block_channels)
        temb = 4 * ch[0]
        attn = (c.linear_projection, c.upcast_attention)  # SD 2.x's two changes to every SpatialTransformer
        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)

        self.down_blocks = down_blocks(c)
        self.mid_block = mid_block(c)

        self.up_blocks = nn.ModuleList()
        up_ch, up_heads, up_attn = ch[::-1], c.heads[::-1], c.cross_attention[::-1]
        for i in range(n):
            args = (up_ch[min(i + 1, n - 1)], up_ch[i], up_ch[max(i - 1, 0)], temb, c.layers_per_block + 1,
                    i < n - 1)
            if up_attn[i]:
                block = CrossAttnUpBlock(*args, up_heads[i], c.context_dim, c.groups, c.norm_eps, *attn)
            else:
                block = UpBlock(*args, c.groups, c.norm_eps)
            self.up_blocks.append(block)

        self.out = GSC(ch[0], c.out_channels, c.groups, c.norm_eps)

    def forward(self, x, t, context, down_residuals=None, mid_residual=None):
        """`down_residuals` (one per skip, in order) and `mid_residual` are a ControlNet's outputs
        (chapter 14): added to the skips and to the mid block's output, as diffusers'
        down_block_additional_residuals / mid_block_additional_residual."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(B)  # one timestep for the whole batch, or one per sample
        temb = self.time_embedding(timestep_embedding(t, self.config.block_channels[0]).to(x.dtype))

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context)
            skips += s
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down residuals for {len(skips)} skips: a ControlNet "
                                 "for another U-Net architecture?")
            skips = [s + r for s, r in zip(skips, down_residuals)]
        x = self.mid_block(x, temb, context)
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks:
            x = block(x, skips, temb, context)
        return self.out(x)
