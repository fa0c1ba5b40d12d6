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
# # 2. ResNetBlock and friends
#
# **You will build** the four pieces that the U-Net and the VAE are made of, `minisd.resnet`'s
# `GSC` ({term}`GroupNorm`, {term}`SiLU`, Conv), `Downsample`, `Upsample` and `ResNetBlock`
# (with the {term}`time embedding` added inside it), each checked equal to diffusers'.
#
# The U-Net (chapter 4) and the VAE (chapter 5) are built from the same four small pieces:
#
# | piece | what it is |
# |---|---|
# | **GSC** | GroupNorm(32) → SiLU (Swish) → Conv 3×3 |
# | **Downsample** | Conv 3×3, stride 2: halves H and W |
# | **Upsample** | nearest-neighbour ×2, then Conv 3×3: doubles H and W |
# | **ResNetBlock** | GSC → + time embedding → GSC → + skip |
#
# The residual idea comes from ResNet {cite}`he2016resnet`; the normalisation from GroupNorm
# {cite}`wu2018groupnorm`. The seed calls the first piece {term}`GSC` and the others
# {term}`Downsample`, {term}`Upsample` and {term}`ResNetBlock`. This chapter builds each piece
# with small tensors you can look at.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

import minisd
from minisd.resnet import GSC, Downsample, ResNetBlock, Upsample

_ = torch.manual_seed(0)

# %% [markdown]
# ## GSC: GroupNorm, SiLU, Conv
#
# GroupNorm splits the $C$ channels of each sample into $G$ groups and normalises each group
# over its channels and all pixels:
#
# $$ \hat x = \frac{x - \mu_{g}}{\sqrt{\sigma_{g}^2 + \epsilon}}\,\gamma_c + \beta_c, $$
#
# where $\mu_g, \sigma_g^2$ are the mean and variance of group $g$ *of this one sample*. Then
# SiLU, $x\,\sigma(x)$, and a 3×3 convolution with padding 1, which keeps H×W. By hand:

# %%
x = torch.randn(2, 64, 8, 8)
gsc = GSC(64, 128)                                  # 32 groups of 2 channels, eps 1e-5 (the U-Net's)
groups = x.view(2, 32, 2 * 8 * 8)                   # (B, C, H, W) -> (B, groups, C/groups * H * W)
mu, var = groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True)
normed = ((groups - mu) / torch.sqrt(var + 1e-5)).view(2, 64, 8, 8)
normed = normed * gsc.norm.weight[:, None, None] + gsc.norm.bias[:, None, None]
by_hand = gsc.conv(normed * torch.sigmoid(normed))
print("GSC:", tuple(x.shape), "->", tuple(gsc(x).shape))
print(f"by hand vs minisd GSC: max |diff| = {(by_hand - gsc(x)).abs().max():.1e}")

# %% [markdown]
# ## GroupNorm, not BatchNorm
#
# BatchNorm normalises each channel over the *batch*: a sample's output depends on which other
# samples share its batch, and training statistics must be stored for inference. Generative
# models are trained and sampled at all sorts of batch sizes (SD samples 1 image, or 2 with
# classifier-free guidance; it trains at hundreds), so SD uses GroupNorm, whose statistics come
# from one sample alone. A quick demonstration: normalise the same image inside batches of
# different sizes.

# %%
pictures, captions = minisd.data.sample(64, seed=0)
images = minisd.data.to_tensor(pictures)                           # (64, 3, 32, 32) in [-1, 1]
lift = nn.Conv2d(3, 32, 3, padding=1)                               # some 32-channel features
with torch.no_grad():
    feats = lift(images)
    bn, gn = nn.BatchNorm2d(32).train(), nn.GroupNorm(8, 32)
    sizes = [1, 2, 4, 8, 16, 32, 64]
    ref_bn, ref_gn = bn(feats)[0], gn(feats)[0]                     # image 0 in the full batch of 64
    change_bn = [(bn(feats[:n])[0] - ref_bn).abs().max().item() for n in sizes]
    change_gn = [(gn(feats[:n])[0] - ref_gn).abs().max().item() for n in sizes]
for n, b, g in zip(sizes, change_bn, change_gn):
    print(f"batch {n:2d}: image 0 changes by {b:.2e} under BatchNorm, {g:.2e} under GroupNorm")

plt.figure(figsize=(6, 3.2))
plt.plot(sizes, change_bn, "o-", label="BatchNorm (training mode)")
plt.plot(sizes, [max(c, 1e-8) for c in change_gn], "s-", label="GroupNorm")
plt.xscale("log", base=2); plt.yscale("log")
plt.xlabel("batch size"); plt.ylabel("max |change| of image 0's output")
plt.title("Same image, different batch mates"); plt.legend(); plt.tight_layout()
plt.show()

# %% [markdown]
# GroupNorm's output for image 0 stays put: at most a float rounding difference of $10^{-5}$ (the
# kernel splits the work differently for one image), 0 elsewhere (the plot floors 0 at $10^{-8}$).
# BatchNorm's output changes by whole units, most of all in small batches.
#
# ## Downsample and Upsample
#
# The U-Net's Downsample is one convolution with kernel 3, stride 2 and padding 1 on every side.
# The VAE's pads only the right and bottom edge by one pixel and convolves without padding: the
# same output size, a different alignment (and so different numbers; `Downsample(c,
# asymmetric=True)`). Upsample doubles each pixel (nearest neighbour), then a 3×3 convolution.

# %%
x = torch.randn(1, 32, 16, 16)
down, vae_down, up = Downsample(32), Downsample(32, asymmetric=True), Upsample(32)
print("Downsample:          ", tuple(x.shape), "->", tuple(down(x).shape))
print("Downsample (the VAE):", tuple(x.shape), "->", tuple(vae_down(x).shape))
print("Upsample:            ", tuple(x.shape), "->", tuple(up(x).shape))
small = torch.arange(4.0).view(1, 1, 2, 2)
print("nearest x2 of [[0, 1], [2, 3]]:\n", F.interpolate(small, scale_factor=2.0, mode="nearest")[0, 0])

# %% [markdown]
# ```{admonition} The notes say the Upsample's convolution "changes the channel count" / 笔记说 Upsample 的卷积"改变 Latent Feature 的通道数"
# :class: warning
# Not in SD. Every Upsample convolution of SD 1.5's U-Net and VAE maps $C$ channels to the same
# $C$; the channel count changes in the ResNetBlocks, whose first convolution (and 1×1 skip
# convolution) go from $C_\text{in}$ to $C_\text{out}$. The cell below prints the weight shapes
# of every Upsample of the two modules built from SD 1.5's configs.
# ```

# %%
with torch.device("meta"):                                             # shapes only, no memory
    unet15, vae15 = minisd.UNet(minisd.UNetConfig.sd15()), minisd.AutoencoderKL(minisd.VAEConfig.sd15())
ups = [(f"U-Net up_blocks[{i}]", b.upsample) for i, b in enumerate(unet15.up_blocks) if b.upsample is not None]
ups += [(f"VAE decoder up_blocks[{i}]", b.upsample) for i, b in enumerate(vae15.decoder.up_blocks)
        if b.upsample is not None]
for name, u in ups:
    print(f"{name:28s} Upsample conv weight {tuple(u.conv.weight.shape)}  (out, in, kH, kW)")
assert all(u.conv.in_channels == u.conv.out_channels for _, u in ups) and len(ups) == 6

# %% [markdown]
# ## ResNetBlock
#
# With $h_1 = \mathrm{GSC}_1(x)$, the block adds a projection of the time embedding to every
# pixel of every channel, runs a second GSC, and adds the input back:
#
# $$ y = \mathrm{skip}(x) + \mathrm{GSC}_2\big(h_1 + W_t\,\mathrm{SiLU}(\mathrm{temb})\big), $$
#
# where $\mathrm{skip}$ is the identity, or a 1×1 convolution when the channel count changes.
# (diffusers has a dropout inside the second GSC; SD 1.x trains with $p = 0$, so minisd leaves
# it out.) The VAE uses the same block without a time embedding: `ResNetBlock(c_in, c_out,
# temb_channels=None, eps=1e-6)`.
#
# Here is one block at work on a course image, lifted to 32 channels by a 3×3 convolution:

# %%
_ = torch.manual_seed(0)
image = images[:1]
block = ResNetBlock(32, 64, temb_channels=128, groups=8)
temb_early, temb_late = torch.randn(1, 128), torch.randn(1, 128)
with torch.no_grad():
    x = lift(image)
    h1 = block.gsc1(x)
    out_early, out_late = block(x, temb_early), block(x, temb_late)
print("image", tuple(image.shape), "-> features", tuple(x.shape), "-> ResNetBlock", tuple(out_early.shape))
print(block)

rows = [("input features x", x), ("GSC_1(x)", h1), ("block(x, temb_a)", out_early),
        ("block(x, temb_b) - block(x, temb_a)", out_late - out_early)]
fig, axes = plt.subplots(len(rows), 7, figsize=(11, 6.4))
for r, (name, maps) in enumerate(rows):
    axes[r, 0].imshow(((image[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1))
    axes[r, 0].set_ylabel(name, fontsize=7)
    for c in range(6):
        axes[r, c + 1].imshow(maps[0, c], cmap="magma")
    for ax in axes[r]:
        ax.set_xticks([]); ax.set_yticks([])
fig.suptitle(f"{captions[0]!r}: six channels at each stage (random weights)")
plt.tight_layout()
plt.show()

# %% [markdown]
# The last row is the difference two time embeddings make to the block's output: a different
# shift on each channel, which the second GroupNorm and convolution turn into different
# feature maps. That is how one set of weights behaves differently at different steps.
#
# ## Skip connections are concatenated
#
# In the U-Net's decoder each ResNetBlock first concatenates, on channels, the feature map of the
# matching encoder level (the "skip"). The seed's example: a 1024-channel map from below and a
# 2048-channel skip make a 3072-channel input.

# %%
below, skip = torch.randn(1, 1024, 4, 4), torch.randn(1, 2048, 4, 4)   # the seed's channels, a small H x W
print(tuple(below.shape), "+", tuple(skip.shape), "->", tuple(torch.cat([below, skip], dim=1).shape))
with torch.device("meta"):                                             # instant: no memory, no init
    sd15 = minisd.UNet(minisd.UNetConfig.sd15())
widths = [(i, j, r.gsc1.norm.num_channels, r.gsc2.norm.num_channels)
          for i, b in enumerate(sd15.up_blocks) for j, r in enumerate(b.resnets)]
for i, j, cin, cout in widths:
    print(f"SD 1.5 up block {i}, ResNetBlock {j}: {cin:4d} channels in (after the concat) -> {cout:4d} out")

# %% [markdown]
# Every decoder ResNetBlock changes its channel count (e.g. 2560 → 1280), so every one has a 1×1
# convolution on its {term}`skip connection` path.
#
# ## Ours == diffusers'
#
# diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D` with the same weights. Our
# ResNetBlock names its two halves after the seed (`gsc1.norm`, `gsc1.conv`, ...); the key map
# in `minisd.weights` renames diffusers' `norm1`, `conv1`, ... to them.

# %%
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from minisd.weights import unet_key

_ = torch.manual_seed(0)
theirs = ResnetBlock2D(in_channels=320, out_channels=640, temb_channels=1280, eps=1e-5).eval()  # as the U-Net builds it
ours = ResNetBlock(320, 640, temb_channels=1280).eval()
prefix = "down_blocks.1.resnets.0."
ours.load_state_dict({unet_key(prefix + k)[len(prefix):]: v for k, v in theirs.state_dict().items()})
x, temb = torch.randn(2, 320, 16, 16), torch.randn(2, 1280)
with torch.no_grad():
    print(f"ResNetBlock 320 -> 640: max |diff| = {(ours(x, temb) - theirs(x, temb)).abs().max():.1e}")
    their_down, their_up = Downsample2D(640, use_conv=True, padding=1, name="conv"), Upsample2D(640, use_conv=True)
    down, up = Downsample(640), Upsample(640)
    down.conv.load_state_dict(their_down.conv.state_dict())
    up.conv.load_state_dict(their_up.conv.state_dict())
    h = ours(x, temb)
    print(f"Downsample: max |diff| = {(down(h) - their_down(h)).abs().max():.1e}")
    print(f"Upsample: max |diff| = {(up(h) - their_up(h)).abs().max():.1e}")

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 2.1 (★)** Feed a 33×33 map to the U-Net's `Downsample` and to the VAE's
# (`asymmetric=True`). What sizes come out, and why do they differ? (Use
# $\lfloor (n + p_\text{total} - 3)/2 \rfloor + 1$.) Does the VAE's still read the last input row?

# %% tags=["solution", "hide-cell"]
odd = torch.randn(1, 1, 33, 33)
sym, asym = Downsample(1)(odd), Downsample(1, asymmetric=True)(odd)
print("U-Net Downsample (pad 1 each side):", tuple(sym.shape[-2:]), "= floor((33 + 2 - 3) / 2) + 1")
print("VAE Downsample (pad right/bottom 1):", tuple(asym.shape[-2:]), "= floor((33 + 1 - 3) / 2) + 1")
probe = Downsample(1, asymmetric=True)
with torch.no_grad():
    probe.conv.weight.fill_(1.0)
    probe.conv.bias.zero_()
    last_row = torch.zeros(1, 1, 33, 33)
    last_row[..., 32, :] = 1.0                                  # only the last real row is non-zero
    print("VAE Downsample of a map whose last row alone is 1: output's last row sums to",
          probe(last_row)[0, 0, -1].sum().item())
# windows start at rows 0, 2, ..., 30 and cover rows 0..32: every real row is read, the added
# padding row 33 never; the U-Net's padded map is 35 rows, so one more window fits
assert tuple(sym.shape[-2:]) == (17, 17) and tuple(asym.shape[-2:]) == (16, 16)
assert probe(last_row)[0, 0, -1].sum() > 0
# at the even sizes SD uses the two agree
assert Downsample(1)(torch.randn(1, 1, 64, 64)).shape == Downsample(1, asymmetric=True)(torch.randn(1, 1, 64, 64)).shape

# %% [markdown]
# **Exercise 2.2 (★★, break it and watch)** Put BatchNorm into a ResNetBlock: replace the
# GroupNorms of `ResNetBlock(32, 32, groups=8)` by `nn.BatchNorm2d(32)` (training mode, as it
# would be while training). Run image 0 of the lifted course features alone, in a batch of 8, and
# in a batch of 64, and measure how much its output changes; then do the same with the GroupNorm
# block. A sampler runs batch 1 (or 2 with guidance): what would a BatchNorm U-Net do there?

# %% tags=["solution", "hide-cell"]
torch.manual_seed(0)
gn_block = ResNetBlock(32, 32, groups=8).eval()
bn_block = ResNetBlock(32, 32, groups=8)
bn_block.load_state_dict(gn_block.state_dict())          # the same convolutions and affine weights
bn_block.gsc1.norm, bn_block.gsc2.norm = nn.BatchNorm2d(32).train(), nn.BatchNorm2d(32).train()
with torch.no_grad():
    feats64 = lift(images)                                 # (64, 32, 32, 32)
    change = {}
    for name, blk in (("GroupNorm", gn_block), ("BatchNorm", bn_block)):
        alone = blk(feats64[:1])[0]
        change[name] = [(blk(feats64[:n])[0] - alone).abs().max().item() for n in (8, 64)]
        print(f"{name}: image 0's output changes by {change[name][0]:.2e} (batch 8), "
              f"{change[name][1]:.2e} (batch 64) against running it alone")
# with BatchNorm a generated image would depend on its batch mates; in a batch of one its
# statistics are that one image's, which is not what it was trained with
assert max(change["GroupNorm"]) < 1e-4 and min(change["BatchNorm"]) > 0.1

# %% [markdown]
# **Exercise 2.3 (★★)** The time embedding enters a ResNetBlock as one number per channel added
# to every pixel. Check it: for `block` above and two embeddings $a, b$, compute
# $\mathrm{GSC}_1(x) + W_t\,\mathrm{SiLU}(\cdot)$ for each, and show that their difference is the
# same at every pixel of a channel and equals `block.time_proj(SiLU(a)) - block.time_proj(SiLU(b))`.

# %% tags=["solution", "hide-cell"]
with torch.no_grad():
    x = lift(image)
    h_a = block.gsc1(x) + block.time_proj(F.silu(temb_early))[:, :, None, None]
    h_b = block.gsc1(x) + block.time_proj(F.silu(temb_late))[:, :, None, None]
    gap = h_a - h_b                                                     # (1, 64, 32, 32)
    spread = (gap - gap.mean(dim=(-2, -1), keepdim=True)).abs().max().item()
    expected = block.time_proj(F.silu(temb_early)) - block.time_proj(F.silu(temb_late))
    d_shift = (gap[:, :, 0, 0] - expected).abs().max().item()
print(f"spread of the difference inside each channel: {spread:.1e}; "
      f"difference vs time_proj(a) - time_proj(b): {d_shift:.1e}")
assert spread < 1e-5 and d_shift < 1e-5

# %% [markdown]
# **Exercise 2.4 (★★★)** Count by formula the parameters of SD 1.5's widest decoder block,
# `ResNetBlock(2560, 1280, temb_channels=1280)`: two GroupNorms, two 3×3 convolutions, the time
# projection and the 1×1 skip. Check against the module, built on the meta device.

# %% tags=["solution", "hide-cell"]
c_in, c_out, c_t = 2560, 1280, 1280
formula = (2 * c_in + (9 * c_in * c_out + c_out)        # GroupNorm(c_in) + Conv3x3 c_in -> c_out
           + (c_t * c_out + c_out)                      # time_proj
           + 2 * c_out + (9 * c_out * c_out + c_out)    # GroupNorm(c_out) + Conv3x3 c_out -> c_out
           + (c_in * c_out + c_out))                    # the 1x1 skip convolution
with torch.device("meta"):
    widest = ResNetBlock(c_in, c_out, temb_channels=c_t)
counted = sum(p.numel() for p in widest.parameters())
print(f"by formula {formula:,}; counted {counted:,}")
assert formula == counted

# %% [markdown]
# ## What you built
#
# `minisd.resnet`'s `GSC`, `Downsample` (symmetric for the U-Net, `asymmetric=True` for the
# VAE), `Upsample` and `ResNetBlock`, equal to diffusers' `ResnetBlock2D`, `Downsample2D` and
# `Upsample2D`. You saw why SD normalises with GroupNorm (a sample's output does not depend on
# its batch), where the time embedding enters, and that channels change in ResNetBlocks, not in
# Upsamples. Chapter 3 adds the other half of the U-Net's blocks: attention.
