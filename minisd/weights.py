"""Reading and writing weights (chapter 11): one readable key map per format.

Every tensor of a file is either used or named as ignored, every shape is checked, and a
mismatch raises an error that names the file, the key, both shapes and the likely cause.
Models that are about to receive weights are built on the meta device (no random init).

This module sits above the models (unet, vae, clip) and below the pipeline: it builds models
and fills them, and returns the three parts of a pipeline as `Components`; the pipeline
wraps them. One table per format names what differs from diffusers (`UNET_NAMES`,
`VAE_NAMES`): both directions, and the kohya names of `minisd.lora`, are computed from it.
"""
import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch

from . import paths
from .clip import CLIPTextConfig, CLIPTextEncoder
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig


class WeightsError(ValueError):
    """A weight file that cannot be used: the message says which file, which key, and why."""


class MissingPartError(WeightsError, FileNotFoundError):
    """A file that a weights folder must hold is not there (also a FileNotFoundError)."""


def read_json(path):
    """A JSON file of a weights folder (config.json, an index...), or a WeightsError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); it may be truncated or corrupt: "
                           "download it again") from None


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def check_not_lfs_pointer(path):
    """Refuse a Git LFS pointer where weights should be: the ~130-byte text file a clone made
    without git-lfs holds in place of each large file (the commonest broken checkpoint)."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if head.startswith(LFS_POINTER):
        size = re.search(rb"\nsize (\d+)", head)
        real = f" of {int(size.group(1)):,} bytes" if size else ""
        raise WeightsError(f"{path} is a Git LFS pointer ({len(head)} bytes of text that stand for the real "
                           f"file{real}), not the weights: the repository was cloned without git-lfs. In that "
                           "clone run `git lfs install` then `git lfs pull`, or download the file itself")


def load_state_dict(path, device="cpu"):
    """Read a .safetensors file (memory-mapped) or a .ckpt/.pt/.bin (torch.load, weights_only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weight file at {path}: check the path (a diffusers folder "
                                "or one .safetensors/.ckpt file is expected)")
    if path.is_dir():
        raise WeightsError(f"{path} is a folder; load_state_dict reads one file "
                           "(use StableDiffusion.from_pretrained for a diffusers folder)")
    check_not_lfs_pointer(path)
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
        # torch's own message suggests weights_only=False, i.e. running the file's code: never repeat it
        reason = ("it holds Python objects besides tensors, which minisd never unpickles (unpickling can run "
                  "arbitrary code): ask for a .safetensors version of the file" if "weights_only" in str(e)
                  else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; it may be truncated or "
                       "corrupt: download it again, or use a .safetensors version of the file")
        raise WeightsError(f"{path} could not be read as a file of tensors ({reason})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        # Lightning-style checkpoints (the original SD .ckpt files); the training step they record
        # beside the state dict is kept (single_file_scheduler reads it for SD 2.x)
        step = {"global_step": sd["global_step"]} if isinstance(sd.get("global_step"), int) else {}
        sd = {**sd["state_dict"], **step}
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} holds a {type(sd).__name__}, not a dict of tensors")
    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor) and k != "global_step"), None)
    if bad is not None:
        raise WeightsError(f"{path}: {bad!r} is not a tensor but {type(sd[bad]).__name__} {sd[bad]!r:.40}: this is "
                           "not a file of weights (a training state or another program's file?)")
    return sd


def save_file(tensors, path, metadata=None):
    """safetensors' save_file, written atomically: into a temporary file in the same folder,
    then renamed over `path`, so a crash or a full disk never leaves half a file behind."""
    from safetensors.torch import save_file as _save
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    paths.write_atomically(path, lambda tmp: _save(tensors, tmp, metadata=metadata))


def load_into(model, state_dict, source="state dict"):
    """Check a state dict already renamed to our keys against `model` (built on the meta
    device) and load it with assign=True, so the model holds the file's tensors, uncopied.

    Every key must be present on both sides with the same shape; otherwise a WeightsError
    names the key, both shapes and the likely cause.
    """
    ours = model.state_dict()
    missing = [k for k in ours if k not in state_dict]
    unexpected = [k for k in state_dict if k not in ours]
    for key, tensor in state_dict.items():  # shapes first: a mismatch says which model family the file is
        if key in ours and tuple(tensor.shape) != tuple(ours[key].shape):
            cause = family_mismatch(key, tuple(tensor.shape), tuple(ours[key].shape))
            raise WeightsError(f"{source}: {key} has shape {tuple(tensor.shape)} in the file but "
                               f"{tuple(ours[key].shape)} in the model ({cause})")
    if unexpected:
        raise WeightsError(f"{source}: {len(unexpected)} key(s) the model does not have, e.g. "
                           f"{unexpected[:3]}; is this a LoRA file, or weights for another model "
                           "or architecture passed as a full checkpoint?")
    if missing:
        raise WeightsError(f"{source}: {len(missing)} key(s) missing, e.g. {missing[:3]}; the file "
                           "is incomplete or was saved from a different architecture/config")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


# --- diffusers keys: one table per model, read both ways ---------------------------------

# Most of our names are diffusers' (conv_in, time_embedding.linear_1, down_blocks.0.attentions.1
# .proj_in, ...); these are the places where ours follow the seed's structure instead. Each
# entry is (diffusers' piece, ours), where "^" anchors a piece at the start of the key and "<R>"
# stands for the path of a ResNetBlock, kept as it is. Read top to bottom either way: a
# diffusers key -> ours with `to_ours`, ours -> diffusers' with `to_diffusers`.
UNET_NAMES = [
    ("^mid_block.resnets.0.", "^mid_block.resnet1."),      # ResNetBlock + SpatialTransformer
    ("^mid_block.attentions.0.", "^mid_block.attention."),  #   + ResNetBlock
    ("^mid_block.resnets.1.", "^mid_block.resnet2."),
    (".downsamplers.0.", ".downsample."),
    (".upsamplers.0.", ".upsample."),
    ("<R>.norm1.", "<R>.gsc1.norm."),                     # ResNetBlock = GSC, + temb, GSC, + skip
    ("<R>.conv1.", "<R>.gsc1.conv."),
    ("<R>.time_emb_proj.", "<R>.time_proj."),
    ("<R>.norm2.", "<R>.gsc2.norm."),
    ("<R>.conv2.", "<R>.gsc2.conv."),
    ("<R>.conv_shortcut.", "<R>.skip."),
    (".transformer_blocks.0.", ".block."),                # one BasicTransformerBlock in SD 1.x
    (".to_out.0.", ".to_out."),                           # to_out.1 is a Dropout, no weights
    (".ff.net.0.proj.", ".ff.geglu.proj."),
    (".ff.net.2.", ".ff.out."),
    ("^conv_norm_out.", "^out.norm."),                    # the output GSC
    ("^conv_out.", "^out.conv."),
]
# The VAE's blocks keep diffusers' names (encoder.down_blocks.0.resnets.1, decoder.up_blocks.2,
# ...); inside them ours follow chapter 2's modules. quant_conv/post_quant_conv keep their names.
VAE_NAMES = [
    (".downsamplers.0.", ".downsample."),
    (".upsamplers.0.", ".upsample."),
    (".mid_block.attentions.0.group_norm.", ".mid_block.attention.norm."),  # SpatialSelfAttention
    (".mid_block.attentions.0.to_out.0.", ".mid_block.attention.to_out."),
    (".mid_block.attentions.0.", ".mid_block.attention."),
    (".norm1.", ".gsc1.norm."),                           # ResNetBlock = GSC, GSC, + skip
    (".conv1.", ".gsc1.conv."),
    (".norm2.", ".gsc2.norm."),
    (".conv2.", ".gsc2.conv."),
    (".conv_shortcut.", ".skip."),
    ("^<P>.conv_norm_out.", "^<P>.out.norm."),            # the output GSC of encoder and decoder
    ("^<P>.conv_out.", "^<P>.out.conv."),
]
_PLACEHOLDERS = {"R": r"resnets\.\d+|resnet[12]", "P": "encoder|decoder"}


def _rules(table, inverse):
    """A names table -> [(compiled pattern, replacement)] from diffusers' names to ours, or back."""
    rules = []
    for theirs, ours in table:
        source, target = (ours, theirs) if inverse else (theirs, ours)
        pattern = "^" if source.startswith("^") else ""
        for part in re.split(r"(<\w>)", source.lstrip("^")):
            pattern += f"(?P<{part[1]}>{_PLACEHOLDERS[part[1]]})" if part[:1] == "<" else re.escape(part)
        rules.append((re.compile(pattern), re.sub(r"<(\w)>", r"\\g<\1>", target.lstrip("^"))))
    return rules


def _renamer(table, inverse):
    rules = _rules(table, inverse)

    def rename(key):
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        return key
    return rename


unet_key = _renamer(UNET_NAMES, inverse=False)
unet_key.__doc__ = """One diffusers U-Net key -> ours, e.g. 'down_blocks.0.resnets.0.norm1.weight' ->
'down_blocks.0.resnets.0.gsc1.norm.weight'."""
unet_diffusers_key = _renamer(UNET_NAMES, inverse=True)
unet_diffusers_key.__doc__ = """One of our U-Net keys -> diffusers', the inverse of `unet_key`."""
vae_key = _renamer(VAE_NAMES, inverse=False)
vae_key.__doc__ = """One diffusers VAE key -> ours, e.g. 'encoder.down_blocks.0.downsamplers.0.conv.weight'
-> 'encoder.down_blocks.0.downsample.conv.weight'."""
vae_diffusers_key = _renamer(VAE_NAMES, inverse=True)
vae_diffusers_key.__doc__ = """One of our VAE keys -> diffusers', the inverse of `vae_key`."""


def unet_from_diffusers(state_dict):
    """A diffusers U-Net state dict -> ours (same tensors, renamed)."""
    return {unet_key(k): v for k, v in state_dict.items()}


def unet_to_diffusers(state_dict):
    """Our U-Net state dict -> diffusers' names (same tensors)."""
    return {unet_diffusers_key(k): v for k, v in state_dict.items()}


def load_unet(source, config=None):
    """A minisd.UNet holding the weights of a diffusers U-Net file (or state dict), built on
    the meta device with no random init; `config` defaults to SD 1.5's."""
    sd = source if isinstance(source, dict) else load_state_dict(source)
    with torch.device("meta"):
        model = UNet(config or UNetConfig.sd15())
    name = "U-Net state dict" if isinstance(source, dict) else str(source)
    return load_into(model, unet_from_diffusers(sd), name)

# --- VAE --------------------------------------------------------------------------------

def vae_from_diffusers(state_dict):
    """A diffusers VAE state dict -> ours (same tensors, renamed)."""
    if any(k.startswith("first_stage_model.") for k in state_dict):
        raise WeightsError("this VAE state dict is in the original single-file layout "
                           "(first_stage_model.*), not diffusers': use minisd.weights.from_original")
    return {vae_key(k): v for k, v in state_dict.items()}


def load_vae(source, config=None):
    """A minisd AutoencoderKL holding a diffusers VAE file (or state dict), built on the meta
    device with no random init; `config` defaults to SD 1.5's."""
    sd = source if isinstance(source, dict) else load_state_dict(source)
    with torch.device("meta"):
        model = AutoencoderKL(config or VAEConfig.sd15())
    name = "VAE state dict" if isinstance(source, dict) else str(source)
    return load_into(model, vae_from_diffusers(sd), name).eval()


# --- CLIP text encoder: transformers keys ------------------------------------------------

# Our CLIPTextEncoder uses transformers' CLIPTextModel names, so the map is short: the real
# SD 1.5 folder (text_encoder/model.safetensors, transformers 4.x) puts every key under
# `text_model.` and adds the buffer `text_model.embeddings.position_ids` (0..76, recomputed
# here); transformers 5.x saves the same keys without `text_model.` and without position_ids.
TEXT_PREFIX_HF = "text_model."
TEXT_IGNORED = {"embeddings.position_ids"}


def text_encoder_key(key):
    """One transformers CLIPTextModel key -> ours, e.g. 'text_model.encoder.layers.0.mlp.fc1.weight'
    -> 'encoder.layers.0.mlp.fc1.weight' (5.x keys are already ours)."""
    return key[len(TEXT_PREFIX_HF):] if key.startswith(TEXT_PREFIX_HF) else key


def text_encoder_from_transformers(state_dict, source="text encoder state dict"):
    """A transformers CLIPTextModel state dict, either layout -> ours (same tensors, position_ids dropped)."""
    if any(k.startswith("vision_model.") for k in state_dict):
        raise WeightsError(f"{source}: this is a whole CLIPModel (vision_model.* keys); SD uses only its text "
                           "tower: pass {k: v for k, v in sd.items() if k.startswith('text_model.')}")
    out = {}
    for key, tensor in state_dict.items():
        ours = text_encoder_key(key)
        if ours not in TEXT_IGNORED:
            out[ours] = tensor
    return out


def text_config_from_weights(state_dict):
    """A CLIPTextConfig read off the tensor shapes (ours or transformers' keys). The head count
    is not in any shape: CLIP text towers all use 64-wide heads, so heads = width / 64. Nor is
    the activation: 1024 wide is OpenCLIP ViT-H (SD 2.x), which uses gelu; OpenAI's use quick_gelu."""
    sd = {text_encoder_key(k): v for k, v in state_dict.items()}
    try:
        vocab, width = sd["embeddings.token_embedding.weight"].shape
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        mlp_width = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"no CLIP text encoder in these weights ({e.args[0]} is missing); "
                           f"first keys: {list(state_dict)[:3]}") from None
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    return CLIPTextConfig(vocab_size=vocab, width=width, layers=layers, heads=max(1, width // 64),
                          mlp_width=mlp_width, positions=positions, act="gelu" if width == 1024 else "quick_gelu")


def load_text_encoder(source, config=None, device="cpu", dtype=None):
    """A minisd CLIPTextEncoder holding a transformers CLIPTextModel file (or state dict) in either
    key layout, built on the meta device with no random init. `config` defaults to one read off
    the shapes (SD 1.x's for SD 1.x weights, SD 2.x's for SD 2.x's). The result is in eval mode with gradients off:
    SD never trains its text encoder."""
    sd = source if isinstance(source, dict) else load_state_dict(source)
    name = "text encoder state dict" if isinstance(source, dict) else str(source)
    sd = text_encoder_from_transformers(sd, name)
    config = config or text_config_from_weights(sd)
    sd = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    return load_into(model, sd, name).requires_grad_(False).eval()


def text_encoder_from_original(sd, source="state dict", device="cpu", dtype=torch.float32):
    """The text encoder of an original single file, its `cond_stage_model.transformer.` prefix
    already removed: the keys under it are transformers' own, so this is `load_text_encoder`."""
    return load_text_encoder(sd, device=device, dtype=dtype)


def text_encoder_to_original(text_encoder):
    """Our text encoder -> the keys an original SD 1.x file holds under `cond_stage_model.transformer.`
    (transformers 4.x names, with `text_model.` and the position_ids buffer)."""
    sd = {TEXT_PREFIX_HF + k: v for k, v in text_encoder.state_dict().items()}
    positions = text_encoder.config.positions
    sd[TEXT_PREFIX_HF + "embeddings.position_ids"] = torch.arange(positions)[None]  # (1, 77), int64
    return sd


# --- original single-file layout (model.diffusion_model.*, first_stage_model.*, ...) ------

# The files SD 1.x and 2.x were released as (CompVis / RunwayML `v1-5-pruned.ckpt`, Stability's
# `v2-1_768-ema-pruned.safetensors`) hold the whole LatentDiffusion model in one file, under three
# prefixes (SD 2.x's text encoder under a fourth):
UNET_PREFIX = "model.diffusion_model."             # the U-Net
VAE_PREFIX = "first_stage_model."                  # the VAE
TEXT_PREFIX = "cond_stage_model.transformer."      # CLIP's text model, in transformers' own names
OPENCLIP_PREFIX = "cond_stage_model.model."        # SD 2.x: OpenCLIP's text tower, in OpenCLIP's names
SDXL_PREFIX = "conditioner."                       # SDXL's text encoders: refused

# Everything else such a file may hold, none of which inference needs:
IGNORED_PREFIXES = ("model_ema.",)  # EMA copies of the U-Net, plus model_ema.decay / num_updates
IGNORED_KEYS = {
    # LatentDiffusion's training noise schedule, registered as buffers (minisd.diffusion recomputes it)
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
    "global_step",  # the training step (diffusers' single-file loader reads it for SD 2.x's prediction type)
    # CLIP's position ids 0..76, a buffer (with or without transformers' text_model. level)
    TEXT_PREFIX + "text_model.embeddings.position_ids", TEXT_PREFIX + "embeddings.position_ids",
}

# Inside the blocks: (pattern over our key, the original's), applied in order with re.sub.
# A U-Net ResNetBlock: in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, Conv] are Sequentials there, so their indices are names.
UNET_RESNET_ORIGINAL = [(r"^gsc1\.norm\.", "in_layers.0."), (r"^gsc1\.conv\.", "in_layers.2."),
                        (r"^time_proj\.", "emb_layers.1."), (r"^gsc2\.norm\.", "out_layers.0."),
                        (r"^gsc2\.conv\.", "out_layers.3."), (r"^skip\.", "skip_connection.")]
# A SpatialTransformer (norm, proj_in, proj_out, attn1/2.to_q/k/v, norm1-3 keep their names):
UNET_ATTENTION_ORIGINAL = [(r"^block\.", "transformer_blocks.0."), (r"\.to_out\.", ".to_out.0."),
                           (r"\.ff\.geglu\.proj\.", ".ff.net.0.proj."), (r"\.ff\.out\.", ".ff.net.2.")]
# A VAE ResNetBlock, and the VAE's mid-block attention (1x1 convs in the original):
VAE_RESNET_ORIGINAL = [(r"^gsc1\.norm\.", "norm1."), (r"^gsc1\.conv\.", "conv1."), (r"^gsc2\.norm\.", "norm2."),
                       (r"^gsc2\.conv\.", "conv2."), (r"^skip\.", "nin_shortcut.")]
VAE_ATTENTION_ORIGINAL = [(r"^to_q\.", "q."), (r"^to_k\.", "k."), (r"^to_v\.", "v."), (r"^to_out\.", "proj_out.")]


def _rename(rest, table):
    """Apply each (pattern, replacement) of `table` to `rest`, in order."""
    for pattern, replacement in table:
        rest = re.sub(pattern, replacement, rest)
    return rest


def unet_original_key(key, config):
    """Our U-Net key -> the original's (without `model.diffusion_model.`).

    The original numbers every block of the encoder in one list, `input_blocks` (conv_in, then per
    level L ResNetBlocks each with its SpatialTransformer at `.1`, then the Downsample), and the
    decoder in `output_blocks` (per level L + 1 of them, the Upsample inside the last one), e.g. at
    SD 1.5's config 'down_blocks.1.resnets.0.gsc1.conv.weight' -> 'input_blocks.4.0.in_layers.2.weight'.
    """
    L = config.layers_per_block
    up_attention = config.cross_attention[::-1]
    fixed = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "out.norm.": "out.0.", "out.conv.": "out.2.",
             "mid_block.resnet1.": "middle_block.0.", "mid_block.attention.": "middle_block.1.",
             "mid_block.resnet2.": "middle_block.2."}
    for ours, original in fixed.items():
        if key.startswith(ours):
            rest = key[len(ours):]
            if ours.startswith("mid_block.resnet"):
                rest = _rename(rest, UNET_RESNET_ORIGINAL)
            elif ours == "mid_block.attention.":
                rest = _rename(rest, UNET_ATTENTION_ORIGINAL)
            return original + rest
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsample|upsample)\.(?:(\d+)\.)?(.*)", key)
    if m is None:
        raise KeyError(f"no original name for U-Net key {key!r}")
    side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
    if kind == "downsample":                                  # rest = 'conv.weight'
        return f"input_blocks.{(i + 1) * (L + 1)}.0.op.{rest[len('conv.'):]}"
    if kind == "upsample":                                    # after the ResNetBlock (and attention)
        return f"output_blocks.{i * (L + 1) + L}.{2 if up_attention[i] else 1}.{rest}"
    j = int(j)
    index = 1 + i * (L + 1) + j if side == "down" else i * (L + 1) + j
    blocks = "input_blocks" if side == "down" else "output_blocks"
    if kind == "resnets":
        return f"{blocks}.{index}.0.{_rename(rest, UNET_RESNET_ORIGINAL)}"
    return f"{blocks}.{index}.1.{_rename(rest, UNET_ATTENTION_ORIGINAL)}"


def vae_original_key(key, config):
    """Our VAE key -> the original's (without `first_stage_model.`).

    The original numbers the decoder's up blocks from the bottom: our decoder.up_blocks.0 (the
    first to run) is its decoder.up.3 at SD 1.5's config, e.g.
    'decoder.up_blocks.0.resnets.1.gsc1.conv.weight' -> 'decoder.up.3.block.1.conv1.weight'.
    """
    n = len(config.block_out_channels)
    part, rest = key.split(".", 1)
    if part not in ("encoder", "decoder"):
        return key                                                  # quant_conv, post_quant_conv
    for ours, original in (("out.norm.", "norm_out."), ("out.conv.", "conv_out."), ("conv_in.", "conv_in.")):
        if rest.startswith(ours):
            return f"{part}.{original}{rest[len(ours):]}"
    m = re.match(r"mid_block\.(resnets\.(\d)|attention)\.(.*)", rest)
    if m:
        if m.group(1) == "attention":
            return f"{part}.mid.attn_1.{_rename(m.group(3), VAE_ATTENTION_ORIGINAL)}"
        return f"{part}.mid.block_{int(m.group(2)) + 1}.{_rename(m.group(3), VAE_RESNET_ORIGINAL)}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(?:resnets\.(\d+)\.(.*)|(downsample|upsample)\.(.*))", rest)
    if m is None:
        raise KeyError(f"no original name for VAE key {key!r}")
    i = int(m.group(2)) if m.group(1) == "down" else n - 1 - int(m.group(2))  # decoder counts from the bottom
    level = f"{part}.{m.group(1)}.{i}"
    if m.group(5):
        return f"{level}.{m.group(5)}.{m.group(6)}"
    return f"{level}.block.{m.group(3)}.{_rename(m.group(4), VAE_RESNET_ORIGINAL)}"


def _is_vae_attention(original_key):
    """The VAE mid-block q/k/v/proj_out weights: 1x1 convs (C, C, 1, 1) there, Linear (C, C) here."""
    return re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", original_key) is not None


def unet_config_from_original(sd, source, encoder_only=False):
    """Infer a UNetConfig from the tensor shapes of an original U-Net state dict (prefix removed).

    Shapes do not store the number of attention heads or GroupNorm groups, nor the image size:
    SD 1.x uses 8 heads, 32 groups and 512 px; SD 2.x (recognised by its Linear proj_in) keeps
    every head 64 wide (`num_head_channels: 64` in its original config), sets upcast_attention
    (SD 2.1's; needed in float16, exact in float32) and works at 768 px (the -base models at 512:
    see `pipeline.single_file_scheduler`). `encoder_only`: a ControlNet's copy, which has no
    decoder (out_channels then = in_channels)."""
    for key in ("input_blocks.0.0.weight",) + (() if encoder_only else ("out.2.weight",)):
        if key not in sd:
            raise WeightsError(f"{source}: no {UNET_PREFIX}{key}; the U-Net in this file is incomplete")
    if "label_emb.0.0.weight" in sd:
        raise WeightsError(f"{source}: {UNET_PREFIX}label_emb.* is SDXL's size and crop conditioning: this is an "
                           "SDXL U-Net; minisd loads SD 1.x and SD 2.x checkpoints only")
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")}
    levels = 1 + sum(f"input_blocks.{b}.0.op.weight" in sd for b in blocks)   # one Downsample per level but the last
    L = (len(blocks) - levels) // levels                                       # 1 + levels * L + (levels - 1) blocks
    first = [1 + i * (L + 1) for i in range(levels)]                           # first ResNetBlock of each level
    context = next((sd[f"input_blocks.{b}.1.transformer_blocks.0.attn2.to_k.weight"].shape[-1] for b in first
                    if f"input_blocks.{b}.1.transformer_blocks.0.attn2.to_k.weight" in sd), 768)
    proj = next((sd[f"input_blocks.{b}.1.proj_in.weight"] for b in first if f"input_blocks.{b}.1.proj_in.weight" in sd),
                None)
    sd2 = proj is not None and proj.ndim == 2                                  # SD 2.x: Linear proj_in
    channels = tuple(sd[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0] for b in first)
    out_channels = sd["input_blocks.0.0.weight"].shape[1] if encoder_only else sd["out.2.weight"].shape[0]
    return UNetConfig(in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=out_channels,
                      block_channels=channels,
                      cross_attention=tuple(f"input_blocks.{b}.1.proj_in.weight" in sd for b in first),
                      heads=tuple(max(1, c // 64) for c in channels) if sd2 else (8,) * levels,
                      layers_per_block=L, context_dim=context, sample_size=96 if sd2 else 64,
                      linear_projection=sd2, upcast_attention=sd2)


def vae_config_from_original(sd, source):
    """Infer a VAEConfig from an original VAE state dict (prefix removed); 32 GroupNorm groups
    and SD's scaling factor 0.18215, which the file does not store."""
    if "encoder.conv_in.weight" not in sd or "post_quant_conv.weight" not in sd:
        raise WeightsError(f"{source}: no {VAE_PREFIX}encoder.conv_in.weight / post_quant_conv.weight; "
                           "the VAE in this file is missing or incomplete")
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    return VAEConfig(block_out_channels=tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]
                                              for i in range(levels)),
                     layers_per_block=layers, latent_channels=sd["post_quant_conv.weight"].shape[0],
                     in_channels=sd["encoder.conv_in.weight"].shape[1])


def _load_original_part(model, sd, original_key, prefix, source, device, dtype):
    """Load one component from its original-layout tensors (prefix removed) into `model` (meta):
    every key of the model must be in `sd` with the right shape, and every key of `sd` used."""
    ours = model.state_dict()
    names = {original_key(k): k for k in ours}                          # original -> ours
    unused = [k for k in sd if k not in names]
    if unused:
        raise WeightsError(f"{source}: {len(unused)} key(s) under {prefix} that the model read off the file's "
                           f"shapes does not have, e.g. {[prefix + k for k in unused[:3]]}; the file is not an "
                           "SD 1.x or 2.x checkpoint (a LoRA, an SDXL file or a different architecture?)")
    missing = [k for k in names if k not in sd]
    if missing:
        raise WeightsError(f"{source}: {len(missing)} key(s) missing, e.g. {[prefix + k for k in missing[:3]]}; "
                           "the file is truncated, pruned of this component, or from another architecture")
    renamed = {}
    for key, name in names.items():
        tensor, want = sd[key], tuple(ours[name].shape)
        if _is_vae_attention(key) and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]                                  # (C, C, 1, 1) -> (C, C)
        if tuple(tensor.shape) != want:
            cause = "the file and the model inferred from its other tensors disagree"
            raise WeightsError(f"{source}: {prefix}{key} has shape {tuple(sd[key].shape)} in the file but "
                               f"{want} in the model ({cause})")
        renamed[name] = tensor.to(device=device, dtype=dtype)
    return load_into(model, renamed, source).eval()


def split_original(sd, source="state dict"):
    """An original single-file state dict -> (unet, vae, text) dicts with their prefixes removed
    (text: SD 1.x's CLIP in transformers' names, or SD 2.x's OpenCLIP in its own).

    Every key must be one of the three components or named in IGNORED_PREFIXES / IGNORED_KEYS;
    a LoRA file or a diffusers-layout file gets an error that says so."""
    if any(k.startswith(("lora_", "lora_unet_", "lora_te_")) or ".lora_" in k or ".lora." in k for k in sd):
        raise WeightsError(f"{source}: this looks like a LoRA file (keys such as "
                           f"{next(k for k in sd if 'lora' in k)!r}), not a full SD checkpoint: load the base "
                           "model with from_pretrained, then the LoRA with minisd.lora.load(pipe, path)")
    if any(k.startswith(("control_model.", "input_hint_block.")) for k in sd):
        raise WeightsError(f"{source}: this is a ControlNet file (control_model.* or input_hint_block.* keys), not an "
                           "SD checkpoint: load the base model with StableDiffusion.from_pretrained(its own file), the "
                           "ControlNet with minisd.ControlNet.from_pretrained(this file), and pass controlnet= to the pipeline")
    if any(k.startswith(SDXL_PREFIX) for k in sd):
        raise WeightsError(f"{source}: this is an SDXL file ({SDXL_PREFIX}* keys: two text encoders, a 2048-wide "
                           "context, size and crop conditioning); minisd loads SD 1.x and SD 2.x checkpoints only")
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in sd):
            raise WeightsError(f"{source}: this is one component in diffusers' layout, not an original "
                               "single file: pass the diffusers folder that holds unet/, vae/ and text_encoder/")
        raise WeightsError(f"{source}: no {UNET_PREFIX}* keys, so this is not an original SD single file "
                           f"(first keys: {list(sd)[:3]})")
    parts = {UNET_PREFIX: {}, VAE_PREFIX: {}, TEXT_PREFIX: {}, OPENCLIP_PREFIX: {}}
    unknown = []
    for key, tensor in sd.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        if prefix is None:
            unknown.append(key)
        else:
            parts[prefix][key[len(prefix):]] = tensor
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} key(s) that are neither the U-Net, the VAE, the text "
                           f"encoder nor a known training buffer, e.g. {unknown[:3]}: not an SD 1.x/2.x checkpoint")
    if parts[OPENCLIP_PREFIX] and parts[TEXT_PREFIX]:
        raise WeightsError(f"{source}: both {TEXT_PREFIX}* (SD 1.x's CLIP) and {OPENCLIP_PREFIX}* (SD 2.x's "
                           "OpenCLIP) keys: a file mixing two models")
    return parts[UNET_PREFIX], parts[VAE_PREFIX], parts[TEXT_PREFIX] or parts[OPENCLIP_PREFIX]


def _vae_dtype(dtype):
    """SD's VAE overflows in float16 at 512 px (black images): keep it in float32, as diffusers'
    force_upcast does; bfloat16 has float32's range and needs no upcast."""
    return torch.float32 if dtype == torch.float16 else dtype


class Components(NamedTuple):
    """The three parts of an SD 1.x model, as the loaders below return them:
    `StableDiffusion(*components)` makes a pipeline of them."""
    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder


def check_widths(components, source):
    """The U-Net's cross-attention must read the text encoder's width (768 in SD 1.x, 1024 in SD 2.x):
    parts of two model families are refused here rather than inside the first U-Net call."""
    unet_width, text_width = components.unet.config.context_dim, components.text_encoder.config.width
    if unet_width != text_width:
        raise WeightsError(f"{source}: the U-Net's cross-attention reads {unet_width}-wide text states but the text "
                           f"encoder gives {text_width}-wide ones: parts of two different models (SD 1.x's CLIP is "
                           "768 wide, SD 2.x's OpenCLIP 1024); take all parts from one model")
    return components


def from_original(sd, source="state dict", device="cpu", dtype=torch.float32):
    """The Components of an original single-file state dict (chapter 11), configs inferred
    from the tensor shapes, built on the meta device and filled with the file's tensors."""
    unet_sd, vae_sd, text_sd = split_original(sd, source)
    unet_config = unet_config_from_original(unet_sd, source)
    vae_config = vae_config_from_original(vae_sd, source)
    with torch.device("meta"):
        unet, vae = UNet(unet_config), AutoencoderKL(vae_config)
    unet = _load_original_part(unet, unet_sd, lambda k: unet_original_key(k, unet_config), UNET_PREFIX,
                               source, device, dtype)
    vae = _load_original_part(vae, vae_sd, lambda k: vae_original_key(k, vae_config), VAE_PREFIX,
                              source, device, _vae_dtype(dtype))
    if "positional_embedding" in text_sd:  # SD 2.x: OpenCLIP's own names
        text_encoder = text_encoder_from_openclip(text_sd, source, device, dtype)
    else:
        text_encoder = text_encoder_from_original(text_sd, source, device, dtype)
    return check_widths(Components(unet, vae, text_encoder), source)


def to_original(pipe):
    """The original single-file state dict of a StableDiffusion or Components (what `from_original` reads):
    the same tensors under the original names, the VAE attention as 1x1 conv weights. SD 1.x
    only: an SD 2.x file's text tower holds a 24th layer, which minisd's SD 2.x model does not keep."""
    if pipe.text_encoder.config.act != "quick_gelu":
        raise WeightsError("to_original writes SD 1.x's layout; this pipeline has an SD 2.x (OpenCLIP) text "
                           "encoder, whose original file holds a last layer minisd does not keep")
    sd = {}
    for key, tensor in pipe.unet.state_dict().items():
        sd[UNET_PREFIX + unet_original_key(key, pipe.unet.config)] = tensor
    for key, tensor in pipe.vae.state_dict().items():
        name = vae_original_key(key, pipe.vae.config)
        sd[VAE_PREFIX + name] = tensor[:, :, None, None] if _is_vae_attention(name) else tensor  # (C, C) -> (C, C, 1, 1)
    for key, tensor in text_encoder_to_original(pipe.text_encoder).items():
        sd[TEXT_PREFIX + key] = tensor
    return sd


# --- SD 2.x: OpenCLIP's text tower in the original single file, and telling the families apart ------

# SD 2.x's files hold OpenCLIP ViT-H/14's text tower under `cond_stage_model.model.`, in OpenCLIP's
# names. Inside a layer (`transformer.resblocks.{i}.`), ours -> theirs:
OPENCLIP_LAYER = [(r"^layer_norm1\.", "ln_1."), (r"^layer_norm2\.", "ln_2."),
                  (r"^self_attn\.out_proj\.", "attn.out_proj."), (r"^mlp\.fc1\.", "mlp.c_fc."),
                  (r"^mlp\.fc2\.", "mlp.c_proj.")]
# ... outside the layers:
OPENCLIP_OUTSIDE = {"embeddings.token_embedding.weight": "token_embedding.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
# ... and what SD 2.x does not use: the image-text projection, the temperature, the causal mask
# (a buffer), and the last of the 24 layers (SD 2.x reads the penultimate one).
OPENCLIP_IGNORED = {"text_projection", "logit_scale", "attn_mask"}


def openclip_key(key, width):
    """Our text-encoder key -> (OpenCLIP's key, rows). q, k and v are one fused `attn.in_proj_weight`
    (3 * width, width) there: rows is the slice that holds ours (q first), else None. E.g.
    'encoder.layers.0.self_attn.k_proj.weight' -> ('transformer.resblocks.0.attn.in_proj_weight', rows 1024:2048)."""
    m = re.match(r"encoder\.layers\.(\d+)\.(.*)", key)
    if m is None:
        return OPENCLIP_OUTSIDE[key], None
    block, rest = f"transformer.resblocks.{m.group(1)}.", m.group(2)
    qkv = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
    if qkv:
        i = "qkv".index(qkv.group(1))
        return f"{block}attn.in_proj_{qkv.group(2)}", slice(i * width, (i + 1) * width)
    return block + _rename(rest, OPENCLIP_LAYER), None


def text_encoder_from_openclip(sd, source="state dict", device="cpu", dtype=torch.float32):
    """SD 2.x's text encoder from an original file's OpenCLIP tensors (prefix removed): every layer
    but the last, q/k/v cut out of the fused in_proj; every key used or named in OPENCLIP_IGNORED."""
    if "token_embedding.weight" not in sd or "positional_embedding" not in sd:
        raise WeightsError(f"{source}: no {OPENCLIP_PREFIX}token_embedding.weight / positional_embedding; the "
                           "text encoder in this file is incomplete")
    vocab, width = sd["token_embedding.weight"].shape
    n = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    config = CLIPTextConfig(vocab_size=vocab, width=width, layers=n - 1, heads=max(1, width // 64),
                            mlp_width=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                            positions=sd["positional_embedding"].shape[0], act="gelu")
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    used = {k for k in sd if k in OPENCLIP_IGNORED or k.startswith(f"transformer.resblocks.{n - 1}.")}
    renamed = {}
    for key in model.state_dict():
        name, rows = openclip_key(key, width)
        if name not in sd:
            raise WeightsError(f"{source}: {OPENCLIP_PREFIX}{name} is missing; the text encoder in this file is "
                               "incomplete")
        renamed[key] = (sd[name] if rows is None else sd[name][rows]).to(device=device, dtype=dtype)
        used.add(name)
    unused = [k for k in sd if k not in used]
    if unused:
        raise WeightsError(f"{source}: {len(unused)} key(s) under {OPENCLIP_PREFIX} that SD 2.x's text encoder "
                           f"does not have, e.g. {[OPENCLIP_PREFIX + k for k in unused[:3]]}")
    return load_into(model, renamed, source).requires_grad_(False).eval()


def family_mismatch(key, file_shape, model_shape):
    """The likely cause of a shape mismatch between a file and a model: the SD family each one is."""
    if len(file_shape) != len(model_shape) and key.endswith(("proj_in.weight", "proj_out.weight")):
        file_is, model_is = ("SD 2.x", "SD 1.x") if len(file_shape) == 2 else ("SD 1.x", "SD 2.x")
        return (f"proj_in/proj_out are Linear (C, C) in SD 2.x and 1x1 convs (C, C, 1, 1) in SD 1.x: an {file_is} "
                f"file for an {model_is} config; use UNetConfig.{'sd21' if file_is == 'SD 2.x' else 'sd15'}(), or "
                "StableDiffusion.from_pretrained, which reads the config from the files")
    widths = {768: "SD 1.x (CLIP ViT-L/14, 768 wide)", 1024: "SD 2.x (OpenCLIP ViT-H/14, 1024 wide)",
              2048: "SDXL (two text encoders, 2048 wide)"}
    text = key.endswith(("to_k.weight", "to_v.weight")) or "embedding" in key or "layer_norm" in key
    if text and file_shape[-1] in widths and file_shape[-1] != model_shape[-1]:
        if file_shape[-1] == 2048:
            return f"the file is {widths[2048]}; minisd loads SD 1.x and SD 2.x only"
        fix = "UNetConfig.sd21() / CLIPTextConfig.sd2()" if file_shape[-1] == 1024 else "UNetConfig.sd15() / CLIPTextConfig.sd15()"
        model = widths.get(model_shape[-1], f"{model_shape[-1]} wide")
        return (f"the file is {widths[file_shape[-1]]} but the config is {model}: use {fix}, "
                "or StableDiffusion.from_pretrained, which reads the config from the files")
    return "the file and the config describe different models"


# --- diffusers folders: unet/, vae/, text_encoder/, each with its config.json ---------------------

def _text_config_from_transformers(config):
    """A transformers CLIPTextConfig (`text_encoder/config.json`, as a dict) -> ours."""
    act = config.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise WeightsError(f"text_encoder/config.json: hidden_act={act!r}; SD's text encoders use quick_gelu "
                           "(SD 1.x, OpenAI's CLIP) or gelu (SD 2.x, OpenCLIP)")
    return CLIPTextConfig(vocab_size=config.get("vocab_size", 49408), width=config.get("hidden_size", 512),
                          layers=config.get("num_hidden_layers", 12), heads=config.get("num_attention_heads", 8),
                          mlp_width=config.get("intermediate_size", 2048),
                          positions=config.get("max_position_embeddings", 77), eps=config.get("layer_norm_eps", 1e-5),
                          act=act)


def from_diffusers(unet, vae, text_encoder, unet_config=None, vae_config=None, text_config=None,
                   device="cpu", dtype=torch.float32):
    """The Components from the three parts in diffusers' layout, each a state dict or a file
    (configs: SD 1.5's unless given; text-encoder keys with or without `text_model.`)."""
    unet = load_unet(unet, unet_config).to(device=device, dtype=dtype)
    vae = load_vae(vae, vae_config).to(device=device, dtype=_vae_dtype(dtype))
    text_encoder = load_text_encoder(text_encoder, text_config, device=device, dtype=dtype)
    return Components(unet, vae, text_encoder)


def _component_file(folder, names):
    """The weights of one part: the first of `names` in `folder`, or the shards that its
    `NAME.index.json` lists (large parts are saved in pieces), merged into one state dict."""
    for name in names:
        if (folder / name).exists():
            return folder / name
        index = folder / f"{name}.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{index} has no 'weight_map' of shard files: it may be corrupt")
            shards = sorted(set(map(str, weight_map.values())))
            return {k: v for shard in shards for k, v in load_state_dict(folder / shard).items()}
    raise MissingPartError(f"no weights in {folder}: expected one of {names} (or its .index.json and shards)")


_WEIGHT_FILES = {
    "unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
    "vae": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
    "text_encoder": ["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"],
}


def _part_folder(folder, part):
    """`folder/part` for a pipeline folder, or `folder` itself when it is that part's own folder."""
    folder = Path(folder)
    if (folder / part / "config.json").exists():
        return folder / part
    if (folder / "config.json").exists():
        return folder
    raise MissingPartError(f"no config.json in {folder} nor in {folder / part}: pass a diffusers {part}/ folder "
                            "or the pipeline folder that holds it")


def load_part(folder, part):
    """(config, weights) of one part of a diffusers folder: `part` is "unet", "vae" or
    "text_encoder"; `folder` the pipeline folder or the part's own. Weights: safetensors
    preferred, then an fp16 variant, then a .bin read with torch.load(weights_only=True);
    a sharded part (`NAME.index.json` and its shards) is merged into one state dict."""
    folder = _part_folder(folder, part)
    weights = _component_file(folder, _WEIGHT_FILES[part])
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise WeightsError(f"{folder / 'config.json'} holds a JSON {type(config).__name__}, not a config object")
    try:
        if part == "unet":
            return UNetConfig.from_diffusers(config), weights
        if part == "vae":
            return VAEConfig.from_diffusers(config), weights
        return _text_config_from_transformers(config), weights
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{folder / 'config.json'}: not a usable {part} config ({type(e).__name__}: {e}); is "
                           f"this {part}/ folder holding another part's files?") from e


def load_unet_folder(folder):
    """A minisd UNet from a diffusers U-Net folder (or the pipeline folder that holds `unet/`)."""
    config, weights = load_part(folder, "unet")
    return load_unet(weights, config).eval()


def from_diffusers_folder(folder, device="cpu", dtype=torch.float32):
    """The Components of a diffusers pipeline folder: each part's config.json and weights
    through `load_part`."""
    folder = Path(folder)
    if (folder / "text_encoder_2").exists():
        raise WeightsError(f"{folder} is an SDXL folder (it has text_encoder_2/: SDXL's second text encoder); "
                           "minisd loads SD 1.x and SD 2.x")
    config = folder / "config.json"
    if config.exists() and '"ControlNetModel"' in config.read_text():
        raise WeightsError(f"{folder} is a diffusers ControlNet folder, not an SD pipeline: load it with "
                           "minisd.ControlNet.from_pretrained and pass controlnet= to the pipeline")
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part / "config.json").exists():
            raise MissingPartError(f"{folder} is not a diffusers SD folder: {folder / part / 'config.json'} is missing "
                                    "(expected unet/, vae/ and text_encoder/, each with config.json and weights)")
    (unet_config, unet), (vae_config, vae), (text_config, text) = (
        load_part(folder / part, part) for part in ("unet", "vae", "text_encoder"))
    components = from_diffusers(unet, vae, text, unet_config, vae_config, text_config, device, dtype)
    return check_widths(components, f"{folder / 'unet' / 'config.json'} and {folder / 'text_encoder' / 'config.json'}")


# --- random weights (tests, benchmarks, the book) -------------------------------------------------

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
