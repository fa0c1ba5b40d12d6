"""Reading and writing weights (chapter 11): one readable key map per format.

Every tensor of a file is either used or named as ignored, every shape is checked, and a
mismatch raises an error that names the file, the key, both shapes and the likely cause.
Models that are about to receive weights are built on the meta device (no random init).
"""
import re
from pathlib import Path

import torch


class WeightsError(ValueError):
    """A weight file that cannot be used: the message says which file, which key, and why."""


def load_state_dict(path, device="cpu"):
    """Read a .safetensors file (memory-mapped) or a .ckpt/.pt/.bin (torch.load, weights_only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weight file at {path}: check the path (a diffusers folder "
                                "or one .safetensors/.ckpt file is expected)")
    if path.is_dir():
        raise WeightsError(f"{path} is a folder; load_state_dict reads one file "
                           "(use StableDiffusion.from_pretrained for a diffusers folder)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device=str(device))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise WeightsError(f"{path} is not a readable safetensors file ({e}); "
                               "it may be truncated or corrupt: download or save it again") from e
    try:
        sd = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path} could not be read by torch.load(weights_only=True) ({e}); "
                           "it may be truncated, corrupt, or hold more than tensors: "
                           "convert it to .safetensors") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # Lightning-style checkpoints (the original SD .ckpt files)
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} holds a {type(sd).__name__}, not a dict of tensors")
    return sd


def load_into(model, state_dict, source="state dict"):
    """Check a state dict already renamed to our keys against `model` (built on the meta
    device) and load it with assign=True, so the model holds the file's tensors, uncopied.

    Every key must be present on both sides with the same shape; otherwise a WeightsError
    names the key, both shapes and the likely cause.
    """
    ours = model.state_dict()
    missing = [k for k in ours if k not in state_dict]
    unexpected = [k for k in state_dict if k not in ours]
    if unexpected:
        raise WeightsError(f"{source}: {len(unexpected)} key(s) the model does not have, e.g. "
                           f"{unexpected[:3]}; is this a LoRA file, or weights for another model "
                           "or architecture passed as a full checkpoint?")
    if missing:
        raise WeightsError(f"{source}: {len(missing)} key(s) missing, e.g. {missing[:3]}; the file "
                           "is incomplete or was saved from a different architecture/config")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(ours[key].shape):
            cause = "the file and the config describe different models"
            if key.endswith(("to_k.weight", "to_v.weight")) and tensor.shape[-1] == 1024:
                cause = "cross-attention width 1024: this looks like an SD 2.x file, minisd loads SD 1.x"
            raise WeightsError(f"{source}: {key} has shape {tuple(tensor.shape)} in the file but "
                               f"{tuple(ours[key].shape)} in the model ({cause})")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


# --- U-Net: diffusers keys -------------------------------------------------------------

# diffusers' name -> ours, applied in order to each key of `unet/diffusion_pytorch_model.*`.
# Most names are the same (conv_in, time_embedding.linear_1, down_blocks.0.attentions.1.proj_in,
# ...); these are the places where ours follow the seed's structure instead.
UNET_KEY_MAP = [
    (r"^mid_block\.resnets\.0\.", "mid_block.resnet1."),          # ResNetBlock + SpatialTransformer
    (r"^mid_block\.attentions\.0\.", "mid_block.attention."),     #   + ResNetBlock
    (r"^mid_block\.resnets\.1\.", "mid_block.resnet2."),
    (r"\.downsamplers\.0\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"(resnets\.\d+|resnet[12])\.norm1\.", r"\1.gsc1.norm."),  # ResNetBlock = GSC, + temb, GSC, + skip
    (r"(resnets\.\d+|resnet[12])\.conv1\.", r"\1.gsc1.conv."),
    (r"(resnets\.\d+|resnet[12])\.time_emb_proj\.", r"\1.time_proj."),
    (r"(resnets\.\d+|resnet[12])\.norm2\.", r"\1.gsc2.norm."),
    (r"(resnets\.\d+|resnet[12])\.conv2\.", r"\1.gsc2.conv."),
    (r"(resnets\.\d+|resnet[12])\.conv_shortcut\.", r"\1.skip."),
    (r"\.transformer_blocks\.0\.", ".block."),                    # one BasicTransformerBlock in SD 1.x
    (r"\.to_out\.0\.", ".to_out."),                               # to_out.1 is a Dropout, no weights
    (r"\.ff\.net\.0\.proj\.", ".ff.geglu.proj."),
    (r"\.ff\.net\.2\.", ".ff.out."),
    (r"^conv_norm_out\.", "out.norm."),                              # the output GSC
    (r"^conv_out\.", "out.conv."),
]


def unet_key(key):
    """One diffusers U-Net key -> ours, e.g. 'down_blocks.0.resnets.0.norm1.weight' ->
    'down_blocks.0.resnets.0.gsc1.norm.weight'."""
    for pattern, replacement in UNET_KEY_MAP:
        key = re.sub(pattern, replacement, key)
    return key


def unet_from_diffusers(state_dict):
    """A diffusers U-Net state dict -> ours (same tensors, renamed)."""
    return {unet_key(k): v for k, v in state_dict.items()}


def load_unet(source, config=None):
    """A minisd.UNet holding the weights of a diffusers U-Net file (or state dict), built on
    the meta device with no random init; `config` defaults to SD 1.5's."""
    from .unet import UNet, UNetConfig
    sd = source if isinstance(source, dict) else load_state_dict(source)
    with torch.device("meta"):
        model = UNet(config or UNetConfig.sd15())
    name = "U-Net state dict" if isinstance(source, dict) else str(source)
    return load_into(model, unet_from_diffusers(sd), name)

# --- VAE: diffusers keys ---------------------------------------------------------------

# diffusers' name -> ours, applied in order to each key of `vae/diffusion_pytorch_model.*`.
# The blocks keep diffusers' names (encoder.down_blocks.0.resnets.1, decoder.up_blocks.2, ...);
# inside them ours follow chapter 2's modules. quant_conv/post_quant_conv keep their names.
VAE_KEY_MAP = [
    (r"\.downsamplers\.0\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid_block.attention.norm."),  # SpatialSelfAttention
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid_block.attention.to_out."),
    (r"\.mid_block\.attentions\.0\.", ".mid_block.attention."),
    (r"\.norm1\.", ".gsc1.norm."),                      # ResNetBlock = GSC, GSC, + skip
    (r"\.conv1\.", ".gsc1.conv."),
    (r"\.norm2\.", ".gsc2.norm."),
    (r"\.conv2\.", ".gsc2.conv."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.out.norm."),   # the output GSC
    (r"^(encoder|decoder)\.conv_out\.", r"\1.out.conv."),
]


def vae_key(key):
    """One diffusers VAE key -> ours, e.g. 'encoder.down_blocks.0.downsamplers.0.conv.weight'
    -> 'encoder.down_blocks.0.downsample.conv.weight'."""
    for pattern, replacement in VAE_KEY_MAP:
        key = re.sub(pattern, replacement, key)
    return key


def vae_from_diffusers(state_dict):
    """A diffusers VAE state dict -> ours (same tensors, renamed)."""
    if any(k.startswith("first_stage_model.") for k in state_dict):
        raise WeightsError("this VAE state dict is in the original single-file layout "
                           "(first_stage_model.*), not diffusers': use minisd.weights.from_original")
    return {vae_key(k): v for k, v in state_dict.items()}


def load_vae(source, config=None):
    """A minisd AutoencoderKL holding a diffusers VAE file (or state dict), built on the meta
    device with no random init; `config` defaults to SD 1.5's."""
    from .vae import AutoencoderKL, VAEConfig
    sd = source if isinstance(source, dict) else load_state_dict(source)
    with torch.device("meta"):
        model = AutoencoderKL(config or VAEConfig.sd15())
    name = "VAE state dict" if isinstance(source, dict) else str(source)
    return load_into(model, vae_from_diffusers(sd), name).eval()


def save_course_vae(model, path, metadata):
    """Write a minisd AutoencoderKL (our keys) to safetensors; its config goes in the metadata."""
    from safetensors.torch import save_file
    meta = {**metadata, "config": model.config.to_json()}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def load_course_vae(path):
    """The AutoencoderKL written by `save_course_vae` (config and scaling factor from the metadata)."""
    from safetensors import safe_open
    from .vae import AutoencoderKL, VAEConfig
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no course VAE at {path}: train one with `python -m minisd train vae`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise WeightsError(f"{path} has no 'config' in its metadata: it was not written by "
                           "`python -m minisd train vae` (for a diffusers VAE file use load_vae)")
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig.from_json(meta["config"]))
    return load_into(model, load_state_dict(path), str(path)).eval()


# --- CLIP text encoder: transformers keys ------------------------------------------------

# --- original single-file layout (model.diffusion_model.*, first_stage_model.*, ...) ------
