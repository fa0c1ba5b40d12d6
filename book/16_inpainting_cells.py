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
# ## Inpainting
#
# {term}`inpainting` repaints part of an image: a **mask** says where (white: repaint, black:
# keep), a prompt says what. `pipe.inpaint(prompt, image, mask)` does it in one of two ways, and
# picks by the U-Net's input channels, as diffusers' `StableDiffusionInpaintPipeline` does (and
# gives the same images from the same weights and seed: `tests/test_inpaint.py`):
#
# - **latent blending**, with any SD U-Net (4 input channels): sample as text-to-image, and after
#   every step put the known part of the image back into the latents, noised to where the next
#   step starts;
# - an **inpainting U-Net** (9 input channels, as SD's inpainting checkpoints): the U-Net sees,
#   beside its 4 noisy latents, the mask shrunk to the latents' size (1 channel) and the latents
#   of the masked image (4 channels), the conditioning by concatenation of the latent diffusion
#   paper {cite:p}`rombach2022ldm`.
#
# This section builds both on the course model, makes the course's own 9-channel U-Net (`python
# -m minisd train inpaint`) and measures the two against each other.

# %%
# %matplotlib inline
import json

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from minisd import DATA_DIR, StableDiffusion
from minisd.checkpoint import course_unet, load_checkpoint
from minisd.pipeline import denoise
from minisd.schedulers import make_scheduler
from minisd.train.inpaint import evaluate_inpainting, extend_unet, inpaint_task, psnr_outside

_ = torch.manual_seed(0)
pipe = StableDiffusion.course_model()
f = pipe.vae.config.factor
print(pipe)

# %% [markdown]
# ### Latent blending
#
# Let $z_0$ be the image's latents and $m$ the mask shrunk to the latent grid (nearest
# neighbour, 1 = repaint). The forward process (chapter 10) says where the known part of
# $z_0$ would be at timestep $t$: $z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1-\bar\alpha_t}\,
# \varepsilon$. Blending samples as usual, and after the sampler's step from $t_i$ to $t_{i+1}$
# replaces the known part by exactly that, with the one noise $\varepsilon$ drawn at the start:
#
# $$x_{t_{i+1}} \leftarrow (1 - m) \odot \big(\sqrt{\bar\alpha_{t_{i+1}}}\, z_0 + \sqrt{1-\bar\alpha_{t_{i+1}}}\,\varepsilon\big) + m \odot x_{t_{i+1}},$$
#
# and after the last step by $z_0$ itself, so the final latents *are* the image's outside the
# mask. The U-Net never learns anything new: it is SDEdit's idea {cite:p}`meng2022sdedit` (a
# sample of the forward process is a valid point on the way back) applied region by region at
# every step. Its weakness is the same: the repainted part sees the known part only through
# noisy latents, and nothing makes the two agree at the seam.
#
# Written by hand with `denoise`'s per-step hook, it is `pipe.inpaint` on the base model, draw
# for draw (diffusers' order: the image's latents, the noise, the masked image's latents):

# %%
images, masks, prompts = inpaint_task(6, kind="complete")
n = len(images)
sched = make_scheduler("ddim")
sched.set_timesteps(pipe.steps)
ts = sched.timesteps
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    x = 2 * (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 255) - 1  # (n, 3, 32, 32)
    z0 = pipe.vae.encode(x).sample(g) * pipe.vae.scaling_factor
    noise = torch.randn(z0.shape, generator=g)
    pipe.vae.encode(x * (masks < 0.5)).sample(g)          # diffusers draws it; blending does not use it
    m = F.interpolate(masks, size=z0.shape[-2:])          # (n, 1, 8, 8), nearest

    def blend(i, t, latents):
        known = z0 if i == len(ts) - 1 else sched.add_noise(z0, noise, ts[i + 1])
        return (1 - m) * known + m * latents

    context = torch.cat([pipe.encode_prompt([""] * n), pipe.encode_prompt(prompts)])
    by_hand = denoise(pipe.unet, noise * sched.init_noise_sigma, context, sched, guidance=pipe.guidance,
                      generator=g, after_step=blend)
ours = pipe.inpaint(prompts, images, masks, seed=0, output_type="latent", progress=False)
d_pipe = (by_hand - ours).abs().max().item()
d_known = ((by_hand - z0) * (1 - m)).abs().max().item()
print(f"by hand vs pipe.inpaint: max |diff| = {d_pipe:.1e}")
print(f"final latents outside the mask vs the image's z0: max |diff| = {d_known:.1e}")
assert d_pipe < 1e-5 and d_known == 0.0

# %% [markdown]
# ### An inpainting U-Net that starts as the base model
#
# The 9-channel U-Net differs from the base in one place: its first convolution `conv_in`
# reads 9 channels instead of 4. Split its weight by input channels, $W = [W_x \; W_e]$; for the
# latents $x$ and the extra channels $e$ (mask and masked-image latents)
#
# $$\mathrm{conv}_{[W_x\, W_e]}([x; e]) = W_x * x + W_e * e + b \overset{W_e = 0}{=} W_x * x + b = \mathrm{conv}_{W_x}(x).$$
#
# With $W_x$ the base model's and $W_e = 0$ (`train.extend_unet`), the extended U-Net computes
# exactly what the base computes, whatever the mask says: fine-tuning starts from a model that
# already draws, and only has to learn to *use* the new channels (the same reason a
# ControlNet's convolutions start at zero). SD's inpainting checkpoint was made this way: its
# model card says it started from SD 1.2's weights with the 5 new channels' weights
# zero-initialised, then trained 440k steps on synthetic masks, a quarter of them covering the
# whole image. The check, on the course U-Net:

# %%
base = course_unet()
nine = extend_unet(base)
gx = torch.Generator().manual_seed(1)
xt, extra = torch.randn(4, 4, 8, 8, generator=gx), 3 * torch.randn(4, 5, 8, 8, generator=gx)
t, ctx = torch.tensor([1, 250, 600, 999]), pipe.encode_prompt(prompts[:4])
with torch.no_grad():
    d_zero = (nine(torch.cat([xt, extra], 1), t, ctx) - base(xt, t, ctx)).abs().max().item()
print(f"in_channels {base.config.in_channels} -> {nine.config.in_channels}; "
      f"max |extended(x, mask, masked) - base(x)| = {d_zero}")
assert d_zero == 0.0

# %% [markdown]
# `python -m minisd train inpaint` fine-tunes it on masked course images: each of 8,000 training
# images gets one mask, whole latent cells (10 % all white, the rest a random rectangle, or the
# box around the shape or half of it), the caption describes the whole image, and the loss is
# SD's, $\lVert \varepsilon - \varepsilon_\theta([x_t; m; z_{\text{masked}}], t, c)\rVert^2$, with
# $m$ and $z_\text{masked}$ never noised. Its log:

# %%
log = json.loads((DATA_DIR / "course_inpaint_unet_log.json").read_text())
print(log["command"])
print(f"{log['steps']} steps of {log['batch_size']}, lr {log['lr']}: {log['train_cpu_seconds']} s CPU "
      f"({log['threads']} thread), loss {np.mean(log['loss'][:50]):.4f} (first 50) -> "
      f"{np.mean(log['loss'][-50:]):.4f} (last 50)")
inpaint_unet = load_checkpoint(DATA_DIR / "course_inpaint_unet.safetensors")

# %% [markdown]
# ### Blending against the 9-channel model
#
# Two tasks on course images (`train.inpaint.TASKS`). **complete**: half of the box around the
# shape is masked and repainted with the image's own caption, so the model must finish the half
# shape it is shown. **replace**: the whole box is repainted with another colour and another
# shape at the same position. Text-to-image with the same caption (the image ignored) is a
# reference, and so is the VAE's round trip of the original (what any latent model can keep at
# best). Four of each:

# %%
rows_small, shown = evaluate_inpainting(inpaint_unet, n=4)
methods = ["blending", "nine_channel", "text_to_image"]
fig, axes = plt.subplots(2 * 4, 2 + len(methods), figsize=(6.2, 13.5))
for r, (kind, k) in enumerate((kind, k) for kind in ("complete", "replace") for k in range(4)):
    s = shown[kind]
    masked = s["original"][k].copy()
    masked[s["masks"][k, 0].numpy() > 0.5] = 128          # the masked part in grey
    for c, (title, im) in enumerate([("image", s["original"][k]), ("mask", masked)]
                                    + [(name, s[name][k]) for name in methods]):
        axes[r, c].imshow(im)
        axes[r, c].set_xticks([])
        axes[r, c].set_yticks([])
        if r == 0 or r == 4:
            axes[r, c].set_title(f"{title}\n({kind})" if c == 0 else title.replace("_", " "), fontsize=8)
    axes[r, 0].set_ylabel(s["captions"][k].removeprefix("a "), fontsize=6)
plt.tight_layout()
plt.show()

# %% [markdown]
# The table, measured by `python -m minisd train inpaint` on 300 images per task (one seed,
# course sampling) and stored in `data/course_inpaint_eval.json`. "all": the pixel judge reads
# the caption's colour, shape and position (for *replace* on the inside of the mask only, the
# outside set to black); fidelity: the soft IoU of the judged shape (chapter 12); PSNR outside:
# the kept part against the original; for *complete* also PSNR inside, against the original's
# hidden half (one right answer). 95 % intervals in brackets.

# %%
record = json.loads((DATA_DIR / "course_inpaint_eval.json").read_text())
names = {"blending": "base + latent blending", "nine_channel": "9-channel course U-Net",
         "text_to_image": "text-to-image (no image)", "vae_round_trip": "VAE round trip (ceiling)"}
fmt = lambda v, p=3: f"{v[0]:.{p}f} [{v[1]:.{p}f}, {v[2]:.{p}f}]"   # noqa: E731
for kind, rows in record["rows"].items():
    print(f"{kind} (n = {rows['blending']['n']}): {record['tasks'][kind]}")
    print(f"  {'method':27s} {'all':21s} {'fidelity':21s} {'PSNR outside (dB)':21s} PSNR inside (dB)")
    for key, row in rows.items():
        inside = fmt(row["psnr_inside"], 1) if "psnr_inside" in row else "-"
        judged = "-" if key == "vae_round_trip" and kind == "replace" else fmt(row["all"])
        fid = "-" if key == "vae_round_trip" and kind == "replace" else fmt(row["fidelity"])
        print(f"  {names[key]:27s} {judged:21s} {fid:21s} {fmt(row['psnr_outside'], 1):21s} {inside}")
rc, rr = record["rows"]["complete"], record["rows"]["replace"]

# %%
gap = rc["nine_channel"]["psnr_outside"][0] - rc["text_to_image"]["psnr_outside"][0]
print(f"complete, outside: blending {rc['blending']['psnr_outside'][0]:.1f} dB (VAE ceiling "
      f"{rc['vae_round_trip']['psnr_outside'][0]:.1f}), 9-channel {rc['nine_channel']['psnr_outside'][0]:.1f} dB, "
      f"text-to-image {rc['text_to_image']['psnr_outside'][0]:.1f} dB: the 9-channel model's use of the image "
      f"is worth {gap:+.1f} dB over ignoring it")
print(f"complete, shape: fidelity blending {rc['blending']['fidelity'][0]:.3f} vs 9-channel "
      f"{rc['nine_channel']['fidelity'][0]:.3f} (a half shape from the image and a half from the model must meet)")
print(f"replace, inside: judged right, blending {rr['blending']['all'][0]:.3f} vs 9-channel "
      f"{rr['nine_channel']['all'][0]:.3f}; colour right, blending {rr['blending']['colour'][0]:.3f}")
assert rc["text_to_image"]["psnr_outside"][0] < rc["blending"]["psnr_outside"][0]   # blending keeps the outside

# %% [markdown]
# How to read it. **Blending keeps the outside by construction**: its final latents there are the
# image's, so its PSNR outside sits a few dB under the VAE's round trip (the decoder mixes
# neighbouring latents, so the seam costs a little). What it cannot make sure of is that the two
# sides *agree*: the repainted part sees the kept part only through noisy latents, so a half shape
# from the image and a half drawn by the model need not meet (the fidelity of *complete*), and in
# *replace* the latent cells just outside the box, which the VAE's encoder filled with some of the
# old shape's colour, are pasted back at every step and bleed into the new shape (its colour is
# the part the judge most often gets wrong; the red circle with a yellow rim in the figure).
# **The 9-channel model** sees the masked image at every step and is free to redraw everything, so
# nothing bleeds in (*replace*), but nothing forces it to reproduce the outside either: how much of
# the image it keeps is what its fine-tune learned, the +dB over text-to-image above (diffusers
# does not paste the original back; UIs often do), and a few CPU minutes teach it much less of
# that than SD's 440k inpainting steps did. The *replace* task's "outside" is the black
# background, which text-to-image keeps as well: that task tests the inside.

# %% [markdown]
# **Exercise 16.5 (★)** The mask is drawn in pixels but used in latent space, shrunk by
# nearest neighbour (`F.interpolate`, as diffusers). A white 6x6 square at rows and columns
# 5-10 of a 32x32 mask: which latent cells of the 8x8 grid are repainted, and what share of the
# square's pixels ends up repainted by the 9-channel model's mask channel or by blending?

# %% tags=["solution", "hide-cell"]
mask = torch.zeros(1, 1, 32, 32)
mask[..., 5:11, 5:11] = 1.0
small = F.interpolate(mask, size=(8, 8))                      # nearest: cell i reads pixel 4 i
cells = torch.nonzero(small[0, 0]).tolist()
back = small.repeat_interleave(4, 2).repeat_interleave(4, 3)  # each cell covers 4x4 pixels
share = float((back * mask).sum() / mask.sum())
print(f"repainted cells: {cells}; share of the white square repainted: {share:.2f}")
# only cell (2, 2) reads a white pixel (8, 8): the repainted region is pixels 8-11, which covers 9 of the
# 36 white pixels (and 7 black ones): masks should be drawn on the latent grid (multiples of 8 in SD)
assert cells == [[2, 2]] and share == 0.25

# %% [markdown]
# **Exercise 16.6 (★★, break it and watch)** Take the blending hook away: the same loop, the
# same noise, no `after_step`. On 24 *complete* tasks, how far does the PSNR outside the mask
# fall, and does the model still draw the caption?

# %% tags=["solution", "hide-cell"]
images, masks, prompts = inpaint_task(24, kind="complete")
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    x = 2 * (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 255) - 1
    z0 = pipe.vae.encode(x).sample(g) * pipe.vae.scaling_factor
    noise = torch.randn(z0.shape, generator=g)
    m = F.interpolate(masks, size=z0.shape[-2:])
    context = torch.cat([pipe.encode_prompt([""] * len(images)), pipe.encode_prompt(prompts)])
    out = {}
    for name, hook in (("with blending", blend), ("without", None)):
        sched.set_timesteps(pipe.steps)
        lat = denoise(pipe.unet, noise * sched.init_noise_sigma, context, sched, guidance=pipe.guidance,
                      after_step=hook)
        out[name] = np.rint(pipe.decode(lat).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
psnr = {k: psnr_outside(v, images, masks).mean() for k, v in out.items()}
print({k: f"{v:.1f} dB" for k, v in psnr.items()})
# without the hook it is text-to-image: a right shape somewhere near, not this image's shape
assert psnr["without"] < psnr["with blending"] - 3
