"""The course models' checkpoint format (chapters 5, 8, 9): one safetensors file per model.

The tensors are the model's own state dict (our keys); the metadata holds what is needed to
rebuild and use it: "model" (the class), "config" (its config's `to_json()`), and for a
U-Net that a pipeline samples from, "sampling" (the recommended sampler, steps and guidance,
JSON), plus whatever the trainer adds (the command, timings). Files are written atomically.

    save_checkpoint(path, unet, sampling={"sampler": "ddim", "steps": 25, "guidance": 4.0})
    unet = load_checkpoint(path)                    # built on the meta device, then filled
    course_unet(), course_vae(), course_clip(), course_text_encoder()   # the files in data/
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import paths
from .clip import CLIP, CLIPConfig
from .controlnet import ControlNet, ControlNetConfig
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import WeightsError, check_not_lfs_pointer, load_into, load_state_dict, save_file

# The model classes a checkpoint can hold, by the name written in its metadata.
MODELS = {"UNet": (UNet, UNetConfig), "AutoencoderKL": (AutoencoderKL, VAEConfig), "CLIP": (CLIP, CLIPConfig),
          "ControlNet": (ControlNet, ControlNetConfig)}

# The course model's three checkpoints in data/, and the command that makes each one.
COURSE_FILES = {"vae": "course_vae.safetensors", "clip": "course_clip.safetensors", "unet": "course_unet.safetensors"}


def save_checkpoint(path, model, config=None, sampling=None, metadata=None, dtype=None):
    """Write `model` (a UNet, AutoencoderKL or CLIP) with its config (default: model.config)
    and, for a U-Net, its recommended `sampling` settings ({"sampler", "steps", "guidance"}).
    `metadata`: more strings to keep (e.g. the training command); `dtype`: store the tensors
    in it (the course CLIP is kept in float16: half the bytes, nothing measurable lost)."""
    name = type(model).__name__
    if name not in MODELS:
        raise TypeError(f"save_checkpoint writes a {', '.join(MODELS)}; got a {name}")
    config = model.config if config is None else config
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta.update(model=name, config=config.to_json())
    if sampling is not None:
        meta["sampling"] = json.dumps(dict(sampling))
    tensors = {k: v.to(dtype) if dtype is not None else v for k, v in model.state_dict().items()}
    save_file(tensors, path, metadata=meta)


def checkpoint_metadata(path):
    """The metadata of a checkpoint written by `save_checkpoint` (a dict of str), checked."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the course models are made by "
                                "`python -m minisd train vae`, `train clip` and `train unet`")
    check_not_lfs_pointer(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own error types for a bad header
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                           "make it again with the command that wrote it") from e
    if meta.get("model") not in MODELS or "config" not in meta:
        raise WeightsError(f"{path} has no 'model' and 'config' in its metadata: it was not written by "
                           "minisd.checkpoint.save_checkpoint (for diffusers or original SD files use "
                           "minisd.weights or StableDiffusion.from_pretrained)")
    return meta


def load_checkpoint(path):
    """The model written by `save_checkpoint`, in float32 and eval mode, built on the meta
    device and filled with the file's tensors."""
    meta = checkpoint_metadata(path)
    cls, config_cls = MODELS[meta["model"]]
    try:
        with torch.device("meta"):
            model = cls(config_cls.from_json(meta["config"]))
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:  # JSON, fields, or sizes no layer takes
        raise WeightsError(f"{path}: the {meta['model']} config in its metadata cannot be used ({type(e).__name__}: "
                           f"{e}); the file is corrupt or was not written by save_checkpoint: make it again") from e
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(path).items()}
    return load_into(model, sd, str(path)).eval()


def sampling_settings(path):
    """The recommended sampling settings stored with a U-Net checkpoint: a dict with "sampler",
    "steps" and "guidance", or None if the file stores none."""
    meta = checkpoint_metadata(path)
    return json.loads(meta["sampling"]) if "sampling" in meta else None


def set_sampling(path, sampling, note=None):
    """Rewrite a U-Net checkpoint's recommended `sampling` settings (and, if given, the `note`
    saying how they were chosen, kept as "sampling_criterion"), atomically; tensors and every
    other metadata entry stay as they are. `python -m minisd evaluate --set-default` uses it."""
    meta = checkpoint_metadata(path)
    if meta["model"] != "UNet":
        raise WeightsError(f"{path} holds a {meta['model']}: sampling settings belong to a U-Net checkpoint")
    meta["sampling"] = json.dumps(dict(sampling))
    if note is not None:
        meta["sampling_criterion"] = str(note)
    save_file(load_state_dict(path), path, metadata=meta)


def course_path(part):
    """data/'s checkpoint of one course part ("vae", "clip" or "unet"), or a FileNotFoundError
    that names the command that makes it."""
    path = paths.DATA_DIR / COURSE_FILES[part]
    if not path.exists():
        raise FileNotFoundError(f"the course model needs {path}, which does not exist yet: make it with "
                                f"`python -m minisd train {part}` (train vae, clip, unet in that order)")
    return path


def course_unet(path=None):
    """The course U-Net (chapter 9), from data/course_unet.safetensors unless `path` is given."""
    return load_checkpoint(path or course_path("unet"))


def course_vae(path=None):
    """The course VAE (chapters 5-6), from data/course_vae.safetensors unless `path` is given."""
    return load_checkpoint(path or course_path("vae"))


def course_clip(path=None):
    """The course CLIP (chapter 8), from data/course_clip.safetensors unless `path` is given."""
    return load_checkpoint(path or course_path("clip"))


def course_text_encoder(path=None):
    """The course CLIP's text encoder, frozen, in eval mode: the course U-Net (chapter 9) reads
    its (B, 77, 64) context from it."""
    return course_clip(path).text.requires_grad_(False).eval()
