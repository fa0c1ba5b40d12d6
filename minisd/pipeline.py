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
import json
import math
import numbers
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, paths, weights
from .attention import fuse_qkv_projections
from .checkpoint import COURSE_FILES  # noqa: F401  (kept importable from here)
from .controlnet import check_fits
from .schedulers import SCHEDULERS, Scheduler, SchedulerConfig, make_scheduler
from .tokenizer import EOS, CLIPTokenizer


def denoise(unet, latents, context, sched, timesteps=None, guidance=None, generator=None, progress=False,
            control=(), extra=None, after_step=None):
    """The sampling loop (chapter 10), shared by the pipeline and the trainers' evaluation.

    Per timestep one U-Net call and one sampler step. With `guidance` (classifier-free
    guidance), `context` is [uncond; cond] (2B, 77, D): the U-Net runs once on [x; x] and the
    noise is eps_u + guidance (eps_c - eps_u). With guidance=None, `context` is cond alone.
    `timesteps` defaults to all of the sampler's (img2img starts part-way). `control`: (ControlNet,
    hint as big a batch as the U-Net's, scale) triples (chapter 14), whose residuals are summed.
    Inpainting (chapter 16) adds two optional pieces: `extra` (B, C', h, w), channels joined to
    the scaled latents at every U-Net call (a 9-channel inpainting U-Net's mask and masked-image
    latents), and `after_step(i, t, latents) -> latents`, run after every sampler step (latent
    blending: the known region put back, noised to the next timestep)."""
    timesteps = sched.timesteps if timesteps is None else timesteps
    if extra is not None and guidance is not None:
        extra = torch.cat([extra, extra])
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling")):
        x = latents if guidance is None else torch.cat([latents, latents])
        x = sched.scale_model_input(x, t)
        down = mid = None
        for net, hint, scale in control:
            d, m = net(x, t, context, hint, scale)
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        if extra is not None:
            x = torch.cat([x, extra], dim=1)
        eps = unet(x, t, context) if down is None else unet(x, t, context, down_residuals=down, mid_residual=mid)
        if guidance is not None:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = sched.step(eps, t, latents, generator=generator)
        if after_step is not None:
            latents = after_step(i, t, latents)
    return latents


class StableDiffusion:
    """Stable Diffusion 1.x and 2.x: the four parts and the sampling loop that joins them (chapter 11).

    `steps`, `guidance` and `scheduler` are the defaults a call uses when it does not say:
    what the model was made for (SD 1.5: 50 PNDM steps at guidance 7.5). `scheduler_config`
    configures every sampler (the weights' own scheduler file; default: SD 1.5's)."""

    def __init__(self, unet, vae, text_encoder, tokenizer=None, steps=50, guidance=7.5, scheduler="pndm",
                 scheduler_config=None):
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder.eval()
        self._tokenizer = tokenizer
        self.steps, self.guidance, self.scheduler = steps, guidance, scheduler
        self.scheduler_config = SchedulerConfig.sd15() if scheduler_config is None else scheduler_config

    @property
    def tokenizer(self):
        """CLIP's tokenizer unless another was given: SD 2.x's (padding with "!") for an OpenCLIP
        text encoder, SD 1.x's otherwise. Its 49,408-word vocabulary is read on first use (about
        0.1 s), not while the weights load."""
        if self._tokenizer is None:
            sd2 = getattr(self.text_encoder, "config", None) is not None and self.text_encoder.config.act == "gelu"
            self._tokenizer = CLIPTokenizer.sd2() if sd2 else CLIPTokenizer.sd15()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer):
        self._tokenizer = tokenizer

    # --- loading --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, prediction_type=None):
        """Real SD 1.x or 2.x weights: a diffusers folder (unet/, vae/, text_encoder/ with their
        config.json, and scheduler/scheduler_config.json, which configures every sampler) or one
        original single file (.safetensors, or .ckpt read with torch.load(weights_only=True)),
        which carries no scheduler file (see `single_file_scheduler`). `prediction_type`
        ("epsilon" or "v_prediction") overrides what the files say. Tensors go straight to
        `device` and `dtype`; in float16 the VAE stays in float32 (cheap next to the U-Net, and safe
        for a VAE whose activations exceed float16, as SDXL's do; chapter 11)."""
        device = _check_device_dtype(device, dtype)
        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"prediction_type={prediction_type!r}: use 'epsilon' (SD 1.x, SD 2.x-base) or "
                             "'v_prediction' (SD 2.x at 768 px), or leave it None to follow the files")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no weights at {path}: pass a diffusers folder (with unet/, vae/ and "
                                    "text_encoder/) or one SD 1.x/2.x .safetensors/.ckpt file")
        if path.is_dir():
            config, name, pad = folder_scheduler(path)  # a bad scheduler file is refused before the weights load
            pipe = cls(*weights.from_diffusers_folder(path, device=device, dtype=dtype))
            if pad is not None:
                try:
                    pipe.tokenizer = CLIPTokenizer.sd15(pad=pad)
                except ValueError as e:
                    raise weights.WeightsError(f"{path / 'tokenizer'}: {e}") from None
        else:
            sd = weights.load_state_dict(path, device)
            pipe = cls(*weights.from_original(sd, source=str(path), device=device, dtype=dtype))
            config, name = single_file_scheduler(pipe.unet.config, sd.get("global_step"), prediction_type)
            if pipe.unet.config.linear_projection and config.prediction_type == "epsilon":
                pipe.unet.config = replace(pipe.unet.config, sample_size=64)  # SD 2.x-base: 512 px, not 768
        if prediction_type is not None:
            config = replace(config, prediction_type=prediction_type)
        pipe.scheduler_config, pipe.scheduler = config, name
        return pipe

    @classmethod
    def course_model(cls, device="cpu", dtype=torch.float32):
        """The small model this course trains (32x32 coloured shapes), from the checkpoints in
        data/; runs on a CPU in well under a second per image. Its defaults (sampler, steps,
        guidance: a choice, which chapters 10 and 12 measure against others) are read from the
        U-Net checkpoint's metadata. `dtype` as in `from_pretrained` (the VAE stays in float32
        under float16)."""
        device = _check_device_dtype(device, dtype)
        files = {part: checkpoint.course_path(part) for part in checkpoint.COURSE_FILES}
        vae = checkpoint.course_vae(files["vae"]).to(device, torch.float32 if dtype == torch.float16 else dtype)
        text_encoder = checkpoint.course_text_encoder(files["clip"]).to(device, dtype)
        unet = checkpoint.course_unet(files["unet"]).to(device, dtype)
        sampling = checkpoint.sampling_settings(files["unet"])
        if sampling is None:
            raise weights.WeightsError(f"{files['unet']} stores no sampling settings: re-make it with "
                                       "`python -m minisd train unet`")
        return cls(unet, vae, text_encoder, steps=sampling["steps"], guidance=sampling["guidance"],
                   scheduler=sampling["sampler"])

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

    # --- big images on small machines ----------------------------------------------------------
    def enable_vae_tiling(self):
        """Encode and decode images larger than the VAE's `sample_size` (512 px for SD 1.5) in
        overlapping tiles, as diffusers' `enable_vae_tiling`: the VAE's memory stops growing with
        the image. The tiles are cross-faded, so the image differs a little from an untiled one."""
        self.vae.use_tiling = True

    def disable_vae_tiling(self):
        self.vae.use_tiling = False

    def enable_attention_slicing(self, slice_size="auto"):
        """Compute the U-Net's attention a few (image, head) pairs at a time, as diffusers'
        `enable_attention_slicing` (which slices the U-Net only, not the VAE): see
        `set_attention_slice`. Same images, to rounding."""
        set_attention_slice(self.unet, slice_size)

    def disable_attention_slicing(self):
        set_attention_slice(self.unet, None)

    # --- fewer, larger matrix products -----------------------------------------------------------
    def fuse_qkv_projections(self, unet=True, vae=True):
        """Compute each attention layer's q, k and v (k and v for cross-attention) with one
        matrix product, as diffusers' `fuse_qkv_projections`; the weights keep their to_q, to_k
        and to_v names, so loading and LoRA work as before (see
        `attention.CrossAttention.fuse_projections`). Same images, to rounding. Returns the pipeline."""
        if unet:
            fuse_qkv_projections(self.unet)
        if vae:
            fuse_qkv_projections(self.vae)
        return self

    def unfuse_qkv_projections(self, unet=True, vae=True):
        if unet:
            fuse_qkv_projections(self.unet, False)
        if vae:
            fuse_qkv_projections(self.vae, False)

    # --- compiled mode -------------------------------------------------------------------------
    def compile(self, mode=None):
        """Run the U-Net and the VAE's decoder through torch.compile (appendix "Making it fast"),
        in place: the modules, their weights and their names stay as they are, so LoRA and weight
        loading work as before. The first call at each new image size then spends seconds to
        minutes generating code (reported by `python -m minisd benchmark --compile`); later calls
        run it. `mode` is torch.compile's ("max-autotune"; "reduce-overhead" for CUDA graphs).
        Returns the pipeline."""
        if self.device.type == "cpu" and not (os.environ.get("CXX") or any(
                shutil.which(c) for c in ("g++", "c++", "clang++"))):
            raise RuntimeError("pipe.compile() on the CPU needs a C++ compiler, which torch.compile uses to build its "
                               "kernels, and none was found: install one (apt install g++, or Xcode's command line "
                               "tools) or set CXX, or run without compile()")
        self.unet.compile(mode=mode)
        self.vae.decoder.compile(mode=mode)
        return self

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
        """Check the per-call options and fill in the model's defaults: every one is checked here,
        before any work, and a bad one is named in a ValueError or TypeError."""
        prompts = _prompt_list(prompt, "prompt")
        if not prompts:
            raise ValueError("prompt=[]: give a str, or a non-empty list of str")
        negatives = (_prompt_list(negative_prompt, "negative_prompt") if not isinstance(negative_prompt, str)
                     else [negative_prompt] * len(prompts))
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give negative_prompt "
                             "as one str, or a list as long as the prompts")
        steps = self.steps if steps is None else steps
        if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps={steps!r}: the number of sampling steps must be an int >= 1 "
                             "(20-50 is typical; the course model needs about 25)")
        steps = int(steps)
        if guidance is not None:
            try:
                guidance = float(guidance)
            except (TypeError, ValueError):
                raise TypeError(f"guidance={guidance!r}: the classifier-free guidance scale must be a number") from None
            if not math.isfinite(guidance):
                raise ValueError(f"guidance={guidance!r}: the classifier-free guidance scale must be a finite number "
                                 "(1 or less turns guidance off; 4-8 is typical)")
        guidance = self.guidance if guidance is None else guidance
        scheduler = self.scheduler if scheduler is None else scheduler
        if not isinstance(scheduler, Scheduler):   # else a sampler object, e.g. schedulers.PNDM(order=2)
            if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
                raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {list(SCHEDULERS)}, "
                                 "or pass a minisd.schedulers sampler object")
            scheduler = make_scheduler(scheduler, self.scheduler_config)
        try:
            scheduler.set_timesteps(steps)       # a sampler refuses more steps than it has timesteps
        except ValueError as e:
            raise ValueError(f"steps={steps}: {e}") from None
        return prompts, negatives, steps, guidance, scheduler

    def _check_size(self, height, width, image=False):
        """Pixels must divide cleanly by the VAE's factor (8 for SD); the U-Net takes any latent size.
        `image`: the sizes are those of img2img's image (the message then names it)."""
        height = self.unet.config.sample_size * self.vae.config.factor if height is None else height
        width = self.unet.config.sample_size * self.vae.config.factor if width is None else width
        multiple = self.vae.config.factor
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size <= 0 or size % multiple:
                finite = isinstance(size, numbers.Real) and math.isfinite(size)
                fixed = max(multiple, round(size / multiple) * multiple) if finite else 8 * multiple
                where = f"image of {height}x{width} pixels: its " if image else ""
                raise ValueError(f"{where}{name}={size!r} is not a positive multiple of {multiple}: the VAE turns each "
                                 f"{multiple}x{multiple} block of pixels into one latent; use e.g. {name}={fixed}")
        return int(height), int(width)

    def _context(self, prompts, negatives, guidance):
        """[uncond, cond] text states for classifier-free guidance, or cond alone when g <= 1."""
        cond = self.encode_prompt(prompts)
        if guidance <= 1.0:
            return cond
        return torch.cat([self.encode_prompt(negatives), cond])  # (2B, 77, D)

    def _output(self, latents, output_type):
        if output_type == "latent":
            return latents
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
                 scheduler=None, seed=None, latents=None, output_type="pil", progress=True, controlnet=None,
                 control_image=None, controlnet_scale=1.0):
        """Text -> images: a list of PIL images ("pil"), a float array (N, H, W, 3) in [0, 1] ("np"),
        or the final latents ("latent"). `latents` (B, 4, H/8, W/8) replays a run from its initial
        noise; `seed` fixes the noise (and a DDPM sampler's), the same on CPU and GPU.
        `controlnet` (chapter 14): a ControlNet, or a list of them, with `control_image` (one image,
        or one per prompt; a list of those for a list of ControlNets) resized to the output size, and
        `controlnet_scale` (a number, or one per ControlNet)."""
        prompts, negatives, steps, guidance, sched = self._settings(prompt, negative_prompt, steps, guidance,
                                                                    scheduler)
        height, width = self._check_size(height, width)
        control = self._control(controlnet, control_image, controlnet_scale, len(prompts), height, width, guidance)
        generator = _generator(seed)
        _check_output_type(output_type)
        f = self.vae.config.factor
        self._check_plain_unet("pipe(...)")
        shape = (len(prompts), self.vae.config.latent_channels, height // f, width // f)
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents is a {type(latents).__name__}: pass a tensor of shape {shape}, or None")
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)} but {len(prompts)} prompt(s) at "
                             f"{height}x{width} need {shape}")
        context = self._context(prompts, negatives, guidance)
        if latents is None:
            latents = self._noise(shape, generator)
        latents = latents.to(self.device, self.dtype) * sched.init_noise_sigma
        latents = denoise(self.unet, latents, context, sched, None, guidance if guidance > 1.0 else None,
                          generator, progress, control)
        return self._output(latents, output_type)

    # --- image to image -------------------------------------------------------------------
    @torch.no_grad()
    def img2img(self, prompt, image, strength=0.8, negative_prompt="", steps=None, guidance=None,
                scheduler=None, seed=None, output_type="pil", progress=True, controlnet=None, control_image=None,
                controlnet_scale=1.0):
        """Edit an image (SDEdit): encode it, noise it to the timestep `strength` of the way up
        the chain, and run only the rest of the sampling loop from there, as diffusers'
        StableDiffusionImg2ImgPipeline. strength 0 returns the image, 1 ignores it.
        `image`: a PIL image, a uint8 array (H, W, 3), or a float tensor (B, 3, H, W) in [0, 1].
        `controlnet`, `control_image`, `controlnet_scale` as in a text-to-image call (the control
        image is resized to `image`'s size)."""
        prompts, negatives, steps, guidance, sched = self._settings(prompt, negative_prompt, steps, guidance,
                                                                    scheduler)
        if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength!r}: it must be a number in [0, 1] (0 keeps the image, 1 ignores it)")
        self._check_plain_unet("img2img")
        pixels = _to_tensor(image)
        if len(pixels) == 1 and len(prompts) > 1:
            pixels = pixels.expand(len(prompts), -1, -1, -1)
        if len(pixels) != len(prompts):
            raise ValueError(f"{len(pixels)} images for {len(prompts)} prompts")
        self._check_size(pixels.shape[2], pixels.shape[3], image=True)
        control = self._control(controlnet, control_image, controlnet_scale, len(prompts), pixels.shape[2],
                                pixels.shape[3], guidance)
        generator = _generator(seed)
        _check_output_type(output_type)
        context = self._context(prompts, negatives, guidance)

        start = steps - min(int(steps * strength), steps)           # steps skipped at the noisy end
        timesteps = sched.timesteps[start:]
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode((2 * pixels - 1).to(self.device, vae_dtype))   # [0, 1] -> [-1, 1]
        x0 = (posterior.sample(generator) * self.vae.scaling_factor).to(self.dtype)  # a sample, as diffusers
        if len(timesteps) == 0:
            return self._output(x0, output_type)
        latents = sched.add_noise(x0, self._noise(x0.shape, generator), timesteps[0])  # each sampler its own way
        latents = denoise(self.unet, latents, context, sched, timesteps, guidance if guidance > 1.0 else None,
                          generator, progress, control)
        return self._output(latents, output_type)

    # --- inpainting (chapter 16) -------------------------------------------------------------
    def _check_plain_unet(self, what):
        """Text-to-image and img2img need a U-Net whose input is the latents alone."""
        c = self.vae.config.latent_channels
        if self.unet.config.in_channels != c:
            raise ValueError(f"{what}: this U-Net takes {self.unet.config.in_channels} input channels, not the "
                             f"{c} of the latents: an inpainting U-Net (latents + mask + masked-image latents) "
                             "runs through pipe.inpaint(prompt, image, mask)")

    def _encode_sample(self, pixels, generator):
        """Pixels in [-1, 1] -> a sample of the VAE's posterior times the scaling factor, as diffusers
        (one generator draw of the latents' shape)."""
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(pixels.to(self.device, vae_dtype))
        return (posterior.sample(generator) * self.vae.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def inpaint(self, prompt, image, mask, strength=1.0, negative_prompt="", height=None, width=None, steps=None,
                guidance=None, scheduler=None, seed=None, output_type="pil", progress=True):
        """Repaint the white part of `mask` in `image` so that the result follows `prompt`, as
        diffusers' StableDiffusionInpaintPipeline (same images from the same weights and seed).

        The U-Net decides how: a plain (4-channel) U-Net, any SD model, samples as text-to-image
        and after every step puts the known region back into the latents, noised to the next
        timestep (latent blending); an inpainting U-Net (9 channels, as SD's inpainting
        checkpoints) sees the mask and the latents of the masked image beside its latents at every
        call. `strength` < 1 starts from the image noised part-way (as img2img) instead of pure noise.
        `image`: a PIL image, a uint8 array (H, W, 3) or (N, H, W, 3), or a float tensor
        (N, 3, H, W) in [0, 1]. `mask`: a PIL image (any mode; grey), a uint8 or bool array
        (H, W), or a float tensor (H, W), (N, H, W) or (N, 1, H, W) in [0, 1]; white (>= 0.5) is
        repainted, black kept. Both are resized to height x width (default: the image's size),
        PIL images with Lanczos, arrays and tensors with nearest neighbours, as diffusers' image
        processors; the mask is then made binary at 0.5 and shrunk to the latents' size (nearest)."""
        prompts, negatives, steps, guidance, sched = self._settings(prompt, negative_prompt, steps, guidance,
                                                                    scheduler)
        if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength!r}: it must be in (0, 1] (1 repaints from pure noise; "
                             "smaller keeps more of what was under the mask)")
        c, f = self.vae.config.latent_channels, self.vae.config.factor
        in_channels = self.unet.config.in_channels
        if in_channels not in (c, 2 * c + 1):
            raise ValueError(f"inpaint needs a U-Net with {c} input channels (any SD model: latent blending) or "
                             f"{2 * c + 1} (an inpainting U-Net: latents + mask + masked-image latents); this one "
                             f"takes {in_channels}")
        given = (height, width)
        pixels, (height, width) = _inpaint_image(image, height, width)
        try:
            self._check_size(height, width)
        except ValueError as e:
            if given == (None, None):
                raise ValueError(f"the image is {height}x{width} px: {e}; or pass height= and width= to resize it "
                                 "(as diffusers does)") from None
            raise
        pixels = _resize_nearest(pixels, height, width)
        m = _inpaint_mask(mask, height, width)
        n = len(prompts)
        for name, count in (("images", len(pixels)), ("masks", len(m))):
            if count not in (1, n):
                raise ValueError(f"{count} {name} for {n} prompt(s): give one (used for every prompt) or one per prompt")
        if len(pixels) != len(m) and 1 not in (len(pixels), len(m)):
            raise ValueError(f"{len(pixels)} images but {len(m)} masks: give one mask per image, or one for all")
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        context = self._context(prompts, negatives, guidance)

        sched.set_timesteps(steps)
        start = steps - min(int(steps * strength), steps)
        timesteps = sched.timesteps[start:]
        if start == steps:                        # as diffusers (PNDM's list is one longer than `steps`)
            raise ValueError(f"strength={strength} with steps={steps} leaves no sampling step: raise either")
        pixels = 2 * pixels - 1                                            # [0, 1] -> [-1, 1]
        blending = in_channels == c
        # the generator's draws in diffusers' order: image latents (when used), noise, masked-image latents
        known = None
        if blending or strength < 1.0:
            known = self._encode_sample(pixels, generator)
            known = known.repeat(n // len(known), 1, 1, 1)
        noise = self._noise((n, c, height // f, width // f), generator)
        if strength == 1.0:
            latents = noise * sched.init_noise_sigma
        else:
            latents = sched.add_noise(known, noise, timesteps[0])
        masked = pixels * (m < 0.5)                                         # the repainted part set to 0 (grey)
        masked_latents = self._encode_sample(masked, generator)        # drawn even when blending, as diffusers
        small = torch.nn.functional.interpolate(m, size=(height // f, width // f)).to(self.device, self.dtype)
        small = small.repeat(n // len(small), 1, 1, 1)
        masked_latents = masked_latents.repeat(n // len(masked_latents), 1, 1, 1)

        extra = after_step = None
        if blending:
            def after_step(i, t, x):
                # the known region, noised with the same noise to where the next step starts
                target = known if i == len(timesteps) - 1 else sched.add_noise(known, noise, timesteps[i + 1])
                return (1 - small) * target + small * x
        else:
            extra = torch.cat([small, masked_latents], dim=1)              # (B, 1 + c, h, w)
        latents = denoise(self.unet, latents, context, sched, timesteps, guidance if guidance > 1.0 else None,
                          generator, progress, extra=extra, after_step=after_step)
        return self._output(latents, output_type)


    # --- ControlNet (chapter 14) ----------------------------------------------------------------
    def _control(self, controlnet, control_image, controlnet_scale, n, height, width, guidance):
        """Check the ControlNet arguments before any work and return denoise's `control`: per
        ControlNet (net, hint (n or 2n, C, height, width) in the pipeline's dtype, scale)."""
        if controlnet is None:
            if control_image is not None:
                raise ValueError("control_image was given without controlnet=: load one with "
                                 "minisd.ControlNet.from_pretrained(path) and pass it as controlnet=")
            return ()
        nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
        if control_image is None:
            raise ValueError("controlnet= needs control_image= (the edge map, mask, pose... it follows)")
        images = list(control_image) if len(nets) > 1 else [control_image]
        scales = list(controlnet_scale) if isinstance(controlnet_scale, (list, tuple)) else [controlnet_scale] * len(nets)
        if len(images) != len(nets) or len(scales) != len(nets):
            raise ValueError(f"{len(nets)} ControlNets need one control_image and one controlnet_scale each; got "
                             f"{len(images)} images and {len(scales)} scales")
        control = []
        for i, (net, image, scale) in enumerate(zip(nets, images, scales)):
            name = "control_image" if len(nets) == 1 else f"control_image[{i}]"
            label = "controlnet" if len(nets) == 1 else f"controlnet[{i}]"
            check_fits(net, self.unet, label)
            p = next(net.parameters())
            if (p.device, p.dtype) != (self.device, self.dtype):
                raise ValueError(f"{label} is {p.dtype} on {p.device} but the pipeline is {self.dtype} on {self.device}: "
                                 "load it with ControlNet.from_pretrained(path, device=..., dtype=...) to match, or .to() it")
            hint = _control_tensor(image, height, width, net.config.conditioning_channels, name)
            if len(hint) == 1:
                hint = hint.expand(n, -1, -1, -1)
            if len(hint) != n:
                raise ValueError(f"{name} holds {len(hint)} images for {n} prompt(s): give one image (used for every "
                                 "prompt) or one per prompt")
            hint = hint.to(self.device, self.dtype)
            control.append((net, torch.cat([hint, hint]) if guidance > 1.0 else hint, float(scale)))
        return control


def set_attention_slice(model, slice_size):
    """Set `slice_size` on every attention layer of `model` (a U-Net, a ControlNet), as diffusers'
    `set_attention_slice`: "auto" = half of each layer's heads, "max" = 1, a number = that many
    (image, head) pairs at a time in every layer (it must divide every layer's heads), None = off."""
    layers = [m for m in model.modules() if hasattr(m, "slice_size")]  # attention.CrossAttention and its kin
    if slice_size in ("auto", "max", None):
        sizes = [{"auto": max(m.heads // 2, 1), "max": 1, None: None}[slice_size] for m in layers]
    elif isinstance(slice_size, numbers.Integral) and not isinstance(slice_size, bool) and slice_size >= 1:
        heads = sorted({m.heads for m in layers})
        if any(h % slice_size for h in heads):
            raise ValueError(f"slice_size={slice_size} does not divide every attention layer's number of heads "
                             f"({', '.join(map(str, heads))}): give a number that does, 'auto' or 'max'")
        sizes = [int(slice_size)] * len(layers)
    else:
        raise ValueError(f"slice_size={slice_size!r}: give 'auto' (half the heads), 'max' (one head at a time), "
                         "a whole number >= 1 of heads per slice, or None (off)")
    for m, size in zip(layers, sizes):
        m.slice_size = size


# --- the scheduler file (SD 2.x, issue 17): what configures the samplers of loaded weights ----------

# diffusers' scheduler classes -> minisd's sampler names: a scheduler file's `_class_name` is the
# model's default sampler
DIFFUSERS_SCHEDULERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                        "DPMSolverMultistepScheduler": "dpm++2m", "PNDMScheduler": "pndm",
                        "LCMScheduler": "lcm"}


def folder_scheduler(folder):
    """(SchedulerConfig, default sampler name, tokenizer pad token or None) of a diffusers folder:
    its scheduler/scheduler_config.json read as every diffusers `Cls.from_config` reads it (SD 1.5's
    original file where there is none), and the pad token its tokenizer files name."""
    folder = Path(folder)
    file = folder / "scheduler" / "scheduler_config.json"
    config, name = SchedulerConfig.sd15(), "pndm"
    if file.exists():
        d = weights.read_json(file)
        if not isinstance(d, dict):
            raise weights.WeightsError(f"{file} holds a JSON {type(d).__name__}, not a scheduler config")
        try:
            config = SchedulerConfig.from_dict(d, source=str(file))
        except weights.WeightsError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise weights.WeightsError(f"{file}: not a usable scheduler config ({type(e).__name__}: {e})") from e
        name = DIFFUSERS_SCHEDULERS.get(d.get("_class_name"), "pndm" if config.prediction_type == "epsilon" else "ddim")
    pad = None
    for part in ("special_tokens_map.json", "tokenizer_config.json"):
        tokens = folder / "tokenizer" / part
        d = weights.read_json(tokens) if tokens.exists() else {}
        if isinstance(d, dict) and d.get("pad_token") is not None:
            pad = d["pad_token"]
            pad = pad.get("content") if isinstance(pad, dict) else pad  # {"content": "!", ...} in older files
            if not isinstance(pad, str):
                raise weights.WeightsError(f"{tokens}: pad_token {pad!r} is not a token")
            break
    return config, name, pad if pad != EOS else None


def single_file_scheduler(unet_config, global_step=None, prediction_type=None):
    """(SchedulerConfig, default sampler name) for an original single file, which carries no
    scheduler file. SD 1.x: SD 1.5's original file, PNDM. SD 2.x (linear projections): SD 2.1's
    file, DDIM, with the prediction type diffusers' single-file loader picks: the 512-base and
    the 768-v models share one architecture, so it goes by the training step the file records,
    epsilon for 875,000 (SD 2.0-base) and v_prediction otherwise (files rarely record it: pass
    prediction_type="epsilon" for the -base models)."""
    if not unet_config.linear_projection:
        return SchedulerConfig.sd15(), "pndm"
    if prediction_type is None:
        prediction_type = "epsilon" if global_step == 875000 else "v_prediction"
    return replace(SchedulerConfig.sd21(), prediction_type=prediction_type), "ddim"


def _prompt_list(prompt, name):
    """A str or a list/tuple of str -> a list of str; anything else is a TypeError naming `name`."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        bad = prompts if not isinstance(prompts, (list, tuple)) else next(p for p in prompts if not isinstance(p, str))
        raise TypeError(f"{name} must be a str or a list of str, got {bad!r:.40} ({type(bad).__name__})")
    return list(prompts)


def _generator(seed):
    """A CPU generator seeded with `seed` (None: unseeded): an int in torch's range, checked."""
    if seed is None:
        return None
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed={seed!r}: the seed must be an int (or None for fresh noise)")
    if not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"seed={seed}: the seed must fit in 64 bits (-2**63 <= seed < 2**64)")
    return torch.Generator().manual_seed(int(seed))


def _check_output_type(output_type):
    if not isinstance(output_type, str) or output_type not in ("pil", "np", "latent"):
        raise ValueError(f"output_type={output_type!r}: choose 'pil', 'np' or 'latent'")


DEVICES = ("cpu", "cuda", "mps")


def _check_device_dtype(device, dtype):
    """Refuse, before any work, a device this torch cannot use and a dtype the device cannot run;
    the device as a torch.device."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device={device!r}: give a str such as 'cpu', 'cuda', 'cuda:1' or 'mps', or a torch.device")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device torch knows: use 'cpu', 'cuda' (or 'cuda:N') "
                         "or 'mps'") from None
    if device.type not in DEVICES:
        raise ValueError(f"device={str(device)!r}: minisd runs on {', '.join(map(repr, DEVICES))}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but this torch sees no CUDA GPU (torch {torch.__version__}, "
                         f"built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'without CUDA'}): "
                         "use device='cpu', or install a CUDA build of torch on a machine with an NVIDIA GPU "
                         "(README, 'On a GPU')")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={str(device)!r}, but MPS (Apple's GPU backend) is not available here: "
                         "use device='cpu'")
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype}: use torch.float32, torch.float16 (CUDA) or torch.bfloat16")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 on the CPU is not supported (many CPU kernels lack it, and it is slower than "
                         "float32 there): use dtype=torch.float32 (or torch.bfloat16) on the CPU, or device='cuda'")
    return device


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


def _control_tensor(image, height, width, channels, name):
    """A control image -> float (B, C, height, width) in [0, 1], resized as diffusers' control image
    processor does: a PIL image (or a uint8 array (H, W, C) / (B, H, W, C), or a list of them, made
    PIL images) with Lanczos, a float tensor (B, C, H, W) in [0, 1] by nearest-neighbour."""
    from PIL import Image
    if isinstance(image, torch.Tensor):
        pixels = image[None] if image.ndim == 3 else image
        if pixels.ndim != 4 or pixels.shape[1] != channels or not pixels.is_floating_point():
            raise ValueError(f"{name}: a tensor must be float (B, {channels}, H, W) in [0, 1], got "
                             f"{tuple(image.shape)} {image.dtype}")
        return torch.nn.functional.interpolate(pixels.float(), size=(height, width))
    if isinstance(image, np.ndarray) and image.ndim == 4:
        image = list(image)
    pils = []
    for im in image if isinstance(image, (list, tuple)) else [image]:
        if not hasattr(im, "convert"):
            array = np.asarray(im)
            if array.ndim != 3 or array.shape[2] not in (1, 3) or array.dtype != np.uint8:
                raise ValueError(f"{name}: an array must be uint8 (H, W, 3), got {array.shape} {array.dtype} "
                                 "(a float image: pass a torch tensor (B, 3, H, W) in [0, 1])")
            im = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        im = im.convert("RGB").resize((width, height), resample=Image.Resampling.LANCZOS)
        pils.append(np.asarray(im, dtype=np.float32) / 255)
    if channels != 3:
        raise ValueError(f"{name}: this ControlNet takes {channels}-channel control images; pass a float tensor "
                         f"(B, {channels}, H, W)")
    return torch.from_numpy(np.stack(pils)).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)


def _inpaint_image(image, height, width):
    """inpaint's `image` -> (float tensor (N, 3, H', W') in [0, 1], (height, width)): the size
    defaults to the image's; a PIL image is resized to it with Lanczos (diffusers' VaeImageProcessor),
    arrays and tensors later with nearest neighbours."""
    from PIL import Image
    pil = [image] if isinstance(image, Image.Image) else image if (
        isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image)) else None
    if pil is not None:
        height = pil[0].height if height is None else height
        width = pil[0].width if width is None else width
        sized = [i if i.size == (width, height) else i.resize((width, height), Image.LANCZOS) for i in pil]
        return torch.cat([_to_tensor(i) for i in sized]), (height, width)
    if isinstance(image, np.ndarray) and image.ndim == 4:
        pixels = torch.cat([_to_tensor(i) for i in image])
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        pixels = _to_tensor(image)
    else:
        raise TypeError(f"image must be a PIL image, a uint8 array (H, W, 3) or a float tensor (N, 3, H, W) in "
                        f"[0, 1]; got {type(image).__name__}")
    height = pixels.shape[2] if height is None else height
    width = pixels.shape[3] if width is None else width
    return pixels, (height, width)


def _resize_nearest(x, height, width):
    """Arrays and tensors are resized as diffusers' processors do: F.interpolate, nearest."""
    if tuple(x.shape[2:]) == (height, width):
        return x
    return torch.nn.functional.interpolate(x, size=(height, width))


def _inpaint_mask(mask, height, width):
    """inpaint's `mask` -> float tensor (N, 1, height, width) of 0 and 1 (1 = repaint), as diffusers'
    mask processor: grey, resized (PIL: Lanczos; arrays, tensors: nearest), then >= 0.5 -> 1."""
    from PIL import Image
    if isinstance(mask, Image.Image):
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.LANCZOS)
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)[None, None]
    elif isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[..., 0]
        if mask.ndim != 2 or mask.dtype not in (np.uint8, np.bool_, np.float32, np.float64):
            raise ValueError(f"mask: an array mask must be (H, W) of uint8 (0-255), bool or float in [0, 1]; got "
                             f"{mask.shape} {mask.dtype}")
        m = torch.from_numpy(mask.astype(np.float32) / (255 if mask.dtype == np.uint8 else 1))[None, None]
    elif isinstance(mask, torch.Tensor):
        if mask.dtype == torch.bool:
            mask = mask.float()
        if not mask.is_floating_point() or mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
            raise ValueError(f"mask: a tensor mask must be float in [0, 1], (H, W), (N, H, W) or (N, 1, H, W); got "
                             f"{tuple(mask.shape)} {mask.dtype}")
        m = mask[None, None] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask
        m = m.float()
    else:
        raise TypeError(f"mask must be an image: a PIL image, a uint8 or bool array (H, W), or a float tensor "
                        f"(N, 1, H, W) in [0, 1] (white = repaint); got {type(mask).__name__}")
    m = _resize_nearest(m, height, width)
    return (m >= 0.5).float()


def main(argv=None):
    """`python -m minisd generate PROMPT --out FILE.png [...]`: one image from the terminal."""
    parser = argparse.ArgumentParser(prog="python -m minisd generate",
                                     description="Text to image, with the course model (default) or real SD 1.x/2.x "
                                                 "weights (--weights).")
    parser.add_argument("prompt")
    parser.add_argument("--weights", help="a diffusers folder or an SD 1.x/2.x .safetensors/.ckpt (default: the "
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
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the U-Net and VAE decoder first (pays off over many images, not one)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        _check_output(out)                       # before any work: a run must never end unable to write
        if args.guidance is not None and not math.isfinite(args.guidance):
            raise ValueError(f"--guidance {args.guidance}: the guidance scale must be a finite number "
                             "(1 or less turns guidance off; 4-8 is typical)")
        if args.weights:
            pipe = StableDiffusion.from_pretrained(args.weights, device=args.device, dtype=getattr(torch, args.dtype))
        else:
            pipe = StableDiffusion.course_model(device=args.device, dtype=getattr(torch, args.dtype))
        if args.compile:
            pipe.compile()
        image = pipe(args.prompt, negative_prompt=args.negative, height=args.size, width=args.size,
                     steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, seed=args.seed)[0]
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    paths.write_atomically(out, image.save)  # a temporary file, then renamed: never a half-written image
    print(f"wrote {out} ({image.width}x{image.height})")
    return 0


def _check_output(out):
    """--out must be writable, with an image extension PIL knows, before any sampling starts."""
    from PIL import Image
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: {out.suffix or 'no extension'} is not an image format; name it e.g. x.png")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist; create it first "
                         f"(mkdir -p {out.parent}) or write elsewhere")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"--out {out}: no permission to write there; choose another path")
