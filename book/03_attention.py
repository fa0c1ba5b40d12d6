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
# # 3. Attention
#
# ResNetBlocks see a 3×3 neighbourhood at a time. Attention lets every position look at every
# other position, and, in SD, at the words of the prompt. The U-Net's attention lives in
# **SpatialTransformer** blocks, each holding one **BasicTransformerBlock**:
# SelfAttention, then CrossAttention, then a FeedForward, each with a LayerNorm before it and
# a residual around it. The design is the Transformer's (Vaswani et al., 2017); putting it
# inside a U-Net with text as keys and values is Latent Diffusion's (Rombach et al., 2022).

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
# computed separately in each of $h$ heads of width $d_h = d / h$, then concatenated and
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
# ## FeedForward with GEGLU
#
# After attention, each token goes through a two-layer MLP on its own. SD's uses a GELU-gated
# linear unit (Shazeer, 2020): one Linear produces two halves $a, b$ of width $4d$,
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
