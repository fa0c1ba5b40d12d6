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
# # 11. The full pipeline
#
# **You will build** `minisd.StableDiffusion`, the text-to-image pipeline: prompt → tokens →
# context, a guided sampling loop, and the VAE decoder, with seeds, batches, negative prompts
# and img2img (`StableDiffusion.img2img`); you will measure where its cross-attention looks,
# load real SD 1.x weights with `from_pretrained`, and match diffusers' pipeline number for number.
#
# Every part is built: the tokenizer and text encoder (chapters 7-8), the U-Net (1-4), the VAE
# (5-6) and the samplers (9-10). This chapter joins them into `minisd.StableDiffusion`, the
# object that turns a prompt into an image, loads the real SD 1.x weights, and gives the same
# images as diffusers' `StableDiffusionPipeline`.
#
# The whole algorithm, with {term}`classifier-free guidance` {cite:p}`ho2022cfg` at
# {term}`guidance scale` $s$ and the empty prompt $\varnothing$:
#
# $$
# \begin{aligned}
# c &= \mathrm{CLIP}(\text{prompt}), \quad c_\varnothing = \mathrm{CLIP}(\text{""}) &&\text{(77 x 768 each)}\\
# x_T &\sim \mathcal N(0, I) \cdot \sigma_{\text{init}} &&\text{(4 x 64 x 64)}\\
# \hat\epsilon_t &= \epsilon_\theta(x_t, t, c_\varnothing) + s\,\big(\epsilon_\theta(x_t, t, c) - \epsilon_\theta(x_t, t, c_\varnothing)\big) &&\text{for each sampler timestep } t\\
# x_{t'} &= \mathrm{step}(\hat\epsilon_t, t, x_t) &&\text{(DDIM, PNDM, Euler, ...)}\\
# \text{image} &= \mathrm{clamp}\big(D(x_0 / 0.18215)/2 + 1/2,\; 0, 1\big)
# \end{aligned}
# $$
#
# The two U-Net calls of a step run as one batch of two. `0.18215` is the VAE's scaling factor
# (chapter 5): the U-Net was trained on latents scaled to unit variance.

# %%
import os
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import minisd
from minisd import StableDiffusion, checkpoint
from minisd.schedulers import make_scheduler

_ = torch.manual_seed(0)

# %% [markdown]
# ## The model
#
# The course's own model: the VAE of chapter 6, the text encoder of chapter 8 and the U-Net of
# chapter 9, all trained on 32x32 images of coloured shapes with captions such as "a red circle
# in the top left". `StableDiffusion.course_model()` reads its three checkpoints from `data/`;
# it runs on any CPU in a second or so per image. Its defaults (sampler, steps, guidance) are
# stored in the U-Net checkpoint and were chosen by a measurement, `python -m minisd evaluate
# --set-default`: among guidance 1.5, 2, 3 and 4 with 25 DDIM steps, the scale whose images
# have the highest mean fidelity (chapter 12's pixel measure) while colour, shape and position
# are all right at least 99 % of the time, on all 90 prompts x 4 seeds. Its latents are
# 4 x 8 x 8 (the course VAE downsamples by 4, not 8).

# %%
pipe = StableDiffusion.course_model()
print(f"defaults: {pipe.scheduler}, {pipe.steps} steps, guidance {pipe.guidance:g}")
print("chosen by:", checkpoint.checkpoint_metadata(checkpoint.course_path("unet"))["sampling_criterion"])
prompt = "a red circle in the top left"
print(pipe)

# %% [markdown]
# ## Step by step
#
# First the text. The tokenizer pads every prompt to 77 ids with `<|endoftext|>` (49407); the
# text encoder reads all 77 (SD uses no attention mask), and its last layer, after the final
# LayerNorm, is the context every cross-attention of the U-Net reads.

# %%
ids = pipe.tokenizer([prompt, ""])                      # cond and the empty prompt: (2, 77)
print("ids:", ids.shape, ids[0, :10].tolist())
with torch.no_grad():
    context = pipe.text_encoder(ids)                    # (2, 77, width)
context = torch.cat([context[1:], context[:1]])        # diffusers' order: [uncond, cond]
print("context:", context.shape)

# %% [markdown]
# Then the loop. The sampler decides the timesteps and the update; the pipeline only asks it to
# scale the input (Euler does, the others do not) and to take a step. Each step we also keep
# the sampler's current guess of the clean latent, $\hat x_0$, to watch the image appear.

# %%
steps, guidance = pipe.steps, pipe.guidance
sched = make_scheduler(pipe.scheduler)
sched.set_timesteps(steps)
f = pipe.vae.config.factor
size = pipe.unet.config.sample_size                     # latent side the model was trained at
x_T = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
x = x_T * sched.init_noise_sigma
guesses = []
with torch.no_grad():
    for t in sched.timesteps:
        eps_uncond, eps_cond = pipe.unet(sched.scale_model_input(torch.cat([x, x]), t), t, context).chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = sched.step(eps, t, x)
        guesses.append(sched.pred_x0)
    by_hand = pipe.decode(x)                            # (1, 3, H, W) in [0, 1]
print(f"{pipe.scheduler}, {steps} steps, guidance {guidance}: latents {tuple(x.shape)} -> image {tuple(by_hand.shape)}")

# %% [markdown]
# `StableDiffusion.__call__` is exactly this loop (plus batching, seeds, checks and a progress
# bar). Given the same starting noise, it gives the same image, bit for bit:

# %%
image = pipe(prompt, latents=x_T, output_type="np", progress=False)
print(f"max |diff| = {np.abs(image - by_hand.permute(0, 2, 3, 1).numpy()).max():.1e}")

# %%
show = np.linspace(0, len(guesses) - 1, 6).round().astype(int)
fig, axes = plt.subplots(1, 7, figsize=(14, 2.4))
with torch.no_grad():
    for ax, i in zip(axes, show):
        ax.imshow(pipe.decode(guesses[i])[0].permute(1, 2, 0).numpy())
        ax.set_title(f"step {i + 1}: t = {int(sched.timesteps[i])}", fontsize=9)
axes[-1].imshow(image[0])
axes[-1].set_title("final image", fontsize=9)
for ax in axes:
    ax.axis("off")
fig.suptitle(f"the sampler's guess of the clean image along the way: \"{prompt}\"")
plt.show()

# %% [markdown]
# ## Prompts, seeds, batches, samplers
#
# A list of prompts runs as one batch. `seed` fixes the starting noise, drawn on the CPU so the
# same seed gives the same image on any device; the model has learned colour, shape and
# position from the captions, so each prompt changes what appears where.

# %%
prompts = ["a red circle in the top left", "a blue square in the center", "a green triangle in the bottom right",
           "a yellow circle in the bottom left", "a magenta square in the top right", "a cyan triangle in the center"]
images = pipe(prompts, seed=1, output_type="np", progress=False)
print("batch:", images.shape)
fig, axes = plt.subplots(1, 6, figsize=(13, 2.6))
for ax, im, title in zip(axes, images, prompts):
    ax.imshow(im)
    ax.set_title(title.removeprefix("a "), fontsize=8)
    ax.axis("off")
fig.suptitle("one batch, six prompts, seed 1")
plt.show()

# %% [markdown]
# One seed with a batch of four draws four different starting noises, so the same prompt gives
# four different pictures; here they differ only a little (the course images vary only by a small
# jitter of the shape's position) (the samplers of chapter 10 are all available too: `scheduler="pndm"`,
# `"euler"`, `"dpm++2m"`...):

# %%
seeds = pipe([prompt] * 4, seed=7, output_type="np", progress=False)   # one seed: a batch of 4 different noises
fig, axes = plt.subplots(1, 4, figsize=(7, 2.2))
for i, (ax, im) in enumerate(zip(axes, seeds)):
    ax.imshow(im)
    ax.set_title(f"seed 7, image {i}", fontsize=8)
    ax.axis("off")
fig.suptitle(f'"{prompt}"')
plt.show()

# %% [markdown]
# ## Negative prompts
#
# `negative_prompt` replaces the empty prompt $\varnothing$ in the guidance formula, so each step
# is pushed towards the prompt *and away from* the negative one:
# $\hat\epsilon = \epsilon_\theta(x_t, c_-) + s\,(\epsilon_\theta(x_t, c) - \epsilon_\theta(x_t, c_-))$.
# Here the prompt names only a shape and a place and leaves the colour open; the negative prompt
# rules one caption out.

# %%
open_prompt = "a circle in the center"
negatives = ["", "a red circle in the center", "a blue circle in the center"]
runs = [pipe([open_prompt] * 3, negative_prompt=neg, seed=4, output_type="np", progress=False) for neg in negatives]
fig, axes = plt.subplots(3, 3, figsize=(5.5, 6))
for row, (neg, ims) in enumerate(zip(negatives, runs)):
    for col, im in enumerate(ims):
        axes[row, col].imshow(im)
        axes[row, col].axis("off")
    axes[row, 1].set_title(f"negative: \"{neg}\"" if neg else "no negative prompt", fontsize=9)
fig.suptitle(f'"{open_prompt}", seed 4')
plt.show()

# %% [markdown]
# The model never saw a caption without a colour; given one, it drew reddish-magenta circles.
# Ruling out "a red circle in the center" moved the pictures away from that whole caption (they
# became squares, still reddish), and ruling out "a blue circle" turned them magenta. A negative
# prompt is a direction in the guidance formula, pushing away from everything the caption encodes,
# not a rule that forbids one word.

# %% [markdown]
# ## img2img
#
# SDEdit {cite:p}`meng2022sdedit`: encode an existing image, noise it to a timestep part of the way up
# the chain, and run only the rest of the loop. With `strength` $= 0.6$ and 25 steps, the first
# 10 steps are skipped and the latent starts at the 11th timestep, noised accordingly. Low
# strength keeps the picture; high strength keeps only its rough layout. The start here is a
# real image from the course data (`minisd.data.sample`), and the prompt asks for something else.
# On this small model, strength 0.3 keeps the place but not the colour or the exact shape, and
# from 0.6 up the prompt wins entirely: a blue square in the center.

# %%
start, captions = minisd.data.sample(1, seed=3)
strengths = [0.0, 0.3, 0.6, 0.9]
edits = [pipe.img2img("a blue square in the center", start[0], strength=s, seed=0, output_type="np", progress=False)[0]
         for s in strengths]
fig, axes = plt.subplots(1, 5, figsize=(11, 2.6))
axes[0].imshow(start[0])
axes[0].set_title(captions[0], fontsize=7)
for ax, im, s in zip(axes[1:], edits, strengths):
    ax.imshow(im)
    ax.set_title(f"strength {s}", fontsize=9)
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Which words light up which pixels
#
# Every cross-attention layer of the U-Net (chapter 3) lets each latent pixel $i$ spread one unit
# of attention over the 77 context tokens $j$:
# $A_{ij} = \mathrm{softmax}_j\big(q_i \cdot k_j / \sqrt{d}\big)$, with $q = W_q x$ from the
# image and $k = W_k c$ from the text. Column $j$ of $A$, laid back out as an image, shows where
# word $j$ is read (Hertz et al., *Prompt-to-Prompt*, 2022, edit images by steering these maps).
# The package's attention never builds $A$ (it calls `F.scaled_dot_product_attention`), so here
# a forward hook captures each cross-attention layer's inputs and recomputes $A$ from the
# layer's own `to_q` and `to_k`; the maps are averaged over heads, layers (upsampled to 8x8) and
# steps, for the conditional half of the guidance batch.
#
# A picture of two prompts can show anything; so the maps are *measured*, on 180 images (the
# 90 course captions, each with two starting noises; 10 DDIM steps to keep it cheap). For each
# image, the drawn shape's mask is read off the generated pixels (the shape is bright on a black
# background), pooled to the 8x8 latent grid. For each word, the share of its attention mass
# that falls inside the mask is compared with the share a uniform map would put there (the
# mask's area): a ratio of 1 means the word looks everywhere alike, above 1 that it looks at
# the shape. A word whose map sat entirely on the shape would reach 1 / (mask area), about 12
# here.

# %%
import torch.nn.functional as F

from minisd.attention import CrossAttention

TOKENS = 12                                                       # <start>, the caption's tokens, the first <end>
attn_sum, attn_calls = None, 0


def record(module, args, output):
    """Add up each cross-attention layer's map A (conditional half, first TOKENS tokens) on the 8x8 grid."""
    global attn_sum, attn_calls
    x, context = args                                             # (2B, N, C), (2B, 77, width)
    x, context = x[len(x) // 2:], context[len(context) // 2:]     # the conditional half
    B, N, C = x.shape
    q = module.to_q(x).view(B, N, module.heads, -1).transpose(1, 2)           # (B, heads, N, d)
    k = module.to_k(context).view(B, 77, module.heads, -1).transpose(1, 2)    # (B, heads, 77, d)
    A = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(1)   # (B, N, 77)
    side = int(N ** 0.5)
    A = A[..., :TOKENS].transpose(1, 2).reshape(B, TOKENS, side, side)       # (B, TOKENS, h, w)
    A = F.interpolate(A, size=(size, size), mode="bilinear")
    attn_sum = A if attn_sum is None else attn_sum + A
    attn_calls += 1


cross = [m for m in pipe.unet.modules() if type(m) is CrossAttention]   # attn2 of each block, not SelfAttention
hooks = [m.register_forward_hook(record) for m in cross]
attn_prompts = [minisd.data.caption(*c) for c in minisd.data.combinations()] * 2      # 90 captions x 2 noises
attn_steps = 10
attn_images = pipe(attn_prompts, steps=attn_steps, seed=2, output_type="np", progress=False)
for h in hooks:
    h.remove()
A = attn_sum / attn_calls                                          # (180, TOKENS, 8, 8): mean over layers and steps
print(f"{len(cross)} cross-attention layers x {attn_steps} steps, {len(attn_prompts)} images -> maps {tuple(A.shape)}")

# the drawn shape's mask from each generated image, as the share of each 4x4-pixel latent cell it covers
light = torch.from_numpy(attn_images.max(axis=-1))                # (N, 32, 32): brightest channel, black background
fg = (light > 0.5 * light.amax(dim=(1, 2), keepdim=True)).float()
mask = F.avg_pool2d(fg[:, None], 32 // size)[:, 0]                 # (N, 8, 8) in [0, 1]
uniform = mask.mean(dim=(1, 2))                                    # the share a uniform map puts inside the mask
ROLE = {**{c: "colour word" for c in minisd.data.COLOURS}, **{sh: "shape word" for sh in minisd.data.SHAPES},
        "top": "top / bottom", "bottom": "top / bottom", "left": "left / right", "right": "left / right",
        "<start>": "<start>", "<end>": "<end>"}
ratios, word_maps = {}, []                                        # word_maps: each image's (word, its 8x8 map)
for i, p in enumerate(attn_prompts):
    j, words = 1, [("<start>", A[i, 0])]                           # token 0 is <start>
    for word in p.split():
        n_tok = len(pipe.tokenizer.encode(word))                   # a word may be two tokens ("magenta")
        words.append((word, A[i, j:j + n_tok].sum(0)))             # its attention: its tokens together
        j += n_tok
    assert int(pipe.tokenizer([p])[0, j]) == 49407
    words.append(("<end>", A[i, j]))
    word_maps.append(words)
    for word, m in words:
        share = float((m * mask[i]).sum() / m.sum())
        ratios.setdefault(ROLE.get(word, f'"{word}"'), []).append(share / float(uniform[i]))
print(f"shape mask: {float(uniform.mean()):.1%} of the image on average, so a map entirely on it would score "
      f"about {float((1 / uniform).mean()):.0f}")
print(f"{'word':16s} {'n':>4s}  share inside the mask / uniform share (mean, 95 % interval)")
for role, r in ratios.items():
    r = np.array(r)
    half = 1.96 * r.std(ddof=1) / np.sqrt(len(r))
    print(f"{role:16s} {len(r):4d}  {r.mean():.2f}  [{r.mean() - half:.2f}, {r.mean() + half:.2f}]")
mean_ratio = {role: float(np.mean(r)) for role, r in ratios.items()}
assert max(mean_ratio.values()) < 2 and mean_ratio["<start>"] < 1

# %% [markdown]
# Two of these images, each word's map shown as the same ratio (its attention at each pixel
# over its mean over the image: 1 = uniform), on **one colour scale for every panel**, with
# the shape's mask outlined:

# %%
show_rows = [attn_prompts.index("a red circle in the top left"), attn_prompts.index("a blue triangle in the bottom right")]
panels = max(len(word_maps[i]) for i in show_rows)
vmax = max(float((m / m.mean()).max()) for i in show_rows for _, m in word_maps[i])
fig, axes = plt.subplots(len(show_rows), panels + 1, figsize=(14, 3.6))
for row, i in enumerate(show_rows):
    axes[row, 0].imshow(attn_images[i])
    axes[row, 0].set_title("image", fontsize=9)
    for col, (word, m) in enumerate(word_maps[i]):
        im = axes[row, col + 1].imshow((m / m.mean()).numpy(), cmap="inferno", vmin=0, vmax=vmax)
        axes[row, col + 1].contour(mask[i].numpy(), levels=[0.25], colors="cyan", linewidths=1)
        axes[row, col + 1].set_title(word, fontsize=9)
    for ax in axes[row]:
        ax.axis("off")
fig.colorbar(im, ax=axes, fraction=0.015, label="attention / its image mean")
fig.suptitle(f"cross-attention per word ({attn_steps} DDIM steps; heads, layers and steps averaged; cyan: the shape)")
plt.show()

# %% [markdown]
# What the numbers say: on this model, no word's attention concentrates on the shape. The
# shape covers about 8 % of the image; a word looking only at it would score about 13, and the
# highest mean ratio is 1.25. The colour and shape words sit slightly above uniform (1.08 and
# 1.16), but so do "in" (1.18) and the first end token (1.25); the position words sit at or
# below uniform (0.88-0.98), so they do not point at where the shape is; "<start>" and "a"
# look *away* from the shape, at the background (0.64). A single pair of panels, each on its
# own colour scale (as an earlier version of this chapter drew them), made some words look
# localised; measured over 180 images they are not. The course U-Net does place the shape
# where the caption says (chapter 10's judge finds the position right), so position must
# travel another way: through the text encoder's causal context (each token's vector also
# holds every word before it, and the end and padding tokens hold all of them), spread over all
# pixels, and through the self-attention layers that pass it across the image. Maps that do
# localise words, as in large models (Prompt-to-Prompt, Hertz et al., 2022, edits images by
# steering them), are a property of those models, not a law of cross-attention.

# %% [markdown]
# ## Real Stable Diffusion 1.5
#
# `from_pretrained` reads either a diffusers folder (`unet/`, `vae/`, `text_encoder/`, each with
# its `config.json`) or one original single file (`v1-5-pruned-emaonly.safetensors`, or a
# `.ckpt`, read with `torch.load(weights_only=True)`: a pickle can run code, so nothing else is
# unpickled). In the single file the names follow the original CompVis code: the U-Net under
# `model.diffusion_model.` numbers its blocks `input_blocks.0 ... 11`, the VAE under
# `first_stage_model.` counts its decoder blocks from the bottom and stores its attention as
# 1x1 convolutions; `minisd.weights` holds one readable key map per layout, infers the
# configuration from the tensor shapes, and refuses what it cannot load with a reason
# (an SDXL file, a LoRA file, a truncated download). No weights are downloaded here: set
# `MINISD_SD15` to a local copy and run this notebook on a machine with a GPU.

# %%
path = os.environ.get("MINISD_SD15")
if path is None or not Path(path).exists():
    print("skipped: set MINISD_SD15 to a local SD 1.5 folder or .safetensors file to run this cell")
elif not torch.cuda.is_available():
    print("skipped: SD 1.5 at 512x512 needs a CUDA GPU to run in reasonable time")
else:
    sd15 = StableDiffusion.from_pretrained(path, device="cuda", dtype=torch.float16)
    photo = sd15("a photograph of an astronaut riding a horse", steps=30, scheduler="dpm++2m", seed=0)[0]
    plt.imshow(photo)
    plt.axis("off")
    plt.show()

# %% [markdown]
# In {term}`fp16` the U-Net and text encoder run at half the memory; minisd keeps the VAE in
# float32. Whether a VAE overflows float16 (largest value 65,504) depends on its trained
# weights, and nothing in this book measures it for SD 1.5's VAE: random or course weights
# cannot show it. What is documented is SDXL's VAE: its decoder's activations grow too large
# for float16 and it returns NaN, which is why the
# [SDXL-VAE-FP16-Fix](https://huggingface.co/madebyollin/sdxl-vae-fp16-fix) model card
# fine-tuned a copy with smaller activations, and why diffusers' `AutoencoderKL` has a
# `force_upcast` flag ("force the VAE to run in float32 for high image resolution pipelines,
# such as SD-XL") that its SDXL pipelines read before decoding. (diffusers' SD 1.x pipeline
# does not read it: it decodes SD 1.5 in float16.) minisd's reason is the one behind
# `force_upcast`: the decoder runs once per image against two U-Net passes per step, so
# float32 there costs little, and it removes the risk for any VAE a user loads.

# %% [markdown]
# ## SD 1 and SD 2
#
# Stable Diffusion 2.0 and 2.1 (Stability AI, late 2022) keep every idea of the chapters
# before: a VAE, a U-Net with cross-attention, a CLIP {term}`text encoder`, a sampler. What
# changed is a handful of numbers, one text encoder and one training target. In `minisd` each
# difference is a config field, so both families are the same code: `UNetConfig.sd21()`,
# `CLIPTextConfig.sd2()`, `CLIPTokenizer.sd2()` and `SchedulerConfig.sd21()` are SD 2.1's
# presets next to SD 1.5's. The table below is computed from those configs (the models are
# built on the meta device: shapes only, no memory, no weights).

# %%
from minisd.schedulers import SchedulerConfig

with torch.device("meta"):
    sizes = {name: (sum(p.numel() for p in minisd.UNet(u).parameters()),
                    sum(p.numel() for p in minisd.CLIPTextEncoder(c).parameters()))
             for name, u, c in [("SD 1.5", minisd.UNetConfig.sd15(), minisd.CLIPTextConfig.sd15()),
                                ("SD 2.1", minisd.UNetConfig.sd21(), minisd.CLIPTextConfig.sd2())]}


def family(unet, text, tokenizer, sched, params):
    """The numbers that tell SD 1.5 and SD 2.1 apart, each read off a config."""
    return {
        "text encoder": f"{text.layers} layers x {text.width}, {text.heads} heads, {text.act}",
        "text encoder parameters": f"{params[1]:,}",
        "padding token": repr(tokenizer.decoder[tokenizer.pad_id]),
        "U-Net context width": unet.context_dim,
        "U-Net heads per level": unet.heads,
        "U-Net head width": tuple(c // h for c, h in zip(unet.block_channels, unet.heads)),
        "proj_in / proj_out": "Linear" if unet.linear_projection else "1x1 Conv2d",
        "upcast_attention": unet.upcast_attention,
        "U-Net parameters": f"{params[0]:,}",
        "default size (px)": unet.sample_size * 8,
        "prediction_type": sched.prediction_type,
    }


rows = {"SD 1.5": family(minisd.UNetConfig.sd15(), minisd.CLIPTextConfig.sd15(), minisd.CLIPTokenizer.sd15(),
                         SchedulerConfig.sd15(), sizes["SD 1.5"]),
        "SD 2.1": family(minisd.UNetConfig.sd21(), minisd.CLIPTextConfig.sd2(), minisd.CLIPTokenizer.sd2(),
                         SchedulerConfig.sd21(), sizes["SD 2.1"])}
print(f"{'':25s} {'SD 1.5':40s} SD 2.1")
for key in rows["SD 1.5"]:
    print(f"{key:25s} {str(rows['SD 1.5'][key]):40s} {rows['SD 2.1'][key]}")
same = [f for f in ("block_channels", "layers_per_block", "cross_attention", "groups", "in_channels")
        if getattr(minisd.UNetConfig.sd15(), f) == getattr(minisd.UNetConfig.sd21(), f)]
print("the same in both U-Nets:", ", ".join(same), "(and the whole VAE)")
assert sizes["SD 1.5"] == (859_520_964, 123_060_480) and sizes["SD 2.1"] == (865_910_724, 340_387_840)

# %% [markdown]
# Row by row:
#
# - **The text encoder** is OpenCLIP's ViT-H/14 {cite}`ilharco2021openclip`, trained on
#   LAION-2B {cite}`schuhmann2022laion`, in place of OpenAI's ViT-L/14: 1024 wide instead of 768,
#   exact GELU instead of `quick_gelu`. It has 24 layers, but SD 2 reads the *penultimate* one
#   (then the final LayerNorm), the {term}`clip skip` of chapter 7 built into the model:
#   diffusers' SD 2 folders simply store 23 layers, and so does `CLIPTextConfig.sd2()`.
#   Its tokenizer is the same BPE, but it pads with `!` (id 0) where SD 1 pads with
#   `<|endoftext|>`; the U-Net attends to the padding too, so the padding token changes images.
# - **The U-Net** keeps its channels and blocks. Its cross-attention keys and values read the
#   1024-wide context, and its attention keeps each {term}`attention head` 64 wide (5, 10, 20, 20
#   heads) where SD 1 keeps 8 heads per level (40 to 160 wide). diffusers' config field for this
#   is called `attention_head_dim` in both, but it holds the number of heads (a naming slip it
#   keeps for compatibility), so `UNetConfig.from_diffusers` reads it as `heads`.
# - **Linear projections**: the SpatialTransformer's `proj_in`/`proj_out` are Linear layers on
#   the tokens instead of 1x1 convolutions on the map. A 1x1 convolution *is* a Linear layer
#   applied at every pixel (checked below), so this changes the weights' shape, (C, C) instead
#   of (C, C, 1, 1), and where the reshape happens, not what the layer can compute.
# - **`upcast_attention`** (SD 2.1, not 2.0): SD 2.1's attention logits overflow {term}`fp16`'s
#   range of 65,504, softmax then returns NaN and the image comes out black; the flag computes
#   the attention in float32 whenever the model runs in half precision.
# - **v-prediction and 768 px**: SD 2.1 (and 2.0-v) was trained at 768x768 to predict $v$, not
#   $\epsilon$; the 512 px "-base" models of the same architecture predict $\epsilon$. That is the
#   subject of the next cells.

# %%
_ = torch.manual_seed(0)
conv = torch.nn.Conv2d(8, 8, 1)
linear = torch.nn.Linear(8, 8)
with torch.no_grad():
    linear.weight.copy_(conv.weight[:, :, 0, 0])    # (C, C, 1, 1) -> (C, C)
    linear.bias.copy_(conv.bias)
    fmap = torch.randn(2, 8, 5, 5)
    by_conv = conv(fmap)
    by_linear = linear(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)    # (B, C, H, W) -> (B, H, W, C) and back
print(f"1x1 conv vs the same weights as a Linear over the tokens: max |diff| = {(by_conv - by_linear).abs().max():.1e}")
assert torch.allclose(by_conv, by_linear, atol=1e-6)

# %% [markdown]
# ### v-prediction
#
# With $\alpha_t = \sqrt{\bar\alpha_t}$ and $\sigma_t = \sqrt{1 - \bar\alpha_t}$ (so
# $\alpha_t^2 + \sigma_t^2 = 1$), the forward process of chapter 9 is
# $x_t = \alpha_t x_0 + \sigma_t \epsilon$. An {term}`epsilon prediction` model outputs
# $\hat\epsilon \approx \epsilon$; a {term}`v-prediction` model {cite}`salimans2022progressive`
# outputs
#
# $$
# v = \alpha_t\,\epsilon - \sigma_t\,x_0 .
# $$
#
# $(x_t, v)$ is $(x_0, \epsilon)$ turned by the angle $\phi_t$ with $\cos\phi_t = \alpha_t$,
# $\sin\phi_t = \sigma_t$, and turning back gives both unknowns:
#
# $$
# x_0 = \alpha_t\,x_t - \sigma_t\,v, \qquad \epsilon = \sigma_t\,x_t + \alpha_t\,v .
# $$
#
# (The first: $\alpha_t(\alpha_t x_0 + \sigma_t\epsilon) - \sigma_t(\alpha_t\epsilon - \sigma_t x_0)
# = (\alpha_t^2 + \sigma_t^2)\,x_0$.) Every sampler works with $\hat x_0$ and $\hat\epsilon$, so a
# v-model needs only these two lines in front of it: `Scheduler._x0_eps` in
# `minisd.schedulers`, chosen by the scheduler file's `prediction_type`. Why bother: from
# $\hat\epsilon$ the clean image is $\hat x_0 = (x_t - \sigma_t\hat\epsilon)/\alpha_t$, so an
# error $\delta$ in $\hat\epsilon$ becomes $\delta\,\sigma_t/\alpha_t$ in $\hat x_0$, which
# grows without bound as $\alpha_t \to 0$ at the noisy end (that factor is exactly the
# $\sqrt{1/\text{SNR}}$ of chapter 10's Euler sigma, 14.6 at SD's $t = 999$); from $\hat v$ it is
# $\delta\,\sigma_t \le \delta$. At zero terminal {term}`SNR` {cite}`lin2024zerosnr`
# ($\alpha_T = 0$) $x_T$ *is* $\epsilon$: an $\epsilon$-model has nothing to learn there and
# $\hat x_0$ is undefined, while a v-model predicts $v = -x_0$, the image itself.
#
# The cell checks the rotation on tensors at three timesteps, the error factors, and that
# `SchedulerConfig.sd21()` turns a true $v$ into the true $x_0$ while SD 1.5's config, reading
# the same $v$ as if it were $\epsilon$, lands far away (what loading SD 2.1 with the wrong
# scheduler file does to every step).

# %%
g = torch.Generator().manual_seed(0)
x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
abar = SchedulerConfig.sd21().alphas_cumprod(rescale=False)
for t in (1, 500, 999):
    a, s = abar[t] ** 0.5, (1 - abar[t]) ** 0.5
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    back = (a * x_t - s * v - x0).abs().max().item(), (s * x_t + a * v - eps).abs().max().item()
    print(f"t={t:3d}: alpha={a:.3f} sigma={s:.3f}  |x0 from v - x0| = {back[0]:.1e}, |eps from v - eps| = {back[1]:.1e}"
          f"   an error d in eps -> {s / a:6.2f} d in x0; in v -> {s:.2f} d")
    assert max(back) < 1e-5

t = 981
a, s = abar[t] ** 0.5, (1 - abar[t]) ** 0.5
x_t, v = a * x0 + s * eps, a * eps - s * x0
guesses = {}
for name, config in (("SD 2.1's file (v)", SchedulerConfig.sd21()), ("SD 1.5's file (epsilon)", SchedulerConfig.sd15())):
    ddim = make_scheduler("ddim", config)
    ddim.set_timesteps(50)
    ddim.step(v, t, x_t)
    guesses[name] = (ddim.pred_x0 - x0).abs().max().item()
    print(f"a v-model's output read with {name}: max |predicted x0 - x0| = {guesses[name]:.1e}")
assert guesses["SD 2.1's file (v)"] < 1e-4 < 1 < guesses["SD 1.5's file (epsilon)"]

# %% [markdown]
# ### The scheduler file
#
# A diffusers folder carries `scheduler/scheduler_config.json`, and diffusers' users switch
# samplers with `Cls.from_config(pipe.scheduler.config)`, which carries every field of that
# file to the new sampler. `from_pretrained` reads the same file into a `SchedulerConfig` and
# hands it to every sampler `minisd` builds, so each sampler runs exactly as diffusers' would
# (the tests check all five samplers under four files, step by step and on whole images). The
# fields:
#
# | field | what it sets | SD 1.5 | SD 2.1 |
# |---|---|---|---|
# | `_class_name` | the {term}`scheduler` the model ships with: `minisd`'s default sampler | PNDM | DDIM |
# | `beta_schedule`, `beta_start`, `beta_end`, `num_train_timesteps` | the betas and so $\bar\alpha_t$ (chapter 9); `scaled_linear` is SD's, `linear` the DDPM paper's, `squaredcos_cap_v2` the cosine schedule | scaled_linear, 0.00085, 0.012, 1000 | the same |
# | `prediction_type` | what the U-Net outputs: `epsilon` or `v_prediction` (above) | epsilon (not named) | v_prediction |
# | `timestep_spacing` | which $n$ of the 1000 steps a run visits: `leading`, `linspace` or `trailing` ({term}`timestep spacing`) | not named: each sampler's own default | not named |
# | `steps_offset` | added to `leading` timesteps (981 ... 1 instead of 980 ... 0) | 1 | 1 |
# | `set_alpha_to_one` | DDIM/PNDM: whether the last step lands on $\bar\alpha = 1$ or on $\bar\alpha_0$ | false | false |
# | `clip_sample` | DDPM/DDIM clip $\hat x_0$ to $[-1, 1]$ (pixel models; wrong for latents) | false | false |
# | `rescale_betas_zero_snr` | shift the schedule so that $\bar\alpha_{T} = 0$ {cite}`lin2024zerosnr` (fine-tunes that use `trailing`) | (absent) | (absent) |
# | `skip_prk_steps` | PNDM without its Runge-Kutta warm-up (the only PNDM `minisd` has) | true | true |
#
# A field the file does not name takes the default of the diffusers class that reads it, and
# diffusers' classes disagree on some: DDIM/PNDM/DDPM default to `leading`, Euler and
# DPM-Solver++ to `linspace`, which is why SD 1.5's Euler visits 999 ... 0 and its DDIM 981 ... 1.
# Any other field (Karras sigmas, thresholding, ...) is refused by name unless it has its
# "off" value, so a file is never half-honoured in silence. A single original file carries no
# scheduler file: SD 1.x gets SD 1.5's; SD 2.x gets SD 2.1's with `v_prediction`, as diffusers'
# single-file loader decides (the -base models need `from_pretrained(path, prediction_type="epsilon")`).

# %%
sd21_file = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
             "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "trained_betas": None}    # stabilityai/stable-diffusion-2-1, as published
config = SchedulerConfig.from_dict(sd21_file)
print(config == SchedulerConfig.sd21(), config)
for spacing in ("leading", "linspace", "trailing"):
    sched = make_scheduler("ddim", replace(config, timestep_spacing=spacing))
    sched.set_timesteps(10)
    print(f"{spacing:9s} 10 steps: {sched.timesteps.tolist()}")
zero = replace(config, timestep_spacing="trailing", rescale_betas_zero_snr=True)
print(f"abar at t=999: {config.alphas_cumprod(False)[-1]:.4f} (SNR {1 / (1 / config.alphas_cumprod(False)[-1] - 1):.4f});"
      f" rescaled to zero SNR: {zero.alphas_cumprod(True)[-1]:.4f}")
try:
    SchedulerConfig.from_dict({**sd21_file, "use_karras_sigmas": True})
except ValueError as e:
    print("refused:", e)
assert zero.alphas_cumprod(True)[-1] == 0 and config.prediction_type == "v_prediction"

# %% [markdown]
# With real SD 2.1 weights on disk (see the README: they come from Stability AI under the
# CreativeML Open RAIL++-M licence), set `MINISD_SD21` to the diffusers folder or the original
# `v2-1_768-ema-pruned.safetensors` and this cell draws at the model's own 768x768 with the
# model's own DDIM and v-prediction; like the SD 1.5 cell, it needs a CUDA GPU.

# %%
path = os.environ.get("MINISD_SD21")
if path is None or not Path(path).exists():
    print("skipped: set MINISD_SD21 to a local SD 2.1 folder or .safetensors file to run this cell")
elif not torch.cuda.is_available():
    print("skipped: SD 2.1 at 768x768 needs a CUDA GPU to run in reasonable time")
else:
    sd21 = StableDiffusion.from_pretrained(path, device="cuda", dtype=torch.float16)
    print(sd21, sd21.scheduler_config.prediction_type)
    photo = sd21("a photograph of an astronaut riding a horse", steps=30, seed=0)[0]
    plt.imshow(photo)
    plt.axis("off")
    plt.show()

# %% [markdown]
# ## Against diffusers, on identical weights
#
# The same weights go into diffusers through the *original single-file layout*:
# `minisd.weights.to_original` writes our model in the layout the released SD files use, and
# diffusers' own converters (`convert_ldm_unet_checkpoint` and friends, what its
# `from_single_file` runs) read it back. Same context, same starting noise, same sampler.
#
# Agreement does not depend on what the weights learned, so this comparison uses a small model
# with random weights and SD's structure (its images are noise, but every number must still
# agree): a tiny U-Net with 8x8 latents, the course VAE's shape and a tiny CLIP.

# %%
import diffusers
import transformers
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)

_ = torch.manual_seed(0)
random_pipe = StableDiffusion(minisd.UNet(replace(minisd.UNetConfig.tiny(), sample_size=8)),   # 8x8 latents
                              minisd.AutoencoderKL(minisd.VAEConfig.course()),                  # 32x32 images
                              minisd.CLIPTextEncoder(minisd.CLIPTextConfig.tiny()),
                              steps=25, guidance=4.0, scheduler="ddim")
print(random_pipe)
ids = random_pipe.tokenizer([prompt, ""])
original = minisd.weights.to_original(random_pipe)
ref_unet = diffusers.UNet2DConditionModel(**random_pipe.unet.config.to_diffusers())
ref_unet.load_state_dict(convert_ldm_unet_checkpoint(original, dict(ref_unet.config)))
v = random_pipe.vae.config
ref_vae = diffusers.AutoencoderKL(block_out_channels=list(v.block_out_channels), layers_per_block=v.layers_per_block,
                                  latent_channels=v.latent_channels, norm_num_groups=v.norm_groups,
                                  scaling_factor=v.scaling_factor,
                                  down_block_types=["DownEncoderBlock2D"] * len(v.block_out_channels),
                                  up_block_types=["UpDecoderBlock2D"] * len(v.block_out_channels))
ref_vae.load_state_dict(convert_ldm_vae_checkpoint(original, dict(ref_vae.config)))
c = random_pipe.text_encoder.config
ref_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
    vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width, num_hidden_layers=c.layers,
    num_attention_heads=c.heads, max_position_embeddings=c.positions, hidden_act="quick_gelu")).eval()
# transformers 5.x names its modules without `text_model.`; position_ids is a buffer it recomputes
ref_text.load_state_dict({k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(original).items()
                          if not k.endswith("position_ids")})

with torch.no_grad():
    theirs_context = ref_text(ids)[0]
print(f"text encoder: max |diff| = {(theirs_context - random_pipe.text_encoder(ids)).abs().max():.1e}")

ref = diffusers.StableDiffusionPipeline(vae=ref_vae, text_encoder=ref_text, tokenizer=None, unet=ref_unet,
                                        scheduler=diffusers.DDIMScheduler.from_config(dict(
                                            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, set_alpha_to_one=False, clip_sample=False)),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
ref.set_progress_bar_config(disable=True)
theirs = ref(prompt_embeds=theirs_context[:1], negative_prompt_embeds=theirs_context[1:], latents=x_T,
             height=size * f, width=size * f, num_inference_steps=steps, guidance_scale=guidance,
             output_type="np").images
ours = random_pipe(prompt, latents=x_T, scheduler="ddim", output_type="np", progress=False)
print(f"whole pipeline, {steps} DDIM steps: max |diff| = {np.abs(ours - theirs).max():.1e}")

# %% [markdown]
# The tests (`tests/test_pipeline.py`) check the same at the real SD 1.5 size: random weights
# at SD 1.5's configuration, saved as a diffusers folder and as one original file, 256x256, 3
# PNDM steps at guidance 7.5: minisd's image equals diffusers' `StableDiffusionPipeline`
# (measured max |diff| = 0 on these machines), and each of the five samplers matches diffusers
# with that sampler.

# %% [markdown]
# How fast this pipeline runs and loads next to diffusers', on a CPU and on an H200 GPU, and
# how its load time was brought down, is in the appendix,
# [Engineering notes](appendix_engineering.ipynb).

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 11.1 (★)** Show from the guidance formula that $s = 1$ is the conditional model
# alone, then check it with numbers: run the chapter's by-hand loop (two U-Net passes per step,
# the formula at $s = 1$) from `x_T`, and compare with `pipe(prompt, guidance=1.0, ...)`, which
# skips the unconditional pass (as diffusers does).

# %% tags=["solution", "hide-cell"]
# eps_u + 1 * (eps_c - eps_u) = eps_c: the unconditional prediction cancels exactly
def by_hand(context2, x_start, s, steps=25, flip=False):
    """The chapter's loop: context2 = [uncond; cond] contexts (2B, 77, D), x_start (B, 4, 8, 8)."""
    sched = make_scheduler("ddim")
    sched.set_timesteps(steps)
    x = x_start * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps_u, eps_c = pipe.unet(sched.scale_model_input(torch.cat([x, x]), t), t, context2).chunk(2)
            eps = eps_c + s * (eps_u - eps_c) if flip else eps_u + s * (eps_c - eps_u)
            x = sched.step(eps, t, x)
        return pipe.decode(x).permute(0, 2, 3, 1).numpy()


two_pass = by_hand(context, x_T, s=1.0)
one_pass = pipe(prompt, latents=x_T, guidance=1.0, output_type="np", progress=False)
print(f"s = 1 with both passes vs the conditional pass alone: max |diff| = {np.abs(two_pass - one_pass).max():.1e}")
assert np.abs(two_pass - one_pass).max() < 1e-4     # the same image: s = 1 is the conditional model

# %% [markdown]
# **Exercise 11.2 (★★, break it and watch)** A classic bug: the two halves of the guidance
# batch swapped, so the formula becomes $\epsilon_c + s(\epsilon_u - \epsilon_c)$, a push *away*
# from the prompt. Generate 30 course captions (every third of `minisd.data.combinations()`)
# with 10 DDIM steps at $s = 4$, the right way and swapped, and let the judge
# (`minisd.metrics.Judge.load()`) read both.

# %% tags=["solution", "hide-cell"]
judge = minisd.metrics.Judge.load()
test_prompts = [minisd.data.caption(*c) for c in minisd.data.combinations()[::3]]
with torch.no_grad():
    test_context = pipe.text_encoder(pipe.tokenizer([""] * len(test_prompts) + test_prompts))   # [uncond; cond]
test_noise = torch.randn(len(test_prompts), 4, size, size, generator=torch.Generator().manual_seed(0))
accuracy = {}
for flip in (False, True):
    images = (by_hand(test_context, test_noise, s=4.0, steps=10, flip=flip) * 255).round().astype(np.uint8)
    accuracy[flip] = judge.accuracy(images, test_prompts)
    print(("swapped" if flip else "right  "), {k: f"{v:.0%}" for k, v in accuracy[flip].items()})
# swapped, guidance pushes away from the caption: the images stop matching it
assert accuracy[False]["all"] >= 0.9 and accuracy[True]["all"] < 0.5

# %% [markdown]
# **Exercise 11.3 (★★)** img2img with 25 steps at strength 0.6: how many U-Net calls does it
# make, and at which timestep does it start? Work it out from the text above, then count the
# calls with a forward hook on `pipe.unet` and compare the first timestep with the sampler's
# `timesteps`.

# %% tags=["solution", "hide-cell"]
seen_t = []
hook = pipe.unet.register_forward_hook(lambda module, args, output: seen_t.append(int(torch.as_tensor(args[1]).flatten()[0])))
_ = pipe.img2img("a blue square in the center", start[0], strength=0.6, steps=25, seed=0, output_type="np",
                 progress=False)
hook.remove()
ddim = make_scheduler("ddim")
ddim.set_timesteps(25)
skipped = 25 - int(25 * 0.6)
print(f"{len(seen_t)} U-Net calls (each a batch of 2: cond and uncond), first t = {seen_t[0]}; "
      f"the sampler's timesteps[{skipped}] = {int(ddim.timesteps[skipped])}")
assert len(seen_t) == 15 and seen_t[0] == int(ddim.timesteps[10])   # 10 steps skipped, 15 run

# %% [markdown]
# ## What you built
#
# `minisd.StableDiffusion`: the text encoder's context for the prompt and the empty (or
# negative) prompt, a sampler loop with classifier-free guidance at two U-Net passes per step
# in one batch, the VAE decoder after dividing by the scaling factor; seeds drawn on the CPU,
# batches, negative prompts and `img2img` (SDEdit). It loads SD 1.x weights from a diffusers
# folder or one original file (`from_pretrained`, `minisd.weights`) and gives diffusers'
# images on identical weights. On the course model its cross-attention maps, measured over 180
# images, do not localise words. Next: how to tell whether the images are *good*, with FID
# and CLIP score (chapter 12).
