"""Samplers: walking the noise chain backwards from x_T ~ N(0, I) to a clean latent (chapter 10).

Every sampler here is used the way diffusers' pipeline uses its schedulers:

    sched = make_scheduler("ddim"); sched.set_timesteps(25)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t, context)
        x = sched.step(eps, t, x, generator)       # sched.pred_x0: its guess of the clean x0

Each one is configured as SD 1.5's `scheduler_config.json` configures diffusers: the
scaled-linear schedule of `minisd.diffusion`, `steps_offset=1`, `set_alpha_to_one=False`,
epsilon prediction, no clipping. That file names no `timestep_spacing`, so each diffusers
class keeps its own default: "leading" for DDPM, DDIM and PNDM (981, 961, ..., 1 for 50
steps), "linspace" for Euler and DPM-Solver++ (999 ... 0 and 999 ... 20).
"""
import numpy as np
import torch

from .diffusion import NoiseSchedule, add_noise

STEPS_OFFSET = 1  # SD 1.5's config: "leading" timesteps start at 1, not 0


class Scheduler:
    """What all samplers share: the training schedule and the pipeline's calling convention."""
    init_noise_sigma = 1.0  # x_T = noise * init_noise_sigma

    def __init__(self, schedule=NoiseSchedule.sd15()):
        self.schedule = schedule
        self.num_train_timesteps = schedule.num_train_timesteps
        self.alphas_cumprod = schedule.alphas_cumprod
        self.timesteps = None
        self.pred_x0 = None  # the last step's prediction of the clean sample

    def scale_model_input(self, x, t):
        """What the U-Net is given at step t (only Euler rescales its input)."""
        return x

    def add_noise(self, x0, noise, t):
        """x0 noised to timestep t where this sampler's samples live (img2img's start): here
        sqrt(abar_t) x0 + sqrt(1 - abar_t) noise on this sampler's own schedule, as diffusers'
        DDPM/DDIM/PNDM/DPM-Solver schedulers; Euler overrides it."""
        t = torch.as_tensor(t).reshape(-1).to(x0.device).expand(len(x0))
        return add_noise(x0, noise, t, self.schedule)

    def _check_steps(self, n):
        if not isinstance(n, int) or not 1 <= n <= self.num_train_timesteps:
            raise ValueError(f"the number of steps must be an int in [1, {self.num_train_timesteps}], got {n!r}")

    def _leading(self, n):
        """"leading" spacing: every (T // n)-th step counted from 0, plus the offset, descending."""
        if n == self.num_train_timesteps:  # diffusers fails the same way, with an IndexError
            raise ValueError(f"with steps_offset={STEPS_OFFSET}, {type(self).__name__} can take at most "
                             f"{n - 1} steps: {n} would start at t={n}, past the last training step")
        ratio = self.num_train_timesteps // n
        return torch.from_numpy(np.arange(n)[::-1] * ratio + STEPS_OFFSET).long()

    def _index(self, t):
        """Position of timestep t in self.timesteps, or a ValueError saying what to do."""
        if self.timesteps is None:
            raise ValueError(f"call set_timesteps(n) on the {type(self).__name__} sampler before step()")
        hits = (self.timesteps == torch.as_tensor(t).cpu()).nonzero()
        if len(hits) == 0:
            raise ValueError(f"t={t} is not one of this sampler's timesteps; pass the values of .timesteps")
        return int(hits[0])

    def _x0(self, x, eps, abar):
        """The clean sample implied by x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
        return (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5

    def __repr__(self):
        n = None if self.timesteps is None else len(self.timesteps)
        return f"{type(self).__name__}(steps={n})"


class DDPM(Scheduler):
    """Ancestral sampling of Ho et al. 2020: the posterior mean plus fresh noise each step.

    With fewer steps than 1000, each jump t -> t_prev uses the effective
    beta = 1 - abar_t / abar_prev. Stochastic: noise comes from `generator`.
    """

    def set_timesteps(self, n):
        self._check_steps(n)
        self.timesteps = self._leading(n)

    def step(self, eps, t, x, generator=None):
        i = self._index(t)
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        beta = 1 - a_t / a_prev
        x0 = self.pred_x0 = self._x0(x, eps, a_t)
        # mean of q(x_prev | x_t, x0): a blend of the predicted x0 and the current x_t
        mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if int(t) == 0:
            return mean
        variance = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
        noise = torch.randn(eps.shape, generator=generator, dtype=eps.dtype).to(eps.device)
        return mean + variance ** 0.5 * noise


class DDIM(Scheduler):
    """Song et al. 2021: jump to t_prev along the predicted noise direction.

    eta = 0 (SD's default) is deterministic: the same x_T always gives the same image.
    eta = 1 adds as much fresh noise as DDPM does.
    """

    def __init__(self, schedule=NoiseSchedule.sd15(), eta=0.0):
        super().__init__(schedule)
        self.eta = eta

    def set_timesteps(self, n):
        self._check_steps(n)
        self.timesteps = self._leading(n)

    def step(self, eps, t, x, generator=None):
        self._index(t)
        prev = int(t) - self.num_train_timesteps // len(self.timesteps)
        a_t = self.alphas_cumprod[t]
        # set_alpha_to_one=False: the step past t=1 lands on abar_0, not on 1
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.alphas_cumprod[0]
        x0 = self.pred_x0 = self._x0(x, eps, a_t)
        std = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * torch.randn(eps.shape, generator=generator, dtype=eps.dtype).to(eps.device)
        return x_prev


class Euler(Scheduler):
    """Euler's method on the probability-flow ODE in sigma = sqrt((1 - abar) / abar) (Karras et al. 2022).

    Here the sample lives at scale x_sigma = x0 + sigma * eps (x_t / sqrt(abar_t)), so it starts
    at sigma_max = 14.6 times unit noise and the U-Net gets x_sigma / sqrt(sigma^2 + 1).
    Along the ODE dx/dsigma = eps, so one step is x + (sigma_next - sigma) * eps.
    """

    def set_timesteps(self, n):
        self._check_steps(n)
        T = self.num_train_timesteps
        t = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()  # "linspace": 999.0 ... 0.0
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        sigmas = np.interp(t, np.arange(T), sigmas.numpy())  # t need not be an integer
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # (n + 1,), ends at 0
        self.timesteps = torch.from_numpy(t)
        self.init_noise_sigma = self.sigmas.max()

    def add_noise(self, x0, noise, t):
        """Euler's samples live at x0 + sigma_t noise (diffusers' EulerDiscreteScheduler.add_noise)."""
        return x0 + self.sigmas[self._index(t)].to(x0.device, x0.dtype) * noise

    def scale_model_input(self, x, t):
        sigma = self.sigmas[self._index(t)]
        return x / (sigma ** 2 + 1) ** 0.5

    def step(self, eps, t, x, generator=None):
        i = self._index(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        self.pred_x0 = x - sigma * eps
        return x + (sigma_next - sigma) * eps


class DPMPP2M(Scheduler):
    """DPM-Solver++ (2M) of Lu et al. 2022, as diffusers' DPMSolverMultistepScheduler defaults.

    Works in lambda = log(alpha / sigma) (half the log signal-to-noise ratio) with the data
    prediction x0. Each step reuses the previous step's x0 for a second-order correction;
    the first and the last step are first order (the last lands on sigma = 0).
    """

    def set_timesteps(self, n):
        self._check_steps(n)
        T = self.num_train_timesteps
        t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)  # 999 ... 20 for 50 steps
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.sigmas = torch.cat([sigmas[t], torch.zeros(1)])  # (n + 1,), ends at 0
        self.timesteps = torch.from_numpy(t.copy())
        self._prev = None  # (x0, lambda) of the previous step

    @staticmethod
    def _alpha_sigma(s):
        """sigma = sqrt((1-abar)/abar) -> (alpha, sigma) = (sqrt(abar), sqrt(1-abar))."""
        alpha = 1 / (s ** 2 + 1) ** 0.5
        return alpha, s * alpha

    def step(self, eps, t, x, generator=None):
        i = self._index(t)
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # +inf on the last step
        h = lambda_t - lambda_s
        x0 = self.pred_x0 = (x - sigma_s * eps) / alpha_s
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

    A 4th-order Adams-Bashforth blend of the last eps predictions, fed through the same
    "transfer" x_t -> x_prev as DDIM. With skip_prk_steps (SD 1.5's config) it warms up with
    one Heun-like step: the second timestep repeats, and that step redoes the first jump with
    the average of two eps predictions. So n steps cost n + 1 U-Net calls.

    `order` (default 4, PLMS and diffusers) caps the Adams-Bashforth order of the blend: 1 uses
    the newest eps alone (a DDIM step after the warm-up), 2 and 3 the lower-order blends that
    PLMS itself starts with. Chapter 10 uses it to find why PNDM fails with strong guidance.
    """

    def __init__(self, schedule=NoiseSchedule.sd15(), order=4):
        super().__init__(schedule)
        if order not in (1, 2, 3, 4):
            raise ValueError(f"order must be 1, 2, 3 or 4 (the Adams-Bashforth blends PLMS knows), got {order!r}")
        self.order = order

    def set_timesteps(self, n):
        self._check_steps(n)
        lead = self._leading(n).flip(0)  # ascending: 1, 21, ..., 981
        # the second-largest timestep repeats: 981, 961, 961, 941, ..., 1
        self.timesteps = torch.cat([lead[:-1], lead[-2:-1], lead[-1:]]).flip(0)
        self.n = n
        self.eps_history = []
        self.counter = 0
        self.x_start = None

    def _transfer(self, x, t, prev, eps):
        """Formula (9) of the PNDM paper: DDIM's deterministic jump from t to prev, written out."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.alphas_cumprod[0]
        self.pred_x0 = self._x0(x, eps, a_t)
        denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom

    def step(self, eps, t, x, generator=None):
        if self.timesteps is None:
            raise ValueError("call set_timesteps(n) on the PNDM sampler before step()")
        t, delta = int(t), self.num_train_timesteps // self.n
        self.counter += 1
        if self.counter == 1:  # first step: a plain DDIM jump; keep x_T for the correction
            self.eps_history = [eps]
            self.x_start = x
            return self._transfer(x, t, t - delta, eps)
        if self.counter == 2:  # the repeated timestep: redo the first jump with the mean eps
            return self._transfer(self.x_start, t + delta, t, (eps + self.eps_history[-1]) / 2)
        self.eps_history = self.eps_history[-3:] + [eps]
        e = self.eps_history[-self.order:]
        if len(e) == 1:
            eps = e[-1]
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        return self._transfer(x, t, t - delta, eps)


SCHEDULERS = {"ddpm": DDPM, "ddim": DDIM, "euler": Euler, "dpm++2m": DPMPP2M, "pndm": PNDM}


def make_scheduler(name, schedule=NoiseSchedule.sd15()):
    """A sampler by its pipeline name: "ddpm", "ddim", "euler", "dpm++2m" or "pndm" (SD 1.5's default)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {list(SCHEDULERS)}")
    return SCHEDULERS[name](schedule)
