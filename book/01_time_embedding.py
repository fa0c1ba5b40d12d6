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
# # 1. The time embedding
#
# The U-Net is called once per denoising step, always with the same weights. The only thing
# that tells it *which* step it is at, how much noise is left in the latent, is the timestep
# $t \in \{0, \dots, 999\}$. A single integer is a poor input for a neural network, so SD turns
# it into a vector of 320 sinusoids, the same trick the Transformer paper used for token
# positions (Vaswani et al., 2017), and the DDPM paper (Ho et al., 2020) for timesteps.
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
# of the U-Net:
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
