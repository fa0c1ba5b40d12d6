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
# # 3. Attention
#
# **You will build** `minisd.attention`'s `SelfAttention`, `CrossAttention`, `FeedForward`
# (GEGLU), `BasicTransformerBlock` and `SpatialTransformer`, each equal to diffusers'; and you
# will measure why attention divides by $\sqrt{d}$.
#
# ResNetBlocks see a 3×3 neighbourhood at a time. Attention lets every position look at every
# other position, and, in SD, at the words of the prompt. The U-Net's attention lives in
# **{term}`SpatialTransformer`** blocks, each holding one **{term}`BasicTransformerBlock`**:
# {term}`self-attention`, then {term}`cross-attention`, then a {term}`FeedForward`, each with a
# {term}`LayerNorm` {cite}`ba2016layernorm` before it and a residual around it. The design is the
# Transformer's {cite}`vaswani2017attention`; putting it inside a U-Net with text as keys and
# values is Latent Diffusion's {cite}`rombach2022ldm`.

# %%
# %matplotlib inline
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

import minisd
from minisd.attention import (BasicTransformerBlock, CrossAttention, FeedForward, SelfAttention,
                              SpatialTransformer)

_ = torch.manual_seed(0)

# %% [markdown]
# ## Scaled dot-product attention
#
# Tokens $x \in \mathbb{R}^{N \times d}$ are projected to queries $Q = xW_Q$; a context
# $c \in \mathbb{R}^{M \times d_c}$ to keys $K = cW_K$ and values $V = cW_V$. Each query takes a
# weighted average of the values, weighted by how well it matches each key:
#
# $$ \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d_h}}\right) V, $$
#
# computed separately in each of $h$ {term}`attention head`s of width $d_h = d / h$, then concatenated and
# projected by $W_O$. The weight matrix $\mathrm{softmax}(\cdot)$ is $N \times M$.
#
# - **SelfAttention**: the context is $x$ itself. Every pixel of the latent looks at every
#   other pixel: the model can make the left half of a face agree with the right half.
# - **CrossAttention**: $Q$ from the image tokens, $K$ and $V$ from the text, CLIP's
#   $77 \times 768$ embedding. Why this way round? The output must be one vector per *pixel*
#   (it is added back to the image features), so the pixels ask the questions; the prompt
#   supplies what can be answered. Each pixel pulls in the meaning of the words relevant to it.
#
# By hand, for 6 image tokens of width 8 and a 4-token context of width 5, with 2 heads:

# %%
x, context = torch.randn(1, 6, 8), torch.randn(1, 4, 5)
attn = CrossAttention(8, 5, heads=2)
q = attn.to_q(x).view(1, 6, 2, 4).transpose(1, 2)        # (B, N, d) -> (B, heads, N, d/heads)
k = attn.to_k(context).view(1, 4, 2, 4).transpose(1, 2)  # (B, M, d) -> (B, heads, M, d/heads)
v = attn.to_v(context).view(1, 4, 2, 4).transpose(1, 2)
weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)   # (1, 2, 6, 4)
out = attn.to_out((weights @ v).transpose(1, 2).reshape(1, 6, 8))
print("attention weights per head:", tuple(weights.shape), " each row sums to 1:", weights.sum(-1)[0, 0].detach())
print("output:", tuple(out.shape), "(one vector per image token)")
print(f"by hand vs minisd CrossAttention: max |diff| = {(out - attn(x, context)).abs().max():.1e}")

# %% [markdown]
# ### Why divide by $\sqrt{d_h}$
#
# Suppose the components of a query $q$ and a key $k$ are independent, with mean 0 and variance 1
# (roughly what LayerNorm'd inputs and a well-initialised projection give). Then
#
# $$ \mathbb E[q \cdot k] = \sum_{i=1}^{d_h} \mathbb E[q_i]\,\mathbb E[k_i] = 0, \qquad
#    \operatorname{Var}[q \cdot k] = \sum_{i=1}^{d_h} \mathbb E[q_i^2]\,\mathbb E[k_i^2] = d_h , $$
#
# so the logits' standard deviation grows like $\sqrt{d_h}$. Softmax of logits spread over a
# range of several units is nearly one-hot: one key takes almost all the weight, the others
# get almost none, and the gradient through the softmax,
# $\partial p_i / \partial s_j = p_i(\delta_{ij} - p_j)$, nearly vanishes. Dividing by
# $\sqrt{d_h}$ brings the variance back to 1 whatever the head width. Measured on random
# unit-variance queries and 77 keys (a prompt's length), at SD's head widths 40, 80 and 160 and
# a few others:

# %%
g = torch.Generator().manual_seed(0)
print(f"{'d_h':>5} {'Var[q.k]':>9} | {'top weight, unscaled':>21} {'entropy':>8} | {'top weight, /sqrt(d_h)':>22} {'entropy':>8}")
saturation = {}
for d_h in (8, 40, 80, 160, 640):
    qs, ks = torch.randn(256, d_h, generator=g), torch.randn(77, d_h, generator=g)
    logits_qk = qs @ ks.T
    row = [logits_qk.var().item()]
    for scale in (1.0, 1 / math.sqrt(d_h)):
        p = torch.softmax(scale * logits_qk, dim=-1)
        row += [p.max(-1).values.mean().item(), -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()]
    saturation[d_h] = row
    print(f"{d_h:5d} {row[0]:9.1f} | {row[1]:21.3f} {row[2]:8.3f} | {row[3]:22.3f} {row[4]:8.3f}")
print(f"uniform attention over 77 keys: top weight {1 / 77:.3f}, entropy ln 77 = {math.log(77):.3f}")
for d_h, (var, top_raw, ent_raw, top_scaled, ent_scaled) in saturation.items():
    assert 0.8 * d_h < var < 1.2 * d_h                   # Var[q.k] = d_h
    assert ent_scaled > 3.5 and top_scaled < 0.15        # scaled: the same spread at every width
assert saturation[160][1] > 0.8 and saturation[640][1] > 0.85   # unscaled: nearly one-hot

# %% [markdown]
# Without the scale, the wider the head the more one-hot the attention (at $d_h = 160$, SD's
# deepest level, a query puts most of its weight on a single key before any training); with it,
# the spread is the same at every width, and training decides how sharp each head becomes.
#
# The package never builds `weights` itself: it calls `F.scaled_dot_product_attention`, which
# computes the same result block by block. At a 64×64 latent, self-attention has
# $N = 4096$ tokens, and a full $8 \times 4096 \times 4096$ weight matrix per image would take
# 512 MiB; the fused kernel never holds it.
#
# ## An attention map you can read
#
# With random weights an attention map shows nothing, so here is one with weights chosen by
# hand. The "image" is four course shapes on black, one token per pixel holding its RGB colour;
# the "prompt" is five words, each embedded as the colour it names. With $W_Q = 4I$ and
# $W_K = W_V = W_O = I$, a pixel's query matches the word of its own colour best:

# %%
parts = [minisd.data.render(c, s, p) for c, s, p in [("red", "circle", "in the top left"),
         ("green", "square", "in the top right"), ("blue", "triangle", "in the bottom left"),
         ("yellow", "circle", "in the bottom right")]]
picture = np.clip(sum(part.astype(int) for part in parts), 0, 255).astype(np.uint8)   # (32, 32, 3)
image = minisd.data.to_tensor(picture[None])                       # (1, 3, 32, 32) in [-1, 1]
tokens = image.flatten(2).transpose(1, 2)                          # (1, 3, 32, 32) -> (1, 1024, 3)
words = ["black", "red", "green", "blue", "yellow"]
rgb = {"black": (0, 0, 0), **minisd.data.COLOURS}
text = torch.tensor([[rgb[w] for w in words]]) / 127.5 - 1         # (1, 5, 3): a 5-word "prompt"

cross = CrossAttention(3, 3, heads=1)
with torch.no_grad():
    for layer, scale in ((cross.to_q, 4.0), (cross.to_k, 1.0), (cross.to_v, 1.0), (cross.to_out, 1.0)):
        layer.weight.copy_(scale * torch.eye(3))
    cross.to_out.bias.zero_()
    q, k = cross.to_q(tokens), cross.to_k(text)
    maps = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(3), dim=-1)   # (1, 1024, 5): pixels x words
    out = cross(tokens, text)                                          # (1, 1024, 3)
print("attention weights:", tuple(maps.shape), " output:", tuple(out.shape))

fig, axes = plt.subplots(1, 7, figsize=(13, 2.4))
axes[0].imshow(picture); axes[0].set_title("image (queries)")
for i, w in enumerate(words):
    axes[i + 1].imshow(maps[0, :, i].view(32, 32), cmap="viridis", vmin=0, vmax=1)
    axes[i + 1].set_title(f"attention to {w!r}")
axes[6].imshow(((out[0].T.reshape(3, 32, 32).permute(1, 2, 0) + 1) / 2).clamp(0, 1))
axes[6].set_title("output")
for ax in axes:
    ax.set_xticks([]); ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# Each map lights up where its word applies, and the output rebuilds each pixel from the words'
# values. A trained SD U-Net learns projections that do this for meanings, not just colours
# (chapter 11 draws such maps for a real prompt).
#
# ```{admonition} The notes say self-attention "reduces the translation-invariance problem" / 笔记说 SelfAttention "还能减少平移不变性问题"
# :class: warning
# Self-attention without position information, as in SD's SpatialTransformer (no position
# embedding is added to the pixel tokens), is *permutation-equivariant*: permute the tokens and
# the output is permuted the same way. A shift of the image is one such permutation, so it is at
# least as translation-equivariant as a convolution. What it adds is reach, not less invariance:
# in one layer every pixel can draw on every other pixel, where a 3×3 convolution sees its
# neighbours. (Positions enter the U-Net through the convolutions' zero padding at the borders.)
# The cell below checks both equivariances on a SpatialTransformer.
# ```
#
# %%
torch.manual_seed(0)
sa, st_check = SelfAttention(32, heads=4).eval(), SpatialTransformer(32, 16, heads=4, groups=8).eval()
tok_x, perm = torch.randn(1, 64, 32), torch.randperm(64)
feat_x, words_c = torch.randn(1, 32, 8, 8), torch.randn(1, 5, 16)
with torch.no_grad():
    d_perm = (sa(tok_x[:, perm]) - sa(tok_x)[:, perm]).abs().max().item()
    shifted_x = torch.roll(feat_x, shifts=(3, 2), dims=(-2, -1))      # a circular shift of the map
    d_shift = (st_check(shifted_x, words_c) - torch.roll(st_check(feat_x, words_c), (3, 2), (-2, -1))).abs().max().item()
print(f"SelfAttention(permuted tokens) vs permuted SelfAttention(tokens): max |diff| = {d_perm:.1e}")
print(f"SpatialTransformer(shifted map) vs shifted SpatialTransformer(map): max |diff| = {d_shift:.1e}")
assert d_perm < 1e-5 and d_shift < 1e-5

# %% [markdown]
# ## FeedForward with GEGLU
#
# After attention, each token goes through a two-layer MLP on its own. SD's uses a GELU-gated
# linear unit ({term}`GEGLU`, {cite}`shazeer2020glu`; GELU is {cite}`hendrycks2016gelu`): one
# Linear produces two halves $a, b$ of width $4d$,
#
# $$ \mathrm{GEGLU}(x) = a \odot \mathrm{GELU}(b), \qquad [a, b] = xW + \beta, $$
#
# then Dropout ($p = 0$ in SD) and a Linear back to $d$.

# %%
ff = FeedForward(320)
print(ff)
print("tokens (2, 64, 320) ->", tuple(ff(torch.randn(2, 64, 320)).shape))

# %% [markdown]
# ## BasicTransformerBlock and SpatialTransformer
#
# $$ x \leftarrow x + \mathrm{SelfAttn}(\mathrm{LN}_1(x)), \quad
#    x \leftarrow x + \mathrm{CrossAttn}(\mathrm{LN}_2(x), c), \quad
#    x \leftarrow x + \mathrm{FF}(\mathrm{LN}_3(x)). $$
#
# The SpatialTransformer wraps it for feature maps: GroupNorm, a 1×1 convolution (`proj_in`),
# the H·W pixels as tokens, the block, back to a map, another 1×1 convolution (`proj_out`),
# plus the input. Shape in equals shape out. At SD 1.5's first level (320 channels, 8 heads of
# 40) with a 77×768 text context:

# %%
st = SpatialTransformer(320, 768, heads=8)
feat, text = torch.randn(2, 320, 8, 8), torch.randn(2, 77, 768)
with torch.no_grad():
    y = st(feat, text)
print("SpatialTransformer:", tuple(feat.shape), "+ context", tuple(text.shape), "->", tuple(y.shape))
print("  of which:", {name: sum(p.numel() for p in m.parameters())
                      for name, m in [("attn1 (self)", st.block.attn1), ("attn2 (cross)", st.block.attn2),
                                      ("ff", st.block.ff), ("whole", st)]})
print("  cross-attention K, V project 768 -> 320:", tuple(st.block.attn2.to_k.weight.shape))

# %% [markdown]
# ## Ours == diffusers'
#
# diffusers' `Attention`, `FeedForward`, `BasicTransformerBlock` and `Transformer2DModel` with
# the same weights, renamed through `minisd.weights`' U-Net key map (our block is `block`
# where theirs is `transformer_blocks.0`, `to_out` where theirs is `to_out.0`, `ff.geglu.proj`
# / `ff.out` where theirs is `ff.net.0.proj` / `ff.net.2`):

# %%
from diffusers.models.attention import BasicTransformerBlock as TheirBlock
from diffusers.models.attention import FeedForward as TheirFeedForward
from diffusers.models.attention_processor import Attention
from diffusers import Transformer2DModel

from minisd.weights import unet_key


def load_renamed(ours, theirs, prefix):
    """Copy diffusers' weights into ours through the U-Net key map (`prefix` places the module)."""
    ours_prefix = unet_key(prefix + "x")[:-1]
    ours.load_state_dict({unet_key(prefix + k)[len(ours_prefix):]: v for k, v in theirs.state_dict().items()})


torch.manual_seed(0)
T = "down_blocks.0.attentions.0."
x, text, feat = torch.randn(2, 64, 320), torch.randn(2, 77, 768), torch.randn(2, 320, 8, 8)
pairs = [
    ("SelfAttention", SelfAttention(320, 8), Attention(320, heads=8, dim_head=40), T + "transformer_blocks.0.attn1.",
     lambda m: m(x), lambda m: m(x)),
    ("CrossAttention", CrossAttention(320, 768, 8), Attention(320, 768, heads=8, dim_head=40),
     T + "transformer_blocks.0.attn2.", lambda m: m(x, text), lambda m: m(x, encoder_hidden_states=text)),
    ("FeedForward", FeedForward(320), TheirFeedForward(320, activation_fn="geglu"), T + "transformer_blocks.0.ff.",
     lambda m: m(x), lambda m: m(x)),
    ("BasicTransformerBlock", BasicTransformerBlock(320, 768, 8),
     TheirBlock(320, 8, 40, cross_attention_dim=768, activation_fn="geglu"), T + "transformer_blocks.0.",
     lambda m: m(x, text), lambda m: m(x, encoder_hidden_states=text)),
    ("SpatialTransformer", SpatialTransformer(320, 768, 8),
     Transformer2DModel(num_attention_heads=8, attention_head_dim=40, in_channels=320, cross_attention_dim=768),
     T, lambda m: m(feat, text), lambda m: m(feat, encoder_hidden_states=text).sample),
]
with torch.no_grad():
    for name, ours, theirs, prefix, run_ours, run_theirs in pairs:
        load_renamed(ours, theirs, prefix)
        d = (run_ours(ours.eval()) - run_theirs(theirs.eval())).abs().max().item()
        print(f"{name:22s} max |diff| = {d:.1e}")
        assert d < 1e-4

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 3.1 (★)** SD 1.5's U-Net has 8 heads at every attention level. What is the head
# width $d_h$ at each of its three attention levels, and by how much does $1/\sqrt{d_h}$ shrink the
# logits there? Read it from the module built at SD 1.5's config (meta device).

# %% tags=["solution", "hide-cell"]
with torch.device("meta"):
    unet15 = minisd.UNet(minisd.UNetConfig.sd15())
head_widths = []
for i, b in enumerate(unet15.down_blocks):
    if hasattr(b, "attentions"):
        a1 = b.attentions[0].block.attn1
        width = a1.to_q.out_features // a1.heads
        head_widths.append(width)
        print(f"down_blocks[{i}]: {a1.to_q.out_features} channels / {a1.heads} heads = d_h {width}, "
              f"logits x 1/sqrt(d_h) = x {1 / math.sqrt(width):.3f}")
assert head_widths == [40, 80, 160]

# %% [markdown]
# **Exercise 3.2 (★★, break it and watch)** Drop the $1/\sqrt{d_h}$ in a *trained* model. The
# course U-Net (`minisd.checkpoint.course_unet()`, chapter 9) calls `F.scaled_dot_product_attention`, which
# takes a `scale=` argument. Temporarily replace that function with one that passes `scale=1.0`,
# and compare the U-Net's noise-prediction error on 128 noised course latents (course VAE, course
# text encoder, random $t$) with and without the scale. Restore the function afterwards.

# %% tags=["solution", "hide-cell"]
import torch.nn.functional as F

from minisd import data
from minisd.diffusion import add_noise

vae, text_encoder, unet = minisd.checkpoint.course_vae(), minisd.checkpoint.course_text_encoder(), minisd.checkpoint.course_unet()
print("course U-Net head widths:", [c // h for c, h in zip(unet.config.block_channels, unet.config.heads)])
pictures, captions = data.sample(128, seed=11)
g = torch.Generator().manual_seed(0)
sdpa = F.scaled_dot_product_attention


def sdpa_unscaled(q, k, v, *args, **kwargs):
    return sdpa(q, k, v, *args, **{**kwargs, "scale": 1.0})


with torch.no_grad():
    z0 = vae.encode(data.to_tensor(pictures)).mean * vae.scaling_factor
    ctx = text_encoder(minisd.CLIPTokenizer.sd15()(captions))
    t_rand = torch.randint(0, 1000, (128,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    z_t = add_noise(z0, noise, t_rand)
    err_scaled = ((unet(z_t, t_rand, ctx) - noise) ** 2).mean().item()
    F.scaled_dot_product_attention = sdpa_unscaled
    try:
        err_unscaled = ((unet(z_t, t_rand, ctx) - noise) ** 2).mean().item()
    finally:
        F.scaled_dot_product_attention = sdpa
print(f"noise-prediction MSE with 1/sqrt(d_h): {err_scaled:.4f}; without: {err_unscaled:.4f} "
      f"({err_unscaled / err_scaled:.2f}x)")
# The logits grow by sqrt(d_h) = sqrt(16) = 4: attention sharpens, the features the trained layers expect
# change, and every prediction gets worse. (The residual paths around attention limit the damage.)
assert F.scaled_dot_product_attention is sdpa and err_unscaled > 1.1 * err_scaled

# %% [markdown]
# **Exercise 3.3 (★★)** Does cross-attention know the *order* of the words? Permute the 77 context
# vectors (keys and values together) given to a `CrossAttention` and compare outputs. Where, then,
# does word order enter SD at all?

# %% tags=["solution", "hide-cell"]
torch.manual_seed(0)
ca = CrossAttention(320, 768, heads=8).eval()
pixels, words = torch.randn(1, 64, 320), torch.randn(1, 77, 768)
shuffle = torch.randperm(77)
with torch.no_grad():
    d_order = (ca(pixels, words[:, shuffle]) - ca(pixels, words)).abs().max().item()
print(f"CrossAttention with the 77 context vectors shuffled: max |diff| = {d_order:.1e}")
# attention sums over keys: order does not matter. Word order enters earlier, in CLIP's text encoder
# (position embeddings and the causal mask, chapter 7), which writes it into the 77 vectors themselves.
assert d_order < 1e-5

# %% [markdown]
# **Exercise 3.4 (★★)** The full attention weight matrix of one self-attention layer at SD 1.5's
# first level is $8 \times N \times N$ floats with $N = (H/8)(W/8)$ latent pixels. How many MiB is it
# in fp32 for a 512×512 image, and for 768×768? By what power of the side length does it grow?

# %% tags=["solution", "hide-cell"]
sizes_mib = {}
for px in (512, 768, 1024):
    n_tok = (px // 8) ** 2
    sizes_mib[px] = 8 * n_tok ** 2 * 4 / 2**20
    print(f"{px}x{px} px: N = {n_tok:,} tokens, 8 heads x N x N x 4 bytes = {sizes_mib[px]:,.0f} MiB per image")
# N grows with the side squared, so N^2 with the fourth power: 1.5x the side is 5.06x the memory
assert sizes_mib[512] == 512 and abs(sizes_mib[768] / sizes_mib[512] - 1.5 ** 4) < 1e-9

# %% [markdown]
# ## What you built
#
# `minisd.attention`: `SelfAttention` and `CrossAttention` (scaled dot-product attention in
# heads, through `F.scaled_dot_product_attention`), `FeedForward` with GEGLU,
# `BasicTransformerBlock` (self-attention, cross-attention, feed-forward, each pre-LayerNorm
# with a residual) and `SpatialTransformer`, which runs it on a feature map; all equal to
# diffusers'. You checked why the logits are divided by $\sqrt{d_h}$ and that attention is
# equivariant to permutations of its tokens. Chapter 4 assembles these and chapter 2's blocks
# into the U-Net.
