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
# # 9. Training the U-Net
#
# **You will build** the {term}`forward process` that noises a latent in one jump
# (`minisd.diffusion.NoiseSchedule`, `add_noise`), the ε-prediction loss derived from the
# {term}`ELBO` (`training_loss`), {term}`caption dropout` (`drop_captions`), and a trained
# text-conditioned latent {term}`U-Net`: the course model's `minisd.UNet`, trained by
# `minisd.train.train_unet_model`, with checks of every formula against numbers.
#
# Chapters 1-4 built the U-Net, 5-6 the VAE, 7-8 the text encoder. This chapter is where SD
# *learns*: the U-Net is trained to remove noise from VAE latents, guided by CLIP's reading
# of the caption. The VAE and the text encoder stay **frozen** the whole time (SD 1.x trained
# only its U-Net); they are used once per image to turn pictures into latents and captions
# into contexts.
#
# The recipe fits in one line. Take a clean latent $x_0 = s \cdot E(\text{image})$ (the VAE
# encoder's output times its scaling factor $s$), a caption's context $c$, a random step
# $t \in \{0, \dots, 999\}$ and Gaussian noise $\epsilon$, and minimise ({term}`DDPM`'s objective,
# {cite}`ho2020ddpm`, applied to latents by {cite}`rombach2022ldm`)
#
# $$
# L = \mathbb{E}_{x_0, c, t, \epsilon}\Big[\big\lVert \epsilon - \epsilon_\theta\big(\sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon,\; t,\; c\big)\big\rVert^2\Big].
# $$
#
# This chapter takes the pieces in order: the forward noising and its {term}`noise schedule`
# $\bar\alpha_t$, where the loss comes from, three ways to parametrise what the U-Net predicts,
# caption dropout (what makes {term}`classifier-free guidance` possible), the real SD 1.1 → 1.5
# training runs, and then a small text-conditioned latent U-Net trained on the course data,
# judged automatically on colour, shape and position.

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
# $q(x_t \mid x_{t-1}) = \mathcal N(\sqrt{1-\beta_t}\,x_{t-1},\, \beta_t I)$, i.e.
# $x_t = \sqrt{\alpha_t}\,x_{t-1} + \sqrt{\beta_t}\,\epsilon_t$ with $\alpha_t = 1 - \beta_t$ and a fresh
# $\epsilon_t \sim \mathcal N(0, I)$ per step. Compose two steps:
#
# $$
# x_t = \sqrt{\alpha_t \alpha_{t-1}}\,x_{t-2} + \underbrace{\sqrt{\alpha_t \beta_{t-1}}\,\epsilon_{t-1} + \sqrt{\beta_t}\,\epsilon_t}_{\sim\, \mathcal N(0,\ (\alpha_t\beta_{t-1} + \beta_t) I)},
# \qquad \alpha_t \beta_{t-1} + \beta_t = 1 - \alpha_t\alpha_{t-1},
# $$
#
# because a sum of independent Gaussians is Gaussian with the variances added. By induction, with
# the {term}`alpha-bar` $\bar\alpha_t = \prod_{s \le t}\alpha_s$, the mean coefficient is
# $\sqrt{\bar\alpha_t}$ and the variance $1 - \bar\alpha_t$ (the recursion
# $v_t = \alpha_t v_{t-1} + \beta_t$ keeps $v_t = 1 - \bar\alpha_t$), so any step is reached from
# $x_0$ in one jump:
#
# $$
# q(x_t \mid x_0) = \mathcal N\big(\sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t) I\big), \qquad
# x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon, \quad \epsilon \sim \mathcal N(0, I).
# $$
#
# *Check*: run the chain itself, 1000 steps on 20,000 copies of the scalar $x_0 = 1.5$, and
# compare the mean and variance of $x_t$ with the closed form (the Monte Carlo standard error
# of the mean is $\sqrt{(1-\bar\alpha_t)/20000} \le 0.007$).

# %%
x0_value, n_chains = 1.5, 20_000
g = torch.Generator().manual_seed(0)
chain = torch.full((n_chains,), x0_value)
print(f"{'t':>4s}{'mean (chain)':>14s}{'sqrt(abar) x0':>15s}{'var (chain)':>13s}{'1 - abar':>10s}")
for t in range(1000):
    chain = (1 - schedule.betas[t]).sqrt() * chain + schedule.betas[t].sqrt() * torch.randn(n_chains, generator=g)
    if t in (0, 99, 499, 999):
        mean, var = chain.mean(), chain.var()
        print(f"{t:4d}{mean:14.4f}{abar[t].sqrt() * x0_value:15.4f}{var:13.4f}{1 - abar[t]:10.4f}")
        se = ((1 - abar[t]) / n_chains) ** 0.5
        assert abs(mean - abar[t].sqrt() * x0_value) < 4 * se + 1e-4
        assert abs(var - (1 - abar[t])) < 4 * (1 - abar[t]) * (2 / n_chains) ** 0.5 + 1e-6
# the same induction without sampling: the mean and variance recursions, in float64
b64 = schedule.betas.double()
m, v = torch.ones(()), torch.zeros(())
for beta in b64:
    m, v = (1 - beta).sqrt() * m, (1 - beta) * v + beta
print(f"recursion at t = 999: mean coefficient {m:.7f} = sqrt(abar) {torch.cumprod(1 - b64, 0)[-1].sqrt():.7f}, "
      f"variance {v:.7f} = 1 - abar {1 - torch.cumprod(1 - b64, 0)[-1]:.7f}")
assert abs(m - torch.cumprod(1 - b64, 0)[-1].sqrt()) < 1e-12 and abs(v + torch.cumprod(1 - b64, 0)[-1] - 1) < 1e-12

# %% [markdown]
# That one jump is what makes training cheap: no chain is simulated, each example gets its own
# random $t$. SD 1.x uses **scaled-linear** betas ({term}`scaled-linear schedule`), linear in $\sqrt\beta$ from
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
# The right panel is (the log of) the square root of the {term}`SNR`, the signal-to-noise ratio
# of $x_t$ in variance,
#
# $$
# \mathrm{SNR}(t) = \frac{\bar\alpha_t}{1-\bar\alpha_t},
# $$
#
# the one number that says how hard step $t$ is: every formula below (the loss weight, the
# parametrisations, the samplers' $\sigma = 1/\sqrt{\mathrm{SNR}}$ of chapter 10) is a function of
# it. Printed for both schedules:

# %%
snr = abar / (1 - abar)
snr_ddpm = ddpm / (1 - ddpm)
print(f"{'t':>4s}{'abar SD':>10s}{'SNR SD':>11s}{'SNR DDPM':>11s}")
for t in (0, 100, 250, 354, 500, 750, 999):
    print(f"{t:4d}{abar[t]:10.5f}{snr[t]:11.4g}{snr_ddpm[t]:11.3g}")
print(f"SD at t = 999: amplitude ratio sqrt(SNR) = 1 : {1 / snr[999].sqrt():.1f}")
assert bool((snr[1:] < snr[:-1]).all())                     # the SNR falls at every step
assert 14 < 1 / snr[999].sqrt() < 15 and snr_ddpm[999] < snr[999] / 100

# %% [markdown]
# SD's schedule keeps more signal for longer: at $t = 999$, $\bar\alpha = 0.0047$ (an SNR of
# 0.0047, about 1 : 15 in amplitude), where DDPM's linear betas reach $4\cdot10^{-5}$. The last
# steps of SD's chain are therefore not quite pure noise, a known quirk of SD 1.x's schedule
# ("non-zero terminal SNR", {cite}`lin2024zerosnr`).
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
# onto $\epsilon$ with a mean squared error. SD predicts the noise ({term}`epsilon prediction`); the
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
# ## Where the loss comes from: the ELBO, reduced to an ε-MSE
#
# The loss above is not a guess. DDPM trains a reverse chain
# $p_\theta(x_{t-1} \mid x_t) = \mathcal N(\mu_\theta(x_t, t), \sigma_t^2 I)$ by maximising the
# {term}`ELBO` on $\log p_\theta(x_0)$, which splits into one KL term per step
# {cite}`ho2020ddpm`:
#
# $$
# -\log p_\theta(x_0) \le \mathbb E_q\Big[\underbrace{D_\mathrm{KL}\big(q(x_T\mid x_0)\,\|\,p(x_T)\big)}_{L_T}
# + \sum_{t \ge 2} \underbrace{D_\mathrm{KL}\big(q(x_{t-1}\mid x_t, x_0)\,\|\,p_\theta(x_{t-1}\mid x_t)\big)}_{L_{t-1}}
# - \log p_\theta(x_0 \mid x_1)\Big].
# $$
#
# $L_T$ has no parameters. The posterior $q(x_{t-1} \mid x_t, x_0)$ is a Gaussian with variance
# $\tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t$ and mean
# $\tilde\mu_t = \frac{1}{\sqrt{\alpha_t}}\big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\,\epsilon\big)$
# when $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$ (chapter 10 derives both). Choose
# $\sigma_t^2 = \tilde\beta_t$ and give $\mu_\theta$ the same form with the network's
# $\epsilon_\theta(x_t, t)$ in place of $\epsilon$. The KL between two Gaussians of equal variance
# is the squared distance of their means over twice the variance, so
#
# $$
# L_{t-1} = \frac{\lVert \tilde\mu_t - \mu_\theta \rVert^2}{2\tilde\beta_t}
# = \underbrace{\frac{\beta_t^2}{2\tilde\beta_t\,\alpha_t\,(1-\bar\alpha_t)}}_{\lambda_t}\,
#   \lVert \epsilon - \epsilon_\theta(x_t, t) \rVert^2,
# \qquad \lambda_t = \frac{\beta_t}{2\,\alpha_t\,(1-\bar\alpha_{t-1})}
# = \frac12\Big(\frac{\mathrm{SNR}(t-1)}{\mathrm{SNR}(t)} - 1\Big).
# $$
#
# The ELBO is therefore a *weighted* ε-MSE. DDPM found that dropping the weight ($\lambda_t \to 1$,
# "$L_\text{simple}$") gives better samples, and SD trains with the unweighted loss above.
# *Check*: the KL computed by `torch.distributions` for random $x_0$, $\epsilon$ and a wrong
# $\epsilon_\theta$, against $\lambda_t \lVert \epsilon - \epsilon_\theta \rVert^2$, in float64 on 256 dimensions
# (the size of a course latent):

# %%
from torch.distributions import Normal, kl_divergence  # noqa: E402

a64 = torch.cumprod(1 - b64, 0)                                      # abar in float64
t = torch.tensor([1, 10, 100, 500, 999])
beta, a_t, a_prev = b64[t, None], a64[t, None], a64[t - 1, None]    # (5, 1) each
g = torch.Generator().manual_seed(2)
x0_, eps_ = torch.randn(5, 256, generator=g, dtype=torch.float64), torch.randn(5, 256, generator=g, dtype=torch.float64)
eps_theta = eps_ + 0.3 * torch.randn(5, 256, generator=g, dtype=torch.float64)   # an imperfect network
xt_ = a_t.sqrt() * x0_ + (1 - a_t).sqrt() * eps_
post_mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0_ + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * xt_
post_var = (1 - a_prev) / (1 - a_t) * beta


def mean_from_eps(e):
    return (xt_ - beta / (1 - a_t).sqrt() * e) / (1 - beta).sqrt()


kl = kl_divergence(Normal(post_mean, post_var.sqrt()), Normal(mean_from_eps(eps_theta), post_var.sqrt())).sum(1)
lam = beta / (2 * (1 - beta) * (1 - a_prev))
weighted = lam[:, 0] * ((eps_ - eps_theta) ** 2).sum(1)
snr64 = a64 / (1 - a64)
print("mean from the true eps == posterior mean:", f"max |diff| = {(mean_from_eps(eps_) - post_mean).abs().max():.1e}")
for k in range(len(t)):
    print(f"t = {int(t[k]):3d}  KL {kl[k]:10.5f}   lambda_t ||eps - eps_theta||^2 {weighted[k]:10.5f}   "
          f"lambda_t {lam[k, 0]:.4f} = (SNR(t-1)/SNR(t) - 1)/2 = {(snr64[t[k] - 1] / snr64[t[k]] - 1) / 2:.4f}")
torch.testing.assert_close(mean_from_eps(eps_), post_mean)
torch.testing.assert_close(kl, weighted)
torch.testing.assert_close(lam[:, 0], (snr64[t - 1] / snr64[t] - 1) / 2)

# %% [markdown]
# ## What the U-Net predicts: ε, $x_0$ or v
#
# Given $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$, knowing any one of $\epsilon$, $x_0$
# and the *velocity* $v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0$
# {cite}`salimans2022progressive` gives the other two. Write $a = \sqrt{\bar\alpha_t}$,
# $b = \sqrt{1-\bar\alpha_t}$ ($a^2 + b^2 = 1$): $(x_t, v)$ is $(x_0, \epsilon)$ turned by a rotation,
#
# $$
# \begin{pmatrix} x_t \\ v \end{pmatrix} = \begin{pmatrix} a & b \\ -b & a \end{pmatrix}
# \begin{pmatrix} x_0 \\ \epsilon \end{pmatrix}
# \quad\Longrightarrow\quad
# x_0 = a\,x_t - b\,v,\qquad \epsilon = b\,x_t + a\,v,\qquad x_0 = \frac{x_t - b\,\epsilon}{a}.
# $$
#
# So epsilon prediction, {term}`x0 prediction` and {term}`v-prediction` are the same
# model written three ways; they differ in what an *error* costs. With $x_t$ fixed, an error
# $\delta$ in the prediction becomes an error in $\hat x_0$ of $\frac{b}{a}\delta = \delta/\sqrt{\mathrm{SNR}}$
# from $\hat\epsilon$ but only $b\,\delta \le \delta$ from $\hat v$. At $t = 999$ of SD's schedule an
# ε-model's errors are multiplied by 14.6 in $\hat x_0$; a v-model's are not. That is why SD 2.x's
# 768-pixel model is trained to predict v (its scheduler config says
# `prediction_type: "v_prediction"`): the U-Net outputs $\hat v$ and the sampler turns it into
# $\hat\epsilon = b\,x_t + a\,\hat v$ before the usual step. `minisd`'s samplers take ε, as SD 1.x
# needs. *Check*: the round trips on course latents, in float64, and the two error gains:

# %%
t = torch.tensor([1, 500, 999])
a, b = abar.double()[t].sqrt().view(-1, 1, 1, 1), (1 - abar.double()[t]).sqrt().view(-1, 1, 1, 1)
x0_ = z0.double()                                                   # three course latents, one per t
eps_ = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
xt_ = a * x0_ + b * eps_
v_ = a * eps_ - b * x0_
trips = {"x0 from (x_t, eps)": (xt_ - b * eps_) / a, "x0 from (x_t, v)": a * xt_ - b * v_,
         "eps from (x_t, v)": b * xt_ + a * v_, "v from (x_t, eps)": (eps_ - b * xt_) / a,
         "eps from (x_t, x0)": (xt_ - a * x0_) / b}
truth = {"x0": x0_, "eps": eps_, "v": v_}
for name, got in trips.items():
    err = (got - truth[name.split()[0]]).abs().max().item()
    print(f"{name:20s} max |error| < 1e-13: {err < 1e-13}")   # float64 rounding only
    assert err < 1e-13
delta = 0.1
for k in range(3):
    gain_eps = (((xt_[k] - b[k] * (eps_[k] + delta)) / a[k]) - x0_[k]).abs().max() / delta
    gain_v = ((a[k] * xt_[k] - b[k] * (v_[k] + delta)) - x0_[k]).abs().max() / delta
    print(f"t = {int(t[k]):3d}: an error of {delta} in eps moves x0 by x{gain_eps:.3f} of it, in v by x{gain_v:.3f}")
assert abs(gain_eps - 1 / snr[999].sqrt()) < 1e-3 and gain_v < 1

# %% [markdown]
# ## Caption dropout: one model, two predictions
#
# From SD 1.3 on, the text was dropped 10 % of the time during training ({term}`caption dropout`):
# the caption is replaced by the empty prompt `""`, whose context the U-Net also learns to use.
# The same network then predicts both $\epsilon_\theta(x_t, t, c)$ and the unconditional
# $\epsilon_\theta(x_t, t, \varnothing)$, and sampling can push away from the second:
#
# $$
# \hat\epsilon = \epsilon_\theta(x_t, t, \varnothing) + s\,\big(\epsilon_\theta(x_t, t, c) - \epsilon_\theta(x_t, t, \varnothing)\big),
# $$
#
# classifier-free guidance {cite}`ho2022cfg` with {term}`guidance scale` $s$ (7.5 is
# diffusers' default for SD 1.5; chapter 10 derives the formula and sweeps $s$).

# %%
print(drop_captions(captions * 4, p=0.1, generator=torch.Generator().manual_seed(3)))
many = drop_captions(["a red circle in the center"] * 10_000, p=0.1, generator=torch.Generator().manual_seed(0))
print(f"dropped: {many.count('') / len(many):.1%} of 10,000")

# %% [markdown]
# Without dropout, $\epsilon_\theta(x_t, t, \text{CLIP}(\text{""}))$ still *exists*: the text
# encoder encodes `""` like any prompt and the U-Net answers any context, so the guidance formula
# can still be evaluated. What is missing is its meaning: such a U-Net was never trained to make
# that answer the *unconditional* prediction, so guidance pushes away from whatever the network
# happens to say for a context it never saw. The end of this chapter shows what that does to the
# course model.

# %% [markdown]
# ## How SD 1.1 - 1.5 were trained
#
# The seed notes trace the official runs, as the SD v1 model cards list them (e.g.
# [CompVis/stable-diffusion-v1-4](https://huggingface.co/CompVis/stable-diffusion-v1-4); the data
# are subsets of LAION {cite}`schuhmann2022laion`). Every version shares one architecture (the
# 860M U-Net of chapter 4, the f = 8 VAE, CLIP ViT-L/14's text encoder) and differs only in
# what the U-Net saw and for how long:
#
# | version | starts from | steps | resolution | data | caption dropout |
# |---|---|---|---|---|---|
# | SD 1.1 | scratch | 237,000 + 194,000 | 256² then 512² | laion2B-en, then laion-high-resolution (170M images ≥ 1024 px, from LAION-5B) | not listed |
# | SD 1.2 | SD 1.1 | 515,000 | 512² | laion-improved-aesthetics (laion2B-en filtered: original size ≥ 512 px, aesthetic score > 5.0, watermark probability < 0.5) | not listed |
# | SD 1.3 | SD 1.2 | 195,000 | 512² | laion-improved-aesthetics | 10 % |
# | SD 1.4 | SD 1.2 | 225,000 | 512² | laion-aesthetics v2 5+ | 10 % |
# | SD 1.5 | SD 1.2 | 595,000 | 512² | laion-aesthetics v2 5+ | 10 % |
#
# SD 1.3, 1.4 and 1.5 are three branches from the same SD 1.2 checkpoint, not a chain: 1.5 is
# simply the longest run. Training at 256² first and 512² later is cheap pre-training; the
# U-Net is convolutional plus attention, so the same weights accept either size.
#
# ```{admonition} The notes say LAION2B-en holds 1324M images of 256 px or more, and laion-improved-aesthetics about 600M / 笔记说 1324M 与约 600M
# :class: warning
# Neither count is in the model cards that the rest of the table follows, and nothing in this
# book can count LAION, so the table leaves both out rather than repeat them unsourced. The notes
# also call the 10 % caption dropout "CFG技术" (the CFG technique): dropout is the *training*
# half; classifier-free guidance itself happens at sampling time (the formula above, chapter 10).
# ```

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
# exponential moving average of the weights, {term}`EMA`) from a fresh U-Net. The loss falls
# from about 1 (the variance of $\epsilon$: a U-Net that predicts nothing) within seconds. The
# bar's `loss` is the mean of the last 50 steps' losses (here all 30), redrawn every 50 steps
# and on the last one.

# %%
torch.manual_seed(0)
fresh = minisd.UNet(config)
_, _, live = train.train_unet_model(fresh, latents, labels, contexts, prompts, steps=30, batch_size=32, lr=2e-3)
print("loss, first 3 steps:", [round(v, 3) for v in live["loss"][:3]], " last 3:", [round(v, 3) for v in live["loss"][-3:]])
print(f"mean of the last 50 (the bar's final loss): {np.mean(live['loss'][-50:]):.4f}")

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
# The pipeline of chapter 11 joins the three parts. The course model's checkpoint carries its
# sampling defaults (printed below); chapter 10 measures what the sampler and the guidance
# scale do on this model, from $s = 1$ (the conditional model alone) upwards. With guidance
# above 1 one image costs one U-Net call on a batch of two per step.

# %%
pipe = minisd.StableDiffusion.course_model()
print(pipe)
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
# Two measures of chapter 12 read the samples. `minisd.metrics.Judge` is *learned*: it reads
# each image's colour (a vote of the foreground pixels), position (the centroid) and shape (a
# small CNN trained on real course images), and says right or wrong. `minisd.metrics.fidelity`
# is *written from the data's drawing code*: it fits the caption's ideal shape (centre and
# size) to the image and reports the soft IoU between the image's foreground and that shape,
# 1 for a perfect drawing, with a pixel judge of colour, shape and position beside it. A
# right/wrong judge saturates once every image is recognisable; the fidelity goes on
# measuring how well each shape is drawn. Both score one image for each of the 90 prompts
# (at the model's own sampling settings), then the 9 held-out combinations with 10 seeds
# each; and, for scale, real course images.

# %%
judge = minisd.metrics.Judge.load()
combos = data.combinations()
acc_all, gen, caps = train.judge_course_unet(pipe.unet, vae, contexts, prompts, judge, combos, seeds=(0,))
acc_held, gen_held, caps_held = train.judge_course_unet(pipe.unet, vae, contexts, prompts, judge, data.HELD_OUT,
                                                        seeds=range(10))
real_images, real_captions = data.sample(500, seed=12345)
acc_real = judge.accuracy(real_images, real_captions)
fid_all, fid_held = minisd.metrics.fidelity(gen, caps), minisd.metrics.fidelity(gen_held, caps_held)
fid_real = minisd.metrics.fidelity(real_images[:90], real_captions[:90])
rows = [("90 prompts x 1 seed", acc_all, fid_all), ("9 held-out x 10 seeds", acc_held, fid_held),
        ("real images", acc_real, fid_real)]
print(f"{'':24s}{'learned judge':^33s} | {'pixel judge':^25s} | fidelity")
print(f"{'':24s}{'colour':>8s}{'shape':>8s}{'position':>10s}{'all':>7s} | "
      f"{'colour':>7s}{'shape':>7s}{'position':>10s} | {'mean [95 % interval]':>22s}")
for name, a, f in rows:
    m = minisd.metrics.mean_interval(f["fidelity"])
    print(f"{name:24s}{a['colour']:8.1%}{a['shape']:8.1%}{a['position']:10.1%}{a['all']:7.1%} | "
          f"{f['colour'].mean():7.0%}{f['shape'].mean():7.0%}{f['position'].mean():10.0%} | "
          f"{m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}]")
print("(the learned judge's real-image row is on 500 images, the pixel judge's and the fidelity's on the first 90)")

# %% [markdown]
# By colour, shape and position the course model is as good as its data: both judges find
# (nearly) every image right, the held-out combinations included, as they find the real ones.
# A right/wrong judge has nothing left to measure here. The fidelity has: the model's shapes
# are recognisable but not drawn as exactly as the data's, and the intervals of the two rows
# do not meet. Chapter 10 uses that gap to choose the guidance scale, and chapter 12 weighs it
# against FID.
#
# ### Guidance needs the dropout
#
# The course model was trained with 10 % dropout, so its $\epsilon(x_t, t, \text{CLIP}(\text{""}))$
# is a trained unconditional prediction. A model trained *without* dropout would give guidance
# the answer to a context it never saw. We cannot train that model here, but we can hand the
# course model's guidance such a context in place of `""`: the pipeline's `negative_prompt` is
# exactly the prompt of the unconditional branch, and a prompt from outside the course, such as
# "a photo of a dog", never appeared in its training. Same 15 prompts (every sixth of the 90),
# seed 0, 10 DDIM steps, at guidance 4 and 8 (strong pushes, so that the unconditional branch
# matters); both judges and the fidelity read the images, and the fidelity is compared image by
# image (the same prompt and noise with either branch: a paired difference, with its 95 %
# interval).

# %%
cfg_prompts = [data.caption(*c) for c in combos[::6]]
DOG = "a photo of a dog"
cfg = {}
for s in (4.0, 8.0):
    for neg in ["", DOG]:
        cfg[neg, s] = pipe(cfg_prompts, negative_prompt=neg, steps=10, guidance=s, scheduler="ddim", seed=0,
                           output_type="np", progress=False)
        images = (cfg[neg, s] * 255).round().astype(np.uint8)
        acc, fid = judge.accuracy(images, cfg_prompts), minisd.metrics.fidelity(images, cfg_prompts)
        print(f"s = {s:g}, unconditional branch {neg!r:20s}" + "".join(f"{k} {v:6.1%}  " for k, v in acc.items())
              + f"| fidelity {fid['fidelity'].mean():.3f}  background {fid['background'].mean():.2f}/255")
        cfg[neg, s, "acc"], cfg[neg, s, "fid"] = acc, fid
    loss = minisd.metrics.mean_interval(cfg["", s, "fid"]["fidelity"] - cfg[DOG, s, "fid"]["fidelity"])
    print(f"s = {s:g}: fidelity lost to the untrained branch, paired: {loss[0]:.3f} [{loss[1]:.3f}, {loss[2]:.3f}]")
    cfg[s, "loss"] = loss
assert cfg["", 4.0, "acc"]["all"] == 1.0 and cfg[4.0, "loss"][0] > 0 and cfg[8.0, "loss"][1] > 0
assert cfg[DOG, 8.0, "acc"]["colour"] < cfg["", 8.0, "acc"]["colour"]

# %% [markdown]
# With the trained unconditional branch every image is judged right. With an untrained one in
# its place the damage grows with the scale. At 4 the judges still find the images right, and
# only the fidelity hints at a cost: the shapes are drawn a little worse on average and a haze
# creeps into the background, though with 15 images the paired loss's interval still reaches
# 0. At 8 the loss is clear, its interval above 0, and the colours start to go wrong as well. Guidance amplifies the difference $\epsilon_c - \epsilon_u$, and when
# $\epsilon_u$ is not the unconditional prediction, that difference carries the quirks of an
# untrained context along with the caption, amplified $s$ times. (At $s = 1$ the unconditional
# branch is not used at all, so nothing changes there.) Exercise 9.4 looks at what happens to
# the colours.
#
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

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 9.1 (★)** At which step $t$ do signal and noise carry equal variance
# ($\mathrm{SNR}(t) = 1$, i.e. $\bar\alpha_t = \tfrac12$) in SD's scaled-linear schedule, and in DDPM's
# linear one? Which schedule spends more of its 1000 steps on the noisy half?

# %% tags=["solution", "hide-cell"]
t_sd = int((abar < 0.5).nonzero()[0])
t_ddpm = int((ddpm < 0.5).nonzero()[0])
print(f"SNR first below 1 at t = {t_sd} (SD) and t = {t_ddpm} (DDPM)")
print(f"steps with SNR < 1: SD {1000 - t_sd}, DDPM {1000 - t_ddpm}")
assert t_sd == 354 and t_ddpm == 259   # DDPM's schedule crosses 95 steps sooner: more steps on the noisy half

# %% [markdown]
# **Exercise 9.2 (★★)** The ELBO weights the ε-error of step $t$ by
# $\lambda_t = \tfrac12(\mathrm{SNR}(t-1)/\mathrm{SNR}(t) - 1)$; SD's loss weights every step by 1.
# For SD's schedule, how much larger is $\lambda_1$ than $\lambda_{999}$, and what share of
# $\sum_t \lambda_t$ falls on the first 100 steps? What does dropping the weight do to the
# noisy steps?

# %% tags=["solution", "hide-cell"]
steps_ = torch.arange(1, 1000)
lam_all = (snr64[steps_ - 1] / snr64[steps_] - 1) / 2
share = (lam_all[:100].sum() / lam_all.sum()).item()
print(f"lambda_1 = {lam_all[0]:.4f}, lambda_999 = {lam_all[-1]:.5f}: ratio {lam_all[0] / lam_all[-1]:.1f}")
print(f"share of the total weight on t = 1..100: {share:.1%}")
# the unweighted loss gives every step 1/999 of the weight: the noisy steps gain relative to the ELBO
assert 80 < lam_all[0] / lam_all[-1] < 85 and 0.40 < share < 0.45

# %% [markdown]
# **Exercise 9.3 (★★)** A U-Net's prediction is off by the same $\delta = 0.05$ (per element) at
# every step. Plot the resulting error in $\hat x_0$ against $t$ for an ε-model and for a
# v-model. Above which $t$ is the ε-model's $\hat x_0$ error larger than $\delta$ itself?

# %% tags=["solution", "hide-cell"]
delta = 0.05
err_eps = delta * (1 / snr).sqrt()          # b / a * delta
err_v = delta * (1 - abar).sqrt()           # b * delta
t_cross = int((err_eps > delta).nonzero()[0])
plt.figure(figsize=(6, 3))
plt.semilogy(err_eps, label=r"$\epsilon$-model: $\delta/\sqrt{\mathrm{SNR}}$")
plt.semilogy(err_v, label=r"v-model: $\delta\sqrt{1-\bar\alpha_t}$")
plt.axhline(delta, color="k", ls=":", lw=0.8)
plt.xlabel("t"), plt.ylabel(r"error in $\hat x_0$"), plt.legend(fontsize=8)
plt.show()
print(f"eps-model's x0 error exceeds delta from t = {t_cross} on (SNR < 1); at t = 999 it is {err_eps[999]:.3f}")
assert t_cross == 354 and err_v.max() <= delta and abs(err_eps[999] / delta - 14.6) < 0.1

# %% [markdown]
# **Exercise 9.4 (★★, break it and watch)** Show the 15 images guided away from
# "a photo of a dog" at $s = 8$ above next to those guided away from `""`. Which colours does
# the judge read where it reads them wrong, and are the images guided away from the dog
# brighter or darker than the others (mean pixel value)?

# %% tags=["solution", "hide-cell"]
bad = (cfg[DOG, 8.0] * 255).round().astype(np.uint8)
good = (cfg["", 8.0] * 255).round().astype(np.uint8)
fig = data.show(np.concatenate([good[:5], bad[:5]]), [f'"" | {p}' for p in cfg_prompts[:5]]
                + [f'dog | {p}' for p in cfg_prompts[:5]], ncols=5, fontsize=6)
plt.show()
read = judge(bad)
wrong = [(data.parse(p)[0], r[0]) for p, r in zip(cfg_prompts, read) if data.parse(p)[0] != r[0]]
print("asked -> read, where the colour is wrong:", wrong)
print(f"mean pixel at s = 8: guided from '' {cfg['', 8.0].mean():.4f}, guided from {DOG!r} {cfg[DOG, 8.0].mean():.4f}")
assert len(wrong) >= 2 and cfg[DOG, 8.0].mean() > cfg["", 8.0].mean()

# %% [markdown]
# ## What you built
#
# - The {term}`forward process` in one jump, $q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}x_0, (1-\bar\alpha_t)I)$,
#   checked against the simulated chain: `minisd.diffusion.NoiseSchedule` (SD's
#   {term}`scaled-linear schedule`, `.sd15()`, and DDPM's `.ddpm()`) and `add_noise`, equal to
#   diffusers' `DDPMScheduler.add_noise`.
# - The loss, derived: the {term}`ELBO` is an ε-MSE weighted by
#   $\lambda_t = \tfrac12(\mathrm{SNR}(t-1)/\mathrm{SNR}(t) - 1)$, and SD drops the weight:
#   `minisd.diffusion.training_loss`.
# - ε, $x_0$ and v: one model written three ways, with different error gains (SD 2.x's
#   768-pixel model predicts v).
# - {term}`caption dropout` (`drop_captions`), and what guidance does without a trained
#   unconditional branch.
# - A trained course U-Net: `minisd.UNet` with `train.course_unet_config`, trained by
#   `train.train_unet_model` (`python -m minisd train unet`), judged by `metrics.Judge`,
#   equal to diffusers' `UNet2DConditionModel` on the same weights.
#
# Next, chapter 10 turns the trained $\epsilon_\theta$ into pictures: the samplers, the
# {term}`probability-flow ODE` they integrate, and classifier-free guidance derived.
