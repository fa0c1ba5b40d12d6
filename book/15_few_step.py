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
# # 15. Few-step sampling: consistency distillation
#
# **You will build** the LCM sampler (`schedulers.LCM`, `scheduler="lcm"`, equal to diffusers'
# `LCMScheduler`), a latent consistency distillation of the course U-Net
# (`train.distill_lcm`, `python -m minisd train lcm`) that samples in 1 to 8 U-Net calls instead
# of the teacher's 50, measured against the teacher, and the loader that puts LCM-LoRA on SD 1.5
# (`lora.load`, every key format diffusers reads).
#
# Every image so far took 25 {term}`DDIM` steps with {term}`classifier-free guidance`: 50 U-Net
# calls. SD 1.5 takes 30 to 50 steps. On a CPU that wait is what a reader feels, and it is why
# the few-step models (LCM, LCM-LoRA, "turbo") are what people run on CPUs today. A
# {term}`consistency model` {cite}`song2023consistency` learns to jump from any point of the
# sampler's path straight to its end; a latent consistency model {cite}`luo2023lcm` is one
# distilled from a latent diffusion model, with guidance folded in; LCM-LoRA
# {cite}`luo2023lcmlora` is the same distillation stored as a {term}`LoRA`.

# %%
# %matplotlib inline
import json

import matplotlib.pyplot as plt
import numpy as np
import torch

import minisd
from minisd import DATA_DIR, data, lora, metrics, train
from minisd.checkpoint import course_text_encoder, course_unet, course_vae, load_checkpoint, sampling_settings
from minisd.schedulers import DDIM, LCM, SchedulerConfig, make_scheduler
from minisd.tokenizer import CLIPTokenizer

_ = torch.manual_seed(0)
teacher = course_unet()
student = load_checkpoint(DATA_DIR / "course_lcm_unet.safetensors")
vae, text_encoder = course_vae(), course_text_encoder()
prompts = train.course_prompts()
with torch.no_grad():
    contexts = text_encoder(CLIPTokenizer.sd15()(prompts))      # (91, 77, D): every course caption and ""
index = {p: i for i, p in enumerate(prompts)}
settings = sampling_settings(DATA_DIR / "course_unet.safetensors")
log = json.loads((DATA_DIR / "course_lcm_log.json").read_text())
table = json.loads((DATA_DIR / "course_lcm_eval.json").read_text())
abar = SchedulerConfig.sd15().alphas_cumprod(False)
print(f"teacher: {settings['sampler']}, {settings['steps']} steps, guidance {settings['guidance']}; "
      f"student: {sum(p.numel() for p in student.parameters()):,} parameters, the teacher's architecture")

# %% [markdown]
# ## The path a sampler follows
#
# Chapter 10 showed that DDIM with $\eta = 0$ is a numerical solver of the
# {term}`probability-flow ODE`: from $x_T \sim \mathcal N(0, I)$ every step moves along a
# deterministic trajectory, and the same $x_T$ always ends at the same image. Write the
# trajectory through $x_t$ as $\{x_\tau\}_{\tau \in [0, T]}$. A **consistency function** maps
# every point of one trajectory to its end:
#
# $$f(x_\tau, \tau) = x_0 \quad\text{for all } \tau, \qquad\text{so}\qquad f(x_t, t) = f(x_s, s)
# \ \text{ for any two points of one trajectory (self-consistency).}$$
#
# If a network had that property, one call from pure noise would give the image. Training it
# needs only two things: self-consistency between *neighbouring* points, and an anchor, the
# **boundary condition** $f(x_0, 0) = x_0$ (at the end of the path there is nothing left to do).
# Neighbouring pairs chain together: if $f$ agrees between $t_1$ and $t_0 = 0$, and between
# $t_2$ and $t_1$, ..., it agrees all the way up to $T$, and the anchor pins the value.
#
# The boundary condition is built into the network rather than learned. LCM writes, for an
# epsilon-predicting U-Net with clean-sample guess $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}$,
#
# $$f_\theta(x_t, t) = c_\text{skip}(t)\, x_t + c_\text{out}(t)\, \hat x_0(x_t, t),\qquad
# c_\text{skip}(t) = \frac{\sigma_d^2}{(st)^2 + \sigma_d^2},\quad c_\text{out}(t) = \frac{st}{\sqrt{(st)^2 + \sigma_d^2}},$$
#
# with $\sigma_d = 0.5$ and the scaling $s = 10$ of diffusers' `LCMScheduler` (its
# `timestep_scaling`). At $t = 0$: $c_\text{skip} = 1$, $c_\text{out} = 0$, so
# $f(x, 0) = x$ whatever the weights are. Already at the first timestep the distillation uses
# ($t = 19$), $c_\text{skip}$ is tiny and $f$ is simply the U-Net's $\hat x_0$.

# %%
t = torch.tensor([0, 1, 19, 39, 499, 999])
c_skip, c_out = train.lcm.boundary(t)
for ti, a, b in zip(t.tolist(), c_skip.tolist(), c_out.tolist()):
    print(f"t = {ti:3d}: c_skip = {a:.3e}, c_out = {b:.6f}")
x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
context = contexts[[index[data.caption("red", "circle", "in the center")]] * 2]
with torch.no_grad():
    at_zero = train.lcm.consistency(student, x, torch.tensor([0, 0]), context, abar)
print("max |f(x, 0) - x| for the distilled U-Net:", float((at_zero - x).abs().max()))
assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0) and torch.equal(at_zero, x)   # the boundary condition
assert c_skip[2] < 1e-5 and c_out[2] > 0.99999                                          # t = 19: f is x0_hat
assert all(torch.equal(torch.stack(LCM().boundary(ti)), torch.stack([c_skip[i], c_out[i]]))  # the sampler's formula
           for i, ti in enumerate(t))

# %% [markdown]
# ## Skipping steps: the teacher's solver
#
# To make $f_\theta(x_t, t)$ agree with $f(x_s, s)$ we need a point $x_s$ on the *same*
# trajectory as $x_t$. The teacher provides it: one step of its ODE solver from $t$ to $s$. LCM
# uses the DDIM step (chapter 10) with the guided noise $\hat\epsilon$:
#
# $$x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s}\,\hat\epsilon,\qquad
# \hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon}{\sqrt{\bar\alpha_t}}.$$
#
# and it **skips** $k = 20$ timesteps per step ($s = t - k$), so that the distillation schedule
# has $1000 / k = 50$ points, $t_n = (n + 1)k - 1 = 19, 39, \dots, 999$. Why skip? The chain of
# agreements from the anchor to $t = 999$ then has 50 links instead of 1000, and each link's
# error (the target network's error, which is what the student copies) adds up along the
# chain; the price is the solver's error over a jump of 20, which the DDIM step keeps small
# because it follows the ODE's exact solution when $\hat\epsilon$ is constant. The cell
# checks that `train.lcm.ddim_solver_step` is DDIM's own step on the 50-point "trailing"
# schedule, and measures what the jump costs against 20 unit steps of the same teacher.

# %%
config = SchedulerConfig(**{**vars(SchedulerConfig.sd15()), "timestep_spacing": "trailing"})
ddim = DDIM(config)
ddim.set_timesteps(50)
print("DDIM 'trailing', 50 steps:", ddim.timesteps[:3].tolist(), "...", ddim.timesteps[-2:].tolist())
cond = contexts[[index[data.caption(*c)] for c in data.HELD_OUT]]
uncond = contexts[index[""]][None]
x0 = torch.randn(len(cond), 4, 8, 8, generator=torch.Generator().manual_seed(1))   # any point will do for the check
t_start = 519
a_t = abar[t_start]
x_t = a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
guided = lambda x, tt: train.lcm.guided_eps(teacher, x, torch.full((len(x),), tt), cond, uncond,  # noqa: E731
                                            settings["guidance"])
with torch.no_grad():
    eps = guided(x_t, t_start)
    jump = train.lcm.ddim_solver_step(x_t, eps, abar[t_start], abar[t_start - 20])
    same = ddim.step(eps, t_start, x_t)
    x_fine = x_t
    for tt in range(t_start, t_start - 20, -1):              # 20 unit DDIM steps of the same teacher
        x_fine = train.lcm.ddim_solver_step(x_fine, guided(x_fine, tt), abar[tt], abar[tt - 1])
gap, moved = float((jump - x_fine).norm() / (x_t - x_fine).norm()), float((x_t - x_fine).norm() / x_t.norm())
print(f"solver step = DDIM step: max difference {float((jump - same).abs().max()):.1e}")
print(f"one jump of 20 vs 20 unit steps: they differ by {gap:.1%} of the distance the sample moved "
      f"({moved:.1%} of its norm)")
assert torch.allclose(jump, same, atol=1e-5) and gap < 0.25

# %% [markdown]
# ## Guidance, folded in
#
# The teacher's $\hat\epsilon$ above is already guided: $\hat\epsilon = \epsilon_u + w(\epsilon_c - \epsilon_u)$,
# two U-Net calls. Its ODE is the *guided* ODE, so the student learns to jump along guided
# trajectories while seeing only the prompt: at sampling time one call per step, no
# unconditional pass. That halves the cost again, on top of the fewer steps.
#
# LCM feeds $w$ to the student as an extra embedding (like the time embedding) and draws a new
# $w$ for every sample during training (diffusers' recipe: uniform in $[3, 15]$ in this book's
# convention $\epsilon_u + w(\epsilon_c - \epsilon_u)$), so that the user keeps a guidance knob. This chapter folds in
# **one fixed $w$**, the course model's own guidance (stored in its checkpoint). The reasons: the
# course has one recommended guidance, chosen by measurement (chapter 12), so a knob buys
# little; an embedding adds an input the course U-Net does not have, so the student would no
# longer be the teacher's architecture (same config, same checkpoint format, loadable as the
# teacher's drop-in replacement); and it is what LCM-LoRA does too, since a LoRA cannot add an
# input. The price is that the student's guidance is fixed when it is distilled: see
# Exercise 15.3 for what guiding it again does.

# %%
print("guidance folded into the student:", log["guidance"], "(the teacher checkpoint's own:", settings["guidance"], ")")
assert log["guidance"] == settings["guidance"]

# %% [markdown]
# ## The distillation
#
# `train.distill_lcm` is LCM's algorithm on the course latents (`python -m minisd train lcm`;
# diffusers' `train_lcm_distill_sd_wds.py` is the reference recipe). One step, for a batch of
# training latents $x_0$ and their prompts $c$:
#
# 1. pick $n$ uniformly, $t = t_n$, $s = \max(t - k, 0)$, and noise: $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$;
# 2. the student's answer $f_\theta(x_t, t)$ (with gradients);
# 3. without gradients: the guided teacher's DDIM step $x_t \to x_s$, and the **target
#    network's** answer $f_{\theta^-}(x_s, s)$;
# 4. the loss $d(f_\theta(x_t, t), f_{\theta^-}(x_s, s))$, the pseudo-Huber distance
#    $\sqrt{\lVert a - b\rVert^2 + c^2} - c$ per element ($c = 0.001$), an AdamW step;
# 5. the target becomes an {term}`EMA` of the student: $\theta^- \leftarrow 0.95\,\theta^- + 0.05\,\theta$.
#
# The target network is the "stop-gradient" of consistency training: if the student chased
# its own moving answer at $s$ with gradients through both sides, it could satisfy
# self-consistency trivially by collapsing to a constant; the slow EMA copy gives it a fixed
# target to move toward, and at $n = 0$ ($s = 0$) the target is exactly $x_s$ by the boundary
# condition, which is where the correct answer enters. Both networks and the student start as
# copies of the teacher. The cell takes one step by hand and checks it against these formulas.

# %%
g = torch.Generator().manual_seed(3)
pick = [index[data.caption(*c)] for c in data.HELD_OUT[:4]]
x0 = torch.randn(4, 4, 8, 8, generator=g)
c4 = contexts[pick]
n = torch.tensor([0, 10, 30, 49])
t4 = (n + 1) * 20 - 1
s4 = (t4 - 20).clamp(min=0)
a, a_s = abar[t4].view(-1, 1, 1, 1), abar[s4].view(-1, 1, 1, 1)
x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=g)
with torch.no_grad():
    mine = train.lcm.consistency(teacher, x_t, t4, c4, abar)              # the student at step 0 = the teacher
    x_s = train.lcm.ddim_solver_step(x_t, train.lcm.guided_eps(teacher, x_t, t4, c4, uncond, settings["guidance"]),
                                     a, a_s)
    want = train.lcm.consistency(teacher, x_s, s4, c4, abar)              # the target at step 0 = the teacher too
per_sample = (((mine - want) ** 2 + 1e-6) ** 0.5 - 1e-3).mean(dim=(1, 2, 3))
print("t:", t4.tolist(), " s:", s4.tolist())
print("pseudo-Huber distance per sample at step 0:", [round(v, 4) for v in per_sample.tolist()])
assert torch.equal(want[0], x_s[0])                # n = 0: s = 0, the target is x_s itself (the anchor)
assert per_sample.min() > 0                        # the teacher is not yet self-consistent: there is work to do

# %% [markdown]
# The committed run (`data/course_lcm_log.json`; the command and its time are in
# `data/README.md`) took these many steps; its loss per step:

# %%
loss = np.array(log["loss"])
smooth = np.convolve(loss, np.ones(50) / 50, mode="valid")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(loss, lw=0.5, alpha=0.4, label="per step")
ax.plot(np.arange(49, len(loss)), smooth, lw=1.5, label="mean of 50")
ax.set(xlabel="step", ylabel="pseudo-Huber loss", yscale="log",
       title=f"Consistency distillation: {log['steps']} steps, batch {log['batch_size']}, "
             f"{log['train_cpu_seconds']} CPU s")
ax.legend()
plt.show()
print(f"{log['command']}\nloss: first 50 steps {loss[:50].mean():.4f}, last 50 {loss[-50:].mean():.4f}")

# %% [markdown]
# ## The LCM sampler
#
# Sampling is the consistency function used a few times. Its timesteps are a subset of the
# distillation schedule (the 50 points $19, 39, \dots, 999$; `original_steps = 50` in
# `schedulers.LCM`, diffusers' `original_inference_steps`): $n$ of them, evenly spaced by index,
# starting at 999. Each step computes $f_\theta(x_t, t)$, the clean guess, and **noises it
# again** to the next timestep with fresh noise:
# $x_{t'} = \sqrt{\bar\alpha_{t'}}\, f_\theta(x_t, t) + \sqrt{1 - \bar\alpha_{t'}}\, z$, $z \sim \mathcal N(0, I)$
# drawn from the pipeline's generator; the last step returns the clean guess. One step is one
# jump from noise to image; more steps let the model correct its guess from a less noisy start.
# The cell prints the timesteps and checks a whole 4-step run against diffusers'
# `LCMScheduler`, step for step with the same generator draws.

# %%
from diffusers import LCMScheduler  # noqa: E402

SD15_FILE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                 steps_offset=1, clip_sample=False)

for steps in (1, 2, 4, 8):
    s = LCM()
    s.set_timesteps(steps)
    print(f"{steps} step(s): {s.timesteps.tolist()}")
ours = make_scheduler("lcm")
theirs = LCMScheduler(**SD15_FILE)                  # SD 1.5's scheduler file, as LCM-LoRA users load it
ours.set_timesteps(4)
theirs.set_timesteps(4)
x_ours = x_theirs = torch.randn(len(cond), 4, 8, 8, generator=torch.Generator().manual_seed(5))
g_ours, g_theirs = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
with torch.no_grad():
    for tt in ours.timesteps:
        x_ours = ours.step(student(x_ours, tt, cond), tt, x_ours, generator=g_ours)
        x_theirs = theirs.step(student(x_theirs, tt, cond), tt, x_theirs, generator=g_theirs).prev_sample
print("largest difference from diffusers' LCMScheduler after 4 steps:", float((x_ours - x_theirs).abs().max()))
assert torch.equal(ours.timesteps, theirs.timesteps) and torch.allclose(x_ours, x_theirs, atol=1e-5)

# %% [markdown]
# ## Samples: steps against quality
#
# The nine held-out combinations (prompts the U-Net never trained on, and the distillation never
# saw), one seed, drawn by the student with 1, 2, 4 and 8 LCM steps, by the teacher with DDIM
# at the same numbers of steps, and by the teacher at its own 25 steps.


# %%
def draw(unet, scheduler, steps, guidance, seed=0, captions=None):
    """uint8 images of the held-out prompts from one seed's noise (the pipeline's loop)."""
    captions = [data.caption(*c) for c in data.HELD_OUT] if captions is None else captions
    return train.lcm.generate_images(unet, vae, contexts, prompts, captions, scheduler, steps, guidance, seed)


held_captions = [data.caption(*c) for c in data.HELD_OUT]
rows = {f"teacher, DDIM {settings['steps']}": draw(teacher, settings["sampler"], settings["steps"], settings["guidance"])}
for steps in (1, 2, 4, 8):
    rows[f"LCM {steps}"] = draw(student, "lcm", steps, 1.0)
    rows[f"teacher, DDIM {steps}"] = draw(teacher, "ddim", steps, settings["guidance"])
order = [f"teacher, DDIM {settings['steps']}"] + [f"LCM {n}" for n in (1, 2, 4, 8)] + \
        [f"teacher, DDIM {n}" for n in (1, 2, 4, 8)]
fig, axes = plt.subplots(len(order), 9, figsize=(9 * 1.1, len(order) * 1.15))
for r, name in enumerate(order):
    for c in range(9):
        axes[r, c].imshow(rows[name][c], interpolation="nearest")
        axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
    axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
for c in range(9):
    axes[0, c].set_title(held_captions[c].replace(" in the ", "\nin the "), fontsize=6)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Measured: quality and time per image
#
# `python -m minisd train lcm --evaluate` (the `--evaluate` half of the command in
# `data/README.md`) judged every sampler and step count on the 9 held-out combinations x 36
# seeds (324 images per row) with the pixel judge and fitted-shape fidelity of chapter 12
# (`metrics.fidelity`), and timed each row in the same run, one seed of each row in turn, so
# that the ratios to the teacher share the machine's state. `--fid` (run on its own, with
# `--no-train`) added chapter 12's FID at N = 400 for the two rows the distillation is about,
# the 4-step student and the teacher: their first 324 images are the table's, continued to seed
# 9144 for 400, each set against 400 real images of the same captions through the course CLIP's
# image features, exactly as chapter 12 computes it; the last line is the real-vs-real floor, a
# second real draw of those captions. The cell reads that table.

# %%
rows_eval = table["rows"]
fid = table["fid"]
print(f"{table['held_out_combinations']} held-out combinations x {len(table['seeds'])} seeds = "
      f"{rows_eval['teacher']['n']} images per row; 95 % intervals (Wilson for rates, normal for the mean); "
      f"FID at N = {fid['n']} ({fid['captions']})")
print(f"{'row':12s} {'calls':>5s} {'colour':>16s} {'shape':>16s} {'position':>16s} {'fidelity':>20s} {'time':>7s} "
      f"{'FID':>6s}")
for name, r in rows_eval.items():
    calls = r["steps"] * (2 if r["guidance"] > 1 else 1)
    cell = lambda k: f"{100 * r[k][0]:5.1f} [{100 * r[k][1]:4.1f},{100 * r[k][2]:5.1f}]"  # noqa: E731
    line = (f"{name:12s} {calls:5d} {cell('colour')} {cell('shape')} {cell('position')} "
            f"{r['fidelity'][0]:.3f} [{r['fidelity'][1]:.3f},{r['fidelity'][2]:.3f}] x{r['seconds_vs_teacher']:.3f} "
            + (f"{fid[name]['fid']:6.2f}" if name in fid else f"{'-':>6s}"))
    print(line)
print("real vs real".ljust(len(line) - 6) + f"{fid['real_vs_real_floor']:6.2f}")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
for sampler, style in (("lcm", "o-"), ("ddim", "s--"), ("dpm++2m", "^:")):
    ns = [1, 2, 4, 8]
    r = [rows_eval[f"{sampler}_{n}"] for n in ns]
    for ax, key in ((ax1, "fidelity"), (ax2, "shape")):
        mean = np.array([x[key][0] for x in r])
        err = np.array([[x[key][0] - x[key][1] for x in r], [x[key][2] - x[key][0] for x in r]])
        ax.errorbar(ns, mean, yerr=err, fmt=style, capsize=3, label=sampler.upper() if sampler != "lcm" else "LCM (student)")
for ax, key in ((ax1, "fidelity"), (ax2, "shape")):
    t_r = rows_eval["teacher"][key]
    ax.axhspan(t_r[1], t_r[2], color="grey", alpha=0.3, label=f"teacher, {settings['steps']} DDIM steps")
    ax.set(xscale="log", xticks=[1, 2, 4, 8], xticklabels=["1", "2", "4", "8"], xlabel="steps",
           ylabel="mean fidelity" if key == "fidelity" else "shape right")
ax1.legend(fontsize=8)
fig.suptitle("Held-out prompts, 324 images per point, 95 % intervals")
fig.tight_layout()
plt.show()

# %% [markdown]
# Read the table with two facts in mind. DDIM's 1-step row is not a fair opponent: with SD's
# "leading" spacing its single step is at $t = 1$ (Exercise 15.2), so it denoises pure noise as if
# it were almost clean; DPM-Solver++ ("linspace") starts at 999 and does far better. And the course
# images are simple, so good few-step solvers come close to the teacher too: the student's gain
# is largest at 1 and 2 steps, and it costs half the U-Net calls of a guided sampler at the same
# number of steps.
#
# The cell below sets the 4-step student against the teacher on the distillation's targets:
# colour, shape and position within 2 points of the teacher, the time per image, and an FID
# within twice the teacher's (chapter 12's FID, N = 400, beside the real-vs-real floor).

# %%
lcm4, teach = rows_eval["lcm_4"], rows_eval["teacher"]
gaps = {k: 100 * (teach[k][0] - lcm4[k][0]) for k in ("colour", "shape", "position")}
print("4-step LCM below the teacher, in points:", {k: round(v, 1) for k, v in gaps.items()})
print(f"4-step LCM: {lcm4['seconds_vs_teacher']:.3f} of the teacher's time per image "
      f"({1 / lcm4['seconds_vs_teacher']:.1f}x faster); 4-step DDIM: fidelity {rows_eval['ddim_4']['fidelity'][0]:.3f} "
      f"against LCM's {lcm4['fidelity'][0]:.3f}")
ratio = fid["lcm_4_vs_teacher"]
print(f"FID at N = {fid['n']}: 4-step LCM {fid['lcm_4']['fid']:.2f}, teacher {fid['teacher']['fid']:.2f}, real vs real "
      f"{fid['real_vs_real_floor']:.2f} (chapter 12's floor, on its own 400 captions: {fid['chapter12_floor']:.2f}); "
      f"the student's FID is {ratio:.2f}x the teacher's, {'within' if ratio <= 2 else 'beyond'} the target of 2x")
assert lcm4["seconds_vs_teacher"] < 0.5             # 4 U-Net calls instead of 50 (the VAE's decode is the same)
assert rows_eval["lcm_1"]["fidelity"][0] > rows_eval["ddim_1"]["fidelity"][0]   # one step: distilled beats DDIM
assert ratio <= 2 and fid["real_vs_real_floor"] < min(fid["lcm_4"]["fid"], fid["teacher"]["fid"])   # the FID target
assert abs(fid["lcm_4"]["fid"] - fid["teacher"]["fid"]) < abs(fid["real_vs_real_floor"] - fid["chapter12_floor"])

# %% [markdown]
# Both FIDs sit close to the floor of two real draws of the same captions. How close is
# close: the two real-vs-real floors printed above, this chapter's and chapter 12's, both
# measure perfect models at the same N, and they differ by more than the student's FID differs
# from the teacher's. So the ratio is a check that the student has not collapsed (too little
# variety would raise its covariance term), not a ranking of the two.

# %% [markdown]
# ## LCM-LoRA on SD 1.5
#
# For SD 1.5 the distillation was done once by its authors {cite}`luo2023lcmlora`, as a
# rank-64 LoRA on the U-Net: `pytorch_lora_weights.safetensors` in the Hugging Face repository
# `latent-consistency/lcm-lora-sdv1-5` (README: "LCM-LoRA"). Unlike chapter 13's LoRA it wraps
# far more than attention: the feed-forward layers, `proj_in`/`proj_out`, the ResNet blocks'
# convolutions (3x3: `lora_down` is a 3x3 conv, `lora_up` a 1x1 conv) and shortcuts,
# `time_emb_proj` and the down/upsamplers. LoRA files come in several key formats, and
# `lora.load` reads each one that diffusers' `load_lora_weights` reads. Here is one layer in
# each:

# %%
layer = "down_blocks.0.resnets.0.conv1"
print("kohya-ss:        ", f"lora_unet_{layer.replace('.', '_')}.lora_down.weight", "(+ .lora_up.weight, .alpha)")
print("diffusers/peft:  ", f"unet.{layer}.lora_A.weight", "(+ .lora_B.weight)")
print("older diffusers: ", f"unet.{layer}.lora.down.weight", "(+ .lora.up.weight)")
print("attention procs: ", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight")

# %% [markdown]
# The real file is 135 MB and nothing here downloads it, so the check is the parity one: a
# LoRA over every layer type LCM-LoRA wraps, random, on a small random SD-shaped U-Net, in
# diffusers/peft format, loaded by `lora.load` and by diffusers' loader, then the same 4-step LCM
# run on both at guidance 1. (`tests/test_lora.py` does this for every format, fused and not,
# and at SD 1.5's own size.)

# %%
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from minisd import weights  # noqa: E402
from minisd.unet import UNetConfig  # noqa: E402

torch.manual_seed(0)
ref_unet = UNet2DConditionModel(**UNetConfig.tiny().to_diffusers()).eval()
our_unet = weights.load_unet({k: v.clone() for k, v in ref_unet.state_dict().items()}, UNetConfig.tiny()).eval()
targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
g = torch.Generator().manual_seed(0)
file = {}
for name, m in ref_unet.named_modules():
    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(name.endswith(tg) for tg in targets):
        shape_down = (4, m.in_features) if isinstance(m, torch.nn.Linear) else (4, m.in_channels, *m.kernel_size)
        shape_up = (m.out_features, 4) if isinstance(m, torch.nn.Linear) else (m.out_channels, 4, 1, 1)
        file[f"unet.{name}.lora_A.weight"] = 0.2 * torch.randn(shape_down, generator=g)
        file[f"unet.{name}.lora_B.weight"] = 0.2 * torch.randn(shape_up, generator=g)
save_file(file, "/tmp/minisd_ch15_lcm_lora.safetensors")
lora.load(our_unet, "/tmp/minisd_ch15_lcm_lora.safetensors")
state_dict, alphas = StableDiffusionPipeline.lora_state_dict("/tmp/minisd_ch15_lcm_lora.safetensors")
StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, ref_unet)
kinds = sorted({type(m.base).__name__ + (f" {m.base.kernel_size[0]}x{m.base.kernel_size[1]}" if hasattr(m.base, "kernel_size") else "")
                for m in our_unet.modules() if isinstance(m, lora.LoRALinear)})
print(f"{len(file) // 2} layers wrapped, of kinds {kinds}")
x_ours = x_ref = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
ctx = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
ours, theirs = make_scheduler("lcm"), LCMScheduler(**SD15_FILE)
ours.set_timesteps(4)
theirs.set_timesteps(4)
g_ours, g_theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
with torch.no_grad():
    for tt in ours.timesteps:
        x_ours = ours.step(our_unet(x_ours, tt, ctx), tt, x_ours, generator=g_ours)
        x_ref = theirs.step(ref_unet(x_ref, tt, ctx).sample, tt, x_ref, generator=g_theirs).prev_sample
print("largest difference after 4 LCM steps, ours vs diffusers + peft:", float((x_ours - x_ref).abs().max()))
assert float((x_ours - x_ref).abs().max()) < 1e-4

# %% [markdown]
# With the real file, on real SD 1.5 weights (README, "LCM-LoRA"):
#
# ```python
# pipe = minisd.StableDiffusion.from_pretrained("/path/to/stable-diffusion-v1-5")
# minisd.lora.load(pipe, "/path/to/lcm-lora-sdv1-5/pytorch_lora_weights.safetensors")
# image = pipe("a photograph of an astronaut riding a horse", scheduler="lcm", steps=4, guidance=1.0)[0]
# ```

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 15.1 (★)** Derive the 3-step LCM schedule by hand: the 50 distillation timesteps
# in descending order, and the indices $\lfloor i \cdot 50 / 3 \rfloor$ for $i = 0, 1, 2$. Check it
# against `LCM().set_timesteps(3)`. Why does no schedule ever contain $t = 0$, even though the
# boundary condition is at 0?

# %% tags=["solution", "hide-cell"]
origin = [(n + 1) * 20 - 1 for n in range(50)][::-1]          # 999, 979, ..., 19
by_hand = [origin[i * 50 // 3] for i in range(3)]
s3 = LCM()
s3.set_timesteps(3)
print("by hand:", by_hand, " sampler:", s3.timesteps.tolist())
# the smallest timestep the model is ever asked about is 19: at t = 0 there is nothing to denoise,
# and f(x, 0) = x is not a U-Net call but the anchor the training chains back to
assert by_hand == s3.timesteps.tolist() == [999, 679, 339]
assert min(origin) == 19

# %% [markdown]
# **Exercise 15.2 (★★, break it and watch)** Is it the distillation that makes 1 to 4 steps
# work, or the LCM sampler? Break it: run the LCM sampler on the *undistilled* teacher (at its own
# guidance, since it has none folded in) with 1, 2 and 4 steps on the held-out prompts, 2 seeds,
# and compare the mean fidelity with the student's. Then explain the table's worst row, 1-step
# DDIM: at which timestep does it ask the U-Net?

# %% tags=["solution", "hide-cell"]
def mean_fidelity(unet, scheduler, steps, guidance, seeds=(0, 1)):
    images = np.concatenate([draw(unet, scheduler, steps, guidance, seed) for seed in seeds])
    return float(metrics.fidelity(images, held_captions * len(seeds))["fidelity"].mean())


ablation = {steps: (mean_fidelity(teacher, "lcm", steps, settings["guidance"]), mean_fidelity(student, "lcm", steps, 1.0))
            for steps in (1, 2, 4)}
for steps, (undistilled, distilled) in ablation.items():
    print(f"{steps} LCM step(s): teacher {undistilled:.3f}, student {distilled:.3f} (18 images each)")
one_step = make_scheduler("ddim")
one_step.set_timesteps(1)
print("1-step DDIM asks the U-Net at t =", one_step.timesteps.tolist(), "(SD's 'leading' spacing + steps_offset)")
# On the course data the undistilled teacher, sampled the LCM way (x0 guess, then re-noise), is already
# about as good: its x0 guesses from pure noise are good because the images are simple. The distillation
# matters when they are not (SD 1.5). 1-step DDIM fails for another reason: it starts at t = 1, not 999.
assert all(abs(distilled - undistilled) < 0.05 for undistilled, distilled in ablation.values())
assert one_step.timesteps.tolist() == [1]

# %% [markdown]
# **Exercise 15.3 (★★★)** The student was distilled with the teacher's guidance folded in. What
# happens if a user guides it *again*, with classifier-free guidance at the same scale on top
# (two calls per step, as a diffusion model is sampled)? Measure 4-step LCM at guidance 1
# (the right use) and at the teacher's guidance on the held-out prompts, 2 seeds, and compare the
# fidelity and the cost.

# %% tags=["solution", "hide-cell"]
def figures(guidance, seeds=(0, 1)):
    images = np.concatenate([draw(student, "lcm", 4, guidance, seed) for seed in seeds])
    f = metrics.fidelity(images, held_captions * len(seeds))
    return float(f["fidelity"].mean()), images


once, twice = figures(1.0), figures(settings["guidance"])
print(f"guidance folded in once:           fidelity {once[0]:.3f}, 4 U-Net calls per image")
print(f"guided again (w = {settings['guidance']}) on top: fidelity {twice[0]:.3f}, 8 U-Net calls per image")
fig = data.show(np.concatenate([once[1][:9], twice[1][:9]]), held_captions * 2, ncols=9, scale=1.0, fontsize=5)
plt.show()
# guiding again doubles the cost and buys nothing: the guidance is already in the student
assert twice[0] <= once[0] + 0.01

# %% [markdown]
# ## What you built
#
# A few-step sampler, from the ODE up. `schedulers.LCM` (`scheduler="lcm"`, equal to
# diffusers' `LCMScheduler`) samples a consistency function: the U-Net's clean guess, blended with
# $c_\text{skip}, c_\text{out}$ so that $f(x, 0) = x$, re-noised between steps. `train.distill_lcm`
# (`python -m minisd train lcm`) made one from the course U-Net: real latents noised to a point
# of the 50-step schedule, one guided DDIM jump of the teacher over $k = 20$ timesteps, and a
# pseudo-Huber loss between the student there and an EMA target network at the end of the jump,
# with the course's guidance folded in so that each step is one U-Net call. The measured table
# above says what 1, 2, 4 and 8 steps buy against DDIM and DPM-Solver++ at the same budget and
# against the 25-step teacher, and what each costs in time, and chapter 12's FID set the 4-step
# student beside the teacher and the real-vs-real floor. `lora.load` reads LCM-LoRA and every
# other SD 1.x LoRA format diffusers reads, on convolutions as well as attention.
#
# Where it goes next: the same student as a LoRA on the course U-Net (LCM-LoRA's form, which
# also "accelerates" any fine-tune of the base it is added to), a guidance embedding to get the
# knob back, and adversarial distillation ("turbo" models), which adds a discriminator to make
# single steps sharp.
