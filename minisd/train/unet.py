"""Training the course U-Net (chapter 9): `python -m minisd train unet`, sampling and judging it."""
import math

from .. import paths


def course_unet_config(context_dim):
    """The course U-Net (chapter 9): SD's U-Net code with small numbers, for 4x8x8 latents.

    Three levels (8x8 -> 4x4 -> 2x2), cross-attention to the text at every level, one
    ResNetBlock per down block; `context_dim` is the course text encoder's width.
    """
    from ..unet import UNetConfig
    return UNetConfig(block_channels=(32, 64, 64), cross_attention=(True, True, True), heads=(2, 4, 4),
                      layers_per_block=1, context_dim=context_dim, groups=8, sample_size=8)


def course_prompts():
    """The 90 course captions and "" (the empty prompt of caption dropout and guidance), in a fixed order."""
    from .. import data
    return [data.caption(*c) for c in data.combinations()] + [""]


def encode_course_data(vae, text_encoder, tokenizer, n=8000, seed=0, batch_size=500):
    """What the U-Net trains on, computed once with the frozen VAE and text encoder (chapter 9).

    n course images (never a `data.HELD_OUT` combination) -> latents (n, c, h, w) times
    `vae.scaling_factor` (the posterior means); every course prompt -> context (91, 77, D)
    (there are only 90 captions and "", so each is encoded once). Returns
    (latents, labels, contexts, prompts): labels (n,) index prompts/contexts.
    """
    import torch
    from .. import data
    images, captions = data.sample(n, seed=seed, exclude=data.HELD_OUT)
    prompts = course_prompts()
    with torch.no_grad():
        latents = torch.cat([vae.encode(data.to_tensor(images[i:i + batch_size])).mean
                             for i in range(0, n, batch_size)]) * vae.scaling_factor
        contexts = text_encoder(tokenizer(prompts))                       # (91, 77, D)
    index = {p: i for i, p in enumerate(prompts)}
    labels = torch.tensor([index[c] for c in captions])
    return latents, labels, contexts, prompts


def warmup_cosine(opt, steps):
    """The learning-rate schedule of the course's U-Net and LoRA training: a linear warm-up over
    the first 5 % of the steps, then a cosine decay to 0 at `steps`."""
    import torch
    warmup = max(steps // 20, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))


def train_unet_model(unet, latents, labels, contexts, prompts, steps=1500, batch_size=32, lr=4e-3,
                     drop=0.1, ema_decay=0.999, seed=0, progress=True, min_snr=None, clip_grad=None):
    """SD's U-Net training loop (chapter 9) on precomputed latents; returns (unet, ema, log).

    Each step: a batch of latents x0 and their captions, each caption replaced by "" with
    probability `drop` (SD 1.3+: 10 %), then `diffusion.training_loss`: noise x0 to a random
    t and regress the noise, ||eps - eps_theta(x_t, t, c)||^2. AdamW with a short warm-up and
    a cosine decay. `ema` is an exponential moving average of the weights (decay
    `ema_decay`); `log["loss"]` holds every step's loss. With `min_snr` = gamma, each sample's
    squared error is weighted min(SNR(t), gamma) / SNR(t) (Hang et al. 2023, min-SNR for
    epsilon prediction): the nearly clean timesteps, whose noise is easy to guess and whose
    gradients dominate, count less. `clip_grad` clips the gradient's global norm (a run with
    min-SNR on the saturating VAE's latents diverged at step ~750 without it).
    """
    import copy
    import torch
    from tqdm import tqdm
    from ..diffusion import drop_captions, training_loss
    g = torch.Generator().manual_seed(seed)
    index = {p: i for i, p in enumerate(prompts)}
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    log = {"loss": []}
    bar = tqdm(range(steps), desc="unet", disable=not progress)
    for step in bar:
        pick = torch.randint(0, len(latents), (batch_size,), generator=g)
        captions = drop_captions([prompts[k] for k in labels[pick].tolist()], drop, g)
        context = contexts[[index[c] for c in captions]]                  # (B, 77, D)
        loss = training_loss(unet, latents[pick], context, generator=g, min_snr_gamma=min_snr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), clip_grad)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))  # a short memory while the weights move fast
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        log["loss"].append(loss.item())
        if step % 50 == 0 or step == steps - 1:  # the last redraw shows the final mean
            bar.set_postfix(loss=f"{sum(log['loss'][-50:]) / len(log['loss'][-50:]):.4f}")
    return unet.eval(), ema, log


# The sampling settings `train unet` judges with and first stores in the checkpoint's metadata:
# provisional. `python -m minisd evaluate --set-default` then measures the guidance scales and
# stores the chosen one (evaluate.DEFAULT_CRITERION) in the checkpoint, from which the pipeline
# and `course_sampling()` read them.
COURSE_SAMPLING = {"sampler": "ddim", "steps": 25, "guidance": 4.0}


def course_sampling():
    """The course U-Net's recommended sampling settings, read from data/course_unet.safetensors
    (COURSE_SAMPLING while no checkpoint exists yet)."""
    from ..checkpoint import COURSE_FILES, sampling_settings
    from ..paths import DATA_DIR
    path = DATA_DIR / COURSE_FILES["unet"]
    return (sampling_settings(path) if path.exists() else None) or dict(COURSE_SAMPLING)


def sample_course_latents(unet, cond, uncond, steps=None, guidance=None, scheduler=None, seed=0):
    """Latents from noise with classifier-free guidance (chapter 10's loop, for evaluation here).

    cond (B, 77, D) the prompts' contexts, uncond (1, 77, D) the context of "". Each step
    runs the U-Net once on the batch [uncond, cond] and mixes eps_u + guidance (eps_c - eps_u):
    `pipeline.denoise`, the pipeline's own loop. Settings left None: `course_sampling()`'s.
    """
    import torch
    default = course_sampling()
    steps = default["steps"] if steps is None else steps
    guidance = default["guidance"] if guidance is None else guidance
    scheduler = default["sampler"] if scheduler is None else scheduler
    from ..pipeline import denoise
    from ..schedulers import make_scheduler
    c, size = unet.config.in_channels, unet.config.sample_size
    b = len(cond)
    sched = make_scheduler(scheduler)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, c, size, size), generator=g) * sched.init_noise_sigma
    context = torch.cat([uncond.expand(b, -1, -1), cond])                # (2B, 77, D)
    with torch.no_grad():
        return denoise(unet, x, context, sched, guidance=guidance, generator=g)


def judge_course_unet(unet, vae, contexts, prompts, judge, combos, seeds=(0,), steps=None, guidance=None,
                      scheduler=None):
    """Generate one image per (combination, seed) and let the judge read colour, shape and position
    (sampling settings left None: `course_sampling()`'s).

    Returns (accuracy dict from `Judge.accuracy`, uint8 images, captions)."""
    import numpy as np
    import torch
    from .. import data
    index = {p: i for i, p in enumerate(prompts)}
    captions = [data.caption(*c) for c in combos]
    images = []
    for seed in seeds:
        cond = contexts[[index[c] for c in captions]]
        x = sample_course_latents(unet, cond, contexts[index[""]][None], steps, guidance, scheduler, seed)
        with torch.no_grad():
            images.append(data.to_uint8(vae.decode(x / vae.scaling_factor)))
    images = np.concatenate(images)
    captions = captions * len(seeds)
    return judge.accuracy(images, captions), images, captions


def cli_unet(argv):
    """python -m minisd train unet [--steps N] [--out PATH] [--seed S] ..."""
    import argparse
    import json
    import time
    from pathlib import Path
    import torch
    from .. import data
    from ..checkpoint import save_checkpoint
    from ..metrics import Judge
    from ..paths import DATA_DIR
    from ..unet import UNet
    p = argparse.ArgumentParser(prog="python -m minisd train unet",
                                description="Train the course U-Net (chapter 9) on latents of the frozen course VAE, "
                                            "conditioned on the frozen course CLIP text encoder; write "
                                            "data/course_unet.safetensors and data/course_unet_log.json.")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--images", type=int, default=8000, help="size of the fixed pool of training images")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weighting (default 5; 0: plain MSE)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="clip the gradient's global norm (default 1; 0: off)")
    p.add_argument("--width", default=None, help="block channels, e.g. 48,96,96 (default 32,64,64)")
    p.add_argument("--vae", type=Path, default=None, help="VAE checkpoint (default data/course_vae.safetensors)")
    p.add_argument("--no-judge", action="store_true", help="skip the learned judge's evaluation; save the EMA")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=DATA_DIR / "course_unet.safetensors")
    p.add_argument("--log", type=Path, default=None, help="loss log (default: OUT with _log.json)")
    args = p.parse_args(argv)
    command = "python -m minisd train unet " + " ".join(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae, text_encoder, tokenizer = frozen_course_models(args.vae)
    t0, c0 = time.time(), time.process_time()
    latents, labels, contexts, prompts = encode_course_data(vae, text_encoder, tokenizer, args.images, args.seed)
    config = course_unet_config(contexts.shape[-1])
    if args.width:
        config = dataclasses.replace(config, block_channels=tuple(int(c) for c in args.width.split(",")))
    unet = UNet(config)
    unet, ema, log = train_unet_model(unet, latents, labels, contexts, prompts, args.steps, args.batch_size,
                                      args.lr, ema_decay=args.ema_decay, seed=args.seed, min_snr=args.min_snr or None,
                                      clip_grad=args.clip_grad or None)
    wall, cpu = time.time() - t0, time.process_time() - c0
    if args.no_judge:
        save_course_unet(ema, args.out, {"command": command, "weights": "ema", "sampler": "ddim", "steps": "25",
                                         "guidance": "4.0", "train_wall_seconds": f"{wall:.0f}",
                                         "train_cpu_seconds": f"{cpu:.0f}", "threads": str(args.threads)})
        log_path = args.log or args.out.with_name(args.out.stem + "_log.json")
        paths.write_text(log_path, json.dumps({"command": command, "train_wall_seconds": round(wall),
                                        "train_cpu_seconds": round(cpu), "loss": [round(v, 5) for v in log["loss"]]}))
        print(f"trained in {wall:.0f} s wall ({cpu:.0f} s CPU); wrote {args.out} (ema weights)")
        return 0
    # the judge decides whether the moving average beats the last weights (same prompts, same noise)
    judge = Judge.load()
    settings = {"steps": COURSE_SAMPLING["steps"], "guidance": COURSE_SAMPLING["guidance"],
                "scheduler": COURSE_SAMPLING["sampler"]}
    train_combos = [c for c in data.combinations() if c not in data.HELD_OUT]
    score = {name: judge_course_unet(model, vae, contexts, prompts, judge, train_combos, seeds=(100,), **settings)[0]
             for name, model in (("last", unet), ("ema", ema))}
    best = "ema" if score["ema"]["all"] >= score["last"]["all"] else "last"
    model = ema if best == "ema" else unet
    seen = judge_course_unet(model, vae, contexts, prompts, judge, data.combinations(), seeds=(0, 1, 2), **settings)[0]
    held = judge_course_unet(model, vae, contexts, prompts, judge, data.HELD_OUT, seeds=tuple(range(10)), **settings)[0]
    real_images, real_captions = data.sample(1000, seed=12345)
    real = judge.accuracy(real_images, real_captions)
    as_float = lambda acc: {k: round(float(v), 4) for k, v in acc.items()}  # noqa: E731
    evaluation = {**COURSE_SAMPLING,
                  "last_vs_ema": {k: as_float(v) for k, v in score.items()}, "saved": best,
                  "all_90_combinations_x3_seeds": as_float(seen), "held_out_x10_seeds": as_float(held),
                  "judge_on_1000_real_images": as_float(real)}
    save_checkpoint(args.out, model, sampling=COURSE_SAMPLING,
                    metadata={"command": command, "weights": best, "train_wall_seconds": f"{wall:.0f}",
                              "train_cpu_seconds": f"{cpu:.0f}", "threads": str(args.threads)})
    log_path = args.log or args.out.with_name(args.out.stem + "_log.json")
    paths.write_text(log_path, json.dumps({"command": command, "steps": args.steps, "batch_size": args.batch_size,
                                    "lr": args.lr, "images": args.images, "ema_decay": args.ema_decay,
                                    "train_wall_seconds": round(wall), "train_cpu_seconds": round(cpu),
                                    "threads": args.threads, "evaluation": evaluation,
                                    "loss": [round(v, 5) for v in log["loss"]]}))
    print(json.dumps(evaluation, indent=1))
    print(f"trained in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} threads); wrote {args.out} ({best} weights) "
          f"and {log_path}")
    return 0


def frozen_course_models(vae_path=None):
    """The course VAE (or the one at `vae_path`), text encoder and tokenizer from data/, frozen:
    SD trains only the U-Net."""
    from ..checkpoint import course_text_encoder, course_vae
    from ..tokenizer import CLIPTokenizer
    vae = course_vae(vae_path).eval().requires_grad_(False)
    text_encoder = course_text_encoder().eval().requires_grad_(False)
    return vae, text_encoder, CLIPTokenizer.sd15()
