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
# The course's own model (chapters 6, 8 and 9 train its VAE, text encoder and U-Net on 32x32
# images of coloured shapes) runs on any CPU in well under a second per image. Where its three
# checkpoints are not in `data/` yet, this notebook uses a small *random* model with the same
# structure instead: every number below is then still exact, but the images are noise.

# %%
course_files = [minisd.DATA_DIR / name for name in minisd.pipeline.COURSE_FILES.values()]
if all(f.exists() for f in course_files):
    pipe = StableDiffusion.course_model()
    prompt = "a red circle in the top left"
    print("the course model, trained in chapters 6, 8 and 9")
else:
    print("NOTE: the course checkpoints are not in data/ yet (`python -m minisd train vae|clip|unet` makes them);")
    print("      using a small random model with SD's structure: the images below are noise.")
    unet = minisd.UNet(replace(minisd.UNetConfig.tiny(), sample_size=8))   # 8x8 latents
    vae = minisd.AutoencoderKL(minisd.VAEConfig.course())                     # 32x32 images, f = 4
    text_encoder = minisd.CLIPTextEncoder(minisd.CLIPTextConfig.tiny())
    pipe = StableDiffusion(unet, vae, text_encoder, steps=25, guidance=4.0, scheduler="ddim")
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
# ## Seeds, batches, samplers, negative prompts
#
# `seed` fixes the starting noise, drawn on the CPU so the same seed gives the same image on
# any device. A list of prompts runs as one batch; `negative_prompt` replaces the empty prompt
# of guidance, so the image is pushed *away* from it.

# %%
prompts = ["a red circle in the top left", "a blue square in the center", "a green triangle in the bottom right"]
images = pipe(prompts, seed=1, output_type="np", progress=False)
samplers = {name: pipe(prompts[0], scheduler=name, seed=1, output_type="np", progress=False)[0]
            for name in ["ddim", "pndm", "euler", "dpm++2m"]}
fig, axes = plt.subplots(1, 7, figsize=(14, 2.4))
for ax, im, title in zip(axes, [*images, *samplers.values()], [*prompts, *samplers]):
    ax.imshow(im)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## img2img
#
# SDEdit (Meng et al., 2022): encode an existing image, noise it to a timestep part of the way up
# the chain, and run only the rest of the loop. With `strength` $= 0.6$ and 25 steps, the first
# 10 steps are skipped and the latent starts at the 11th timestep, noised accordingly. Low
# strength keeps the picture; high strength keeps only its rough layout.

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
# `from_single_file` runs) read it back. Same context, same starting noise, same sampler:

# %%
import diffusers
import transformers
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)

original = minisd.weights.to_original(pipe)
ref_unet = diffusers.UNet2DConditionModel(**pipe.unet.config.to_diffusers())
ref_unet.load_state_dict(convert_ldm_unet_checkpoint(original, dict(ref_unet.config)))
v = pipe.vae.config
ref_vae = diffusers.AutoencoderKL(block_out_channels=list(v.block_out_channels), layers_per_block=v.layers_per_block,
                                  latent_channels=v.latent_channels, norm_num_groups=v.norm_groups,
                                  scaling_factor=v.scaling_factor,
                                  down_block_types=["DownEncoderBlock2D"] * len(v.block_out_channels),
                                  up_block_types=["UpDecoderBlock2D"] * len(v.block_out_channels))
ref_vae.load_state_dict(convert_ldm_vae_checkpoint(original, dict(ref_vae.config)))
c = pipe.text_encoder.config
ref_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
    vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width, num_hidden_layers=c.layers,
    num_attention_heads=c.heads, max_position_embeddings=c.positions, hidden_act="quick_gelu")).eval()
# transformers 5.x names its modules without `text_model.`; position_ids is a buffer it recomputes
ref_text.load_state_dict({k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(original).items()
                          if not k.endswith("position_ids")})

with torch.no_grad():
    theirs_context = ref_text(ids)[0]
print(f"text encoder: max |diff| = {(theirs_context - pipe.text_encoder(ids)).abs().max():.1e}")

ref = diffusers.StableDiffusionPipeline(vae=ref_vae, text_encoder=ref_text, tokenizer=None, unet=ref_unet,
                                        scheduler=diffusers.DDIMScheduler.from_config(dict(
                                            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, set_alpha_to_one=False, clip_sample=False)),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
ref.set_progress_bar_config(disable=True)
theirs = ref(prompt_embeds=theirs_context[:1], negative_prompt_embeds=theirs_context[1:], latents=x_T,
             height=size * f, width=size * f, num_inference_steps=steps, guidance_scale=guidance,
             output_type="np").images
ours = pipe(prompt, latents=x_T, scheduler="ddim", output_type="np", progress=False)
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
# diffusers on the very same random SD 1.5 tensors (256x256, 4 PNDM steps, guidance 7.5, float32,
# interleaved runs, medians of 3). On this course's 2-core machines it measured:
#
# | | minisd | diffusers | ratio |
# |---|---|---|---|
# | text to image, end to end | 20.9 s | 28.0 s | 0.75 |
# | folder -> parts ready (fresh process) | 3.6 s | 0.5 s | 6.6 |
#
# with the two images equal to 8.9e-07. Sampling is faster; loading is slower and is the next
# thing to profile (in-process, loading a tiny folder takes 0.4 s, about half of it building the
# tokenizer's 48,894 merges, so the SD 1.5 gap lies in reading and placing the 3.4 GB of tensors).
