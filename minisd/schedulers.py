"""Samplers: walking the noise chain backwards from x_T ~ N(0, I) to a clean latent (chapter 10).

Every sampler here is used the way diffusers' pipeline uses its schedulers:

    sched = make_scheduler("ddim"); sched.set_timesteps(25)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t, context)   # eps, or v for a v-prediction model
        x = sched.step(out, t, x, generator)       # sched.pred_x0: its guess of the clean x0

Each one is configured by a `SchedulerConfig`: the fields of the weights' own
`scheduler/scheduler_config.json`, read exactly as diffusers' `Cls.from_config(that file)`
reads them (chapter 11). The default, `SchedulerConfig.sd15()`, is SD 1.5's original file: the
scaled-linear schedule of `minisd.diffusion`, `steps_offset=1`, `set_alpha_to_one=False`,
epsilon prediction, no clipping. That file names no `timestep_spacing`, so each sampler keeps
its diffusers class's own default: "leading" for DDPM, DDIM and PNDM (981, 961, ..., 1 for 50
steps), "linspace" for Euler and DPM-Solver++ (999 ... 0 and 999 ... 20). LCM (chapter 15) takes
its timesteps from the 50-point distillation schedule (999, 979, ..., 19) whatever the spacing.
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .diffusion import NoiseSchedule

# Keys of a diffusers scheduler file that minisd does not implement, at the value that means
# "off" (diffusers' default). A file may name them at that value; any other value is refused.
UNUSED_AT_DEFAULT = {
    "trained_betas": None, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0, "sample_max_value": 1.0, "variance_type": ("fixed_small", None),
    "interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
    "sigma_min": None, "sigma_max": None, "timestep_type": "discrete", "final_sigmas_type": "zero",
    "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
    "euler_at_final": False, "lambda_min_clipped": -math.inf, "use_dynamic_shifting": False,
    "time_shift_type": "exponential", "original_inference_steps": 50, "timestep_scaling": 10.0,
}


@dataclass(frozen=True)
class SchedulerConfig:
    """What a diffusers `scheduler_config.json` says about sampling, and nothing more (chapter 11).

    Fields a file does not name take diffusers' defaults, as `from_config` gives them;
    `timestep_spacing` and `set_alpha_to_one` stay None there, because diffusers' classes
    disagree on them: each sampler then takes its own class's default.
    """
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"            # "scaled_linear" (SD), "linear", "squaredcos_cap_v2"
    prediction_type: str = "epsilon"         # what the U-Net outputs: "epsilon" or "v_prediction"
    timestep_spacing: str = None             # "leading", "linspace" or "trailing"; None: the sampler's
    steps_offset: int = 0                    # added to "leading" timesteps
    set_alpha_to_one: bool = None            # DDIM/PNDM's last step lands on abar = 1 (else abar_0)
    clip_sample: bool = True                 # DDPM/DDIM clip the predicted x0 to [-1, 1]
    rescale_betas_zero_snr: bool = False     # shift the schedule so abar_T = 0 (Lin et al. 2024)
    skip_prk_steps: bool = False             # PNDM: PLMS only (minisd has no Runge-Kutta warm-up)

    @classmethod
    def sd15(cls):
        """SD 1.5's original scheduler file (also what a single SD 1.x file gets)."""
        return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                   set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)

    @classmethod
    def sd21(cls):
        """SD 2.1's (768-v) scheduler file: SD 1.5's with v-prediction."""
        return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                   set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True, prediction_type="v_prediction")

    def __post_init__(self):
        choices = {"beta_schedule": ("scaled_linear", "linear", "squaredcos_cap_v2"),
                   "prediction_type": ("epsilon", "v_prediction"),
                   "timestep_spacing": (None, "leading", "linspace", "trailing")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"scheduler config: {key}={getattr(self, key)!r} is not supported; "
                                 f"minisd knows {[a for a in allowed if a]}")

    @classmethod
    def from_dict(cls, d, source="scheduler config"):
        """A diffusers scheduler config (the dict of scheduler_config.json). Keys starting with
        "_" (class name, version) are ignored; a key minisd does not implement is refused unless
        it has diffusers' default value."""
        known = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key.startswith("_") or key in known:
                continue
            if key not in UNUSED_AT_DEFAULT:
                raise ValueError(f"{source}: unknown key {key}={value!r}; minisd's samplers cannot honour it")
            default = UNUSED_AT_DEFAULT[key]
            if value != default and not (isinstance(default, tuple) and value in default):
                raise ValueError(f"{source}: {key}={value!r} is not supported by minisd's samplers "
                                 f"(only the default {default!r} is)")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_file(cls, path):
        """Read a diffusers `scheduler_config.json`."""
        return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))

    def alphas_cumprod(self, rescale):
        """(T,) float32 abar_t of this schedule, in diffusers' arithmetic; `rescale`: to zero terminal SNR."""
        T = self.num_train_timesteps
        if self.beta_schedule == "squaredcos_cap_v2":  # the cosine schedule of Nichol & Dhariwal 2021
            f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
            betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)], dtype=torch.float32)
        else:
            betas = NoiseSchedule(T, self.beta_start, self.beta_end, scaled=self.beta_schedule == "scaled_linear").betas
        if rescale:  # Algorithm 1 of Lin et al. 2024: shift and scale sqrt(abar) so that abar_T = 0
            root = torch.cumprod(1 - betas, 0).sqrt()
            first, last = root[0].clone(), root[-1].clone()
            root = (root - last) * (first / (first - last))
            abar = root ** 2
            betas = 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
        return torch.cumprod(1.0 - betas, dim=0)


class Scheduler:
    """What all samplers share: the training schedule, the config's timestep spacing and
    prediction type, and the pipeline's calling convention."""
    init_noise_sigma = 1.0  # x_T = noise * init_noise_sigma
    default_spacing = "leading"  # diffusers' default for this sampler's class
    zero_snr = True              # honours rescale_betas_zero_snr (diffusers' PNDM does not)

    def __init__(self, config=None):
        self.config = SchedulerConfig.sd15() if config is None else config
        self.num_train_timesteps = self.config.num_train_timesteps
        self.alphas_cumprod = self.config.alphas_cumprod(self.zero_snr and self.config.rescale_betas_zero_snr)
        self.spacing = self.config.timestep_spacing or self.default_spacing
        self.timesteps = None
        self.pred_x0 = None  # the last step's prediction of the clean sample

    def scale_model_input(self, x, t):
        """What the U-Net is given at step t (only Euler rescales its input)."""
        return x

    def add_noise(self, x0, noise, t):
        """x0 noised to timestep t where this sampler's samples live (img2img's start): here
        sqrt(abar_t) x0 + sqrt(1 - abar_t) noise on this sampler's own schedule, as diffusers'
        DDPM/DDIM/PNDM/DPM-Solver schedulers; Euler overrides it."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        t = torch.as_tensor(t).reshape(-1).to(x0.device).expand(len(x0))
        abar = self.alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, *([1] * (x0.dim() - 1)))  # (B,) -> (B, 1, 1, 1)
        return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise

    def _check_steps(self, n):
        if not isinstance(n, int) or not 1 <= n <= self.num_train_timesteps:
            raise ValueError(f"the number of steps must be an int in [1, {self.num_train_timesteps}], got {n!r}")

    def _spaced(self, n):
        """n integer timesteps, descending, in the config's spacing (diffusers' three recipes):
        "leading" every (T // n)-th step from 0 plus the offset, "linspace" n evenly spread over
        [0, T - 1], "trailing" every (T / n)-th step counted down from T - 1."""
        self._check_steps(n)
        T = self.num_train_timesteps
        if self.spacing == "linspace":
            t = np.linspace(0, T - 1, n).round()[::-1]
        elif self.spacing == "leading":
            t = np.arange(n)[::-1] * (T // n) + self.config.steps_offset
        else:
            t = np.round(np.arange(T, 0, -T / n)) - 1
        if t.max() >= T:  # diffusers fails the same way, with an IndexError
            raise ValueError(f"{n} {self.spacing!r} steps with steps_offset={self.config.steps_offset} would start at "
                             f"t={int(t.max())}, past the last training step {T - 1}: use fewer steps")
        return t.astype(np.int64).copy()

    def _index(self, t):
        """Position of timestep t in self.timesteps, or a ValueError saying what to do."""
        if self.timesteps is None:
            raise ValueError(f"call set_timesteps(n) on the {type(self).__name__} sampler before step()")
        hits = (self.timesteps == torch.as_tensor(t).cpu()).nonzero()
        if len(hits) == 0:
            raise ValueError(f"t={t} is not one of this sampler's timesteps; pass the values of .timesteps")
        return int(hits[0])

    def _x0_eps(self, out, x, abar):
        """The U-Net's output -> (x0, eps) at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
        A v-prediction model outputs v = sqrt(abar) eps - sqrt(1 - abar) x0 (chapter 11)."""
        if self.config.prediction_type == "epsilon":
            return (x - (1 - abar) ** 0.5 * out) / abar ** 0.5, out
        return abar ** 0.5 * x - (1 - abar) ** 0.5 * out, abar ** 0.5 * out + (1 - abar) ** 0.5 * x

    def __repr__(self):
        n = None if self.timesteps is None else len(self.timesteps)
        return f"{type(self).__name__}(steps={n}, {self.spacing}, {self.config.prediction_type})"


class DDPM(Scheduler):
    """Ancestral sampling of Ho et al. 2020: the posterior mean plus fresh noise each step.

    With fewer steps than 1000, each jump t -> t_prev uses the effective
    beta = 1 - abar_t / abar_prev. Stochastic: noise comes from `generator`.
    """

    def set_timesteps(self, n):
        self.timesteps = torch.from_numpy(self._spaced(n))

    def step(self, out, t, x, generator=None):
        i = self._index(t)
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        alpha = a_t / a_prev  # the effective alpha = 1 - beta of the jump
        beta = 1 - alpha
        x0, _ = self._x0_eps(out, x, a_t)
        if self.config.clip_sample:
            x0 = x0.clamp(-1, 1)
        self.pred_x0 = x0
        # mean of q(x_prev | x_t, x0): a blend of the predicted x0 and the current x_t
        mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + (alpha ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if int(t) == 0:
            return mean
        variance = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
        return mean + variance ** 0.5 * noise


class DDIM(Scheduler):
    """Song et al. 2021: jump to t_prev along the predicted noise direction.

    eta = 0 (SD's default) is deterministic: the same x_T always gives the same image.
    eta = 1 adds as much fresh noise as DDPM does.
    """

    def __init__(self, config=None, eta=0.0):
        super().__init__(config)
        self.eta = eta
        one = self.config.set_alpha_to_one in (None, True)  # diffusers' DDIM defaults to True
        self.final_abar = torch.tensor(1.0) if one else self.alphas_cumprod[0]

    def set_timesteps(self, n):
        self.timesteps = torch.from_numpy(self._spaced(n))

    def step(self, out, t, x, generator=None):
        self._index(t)
        prev = int(t) - self.num_train_timesteps // len(self.timesteps)  # as diffusers, whatever the spacing
        a_t = self.alphas_cumprod[t]
        # set_alpha_to_one=False: the step past the last timestep lands on abar_0, not on 1
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_abar
        x0, eps = self._x0_eps(out, x, a_t)
        if self.config.clip_sample:
            x0 = x0.clamp(-1, 1)
        self.pred_x0 = x0
        std = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
        return x_prev


class Euler(Scheduler):
    """Euler's method on the probability-flow ODE in sigma = sqrt((1 - abar) / abar) (Karras et al. 2022).

    Here the sample lives at scale x_sigma = x0 + sigma * eps (x_t / sqrt(abar_t)), so it starts
    at sigma_max = 14.6 times unit noise and the U-Net gets x_sigma / sqrt(sigma^2 + 1).
    Along the ODE dx/dsigma = (x - x0) / sigma (= eps), so one step is x + (sigma_next - sigma) * that.
    """
    default_spacing = "linspace"

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2 ** -24  # as diffusers: abar_T = 0 would make sigma_max infinite

    def set_timesteps(self, n):
        T = self.num_train_timesteps
        if self.spacing == "linspace":  # not rounded: 999.0, 978.6, ..., 0.0
            self._check_steps(n)
            t = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        else:
            t = self._spaced(n).astype(np.float32)
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        sigmas = np.interp(t, np.arange(T), sigmas.numpy())  # t need not be an integer
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # (n + 1,), ends at 0
        self.timesteps = torch.from_numpy(t)
        self.init_noise_sigma = self.sigmas.max()
        if self.spacing == "leading":  # diffusers' choice for "leading"
            self.init_noise_sigma = (self.init_noise_sigma ** 2 + 1) ** 0.5

    def add_noise(self, x0, noise, t):
        """Euler's samples live at x0 + sigma_t noise (diffusers' EulerDiscreteScheduler.add_noise)."""
        return x0 + self.sigmas[self._index(t)].to(x0.device, x0.dtype) * noise

    def scale_model_input(self, x, t):
        sigma = self.sigmas[self._index(t)]
        return x / (sigma ** 2 + 1) ** 0.5

    def step(self, out, t, x, generator=None):
        i = self._index(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if self.config.prediction_type == "epsilon":
            x0 = x - sigma * out
        else:  # v at the U-Net's input scale x / sqrt(sigma^2 + 1), brought back to x0
            x0 = out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
        self.pred_x0 = x0
        return x + (x - x0) / sigma * (sigma_next - sigma)


class DPMPP2M(Scheduler):
    """DPM-Solver++ (2M) of Lu et al. 2022, as diffusers' DPMSolverMultistepScheduler defaults.

    Works in lambda = log(alpha / sigma) (half the log signal-to-noise ratio) with the data
    prediction x0. Each step reuses the previous step's x0 for a second-order correction;
    the first and the last step are first order (the last lands on sigma = 0).
    """
    default_spacing = "linspace"

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2 ** -24  # as diffusers: keeps lambda_T finite

    def set_timesteps(self, n):
        self._check_steps(n)
        T = self.num_train_timesteps
        if self.spacing == "linspace":  # n + 1 points, the last (0) dropped: 999 ... 20 for 50 steps
            t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif self.spacing == "leading":
            t = np.arange(n + 1)[::-1][:-1] * (T // (n + 1)) + self.config.steps_offset
        else:
            t = np.arange(T, 0, -T / n).round() - 1
        t = t.astype(np.int64).copy()
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.sigmas = torch.cat([sigmas[t], torch.zeros(1)])  # (n + 1,), ends at 0
        self.timesteps = torch.from_numpy(t)
        self._prev = None  # (x0, lambda) of the previous step

    @staticmethod
    def _alpha_sigma(s):
        """sigma = sqrt((1-abar)/abar) -> (alpha, sigma) = (sqrt(abar), sqrt(1-abar))."""
        alpha = 1 / (s ** 2 + 1) ** 0.5
        return alpha, s * alpha

    def step(self, out, t, x, generator=None):
        i = self._index(t)
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # +inf on the last step
        h = lambda_t - lambda_s
        if self.config.prediction_type == "epsilon":
            x0 = (x - sigma_s * out) / alpha_s
        else:
            x0 = alpha_s * x - sigma_s * out
        self.pred_x0 = x0
        last = i == len(self.timesteps) - 1
        if self._prev is None or last:
            d = x0
        else:
            x0_prev, lambda_prev = self._prev
            r = (lambda_s - lambda_prev) / h
            d = x0 + 0.5 / r * (x0 - x0_prev)  # extrapolate x0 to the middle of the step
        self._prev = (x0, lambda_s)
        return (sigma_t / sigma_s) * x - alpha_t * (torch.exp(-h) - 1.0) * d


class PNDM(Scheduler):
    """PLMS, the linear multistep half of PNDM (Liu et al. 2022): SD 1.5's default sampler.

    A 4th-order Adams-Bashforth blend of the last model outputs, fed through the same
    "transfer" x_t -> x_prev as DDIM. With skip_prk_steps (SD's files) it warms up with
    one Heun-like step: the second timestep repeats, and that step redoes the first jump with
    the average of two outputs. So n steps cost n + 1 U-Net calls. As diffusers' PNDMScheduler,
    it ignores rescale_betas_zero_snr and blends v itself for a v-prediction model.

    `order` (default 4, PLMS and diffusers) caps the Adams-Bashforth order of the blend: 1 uses
    the newest output alone (a DDIM step after the warm-up), 2 and 3 the lower-order blends that
    PLMS itself starts with. Chapter 10 uses it to find why PNDM fails with strong guidance.
    """
    zero_snr = False

    def __init__(self, config=None, order=4):
        super().__init__(config)
        if order not in (1, 2, 3, 4):
            raise ValueError(f"order must be 1, 2, 3 or 4 (the Adams-Bashforth blends PLMS knows), got {order!r}")
        if not self.config.skip_prk_steps:
            raise ValueError("this scheduler config has skip_prk_steps=False (PNDM's Runge-Kutta warm-up), which "
                             "minisd does not implement; SD's files set it to true")
        self.order = order
        self.final_abar = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, n):
        lead = torch.from_numpy(self._spaced(n)).flip(0)  # ascending: 1, 21, ..., 981
        # the second-largest timestep repeats: 981, 961, 961, 941, ..., 1
        self.timesteps = torch.cat([lead[:-1], lead[-2:-1], lead[-1:]]).flip(0)
        self.n = n
        self.history = []  # the model outputs that the blend uses
        self.counter = 0
        self.x_start = None

    def _transfer(self, x, t, prev, out):
        """Formula (9) of the PNDM paper: DDIM's deterministic jump from t to prev, written out."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_abar
        self.pred_x0, eps = self._x0_eps(out, x, a_t)
        denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom

    def step(self, out, t, x, generator=None):
        if self.timesteps is None:
            raise ValueError("call set_timesteps(n) on the PNDM sampler before step()")
        t, delta = int(t), self.num_train_timesteps // self.n
        self.counter += 1
        if self.counter == 1:  # first step: a plain DDIM jump; keep x_T for the correction
            self.history = [out]
            self.x_start = x
            return self._transfer(x, t, t - delta, out)
        if self.counter == 2:  # the repeated timestep: redo the first jump with the mean output
            return self._transfer(self.x_start, t + delta, t, (out + self.history[-1]) / 2)
        self.history = self.history[-3:] + [out]
        e = self.history[-self.order:]
        if len(e) == 1:
            out = e[-1]
        elif len(e) == 2:
            out = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            out = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            out = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        return self._transfer(x, t, t - delta, out)


class LCM(Scheduler):
    """Multistep sampling of a latent consistency model (Luo et al. 2023; chapter 15), as
    diffusers' LCMScheduler.

    A consistency model maps any x_t on a probability-flow ODE trajectory straight to its
    end x_0. Its output is parametrised so that f(x, 0) = x holds by construction:
    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t), with c_skip(0) = 1 and c_out(0) = 0.
    The timesteps are a subset of the distillation schedule (`original_steps` = 50 points
    k - 1, 2k - 1, ..., 999 with k = 1000 // 50 = 20). Between steps the clean guess is noised
    again to the next timestep with fresh noise from `generator`; the last step returns it.
    """

    def __init__(self, config=None, original_steps=50, timestep_scaling=10.0):
        super().__init__(config)
        if not isinstance(original_steps, int) or not 1 <= original_steps <= self.num_train_timesteps:
            raise ValueError(f"original_steps must be an int in [1, {self.num_train_timesteps}], got {original_steps!r}")
        self.original_steps, self.timestep_scaling = original_steps, timestep_scaling

    def origin_timesteps(self):
        """The distillation schedule the model was trained on, ascending: k - 1, 2k - 1, ..., (k = T // original_steps)."""
        k = self.num_train_timesteps // self.original_steps
        return np.arange(1, self.original_steps + 1) * k - 1

    def set_timesteps(self, n):
        if not isinstance(n, int) or not 1 <= n <= self.original_steps:
            raise ValueError(f"LCM takes 1 to {self.original_steps} steps (a subset of the {self.original_steps}-step "
                             f"distillation schedule), got {n!r}; 1-8 is what it is made for")
        origin = self.origin_timesteps()[::-1]          # 999, 979, ..., 19
        index = np.floor(np.linspace(0, len(origin), n, endpoint=False)).astype(np.int64)
        self.timesteps = torch.from_numpy(origin[index].copy())

    def boundary(self, t):
        """(c_skip, c_out) at timestep t: sigma_data^2 / (s^2 + sigma_data^2) and s / sqrt(s^2 + sigma_data^2),
        s = timestep_scaling * t, sigma_data = 0.5. At t = 0: (1, 0), so f(x, 0) = x."""
        s = torch.as_tensor(t).float() * self.timestep_scaling
        return 0.25 / (s ** 2 + 0.25), s / (s ** 2 + 0.25) ** 0.5

    def step(self, out, t, x, generator=None):
        i = self._index(t)
        a_t = self.alphas_cumprod[t]
        x0, _ = self._x0_eps(out, x, a_t)
        if self.config.clip_sample:
            x0 = x0.clamp(-1, 1)
        c_skip, c_out = self.boundary(t)
        denoised = c_out * x0 + c_skip * x       # the consistency function f(x_t, t)
        self.pred_x0 = denoised
        if i == len(self.timesteps) - 1:
            return denoised
        a_next = self.alphas_cumprod[self.timesteps[i + 1]]
        noise = torch.randn(out.shape, generator=generator, dtype=denoised.dtype).to(out.device)
        return a_next ** 0.5 * denoised + (1 - a_next) ** 0.5 * noise


SCHEDULERS = {"ddpm": DDPM, "ddim": DDIM, "euler": Euler, "dpm++2m": DPMPP2M, "pndm": PNDM, "lcm": LCM}


def make_scheduler(name, config=None):
    """A sampler by its pipeline name: "ddpm", "ddim", "euler", "dpm++2m", "pndm" (SD 1.5's
    default) or "lcm" (a consistency-distilled model, chapter 15), configured by `config` (a SchedulerConfig; default: SD 1.5's file)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {list(SCHEDULERS)}")
    return SCHEDULERS[name](config)
