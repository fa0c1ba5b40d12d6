# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
# ---

# %% [markdown]
# # 4. The U-Net
#
# **You will build** `minisd.UNet` with its config `minisd.UNetConfig` (`sd15()` for the real
# one, `tiny()` for a laptop) from the blocks `DownBlock`, `CrossAttnDownBlock`,
# `CrossAttnMidBlock`, `UpBlock` and `CrossAttnUpBlock` in `minisd.unet`, equal to diffusers'
# `UNet2DConditionModel`, and walk a latent through it shape by shape.
#
# The {term}`U-Net` is SD's noise predictor: given a noisy latent $z_t$ (4×64×64 for a 512×512 image),
# the timestep $t$ and the text context $c$ (77×768), it returns
# $\hat\epsilon = \epsilon_\theta(z_t, t, c)$, the noise it believes is in $z_t$, with the
# latent's shape. It is an encoder that halves the resolution three times, a middle block,
# and a decoder that doubles it back, with skip connections carrying every encoder feature
# map across to the decoder {cite}`ronneberger2015unet`. Every piece comes from chapters 1-3.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import torch

import minisd

_ = torch.manual_seed(0)

# %% [markdown]
# ## The seed's fourteen modules
#
# The seed notes list the 14 building blocks of SD's U-Net. Each is one class in `minisd`:

# %%
from minisd import attention, resnet, unet

seed_modules = [
    ("GSC", resnet.GSC, "GroupNorm + SiLU + Conv3x3"),
    ("DownSample", resnet.Downsample, "Conv k3 s2 p1"),
    ("UpSample", resnet.Upsample, "nearest x2 + Conv3x3"),
    ("ResNetBlock", resnet.ResNetBlock, "GSC, + time embedding, GSC, + skip"),
    ("CrossAttention", attention.CrossAttention, "Q from pixels, K and V from the text"),
    ("SelfAttention", attention.SelfAttention, "Q, K, V from pixels"),
    ("FeedForward", attention.FeedForward, "GEGLU + Dropout + Linear"),
    ("BasicTransformer Block", attention.BasicTransformerBlock, "LN+SelfAttn, LN+CrossAttn, LN+FF, residual"),
    ("Spatial Transformer", attention.SpatialTransformer, "GroupNorm + Conv1x1 + block + Conv1x1, residual"),
    ("DownBlock", unet.DownBlock, "ResNetBlock x 2"),
    ("UpBlock_X", unet.UpBlock, "ResNetBlock x X + UpSample"),
    ("CrossAttnDownBlock_X", unet.CrossAttnDownBlock, "(ResNetBlock + SpatialTransformer) x X + DownSample"),
    ("CrossAttnUpBlock_X", unet.CrossAttnUpBlock, "(ResNetBlock + SpatialTransformer) x X + UpSample"),
    ("CrossAttnMidBlock", unet.CrossAttnMidBlock, "ResNetBlock + SpatialTransformer + ResNetBlock"),
]
for i, (name, cls, what) in enumerate(seed_modules, 1):
    where = f"minisd.{cls.__module__.split('.')[-1]}.{cls.__name__}"
    print(f"{i:2d}. {name:22s} {where:40s} {what}")

# %% [markdown]
# ## SD 1.5's U-Net, built on the meta device
#
# `UNetConfig.sd15()` holds the real numbers: channels 320, 640, 1280, 1280 at the four
# resolution levels; attention (8 heads) in the first three; 2 ResNetBlocks per encoder level
# and 3 per decoder level; a 768-wide text context. Built on PyTorch's `meta` device, the
# model has every parameter's shape but no memory and no random initialisation, so it is
# instant; this is also how `minisd.weights.load_unet` builds it before the weights arrive.

# %%
config = minisd.UNetConfig.sd15()
print(config)
with torch.device("meta"):
    sd15 = minisd.UNet(config)
for name, child in sd15.named_children():
    kinds = [type(b).__name__ for b in child] if isinstance(child, torch.nn.ModuleList) else type(child).__name__
    print(f"{name:15s} {kinds}")

n_params = sum(p.numel() for p in sd15.parameters())
print(f"\nparameters: {n_params:,}")
print(f"fp32: {4 * n_params / 1e9:.2f} GB, fp16: {2 * n_params / 1e9:.2f} GB")

# %% [markdown]
# The seed notes say "about 860M parameters, 3.4 GB in fp32": here is the exact count. The
# same count from diffusers' `UNet2DConditionModel` at SD 1.5's configuration, also built on
# the meta device:

# %%
from diffusers import UNet2DConditionModel

with torch.device("meta"):
    reference = UNet2DConditionModel(**config.to_diffusers())
n_theirs = sum(p.numel() for p in reference.parameters())
print(f"diffusers: {n_theirs:,} parameters, same as ours: {n_theirs == n_params}")
del reference

per_part = {name: sum(p.numel() for p in child.parameters()) for name, child in sd15.named_children()}
plt.figure(figsize=(7, 2.8))
plt.barh(list(per_part)[::-1], [v / 1e6 for v in list(per_part.values())[::-1]], color="tab:blue")
plt.xlabel("parameters (millions)"); plt.title("Where SD 1.5's 860M U-Net parameters live")
plt.tight_layout()
plt.show()

# %% [markdown]
# The decoder holds more than half: its ResNetBlocks take the concatenated skips, up to 2560
# channels wide.
#
# ## The shape walk: 4×64×64 in, 4×64×64 out
#
# A forward pass on the meta device computes every shape without computing a single number. We
# record what each block returns and what the skip stack holds.

# %%
walk, skips_pushed = [], []


def record(name):
    def hook(module, args, output):
        if isinstance(output, tuple):        # down blocks return (x, their skip tensors)
            output, skips = output
            skips_pushed.append([tuple(s.shape[1:]) for s in skips])
        walk.append((name, tuple(args[0].shape[1:]), tuple(output.shape[1:])))
    return hook


blocks = [("conv_in", sd15.conv_in)] + [(f"down_blocks[{i}] {type(b).__name__}", b) for i, b in enumerate(sd15.down_blocks)]
blocks += [("mid_block CrossAttnMidBlock", sd15.mid_block)]
blocks += [(f"up_blocks[{i}] {type(b).__name__}", b) for i, b in enumerate(sd15.up_blocks)] + [("out (GSC)", sd15.out)]
handles = [m.register_forward_hook(record(name)) for name, m in blocks]
with torch.device("meta"):
    eps = sd15(torch.randn(2, 4, 64, 64), torch.tensor([999, 999]), torch.randn(2, 77, 768))
for h in handles:
    h.remove()

print(f"{'block':32s} {'in (C, H, W)':>18s} {'out (C, H, W)':>18s}")
for name, shape_in, shape_out in walk:
    print(f"{name:32s} {str(shape_in):>18s} {str(shape_out):>18s}")
print("\nskip tensors pushed by each down block:")
print("  conv_in:", [walk[0][2]])
for i, s in enumerate(skips_pushed):
    print(f"  down_blocks[{i}]:", s)
print("eps:", tuple(eps.shape))

# %% [markdown]
# Twelve skip tensors go onto the stack (the output of `conv_in`, then every ResNetBlock or
# SpatialTransformer output and every Downsample output), and the twelve decoder ResNetBlocks
# take them back, last in first out, each concatenating one on channels: this is where the
# 2560-, 1920-, 960- and 640-channel inputs of chapter 2 come from. As a picture (each dot is
# where a skip tensor is made; the third dot of a level is the Downsample output of the level
# above, drawn in that block's column):

# %%
levels = {64: 0, 32: 1, 16: 2, 8: 3}
fig, ax = plt.subplots(figsize=(12, 4.8))
for x, (name, (_, h, _), (c_out, h_out, w_out)) in enumerate(walk):
    y = -levels[h]                                  # each block sits at the resolution it works at
    ax.add_patch(plt.Rectangle((x - 0.42, y - 0.28), 0.84, 0.56, alpha=0.3,
                               color="tab:orange" if "Attn" in name else "tab:blue"))
    ax.text(x, y + 0.07, name.split(" ")[0].replace("_blocks", ""), ha="center", fontsize=8)
    ax.text(x, y - 0.15, f"→ {c_out}×{h_out}×{w_out}", ha="center", fontsize=7)
# skip connections: the stack is popped last-in first-out by the decoder's ResNetBlocks
producers = [(0, walk[0][2])] + [(i + 1 + 0.25 * (j - 1), s) for i, ss in enumerate(skips_pushed)
                                  for j, s in enumerate(ss)]
consumers = [6 + i + 0.25 * (r - 1) for i, b in enumerate(sd15.up_blocks) for r in range(len(b.resnets))]
for (px, (c, h, _)), cx in zip(producers[::-1], consumers):
    y = -levels[h] + 0.28
    ax.plot(px, y, "o", color="gray", ms=3)
    ax.annotate("", xy=(cx, y), xytext=(px, y), arrowprops=dict(
        arrowstyle="->", color="gray", alpha=0.6, connectionstyle=f"arc3,rad=-{0.05 + 0.4 / (cx - px)}"))
ax.set_xlim(-0.6, len(walk) - 0.4); ax.set_ylim(-3.5, 1.6)
ax.set_yticks([0, -1, -2, -3], ["64×64", "32×32", "16×16", "8×8"]); ax.set_xticks([])
ax.set_title("SD 1.5 U-Net on a 4×64×64 latent (orange: with attention); arrows: the 12 skip concatenations")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Any size
#
# Convolutions and attention do not care about the image size, so the U-Net is not tied to
# 64×64 latents. Three Downsamples halve the size three times; on the way up each Upsample
# must land exactly on the size of the skip tensor it is concatenated with. For multiples of
# $2^3 = 8$ (pixel sizes that are multiples of 64 with SD's VAE) doubling does that. For other
# sizes a stride-2 convolution rounds up (65 → 33 → 17 → 9), and doubling 9 gives 18, not 17;
# so, as in diffusers, each Upsample is told the size of the skip waiting for it and
# interpolates to that. Any latent size works, so any pixel size that is a multiple of 8.

# %%
with torch.device("meta"):
    for h, w in [(64, 64), (96, 64), (40, 120), (65, 60)]:
        out = sd15(torch.randn(1, 4, h, w), 500, torch.randn(1, 77, 768))
        print(f"latent 4x{h}x{w} ({8 * h}x{8 * w} px) -> eps {tuple(out.shape[1:])}")
size, going_down = 65, [65]
for _ in range(3):
    size = (size + 1) // 2   # a 3x3, stride-2 convolution with padding 1
    going_down.append(size)
print("a side of 65 going down:", " -> ".join(map(str, going_down)),
      "| going up, each Upsample lands on:", " -> ".join(map(str, going_down[::-1][1:])))

# %% [markdown]
# ## A real forward pass at a small size
#
# `UNetConfig.tiny()` is the same code with three levels and a few channels: small enough to
# run (and, in chapter 9, to train) on a laptop CPU. Timesteps can be one per sample or one
# number for the whole batch.

# %%
tiny = minisd.UNet(minisd.UNetConfig.tiny()).eval()
latents, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
with torch.no_grad():
    eps = tiny(latents, torch.tensor([999, 10]), context)
    same = tiny(latents, 10, context)[1]
print("tiny U-Net:", f"{sum(p.numel() for p in tiny.parameters()):,} parameters;",
      tuple(latents.shape), "->", tuple(eps.shape))
print(f"sample 1 with t=10 given per sample or as one number: max |diff| = {(eps[1] - same).abs().max():.1e}")

# %% [markdown]
# ## Loading weights without random initialisation
#
# Real weights come in diffusers' layout (`unet/diffusion_pytorch_model.safetensors` and
# `unet/config.json`). `minisd.weights.load_unet_folder(folder)` reads the config with
# `UNetConfig.from_diffusers`, builds the model on the meta device, renames the 686 tensors
# through the one names table in `minisd.weights` (`UNET_NAMES`: each place where our name differs
# from diffusers', read one way to load and the other way to save) and assigns them without a copy.
# Every key must map to a parameter of the same shape; otherwise the error names the key, both
# shapes and the likely cause (an SD 2.x file has a 1024-wide text context).

# %%
from minisd.weights import UNET_NAMES, unet_diffusers_key, unet_key

for theirs, ours in UNET_NAMES[:6]:
    print(f"{theirs:28s} <-> {ours}")
print("...")
print(unet_key("down_blocks.1.resnets.0.conv_shortcut.weight"))
print(unet_key("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight"))
print(unet_diffusers_key("up_blocks.3.attentions.2.block.ff.geglu.proj.weight"))

# %% [markdown]
# ## Speed
#
# How fast this U-Net runs and loads next to diffusers' (the same PyTorch kernels, measured
# with `python -m minisd benchmark --component unet`) is in the appendix,
# [Engineering notes](appendix_engineering.ipynb).
#
# ## Ours == diffusers'
#
# The full `UNet2DConditionModel` against ours with identical weights, at a small config with
# SD 1.5's structure (four levels, 8 heads, 768-wide context, narrower channels). The test
# suite does the same at the real SD 1.5 size (`tests/test_unet.py`, max |diff| ≤ 1e-4).

# %%
from minisd import weights
from minisd.weights import random_weights

small = minisd.UNetConfig(block_channels=(64, 128, 256, 256))
with torch.device("meta"):
    theirs = UNet2DConditionModel(**small.to_diffusers())
theirs.load_state_dict(random_weights(theirs, seed=0), assign=True)
ours = weights.load_unet(theirs.state_dict(), small)        # the same tensors, renamed
latents, context, t = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 768), torch.tensor([981, 1])
with torch.no_grad():
    d = (ours.eval()(latents, t, context) - theirs.eval()(latents, t, encoder_hidden_states=context).sample).abs().max()
print(f"{sum(p.numel() for p in ours.parameters()):,} parameters; latents {tuple(latents.shape)}")
print(f"ours vs diffusers' UNet2DConditionModel: max |diff| = {d:.1e}")
assert d < 1e-4

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 4.1 (★)** Where do SD 1.5's 859.5M U-Net parameters live by *kind* of module? Sum the
# parameters of all `SpatialTransformer`s, all `ResNetBlock`s, all `Downsample`/`Upsample`s and the
# rest (time embedding, `conv_in`, `out`), on the meta-device model `sd15`.

# %% tags=["solution", "hide-cell"]
from minisd.attention import SpatialTransformer
from minisd.resnet import Downsample, ResNetBlock, Upsample

kinds = {"SpatialTransformer": SpatialTransformer, "ResNetBlock": ResNetBlock, "Down/Upsample": (Downsample, Upsample)}
by_kind = {name: sum(p.numel() for m in sd15.modules() if isinstance(m, cls) for p in m.parameters())
           for name, cls in kinds.items()}
by_kind["the rest"] = n_params - sum(by_kind.values())
for name, n in by_kind.items():
    print(f"{name:20s} {n / 1e6:7.1f}M  {n / n_params:6.1%}")
# attention and ResNetBlocks hold almost everything; no module kind is nested in another here
assert sum(by_kind.values()) == n_params and by_kind["the rest"] < 0.01 * n_params

# %% [markdown]
# **Exercise 4.2 (★)** Predict the number of skip tensors from the config alone: `conv_in`, plus
# each encoder level's `layers_per_block` outputs, plus one per Downsample. Why must each
# decoder level then have `layers_per_block + 1` ResNetBlocks? Check against the walk above.

# %% tags=["solution", "hide-cell"]
levels_n = len(config.block_channels)
predicted = 1 + levels_n * config.layers_per_block + (levels_n - 1)
decoder_resnets = sum(len(b.resnets) for b in sd15.up_blocks)
print(f"skip tensors: 1 + {levels_n} x {config.layers_per_block} + {levels_n - 1} = {predicted}; "
      f"pushed in the walk: {1 + sum(len(s) for s in skips_pushed)}; decoder ResNetBlocks: {decoder_resnets}")
# every decoder ResNetBlock pops exactly one skip, so the decoder needs as many ResNetBlocks as there
# are skips: levels x (layers_per_block + 1) = 4 x 3 = 12
assert predicted == 1 + sum(len(s) for s in skips_pushed) == decoder_resnets == levels_n * (config.layers_per_block + 1)

# %% [markdown]
# **Exercise 4.3 (★★, break it and watch)** How much does the trained course U-Net
# (`minisd.checkpoint.course_unet()`, chapter 9) rely on its skip connections? Register forward hooks on its
# down blocks that replace every skip tensor they push by zeros (the main path is untouched), and
# compare its noise-prediction error on 128 noised course latents with the intact model's. For
# scale, also give it the empty prompt instead of the captions.

# %% tags=["solution", "hide-cell"]
from minisd import data
from minisd.diffusion import add_noise

vae, text_encoder, unet = minisd.checkpoint.course_vae(), minisd.checkpoint.course_text_encoder(), minisd.checkpoint.course_unet()
tok = minisd.CLIPTokenizer.sd15()
pictures, captions = data.sample(128, seed=11)
g = torch.Generator().manual_seed(0)


def zero_the_skips(module, args, output):
    x, pushed = output
    return x, [torch.zeros_like(s) for s in pushed]


with torch.no_grad():
    z0 = vae.encode(data.to_tensor(pictures)).mean * vae.scaling_factor
    ctx, ctx_empty = text_encoder(tok(captions)), text_encoder(tok([""] * 128))
    t_rand = torch.randint(0, 1000, (128,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    z_t = add_noise(z0, noise, t_rand)
    err = {"intact": ((unet(z_t, t_rand, ctx) - noise) ** 2).mean().item(),
           "empty prompt": ((unet(z_t, t_rand, ctx_empty) - noise) ** 2).mean().item()}
    hooks = [b.register_forward_hook(zero_the_skips) for b in unet.down_blocks]
    try:
        err["skips zeroed"] = ((unet(z_t, t_rand, ctx) - noise) ** 2).mean().item()
    finally:
        for hk in hooks:
            hk.remove()
for name, e in err.items():
    print(f"{name:14s} noise-prediction MSE {e:.4f}")
# without its skips the decoder has only the 8x8 -> 2x2 bottleneck's summary and loses most of its
# accuracy; losing the text costs far less on this data
assert err["skips zeroed"] > 5 * err["intact"] and err["skips zeroed"] > err["empty prompt"]

# %% [markdown]
# ## What you built
#
# `minisd.UNet` and `UNetConfig`: a `conv_in`, three `CrossAttnDownBlock`s and a `DownBlock`,
# a `CrossAttnMidBlock`, an `UpBlock` and three `CrossAttnUpBlock`s, and an output GSC; 12 skip
# tensors carried across; any latent size; weights loaded from diffusers' layout through
# `minisd.weights` without random initialisation; equal to `UNet2DConditionModel`. Chapter 5
# builds the VAE whose latents it denoises; chapter 9 trains a small one.
