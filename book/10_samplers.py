# ---
# jupyter:
#   jupytext:
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
# # 10. Samplers and guidance
#
# Chapter 9 trained a U-Net to answer one question: *given a noisy latent $x_t$, the step
# $t$ and a caption, what noise $\epsilon$ was added?* A **sampler** (diffusers calls it a
# *scheduler*) turns that answer into a picture. It starts from pure noise $x_T$ and walks
# the noise chain backwards, calling the U-Net once per step:
#
# ```python
# sched.set_timesteps(25)
# x = noise * sched.init_noise_sigma
# for t in sched.timesteps:
#     eps = unet(sched.scale_model_input(x, t), t, context)
#     x = sched.step(eps, t, x)
# ```
#
# The seed notes name the family ("Sampling method: DDPM, DDIM, DPM++ ...") without opening
# it. This chapter opens five of them, all in `minisd.schedulers`, each a short class:
#
# | name | paper | idea | noise per step |
# |---|---|---|---|
# | `"ddpm"` | Ho et al. 2020 | the posterior mean of $x_{t-1}$ given the predicted $x_0$, plus fresh noise | yes |
# | `"ddim"` | Song et al. 2021 | jump straight to $t_\text{prev}$ along the predicted noise direction | no ($\eta = 0$) |
# | `"euler"` | Karras et al. 2022 | Euler's method on the probability-flow ODE, in $\sigma$ | no |
# | `"dpm++2m"` | Lu et al. 2022 | a 2nd-order multistep ODE solver in $\lambda = \log(\alpha/\sigma)$ | no |
# | `"pndm"` | Liu et al. 2022 | PLMS: a 4th-order Adams–Bashforth blend of past $\epsilon$s — SD 1.5's default | no |
#
# The course U-Net is not needed to understand any of them: a toy whose exact $\epsilon$ is
# known shows every sampler's behaviour, and it is what this chapter uses. The cells that
# run the five samplers on the course model come at the end.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import torch

import minisd
from minisd.schedulers import make_scheduler

torch.manual_seed(0)
NAMES = ["ddpm", "ddim", "euler", "dpm++2m", "pndm"]
abar = minisd.diffusion.NoiseSchedule.sd15().alphas_cumprod
print("abar:", abar.shape, f"{abar[0]:.5f} -> {abar[-1]:.7f}")

# %% [markdown]
# ## Where each sampler stops
#
# All five share SD 1.5's training schedule ($\bar\alpha_t$ from 0.99915 down to 0.0046601
# over $t = 0 \dots 999$). They differ first in *which* $t$ they visit. SD 1.5's
# `scheduler_config.json` sets `steps_offset: 1` but names no `timestep_spacing`, so each
# diffusers class keeps its own default:
#
# - **"leading"** (DDPM, DDIM, PNDM): every $\lfloor 1000/n \rfloor$-th step, plus 1:
#   $901, 801, \dots, 1$ for 10 steps. The chain never starts at $t = 999$.
# - **"linspace"** (Euler, DPM-Solver++): evenly spread over $[0, 999]$, starting at the very
#   noisiest step. Euler visits $n$ points ending at $t = 0$; DPM-Solver++ takes $n + 1$
#   points and drops the last, ending at $t \approx 1000/n$ and then stepping to $\sigma = 0$.
# - PNDM repeats its second timestep: $n$ steps cost $n + 1$ U-Net calls.
#
# *Check*: copy the config from a loaded SD 1.5 pipeline into `EulerDiscreteScheduler` and
# you get "linspace", not PNDM's "leading": diffusers remembers which keys were defaults
# (`_use_default_values`) and does not pass those on.

# %%
scheds = {}
for name in NAMES:
    scheds[name] = make_scheduler(name)
    scheds[name].set_timesteps(10)
    print(f"{name:8s} {len(scheds[name].timesteps):2d} calls:", [round(float(t)) for t in scheds[name].timesteps])

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
for row, name in enumerate(NAMES):
    ts = scheds[name].timesteps.float()
    axes[0].scatter(ts, np.full(len(ts), row), s=40, label=name)
    for t in ts.unique():  # number the U-Net calls; PNDM's repeated timestep gets two numbers
        calls = ",".join(str(k) for k in range(len(ts)) if ts[k] == t)
        axes[0].annotate(calls, (t, row), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    noise_level = (1 - abar[ts.round().long()]) ** 0.5
    axes[1].plot(range(len(ts)), noise_level, marker="osD^v"[row], ls=["-", "--", "-", "--", ":"][row],
                 label=name, alpha=0.8)
axes[0].set(yticks=range(len(NAMES)), yticklabels=NAMES, xlabel="timestep t", xlim=(1010, -10), ylim=(-0.5, 4.6),
            title="the timesteps each sampler visits (10 steps)")
axes[1].set(xlabel="U-Net call", ylabel=r"$\sqrt{1-\bar\alpha_t}$ (share of noise)", title="noise level per call")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## A toy with an exact $\epsilon$
#
# Take 2-D "data" from a mixture of five tight Gaussians, placed like the course's five
# positions: $p_0(x) = \sum_k w_k\, \mathcal N(x; \mu_k, s^2 I)$. Noising it is a Gaussian
# convolution, so every noised marginal is again a mixture:
#
# $$p_t(x) = \sum_k w_k\, \mathcal N\big(x;\ \sqrt{\bar\alpha_t}\,\mu_k,\ v_t I\big),\qquad v_t = \bar\alpha_t s^2 + 1 - \bar\alpha_t .$$
#
# The best possible noise prediction (what a perfectly trained U-Net would output) is
# $\epsilon^*(x_t, t) = \mathbb E[\epsilon \mid x_t] = -\sqrt{1-\bar\alpha_t}\,\nabla_x \log p_t(x_t)$, which here is
#
# $$\epsilon^*(x, t) = \frac{\sqrt{1-\bar\alpha_t}}{v_t} \sum_k \gamma_k(x)\,\big(x - \sqrt{\bar\alpha_t}\,\mu_k\big),
# \qquad \gamma_k(x) \propto w_k\, e^{-\lVert x - \sqrt{\bar\alpha_t}\mu_k\rVert^2 / 2 v_t}.$$
#
# So the toy "U-Net" below is exact, and whatever goes wrong is the sampler's doing.

# %%
MU = torch.tensor([[-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [0.0, 0.0]])  # five modes
S = 0.3                                                                               # their spread


def abar_at(t):
    """abar at a (possibly fractional) timestep, interpolated as Euler's sigmas are."""
    return torch.tensor(np.interp(float(t), np.arange(1000), abar.numpy()), dtype=torch.float32)


def toy_eps(x, t, modes=MU):
    """Exact eps for x0 ~ mixture of N(mode, S^2 I) over `modes` (equal weights): (N, 2) -> (N, 2)."""
    a = abar_at(t)
    v = a * S ** 2 + 1 - a
    diff = x[:, None, :] - a ** 0.5 * modes[None]           # (N, K, 2)
    gamma = torch.softmax(-(diff ** 2).sum(-1) / (2 * v), dim=1)  # (N, K) responsibilities
    return (1 - a) ** 0.5 / v * (gamma[..., None] * diff).sum(1)


x0 = MU[torch.randint(0, 5, (2000,))] + S * torch.randn(2000, 2)
near = ((x0[:, None] - MU[None]).norm(dim=2).min(dim=1).values < 2 * S).float().mean()
print("data:", tuple(x0.shape), f"{near:.0%} within 2S of a mode")

# %% [markdown]
# ### One step by hand
#
# Every sampler first reads off the clean sample the U-Net's $\epsilon$ implies,
# $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon)/\sqrt{\bar\alpha_t}$. DDIM ($\eta = 0$) then
# re-noises that guess to the next level with the *same* $\epsilon$:
#
# $$x_{t_\text{prev}} = \sqrt{\bar\alpha_{t_\text{prev}}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t_\text{prev}}}\,\epsilon .$$
#
# Three points, one step from $t = 901$ to $801$, by hand and by `minisd.schedulers.DDIM`:

# %%
xT = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
t, t_prev = 901, 801
eps = toy_eps(xT, t)
x0_hat = (xT - (1 - abar[t]) ** 0.5 * eps) / abar[t] ** 0.5
by_hand = abar[t_prev] ** 0.5 * x0_hat + (1 - abar[t_prev]) ** 0.5 * eps
ddim = make_scheduler("ddim")
ddim.set_timesteps(10)
print("x_901:\n", xT, "\nby hand:\n", by_hand, "\nminisd DDIM:\n", ddim.step(eps, t, xT))
print("predicted x0:\n", ddim.pred_x0)

# %% [markdown]
# ## The five samplers on the toy
#
# Each starts from the same 2,000 noise points and takes 10 steps with the exact $\epsilon$.
# The grey dots are real data.

# %%
def sample(name, n_steps, x_T, eps_fn=toy_eps, seed=0, keep=False):
    """Run one sampler from x_T; returns the result, and with keep=True the x_t and predicted x0 per step."""
    s = make_scheduler(name)
    s.set_timesteps(n_steps)
    x = x_T * s.init_noise_sigma
    g = torch.Generator().manual_seed(seed)
    xs, x0s = [], []
    for t in s.timesteps:
        eps = eps_fn(s.scale_model_input(x, t), t)
        x = s.step(eps, t, x, generator=g)
        if keep:
            xs.append(x * abar_at(t) ** 0.5 if name == "euler" else x)  # Euler's x lives at scale 1/sqrt(abar)
            x0s.append(s.pred_x0)
    return (x, torch.stack([x_T] + xs), torch.stack(x0s)) if keep else x


x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
fig, axes = plt.subplots(1, 5, figsize=(15, 3.2), sharex=True, sharey=True)
for ax, name in zip(axes, NAMES):
    out = sample(name, 10, x_T)
    near = ((out[:, None] - MU[None]).norm(dim=2).min(dim=1).values < 2 * S).float().mean()
    print(f"{name:8s} {near:.0%} of samples within 2S of a mode")
    ax.scatter(*x0.T, s=2, c="lightgrey")
    ax.scatter(*out.T, s=2)
    ax.set(title=f"{name}, 10 steps", xlim=(-2, 2), ylim=(-2, 2), aspect="equal")
plt.tight_layout()
plt.show()

# %% [markdown]
# With 10 steps every sampler finds all five modes. The first-order DDIM and Euler leave more
# stragglers between them (83 % of samples near a mode, against the data's 88 %): a point that
# starts near a border needs more than 10 big steps to settle. The multistep DPM-Solver++ and
# PNDM already match the data. DDPM, which adds fresh noise at every step, sits in between;
# it was designed for the full 1000-step chain.
#
# DDIM and DDPM are two ends of one family: DDIM's $\eta$ sets how much fresh noise each step
# adds, from none ($\eta = 0$, SD's default: the same $x_T$ always gives the same sample) to
# DDPM's amount ($\eta = 1$). Two runs from the same $x_T$ with different noise seeds:

# %%
from minisd.schedulers import DDIM

for eta in [0.0, 1.0]:
    runs = []
    for seed in [0, 1]:
        ddim, x, g = DDIM(eta=eta), x_T[:500], torch.Generator().manual_seed(seed)
        ddim.set_timesteps(10)
        for t in ddim.timesteps:
            x = ddim.step(toy_eps(x, t), t, x, generator=g)
        runs.append(x)
    print(f"DDIM eta = {eta}: the two seeds' samples lie {(runs[0] - runs[1]).norm(dim=1).mean():.3f} apart on average")

# %% [markdown]
# ## The denoising trajectory: $x_t$ and the predicted $x_0$ per step
#
# Follow a handful of points through a DDIM run. The left panel is $x_t$ itself (noise
# shrinking onto the data); the right one is what the sampler *believes* the final sample
# will be at each step, $\hat x_0$. Early guesses sit near the mean of all modes — at high
# noise the posterior is the whole mixture — and they commit to one mode as $t$ falls.
# With a real U-Net the same picture is the blurry average image that sharpens into
# a shape (chapter 1: early steps decide the layout, late steps the detail).

# %%
_, xs, x0s = sample("ddim", 10, x_T[:6], keep=True)
print("x_T and x_t after each step:", tuple(xs.shape), " predicted x0 per step:", tuple(x0s.shape))
fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharex=True, sharey=True)
for ax, path, title in [(axes[0], xs, r"$x_t$ after each step"), (axes[1], x0s, r"predicted $\hat x_0$ at each step")]:
    ax.scatter(*x0.T, s=2, c="lightgrey")
    for i in range(path.shape[1]):
        ax.plot(*path[:, i].T, "-", alpha=0.5)
        ax.scatter(*path[:, i].T, c=np.arange(len(path)), cmap="viridis", s=25, zorder=3)
    ax.set(title=title, xlim=(-2, 2), ylim=(-2, 2), aspect="equal")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Classifier-free guidance
#
# Chapter 9 dropped the caption 10 % of the time, so one U-Net predicts both the conditional
# $\epsilon_c = \epsilon_\theta(x_t, t, c)$ and the unconditional $\epsilon_u = \epsilon_\theta(x_t, t, \varnothing)$.
# At sampling time SD runs both (a batch of two) and extrapolates from one to the other:
#
# $$\tilde\epsilon = \epsilon_u + s\,(\epsilon_c - \epsilon_u).$$
#
# $s = 0$ ignores the prompt, $s = 1$ is the plain conditional model, and $s > 1$ (SD 1.5's
# default is 7.5) pushes *further* in the direction the caption adds — sharper, more on-prompt
# samples at the cost of variety (Ho & Salimans 2021).
#
# In the toy, let the "caption" be *"the top-right mode"*: $\epsilon_c$ is the exact $\epsilon$
# of that one Gaussian, $\epsilon_u$ the exact $\epsilon$ of the whole mixture.

# %%
def guided(scale, mode=1):
    def eps_fn(x, t):
        eps_u, eps_c = toy_eps(x, t), toy_eps(x, t, modes=MU[mode:mode + 1])
        return eps_u + scale * (eps_c - eps_u)
    return eps_fn


scales = [0.0, 1.0, 3.0, 7.5]
fig, axes = plt.subplots(1, 4, figsize=(13, 3.4), sharex=True, sharey=True)
for ax, scale in zip(axes, scales):
    out = sample("ddim", 25, x_T[:500], eps_fn=guided(scale))
    on_mode = ((out - MU[1]).norm(dim=1) < 3 * S).float().mean()
    ax.scatter(*x0.T, s=2, c="lightgrey")
    ax.scatter(*out.T, s=3, c="C3")
    ax.set(title=f"s = {scale}: {on_mode:.0%} on the mode", xlim=(-2, 2), ylim=(-2, 2), aspect="equal")
    print(f"s = {scale}: mean {out.mean(0).numpy().round(3)}, spread {out.std(0).mean():.3f} (data spread {S})")
plt.tight_layout()
plt.show()

# %% [markdown]
# At $s = 1$ the samples land on the chosen mode with about the data's own spread. Larger $s$
# overshoots: the samples are pushed away from the other modes (their mean moves out from
# $(1, 1)$) and bunch up more tightly than the data does; at 7.5 many leave the mode altogether.
# Nothing in the formula keeps $\tilde\epsilon$ a noise prediction of any real distribution. On SD that is the familiar trade: high guidance follows the prompt
# harder, with more saturated, less varied images.
#
# ## Steps vs error
#
# DDIM, Euler, DPM-Solver++ and PNDM all discretise the same probability-flow ODE, so from
# the same $x_T$ they aim at the same end point. Solve it very finely (DPM-Solver++ with
# 999 steps) to get that end point, then measure how far each sampler lands from it with
# fewer steps (the median over 500 points: a point that starts on the border between two
# modes may fall either way under any solver). DDPM is left out: it samples the right
# distribution, but not this point.

# %%
ref = sample("dpm++2m", 999, x_T[:500])
steps = [5, 10, 20, 50, 100, 200, 500]
errors = {name: [(sample(name, n, x_T[:500]) - ref).norm(dim=1).median().item() for n in steps]
          for name in ["ddim", "euler", "dpm++2m", "pndm"]}
for name, err in errors.items():
    print(f"{name:8s}", "  ".join(f"{n}:{e:.4f}" for n, e in zip(steps, err)))
plt.figure(figsize=(6.5, 4.2))
for name, err in errors.items():
    plt.loglog(steps, err, "o-", label=name)
plt.loglog(steps, [1.2 / n for n in steps], "k:", label=r"$\propto 1/n$ (first order)")
plt.xlabel("steps n")
plt.ylabel("median distance to the ODE solution")
plt.title("steps vs error on the toy (exact eps)")
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# What the curves say:
#
# - At 5–10 steps the multistep solvers lead: PNDM and DPM-Solver++ reuse earlier $\epsilon$
#   (or $\hat x_0$) predictions for free, still one U-Net call per step.
# - DDIM and Euler are first order: doubling the steps halves the error.
# - **Where a sampler stops matters as much as its order.** DDIM and PNDM ("leading"
#   timesteps) stop at $t = 1$ and land on $\bar\alpha_0$'s noise level instead of $\sigma = 0$: a
#   floor of a few thousandths here, which PNDM reaches from 50 steps on. DPM-Solver++ ends
#   with a first-order jump from $t \approx 1000/n$ straight to $\sigma = 0$ (it returns that step's
#   $\hat x_0$), which on this toy makes its error shrink only like $1/n$ after the first 10 steps.
#
# On SD's latents the last steps only touch fine detail, so these endings matter less than on a
# toy whose whole answer is one point; but it is why one sampler's "20 steps" is not another's.
#
# ## On the course model
#
# Now the real thing: chapter 9's course model (`StableDiffusion.course_model()`: the course
# VAE, CLIP text encoder and U-Net, 32x32 images from 8x8x4 latents). Its own defaults are
# 25 DDIM steps at guidance 4. To score samples without looking at them we use
# `minisd.metrics.Judge` (chapter 12), which reads colour, shape and position off an image.
# The judge is itself a model that can be wrong, so first its accuracy on *real* course
# images: the ceiling any generated-image score below should be read against.

# %%
from minisd import data

pipe = minisd.StableDiffusion.course_model()
judge = minisd.metrics.Judge.load()
print(pipe)
real_images, real_captions = data.sample(300, seed=12345)
acc_real = judge.accuracy(real_images, real_captions)
print("judge on 300 real images:", "  ".join(f"{k} {v:.1%}" for k, v in acc_real.items()))


def to_uint8(images):
    """The pipeline's float images (N, H, W, 3) in [0, 1] -> uint8 for the judge and for plots."""
    return (images * 255).round().astype(np.uint8)


# %% [markdown]
# ### The five samplers, same prompt, same seed
#
# Three prompts, each sampler 25 steps at guidance 4, all from the same initial noise
# (`seed=0`). The deterministic samplers walk the same ODE and should land on nearly the
# same picture; DDPM draws fresh noise at every step and may wander off.

# %%
show_prompts = ["a red circle in the top left", "a green triangle in the center", "a blue square in the bottom right"]
grid = {name: to_uint8(pipe(show_prompts, steps=25, guidance=4.0, scheduler=name, seed=0, output_type="np",
                            progress=False)) for name in NAMES}
print("each sampler's images:", grid["ddim"].shape)
fig, axes = plt.subplots(len(show_prompts), len(NAMES), figsize=(9, 5.6))
for j, name in enumerate(NAMES):
    axes[0, j].set_title(name)
    for i, prompt in enumerate(show_prompts):
        axes[i, j].imshow(grid[name][i], interpolation="nearest")
        axes[i, j].set(xticks=[], yticks=[])
        if j == 0:
            axes[i, j].set_ylabel(prompt.replace(" in the ", "\nin the "), fontsize=8)
fig.suptitle("the course model, 25 steps, guidance 4, seed 0", fontsize=10)
plt.tight_layout()
plt.show()
for name in NAMES:
    d = np.abs(grid[name].astype(int) - grid["ddim"].astype(int)).mean()
    print(f"{name:8s} mean |pixel - DDIM's| = {d:5.1f} / 255")

# %% [markdown]
# The circle and the triangle come out alike from all five. The blue square does not: the
# ODE solvers DDIM, Euler and DPM-Solver++ agree, DDPM's fresh noise gives a slightly
# different square, and PNDM turns it into a four-armed cross. The mean pixel differences
# above hide this because most of each image is black background. "Steps vs quality" below
# comes back to PNDM on this model.

# %% [markdown]
# ### The denoising trajectory on the course model
#
# The loop from the top of this chapter, written out with the pipeline's parts
# (`encode_prompt`, the U-Net, a scheduler, `decode`) so that we can keep the sampler's
# `pred_x0` after every step. Decoding each step's $\hat x_0$ through the VAE shows what the
# model believes the picture will be; decoding $x_t$ itself shows what it actually holds.

# %%
prompt, guidance = "a magenta triangle in the top right", 4.0
sched = make_scheduler("ddim")
sched.set_timesteps(25)
with torch.no_grad():
    context = torch.cat([pipe.encode_prompt([""]), pipe.encode_prompt([prompt])])  # (2, 77, D): [uncond, cond]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    xts, x0s = [], []
    for t in sched.timesteps:
        eps_u, eps_c = pipe.unet(torch.cat([x, x]), t, context).chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x)
        xts.append(x)
        x0s.append(sched.pred_x0)
    xts, x0s = torch.cat(xts), torch.cat(x0s)  # (25, 4, 8, 8) each
    rows = to_uint8(pipe.decode(torch.cat([xts, x0s])).permute(0, 2, 3, 1).numpy())  # (50, 32, 32, 3)
same = np.array_equal(rows[24], to_uint8(pipe(prompt, steps=25, guidance=4.0, scheduler="ddim", seed=0,
                                              output_type="np", progress=False))[0])
print("latents per step:", tuple(xts.shape), " decoded:", rows.shape, " last step == pipe(...):", same)
keep = list(range(0, 25, 2))
fig, axes = plt.subplots(2, len(keep), figsize=(len(keep) * 1.0, 2.5))
for k, i in enumerate(keep):
    for r, label in enumerate([r"$x_t$", r"$\hat x_0$"]):
        axes[r, k].imshow(rows[r * 25 + i], interpolation="nearest")
        axes[r, k].set(xticks=[], yticks=[])
        if k == 0:
            axes[r, k].set_ylabel(label)
    axes[0, k].set_title(f"t={int(sched.timesteps[i])}", fontsize=7)
fig.suptitle(f'"{prompt}", DDIM, every 2nd of 25 steps', fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# As on the toy, $\hat x_0$ commits early: after the very first step it already puts a
# triangle in the top right (in the wrong colours), and by $t \approx 800$ it is the final
# picture, while $x_t$ still holds stray blobs of the starting noise until about $t = 500$.
# Early steps decide the layout; the late ones change almost nothing visible here.
#
# ### Guidance scale: pictures and judged accuracy
#
# The same 15 prompts (every sixth of the 90 colour x shape x position combinations: every
# colour, shape and position appears), seed 0,
# 25 DDIM steps, at $s = 0, 1, 2, 4, 8$. One detail of the pipeline: like diffusers it skips
# the unconditional pass when $s \le 1$, so `guidance=0` there means "the conditional model
# alone", not $s = 0$. True $s = 0$ is $\tilde\epsilon = \epsilon_u$, the U-Net with the empty
# caption, so we get it by sampling with the prompt `""`.

# %%
prompts = [data.caption(*c) for c in data.combinations()[::6]]
SCALES = [0.0, 1.0, 2.0, 4.0, 8.0]
sweep = {}
for s in SCALES:
    asked = [""] * len(prompts) if s == 0 else prompts
    sweep[s] = to_uint8(pipe(asked, steps=25, guidance=max(s, 1.0), scheduler="ddim", seed=0, output_type="np",
                             progress=False))
print(len(prompts), "prompts, e.g.", prompts[:2])
print(f"{'':18s}{'colour':>8s}{'shape':>8s}{'position':>10s}{'all':>7s}")
print(f"{'real images':18s}" + "".join(f"{acc_real[k]:{w}.1%}" for k, w in [("colour", 8), ("shape", 8), ("position", 10), ("all", 7)]))
sweep_acc = {}
for s in SCALES:
    sweep_acc[s] = judge.accuracy(sweep[s], prompts)
    print(f"{f'guidance {s:g}':18s}" + "".join(f"{sweep_acc[s][k]:{w}.1%}" for k, w in [("colour", 8), ("shape", 8), ("position", 10), ("all", 7)]))

fig, axes = plt.subplots(4, len(SCALES), figsize=(7.5, 6.6))
for j, s in enumerate(SCALES):
    axes[0, j].set_title(f"s = {s:g}", fontsize=9)
    for i, k in enumerate([0, 4, 9, 13]):
        axes[i, j].imshow(sweep[s][k], interpolation="nearest")
        axes[i, j].set(xticks=[], yticks=[])
        if j == 0:
            axes[i, j].set_ylabel(prompts[k].replace(" in the ", "\nin the "), fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# At $s = 0$ the prompt is ignored: whatever the model draws matches the prompt no better
# than chance. $s = 1$ (the conditional model alone) already gets most attributes right but
# not all; from $s = 2$ on every image on this small set is judged right, as right as the
# judge is on real images. The pictures show the price of more guidance, the overshoot the
# toy showed: at 4 and more so at 8 squares pinch into four-pointed stars, circles grow
# corners and a faint halo appears, though the judge still reads them right. (On SD the same
# push shows as over-saturated, over-contrasted images.)
#
# ### Steps vs quality
#
# Fewer steps means fewer U-Net calls. The same 15 prompts at guidance 4, DDIM against
# PNDM (SD 1.5's default sampler), at 5, 10 and 25 steps:

# %%
STEPS = [5, 10, 25]
step_acc = {}
for name in ["ddim", "pndm"]:
    for n in STEPS:
        images = sweep[4.0] if (name, n) == ("ddim", 25) else to_uint8(
            pipe(prompts, steps=n, guidance=4.0, scheduler=name, seed=0, output_type="np", progress=False))
        step_acc[name, n] = judge.accuracy(images, prompts)
        print(f"{name:5s} {n:2d} steps: " + "  ".join(f"{k} {v:6.1%}" for k, v in step_acc[name, n].items()))
plt.figure(figsize=(6, 3.8))
for name in ["ddim", "pndm"]:
    plt.plot(STEPS, [step_acc[name, n]["all"] for n in STEPS], "o-", label=name)
plt.axhline(acc_real["all"], color="k", ls=":", label="judge on real images")
plt.xlabel("steps")
plt.ylabel("judged all-three-right accuracy")
plt.title("steps vs quality, course model, guidance 4 (15 prompts)")
plt.ylim(0, 1.05)
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# DDIM holds up at 5 steps on this model, while PNDM, SD 1.5's default, falls well behind at
# 5 and 10 steps and is still short of DDIM at 25. On the toy, with an exact $\epsilon$, PNDM was
# among the most accurate at few steps, so the trouble lies in how it meets this model. (These
# are 15 prompts with one seed each: one wrong image moves a score by 6.7 points.)
#
# ### Why PNDM fails here: guidance meets a high-order blend
#
# PLMS predicts the next step's $\epsilon$ from the last four with the Adams–Bashforth weights
# $\tfrac{1}{24}(55, -59, 37, -9)$. They sum to 1, so a steady $\epsilon$ passes through
# unchanged, but their absolute values sum to $160/24 \approx 6.7$: a change in $\epsilon$ from
# one step to the next is extrapolated, and amplified by up to that much. Guidance is the other
# amplifier: $\tilde\epsilon = \epsilon_u + s(\epsilon_c - \epsilon_u)$ multiplies whatever the
# prompt changes by $s$, and with it how much that part changes between steps. A guess, then:
# the trouble needs both, high order and strong guidance. It can be tested, because the order
# is a setting, `schedulers.PNDM(order=k)` (order 1 is a DDIM step after PLMS's warm-up;
# 2 and 3 are the blends PLMS itself starts with, weights $\tfrac12(3, -1)$ and
# $\tfrac1{12}(23, -16, 5)$, absolute sums 2 and 3.7), and the pipeline takes a sampler object
# as well as a name. 30 prompts, 10 steps:

# %%
from minisd.schedulers import PNDM

order_prompts = [data.caption(*c) for c in data.combinations()[::3]]
ORDERS, GUIDANCES = [1, 2, 3, 4], [1.0, 2.0, 4.0]
order_acc = {}
for g in GUIDANCES:
    for k in ORDERS:
        images = to_uint8(pipe(order_prompts, steps=10, guidance=g, scheduler=PNDM(order=k), seed=0,
                               output_type="np", progress=False))
        order_acc[g, k] = judge.accuracy(images, order_prompts)["all"]
    print(f"guidance {g:g}: " + "  ".join(f"order {k} {order_acc[g, k]:6.1%}" for k in ORDERS))
plt.figure(figsize=(6, 3.6))
for g in GUIDANCES:
    plt.plot(ORDERS, [order_acc[g, k] for k in ORDERS], "o-", label=f"guidance {g:g}")
plt.xticks(ORDERS, ["1 (DDIM)", "2", "3", "4 (PLMS)"])
plt.xlabel("order of PNDM's Adams-Bashforth blend")
plt.ylabel("judged all-three-right accuracy")
plt.title("PNDM, 10 steps, 30 prompts: order x guidance")
plt.ylim(0, 1.05)
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# The guess holds. With guidance 1 the order makes no difference (80 % at every order; the
# misses are the conditional model's own, as in the guidance sweep above). With guidance 4,
# orders 1 and 2 get every prompt right, order 3 loses a fifth of them and PLMS's order 4
# half; guidance 2 sits between. So neither the model nor PNDM is at fault alone: the
# high-order blend extrapolates the step-to-step changes of a strongly guided $\epsilon$, and
# this small U-Net's guided $\epsilon$ changes too much across 10 steps for that. More steps
# make each change smaller, which is why PNDM recovers towards 25 steps above. The practical
# reading: with strong guidance and few steps, prefer a sampler of order 2 or less (DDIM;
# DPM-Solver++(2M) is second order too). That, and not a preference, is why the course model's
# defaults are DDIM, 25 steps, guidance 4, rather than SD's PNDM, 50 steps, 7.5.
#
# ## Ours == diffusers, step by step
#
# Each `minisd` sampler against the diffusers scheduler that SD 1.5's config builds, 25 steps
# on the toy from the same $x_T$. At every step both get the same $x_t$ and the same exact
# $\epsilon$ (DDPM's noise from generators seeded alike), and the run goes on from ours. The
# largest difference over every model input and every $x_{t_\text{prev}}$:

# %%
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)

sd15_config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
               "steps_offset": 1, "trained_betas": None, "clip_sample": False}
theirs_cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
              "dpm++2m": DPMSolverMultistepScheduler, "pndm": PNDMScheduler}
for name in NAMES:
    ours, theirs = make_scheduler(name), theirs_cls[name].from_config(sd15_config)
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x = x_T[:500] * ours.init_noise_sigma
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    d = 0.0
    for t in theirs.timesteps:
        inp = ours.scale_model_input(x, t)
        d = max(d, (inp - theirs.scale_model_input(x, t)).abs().max().item())
        eps = toy_eps(inp, t)
        kw = {} if name == "pndm" else {"generator": gb}  # diffusers' PNDM takes no generator
        x_ours, x_theirs = ours.step(eps, t, x, generator=ga), theirs.step(eps, t, x, **kw).prev_sample
        d = max(d, (x_ours - x_theirs).abs().max().item())
        x = x_ours
    print(f"{name:8s} ours == diffusers over {len(theirs.timesteps)} steps: max |diff| = {d:.1e}")
