"""Reading and writing weights (chapter 11): one readable key map per format.

Every tensor of a file is either used or named as ignored, every shape is checked, and a
mismatch raises an error that names the file, the key, both shapes and the likely cause.
Models that are about to receive weights are built on the meta device (no random init).
"""
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


# --- U-Net: diffusers keys -------------------------------------------------------------

# --- VAE: diffusers keys ---------------------------------------------------------------

# --- CLIP text encoder: transformers keys ------------------------------------------------

# --- original single-file layout (model.diffusion_model.*, first_stage_model.*, ...) ------
