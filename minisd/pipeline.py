"""The whole text-to-image pipeline (chapter 11): tokenizer -> text encoder -> U-Net loop -> VAE.

    pipe = StableDiffusion.from_pretrained("stable-diffusion-v1-5", device="cuda", dtype=torch.float16)
    images = pipe("an astronaut riding a horse", seed=0)

The loop is diffusers' StableDiffusionPipeline's, step for step, so that the same weights and
the same initial latents give the same image: prompt and negative prompt through CLIP, latents
x_T times the sampler's initial sigma, then per timestep one U-Net call on [uncond, cond],
classifier-free guidance eps_u + g (eps_c - eps_u), a sampler step; finally the VAE decodes
latents / scaling_factor and the image is mapped from [-1, 1] to [0, 1].
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .diffusion import add_noise
from .schedulers import SCHEDULERS, Euler, Scheduler, make_scheduler
from .tokenizer import CLIPTokenizer

# The course model's three checkpoints in data/, and the command that makes each one.
COURSE_FILES = {"vae": "course_vae.safetensors", "clip": "course_clip.safetensors", "unet": "course_unet.safetensors"}


class StableDiffusion:
    """Stable Diffusion 1.x: the four parts and the sampling loop that joins them (chapter 11).

    `steps`, `guidance` and `scheduler` are the defaults a call uses when it does not say:
    what the model was made for (SD 1.5: 50 PNDM steps at guidance 7.5)."""

    def __init__(self, unet, vae, text_encoder, tokenizer=None, steps=50, guidance=7.5, scheduler="pndm"):
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder.eval()
        self._tokenizer = tokenizer
        self.steps, self.guidance, self.scheduler = steps, guidance, scheduler

    @property
    def tokenizer(self):
        """SD 1.x's CLIP tokenizer unless another was given; its 49,408-word vocabulary is read
        on first use (about 0.1 s), not while the weights load."""
        if self._tokenizer is None:
            self._tokenizer = CLIPTokenizer.sd15()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer):
        self._tokenizer = tokenizer

    # --- loading --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """Real SD 1.x weights: a diffusers folder (unet/, vae/, text_encoder/ with their
        config.json) or one original single file (.safetensors, or .ckpt read with
        torch.load(weights_only=True)). Tensors go straight to `device` and `dtype`; in float16
        the VAE stays in float32, where SD's VAE cannot overflow."""
        from . import weights
        device = torch.device(device)
        _check_device_dtype(device, dtype)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no weights at {path}: pass a diffusers folder (with unet/, vae/ and "
                                    "text_encoder/) or one SD 1.x .safetensors/.ckpt file")
        if path.is_dir():
            return weights.from_diffusers_folder(path, device=device, dtype=dtype)
        return weights.from_original(weights.load_state_dict(path, device), source=str(path), device=device, dtype=dtype)

    @classmethod
    def course_model(cls, device="cpu", dtype=torch.float32):
        """The small model this course trains (32x32 coloured shapes), from the checkpoints in
        data/; runs on a CPU in well under a second per image. Its defaults: 25 DDIM steps at
        guidance 4, a choice (chapters 10 and 12 measure others). `dtype` as in `from_pretrained` (the VAE
        stays in float32 under float16)."""
        device = torch.device(device)
        _check_device_dtype(device, dtype)
        from . import DATA_DIR
        from .clip import CLIPTextEncoder
        from .unet import UNet
        from .vae import AutoencoderKL
        for part, name in COURSE_FILES.items():
            if not (DATA_DIR / name).exists():
                raise FileNotFoundError(f"the course model needs {DATA_DIR / name}, which does not exist yet: "
                                        f"make it with `python -m minisd train {part}` (train vae, clip, unet "
                                        "in that order)")
        vae = AutoencoderKL.course(DATA_DIR / COURSE_FILES["vae"]).to(
            device, torch.float32 if dtype == torch.float16 else dtype)
        text_encoder = CLIPTextEncoder.course(DATA_DIR / COURSE_FILES["clip"]).to(device, dtype)
        unet = UNet.course(DATA_DIR / COURSE_FILES["unet"]).to(device, dtype)
        return cls(unet, vae, text_encoder, steps=25, guidance=4.0, scheduler="ddim")

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def __repr__(self):
        params = {n: sum(p.numel() for p in m.parameters()) for n, m in
                  (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder))}
        sizes = ", ".join(f"{n}={c / 1e6:.1f}M" for n, c in params.items())
        return (f"StableDiffusion({sizes}; {self.dtype} on {self.device}; defaults: {self.scheduler}, "
                f"{self.steps} steps, guidance {self.guidance})")

    # --- the parts of a call ------------------------------------------------------------------
    def encode_prompt(self, prompts):
        """Prompts -> CLIP's last hidden states (B, 77, D), after the final LayerNorm.

        No attention mask, as SD: the padding tokens are attended to like any other."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids).to(self.dtype)

    def decode(self, latents):
        """U-Net latents -> images (B, 3, H, W) in [0, 1], float32."""
        latents = latents / self.vae.scaling_factor
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(vae_dtype))
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _settings(self, prompt, negative_prompt, steps, guidance, scheduler):
        """Check the per-call options and fill in the model's defaults."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a str or a non-empty list of str")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one str, "
                             "or a list as long as the prompts")
        steps = self.steps if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r}: the number of sampling steps must be an int >= 1 "
                             "(20-50 is typical; the course model needs about 25)")
        guidance = self.guidance if guidance is None else float(guidance)
        scheduler = self.scheduler if scheduler is None else scheduler
        if isinstance(scheduler, Scheduler):       # a sampler object, e.g. schedulers.PNDM(order=2)
            return prompts, negatives, steps, guidance, scheduler
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {list(SCHEDULERS)}, "
                             "or pass a minisd.schedulers sampler object")
        return prompts, negatives, steps, guidance, make_scheduler(scheduler)

    def _check_size(self, height, width):
        """Pixels must divide cleanly by the VAE's factor (8 for SD); the U-Net takes any latent size."""
        height = self.unet.config.sample_size * self.vae.config.factor if height is None else height
        width = self.unet.config.sample_size * self.vae.config.factor if width is None else width
        multiple = self.vae.config.factor
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size <= 0 or size % multiple:
                fixed = max(multiple, round(size / multiple) * multiple) if isinstance(size, (int, float)) else 512
                raise ValueError(f"{name}={size!r} is not a positive multiple of {multiple}: the VAE turns each "
                                 f"{multiple}x{multiple} block of pixels into one latent; use e.g. {name}={fixed}")
        return height, width

    def _context(self, prompts, negatives, guidance):
        """[uncond, cond] text states for classifier-free guidance, or cond alone when g <= 1."""
        cond = self.encode_prompt(prompts)
        if guidance <= 1.0:
            return cond
        return torch.cat([self.encode_prompt(negatives), cond])  # (2B, 77, D)

    def _denoise(self, latents, context, sched, timesteps, guidance, generator, progress):
        """The sampling loop: one U-Net call per timestep on [uncond, cond], guidance, a sampler step."""
        cfg = guidance > 1.0
        for t in tqdm(timesteps, disable=not progress, desc="sampling"):
            x = torch.cat([latents, latents]) if cfg else latents
            eps = self.unet(sched.scale_model_input(x, t), t, context)
            if cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            latents = sched.step(eps, t, latents, generator=generator)
        return latents

    def _output(self, latents, output_type):
        if output_type == "latent":
            return latents
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type={output_type!r}: choose 'pil', 'np' or 'latent'")
        images = self.decode(latents).permute(0, 2, 3, 1).cpu().numpy()  # (B, 3, H, W) -> (B, H, W, 3)
        if output_type == "np":
            return images
        from PIL import Image
        return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]

    def _noise(self, shape, generator):
        """Standard normal noise drawn on the CPU (a seed gives the same noise on any device)."""
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)

    # --- text to image --------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt, negative_prompt="", height=None, width=None, steps=None, guidance=None,
                 scheduler=None, seed=None, latents=None, output_type="pil", progress=True):
        """Text -> images: a list of PIL images ("pil"), a float array (N, H, W, 3) in [0, 1] ("np"),
        or the final latents ("latent"). `latents` (B, 4, H/8, W/8) replays a run from its initial
        noise; `seed` fixes the noise (and a DDPM sampler's), the same on CPU and GPU."""
        prompts, negatives, steps, guidance, sched = self._settings(prompt, negative_prompt, steps, guidance,
                                                                    scheduler)
        height, width = self._check_size(height, width)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        context = self._context(prompts, negatives, guidance)
        f = self.vae.config.factor
        shape = (len(prompts), self.unet.config.in_channels, height // f, width // f)
        if latents is None:
            latents = self._noise(shape, generator)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)} but {len(prompts)} prompt(s) at "
                             f"{height}x{width} need {shape}")
        sched.set_timesteps(steps)
        latents = latents.to(self.device, self.dtype) * sched.init_noise_sigma
        latents = self._denoise(latents, context, sched, sched.timesteps, guidance, generator, progress)
        return self._output(latents, output_type)

    # --- image to image -------------------------------------------------------------------
    @torch.no_grad()
    def img2img(self, prompt, image, strength=0.8, negative_prompt="", steps=None, guidance=None,
                scheduler=None, seed=None, output_type="pil", progress=True):
        """Edit an image (SDEdit): encode it, noise it to the timestep `strength` of the way up
        the chain, and run only the rest of the sampling loop from there, as diffusers'
        StableDiffusionImg2ImgPipeline. strength 0 returns the image, 1 ignores it.
        `image`: a PIL image, a uint8 array (H, W, 3), or a float tensor (B, 3, H, W) in [0, 1]."""
        prompts, negatives, steps, guidance, sched = self._settings(prompt, negative_prompt, steps, guidance,
                                                                    scheduler)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength}: it must be in [0, 1] (0 keeps the image, 1 ignores it)")
        pixels = _to_tensor(image)
        if len(pixels) == 1 and len(prompts) > 1:
            pixels = pixels.expand(len(prompts), -1, -1, -1)
        if len(pixels) != len(prompts):
            raise ValueError(f"{len(pixels)} images for {len(prompts)} prompts")
        self._check_size(pixels.shape[2], pixels.shape[3])
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        context = self._context(prompts, negatives, guidance)

        sched.set_timesteps(steps)
        start = steps - min(int(steps * strength), steps)           # steps skipped at the noisy end
        timesteps = sched.timesteps[start:]
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode((2 * pixels - 1).to(self.device, vae_dtype))   # [0, 1] -> [-1, 1]
        eps = torch.randn(posterior.mean.shape, generator=generator, dtype=vae_dtype).to(self.device)
        x0 = (posterior.mean + posterior.std * eps) * self.vae.scaling_factor     # a sample, as diffusers
        x0 = x0.to(self.dtype)
        if len(timesteps) == 0:
            return self._output(x0, output_type)
        noise = self._noise(x0.shape, generator)
        t = timesteps[0]
        if isinstance(sched, Euler):  # Euler's samples live at x0 + sigma * noise
            latents = x0 + sched.sigmas[int((sched.timesteps == t).nonzero()[0])] * noise
        else:
            latents = add_noise(x0, noise, t.repeat(len(x0)).to(self.device))
        latents = self._denoise(latents, context, sched, timesteps, guidance, generator, progress)
        return self._output(latents, output_type)


def _check_device_dtype(device, dtype):
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype}: use torch.float32, torch.float16 (CUDA) or torch.bfloat16")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 on the CPU is not supported (many CPU kernels lack it, and it is slower than "
                         "float32 there): use dtype=torch.float32 (or torch.bfloat16) on the CPU, or device='cuda'")


def _to_tensor(image):
    """A PIL image, a uint8 array (H, W, 3) or a float tensor (B, 3, H, W) in [0, 1] -> float tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        pixels = image[None] if image.ndim == 3 else image
        if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
            raise ValueError(f"an image tensor must be float (B, 3, H, W) in [0, 1], got {tuple(image.shape)} "
                             f"{image.dtype}")
        return pixels.float()
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (H, W, 3), got {array.shape} {array.dtype}")
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255  # (H, W, 3) -> (1, 3, H, W)


def main(argv=None):
    """`python -m minisd generate PROMPT --out FILE.png [...]`: one image from the terminal."""
    parser = argparse.ArgumentParser(prog="python -m minisd generate",
                                     description="Text to image, with the course model (default) or real SD 1.x "
                                                 "weights (--weights).")
    parser.add_argument("prompt")
    parser.add_argument("--weights", help="a diffusers folder or an SD 1.x .safetensors/.ckpt (default: the "
                                          "course model from data/)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), help="sampler (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--size", type=int, help="height and width in pixels (default: the model's)")
    parser.add_argument("--out", required=True, help="where to write the PNG")
    args = parser.parse_args(argv)
    try:
        if args.weights:
            pipe = StableDiffusion.from_pretrained(args.weights, device=args.device, dtype=getattr(torch, args.dtype))
        else:
            pipe = StableDiffusion.course_model(device=args.device, dtype=getattr(torch, args.dtype))
        image = pipe(args.prompt, negative_prompt=args.negative, height=args.size, width=args.size,
                     steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, seed=args.seed)[0]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    image.save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height})")
    return 0
