"""The forward (noising) process and the U-Net's training objective (chapter 9).

Stable Diffusion noises a latent x0 in one jump to any step t of a 1000-step chain:

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,    eps ~ N(0, I)

where abar_t is the running product of (1 - beta_s) for s <= t. The U-Net learns to
predict eps from (x_t, t, text), with a plain mean squared error. The samplers of
chapter 10 (`minisd.schedulers`) walk the chain backwards with the same schedule.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoiseSchedule:
    """The betas of the forward process and their running product abar_t (chapter 9).

    SD 1.x uses "scaled linear" betas: linear in sqrt(beta) from 0.00085 to 0.012 over
    1000 steps (`sd15()`). The DDPM paper's plain linear 1e-4 -> 0.02 (`ddpm()`) is here
    for comparison: it destroys the signal much sooner.
    """
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    scaled: bool = True  # True: linear in sqrt(beta) ("scaled_linear"); False: linear in beta

    @classmethod
    def sd15(cls):
        return cls()

    @classmethod
    def ddpm(cls):
        return cls(beta_start=1e-4, beta_end=0.02, scaled=False)

    @property
    def betas(self):
        """(T,) float32 noise variance added at each step."""
        n = self.num_train_timesteps
        if self.scaled:
            return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=torch.float32) ** 2
        return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)

    @property
    def alphas_cumprod(self):
        """(T,) float32 abar_t = prod_{s<=t} (1 - beta_s): the share of signal variance left at t."""
        return torch.cumprod(1.0 - self.betas, dim=0)


def _per_sample(values, t, x):
    """values[t] shaped to broadcast against x: t scalar or (B,) -> (B, 1, 1, ...)."""
    t = torch.as_tensor(t, device=x.device)
    if t.dtype.is_floating_point:
        raise TypeError(f"t must hold integer timesteps in [0, {len(values)}), got dtype {t.dtype}")
    if t.numel() and (t.min() < 0 or t.max() >= len(values)):
        raise ValueError(f"t must lie in [0, {len(values)}), got values from {t.min().item()} to {t.max().item()}")
    v = values.to(device=x.device, dtype=x.dtype)[t].flatten()
    return v.view(-1, *([1] * (x.dim() - 1)))  # (B,) -> (B, 1, 1, 1)


def add_noise(x0, noise, t, schedule=NoiseSchedule.sd15()):
    """Jump from clean x0 to x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (chapter 9).

    x0 and noise have the same shape (B, ...); t is an int or a (B,) integer tensor.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    abar = _per_sample(schedule.alphas_cumprod, t, x0)
    return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise


def training_loss(model, x0, context, schedule=NoiseSchedule.sd15(), generator=None, min_snr_gamma=None):
    """One Monte Carlo sample of SD's objective ||eps - eps_theta(x_t, t, c)||^2 (chapter 9).

    model(x_t, t, context) predicts the noise (the U-Net); x0 is a batch of clean latents
    (B, C, h, w), context the text encoder's output for the captions (B, 77, D). Each
    sample gets its own t ~ U{0..T-1} and eps ~ N(0, I), drawn from `generator` if given.
    Returns the mean squared error over all elements, a scalar. With `min_snr_gamma`
    (Hang et al. 2023), each sample's error is weighted min(SNR_t, gamma) / SNR_t first.
    """
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = add_noise(x0, noise, t, schedule)
    pred = model(x_t, t, context).float()
    if min_snr_gamma is None:
        return F.mse_loss(pred, noise.float())
    snr = _per_sample(schedule.alphas_cumprod, t, pred).flatten()
    snr = snr / (1 - snr)                                                  # abar / (1 - abar)
    weight = snr.clamp(max=min_snr_gamma) / snr
    return (weight * ((pred - noise.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))).mean()


def drop_captions(captions, p=0.1, generator=None):
    """Replace each caption by "" with probability p, as SD 1.3+ trained (10 %) (chapter 9).

    The U-Net then also learns the unconditional eps(x_t, t, ""), which classifier-free
    guidance needs at sampling time: eps_u + s (eps_c - eps_u).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p is a probability, got {p}")
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]
