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
# # 9. Training the U-Net
#
# Chapters 1-4 built the U-Net, 5-6 the VAE, 7-8 the text encoder. This chapter is where SD
# *learns*: the U-Net is trained to remove noise from VAE latents, guided by CLIP's reading
# of the caption. The VAE and the text encoder stay **frozen** the whole time (SD 1.x trained
# only its U-Net); they are used once per image to turn pictures into latents and captions
# into contexts.
#
# The recipe fits in one line. Take a clean latent $x_0 = s \cdot E(\text{image})$ (the VAE
# encoder's output times its scaling factor $s$), a caption's context $c$, a random step
# $t \in \{0, \dots, 999\}$ and Gaussian noise $\epsilon$, and minimise
#
# $$
# L = \mathbb{E}_{x_0, c, t, \epsilon}\Big[\big\lVert \epsilon - \epsilon_\theta\big(\sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon,\; t,\; c\big)\big\rVert^2\Big].
# $$
#
# This chapter takes the pieces in order: the forward noising and its schedule
# $\bar\alpha_t$, the loss, caption dropout (what makes classifier-free guidance possible),
# the real SD 1.1 → 1.5 training runs, and then a small text-conditioned latent U-Net trained
# on the course data, judged automatically on colour, shape and position.

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import minisd
from minisd import data, train
from minisd.diffusion import NoiseSchedule, add_noise, drop_captions, training_loss

torch.manual_seed(0)
schedule = NoiseSchedule.sd15()
abar = schedule.alphas_cumprod
print("betas", tuple(schedule.betas.shape), f"{schedule.betas[0]:.5f} -> {schedule.betas[-1]:.5f}")
print("abar ", tuple(abar.shape), f"{abar[0]:.5f} -> {abar[-1]:.7f}")

# %% [markdown]
# ## The forward process: noise in one jump
#
# DDPM defines a chain that adds a little noise at each of $T = 1000$ steps,
# $q(x_t \mid x_{t-1}) = \mathcal N(\sqrt{1-\beta_t}\,x_{t-1},\, \beta_t I)$. Gaussians compose,
# so any step can be reached from $x_0$ in one jump, with
# $\bar\alpha_t = \prod_{s \le t}(1-\beta_s)$:
#
# $$
# x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon, \qquad \epsilon \sim \mathcal N(0, I).
# $$
#
# That is what makes training cheap: no chain is simulated, each example gets its own random
# $t$. SD 1.x uses **scaled-linear** betas, linear in $\sqrt\beta$ from
# $\sqrt{0.00085}$ to $\sqrt{0.012}$; the DDPM paper's plain linear $10^{-4} \to 0.02$ is drawn
# beside it. Written out by hand, SD's $\bar\alpha_t$ is exactly `NoiseSchedule.sd15()`'s:

# %%
betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
by_hand = torch.cumprod(1 - betas, dim=0)
print("max |by hand - NoiseSchedule.sd15()| =", f"{(by_hand - abar).abs().max():.1e}")

ddpm = NoiseSchedule.ddpm().alphas_cumprod
fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
for name, a in (("SD 1.x: scaled linear 0.00085 -> 0.012", abar), ("DDPM: linear 1e-4 -> 0.02", ddpm)):
    ax[0].plot(a, label=name)
    ax[1].plot(0.5 * torch.log10(a / (1 - a)), label=name)
ax[0].set(xlabel="t", ylabel=r"$\bar\alpha_t$ (share of signal variance)", title=r"$\bar\alpha_t$")
ax[1].set(xlabel="t", ylabel=r"$\log_{10}\sqrt{\bar\alpha_t / (1-\bar\alpha_t)}$", title="signal-to-noise ratio (log)")
ax[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# SD's schedule keeps more signal for longer: at $t = 999$, $\bar\alpha = 0.0047$ (a
# signal-to-noise ratio of about 1 : 15 in amplitude), where DDPM's linear betas reach
# $4\cdot10^{-5}$. The last steps of SD's chain are therefore not quite pure noise, a known
# quirk of SD 1.x (Lin et al. 2023, *Common Diffusion Noise Schedules and Sample Steps are
# Flawed*).
#
# Here is the jump applied to course images: around $t = 600$ the colour is still there but the
# outline is going; by $t = 999$ almost nothing is left. SD noises *latents*, not pixels; the
# second row does the same to the course VAE's latents (4x8x8) and decodes each noisy
# latent, which is what the U-Net sees, made visible.

# %%
vae = minisd.checkpoint.course_vae().requires_grad_(False)
images, captions = data.sample(3, seed=4, exclude=data.HELD_OUT)
x0 = data.to_tensor(images)                                        # (3, 3, 32, 32) in [-1, 1]
with torch.no_grad():
    z0 = vae.encode(x0).mean * vae.scaling_factor                   # (3, 4, 8, 8)
print("images", tuple(x0.shape), "-> latents", tuple(z0.shape), f"(scaling factor {vae.scaling_factor:.4f})")

ts = [0, 100, 250, 400, 600, 800, 999]
g = torch.Generator().manual_seed(0)
eps_img, eps_lat = torch.randn(x0[:1].shape, generator=g), torch.randn(z0[:1].shape, generator=g)
fig, axes = plt.subplots(2, len(ts), figsize=(1.6 * len(ts), 3.6))
for j, t in enumerate(ts):
    xt = add_noise(x0[:1], eps_img, t)
    zt = add_noise(z0[:1], eps_lat, t)
    with torch.no_grad():
        decoded = vae.decode(zt / vae.scaling_factor)
    axes[0, j].imshow(data.to_uint8(xt)[0])
    axes[1, j].imshow(data.to_uint8(decoded)[0])
    axes[0, j].set_title(f"t = {t}\n" + rf"$\sqrt{{\bar\alpha_t}}$ = {abar[t] ** 0.5:.2f}", fontsize=8)
for a in axes.flat:
    a.set_xticks([]), a.set_yticks([])
axes[0, 0].set_ylabel("pixels", fontsize=8)
axes[1, 0].set_ylabel("latents,\ndecoded", fontsize=8)
fig.suptitle(captions[0], fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The loss, by hand and from the package
#
# Training draws, per example, $t \sim \mathcal U\{0..999\}$ and $\epsilon \sim \mathcal N(0, I)$,
# builds $x_t$, asks the U-Net for $\hat\epsilon = \epsilon_\theta(x_t, t, c)$, and regresses it
# onto $\epsilon$ with a mean squared error. SD predicts the noise (*epsilon prediction*); the
# $x_0$ it implies is $(x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}$, which the
# samplers of chapter 10 use. With a small random U-Net and a made-up context, the loss by
# hand and `minisd.diffusion.training_loss` agree when they draw from the same generator:

# %%
toy = minisd.UNet(minisd.UNetConfig.tiny()).eval()                 # context width 32
x = z0                                                              # (3, 4, 8, 8)
context = torch.randn(3, 77, 32)
g = torch.Generator().manual_seed(1)
t = torch.randint(0, 1000, (3,), generator=g)
eps = torch.randn(x.shape, generator=g)
with torch.no_grad():
    xt = abar[t].sqrt().view(-1, 1, 1, 1) * x + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * eps
    by_hand = ((toy(xt, t, context) - eps) ** 2).mean()
    package = training_loss(toy, x, context, generator=torch.Generator().manual_seed(1))
print("t =", t.tolist(), " x_t", tuple(xt.shape))
print(f"loss by hand {by_hand:.6f}   training_loss {package:.6f}")

# %% [markdown]
# ## Caption dropout: one model, two predictions
#
# From SD 1.3 on, the text was dropped 10 % of the time during training: the caption is
# replaced by the empty prompt `""`, whose context the U-Net also learns to use. The same
# network then predicts both $\epsilon_\theta(x_t, t, c)$ and the unconditional
# $\epsilon_\theta(x_t, t, \varnothing)$, and sampling can push away from the second:
#
# $$
# \hat\epsilon = \epsilon_\theta(x_t, t, \varnothing) + s\,\big(\epsilon_\theta(x_t, t, c) - \epsilon_\theta(x_t, t, \varnothing)\big),
# $$
#
# *classifier-free guidance* (Ho & Salimans 2022) with scale $s$ (7.5 for SD 1.5; chapter 10
# sweeps it). Without dropout there is no $\epsilon_\theta(\cdot, \varnothing)$ to subtract.

# %%
print(drop_captions(captions * 4, p=0.1, generator=torch.Generator().manual_seed(3)))
many = drop_captions(["a red circle in the center"] * 10_000, p=0.1, generator=torch.Generator().manual_seed(0))
print(f"dropped: {many.count('') / len(many):.1%} of 10,000")

# %% [markdown]
# ## How SD 1.1 - 1.5 were trained
#
# The seed notes trace the official runs. Every version shares one architecture (the 860M
# U-Net of chapter 4, the f = 8 VAE, CLIP ViT-L/14's text encoder) and differs only in what
# the U-Net saw and for how long:
#
# | version | starts from | steps | resolution | data | caption dropout (CFG) |
# |---|---|---|---|---|---|
# | SD 1.1 | scratch | 237,000 + 194,000 | 256² then 512² | LAION-2B-en (1,324M images ≥ 256 px), then laion-high-resolution (170M images ≥ 1024 px, from LAION-5B) | no |
# | SD 1.2 | SD 1.1 | 515,000 | 512² | laion-improved-aesthetics (~600M: aesthetic score > 5, ≥ 512 px, watermark probability < 0.5) | no |
# | SD 1.3 | SD 1.2 | 195,000 | 512² | laion-improved-aesthetics | 10 % |
# | SD 1.4 | SD 1.2 | 225,000 | 512² | laion-aesthetics v2 5+ | 10 % |
# | SD 1.5 | SD 1.2 | 595,000 | 512² | laion-aesthetics v2 5+ | 10 % |
#
# SD 1.3, 1.4 and 1.5 are three branches from the same SD 1.2 checkpoint, not a chain: 1.5 is
# simply the longest run. Training at 256² first and 512² later is cheap pre-training; the
# U-Net is convolutional plus attention, so the same weights accept either size.

# %% [markdown]
# ## The course U-Net
#
# The course model is the same recipe at a size a laptop trains in minutes. The frozen parts
# are the course VAE (chapter 6: 32x32 images -> 4x8x8 latents) and the course CLIP's text
# encoder (chapter 8: 77 tokens -> 77x64). The U-Net is `minisd.UNet`, the class of chapter 4,
# with a small `UNetConfig`: three levels (8x8, 4x4, 2x2), cross-attention at every level.

# %%
text_encoder = minisd.checkpoint.course_text_encoder()
tokenizer = minisd.CLIPTokenizer.sd15()
config = train.course_unet_config(text_encoder.config.width)
print(config)
print(f"{sum(p.numel() for p in minisd.UNet(config).parameters()):,} parameters")

# %% [markdown]
# Everything the training loop needs is computed once: a fixed pool of course images is
# encoded by the frozen VAE, and the 91 prompts (90 captions and `""`) by the frozen text
# encoder. The 9 combinations of `data.HELD_OUT` never appear, so the U-Net can be tested on
# pairings it has never seen. (SD, with billions of distinct captions, runs both frozen
# encoders on the fly.)

# %%
latents, labels, contexts, prompts = train.encode_course_data(vae, text_encoder, tokenizer, n=512, seed=0)
print("latents", tuple(latents.shape), f"std {latents.std():.3f}", " contexts", tuple(contexts.shape))
print("held-out captions in training:", sum(data.parse(prompts[i]) in data.HELD_OUT for i in labels.tolist()))

# %% [markdown]
# A short live run: 30 steps of `train.train_unet_model` (AdamW, 10 % caption dropout, an
# exponential moving average of the weights) from a fresh U-Net. The loss falls from about
# 1 (the variance of $\epsilon$: a U-Net that predicts nothing) within seconds.

# %%
torch.manual_seed(0)
fresh = minisd.UNet(config)
_, _, live = train.train_unet_model(fresh, latents, labels, contexts, prompts, steps=30, batch_size=32, lr=2e-3)
print("loss, first 3 steps:", [round(v, 3) for v in live["loss"][:3]], " last 3:", [round(v, 3) for v in live["loss"][-3:]])

# %% [markdown]
# The committed model, `data/course_unet.safetensors`, is the full run of
# `python -m minisd train unet`; its loss log ships beside it. The loss is noisy because each
# step draws new $t$: small $t$ (little noise, hard to see) gives large losses, large $t$ small
# ones.

# %%
log = json.loads((minisd.DATA_DIR / "course_unet_log.json").read_text())
loss = np.array(log["loss"])
smooth = np.convolve(loss, np.ones(50) / 50, mode="valid")
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.plot(loss, lw=0.5, alpha=0.35, label="per step")
ax.plot(np.arange(49, len(loss)), smooth, label="mean of 50 steps")
ax.plot(live["loss"], label="the live run above")
ax.set(xlabel="step", ylabel="MSE loss", yscale="log", title=log["command"])
ax.legend()
fig.tight_layout()
plt.show()
print({k: log[k] for k in ("steps", "batch_size", "lr", "images", "ema_decay")})

# %% [markdown]
# ## What it draws
#
# The pipeline of chapter 11 joins the three parts; for the course model it defaults to 25
# DDIM steps at guidance 4 (chapter 10 shows why: without guidance the colours and positions
# come out right but the shapes stay blobs). One image costs 25 U-Net calls on a batch of two.

# %%
pipe = minisd.StableDiffusion.course_model()
show = ["a red circle in the top left", "a green square in the center", "a blue triangle in the bottom right",
        "a yellow triangle in the top right", "a cyan circle in the bottom left", "a magenta square in the top left"]
held = [data.caption(*c) for c in data.HELD_OUT[:4]]
out = pipe(show + held, seed=0, output_type="np", progress=False)
fig = data.show((out * 255).round().astype(np.uint8), show + [h + " *" for h in held], ncols=5, fontsize=7)
fig.suptitle("generated by the course model (* = combination never seen in training)", fontsize=9, y=1.03)
plt.show()

# %% [markdown]
# ## Judged automatically
#
# `minisd.metrics.Judge` (chapter 12) reads each image's colour (a vote of the foreground
# pixels), position (the centroid) and shape (a small CNN trained on real course images).
# Here it scores one image for each of the 90 prompts, then the 9 held-out combinations
# with 10 seeds each; and, for scale, its own accuracy on real course images.

# %%
judge = minisd.metrics.Judge.load()
combos = data.combinations()
acc_all, gen, caps = train.judge_course_unet(pipe.unet, vae, contexts, prompts, judge, combos, seeds=(0,))
acc_held, _, _ = train.judge_course_unet(pipe.unet, vae, contexts, prompts, judge, data.HELD_OUT, seeds=range(10))
real_images, real_captions = data.sample(500, seed=12345)
acc_real = judge.accuracy(real_images, real_captions)
rows = [("90 prompts x 1 seed", acc_all), ("9 held-out x 10 seeds", acc_held), ("real images (judge)", acc_real)]
print(f"{'':24s}{'colour':>8s}{'shape':>8s}{'position':>10s}{'all':>7s}")
for name, a in rows:
    print(f"{name:24s}{a['colour']:8.1%}{a['shape']:8.1%}{a['position']:10.1%}{a['all']:7.1%}")

# %% [markdown]
# The full evaluation that `python -m minisd train unet` ran after training (all 90 prompts
# with 3 seeds, the held-out 9 with 10 seeds, the judge on 1,000 real images, and whether the
# moving average of the weights beat the last weights) is stored in the log:

# %%
print(json.dumps(log["evaluation"], indent=1))

# %% [markdown]
# ## Ours and diffusers' on the same weights
#
# The course U-Net is the same architecture diffusers calls `UNet2DConditionModel`; its
# config converts with `to_diffusers()` and the weights through chapter 4's key map. The same
# latents, step and contexts give the same noise prediction, and our `add_noise` matches
# diffusers' `DDPMScheduler.add_noise` on SD 1.5's schedule.

# %%
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

from minisd.weights import unet_key  # noqa: E402

ref = UNet2DConditionModel(**pipe.unet.config.to_diffusers()).eval()
ours_sd = pipe.unet.state_dict()
ref.load_state_dict({k: ours_sd[unet_key(k)] for k in ref.state_dict()})
xt, t = torch.randn(4, 4, 8, 8), torch.tensor([999, 500, 50, 1])
with torch.no_grad():
    d = (pipe.unet(xt, t, contexts[:4]) - ref(xt, t, encoder_hidden_states=contexts[:4]).sample).abs().max().item()
print(f"U-Net: ours == diffusers, max |diff| = {d:.1e}")

sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
noise = torch.randn(z0.shape)
t = torch.tensor([10, 500, 990])
d = (add_noise(z0, noise, t) - sched.add_noise(z0, noise, t)).abs().max().item()
print(f"add_noise: ours == diffusers, max |diff| = {d:.1e}")
