# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
# ---

# %% [markdown]
# # 0. Stable Diffusion at a glance
#
# **You will build** the three networks of {term}`Stable Diffusion` 1.5 at their real sizes,
# `minisd.UNet`, `minisd.AutoencoderKL` and `minisd.CLIPTextEncoder` (with
# `minisd.CLIPTokenizer`), on PyTorch's `meta` device; count their parameters and bytes; and
# follow one prompt's shapes through all three.
#
# Stable Diffusion 1.x ({term}`latent diffusion`, {cite}`rombach2022ldm`) is three networks and a loop:
#
# - a **{term}`text encoder`** (the text half of OpenAI's {term}`CLIP` ViT-L/14,
#   {cite}`radford2021clip`) turns the prompt into 77 vectors of 768 numbers;
# - a **{term}`U-Net`** predicts the noise in a small *{term}`latent`* image, reading those
#   vectors through {term}`cross-attention`; a **{term}`scheduler`** (sampler) runs it 20 to 50
#   times, from pure noise to a clean latent;
# - a **{term}`VAE`** {term}`decoder` turns the 4x64x64 latent into a 3x512x512 image (its
#   {term}`encoder` does the reverse, for training and img2img).
#
# This chapter builds the three at the real SD 1.5 sizes, counts their parameters, and follows
# one prompt through them. Everything is computed here, from the modules the rest of the book
# writes, not typed in. The models are built on PyTorch's `meta` device: tensors with shapes and
# dtypes but no memory, so the 1.07 billion parameters cost nothing and the shapes are exact.

# %%
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

import minisd

_ = torch.manual_seed(0)

# %%
with torch.device("meta"):
    unet = minisd.UNet(minisd.UNetConfig.sd15())
    vae = minisd.AutoencoderKL(minisd.VAEConfig.sd15())
    text_encoder = minisd.CLIPTextEncoder(minisd.CLIPTextConfig.sd15())
parts = {"U-Net": unet, "VAE": vae, "CLIP text encoder": text_encoder}
counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}

GB, GiB = 1e9, 2**30     # a gigabyte is 10^9 bytes, a gibibyte 2^30 = 1.074 x 10^9
print(f"{'part':<20}{'parameters':>15}{'fp32':>10}{'fp16':>10}{'fp16':>11}")
for name, n in counts.items():
    print(f"{name:<20}{n:>15,}{4 * n / GB:>7.2f} GB{2 * n / GB:>7.2f} GB{2 * n / GiB:>7.2f} GiB")
total = sum(counts.values())
print(f"{'total':<20}{total:>15,}{4 * total / GB:>7.2f} GB{2 * total / GB:>7.2f} GB{2 * total / GiB:>7.2f} GiB")
count = lambda *mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
n_enc, n_dec, n_quant = count(vae.encoder), count(vae.decoder), count(vae.quant_conv, vae.post_quant_conv)
print(f"\nVAE: encoder {n_enc:,} + decoder {n_dec:,} = {n_enc + n_dec:,}; "
      f"+ quant_conv and post_quant_conv {n_quant} = {n_enc + n_dec + n_quant:,}")
assert n_enc + n_dec + n_quant == counts["VAE"]

# %% [markdown]
# The seed notes give the U-Net about 860M parameters, the text encoder about 123M, and the whole
# model about 2 GB in fp16 and 4 GB in fp32. Those match: each parameter is 4 bytes in fp32 and 2
# in fp16, so 1.07 billion parameters are 4.3 GB and 2.1 GB. The notes' "VAE ~160 MB" is its
# fp16 size in MiB (83.7M parameters x 2 bytes = 167 MB = 160 MiB); in fp32 it is twice that.
# The U-Net is 81 % of the model, and it is the part that runs at every step. The VAE's
# encoder and decoder do not add up to its total on their own: two 1x1 convolutions sit between
# them, `quant_conv` (8 -> 8 channels: 64 weights + 8 biases) and `post_quant_conv`
# (4 -> 4: 16 + 4), the 92 parameters in the last line (chapter 5 says where they come from).
#
# ```{admonition} The notes say the U-Net is "1.6G" in fp16 / 笔记说 U-Net 大小 1.6G
# :class: warning
# The number is right, the unit is mixed. 859,520,964 parameters x 2 bytes are 1.72 GB
# (10^9 bytes) and 1.60 GiB (2^30 bytes): the notes' "1.6G" is in GiB. Their "3.4G" for the
# U-Net in fp32 is in GB (3.44 GB = 3.20 GiB), and their "VAE 160M" and "235M" for the text
# encoder are MiB again. The cell below computes each; this book writes GB for 10^9 bytes
# and GiB for 2^30.
# ```

# %%
n_unet = counts["U-Net"]
print(f"U-Net fp16: {2 * n_unet / GB:.2f} GB = {2 * n_unet / GiB:.2f} GiB  (notes: 1.6G)")
print(f"U-Net fp32: {4 * n_unet / GB:.2f} GB = {4 * n_unet / GiB:.2f} GiB  (notes: 3.4G)")
print(f"VAE fp16: {2 * counts['VAE'] / 2**20:.0f} MiB (notes: 160M);  "
      f"text encoder fp16: {2 * counts['CLIP text encoder'] / 2**20:.0f} MiB (notes: 235M)")
assert round(2 * n_unet / GiB, 1) == 1.6 and round(2 * n_unet / GB, 1) == 1.7
assert round(4 * n_unet / GB, 1) == 3.4 and round(4 * n_unet / GiB, 1) == 3.2

# %% [markdown]
# Are these the real models? diffusers and transformers build the same three at SD 1.5's
# configs; their parameter counts must equal ours exactly (again on the meta device):

# %%
import diffusers
import transformers

with torch.device("meta"):
    theirs = {
        "U-Net": diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        "VAE": diffusers.AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                       down_block_types=["DownEncoderBlock2D"] * 4,
                                       up_block_types=["UpDecoderBlock2D"] * 4),
        "CLIP text encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
    }
for name, model in theirs.items():
    n = sum(p.numel() for p in model.parameters())
    print(f"{name:<20} diffusers/transformers {n:>13,}   minisd {counts[name]:>13,}   equal: {n == counts[name]}")

# %% [markdown]
# ## One prompt, end to end
#
# The shapes of one 512x512 generation, computed by running the three meta-device models on
# meta tensors (shape inference: no arithmetic is done). Classifier-free guidance runs the
# The {term}`classifier-free guidance` of Ho & Salimans {cite}`ho2022cfg` (this book dates it by its
# arXiv paper, 2022; it was first shown at a NeurIPS 2021 workshop) runs the U-Net on a batch of two,
# the prompt and an empty prompt, and mixes the two noise predictions
# $\hat\epsilon = \epsilon_\varnothing + s\,(\epsilon_c - \epsilon_\varnothing)$ with $s = 7.5$
# (chapter 10).

# %%
tokenizer = minisd.CLIPTokenizer.sd15()
prompt = "a photograph of an astronaut riding a horse"
ids = tokenizer([prompt, ""])                                  # prompt and the empty prompt
context = text_encoder(ids.to("meta"))
latents = torch.empty(1, 4, 64, 64, device="meta")             # x_T ~ N(0, I) in the real pipeline
eps = unet(torch.cat([latents, latents]), torch.tensor(981, device="meta"), context)
image = vae.decode(latents)
shapes = {"token ids": ids.shape, "text context": context.shape, "latents": latents.shape,
          "U-Net output (cond + uncond)": eps.shape, "image": image.shape}
for name, shape in shapes.items():
    print(f"{name:<30}{tuple(shape)}")
print("first token ids:", ids[0, :12].tolist())

# %% [markdown]
# The latent is 48 times smaller than the image ($3 \cdot 512^2 / (4 \cdot 64^2) = 48$): that
# is the whole point of *latent* diffusion. The U-Net, the expensive part, never sees a pixel.

# %%
def box(ax, x, y, w, h, title, detail, color):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="black", lw=1))
    ax.text(x + w / 2, y + h * 0.62, title, ha="center", va="center", fontsize=10, weight="bold")
    ax.text(x + w / 2, y + h * 0.28, detail, ha="center", va="center", fontsize=8)


def arrow(ax, start, end, label="", dx=0.0, dy=0.12):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.2))
    if label:
        ax.text((start[0] + end[0]) / 2 + dx, (start[1] + end[1]) / 2 + dy, label, ha="center", fontsize=8,
                color="dimgray")


fig, ax = plt.subplots(figsize=(12, 4.2))
ax.set_xlim(0, 12)
ax.set_ylim(0, 4.2)
ax.axis("off")
M = 1e6
box(ax, 0.1, 2.7, 1.7, 1.0, "prompt", f'"{prompt[:22]}..."', "#f2f2f2")
box(ax, 2.4, 2.7, 1.8, 1.0, "tokenizer", "CLIP BPE, 49,408 tokens", "#fde2c8")
box(ax, 4.8, 2.7, 2.2, 1.0, "CLIP text encoder", f"{counts['CLIP text encoder'] / M:.0f}M params", "#fde2c8")
box(ax, 0.1, 0.5, 1.7, 1.0, "noise x_T", f"N(0, I), {tuple(latents.shape[1:])}", "#f2f2f2")
box(ax, 4.8, 0.5, 2.2, 1.0, "U-Net  x N steps", f"{counts['U-Net'] / M:.0f}M params", "#cfe3f7")
box(ax, 2.4, 0.5, 1.8, 1.0, "sampler", "PNDM / DDIM / Euler ...", "#cfe3f7")
box(ax, 7.7, 0.5, 2.0, 1.0, "VAE decoder", f"{sum(p.numel() for p in vae.decoder.parameters()) / M:.0f}M params",
    "#d7efd2")
box(ax, 10.2, 0.5, 1.7, 1.0, "image", f"{tuple(image.shape[1:])}", "#f2f2f2")
arrow(ax, (1.85, 3.2), (2.4, 3.2))
arrow(ax, (4.25, 3.2), (4.8, 3.2), f"ids {tuple(ids.shape[1:])}", dy=0.65)
arrow(ax, (5.9, 2.7), (5.9, 1.55), f"context {tuple(context.shape[1:])}", dx=0.75)
arrow(ax, (1.85, 1.0), (2.4, 1.0))
arrow(ax, (4.25, 1.15), (4.8, 1.15), "x_t, t")
arrow(ax, (4.8, 0.8), (4.25, 0.8))
ax.text(4.52, 0.55, "eps", ha="center", fontsize=8, color="dimgray")
arrow(ax, (7.05, 1.0), (7.7, 1.0), "x_0 / 0.18215", dy=0.62)
arrow(ax, (9.75, 1.0), (10.2, 1.0))
ax.set_title("Stable Diffusion 1.5: text to image (shapes computed above, batch dimension left out)")
plt.show()

# %% [markdown]
# The rest of the book builds each box: the U-Net's pieces in chapters 1-4, the VAE in 5-6,
# the tokenizer and text encoder in 7-8, training and the samplers in 9-10; chapter 11 joins them
# into `minisd.StableDiffusion`, which loads the real SD 1.5 weights and gives the same images as
# diffusers. The seed notes describe the VAE with 3 down blocks; the real one has 4, of which 3
# halve the image (chapter 5 shows it).
#
# ## What you built
#
# The three networks of SD 1.5 at full size, `minisd.UNet` (859.5M parameters),
# `minisd.AutoencoderKL` (83.7M) and `minisd.CLIPTextEncoder` (123.1M), with parameter counts
# equal to diffusers' and transformers' and sizes in GB and GiB computed from them; and the
# shapes of one prompt's trip from 77 token ids to a 3x512x512 image through a 4x64x64 latent.
# Next, chapter 1 starts the U-Net at its smallest part: how it is told the timestep.
