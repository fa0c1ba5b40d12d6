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
# # 12. Evaluation: FID and CLIP score
#
# **You will build** the two numbers text-to-image papers report, from scratch and in
# `minisd.metrics`: {term}`FID` (`metrics.frechet_distance`, `metrics.fid`) and {term}`CLIP score`
# (`metrics.clip_score`), with the Fréchet distance derived and checked; then you will measure
# them on the course model against guidance, sampler, steps and sample size, next to the
# automatic judge (`metrics.Judge`) and the fitted-shape fidelity (`metrics.fidelity`).
#
# How good is a text-to-image model? The seed notes name the two numbers everyone reports:
# **FID** (Fréchet Inception Distance), which measures how *realistic* the images are as a
# set, and **CLIP score**, which measures how well each image *matches its prompt*. Lower
# FID is better; higher CLIP score is better.
#
# This chapter computes both for the course model, from scratch and with
# `minisd.metrics`, and then asks what they can and cannot tell: how they move with the
# guidance scale (the trade-off curve of the SD papers), with the sampler and its number of
# steps, and with the number of images they are computed from. Next to both stands a third
# measure only the course can have: the automatic **judge** (`minisd.metrics.Judge`), which
# reads colour, shape and position off a course image, so we can check whether a generated
# image shows what its caption says. A right/wrong judge saturates once every image is
# recognisable, so beside it stands a fourth measure that does not: the **fidelity**
# (`minisd.metrics.fidelity`), which fits the caption's ideal shape (centre and size, drawn by
# the data's own code) to the image and reports the soft IoU between the image's foreground
# and that shape; 1 is a perfect drawing, real course images read about 0.998.
#
# One thing first, said plainly: published FIDs use the image features of **Inception-v3**
# (an ImageNet classifier, 2048-d features of 299x299 images), and published CLIP scores use
# an OpenAI **CLIP** (ViT-B/16 or ViT-L/14 on 224x224 images). Neither can be downloaded here,
# and neither was made for 32x32 drawings of coloured shapes. This chapter uses the **course
# CLIP** of chapter 8 for both. The numbers are therefore in the course's own units:
# comparable with each other inside this chapter, not with any paper. The last sections show
# how to plug in the real networks when you have them.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

import minisd
from minisd import data, metrics

torch.manual_seed(0)
pipe = minisd.StableDiffusion.course_model()
clip = minisd.checkpoint.course_clip()
judge = metrics.Judge.load()

# the reference set: 400 real course images and their captions
real, captions = data.sample(400, seed=100)
# a second real set with the *same* 400 captions, drawn again (each shape lands with fresh jitter):
# what a perfect model would produce for these prompts
rng = np.random.default_rng(101)
twin = np.stack([data.render(*data.parse(c), rng=rng) for c in captions])
print("real:", real.shape, real.dtype, "| twin:", twin.shape, "| e.g.", captions[:2])


def to_uint8(images):
    """The pipeline's float images (N, H, W, 3) in [0, 1] -> uint8, as the judge and the metrics take them."""
    return (images * 255).round().astype(np.uint8)


def generate(prompts, steps=10, guidance=None, scheduler="ddim"):
    """The course model on a batch of prompts, seed 0: uint8 images (N, 32, 32, 3); guidance None is
    the model's own (pipe.guidance, stored in its checkpoint)."""
    return to_uint8(pipe(prompts, steps=steps, guidance=guidance, scheduler=scheduler, seed=0,
                         output_type="np", progress=False))


# %% [markdown]
# ## The course model's images
#
# The COCO protocol behind the FIDs in the SD papers: take the captions of a reference set of
# real images, generate one image per caption, compare the two sets. We do the same with the
# 400 real course images: one image per caption, 10 DDIM steps at the model's own guidance
# scale (printed below), all 400 in one batch.

# %%
G = pipe.guidance
gen = to_uint8(pipe(captions, steps=10, guidance=G, scheduler="ddim", seed=0, output_type="np"))
print("generated:", gen.shape, f"at guidance {G:g}")
fig, axes = plt.subplots(2, 8, figsize=(9, 2.6))
for j in range(8):
    for i, (images, label) in enumerate([(real, "real"), (gen, "model")]):
        axes[i, j].imshow(images[j], interpolation="nearest")
        axes[i, j].set(xticks=[], yticks=[])
    axes[0, j].set_title(captions[j].replace(" in the ", "\n"), fontsize=6)
axes[0, 0].set_ylabel("real")
axes[1, 0].set_ylabel("course model")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## FID: the distance between two Gaussians
#
# FID {cite:p}`heusel2017fid` does not compare images one by one. It
#
# 1. passes every image through a fixed **feature network** and keeps one vector per image;
# 2. fits a **Gaussian** to each set of vectors: a mean $\mu$ and a covariance $\Sigma$;
# 3. returns the **Fréchet distance** between the two Gaussians, which for Gaussians is the
#    *squared* 2-Wasserstein distance $W_2^2$ (derived in the next section):
#
# $$\mathrm{FID} = \lVert \mu_r - \mu_g \rVert^2 + \operatorname{tr}\left(\Sigma_r + \Sigma_g - 2\,(\Sigma_r \Sigma_g)^{1/2}\right).$$
#
# The first term says the sets differ on average; the second that they spread differently
# (too little variety in the generated set is penalised, not only wrong content). FID is 0
# when the two Gaussians are equal, and **lower is better**. Two caveats are built in: it
# sees only what the feature network sees, and only the first two moments of it.
#
# ### Where the formula comes from
#
# The 2-Wasserstein distance between two distributions $P$ and $Q$ is the cheapest way to move
# one onto the other, paying the squared distance moved:
# $W_2^2(P, Q) = \min \mathbb E\,\lVert X - Y \rVert^2$ over all joint distributions (couplings)
# of $X \sim P$ and $Y \sim Q$. Split each variable into its mean and the rest,
# $X = \mu_1 + X_0$, $Y = \mu_2 + Y_0$. The cross term $2(\mu_1 - \mu_2)^\top \mathbb E[X_0 - Y_0]$
# vanishes, so for every coupling
#
# $$\mathbb E\lVert X - Y\rVert^2 = \lVert \mu_1 - \mu_2\rVert^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2 - 2\,\operatorname{tr}\,\mathbb E[X_0 Y_0^\top] .$$
#
# Only the last term depends on the coupling: the best coupling makes $X_0$ and $Y_0$ as
# correlated as their covariances allow. In **1-D** that is $Y_0 = (\sigma_2/\sigma_1) X_0$,
# with $\mathbb E[X_0 Y_0] = \sigma_1\sigma_2$, so
#
# $$W_2^2 = (\mu_1 - \mu_2)^2 + \sigma_1^2 + \sigma_2^2 - 2\sigma_1\sigma_2 = (\mu_1-\mu_2)^2 + (\sigma_1 - \sigma_2)^2 .$$
#
# In $d$ dimensions, for two Gaussians, the best coupling is again linear, and the largest
# $\operatorname{tr}\mathbb E[X_0Y_0^\top]$ is $\operatorname{tr}\big(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}\big)^{1/2}$
# (a classical result of Dowson & Landau and of Olkin & Pukelsheim, 1982), which has the same
# trace as $(\Sigma_1\Sigma_2)^{1/2}$ (the two matrices are similar). That gives FID's
# formula: the Fréchet distance *is* $W_2^2$, not $W_2$. (For other distributions the formula
# is only the $W_2^2$ between their Gaussian fits.)
#
# The check: draw samples of two Gaussians and compute $W_2^2$ between the *samples* directly,
# by solving the transport problem, with no formula. In 1-D the best coupling of two equal-size
# samples pairs them in sorted order; in 2-D it is an assignment problem
# (`scipy.optimize.linear_sum_assignment` on the matrix of squared distances).

# %%
from scipy.optimize import linear_sum_assignment

rng = np.random.default_rng(0)
# 1-D: N(1, 2^2) against N(-0.5, 0.5^2)
m1, s1, m2, s2 = 1.0, 2.0, -0.5, 0.5
x, y = rng.normal(m1, s1, 200_000), rng.normal(m2, s2, 200_000)
w2_samples = np.mean((np.sort(x) - np.sort(y)) ** 2)              # the optimal (monotone) coupling
w2_closed = (m1 - m2) ** 2 + (s1 - s2) ** 2
print(f"1-D: closed form {w2_closed:.4f}, optimal transport of 200,000 samples {w2_samples:.4f}")
assert abs(w2_samples - w2_closed) < 0.02 * w2_closed

# 2-D: two correlated Gaussians
mu1, mu2 = np.array([0.0, 0.0]), np.array([1.0, -1.0])
S1, S2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[0.5, -0.3], [-0.3, 1.5]])
root1 = scipy.linalg.sqrtm(S1).real
w2_closed_2d = ((mu1 - mu2) ** 2).sum() + np.trace(S1 + S2 - 2 * scipy.linalg.sqrtm(root1 @ S2 @ root1).real)
print(f"tr (S1 S2)^1/2 = {np.trace(scipy.linalg.sqrtm(S1 @ S2).real):.6f}, "
      f"tr (S1^1/2 S2 S1^1/2)^1/2 = {np.trace(scipy.linalg.sqrtm(root1 @ S2 @ root1).real):.6f}")
estimates = []
for seed in range(4):
    r = np.random.default_rng(seed)
    a2, b2 = r.multivariate_normal(mu1, S1, 800), r.multivariate_normal(mu2, S2, 800)
    cost = ((a2[:, None, :] - b2[None, :, :]) ** 2).sum(-1)         # (800, 800) squared distances
    rows_, cols_ = linear_sum_assignment(cost)
    estimates.append(cost[rows_, cols_].mean())
print(f"2-D: closed form {w2_closed_2d:.4f}, optimal transport of 800 samples (4 draws) "
      f"{np.mean(estimates):.4f} ± {np.std(estimates):.4f}; metrics.frechet_distance on the last draw "
      f"{metrics.frechet_distance(a2, b2):.4f}")
assert abs(np.mean(estimates) - w2_closed_2d) < 0.05 * w2_closed_2d

# %% [markdown]
# The transport between samples finds the closed form's number (within sampling error): FID's
# formula is the squared distance, in the units of the features squared. Its square root,
# $W_2$, would be in the features' own units; FID keeps the square.
#
# Our feature network is the course CLIP's **image tower** (chapter 8): a 32x32 image in
# $[-1, 1]$ to a 64-d embedding. We take the embedding *before* CLIP normalises it to unit
# length, so that a difference in length between the two sets counts too.

# %%
def course_features(images):
    """The feature network of this chapter: uint8 course images (N, 32, 32, 3) -> the course CLIP's
    64-d image embedding before normalisation (N, 64)."""
    return clip.image(data.to_tensor(images))


with torch.no_grad():
    f_real, f_twin, f_gen = course_features(real), course_features(twin), course_features(gen)
print("features:", tuple(f_real.shape))

# the formula, term by term (float64, scipy's matrix square root as in pytorch-fid)
a, b = f_real.double().numpy(), f_gen.double().numpy()
mu_a, mu_b = a.mean(0), b.mean(0)
cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)      # (64, 64) each
mean_term = ((mu_a - mu_b) ** 2).sum()
cov_term = np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real)
print(f"|mu_r - mu_g|^2 = {mean_term:.3f}   covariance term = {cov_term:.3f}   FID = {mean_term + cov_term:.3f}")
print(f"metrics.frechet_distance:  {metrics.frechet_distance(f_real, f_gen):.3f}")
print(f"metrics.fid(real, gen, ...): {metrics.fid(real, gen, course_features):.3f}")
print(f"total variance tr(Sigma): real {np.trace(cov_a):.1f}, course model {np.trace(cov_b):.1f}")

# %% [markdown]
# `metrics.frechet_distance` computes the same number without scipy's general `sqrtm` (it
# uses only symmetric eigendecompositions, which stay real and finite when a covariance is
# singular, as it is with fewer images than feature dimensions); `metrics.fid` runs the
# feature network over both image sets in batches and calls it.
#
# What the two Gaussians look like: the 64-d features projected on their first two principal
# components, with each fitted Gaussian drawn as its 2-sigma ellipse.

# %%
centre = a.mean(0)
_, _, vt = np.linalg.svd(np.concatenate([a, b]) - centre, full_matrices=False)
P = vt[:2].T                                                          # (64, 2) projection
fig, ax = plt.subplots(figsize=(5.5, 4.5))
for feats, colour, label in [(a, "tab:blue", "real"), (b, "tab:orange", "course model")]:
    xy = (feats - centre) @ P                                         # (N, 64) -> (N, 2)
    ax.scatter(xy[:, 0], xy[:, 1], s=5, alpha=0.4, color=colour, label=label)
    mu, cov = xy.mean(0), np.cov(xy, rowvar=False)
    w, v = np.linalg.eigh(cov)
    angle = np.linspace(0, 2 * np.pi, 100)
    ellipse = mu[:, None] + 2 * (v * np.sqrt(w)) @ np.stack([np.cos(angle), np.sin(angle)])  # (2, 100)
    ax.plot(ellipse[0], ellipse[1], color=colour, lw=2)
ax.set(xlabel="principal component 1", ylabel="principal component 2",
       title="course-CLIP features: real vs generated (2-sigma ellipses)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The clusters are the 90 caption combinations, and the model's points sit in the same
# clusters as the real ones: the means nearly agree (the mean term printed above is a small
# part of the FID), while the model's total variance $\operatorname{tr}(\Sigma)$ is a little
# larger than the real set's, so most of this FID is the covariance term. FID sums up how far
# apart the two Gaussians are in all 64 dimensions, not just these two.
#
# ## CLIP score: does the image match its prompt?
#
# CLIP score embeds each image and its own caption with {term}`CLIP` {cite:p}`radford2021clip`
# and averages a clipped cosine over the pairs. Two scalings are in use. Hessel et al.'s
# CLIP-S {cite:p}`hessel2021clipscore` is $w \cdot \max(\cos(u_i, v_i), 0)$ with $w = 2.5$;
# torchmetrics' `CLIPScore`, which diffusers' documentation and most SD reports use, computes
# $\max(100 \cos(u_i, v_i), 0)$, that is $w = 100$. `metrics.clip_score` (chapter 8) follows
# torchmetrics; multiply by 0.025 to get CLIP-S. **Higher is better**. It needs no reference images, only prompts, so it
# measures prompt fidelity rather than realism. Here both towers are the course CLIP's. Two
# references frame it: the score of *real* images with their captions (the best a set can
# hope for under this CLIP) and of real images with *shuffled* captions (what unrelated
# pairs get).

# %%
tok = pipe.tokenizer
with torch.no_grad():
    text = clip.encode_text(tok(captions))                            # (400, 64) unit vectors
    img = {name: clip.encode_image(data.to_tensor(x)) for name, x in [("real", real), ("twin", twin), ("gen", gen)]}
acc_real = judge.accuracy(real, captions)
acc_gen = judge.accuracy(gen, captions)
fid_floor = metrics.frechet_distance(f_real, f_twin)
fid_gen = metrics.frechet_distance(f_real, f_gen)
NF = 30   # the fidelity is read on the first NF images of each set (a fit per image and shape: ~0.06 s each)
reads = {name: metrics.fidelity(x[:NF], captions[:NF]) for name, x in [("real", real), ("twin", twin), ("gen", gen)]}
rows = [("real images (second draw)", fid_floor, metrics.clip_score(img["twin"], text), judge.accuracy(twin, captions),
         reads["twin"]),
        (f"course model, DDIM 10, s={G:g}", fid_gen, metrics.clip_score(img["gen"], text), acc_gen, reads["gen"]),
        ("real images, shuffled captions", None, metrics.clip_score(img["real"], text.roll(1, 0)), None, None)]


def fidelity_text(per):
    """'mean [lo, hi]' of a metrics.fidelity result's fidelity, and the pixel judge's shape rate."""
    return "{:.3f} [{:.3f}, {:.3f}]".format(*metrics.mean_interval(per["fidelity"])) + f"{per['shape'].mean():7.0%}"


print(f"400 images each; FID against the 400 real images, judge: all three attributes right; "
      f"fidelity (95 % interval) and the pixel judge's shape rate on the first {NF}")
print(f"{'':32s}{'FID':>7s}{'CLIP score':>12s}{'judge':>8s}{'fidelity':>15s}{'':9s}{'shape':>7s}")
print(f"{'real images (the reference)':32s}{'0':>7s}{metrics.clip_score(img['real'], text):12.2f}{acc_real['all']:8.1%}"
      f"  {fidelity_text(reads['real'])}")
for name, f, cs, acc, per in rows:
    print(f"{name:32s}" + (f"{f:7.2f}" if f is not None else f"{'-':>7s}") + f"{cs:12.2f}"
          + (f"{acc['all']:8.1%}" if acc is not None else f"{'-':>8s}") + (f"  {fidelity_text(per)}" if per else ""))
cos_gen = torch.nn.functional.cosine_similarity(img["gen"], text, dim=-1)
print(f"the course model's score as Hessel et al.'s CLIP-S (w = 2.5): {2.5 * cos_gen.clamp(min=0).mean():.3f} "
      f"= 0.025 x {metrics.clip_score(img['gen'], text):.2f}")

# %% [markdown]
# By three of the four measures the course model is as good as its data. The judge finds
# every one of its 400 images right, as it finds every real one; its CLIP score is as high as
# the real images'; and its FID is close to the floor of two real sets with the same captions
# (what a perfect model would get with 400 images), so close that with 100 images or fewer
# FID cannot tell the model from real data at all (the section on sample size below). Only the
# fourth measure separates the model from its data without doubt: the
# fidelity of its shapes, whose interval lies far below real images'. The judge cannot see
# that gap because each image is right, and FID barely sees it because a shape drawn a little
# off moves the course CLIP's features only a little; the fidelity measures exactly that.
#
# The course CLIP's scores sit near 100, far above the 35 or so of the real-model anchor at
# the end of this chapter: it was trained on a closed world of 90 captions and turns a
# matching pair into nearly the same direction, while a web-trained CLIP gives matching SD
# images cosines near 0.35. Only differences between scores from one CLIP mean anything.
#
# ## The guidance scale: FID against CLIP score
#
# Guidance ({term}`classifier-free guidance` {cite:p}`ho2022cfg`, chapter 10) pushes each sample towards its prompt. The Stable
# Diffusion v1 model cards plot FID against CLIP score (ViT-L/14) for each checkpoint, one
# point per guidance scale $s$ = 1.5, 2, 3, ..., 8 with 50 PLMS steps on COCO 2017 validation
# prompts; GLIDE (Nichol et al., 2021) and Imagen (Saharia et al., 2022) draw the same kind of
# curve. More guidance raises the CLIP score, and past a small $s$ makes FID *worse*, because
# the samples become exaggerated and less varied. The curve is how one chooses $s$. The same sweep on the course model: the first 100 captions,
# the same seed, 10 DDIM steps, $s$ from 1 (the conditional model alone) to 8. FID is
# computed against the 100 real images with the same captions; the fidelity on the first 30
# of each set, with its 95 % interval.

# %%
N = 100
SCALES = sorted({1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, G})
sweep = {}
for s in tqdm(SCALES, desc="guidance sweep"):
    images = gen[:N] if s == G else generate(captions[:N], guidance=s)   # s = G is the run above
    with torch.no_grad():
        feats, emb = course_features(images), clip.encode_image(data.to_tensor(images))
    sweep[s] = dict(fid=metrics.frechet_distance(f_real[:N], feats), clip=metrics.clip_score(emb, text[:N]),
                    judge=judge.accuracy(images, captions[:N])["all"], images=images,
                    fidelity=metrics.mean_interval(metrics.fidelity(images[:NF], captions[:NF])["fidelity"]))
floor_N = metrics.frechet_distance(f_real[:N], f_twin[:N])
clip_real_N = metrics.clip_score(img["real"][:N], text[:N])
acc_real_N = judge.accuracy(real[:N], captions[:N])["all"]
fidelity_real = metrics.mean_interval(reads["real"]["fidelity"])
print(f"{N} images each; judge on the {N} real images: {acc_real_N:.0%}; real-vs-real FID floor: {floor_N:.2f}; "
      f"CLIP score of the real images: {clip_real_N:.2f}; fidelity of the first {NF} real: {fidelity_real[0]:.3f}")
for s in SCALES:
    print(f"s = {s:3g}: FID {sweep[s]['fid']:5.2f}   CLIP score {sweep[s]['clip']:6.2f}   judge {sweep[s]['judge']:5.0%}"
          "   fidelity {:.3f} [{:.3f}, {:.3f}]".format(*sweep[s]["fidelity"]) + ("   <- the model's default" if s == G else ""))

fig, (ax, ax3, ax2) = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [1.1, 1, 1.1]})
ax.plot([sweep[s]["clip"] for s in SCALES], [sweep[s]["fid"] for s in SCALES], "o-")
for s in SCALES:
    ax.annotate(f"s={s:g}", (sweep[s]["clip"], sweep[s]["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
ax.axhline(floor_N, color="k", ls=":", label="real vs real (FID floor)")
ax.axvline(clip_real_N, color="gray", ls="--", label="real images' CLIP score")
ax.set(xlabel="CLIP score (course CLIP), higher is better", ylabel="FID (course CLIP features), lower is better",
       title=f"guidance sweep, {N} images, DDIM 10 steps")
ax.legend(fontsize=8)
fs = np.array([sweep[s]["fidelity"] for s in SCALES])
ax3.errorbar(SCALES, fs[:, 0], yerr=[fs[:, 0] - fs[:, 1], fs[:, 2] - fs[:, 0]], fmt="o-", capsize=3)
ax3.axhline(fidelity_real[0], color="k", ls=":", label="real images")
ax3.set(xscale="log", xticks=SCALES, xticklabels=[f"{s:g}" for s in SCALES], xlabel="guidance scale s",
        ylabel="mean fidelity, 95 % interval", title=f"fidelity, first {NF} images")
ax3.minorticks_off()
ax3.legend(fontsize=8)
ax2.imshow(np.concatenate([np.concatenate([sweep[s]["images"][k] for s in SCALES], axis=1) for k in range(4)]),
           interpolation="nearest")
ax2.set(xticks=np.arange(len(SCALES)) * 32 + 16, xticklabels=[f"s={s:g}" for s in SCALES], yticks=[],
        title="the same four prompts at each scale")
plt.tight_layout()
plt.show()

# %% [markdown]
# On this model the model cards' curve is faint, and the reason is worth seeing. FID and the
# CLIP score both come out best at a small scale, but over the whole range from 1 to 8 they
# move by a few tenths of a FID point and a fraction of a CLIP point: with 100 images per point
# FID's differences are within its noise (see below), and the course CLIP, trained on a closed
# world of 90 captions, is at its ceiling for any image that shows the right thing. The judge
# is at or near 100 % everywhere. Of the four, the fidelity draws the clearest curve (middle
# panel): highest at a small scale and falling as guidance grows, the over-guided
# shapes of chapter 10 (pinched sides, lumps) that FID and CLIP barely feel. On SD, whose CLIP
# is far from saturated and whose images vary far more, the same push shows in the papers'
# curve as a rising CLIP score and, past a small $s$, a rising FID. Either way the lesson is
# the same: the images closest to the data come at a small guidance scale, and a larger scale
# buys prompt-following with realism. The course model's own scale (marked above) was chosen by
# the fidelity on 360 images (chapter 10); read the shape of these curves rather than any one
# step along them.
#
# ## Steps and sampler
#
# The same 100 prompts at the model's guidance with three samplers of chapter 10 at 5, 10 and
# 20 steps: DDIM, DPM-Solver++ (2M) and PNDM, SD 1.5's default.

# %%
STEPS = [5, 10, 20]
SAMPLERS = ["ddim", "dpm++2m", "pndm"]
quality = {}
for name in tqdm(SAMPLERS, desc="samplers"):
    for n in STEPS:
        images = gen[:N] if (name, n) == ("ddim", 10) else generate(captions[:N], steps=n, scheduler=name)
        with torch.no_grad():
            feats, emb = course_features(images), clip.encode_image(data.to_tensor(images))
        quality[name, n] = dict(fid=metrics.frechet_distance(f_real[:N], feats),
                                clip=metrics.clip_score(emb, text[:N]), judge=judge.accuracy(images, captions[:N])["all"],
                                fidelity=metrics.mean_interval(metrics.fidelity(images[:NF], captions[:NF])["fidelity"]))
print(f"{N} images each, guidance {G:g}; judge on the real images: {acc_real_N:.0%}, FID floor {floor_N:.2f}; "
      f"fidelity on the first {NF} (real: {fidelity_real[0]:.3f})")
for name in SAMPLERS:
    print(f"{name:8s}" + "   ".join(f"{n:2d} steps: FID {quality[name, n]['fid']:5.2f} CLIP {quality[name, n]['clip']:5.1f} "
                                    f"judge {quality[name, n]['judge']:4.0%} fidelity {quality[name, n]['fidelity'][0]:.3f}"
                                    for n in STEPS))
fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
for key, ax, ref, label in [("fid", axes[0], floor_N, "FID (lower is better)"),
                            ("clip", axes[1], clip_real_N, "CLIP score (higher is better)"),
                            ("judge", axes[2], acc_real_N, "judge: all three right"),
                            ("fidelity", axes[3], fidelity_real[0], f"fidelity, 95 % interval ({NF} images)")]:
    for name in SAMPLERS:
        if key == "fidelity":
            f = np.array([quality[name, n][key] for n in STEPS])
            ax.errorbar(STEPS, f[:, 0], yerr=[f[:, 0] - f[:, 1], f[:, 2] - f[:, 0]], fmt="o-", capsize=3, label=name)
        else:
            ax.plot(STEPS, [quality[name, n][key] for n in STEPS], "o-", label=name)
    ax.axhline(ref, color="k", ls=":", label="real images")
    ax.set(xlabel="steps", xticks=STEPS, title=label)
axes[0].set_yscale("log")
axes[3].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The measures tell chapter 10's story at the model's own, small guidance: DDIM and
# DPM-Solver++ are done by 5 steps by every measure, while PNDM, SD 1.5's default, is behind at
# 5 steps and close to the others only from 10 (chapter 10 traced PNDM's trouble to its
# fourth-order blend meeting strong guidance; at a small scale there is little of it). They
# agree on the order of the samplers but not on the distances. Where PNDM gets a quarter of
# its images wrong, the judge, FID and the fidelity all see it, FID most loudly (several times
# the others'). Between two good settings the judge and the CLIP score have nothing left to
# say, and FID's differences are within its noise at 100 images; the fidelity's differences
# there are within its interval too: on this model, a few DDIM steps already draw as well as
# many.
#
# ## How many images? FID's bias at small N
#
# FID estimates $\mu$ and $\Sigma$ from N images. The estimate of $\Sigma$ is noisy, and the
# noise does not average out: the trace of the matrix square root is biased, so the FID of
# two *identical distributions* is not 0 but about $k/N$ (Chong & Forsyth, 2020, "Effectively
# unbiased FID and Inception score and where to find them"). FID at N images is, roughly,
#
# $$\mathrm{FID}_N \approx \mathrm{FID}_\infty + \frac{k}{N},$$
#
# with a $k$ that depends on the model and the feature network. Two real sets, and the model
# against real, at N = 50 to 400 (for N < 400, the mean and spread over 10 random subsets of
# the same N captions):

# %%
SIZES = [50, 100, 200, 400]
choice = np.random.default_rng(0)
bias = {"real vs real": {}, "model vs real": {}}
for n in SIZES:
    subsets = [np.arange(400)] if n == 400 else [choice.choice(400, n, replace=False) for _ in range(10)]
    bias["real vs real"][n] = [metrics.frechet_distance(f_real[i], f_twin[i]) for i in subsets]
    bias["model vs real"][n] = [metrics.frechet_distance(f_real[i], f_gen[i]) for i in subsets]
with torch.no_grad():   # a third real set, drawn with its own random captions
    f_fresh = course_features(data.sample(400, seed=200)[0])
fresh = {n: metrics.frechet_distance(f_real[:n], f_fresh[:n]) for n in SIZES}
for name, runs in bias.items():
    print(f"{name:14s}" + "  ".join(f"N={n}: {np.mean(r):5.2f} ± {np.std(r):4.2f}" for n, r in runs.items()))
print(f"{'real vs real, other captions (first N):':42s}" + "  ".join(f"N={n}: {v:5.2f}" for n, v in fresh.items()))

fig, ax = plt.subplots(figsize=(6, 4))
fits = {}
for name, runs in bias.items():
    inv = np.array([1 / n for n in SIZES])
    mean = np.array([np.mean(runs[n]) for n in SIZES])
    ax.errorbar(inv, mean, yerr=[np.std(runs[n]) for n in SIZES], fmt="o", capsize=3, label=name)
    fits[name] = np.polyfit(inv, mean, 1)                                # FID_N = k / N + FID_inf
    grid = np.linspace(0, inv.max(), 20)
    ax.plot(grid, np.polyval(fits[name], grid), ls="--", color=ax.lines[-1].get_color())
    print(f"{name:14s} fit: FID_N = {fits[name][1]:.2f} + {fits[name][0]:.0f} / N")
ax.set(xlabel="1 / N", ylabel="FID (course CLIP features)", title="FID against 1/N: the line's intercept is FID at N = infinity")
ax.set_xticks([1 / n for n in SIZES], [f"1/{n}" for n in SIZES])
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Two real sets of the same captions get an FID of 1.3 at N = 50 and 0.16 at N = 400: all of
# it is the small-N bias, halving each time N doubles, and the fitted line goes through
# (nearly) 0 at $1/N = 0$ as it should. The model's points follow a line of about the same
# slope, shifted up a little: the bias is about the same, and the intercept (the fit printed
# above, about 0.2) is the model's real distance from the data, a fraction of the bias at any
# N here. At N = 50 and 100 the model's FID lies within the spread over subsets of two *real*
# sets: with that few images FID cannot tell this model from its data, and at N = 50 the spread
# is a sizeable part of the bias itself. The sweeps above compare settings on the same 100
# captions and the same noise, which cancels some of this spread, but a gap of a few tenths
# should still not be trusted.
#
# What FID over a few hundred images can tell:
#
# - which of two settings is better *when the gap is large* against the spread (PNDM at 5
#   steps against DDIM at 10);
# - that a model is not yet at the real-vs-real floor *at the same N*.
#
# What it cannot:
#
# - be compared with an FID at another N, with another feature network, another image size or
#   another reference set (the SD papers' numbers use 30,000 COCO images and Inception-v3:
#   nothing here is on that scale);
# - rank two settings whose FIDs differ by less than the spread over subsets;
# - say *what* is wrong, or how well a shape is drawn: the judge and the fidelity do that for
#   the course data, and for real data one looks at the images.
#
# One more trap the course data makes visible, in the last printed line: a real set drawn
# with its *own* random captions is about fifteen times further from the reference at N = 50
# than the same captions re-drawn, because the two sets hold a different mix of captions. Generate from
# the reference set's own captions, as the COCO protocol does, or the caption mix swamps the
# pictures.
#
# ## The real-model anchor: SD 1.4 against SD 1.5
#
# The diffusers documentation ("Evaluating Diffusion Models") gives the one CLIP-score
# comparison of real SD checkpoints that a reader can reproduce exactly: six prompts ("a
# photo of an astronaut riding a horse on mars", "A high tech solarpunk utopia in the Amazon
# rainforest", and four more), one image each with `torch.manual_seed(0)`, the pipelines'
# defaults (512x512, 50 PNDM steps, guidance 7.5, float16 on a GPU), images turned into
# uint8 by `(images * 255).astype("uint8")`, and torchmetrics' `clip_score` with
# `openai/clip-vit-base-patch16` (CLIP ViT-B/16). It reports
#
# | checkpoint | CLIP score |
# |---|---|
# | SD 1.4 (`CompVis/stable-diffusion-v1-4`) | 34.91 |
# | SD 1.5 (`stable-diffusion-v1-5/stable-diffusion-v1-5`) | 36.21 |
#
# Read it with this chapter in mind: the score is in ViT-B/16's units (not comparable with
# the course CLIP's 97, nor with scores from the ViT-L/14 that SD's text encoder comes from),
# it is a mean over six images (one image that fits its prompt better or worse moves it by a
# sixth of the difference), and the docs themselves warn that so few prompts are not a real
# evaluation. It is an anchor for checking
# a setup, not a ranking of the two models. One detail matters for reproducing it: the docs
# draw SD 1.5's noise from the *same* generator after SD 1.4's images, not from a fresh seed.
#
# `scripts/clip_score_anchor.py` runs that protocol for a reader who has the weights and the
# CLIP model on disk (nothing is downloaded):
#
# ```
# python scripts/clip_score_anchor.py --clip path/to/clip-vit-base-patch16 \
#     --weights path/to/stable-diffusion-v1-4 path/to/stable-diffusion-v1-5 --device cuda --dtype float16
# ```
#
# It generates with diffusers' pipeline by default (the protocol as written) or with
# minisd's (`--pipeline minisd`, the same initial noise), and computes the score with
# transformers' CLIP in `metrics.clip_score`'s form. Its tests run it end to end on tiny
# random models in the same folder layouts.
#
# With real networks on disk, the metrics of this chapter take them as a `feature_fn`:
# `metrics.clip_image_features(model)` for a transformers `CLIPVisionModelWithProjection`,
# and `metrics.inception_features(path)` for the TorchScript Inception-v3 of the
# StyleGAN2-ADA / clean-fid {cite:p}`parmar2022cleanfid` metrics (`inception-2015-12-05.pt`),
# which reproduces the TensorFlow FID network without torchvision.
#
# ## Ours == the reference formula
#
# pytorch-fid and the original TensorFlow code of Heusel et al. {cite:p}`heusel2017fid` compute the covariance term
# with a general matrix square root of $\Sigma_r \Sigma_g$ (scipy's `sqrtm`). Ours on the same
# features, at N = 400 and at N = 50, where both covariances (64-d features from 50 images)
# are singular:

# %%
def sqrtm_reference(x, y):
    """FID as pytorch-fid writes it: scipy.linalg.sqrtm of the product of the two covariances."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return ((mu_x - mu_y) ** 2).sum() + np.trace(cx) + np.trace(cy) - 2 * np.trace(scipy.linalg.sqrtm(cx @ cy).real)


for n in [400, 50]:
    x, y = f_real[:n].double().numpy(), f_gen[:n].double().numpy()
    ours, theirs = metrics.frechet_distance(x, y), sqrtm_reference(x, y)
    print(f"N = {n:3d}: ours {ours:.6f}  scipy sqrtm {theirs:.6f}  |diff| = {abs(ours - theirs):.1e}")

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 12.1 (★)** Add the same vector $c$ to every generated feature vector. Which term of
# FID changes, and by how much? Predict it from the formula, then check it on `f_real`,
# `f_gen` with $c$ = 0.1 times the first real feature vector.

# %% tags=["solution", "hide-cell"]
shift = 0.1 * f_real[0]
base_fid = metrics.frechet_distance(f_real, f_gen)
moved_fid = metrics.frechet_distance(f_real, f_gen + shift)
# only the mean term moves: |mu_r - mu_g - c|^2 - |mu_r - mu_g|^2 = |c|^2 - 2 c . (mu_r - mu_g)
gap = (f_real.double().mean(0) - f_gen.double().mean(0))
predicted = float((shift.double() ** 2).sum() - 2 * (shift.double() * gap).sum())
print(f"FID {base_fid:.4f} -> {moved_fid:.4f}: change {moved_fid - base_fid:.4f}, predicted {predicted:.4f}")
assert abs((moved_fid - base_fid) - predicted) < 1e-3 * max(1.0, abs(predicted))   # covariances untouched

# %% [markdown]
# **Exercise 12.2 (★★, break it and watch)** A model that draws every caption right but always
# the *same* picture for a caption (mode collapse within each caption) would satisfy the judge.
# Does FID notice? Build such a "model" from the 400 generated images: replace each image by
# the first generated image with the same caption. Compare judge accuracy, CLIP score, FID
# against the real images and the total variance $\operatorname{tr}\Sigma$ of the features
# with the honest generated set, and explain what you see from FID's formula.

# %% tags=["solution", "hide-cell"]
first_of = {}
for i, c in enumerate(captions):
    first_of.setdefault(c, i)
collapsed = gen[[first_of[c] for c in captions]]                  # one picture per caption, repeated
with torch.no_grad():
    f_collapsed = course_features(collapsed)
    emb_collapsed = clip.encode_image(data.to_tensor(collapsed))
collapse = {"honest": (judge.accuracy(gen, captions)["all"], metrics.clip_score(img["gen"], text), fid_gen),
            "collapsed": (judge.accuracy(collapsed, captions)["all"], metrics.clip_score(emb_collapsed, text),
                          metrics.frechet_distance(f_real, f_collapsed))}
print(f"{len(first_of)} distinct pictures for {len(captions)} captions")
for name, (acc, cs, f) in collapse.items():
    print(f"{name:10s} judge {acc:6.1%}   CLIP score {cs:6.2f}   FID {f:6.2f}")
trace = {name: float(np.trace(np.cov(x.double().numpy(), rowvar=False)))
         for name, x in [("real", f_real), ("honest", f_gen), ("collapsed", f_collapsed)]}
print("total variance tr(Sigma):", {k: round(v, 1) for k, v in trace.items()})
# FID notices the collapse only weakly, and for a reason that has nothing to do with variety
# within a caption. It sees only the mean and covariance of the features: each caption's one
# picture is itself a random draw, so on average it sits as far from its caption's centre as
# the many pictures did. What changes is that the set holds fewer distinct points (one per
# caption), and a covariance estimated from fewer points carries a larger k/N bias: the
# collapsed set's FID is about what two *real* sets of that many images get (the sample-size
# section above, printed again here), while the judge and the CLIP score barely move. Two moments of a
# feature cloud cannot tell "varied" from "repeated"; only more pictures per caption, or a
# look at them, can.
assert collapse["collapsed"][0] >= collapse["honest"][0] - 0.01
print(f"two real sets of 100 images (the sample-size section): FID {np.mean(bias['real vs real'][100]):.2f}")
assert collapse["collapsed"][2] < collapse["honest"][2] + 1.0      # worse by about the bias of fewer distinct images

# %% [markdown]
# **Exercise 12.3 (★★★)** FID's small-$N$ bias without any model: draw two sets of $N$ vectors
# from the *same* 64-dimensional standard Gaussian (the true FID is exactly 0) for
# $N$ = 100, 200, 400, 800, 10 times each. How does the mean FID scale with $N$? Fit
# $\mathrm{FID}_N = k/N$ and compare $k$ with a prediction: the two sample means differ by
# $\mathbb E\lVert\hat\mu_1 - \hat\mu_2\rVert^2 = 2d/N$, and writing each sample covariance
# as $I + E_i$, the trace term is about $\operatorname{tr}(E_1 - E_2)^2/4$, whose mean is
# $(d^2 + d)/(2N)$ (each entry of $E_i$ has variance about $1/N$, twice that on the diagonal).

# %% tags=["solution", "hide-cell"]
g = np.random.default_rng(1)
D = 64
null_fid = {n: np.mean([metrics.frechet_distance(g.standard_normal((n, D)), g.standard_normal((n, D)))
                        for _ in range(10)]) for n in (100, 200, 400, 800)}
k_fit = np.mean([n * v for n, v in null_fid.items()])
for n, v in null_fid.items():
    print(f"N = {n:4d}: FID {v:6.3f}   N x FID = {n * v:7.1f}")
predicted_k = 2 * D + (D * D + D) / 2
print(f"k about {k_fit:.0f}; predicted 2d + (d^2 + d) / 2 = {predicted_k:.0f}")
# FID halves with each doubling of N, a 1/N bias of the predicted size
assert all(0.4 < null_fid[2 * n] / null_fid[n] < 0.6 for n in (100, 200, 400)) and abs(k_fit / predicted_k - 1) < 0.05

# %% [markdown]
# ## What you built
#
# `metrics.frechet_distance` (FID's formula, the squared 2-Wasserstein distance between two
# Gaussian fits, derived and checked against optimal transport between samples),
# `metrics.fid` (features in, distance out), `metrics.clip_score` (torchmetrics' $w = 100$;
# Hessel et al.'s CLIP-S is 0.025 times it), with the course CLIP as the feature network, and
# beside them the judge and the fidelity (`metrics.fidelity`, the soft IoU with the fitted
# ideal shape). On the course model they tell one story with different resolutions: the judge
# and the CLIP score saturate once every image shows the right thing; FID at a few hundred
# images carries a $k/N$ bias larger than this model's distance from its data; the fidelity,
# which measures how well each shape is drawn, still separates the model from real drawings
# and shows where guidance starts to cost. Samplers differ most at few steps. Next: changing
# what the model can draw, with a LoRA (chapter 13).
