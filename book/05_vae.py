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
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. The VAE
#
# **You will build** SD's variational autoencoder, `minisd.vae.AutoencoderKL` with its
# `VAEConfig` and the `DiagonalGaussian` between encoder and decoder; derive the loss it is
# trained on (the ELBO, with the KL term in closed form) and check it with numbers; and meet the
# {term}`scaling factor` 0.18215.
#
# Stable Diffusion does not denoise pixels. A variational autoencoder ({term}`VAE`,
# {cite}`kingma2014vae`) first squeezes a
# $512\times512\times3$ image into a $4\times64\times64$ tensor of *latents*, the U-Net does all
# of its work there, and the VAE's decoder turns the final latents back into pixels. That is
# 48 times fewer numbers per image, which is most of why SD runs on one consumer GPU.
#
# This chapter builds SD's VAE (`AutoencoderKL`) from the pieces of chapters 2 and 3:
#
# - **Encoder** ({term}`encoder`): image $x$ $\to$ the parameters of a Gaussian $q(z\mid x)=\mathcal N(\mu(x),\operatorname{diag}\sigma^2(x))$;
# - **DiagonalGaussian**: sample $z=\mu+\sigma\odot\varepsilon$, $\varepsilon\sim\mathcal N(0,I)$;
# - **Decoder** ({term}`decoder`): $z\to\hat x$, an image again.
#
# Chapter 6 trains one; here we look at its architecture at SD 1.5's size, at the
# Gaussian in the middle, at latents as pictures, and at the number 0.18215.

# %%
import math

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
# ```{admonition} The notes say the encoder has "three DownBlocks" / 笔记说 Encoder 包含"三个 DownBlock 模块"
# :class: warning
# SD 1.5's VAE encoder has **four** down blocks of (128, 256, 512, 512) channels with two
# ResNetBlocks each, and only the first **three** end in a Downsample: $512/2^3=64$, so the
# {term}`downsampling factor` is $f=8$. The fair reading: the notes count the blocks that
# *downsample*, and there are three of those. The cell below lists the four blocks of the module
# built at SD 1.5's config.
# ```
#
# We build the model on PyTorch's `meta` device (shapes, no memory, no arithmetic), so a 512x512
# walk costs nothing:

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
# `post_quant_conv` ($4\to4$): both are inherited from VQ-GAN {cite}`esser2021taming`, where they framed the vector
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
print(f"AutoencoderKL total:       {count(sd_vae):>11,}  ({count(sd_vae) * 2 / 1e6:.0f} MB = "
      f"{count(sd_vae) * 2 / 2**20:.0f} MiB in fp16)")
assert count(sd_vae.encoder, sd_vae.quant_conv) + count(sd_vae.decoder, sd_vae.post_quant_conv) == count(sd_vae)

# %% [markdown]
# 83.7M parameters, 167 MB (10^6 bytes) = 160 MiB in fp16: the seed's "VAE 160M" is in MiB.
#
# ## The Gaussian in the middle
#
# The encoder does not output one latent but a distribution per latent number: a mean $\mu$
# and a log-variance $\log\sigma^2$, clamped to $[-30, 20]$ as SD does so $e^{\log\sigma^2}$
# can neither underflow nor overflow: a {term}`diagonal Gaussian`. Sampling uses the
# {term}`reparameterisation trick`, so gradients flow into $\mu$ and $\sigma$:
#
# $$z=\mu+\sigma\odot\varepsilon,\qquad \sigma=e^{\frac12\log\sigma^2},\qquad \varepsilon\sim\mathcal N(0,I).$$
#
# ### The ELBO: what a VAE maximises
#
# A VAE is a latent-variable model: a prior $p(z)=\mathcal N(0,I)$ and a decoder $p_\theta(x\mid z)$.
# Its likelihood $p_\theta(x)=\int p_\theta(x\mid z)\,p(z)\,dz$ cannot be computed, so the encoder
# $q_\phi(z\mid x)$ proposes where the $z$ of an $x$ lie. For any $q$,
#
# $$\log p_\theta(x)=\underbrace{\mathbb E_{q_\phi(z\mid x)}\big[\log p_\theta(x\mid z)\big]
#    -D_{\mathrm{KL}}\big(q_\phi(z\mid x)\,\|\,p(z)\big)}_{\text{ELBO}}
#    +D_{\mathrm{KL}}\big(q_\phi(z\mid x)\,\|\,p_\theta(z\mid x)\big),$$
#
# (write $\log p_\theta(x)=\mathbb E_q[\log p_\theta(x,z)-\log q(z\mid x)]+\mathbb E_q[\log q(z\mid x)-\log p_\theta(z\mid x)]$
# and use $p_\theta(x,z)=p_\theta(x\mid z)p(z)$). The last KL is $\ge0$, so the
# {term}`ELBO` (evidence lower bound) is below $\log p_\theta(x)$, with equality when $q$ is the
# true posterior. Training maximises it: the first term is a reconstruction loss (an L2 loss for a
# Gaussian decoder, L1 + perceptual in SD, chapter 6), the second the {term}`KL divergence` of
# the encoder's Gaussian from the prior. For a diagonal Gaussian it has a closed form, per latent
# number
#
# $$D_{\mathrm{KL}}\big(\mathcal N(\mu,\sigma^2)\,\|\,\mathcal N(0,1)\big)
#   =\mathbb E_q\Big[\log\tfrac{q(z)}{p(z)}\Big]
#   =\mathbb E_q\Big[-\log\sigma-\tfrac{(z-\mu)^2}{2\sigma^2}+\tfrac{z^2}{2}\Big]
#   =\tfrac12\big(\mu^2+\sigma^2-1-\log\sigma^2\big),$$
#
# using $\mathbb E_q[(z-\mu)^2]=\sigma^2$ and $\mathbb E_q[z^2]=\mu^2+\sigma^2$, summed over all
# latent numbers. Two checks: the closed form against a Monte Carlo estimate of
# $\mathbb E_q[\log q(z)-\log p(z)]$ (and against `DiagonalGaussian.kl`), and the ELBO against an
# exact $\log p(x)$ on a one-dimensional linear-Gaussian model ($z\sim\mathcal N(0,1)$,
# $x\mid z\sim\mathcal N(az,s^2)$, so $p(x)=\mathcal N(0,a^2+s^2)$ and the true posterior is Gaussian).

# %%
from torch.distributions import Normal  # noqa: E402

gen = torch.Generator().manual_seed(0)
mu_q = torch.tensor([0.0, 0.5, -1.0, 2.0, 0.3])
logvar_q = torch.tensor([0.0, -1.0, 0.5, -4.0, 1.0])
sigma_q = (0.5 * logvar_q).exp()
closed = 0.5 * (mu_q ** 2 + sigma_q ** 2 - 1 - logvar_q)
z_mc = mu_q + sigma_q * torch.randn(400_000, 5, generator=gen)                 # samples of q
mc = (Normal(mu_q, sigma_q).log_prob(z_mc) - Normal(0.0, 1.0).log_prob(z_mc)).mean(0)
package = DiagonalGaussian(torch.cat([mu_q, logvar_q]).view(1, 10, 1, 1)).kl()
print("closed form   ", [round(v, 4) for v in closed.tolist()], " sum", round(closed.sum().item(), 4))
print("Monte Carlo   ", [round(v, 4) for v in mc.tolist()], " sum", round(mc.sum().item(), 4))
print("DiagonalGaussian.kl():", round(package.item(), 4))
assert torch.allclose(mc, closed, atol=0.02) and torch.allclose(package, closed.sum())

a, s_dec, x_obs = 2.0, 0.5, torch.tensor(1.3)
log_px = Normal(0.0, (a ** 2 + s_dec ** 2) ** 0.5).log_prob(x_obs)             # exact log p(x)
post_var = 1 / (1 + a ** 2 / s_dec ** 2)
post_mean = post_var * a * x_obs / s_dec ** 2                                     # the true posterior


def elbo(m, v, n=400_000):
    z = m + v ** 0.5 * torch.randn(n, generator=gen)
    recon = Normal(a * z, s_dec).log_prob(x_obs).mean()
    return recon - 0.5 * (m ** 2 + v - 1 - torch.log(torch.tensor(v)))


for name, (m, v) in {"true posterior": (post_mean, post_var), "mean off by 0.3": (post_mean + 0.3, post_var),
                     "variance x4": (post_mean, 4 * post_var)}.items():
    print(f"q = {name:16s} ELBO {elbo(m, v).item():.4f}   log p(x) {log_px.item():.4f}")
assert abs(elbo(post_mean, post_var) - log_px) < 0.01                              # tight at the true posterior
assert elbo(post_mean + 0.3, post_var) < log_px - 0.05 and elbo(post_mean, 4 * post_var) < log_px - 0.05

# %% [markdown]
# The ELBO touches $\log p(x)$ only at the true posterior; every other $q$ pays its KL from it.
# SD's VAE uses a tiny weight on the KL term (chapter 6), so it is an autoencoder with a little
# noise more than a generative model of images: the diffusion model takes over that job. The
# package's Gaussian at work on four hand-set numbers:

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
# The course VAE's factor came out close to 1 and SD's far from it (latents of std ~5.5, hence
# 0.18215). Neither number is predicted by anything in the objective: with a KL weight of
# $10^{-6}$ the latents' scale is whatever training made it, which is why the rule is to measure
# the std of real latents once and store its inverse with the weights. What we *can* measure is
# how narrow the course VAE's posterior is: its $\sigma$ on held-out images, against the
# $\sigma\approx0.05$ its training started from (chapter 6 initialises the log-variance bias at $-6$):

# %%
with torch.no_grad():
    posterior_held = vae.encode(data.to_tensor(held))
print(f"posterior sigma on 256 held-out images: mean {posterior_held.std.mean():.4f}, "
      f"max {posterior_held.std.max():.4f};  std of the means {posterior_held.mean.std():.3f}")
assert posterior_held.std.mean() < 0.1 < posterior_held.mean.std()

# %% [markdown]
# So the posterior is narrow (σ a few hundredths against means spread over about ±1): the
# latents are nearly deterministic and the sampled latent is its mean to within a few percent.
# Whether the factor would still be near 1 from another initialisation is not something this
# book has measured.
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
assert max(d_mean, d_logvar, d_dec) < 1e-4

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 5.1 (★)** The encoder's output for one latent number has $\mu = 0.2$ and
# $\log\sigma^2 = -6$ (the course VAE's starting point). Compute its KL to $\mathcal N(0,1)$ by hand,
# then with `DiagonalGaussian`. Which of the three parts, $\mu^2$, $\sigma^2-1$ or $-\log\sigma^2$,
# dominates?

# %% tags=["solution", "hide-cell"]
mu1, lv1 = 0.2, -6.0
parts = {"mu^2": mu1 ** 2, "sigma^2 - 1": math.exp(lv1) - 1, "-log sigma^2": -lv1}
by_hand_kl = 0.5 * sum(parts.values())
pkg_kl = DiagonalGaussian(torch.tensor([mu1, lv1]).view(1, 2, 1, 1)).kl().item()
print({k: round(v, 4) for k, v in parts.items()}, f"KL = {by_hand_kl:.4f}, DiagonalGaussian: {pkg_kl:.4f}")
# -log sigma^2 = 6 dominates: a narrow posterior costs KL however close to 0 its mean is
assert abs(by_hand_kl - pkg_kl) < 1e-5 and parts["-log sigma^2"] > 5 * parts["mu^2"]

# %% [markdown]
# **Exercise 5.2 (★★)** The reparameterisation trick makes a Monte Carlo estimate differentiable.
# With $z=\mu+\sigma\varepsilon$, estimate $\nabla_{\mu,\sigma}\,\mathbb E[z^2]$ from 100,000 samples by
# autograd, and compare with the exact gradient of $\mathbb E[z^2]=\mu^2+\sigma^2$.

# %% tags=["solution", "hide-cell"]
mu_r = torch.tensor(0.7, requires_grad=True)
sigma_r = torch.tensor(1.5, requires_grad=True)
eps_r = torch.randn(100_000, generator=torch.Generator().manual_seed(3))
(mu_r + sigma_r * eps_r).pow(2).mean().backward()
print(f"autograd through samples: d/dmu {mu_r.grad:.3f}, d/dsigma {sigma_r.grad:.3f};  "
      f"exact: {2 * 0.7:.3f}, {2 * 1.5:.3f}")
assert abs(mu_r.grad - 1.4) < 0.05 and abs(sigma_r.grad - 3.0) < 0.05

# %% [markdown]
# **Exercise 5.3 (★★, break it and watch)** Use the wrong scaling factor. A pipeline that divides
# the course VAE's latents by SD's 0.18215 instead of multiplying back by the course VAE's own
# factor hands the decoder latents about $1/0.18$ times too large. Measure the held-out PSNR of
# `decode(z)` with the right latents and with $z \cdot s_\text{course}/0.18215$.

# %% tags=["solution", "hide-cell"]
from minisd import losses  # noqa: E402

x_held = data.to_tensor(held)
with torch.no_grad():
    z_held = vae.encode(x_held).mode()
    psnr_right = losses.psnr(x_held, vae.decode(z_held).clamp(-1, 1)).mean().item()
    psnr_wrong = losses.psnr(x_held, vae.decode(z_held * vae.scaling_factor / 0.18215).clamp(-1, 1)).mean().item()
print(f"held-out PSNR: right scale {psnr_right:.1f} dB, SD's factor on the course VAE {psnr_wrong:.1f} dB")
# the factor belongs to its VAE: latents 4.8x too large decode to saturated garbage
assert psnr_right > psnr_wrong + 10

# %% [markdown]
# **Exercise 5.4 (★★)** Compute the course VAE's KL term per latent number on the 256 held-out
# images, and split it into the part from the means ($\tfrac12\mu^2$) and the part from the
# variances ($\tfrac12(\sigma^2-1-\log\sigma^2)$). Which one would a larger KL weight attack first?

# %% tags=["solution", "hide-cell"]
n_numbers = posterior_held.mean[0].numel()
kl_per_number = (posterior_held.kl() / n_numbers).mean().item()
mean_part = (0.5 * posterior_held.mean ** 2).mean().item()
var_part = (0.5 * (posterior_held.var - 1 - posterior_held.logvar)).mean().item()
print(f"KL per latent number {kl_per_number:.3f} = means {mean_part:.3f} + variances {var_part:.3f}")
# the narrow posterior (sigma ~ 0.05) is most of the KL; a heavier weight would first widen sigma,
# i.e. add noise to the latents, which costs reconstruction
assert abs(kl_per_number - mean_part - var_part) < 1e-3 and var_part > 2 * mean_part

# %% [markdown]
# ## What you built
#
# `minisd.vae.AutoencoderKL` (encoder, `quant_conv`, `DiagonalGaussian`, `post_quant_conv`,
# decoder) and `VAEConfig`, equal to diffusers' `AutoencoderKL` at SD 1.5's config; the ELBO and
# the closed-form KL it uses, checked against Monte Carlo; and the scaling factor, which belongs
# to its VAE. Chapter 6 trains the course VAE with SD's full objective.
