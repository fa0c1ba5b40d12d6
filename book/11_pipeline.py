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
# # 11. The full pipeline
#
# Every part is built: the tokenizer and text encoder (chapters 7-8), the U-Net (1-4), the VAE
# (5-6) and the samplers (9-10). This chapter joins them into `minisd.StableDiffusion`, the
# object that turns a prompt into an image, loads the real SD 1.x weights, and gives the same
# images as diffusers' `StableDiffusionPipeline`.
#
# The whole algorithm, with guidance scale $s$ and the empty prompt $\varnothing$:
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
from minisd import StableDiffusion
from minisd.schedulers import make_scheduler

_ = torch.manual_seed(0)

# %% [markdown]
# ## The model
#
# The course's own model: the VAE of chapter 6, the text encoder of chapter 8 and the U-Net of
# chapter 9, all trained on 32x32 images of coloured shapes with captions such as "a red circle
# in the top left". `StableDiffusion.course_model()` reads its three checkpoints from `data/`;
# it runs on any CPU in a second or so per image, with the defaults chapter 10 found best
# (25 DDIM steps, guidance 4). Its latents are 4 x 8 x 8 (the course VAE downsamples by 4, not 8).

# %%
pipe = StableDiffusion.course_model()
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
# SDEdit (Meng et al., 2022): encode an existing image, noise it to a timestep part of the way up
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
# all 25 steps, for the conditional half of the guidance batch.

# %%
import torch.nn.functional as F

from minisd.attention import CrossAttention, SelfAttention

maps = []


def record(module, args, output):
    x, context = args                                             # (2B, N, C), (2B, 77, width)
    x, context = x[len(x) // 2:], context[len(context) // 2:]     # the conditional half
    B, N, C = x.shape
    q = module.to_q(x).view(B, N, module.heads, -1).transpose(1, 2)           # (B, heads, N, d)
    k = module.to_k(context).view(B, 77, module.heads, -1).transpose(1, 2)    # (B, heads, 77, d)
    A = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(1)   # (B, N, 77)
    side = int(N ** 0.5)
    A = A.transpose(1, 2).reshape(B, 77, side, side)              # (B, N, 77) -> (B, 77, h, w)
    maps.append(F.interpolate(A, size=(size, size), mode="bilinear"))


cross = [m for m in pipe.unet.modules() if type(m) is CrossAttention]   # attn2 of each block, not SelfAttention
hooks = [m.register_forward_hook(record) for m in cross]
attn_prompts = ["a red circle in the top left", "a blue triangle in the bottom right"]
attn_images = pipe(attn_prompts, seed=2, output_type="np", progress=False)
for h in hooks:
    h.remove()
A = torch.stack(maps).mean(0)                                     # (B, 77, 8, 8)
print(f"{len(cross)} cross-attention layers x {pipe.steps} steps -> maps {tuple(A.shape)}")

fig, axes = plt.subplots(len(attn_prompts), 9, figsize=(14, 3.4))
for row, (p, im) in enumerate(zip(attn_prompts, attn_images)):
    words = p.split()
    assert pipe.tokenizer([p])[0, len(words) + 1] == 49407, "one token per word expected"
    axes[row, 0].imshow(im)
    axes[row, 0].set_title("image", fontsize=9)
    for col, j in enumerate(range(len(words) + 1)):
        label = words[j - 1] if j else "<start>"
        axes[row, col + 1].imshow(A[row, j].numpy(), cmap="inferno")
        axes[row, col + 1].set_title(label, fontsize=9)
    for ax in axes[row]:
        ax.axis("off")
fig.suptitle("cross-attention per token (8x8 latent grid, averaged over heads, layers and steps)")
plt.show()

# %% [markdown]
# This is a 1.8M-parameter U-Net working on an 8x8 grid, and its maps are coarse (each panel has
# its own colour scale). Still, some words clearly point at the object: "circle" and "top" in the
# first row and "triangle" in the second concentrate where the shape was drawn, while "<start>"
# and "a" spread over the background. Other words ("left", "bottom") show no clean location:
# position can also be carried by other tokens (CLIP's text encoder is causal, so each token's
# vector also holds every word before it, and the padding tokens after the caption hold all of
# it) and by the self-attention layers.

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
# (an SD 2.x file, a LoRA file, a truncated download). No weights are downloaded here: set
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
# In float16 the U-Net and text encoder run at half the memory; the VAE stays in float32,
# because SD's VAE decoder overflows float16's range at 512x512 and returns NaN (a black image).
# diffusers solves it the same way (`force_upcast`).
#
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
# ## Speed
#
# `python -m minisd benchmark --component pipeline` times text to image end to end, minisd and
# diffusers on the very same random SD 1.5 tensors, in interleaved runs (medians of 3); on a
# CPU at 256x256 with 4 PNDM steps in float32, on a GPU at 512x512 with 30 steps in float16.
# `--component unet` times one U-Net step (batch 2, as under guidance), and `--compile` adds
# both models through `torch.compile`. Measured so far:
#
# | where | what | minisd | diffusers | ratio |
# |---|---|---|---|---|
# | CPU, 2 cores, 2 threads | text to image, end to end | 16.0-16.3 s | 15.8-16.3 s | 0.99 and 1.03 (two runs) |
# | CPU | folder -> parts ready (fresh process) | 0.21 s | 0.24 s | 0.87 |
# | CPU | peak memory while loading | 4.45 GiB | 4.45 GiB | 1.00 |
# | H200, fp16 | text to image, 512x512, 30 steps | 0.62 s | 0.87 s | 0.71 |
# | H200, fp16 | one U-Net step, 64x64 latents, batch 2 | 19 ms | 26 ms | 0.75 |
# | H200, fp16 | the same step through `torch.compile` | 14 ms | 15 ms | 0.95 |
# | H200, fp16 | folder -> parts ready | 0.80 s | 0.87 s | 0.92 |
# | H200, fp16 | peak GPU memory after loading | 2.18 GiB | 2.02 GiB | 1.08 |
#
# The two images agree to 1e-6 in float32 and to 2.5e-3 in float16 (each library rounds its
# own way). The CPU rows come from a quiet machine: on the CPU the two are level, the same
# kernels doing nearly all the work (an earlier run, on a machine busy with other jobs, had
# shown 0.75; it did not hold up). minisd's load time excludes its tokenizer, whose 49,408-word
# vocabulary is read on first use (about 0.1 s), as the diffusers side here loads none. On the GPU
# `torch.compile` (default mode, about 42 s of compiling on the first call for each library)
# makes minisd's step 1.37x faster and diffusers' 1.74x, and leaves them nearly equal; minisd's
# eager lead is probably launch overhead (at 26 ms a step, Python and kernel launches weigh; we
# have not profiled it), which compiling removes for both. minisd uses more GPU memory after loading because it keeps its VAE in
# float32 for good, while diffusers keeps it in float16 and upcasts it for each decode
# (`force_upcast`): the same float32 VAE exists in both during decoding.
#
# Loading first measured 3.6 s, 6.6x diffusers: a profile showed 7 s of it in `normal_` on the
# text encoder's 49,408 x 768 token table, which, even on the meta device, sends torch through a
# slow path on its first call. minisd now draws nothing when it builds a model that is about to
# receive weights.
