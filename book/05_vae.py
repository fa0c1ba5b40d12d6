# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. The VAE
#
# Stable Diffusion does not denoise pixels. A variational autoencoder (VAE) first squeezes a
# $512\times512\times3$ image into a $4\times64\times64$ tensor of *latents*, the U-Net does all
# of its work there, and the VAE's decoder turns the final latents back into pixels. That is
# 48 times fewer numbers per image, which is most of why SD runs on one consumer GPU.
#
# This chapter builds SD's VAE (`AutoencoderKL`) from the pieces of chapters 2 and 3:
#
# - **Encoder**: image $x$ $\to$ the parameters of a Gaussian $q(z\mid x)=\mathcal N(\mu(x),\operatorname{diag}\sigma^2(x))$;
# - **DiagonalGaussian**: sample $z=\mu+\sigma\odot\varepsilon$, $\varepsilon\sim\mathcal N(0,I)$;
# - **Decoder**: $z\to\hat x$, an image again.
#
# Chapter 6 trains one; here we look at its architecture at SD 1.5's size, at the
# Gaussian in the middle, at latents as pictures, and at the number 0.18215.

# %%
import torch
import matplotlib.pyplot as plt
import minisd
from minisd import data, resnet
from minisd.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

torch.manual_seed(0)
print(VAEConfig.sd15())

# %% [markdown]
# ## The building blocks
#
# The seed names three basic components of SD's VAE, and all three are chapter 2's modules
# with the VAE's settings:
#
# 1. **GSC** = GroupNorm + Swish (SiLU) + Conv3x3; the VAE's GroupNorm uses
#    $\epsilon=10^{-6}$ (the U-Net's $10^{-5}$);
# 2. **Downsample** = *padding* + Conv3x3 with stride 2. Unlike the U-Net's (pad 1 on every
#    side), the VAE pads only the right and bottom edges by one pixel, then convolves with
#    no padding. Same output size, different numbers;
# 3. **Upsample** = nearest-neighbour interpolation $\times2$ + Conv3x3.
#
# plus two core modules: **ResNetBlock** (GSC, GSC, + skip; with no time embedding: the VAE
# does not know about diffusion time) and a single-head **SelfAttention** over the pixels of
# the lowest-resolution map. Here is the asymmetric padding on a visible $1\times1\times4\times4$ map:

# %%
x = torch.arange(16.0).view(1, 1, 4, 4)
vae_down = resnet.Downsample(1, asymmetric=True)
unet_down = resnet.Downsample(1, asymmetric=False)
with torch.no_grad():
    for d in (vae_down, unet_down):
        d.conv.weight.fill_(1.0)   # a 3x3 box sum, so we can read which pixels each output sees
        d.conv.bias.zero_()
    print("input\n", x[0, 0])
    print("VAE  (pad right/bottom):\n", vae_down(x)[0, 0])
    print("U-Net (pad all sides):\n", unet_down(x)[0, 0])

# %% [markdown]
# The VAE's first output sums the 3x3 window at the top-left corner ($0+1+2+4+5+6+8+9+10=45$);
# the U-Net's window is centred one pixel earlier, so five of its nine taps fall on zero padding
# ($0+1+4+5=10$).
#
# ## The encoder's path at SD 1.5 size
#
# The seed says the encoder has *three DownBlocks*, a ResNetBlock and a MidBlock. The real SD
# 1.5 weights have **four** blocks of (128, 256, 512, 512) channels with two ResNetBlocks
# each, and only the first **three** end in a Downsample: $512/2^3=64$, so $f=8$. The seed
# counts the blocks that downsample. We build the model on PyTorch's `meta` device (shapes,
# no memory, no arithmetic), so a 512x512 walk costs nothing:

# %%
with torch.device("meta"):
    sd_vae = AutoencoderKL(VAEConfig.sd15())

for i, block in enumerate(sd_vae.encoder.down_blocks):
    print(f"down_blocks[{i}]: {len(block.resnets)} ResNetBlocks -> "
          f"{block.resnets[-1].gsc2.conv.out_channels} channels, downsample: {block.downsample is not None}")


# %%
def shape_walk(model, x):
    """Print the output shape of each top-level stage of the encoder, then the Gaussian."""
    enc = model.encoder
    print(f"{'image':34s} {tuple(x.shape)}")
    h = enc.conv_in(x)
    print(f"{'conv_in':34s} {tuple(h.shape)}")
    for i, block in enumerate(enc.down_blocks):
        h = block(h)
        print(f"{f'down_blocks[{i}]':34s} {tuple(h.shape)}")
    h = enc.mid_block(h)
    print(f"{'mid_block (ResNet, Attn, ResNet)':34s} {tuple(h.shape)}")
    h = enc.out(h)
    print(f"{'out (GroupNorm, SiLU, conv_out)':34s} {tuple(h.shape)}")
    h = model.quant_conv(h)
    print(f"{'quant_conv (1x1)':34s} {tuple(h.shape)}")
    post = DiagonalGaussian(h)
    print(f"{'mean, logvar':34s} {tuple(post.mean.shape)}, {tuple(post.logvar.shape)}")
    return post


with torch.device("meta"):
    post = shape_walk(sd_vae, torch.empty(1, 3, 512, 512))
    print(f"{'decode(z)':34s} {tuple(sd_vae.decode(post.mean).shape)}")

# %% [markdown]
# The encoder ends with $2c=8$ channels: 4 means and 4 log-variances. Between the encoder
# and the Gaussian sits `quant_conv`, a 1x1 conv ($8\to8$), and before the decoder
# `post_quant_conv` ($4\to4$): both are inherited from VQ-GAN, where they framed the vector
# quantiser. In a KL-VAE they are just two more linear maps, but the weights have them, so
# we do too.
#
# The decoder mirrors the encoder with one more ResNetBlock per block (three), and the VAE
# has **no skip connections** between encoder and decoder: everything the decoder knows
# must pass through the $4\times64\times64$ bottleneck. Parameter counts, computed from the module:

# %%
count = lambda *mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
print(f"encoder + quant_conv:      {count(sd_vae.encoder, sd_vae.quant_conv):>11,}")
print(f"decoder + post_quant_conv: {count(sd_vae.decoder, sd_vae.post_quant_conv):>11,}")
print(f"AutoencoderKL total:       {count(sd_vae):>11,}  ({count(sd_vae) * 2 / 1e6:.0f} MB in fp16)")

# %% [markdown]
# 83.7M parameters, ~167 MB in fp16: the seed's "VAE ~160 MB".
#
# ## The Gaussian in the middle
#
# The encoder does not output one latent but a distribution per latent number: a mean $\mu$
# and a log-variance $\log\sigma^2$, clamped to $[-30, 20]$ as SD does so $e^{\log\sigma^2}$
# can neither underflow nor overflow. Sampling uses the reparameterisation trick, so
# gradients flow into $\mu$ and $\sigma$:
#
# $$z=\mu+\sigma\odot\varepsilon,\qquad \sigma=e^{\frac12\log\sigma^2},\qquad \varepsilon\sim\mathcal N(0,I).$$
#
# The KL divergence to the standard normal, which training keeps small (chapter 6), is
#
# $$D_{\mathrm{KL}}\big(\mathcal N(\mu,\sigma^2)\,\|\,\mathcal N(0,1)\big)=\tfrac12\sum\big(\mu^2+\sigma^2-1-\log\sigma^2\big).$$

# %%
moments = torch.tensor([0.5, -1.0, 2 * torch.log(torch.tensor(0.1)), -50.0]).view(1, 4, 1, 1)  # 2 means, 2 logvars
g = DiagonalGaussian(moments)
print("mean   ", g.mean.flatten().tolist())
print("logvar ", [round(v, 4) for v in g.logvar.flatten().tolist()], "(-50 clamped to -30)")
print("std    ", [f"{v:.2e}" for v in g.std.flatten().tolist()])
print("mode   ", g.mode().flatten().tolist())
print("sample ", [round(v, 4) for v in g.sample(torch.Generator().manual_seed(0)).flatten().tolist()])
print("kl     ", round(g.kl().item(), 2))

# %% [markdown]
# ## Latents as images: the course VAE
#
# SD's own weights cannot be downloaded here, so we look at latents with the course VAE
# that chapter 6 trains on the course's 32x32 images: $f=4$, $c=4$, so each image becomes
# $4\times8\times8$. It is the same `AutoencoderKL` code with a smaller `VAEConfig`.

# %%
vae = minisd.checkpoint.course_vae()
print(vae.config)
images, captions = data.sample(6, seed=3, only=data.HELD_OUT)   # combinations it never trained on
x = data.to_tensor(images)
with torch.no_grad():
    posterior = vae.encode(x)
    z = posterior.mode()
    rec = vae.decode(z)
print("images", tuple(x.shape), "-> latents", tuple(z.shape), "-> reconstructions", tuple(rec.shape))

# %%
fig, axes = plt.subplots(6, 6, figsize=(9, 9.5))
for i in range(6):
    axes[i, 0].imshow(images[i])
    axes[i, 0].set_title(captions[i][2:], fontsize=6)
    lim = z[i].abs().max().item()
    for c in range(4):
        axes[i, 1 + c].imshow(z[i, c].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[0, 1 + c].set_title(f"latent ch {c}", fontsize=8)
    axes[i, 5].imshow(data.to_uint8(rec[i:i + 1])[0])
    axes[0, 5].set_title("decoded", fontsize=8)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
plt.suptitle("32x32 image -> 4 latent channels of 8x8 -> decoded image")
plt.tight_layout()
plt.show()

# %% [markdown]
# Each latent channel is a coarse, 8x8 map of the picture: the shape's position is
# visible in every channel, while its colour is spread over the four channels as
# different signs and magnitudes. The decoder turns these 256 numbers back into 3,072.
#
# ## The scaling factor: why 0.18215?
#
# KL regularisation is weighted so lightly (~$10^{-6}$, chapter 6) that the latents'
# scale is whatever training made it. The U-Net and its noise schedule assume data of unit
# variance, so the LDM paper rescales: compute the standard deviation $\hat\sigma$ of the
# latents of a first batch, then feed the U-Net $z\cdot\frac{1}{\hat\sigma}$ and divide by the
# same factor before decoding. For SD's VAE on its training images that factor came out as
# **0.18215** (latents with std ~5.5). Recomputing it needs SD's VAE weights *and* images
# like its training data; the number belongs to that pair, so every other VAE needs its own.
# The course VAE stored its own $1/\hat\sigma$ when it was trained:

# %%
held, _ = data.sample(256, seed=1, only=data.HELD_OUT)
with torch.no_grad():
    lat = vae.encode(data.to_tensor(held)).sample(torch.Generator().manual_seed(1))
print(f"course VAE: raw latent std {lat.std():.3f}; stored scaling_factor = {vae.scaling_factor:.5f} "
      f"(= 1/std of a first training batch)")
print(f"rescaled held-out latents: std {(lat * vae.scaling_factor).std():.3f}, mean {(lat * vae.scaling_factor).mean():+.3f}")
print(f"SD 1.5's factor: {VAEConfig.sd15().scaling_factor}")

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(lat.flatten().numpy(), bins=80, alpha=0.6, density=True, label="raw latents z")
ax.hist((lat * vae.scaling_factor).flatten().numpy(), bins=80, alpha=0.6, density=True,
        label=f"z x {vae.scaling_factor:.3f}")
ax.set_xlabel("latent value")
ax.legend()
ax.set_title("course VAE latents before and after the seed's rescaling")
plt.tight_layout()
plt.show()

# %% [markdown]
# The course VAE's factor came out close to 1: its short training started from a narrow
# posterior and never let the latents drift far. SD's VAE, trained far longer on far more
# varied images, ended with latents of std ~5.5, hence 0.18215. Either way the rule is the
# same: measure the std of real latents once, store its inverse with the weights.
#
# In the pipeline (chapter 11) the U-Net's final latents are divided by `scaling_factor`
# before `vae.decode`, which is why our `decode` takes latents *already divided*: the same
# contract as diffusers.
#
# ## Ours == diffusers
#
# The same random weights in our `AutoencoderKL` and diffusers' `AutoencoderKL` at SD 1.5's
# config, through the key map in `minisd.weights` (`load_vae` builds ours on the meta device
# and assigns the tensors, no random init). A 64x64 image keeps this cell quick; the test
# suite checks 128x128.

# %%
from diffusers import AutoencoderKL as DiffusersAutoencoderKL  # noqa: E402
from minisd import weights  # noqa: E402

torch.manual_seed(0)
ref = DiffusersAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                             norm_num_groups=32, sample_size=512).eval()
ours = weights.load_vae(ref.state_dict(), VAEConfig.sd15())
print(f"parameters: ours {count(ours):,}, diffusers {count(ref):,}")
x = torch.rand(1, 3, 64, 64) * 2 - 1
z = torch.randn(1, 4, 8, 8)
with torch.no_grad():
    a, b = ours.encode(x), ref.encode(x).latent_dist
    d_mean = (a.mean - b.mean).abs().max().item()
    d_logvar = (a.logvar - b.logvar).abs().max().item()
    d_dec = (ours.decode(z) - ref.decode(z).sample).abs().max().item()
print(f"encoder mean:   max |diff| = {d_mean:.1e}")
print(f"encoder logvar: max |diff| = {d_logvar:.1e}")
print(f"decoder:        max |diff| = {d_dec:.1e}")
