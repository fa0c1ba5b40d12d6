"""ControlNet (chapter 14): a trainable copy of the U-Net's encoder and mid block that reads a
control image (edges, a mask, a pose) and adds what it finds to the frozen U-Net's skips.

    cn = ControlNet.from_unet(unet)              # the copy, zero convs at zero: changes nothing yet
    down, mid = cn(latents, t, context, hint)    # hint: (B, 3, H, W) in [0, 1], pixel size
    eps = unet(latents, t, context, down_residuals=down, mid_residual=mid)

The copy takes `conv_in(x) + hint_encoder(hint)`; each of its skips (and its mid block's output)
goes through a 1x1 "zero convolution", initialised to zero, and is scaled by the conditioning
scale. Our names are the U-Net's for the copy (conv_in, time_embedding, down_blocks, mid_block);
`hint_encoder`, `zero_convs` and `mid_zero_conv` for the rest. `ControlNet.from_pretrained`
reads a diffusers ControlNet folder and the original 1.0 / 1.1 single files through the key
maps below, so this module sits with the loaders (like `lora`), above the models.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import weights
from .embeddings import TimestepEmbedding, timestep_embedding
from .unet import UNetConfig, down_blocks, mid_block


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet is its U-Net's encoder (`unet`, the U-Net's own config) plus a hint encoder:
    `hint_channels` per conv level (each level after the first halves the size, so len - 1
    halvings must bring the control image to the latent size: 3 for SD's factor-8 VAE)."""

    unet: UNetConfig = UNetConfig()
    hint_channels: tuple = (16, 32, 96, 256)
    conditioning_channels: int = 3   # an RGB control image

    @classmethod
    def sd15(cls):
        """The ControlNets of lllyasviel/ControlNet and ControlNet-v1-1 for SD 1.5."""
        return cls()

    @classmethod
    def course(cls, unet_config):
        """A ControlNet for the course U-Net (`unet_config`: its config): the course VAE shrinks
        32 px to 8 latents (factor 4), so two halvings in the hint encoder."""
        return cls(unet=unet_config, hint_channels=(16, 32, 64))

    @classmethod
    def tiny(cls):
        """UNetConfig.tiny()'s encoder with a small hint encoder (factor 8, SD's), for tests."""
        return cls(unet=UNetConfig.tiny(), hint_channels=(8, 8, 16, 16))

    def to_json(self):
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text):
        d = json.loads(text)
        return cls(unet=UNetConfig.from_json(json.dumps(d["unet"])), hint_channels=tuple(d["hint_channels"]),
                   conditioning_channels=d["conditioning_channels"])

    @classmethod
    def from_diffusers(cls, config):
        """Read a diffusers ControlNetModel `config.json` (a path or a dict)."""
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        c = dict(config)
        order = c.pop("controlnet_conditioning_channel_order", "rgb")
        pooled = c.pop("global_pool_conditions", False)
        if order != "rgb" or pooled:
            raise ValueError(f"controlnet config: controlnet_conditioning_channel_order={order!r}, "
                             f"global_pool_conditions={pooled!r}; minisd reads ControlNets with 'rgb' and False")
        hint = tuple(c.pop("conditioning_embedding_out_channels", None) or (16, 32, 96, 256))
        channels = c.pop("conditioning_channels", 3)
        down = c.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        c["up_block_types"] = [t.replace("Down", "Up") for t in reversed(down)]  # a ControlNet has none
        return cls(unet=UNetConfig.from_diffusers(c), hint_channels=hint, conditioning_channels=channels)

    def to_diffusers(self):
        """The same architecture as keyword arguments of diffusers' ControlNetModel (tests)."""
        d = self.unet.to_diffusers()
        for key in ("sample_size", "out_channels", "up_block_types"):
            d.pop(key)
        return dict(d, conditioning_embedding_out_channels=list(self.hint_channels),
                    conditioning_channels=self.conditioning_channels)


class HintEncoder(nn.Module):
    """The conditioning-image encoder: small 3x3 convs with SiLU, halving the size at each new
    width, then a zero-initialised conv to the U-Net's first width: (B, 3, H, W) -> (B, C0, H/f, W/f)."""

    def __init__(self, out_channels, channels=(16, 32, 96, 256), in_channels=3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = zero(nn.Conv2d(channels[-1], out_channels, 3, padding=1))

    def forward(self, hint):
        x = F.silu(self.conv_in(hint))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


def zero(module):
    """A zero convolution: weights and bias 0, so its output is 0 but its gradient is not."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNet(nn.Module):
    """The trainable copy of a U-Net's encoder and mid block, its hint encoder and its zero convs.

    `forward(x, t, context, hint, scale)` -> (down residuals, one per U-Net skip; mid residual),
    each times `scale`, for `UNet.forward(..., down_residuals=, mid_residual=)`."""

    def __init__(self, config=None):
        super().__init__()
        self.config = cfg = config or ControlNetConfig.sd15()
        c = cfg.unet
        ch, L = c.block_channels, c.layers_per_block
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], 4 * ch[0])
        self.hint_encoder = HintEncoder(ch[0], cfg.hint_channels, cfg.conditioning_channels)
        self.down_blocks = down_blocks(c)
        self.mid_block = mid_block(c)
        # one 1x1 zero conv per skip: conv_in's, then L per level plus each Downsample's
        widths = [ch[0]] + [w for i, w in enumerate(ch) for _ in range(L + (i < len(ch) - 1))]
        self.zero_convs = nn.ModuleList(zero(nn.Conv2d(w, w, 1)) for w in widths)
        self.mid_zero_conv = zero(nn.Conv2d(ch[-1], ch[-1], 1))

    @classmethod
    def from_unet(cls, unet, hint_channels=None):
        """A ControlNet whose copy starts as `unet`'s encoder and mid block (the paper's init), with
        fresh hint convs and zero convs at zero. `hint_channels` default: SD's (16, 32, 96, 256)."""
        config = ControlNetConfig(unet.config, *(() if hint_channels is None else (tuple(hint_channels),)))
        net = cls(config).to(next(unet.parameters()).device)
        for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
            getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net

    def forward(self, x, t, context, hint, scale=1.0):
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = (t[None] if t.ndim == 0 else t).expand(B)
        temb = self.time_embedding(timestep_embedding(t, self.config.unet.block_channels[0]).to(x.dtype))

        x = self.conv_in(x) + self.hint_encoder(hint.to(x.dtype))  # (B, C0, h, w) + the hint at latent size
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context)
            skips += s
        x = self.mid_block(x, temb, context)
        down = [conv(s) * scale for conv, s in zip(self.zero_convs, skips)]
        return down, self.mid_zero_conv(x) * scale

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """A diffusers ControlNet folder (config.json + diffusion_pytorch_model.*) or an original
        single file: a 1.1 file (`control_v11*_sd15_*.pth/.safetensors`, keys input_blocks.*,
        zero_convs.*, input_hint_block.*, middle_block_out.*) or a 1.0 file (`control_sd15_*.pth`:
        the same under control_model.*, bundled with a whole SD checkpoint, which is ignored).
        .pth/.ckpt are read with torch.load(weights_only=True)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no ControlNet at {path}: pass a diffusers ControlNet folder (config.json and "
                                    "diffusion_pytorch_model.safetensors) or an original .pth/.safetensors file")
        if path.is_dir():
            config, sd = _folder(path)
            with torch.device("meta"):
                net = cls(config)
            renamed = {controlnet_key(k): v.to(device=device, dtype=dtype) for k, v in sd.items()}
            return weights.load_into(net, renamed, str(path)).eval()
        sd = weights.load_state_dict(path)
        return from_original(sd, str(path), device, dtype)


# --- diffusers keys ---------------------------------------------------------------------------

# diffusers' names -> ours, beyond the U-Net's own table (weights.UNET_NAMES) for the copy
CONTROLNET_NAMES = [
    ("^controlnet_cond_embedding.", "^hint_encoder."),
    ("^controlnet_down_blocks.", "^zero_convs."),
    ("^controlnet_mid_block.", "^mid_zero_conv."),
] + weights.UNET_NAMES
controlnet_key = weights._renamer(CONTROLNET_NAMES, inverse=False)
controlnet_key.__doc__ = "One diffusers ControlNetModel key -> ours, e.g. 'controlnet_down_blocks.3.weight' -> 'zero_convs.3.weight'."
controlnet_diffusers_key = weights._renamer(CONTROLNET_NAMES, inverse=True)


def _folder(folder):
    """(ControlNetConfig, diffusers state dict) of a diffusers ControlNet folder, with what else
    the folder could be named."""
    if (folder / "model_index.json").exists():
        raise weights.WeightsError(f"{folder} is a whole diffusers pipeline (model_index.json), not a ControlNet: "
                                   "load it with StableDiffusion.from_pretrained, and the ControlNet from its "
                                   "own folder (e.g. lllyasviel/control_v11p_sd15_canny)")
    file = folder / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {folder}: a diffusers ControlNet folder holds config.json "
                                "and diffusion_pytorch_model.safetensors")
    config = json.loads(file.read_text())
    kind = config.get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise weights.WeightsError(f"{file}: _class_name is {kind!r}, not 'ControlNetModel': this folder is "
                                   "not a ControlNet" + (" (a U-Net: load the pipeline with StableDiffusion."
                                                         "from_pretrained)" if kind == "UNet2DConditionModel" else ""))
    try:
        cfg = ControlNetConfig.from_diffusers(config)
    except ValueError as e:
        raise weights.WeightsError(f"{file}: {e}") from e
    sd = weights._component_file(folder, weights._WEIGHT_FILES["unet"])
    return cfg, sd if isinstance(sd, dict) else weights.load_state_dict(sd)


# --- the original single files ------------------------------------------------------------------

CONTROL_PREFIX = "control_model."   # the 1.0 files: the ControlNet under this, next to a whole SD


def original_key(key, config):
    """Our ControlNet key -> the original's (1.1 files; 1.0 files add `control_model.`). The copy is
    named as the U-Net's encoder (`weights.unet_original_key`); the hint encoder is one Sequential,
    `input_hint_block`, whose SiLUs take the odd indices; zero convs are Sequentials of one conv."""
    part, _, rest = key.partition(".")
    if part == "hint_encoder":
        n = len(config.hint_channels)
        kind, _, rest = rest.partition(".")
        if kind == "conv_in":
            return f"input_hint_block.0.{rest}"
        if kind == "conv_out":
            return f"input_hint_block.{2 * (2 * (n - 1) + 1)}.{rest}"
        j, _, rest = rest.partition(".")                    # blocks.j -> input_hint_block.2(j + 1)
        return f"input_hint_block.{2 * (int(j) + 1)}.{rest}"
    if part == "zero_convs":
        i, _, rest = rest.partition(".")
        return f"zero_convs.{i}.0.{rest}"
    if part == "mid_zero_conv":
        return f"middle_block_out.0.{rest}"
    return weights.unet_original_key(key, config.unet)


def to_original(net):
    """Our ControlNet's state dict in the original 1.1 layout (what `from_pretrained` reads)."""
    return {original_key(k, net.config): v for k, v in net.state_dict().items()}


def config_from_original(sd, source):
    """A ControlNetConfig read off the shapes of an original ControlNet state dict (prefix removed):
    the encoder as `weights.unet_config_from_original` reads a U-Net's, the hint encoder from
    input_hint_block's convs."""
    if "input_hint_block.0.weight" not in sd:
        raise weights.WeightsError(f"{source}: no input_hint_block.0.weight: not a ControlNet file")
    unet = weights.unet_config_from_original(sd, source, encoder_only=True)
    convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
    outs = [sd[f"input_hint_block.{i}.weight"].shape[0] for i in convs]
    return ControlNetConfig(unet=unet, hint_channels=tuple(outs[0:-1:2]),
                            conditioning_channels=sd["input_hint_block.0.weight"].shape[1])


def split_controlnet(sd, source):
    """The ControlNet's tensors of an original file, prefix removed: a 1.1 file is all ControlNet;
    a 1.0 file's control_model.* are, and its SD checkpoint (U-Net, VAE, text encoder, training
    buffers) is named and ignored. Anything else is refused, with what the file looks like."""
    if any(k.startswith(CONTROL_PREFIX) for k in sd):
        sd_parts = (weights.UNET_PREFIX, weights.VAE_PREFIX, weights.TEXT_PREFIX, weights.OPENCLIP_PREFIX,
                    *weights.IGNORED_PREFIXES)
        out, unknown = {}, []
        for key, tensor in sd.items():
            if key.startswith(CONTROL_PREFIX):
                out[key[len(CONTROL_PREFIX):]] = tensor
            elif not key.startswith(sd_parts) and key not in weights.IGNORED_KEYS and key != "lvlb_weights":
                unknown.append(key)
        if unknown:
            raise weights.WeightsError(f"{source}: {len(unknown)} key(s) that are neither {CONTROL_PREFIX}* nor "
                                       f"part of an SD checkpoint, e.g. {unknown[:3]}")
        return out
    if "input_hint_block.0.weight" in sd:
        return sd
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        raise weights.WeightsError(f"{source}: a diffusers ControlNet's weights without their config.json: pass the "
                                   "folder that holds both to ControlNet.from_pretrained")
    if any(k.startswith(weights.UNET_PREFIX) for k in sd):
        raise weights.WeightsError(f"{source} is a Stable Diffusion checkpoint, not a ControlNet (no "
                                   f"{CONTROL_PREFIX}* or input_hint_block.* keys): load it with "
                                   "StableDiffusion.from_pretrained, and pass a ControlNet file (e.g. "
                                   "control_v11p_sd15_canny.pth) to ControlNet.from_pretrained")
    if any("lora" in k for k in sd):
        raise weights.WeightsError(f"{source} is a LoRA file, not a ControlNet: load it with minisd.lora.load(pipe, path)")
    raise weights.WeightsError(f"{source}: no input_hint_block.* or {CONTROL_PREFIX}* keys, so not a ControlNet "
                               f"file (first keys: {list(sd)[:3]})")


def from_original(sd, source="state dict", device="cpu", dtype=torch.float32):
    """A ControlNet from an original single-file state dict (1.0 or 1.1), config read off the shapes;
    every key of the ControlNet part is used, every shape checked."""
    sd = split_controlnet(sd, source)
    config = config_from_original(sd, source)
    with torch.device("meta"):
        net = ControlNet(config)
    names = {original_key(k, config): k for k in net.state_dict()}
    unused = [k for k in sd if k not in names]
    if unused:
        raise weights.WeightsError(f"{source}: {len(unused)} key(s) that the ControlNet read off the file's shapes "
                                   f"does not have, e.g. {unused[:3]}: not an SD 1.x/2.x ControlNet")
    missing = [k for k in names if k not in sd]
    if missing:
        raise weights.WeightsError(f"{source}: {len(missing)} key(s) missing, e.g. {missing[:3]}: the file is "
                                   "truncated or from another architecture")
    renamed = {names[k]: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    return weights.load_into(net, renamed, source).eval()


def check_fits(net, unet, name="controlnet"):
    """Refuse a ControlNet made for another U-Net (an SD 2.x ControlNet on SD 1.x, say) before any
    work, naming what differs."""
    a, b = net.config.unet, unet.config
    if a.context_dim != b.context_dim:
        fam = {768: "SD 1.x (768-wide text)", 1024: "SD 2.x (1024-wide text)"}
        raise ValueError(f"{name} was made for {fam.get(a.context_dim, f'a {a.context_dim}-wide text context')} but "
                         f"the pipeline's U-Net is {fam.get(b.context_dim, f'{b.context_dim}-wide')}: use a "
                         "ControlNet trained for this model (e.g. the *_sd15_* files for SD 1.5)")
    fields = ("in_channels", "block_channels", "layers_per_block", "cross_attention", "linear_projection")
    diff = [f for f in fields if getattr(a, f) != getattr(b, f)]
    if diff:
        raise ValueError(f"{name} does not fit the pipeline's U-Net: {', '.join(f'{f} {getattr(a, f)} vs {getattr(b, f)}' for f in diff)}; "
                         "a ControlNet works only with the U-Net architecture it was made from")

