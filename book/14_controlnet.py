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
# # 14. ControlNet: telling the model where
#
# **You will build** a {term}`ControlNet` for the course U-Net: `controlnet.ControlNet` (a
# trainable copy of the U-Net's encoder and mid block, the hint encoder, the
# {term}`zero convolution`s), `ControlNet.from_unet`, the residual inputs of `UNet.forward`,
# `pipe(prompt, controlnet=cn, control_image=img)`, the trainer `python -m minisd train
# controlnet`, and `ControlNet.from_pretrained` for the real files, checked against diffusers.
#
# A prompt says *what*; it is a poor way to say *where*. The course model draws "a red circle in
# the top left" because its captions name five positions, but no caption can say "this outline,
# here". ControlNet (Zhang, Rao and Agrawala {cite:p}`zhang2023controlnet`, the seed's second
# link) adds an image input to a trained Stable Diffusion {cite:p}`rombach2022ldm` without
# touching it: an edge map, a depth map, a pose, a mask. The base model stays frozen; a copy of
# its encoder reads the control image and adds what it finds to the {term}`skip connection`s of
# the {term}`U-Net`, through convolutions that start at zero.
#
# With $\mathcal F(\cdot;\Theta)$ the frozen encoder block, $c$ the control, and
# $\mathcal Z$ a 1x1 convolution whose weights and bias start at 0, a controlled block computes
#
# $$y_c = \mathcal F(x;\Theta) + \mathcal Z\big(\mathcal F(x + \mathcal Z(c;\Theta_{z1});\Theta_c);\Theta_{z2}\big),$$
#
# where $\Theta_c$ starts as a copy of $\Theta$. At initialisation both $\mathcal Z$ give 0, so
# $y_c = \mathcal F(x;\Theta)$ exactly: training starts from the base model, not from noise
# injected into it.

# %%
# %matplotlib inline
import json
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import minisd
from minisd import DATA_DIR, StableDiffusion, checkpoint, data
from minisd.controlnet import ControlNet, ControlNetConfig
from minisd.diffusion import training_loss
from minisd.train.controlnet import follow_scores, generate, held_out_controls, hints, silhouettes, summarise

_ = torch.manual_seed(0)
torch.set_num_threads(2)

# %% [markdown]
# ## The trainable copy
#
# `ControlNet.from_unet(unet)` builds the copy: the U-Net's `conv_in`, `time_embedding`,
# `down_blocks` and `mid_block` (the same modules as chapter 4's, `unet.down_blocks(config)`),
# their weights copied, plus what the U-Net does not have: the hint encoder and one zero
# convolution per skip. The decoder is not copied: the ControlNet's outputs are *added* to the
# skips the frozen decoder reads, and to the mid block's output.

# %%
pipe = StableDiffusion.course_model()
unet = pipe.unet
cn0 = ControlNet.from_unet(unet, hint_channels=(16, 32, 64)).eval()
count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
n_skips = 1 + sum(len(b.resnets) + (b.downsample is not None) for b in unet.down_blocks)
print(f"course U-Net: {count(unet):,} parameters; its ControlNet: {count(cn0):,} "
      f"({count(cn0) / count(unet):.0%}), of which the hint encoder {count(cn0.hint_encoder):,}")
print(f"skips in the U-Net: {n_skips}; zero convs: {len(cn0.zero_convs)} + 1 on the mid block")
for name in ("conv_in", "down_blocks", "mid_block"):
    same = all(torch.equal(a, b) for a, b in zip(getattr(cn0, name).state_dict().values(),
                                                 getattr(unet, name).state_dict().values()))
    print(f"{name:12s} copied from the U-Net: {same}")
assert len(cn0.zero_convs) == n_skips

# %% [markdown]
# The hint encoder brings the control image down to the latent size: the course VAE makes 8x8
# latents of 32x32 images (factor 4), so two stride-2 convolutions; SD's factor 8 needs three
# (`ControlNetConfig.sd15().hint_channels` = (16, 32, 96, 256), the paper's "tiny network").
# Its last conv, like the zero convs, starts at zero.

# %%
images, captions = data.sample(4, seed=3)
controls = silhouettes(images)               # the course control: the shape's silhouette
with torch.no_grad():
    h = hints(controls)
    x = torch.nn.functional.silu(cn0.hint_encoder.conv_in(h))
    for conv in cn0.hint_encoder.blocks:
        x = torch.nn.functional.silu(conv(x))
    embedded = cn0.hint_encoder(h)
print(f"control {tuple(h.shape)} -> hint features {tuple(x.shape)} -> conv_out {tuple(embedded.shape)} "
      f"(latents: {tuple(pipe.vae.encode(data.to_tensor(images)).mean.shape)})")
print(f"conv_out at initialisation: largest output {float(embedded.abs().max())}")
assert embedded.shape[-2:] == (8, 8) and float(embedded.abs().max()) == 0.0

# %% [markdown]
# ## Why a zero convolution still learns
#
# A zero conv is $y = W x + b$ per pixel with $W = 0$, $b = 0$. Its output is 0, and the
# gradient it passes *back* is $\partial L / \partial x = W^\top g = 0$ (with $g = \partial L /
# \partial y$). But its own gradients are
#
# $$\frac{\partial L}{\partial W} = \sum_{\text{pixels}} g\, x^\top, \qquad \frac{\partial L}{\partial b} = \sum_{\text{pixels}} g,$$
#
# which are zero only if $g$ or $x$ is. $x$ is the copy's feature map, not zero; $g$ is the
# gradient of the loss at the U-Net's skip, not zero either. So the first step moves the zero
# convs and nothing behind them (the copy's gradient passes through $W^\top = 0$); from the
# second step $W \neq 0$ and the copy learns too. Below, one training step on a course batch
# checks each of these numbers.

# %%
vae, text_encoder, tok = pipe.vae, pipe.text_encoder, pipe.tokenizer
batch, batch_captions = data.sample(16, seed=11)
with torch.no_grad():
    x0 = vae.encode(data.to_tensor(batch)).mean * vae.scaling_factor
    context = text_encoder(tok(batch_captions))
hint = hints(silhouettes(batch))
cn = ControlNet.from_unet(unet, hint_channels=(16, 32, 64))
unet.requires_grad_(False)


def controlled(x, t, c):
    down, mid = cn(x, t, c, hint)
    return unet(x, t, c, down_residuals=down, mid_residual=mid)


g = torch.Generator().manual_seed(0)
with torch.no_grad():
    a = training_loss(controlled, x0, context, generator=torch.Generator().manual_seed(0))
    b = training_loss(unet, x0, context, generator=torch.Generator().manual_seed(0))
print(f"loss with the untrained ControlNet {a.item():.6f}, without {b.item():.6f}: difference {abs(a - b).item()}")
training_loss(controlled, x0, context, generator=g).backward()
zc = cn.zero_convs[0]
grad_w, grad_b = float(zc.weight.grad.abs().max()), float(zc.bias.grad.abs().max())
copy_grad = max(float(p.grad.abs().max()) for p in cn.down_blocks.parameters())
print(f"zero conv 0: output 0, weight gradient up to {grad_w:.2e}, bias gradient up to {grad_b:.2e}")
print(f"the copy behind it (down_blocks): largest gradient {copy_grad}")
assert a.item() == b.item() and grad_w > 0 and grad_b > 0 and copy_grad == 0.0

# %%
opt = torch.optim.SGD(cn.parameters(), lr=0.1)
opt.step()
opt.zero_grad()
training_loss(controlled, x0, context, generator=torch.Generator().manual_seed(1)).backward()
copy_grad_2 = max(float(p.grad.abs().max()) for p in cn.down_blocks.parameters())
print(f"after one step: zero conv 0's weights up to {float(zc.weight.detach().abs().max()):.2e}; "
      f"the copy's largest gradient now {copy_grad_2:.2e}")
assert copy_grad_2 > 0

# %% [markdown]
# ## The U-Net with a ControlNet
#
# `UNet.forward(x, t, context, down_residuals=, mid_residual=)` adds the ControlNet's outputs
# to its skips (after the encoder has run: the encoder itself sees nothing of them) and to the
# mid block's output, as diffusers' `down_block_additional_residuals` and
# `mid_block_additional_residual` do. Without them the U-Net is chapter 4's, bit for bit. An
# untrained ControlNet changes nothing at all, so a whole sampling run is unchanged too:

# %%
prompt = "a red circle in the top left"
control = silhouettes(data.sample(1, seed=5, only=[("red", "square", "in the bottom right")])[0])[0]
plain = pipe(prompt, seed=0, output_type="np", progress=False)
with_untrained = pipe(prompt, seed=0, output_type="np", progress=False, controlnet=cn0, control_image=control)
print(f"largest pixel difference, untrained ControlNet vs none: {np.abs(with_untrained - plain).max()}")
assert np.abs(with_untrained - plain).max() == 0.0

# %% [markdown]
# ## Training the course ControlNet
#
# `python -m minisd train controlnet` (`minisd/train/controlnet.py`) trains a ControlNet on the
# frozen course U-Net, with SD's loss (chapter 9) and the residuals added:
# $\lVert \epsilon - \epsilon_\theta(x_t, t, c, \text{control}) \rVert^2$. The control is the
# shape's **silhouette** (grey, so it says where and which shape, not the colour). Half of the
# training captions name another position than the silhouette's: the only way to lower the loss
# on those is to follow the control, which is what we want when prompt and control disagree.
# The command and its time are in `data/README.md`; the chapter reads its checkpoint and log.
#
# The paper reports a **sudden convergence**: for thousands of steps the model ignores the
# control, then within a few hundred it starts to follow it. The trainer measured that directly:
# every 100 steps it generated 48 held-out silhouettes with prompts naming another position and
# measured how well the images follow them.

# %%
log = json.loads((DATA_DIR / "course_controlnet_log.json").read_text())
course_cn = checkpoint.load_checkpoint(DATA_DIR / "course_controlnet.safetensors")
loss = np.array(log["loss"])
smooth = np.convolve(loss, np.ones(25) / 25, mode="valid")
probe_steps = [p["step"] for p in log["probe"]]
probe_iou = [p["iou"] for p in log["probe"]]
probe_pos = [p["position"] for p in log["probe"]]
fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
ax[0].plot(loss, lw=0.5, alpha=0.4, label="loss per step")
ax[0].plot(np.arange(24, len(loss)), smooth, lw=1.5, label="mean of 25")
ax[0].set(xlabel="step", ylabel="loss", ylim=(0, np.percentile(loss, 99)), title="training loss")
ax[0].legend()
ax[1].plot(probe_steps, probe_iou, "o-", label="IoU with the control")
ax[1].plot(probe_steps, probe_pos, "s-", label="at the control's position")
ax[1].set(xlabel="step", ylim=(0, 1), title="following the control (48 held-out controls)")
ax[1].legend()
plt.tight_layout()
plt.show()
half = next(s for s, v in zip(probe_steps, probe_pos) if v >= probe_pos[-1] / 2)
print(f"{log['command']}: {log['train_cpu_seconds']} CPU s ({log['threads']} thread)")
print(f"position following: {probe_pos[0]:.0%} at step 0, half its final {probe_pos[-1]:.0%} first at step {half}")
print(f"loss: mean of the first 100 steps {loss[:100].mean():.4f}, of the last 100 {loss[-100:].mean():.4f}")

# %% [markdown]
# The right-hand curve is the one to read for the sudden convergence: the loss falls only a
# little (most of the noise in a latent is predicted equally well with or without the
# control), while the share of images that land where the control says jumps within a few
# hundred steps, as printed above. A small model with a large learning rate converges in
# hundreds of steps, not the paper's thousands, but the shape of the curve, flat and then a
# step, is the same.

# %% [markdown]
# ## Control image to sample
#
# Held-out silhouettes (new jitter and size), each with a prompt that names *another*
# position and a random colour: the base model follows the prompt, the ControlNet the control.

# %%
ctrl, truth, prompts = held_out_controls(8, seed=2024)
prompt_list = [data.caption(*c) for c in data.combinations()] + [""]
index = {p: i for i, p in enumerate(prompt_list)}
with torch.no_grad():
    contexts = text_encoder(tok(prompt_list))
base_images = generate(unet, vae, contexts, prompts, index)
cn_images = generate(unet, vae, contexts, prompts, index, ctrl, course_cn)
fig, axes = plt.subplots(3, 8, figsize=(12, 5))
for i in range(8):
    for row, (im, title) in enumerate(((ctrl[i], "control"), (base_images[i], "base"), (cn_images[i], "ControlNet"))):
        axes[row, i].imshow(im)
        axes[row, i].set_xticks([]), axes[row, i].set_yticks([])
        if i == 0:
            axes[row, i].set_ylabel(title)
    axes[0, i].set_title(prompts[i].replace(" in the ", "\n"), fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# Measured on 300 held-out controls (the trainer's evaluation, with the course model's
# recommended sampler, steps and guidance, printed below): the
# IoU of the generated shape's mask (soft mask > 0.5, chapter 12's `metrics.soft_mask`) with the
# control's, the share of images the pixel judge places at the control's position, and the
# share drawn in the prompt's colour, each with its 95 % interval, for the ControlNet and for
# the base model on the same prompts and noise.

# %%
ev = log["evaluation"]
print(f"{ev['controls']} held-out controls, {ev['sampler']} {ev['steps']} steps, guidance {ev['guidance']}")
for name in ("controlnet", "base"):
    r = ev[name]
    print(f"{name:10s} (n={r['n']}): IoU {r['iou'][0]:.3f} [{r['iou'][1]:.3f}, {r['iou'][2]:.3f}]; "
          f"IoU >= 0.5 {r['iou_over_half'][0]:.1%}; at the control's position {r['position'][0]:.1%} "
          f"[{r['position'][1]:.1%}, {r['position'][2]:.1%}]; prompt's colour {r['colour'][0]:.1%} "
          f"[{r['colour'][1]:.1%}, {r['colour'][2]:.1%}]")
assert ev["controlnet"]["position"][0] > ev["base"]["position"][0]

# %% [markdown]
# ## The conditioning scale
#
# `controlnet_scale` multiplies every residual (diffusers' `controlnet_conditioning_scale`).
# At 0 the U-Net is the base model exactly; between 0 and 1 the control competes with the
# prompt; above 1 it is pushed harder than it was trained for. Here on 24 held-out controls
# whose prompts name another position:

# %%
ctrl_s, truth_s, prompts_s = held_out_controls(24, seed=99)
scales = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]
sweep, row = {}, []
for s in scales:
    imgs = generate(unet, vae, contexts, prompts_s, index, ctrl_s, course_cn, scale=s)
    r = follow_scores(imgs, ctrl_s, truth_s, prompts_s)
    sweep[s] = (float(r["iou"].mean()), float(r["position"].mean()))
    row.append(imgs[0])
fig, axes = plt.subplots(1, len(scales) + 1, figsize=(11, 2.1))
axes[0].imshow(ctrl_s[0])
axes[0].set_title("control", fontsize=8)
for ax, s, im in zip(axes[1:], scales, row):
    ax.imshow(im)
    ax.set_title(f"scale {s}\nIoU {sweep[s][0]:.2f}", fontsize=8)
for ax in axes:
    ax.set_xticks([]), ax.set_yticks([])
plt.suptitle(prompts_s[0], fontsize=9)
plt.tight_layout()
plt.show()
for s in scales:
    print(f"scale {s:4}: mean IoU {sweep[s][0]:.3f}, at the control's position {sweep[s][1]:.0%} (24 controls)")
assert sweep[1.0][0] > sweep[0.0][0]

# %% [markdown]
# ## Equal to diffusers
#
# The trained course ControlNet, renamed to diffusers' keys (`controlnet.controlnet_diffusers_key`:
# `hint_encoder` is `controlnet_cond_embedding`, `zero_convs` `controlnet_down_blocks`,
# `mid_zero_conv` `controlnet_mid_block`, the copy keeps the U-Net's names), in diffusers'
# `ControlNetModel`, and the course U-Net in `UNet2DConditionModel` taking its residuals:

# %%
import diffusers  # noqa: E402

from minisd import weights  # noqa: E402
from minisd.controlnet import controlnet_diffusers_key  # noqa: E402

theirs = diffusers.ControlNetModel(**course_cn.config.to_diffusers()).eval()
theirs.load_state_dict({controlnet_diffusers_key(k): v for k, v in course_cn.state_dict().items()})
their_unet = diffusers.UNet2DConditionModel(**unet.config.to_diffusers()).eval()
their_unet.load_state_dict(weights.unet_to_diffusers(unet.state_dict()))
xt = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
ctx = context[:4]
with torch.no_grad():
    down, mid = course_cn(xt, 500, ctx, hint[:4])
    their_down, their_mid = theirs(xt, 500, encoder_hidden_states=ctx, controlnet_cond=hint[:4], return_dict=False)
    ours_eps = unet(xt, 500, ctx, down_residuals=down, mid_residual=mid)
    their_eps = their_unet(xt, 500, encoder_hidden_states=ctx, down_block_additional_residuals=their_down,
                           mid_block_additional_residual=their_mid).sample
res_diff = max(float((a - b).abs().max()) for a, b in zip([*down, mid], [*their_down, their_mid]))
eps_diff = float((ours_eps - their_eps).abs().max())
print(f"ControlNet residuals: largest difference {res_diff:.1e}; U-Net with residuals: {eps_diff:.1e}")
assert res_diff < 1e-5 and eps_diff < 1e-5

# %% [markdown]
# `tests/test_controlnet.py` checks the rest: residuals equal to diffusers' at SD 1.5's size on
# random weights (within 1e-4), `from_unet` equal to diffusers' `ControlNetModel.from_unet`, the
# whole `pipe(..., controlnet=...)` and `pipe.img2img(..., controlnet=...)` equal to
# `StableDiffusionControlNetPipeline` and its img2img pipeline (images within 2e-3) with one
# ControlNet and with two, and the files below.
#
# ## The real files
#
# SD 1.5's ControlNets come in three layouts, all read by `ControlNet.from_pretrained(path)`
# through one key map (`controlnet.original_key`): the diffusers folders
# (`lllyasviel/control_v11p_sd15_canny`), the 1.1 files (`control_v11p_sd15_canny.pth`: the
# copy under the U-Net's original names `input_blocks.*`, `middle_block.*`, plus
# `input_hint_block.*`, `zero_convs.*`, `middle_block_out.*`) and the 1.0 files
# (`control_sd15_canny.pth`: the same under `control_model.*`, bundled with a whole SD 1.5 that
# is ignored). README says where they come from. SD 1.5's ControlNet, built on the meta device
# (no memory), has these keys in the 1.1 layout:

# %%
from minisd.controlnet import original_key  # noqa: E402

with torch.device("meta"):
    sd15_cn = ControlNet(ControlNetConfig.sd15())
names = [original_key(k, sd15_cn.config) for k in sd15_cn.state_dict()]
print(f"{count(sd15_cn):,} parameters in {len(names)} tensors, e.g. {names[0]}, {names[-1]}")
print("hint encoder:", sorted({n.rsplit('.', 1)[0] for n in names if n.startswith('input_hint_block')},
                              key=lambda n: int(n.split('.')[1])))
real = os.environ.get("MINISD_CONTROLNET_FILE")
if real:
    real_cn = ControlNet.from_pretrained(real)
    print(f"{real}: {count(real_cn):,} parameters, {real_cn.config.unet.context_dim}-wide text context, "
          f"hint channels {real_cn.config.hint_channels}")
else:
    print("MINISD_CONTROLNET_FILE is not set: skipped loading a real ControlNet file")
assert count(sd15_cn) == 361_279_120

# %% [markdown]
# A ControlNet for another model is refused before any work, with what differs: here an SD 2.x
# ControlNet (1024-wide text context) offered to the course model.

# %%
with torch.device("meta"):
    other = ControlNet(ControlNetConfig(unet=minisd.UNetConfig.sd21()))
try:
    pipe(prompt, controlnet=other, control_image=control, progress=False)
except ValueError as e:
    message = str(e)
print(message)
assert "SD 2.x" in message

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 14.1 (★)** How many zero convolutions does SD 1.5's ControlNet have, and what share
# of SD 1.5's U-Net (859,520,964 parameters) does the ControlNet add? Count the skips from the
# config (conv_in, then `layers_per_block` per level plus one Downsample on every level but the
# last) and check against the model built on the meta device.

# %% tags=["solution", "hide-cell"]
cfg = ControlNetConfig.sd15().unet
skips = 1 + sum(cfg.layers_per_block + (i < len(cfg.block_channels) - 1) for i in range(len(cfg.block_channels)))
print(f"zero convs: {skips} on the skips + 1 on the mid block = {skips + 1}; the model has "
      f"{len(sd15_cn.zero_convs) + 1}")
print(f"SD 1.5's ControlNet adds {count(sd15_cn):,} parameters, {count(sd15_cn) / 859_520_964:.0%} of the U-Net")
assert skips + 1 == len(sd15_cn.zero_convs) + 1 == 13

# %% [markdown]
# **Exercise 14.2 (★★, break it and watch)** The zero in "zero convolution" is what makes an
# untrained ControlNet harmless. Break it: give the zero convs of `cn0` PyTorch's default random
# initialisation (`nn.Conv2d(...).reset_parameters()`) and sample the base model's own prompts
# with it. How far does the U-Net's noise prediction move, and what happens to the images?

# %% tags=["solution", "hide-cell"]
broken = ControlNet.from_unet(unet, hint_channels=(16, 32, 64)).eval()
torch.manual_seed(0)
for conv in [*broken.zero_convs, broken.mid_zero_conv]:
    conv.reset_parameters()                               # no longer zero: random, as any new layer
with torch.no_grad():
    down, mid = broken(xt, 500, ctx, hint[:4])
    moved = float((unet(xt, 500, ctx, down, mid) - unet(xt, 500, ctx)).abs().max())
base_prompts = [data.caption(*c) for c in data.combinations()[::3]]                # 30 prompts
base_truth = [data.parse(p) for p in base_prompts]
ctrl_b = silhouettes(data.sample(30, seed=8)[0])                                   # any controls
images_base = generate(unet, vae, contexts, base_prompts, index)
images_broken = generate(unet, vae, contexts, base_prompts, index, ctrl_b, broken)
judge_base = follow_scores(images_base, ctrl_b, base_truth, base_prompts)
judge_broken = follow_scores(images_broken, ctrl_b, base_truth, base_prompts)
change = np.abs(images_broken.astype(float) - images_base.astype(float)).mean() / 255
print(f"random zero convs move the noise prediction by up to {moved:.2f} (zero convs: 0.0), "
      f"the images by {change:.1%} of the pixel range on average")
print(f"the prompt's position: base {judge_base['position'].mean():.0%}, with the broken ControlNet "
      f"{judge_broken['position'].mean():.0%}; the prompt's colour: {judge_base['colour'].mean():.0%} -> "
      f"{judge_broken['colour'].mean():.0%} (30 prompts)")
assert moved > 0.1 and change > 0.005

# %% [markdown]
# **Exercise 14.3 (★★)** Prompt against control, the other way round: keep the silhouette of a
# square but ask for "a ... circle" at the silhouette's position. Which shape does the
# ControlNet draw (it never saw a prompt disagree with the control's *shape* in training)?
# Measure on 30 controls with the pixel judge.

# %% tags=["solution", "hide-cell"]
squares = data.sample(30, seed=31, only=[(c, "square", p) for c in data.COLOURS for p in data.POSITIONS])
ctrl_q = silhouettes(squares[0])
circle_prompts = [data.caption(c, "circle", p) for c, _, p in map(data.parse, squares[1])]
drawn = minisd.metrics.pixel_judge(generate(unet, vae, contexts, circle_prompts, index, ctrl_q, course_cn))
share = {s: np.mean([d["shape"] == s for d in drawn]) for s in data.SHAPES}
print("square silhouettes, prompts asking for a circle there:", {s: f"{v:.0%}" for s, v in share.items()})
winner = max(share, key=share.get)
print(f"the {'control' if winner == 'square' else 'prompt'}'s shape wins: {winner}")
assert share["square"] + share["circle"] >= 0.8   # one of the two, not a mixture or a blank

# %% [markdown]
# ## What you built
#
# A ControlNet on the course model, from the parts up: `ControlNet.from_unet` copies the U-Net's
# encoder and mid block (`unet.down_blocks`, `unet.mid_block`), adds the hint encoder
# (`controlnet.HintEncoder`) and a zero convolution per skip, and `UNet.forward(...,
# down_residuals=, mid_residual=)` adds what it finds. Zero convs make the untrained ControlNet
# change nothing (a pixel difference of exactly 0 above) and still learn, because their own
# gradient $\sum g x^\top$ is not zero. `python -m minisd train controlnet` trained one on
# silhouettes in minutes on a CPU, and the numbers above say how often the course model now
# draws where the control says, against the base model, and where the sudden convergence came.
# `pipe(..., controlnet=, control_image=, controlnet_scale=)` runs it (also in `img2img`, and
# several at once), equal to diffusers' pipelines; `ControlNet.from_pretrained` reads the real
# 1.0, 1.1 and diffusers files. Next: the same frozen U-Net, sampled in far fewer steps.
