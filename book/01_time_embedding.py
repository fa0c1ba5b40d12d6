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
# # 1. The time embedding
#
# **You will build** the {term}`time embedding` of SD's U-Net: the 320-wide
# {term}`sinusoidal embedding` `minisd.embeddings.timestep_embedding`, and the small MLP
# `minisd.embeddings.TimestepEmbedding` that lifts it to the 1280 numbers every
# {term}`ResNetBlock` receives; and you will prove why sinusoids encode *differences* of time.
#
# The {term}`U-Net` is called once per denoising step, always with the same weights. The only thing
# that tells it *which* step it is at, how much noise is left in the latent, is the timestep
# $t \in \{0, \dots, 999\}$. A single integer is a poor input for a neural network, so SD turns
# it into a vector of 320 sinusoids, the same trick the Transformer paper used for token
# positions {cite}`vaswani2017attention`, and the DDPM paper {cite}`ho2020ddpm` for timesteps.
#
# This chapter builds that vector, then the small MLP that lifts it to the 1280 numbers every
# ResNetBlock of the U-Net receives.

# %%
# %matplotlib inline
import math

import matplotlib.pyplot as plt
import torch

import minisd
from minisd.embeddings import TimestepEmbedding, timestep_embedding

_ = torch.manual_seed(0)

# %% [markdown]
# ## Sinusoids at geometric frequencies
#
# With an embedding width $d$ and $h = d/2$, frequency $i$ is
#
# $$ f_i = \exp\!\left(-\ln(10000)\,\frac{i}{h}\right) = 10000^{-i/h}, \qquad i = 0, \dots, h-1, $$
#
# so the frequencies fall geometrically from 1 to almost $1/10000$. The embedding is
#
# $$ e(t) = \big[\cos(t f_0), \dots, \cos(t f_{h-1}),\; \sin(t f_0), \dots, \sin(t f_{h-1})\big]. $$
#
# The fast components change at every step; the slow ones tell early from late. Every $t$ gets
# a distinct vector, and nearby $t$ get similar vectors. Here it is by hand for $d = 8$:

# %%
d, half = 8, 4
freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
print("frequencies:", freqs)
t = torch.tensor([0, 1, 500, 999])
args = t[:, None].float() * freqs[None]           # (4, 1) * (1, 4) -> (4, 4)
by_hand = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
print("e(t) for t = 0, 1, 500, 999:\n", by_hand)
print("minisd gives the same:", torch.equal(by_hand, timestep_embedding(t, d)))

# %% [markdown]
# ## Why sinusoids: a dot product that only sees $t_1 - t_2$
#
# Take one frequency $f$ and its two components $(\cos tf, \sin tf)$. By the angle-difference
# formula,
#
# $$ \cos(t_1 f)\cos(t_2 f) + \sin(t_1 f)\sin(t_2 f) = \cos\big((t_1 - t_2) f\big), $$
#
# so, summing over the $h$ frequencies,
#
# $$ e(t_1) \cdot e(t_2) = \sum_{i=0}^{h-1} \cos\big((t_1 - t_2) f_i\big), $$
#
# a function of the difference $t_1 - t_2$ alone. The reason is that moving from $t$ to $t + \Delta$
# *rotates* each $(\cos, \sin)$ pair by the angle $\Delta f_i$:
#
# $$ \begin{pmatrix}\cos (t+\Delta) f_i \\ \sin (t+\Delta) f_i\end{pmatrix}
#    = \begin{pmatrix}\cos \Delta f_i & -\sin \Delta f_i \\ \sin \Delta f_i & \cos \Delta f_i\end{pmatrix}
#      \begin{pmatrix}\cos t f_i \\ \sin t f_i\end{pmatrix}, $$
#
# a fixed linear map $R_\Delta$ that does not depend on $t$; rotations preserve dot products.
# In particular $\lVert e(t)\rVert^2 = h$ for every $t$. Checked on a grid of pairs, at $d = 320$:

# %%
h320 = 160
f320 = torch.exp(-math.log(10000) * torch.arange(h320, dtype=torch.float64) / h320)
grid = torch.arange(0, 1000, 37)                                   # 28 timesteps -> 784 pairs
e_grid = timestep_embedding(grid, 320).double()
dots = e_grid @ e_grid.T                                            # e(t1) . e(t2) for every pair
diff = (grid[:, None] - grid[None, :]).double()
formula = torch.cos(diff[..., None] * f320).sum(-1)                 # sum_i cos((t1 - t2) f_i)
print(f"{len(grid) ** 2} pairs: max |e(t1).e(t2) - sum cos((t1-t2) f_i)| = {(dots - formula).abs().max():.2e}")
# the same difference at different places gives the same dot product:
for t1, t2 in [(0, 100), (300, 400), (899, 999)]:
    pair = timestep_embedding(torch.tensor([t1, t2]), 320).double()
    print(f"e({t1}) . e({t2}) = {(pair[0] @ pair[1]).item():.4f}")
# the rotation: e(t + Delta) = R_Delta e(t), with R_Delta built from Delta alone
delta, t_some = 25, torch.tensor([3, 250, 700])
e_t, e_shift = timestep_embedding(t_some, 320).double(), timestep_embedding(t_some + delta, 320).double()
c, s_ = torch.cos(delta * f320), torch.sin(delta * f320)
rotated = torch.cat([c * e_t[:, :h320] - s_ * e_t[:, h320:], s_ * e_t[:, :h320] + c * e_t[:, h320:]], dim=-1)
print(f"max |e(t + 25) - R_25 e(t)| = {(rotated - e_shift).abs().max():.2e};  |e(t)|^2 =",
      [round(v, 3) for v in (e_t ** 2).sum(-1).tolist()])
assert (dots - formula).abs().max() < 1e-3          # float32 embeddings of t up to 999
assert (rotated - e_shift).abs().max() < 1e-3
assert torch.allclose((e_t ** 2).sum(-1), torch.full((3,), 160.0, dtype=torch.float64), atol=1e-3)

# %% [markdown]
# The residuals are float32 rounding of $t f_i$ for $t$ up to 999; in exact arithmetic they
# are 0. A network that reads $e(t)$ through a linear layer can therefore express "how far
# apart" two timesteps are with the same weights everywhere on the time axis.
#
# At $t = 0$ every cosine is 1 and every sine is 0. **Order.** The seed's code concatenates
# `[cos, sin]`, and so does the real SD 1.5. diffusers' `get_timestep_embedding` builds
# `[sin, cos]` by default and swaps the halves when `flip_sin_to_cos=True`, which is what
# SD 1.5's `unet/config.json` sets (`"flip_sin_to_cos": true`, `"freq_shift": 0`). A model
# trained with one order gives nonsense with the other, so the order matters.
#
# ## The embedding as an image
#
# SD 1.5 uses $d = 320$ (the width of the U-Net's first level). Each row below is one
# timestep, each column one of the 320 features.

# %%
ts = torch.arange(1000)
emb = timestep_embedding(ts, 320)
print("embedding of all 1000 timesteps:", tuple(emb.shape))

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
im = ax0.imshow(emb, aspect="auto", cmap="RdBu", interpolation="nearest")
ax0.set(xlabel="feature (160 cosines, then 160 sines)", ylabel="timestep t", title="e(t), d = 320")
fig.colorbar(im, ax=ax0)
sim = emb @ emb.T / 160                               # cosine similarity: every e(t) has norm sqrt(160)
im = ax1.imshow(sim, cmap="viridis")
ax1.set(xlabel="timestep", ylabel="timestep", title="cosine similarity e(t)·e(s)")
fig.colorbar(im, ax=ax1)
plt.tight_layout()
plt.show()

# %% [markdown]
# On the left, the first columns (high frequencies) flicker from row to row, while the last
# columns of each half barely change over 1000 steps. On the right, each timestep is most
# similar to its neighbours and the similarity fades with distance: the network can read both
# "exactly which step" and "roughly how far along".
#
# ## The learned part: Linear, SiLU, Linear
#
# The fixed sinusoids then go through a small MLP, 320 → 1280 → 1280, trained with the rest
# of the U-Net ({term}`SiLU` in the middle):
#
# $$ \mathrm{temb}(t) = W_2\,\mathrm{SiLU}(W_1 e(t) + b_1) + b_2, \qquad \mathrm{SiLU}(x) = x\,\sigma(x). $$

# %%
mlp = TimestepEmbedding(320, 1280)
temb = mlp(timestep_embedding(torch.tensor([981, 1]), 320))
print(mlp)
print("temb:", tuple(temb.shape), "  parameters:", sum(p.numel() for p in mlp.parameters()))

# %% [markdown]
# ## Why every ResNetBlock gets t
#
# The U-Net of chapter 4 has 22 ResNetBlocks, and each one adds a projection of this 1280-wide
# vector to its feature maps (chapter 2 shows where). The seed notes explain why it is
# everywhere and not just at the input: denoising is a different job at different steps.
# Early steps (large $t$, almost pure noise) must lay down the overall layout and outlines;
# late steps (small $t$) only sharpen high-frequency detail. Feeding $t$ into every block lets
# each level of the network switch between these jobs, at every resolution.
#
# The vectors a block receives early and late are different, even with random weights; here are
# the first six of the 1280 numbers at $t = 981$ and $t = 1$:

# %%
print("temb(981)[:6] =", temb[0, :6].detach())
print("temb(1)[:6]   =", temb[1, :6].detach())

# %% [markdown]
# ## Ours == diffusers'
#
# The same weights in diffusers' `TimestepEmbedding`, and diffusers' `get_timestep_embedding`
# with SD's settings, give the same numbers:

# %%
from diffusers.models.embeddings import TimestepEmbedding as TheirTimestepEmbedding
from diffusers.models.embeddings import get_timestep_embedding

theirs = TheirTimestepEmbedding(320, 1280)
theirs.load_state_dict(mlp.state_dict())      # same key names: linear_1, linear_2
t = torch.tensor([0, 1, 250, 999])
e_theirs = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
with torch.no_grad():
    d_emb = (timestep_embedding(t, 320) - e_theirs).abs().max().item()
    d_mlp = (mlp(timestep_embedding(t, 320)) - theirs(e_theirs)).abs().max().item()
print(f"sinusoids: max |diff| = {d_emb:.1e}")
print(f"Linear-SiLU-Linear: max |diff| = {d_mlp:.1e}")
assert d_emb < 1e-5 and d_mlp < 1e-5

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 1.1 (★)** Why does the right panel above divide by 160? Show that every
# $e(t)$, $t = 0, \dots, 999$, has squared norm exactly $h = d/2$, and explain it in one line
# from the formula.

# %% tags=["solution", "hide-cell"]
norms = (timestep_embedding(torch.arange(1000), 320).double() ** 2).sum(-1)
print(f"|e(t)|^2 over all 1000 timesteps: min {norms.min():.5f}, max {norms.max():.5f}")
# each (cos, sin) pair has cos^2 + sin^2 = 1, and there are h = 160 pairs
assert torch.allclose(norms, torch.full_like(norms, 160.0), atol=1e-3)

# %% [markdown]
# **Exercise 1.2 (★★)** How many of the 160 frequencies of SD's embedding complete less than one
# full period over the 1000 training timesteps ($1000 f_i < 2\pi$)? What is the period of the
# slowest one, in timesteps? What does that say about the columns on the right of each half of
# the left image?

# %% tags=["solution", "hide-cell"]
periods = 2 * math.pi / f320                       # period of each frequency, in timesteps
slow = int((1000 * f320 < 2 * math.pi).sum())
print(f"{slow} of 160 frequencies turn less than once in 1000 steps; "
      f"the slowest has a period of {periods[-1]:,.0f} steps, the fastest {periods[0]:.2f}")
# those columns are nearly monotone over 0..999: they say "early or late", not "which step"
assert slow == int((periods > 1000).sum()) and 60 < slow < 80 and periods[-1] > 50_000

# %% [markdown]
# **Exercise 1.3 (★★)** Is $t \mapsto e(t)$ one-to-one on $\{0, \dots, 999\}$, and is each
# timestep's nearest neighbour (in Euclidean distance) always $t \pm 1$? Compute it for all
# 1000 timesteps.

# %% tags=["solution", "hide-cell"]
all_e = timestep_embedding(torch.arange(1000), 320).double()
dist = torch.cdist(all_e, all_e)
dist.fill_diagonal_(float("inf"))
nearest = dist.argmin(-1)
print(f"smallest distance between two different timesteps: {dist.min():.3f}")
print("nearest neighbour is t - 1 or t + 1 for every t:",
      bool(((nearest - torch.arange(1000)).abs() == 1).all()))
# by the rotation identity, |e(t1) - e(t2)|^2 = 2h - 2 sum_i cos((t1 - t2) f_i) depends on |t1 - t2| only
assert dist.min() > 1.0 and ((nearest - torch.arange(1000)).abs() == 1).all()

# %% [markdown]
# **Exercise 1.4 (★★, break it and watch)** The trained course U-Net (`minisd.checkpoint.course_unet()`,
# chapter 9) was trained with `[cos, sin]`. Feed it `[sin, cos]` instead, without touching
# `minisd`: wrap its `time_embedding` so that the two halves of its input are swapped. Measure its
# noise-prediction error $\lVert\hat\epsilon - \epsilon\rVert^2$ on 128 noised course latents
# (course VAE and course text encoder, random $t$), with the right order and with the swapped one.
# Then show that the swap changes *no* dot product between embeddings: what did the network
# actually lose?

# %% tags=["solution", "hide-cell"]
from torch import nn

from minisd import data
from minisd.diffusion import add_noise


class SwapHalves(nn.Module):
    """Feed `inner` [sin, cos] where it was trained on [cos, sin]."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, e):
        half = e.shape[-1] // 2
        return self.inner(torch.cat([e[..., half:], e[..., :half]], dim=-1))


vae, text_encoder, unet = minisd.checkpoint.course_vae(), minisd.checkpoint.course_text_encoder(), minisd.checkpoint.course_unet()
pictures, captions = data.sample(128, seed=11)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    z0 = vae.encode(data.to_tensor(pictures)).mean * vae.scaling_factor
    context = text_encoder(minisd.CLIPTokenizer.sd15()(captions))
    t_rand = torch.randint(0, 1000, (128,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    z_t = add_noise(z0, noise, t_rand)
    err_right = ((unet(z_t, t_rand, context) - noise) ** 2).mean().item()
    trained = unet.time_embedding
    unet.time_embedding = SwapHalves(trained)
    try:
        err_swapped = ((unet(z_t, t_rand, context) - noise) ** 2).mean().item()
    finally:
        unet.time_embedding = trained
e_cs = timestep_embedding(torch.arange(0, 1000, 50), 320)
e_sc = torch.cat([e_cs[:, 160:], e_cs[:, :160]], dim=-1)
print(f"noise-prediction MSE: [cos, sin] (as trained) {err_right:.4f}, [sin, cos] {err_swapped:.4f} "
      f"({err_swapped / err_right:.1f}x); predicting 0 would score 1.0")
print(f"dot products of the swapped embeddings: max |change| = {(e_sc @ e_sc.T - e_cs @ e_cs.T).abs().max():.1e}")
# The geometry is identical (a fixed permutation of coordinates), but the trained W_1 reads
# coordinate k as "cos of frequency k": after the swap every column of W_1 gets the wrong signal,
# and at t = 0 the MLP sees [0...0, 1...1] instead of [1...1, 0...0].
assert err_swapped > 3 * err_right

# %% [markdown]
# ## What you built
#
# `minisd.embeddings.timestep_embedding(t, 320)`, the fixed `[cos, sin]` sinusoids at
# geometric frequencies, equal to diffusers' `get_timestep_embedding(flip_sin_to_cos=True)`,
# and `TimestepEmbedding`, the trained Linear-SiLU-Linear that lifts it to 1280 numbers. You
# proved that the embedding's dot products depend only on $t_1 - t_2$ (each step is a rotation)
# and saw a trained U-Net lose most of its accuracy when the halves are swapped. Chapter 2
# builds the {term}`ResNetBlock` that adds this vector to every feature map.
