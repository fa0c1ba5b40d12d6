"""`python -m minisd train vae|clip|unet|lora`: reproduce the checkpoints in data/.

Each trainer draws the course data (`minisd.data`), shows a tqdm bar, logs its losses and
writes a safetensors file whose metadata records the command that made it.
"""
import dataclasses
import math
import sys

# --- VAE (chapter 6) ---------------------------------------------------------------------------
def train_vae_model(config=None, steps=1500, batch_size=16, lr=3e-3, seed=0, l1_weight=1.0, fg_boost=4.0,
                    perceptual_weight=0.5, kl_weight=1e-6, disc_start=None, disc_weight=0.5,
                    vq_codes=None, logvar_init=-6.0, n_train=20000, log_every=25, progress=True,
                    images=None, eval_images=None):
    """Train an AutoencoderKL on course images with chapter 6's objective; returns (model, log).

    Per step: l1_weight * L1 (shape pixels weighted 1 + fg_boost) + perceptual_weight * LPIPS-form
    distance (RandomFeatures) + kl_weight * KL, and after `disc_start` steps the PatchGAN
    term with LDM's adaptive weight; then one discriminator step on the hinge loss. With
    `vq_codes` the latents go through a VectorQuantizer instead of being sampled (no KL).
    `log` holds each term's value every `log_every` steps and the held-out PSNR, and
    `log["discriminator"]` the PatchGAN, `log["quantizer"]` the VectorQuantizer (or None).
    """
    import torch
    from tqdm import tqdm
    from . import data, losses
    from .vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    config = config or VAEConfig.course()
    model = AutoencoderKL(config)
    with torch.no_grad():  # start the posterior narrow, std e^(logvar_init / 2): chapter 6 says why
        model.quant_conv.bias[config.latent_channels:] = logvar_init
    if images is None:
        images, _ = data.sample(n_train, seed=seed, exclude=data.HELD_OUT)
    train = data.to_tensor(images)
    held_out = held_out_images() if eval_images is None else eval_images
    params = list(model.parameters())
    vq = None
    if vq_codes:
        vq = losses.VectorQuantizer(vq_codes, config.latent_channels)
        params += list(vq.parameters())
    opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))  # the LDM recipe's betas
    # cosine decay to 0: the last steps polish the edges of the shapes
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    perceptual = None
    if perceptual_weight:
        feats = losses.RandomFeatures(channels=(32, 64, 128), seed=0)
        perceptual = losses.PerceptualLoss(feats, feats.channels)
    disc = d_opt = None
    if disc_start is not None:
        disc = losses.PatchDiscriminator(config.in_channels, width=32, n_layers=2)
        d_opt = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(seed)
    log = {k: [] for k in ("step", "l1", "perceptual", "reg", "g", "d", "psnr")}
    acc = {k: 0.0 for k in ("l1", "perceptual", "reg", "g", "d")}
    bar = tqdm(range(1, steps + 1), desc="train vae", disable=not progress)
    for step in bar:
        x = train[torch.randint(len(train), (batch_size,), generator=gen)]
        post = model.encode(x)
        if vq is not None:
            z, reg, _ = vq(post.mean)
        else:
            z, reg = post.sample(gen), losses.kl_loss(post)
        rec = model.decode(z)
        l1 = losses.l1_loss(x, rec, losses.foreground_weight(x, fg_boost)).mean()
        p = perceptual(x, rec).mean() if perceptual is not None else torch.zeros(())
        nll = l1_weight * l1 + perceptual_weight * p
        loss = nll + (reg if vq is not None else kl_weight * reg)
        g = d = torch.zeros(())
        if disc is not None and step >= disc_start:
            g = losses.generator_adv_loss(disc(rec))
            w = losses.adaptive_weight(nll, g, model.decoder.out.conv.weight, disc_weight)
            loss = loss + w * g
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if disc is not None and step >= disc_start:
            d = losses.hinge_d_loss(disc(x), disc(rec.detach()))
            d_opt.zero_grad(set_to_none=True)
            d.backward()
            d_opt.step()
        for k, v in (("l1", l1), ("perceptual", p), ("reg", reg), ("g", g), ("d", d)):
            acc[k] += v.item()
        if step % log_every == 0 or step == steps:
            n = step - (log["step"][-1] if log["step"] else 0)  # steps since the last entry
            log["step"].append(step)
            for k in acc:
                log[k].append(acc[k] / n)
                acc[k] = 0.0
            log["psnr"].append(held_out_psnr(model, held_out, vq))
            bar.set_postfix(l1=f"{log['l1'][-1]:.4f}", psnr=f"{log['psnr'][-1]:.1f}")
    model.eval()
    log["discriminator"] = disc.eval() if disc is not None else None
    log["quantizer"] = vq
    return model, log


def held_out_images(n=256, seed=1):
    """The VAE's test images: n course images of the 9 held-out (colour, shape, position) combinations."""
    from . import data
    images, _ = data.sample(n, seed=seed, only=data.HELD_OUT)
    return data.to_tensor(images)


def held_out_psnr(model, images, vq=None):
    """Mean PSNR (dB) of the reconstructions decode(mode(encode(x))) of `images`."""
    import torch
    from . import losses
    with torch.no_grad():
        z = model.encode(images).mode()
        if vq is not None:
            z = vq(z)[0]
        return losses.psnr(images, model.decode(z).clamp(-1, 1)).mean().item()


def latent_scale(model, images):
    """The seed's rescaling: 1 / std of the latents of a first batch (SD 1.5's is 0.18215)."""
    import torch
    with torch.no_grad():
        z = model.encode(images).sample(torch.Generator().manual_seed(0))
    return 1.0 / z.std().item()


def vae_sweep(factors=(1, 2, 4, 8), channels=(2, 8), steps=100, batch_size=8, seed=0, progress=True):
    """The f/c table of the LDM paper on course data: PSNR after the same short budget."""
    import time
    from .vae import VAEConfig
    held_out = held_out_images(128)
    rows = []
    for f in factors:
        widths = (16, 32, 32, 32)[: int(math.log2(f)) + 1]  # one block per halving, same widths
        for c in channels:
            config = VAEConfig(block_out_channels=widths, layers_per_block=1, latent_channels=c,
                               norm_groups=8, scaling_factor=1.0, sample_size=32)
            t0 = time.process_time()
            _, log = train_vae_model(config, steps=steps, batch_size=batch_size, seed=seed,
                                     perceptual_weight=0.0, log_every=max(steps // 5, 1), lr=3e-3,
                                     n_train=4000, eval_images=held_out, progress=False)
            rows.append({"f": f, "c": c, "latent_shape": [c, 32 // f, 32 // f], "psnr": round(log["psnr"][-1], 2),
                         "psnr_curve": [round(v, 2) for v in log["psnr"]], "curve_steps": log["step"],
                         "cpu_seconds": round(time.process_time() - t0, 1)})
            if progress:
                print(f"f={f} c={c:2d} latent {c}x{32 // f}x{32 // f}: PSNR {rows[-1]['psnr']:.2f} dB", flush=True)
    return rows


def cli_vae(argv):
    """python -m minisd train vae [--steps N] [--out PATH] [--seed S] [--sweep]"""
    import argparse
    import json
    import time
    import torch
    from . import DATA_DIR, data
    from .weights import save_course_vae
    p = argparse.ArgumentParser(prog="python -m minisd train vae",
                                description="Train the course VAE (chapter 6) and write data/course_vae.safetensors.")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disc-start", type=int, default=None,
                   help="step at which the PatchGAN term starts (default: 3/4 of --steps)")
    p.add_argument("--out", default=None, help="checkpoint path (default data/course_vae.safetensors; "
                   "with --sweep, data/vae_fc_sweep.json)")
    p.add_argument("--sweep", action="store_true", help="the f/c table instead: PSNR vs f and c, equal budgets")
    p.add_argument("--sweep-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a 2-core machine shared with other work, 2 threads "
                        "ran a step of this small model ~10x slower than 1)")
    args = p.parse_args(argv)
    command = " ".join(["python -m minisd train vae", *argv])
    torch.set_num_threads(args.threads)
    if args.sweep:
        out = args.out or DATA_DIR / "vae_fc_sweep.json"
        t0 = time.time()
        rows = vae_sweep(steps=args.sweep_steps, seed=args.seed)
        with open(out, "w") as f:
            json.dump({"command": command, "steps": args.sweep_steps, "batch_size": 8,
                       "objective": "foreground-weighted L1 + 1e-6 KL", "rows": rows}, f, indent=1)
        print(f"wrote {out} ({time.time() - t0:.0f} s)")
        return 0
    out = args.out or DATA_DIR / "course_vae.safetensors"
    disc_start = args.disc_start if args.disc_start is not None else args.steps * 3 // 4
    t0, c0 = time.time(), time.process_time()
    model, log = train_vae_model(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                 disc_start=disc_start, log_every=100)
    wall, cpu = time.time() - t0, time.process_time() - c0
    for i in range(0, len(log["step"]), max(len(log["step"]) // 12, 1)):
        print(f"step {log['step'][i]:5d}  l1 {log['l1'][i]:.4f}  perceptual {log['perceptual'][i]:.4f}  "
              f"kl {log['reg'][i]:8.1f}  g {log['g'][i]:+.3f}  d {log['d'][i]:.3f}  held-out PSNR {log['psnr'][i]:.2f}")
    first, _ = data.sample(64, seed=args.seed + 7, exclude=data.HELD_OUT)
    scale = latent_scale(model, data.to_tensor(first))
    model.config = dataclasses.replace(model.config, scaling_factor=round(scale, 5))
    held_out = held_out_images()
    with torch.no_grad():
        z_std = (model.encode(held_out).sample(torch.Generator().manual_seed(1)) * model.scaling_factor).std().item()
    psnr = log["psnr"][-1]
    save_course_vae(model, out, {"command": command, "scaling_factor": f"{scale:.5f}",
                                 "held_out_psnr_db": f"{psnr:.2f}", "rescaled_latent_std": f"{z_std:.3f}",
                                 "train_wall_seconds": f"{wall:.0f}", "train_cpu_seconds": f"{cpu:.0f}",
                                 "threads": str(args.threads)})
    print(f"held-out PSNR {psnr:.2f} dB; scaling_factor 1/std = {scale:.5f}; rescaled held-out latents std {z_std:.3f}")
    print(f"trained in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} thread(s)); wrote {out}")
    return 0


# --- CLIP (chapter 8) --------------------------------------------------------------------------
def train_clip_model(config=None, steps=300, batch_size=64, lr=2e-3, seed=0, n_train=20000,
                     log_every=25, progress=True):
    """Train the course CLIP (chapter 8) contrastively on course images; returns (model, log).

    Each step draws `batch_size` different training captions (CLIP's loss assumes no two
    captions of a batch are the same; there are 81 once the 9 held-out combinations are
    removed) and one image of each, then takes an Adam step on `losses.clip_loss`. The
    learning rate warms up for 5 % of the steps and decays along a cosine. `log` holds the
    mean loss and the temperature every `log_every` steps.
    """
    import torch
    from tqdm import tqdm
    from . import data, losses
    from .clip import CLIP, CLIPConfig
    from .tokenizer import CLIPTokenizer

    torch.manual_seed(seed)
    model = CLIP(config or CLIPConfig.course())
    images, captions = data.sample(n_train, seed=seed, exclude=data.HELD_OUT)
    x = data.to_tensor(images)
    names = sorted(set(captions))
    if batch_size > len(names):
        raise ValueError(f"batch_size {batch_size} > {len(names)} different training captions")
    ids = CLIPTokenizer.sd15()(names)                                     # (81, 77)
    label = {c: i for i, c in enumerate(names)}
    by_caption = [[] for _ in names]
    for i, c in enumerate(captions):
        by_caption[label[c]].append(i)
    by_caption = [torch.tensor(v) for v in by_caption]
    g = torch.Generator().manual_seed(seed)
    # the captions use about 30 of the 49,408 rows of the token table: a sparse gradient and
    # SparseAdam update just those rows, where Adam would rewrite all 3.2M numbers every step
    table = model.text.embeddings.token_embedding
    table.sparse = True
    rest = [p for p in model.parameters() if p is not table.weight]
    opts = [torch.optim.Adam(rest, lr=lr), torch.optim.SparseAdam([table.weight], lr=lr)]
    warmup = max(1, steps // 20)
    scheds = [torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))) for opt in opts]
    log = {"step": [], "loss": [], "scale": []}
    total = 0.0
    bar = tqdm(range(1, steps + 1), desc="train clip", disable=not progress)
    for step in bar:
        pick = torch.randperm(len(names), generator=g)[:batch_size]       # different captions
        rows = torch.stack([by_caption[k][torch.randint(len(by_caption[k]), (), generator=g)] for k in pick.tolist()])
        loss = losses.clip_loss(model(x[rows], ids[pick]))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt, sched in zip(opts, scheds):
            opt.step()
            sched.step()
        total += loss.item()
        if step % log_every == 0:
            log["step"].append(step)
            log["loss"].append(total / log_every)
            log["scale"].append(model.scale().item())
            bar.set_postfix(loss=f"{total / log_every:.3f}", scale=f"{model.scale().item():.1f}")
            total = 0.0
    table.sparse = False
    return model.eval(), log


def clip_zero_shot_accuracy(model, images, captions):
    """Zero-shot classification of course images (chapter 8): each image gets the one of the 90
    course captions whose embedding is closest to its own; returns the fraction of images whose
    colour, shape, position (and whole caption) that caption gets right."""
    import torch
    from . import data
    from .tokenizer import CLIPTokenizer
    prompts = [data.caption(*c) for c in data.combinations()]
    pred = model.classify(data.to_tensor(images), CLIPTokenizer.sd15()(prompts))
    guesses = [data.parse(prompts[k]) for k in pred.tolist()]
    truths = [data.parse(c) for c in captions]
    acc = {name: sum(g[i] == t[i] for g, t in zip(guesses, truths)) / len(truths)
           for i, name in enumerate(("colour", "shape", "position"))}
    acc["caption"] = sum(g == t for g, t in zip(guesses, truths)) / len(truths)
    return acc


def clip_test_sets(n=900, seed=1000):
    """The course CLIP's test images: new drawings of the 81 training combinations, and of the
    9 held-out combinations neither encoder ever saw. {name: (images, captions)}."""
    from . import data
    return {"seen combinations": data.sample(n, seed=seed, exclude=data.HELD_OUT),
            "held-out combinations": data.sample(n, seed=seed + 1, only=data.HELD_OUT)}


def cli_clip(argv):
    """python -m minisd train clip [--steps N] [--out PATH] [--seed S] ..."""
    import argparse
    import json
    import time
    from pathlib import Path
    import torch
    from . import DATA_DIR
    from .weights import save_course_clip
    p = argparse.ArgumentParser(prog="python -m minisd train clip",
                                description="Train the course CLIP (chapter 8): a small CLIPTextEncoder with SD's "
                                            "real tokenizer and a small conv image encoder, contrastively, on "
                                            "course images; write data/course_clip.safetensors (float16).")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--images", type=int, default=20000, help="size of the fixed pool of training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=DATA_DIR / "course_clip.safetensors")
    args = p.parse_args(argv)
    command = " ".join(["python -m minisd train clip", *argv])
    torch.set_num_threads(args.threads)
    t0, c0 = time.time(), time.process_time()
    model, log = train_clip_model(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                  n_train=args.images)
    wall, cpu = time.time() - t0, time.process_time() - c0
    for k in range(0, len(log["step"]), max(1, len(log["step"]) // 8)):
        print(f"step {log['step'][k]:5d}  loss {log['loss'][k]:.4f}  scale {log['scale'][k]:.1f}")
    save_course_clip(model, args.out, {"command": command, "train_wall_seconds": f"{wall:.0f}",
                                       "train_cpu_seconds": f"{cpu:.0f}", "threads": str(args.threads),
                                       "final_loss": f"{log['loss'][-1]:.4f}"})
    from .clip import CLIP
    shipped = CLIP.course(args.out)  # evaluate what was written (float16 weights)
    results = {name: clip_zero_shot_accuracy(shipped, *test) for name, test in clip_test_sets().items()}
    print(json.dumps({k: {a: round(v, 4) for a, v in r.items()} for k, r in results.items()}, indent=1))
    print(f"trained in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} threads); "
          f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


# --- U-Net (chapter 9) -------------------------------------------------------------------------
def course_unet_config(context_dim):
    """The course U-Net (chapter 9): SD's U-Net code with small numbers, for 4x8x8 latents.

    Three levels (8x8 -> 4x4 -> 2x2), cross-attention to the text at every level, one
    ResNetBlock per down block; `context_dim` is the course text encoder's width.
    """
    from .unet import UNetConfig
    return UNetConfig(block_channels=(32, 64, 64), cross_attention=(True, True, True), heads=(2, 4, 4),
                      layers_per_block=1, context_dim=context_dim, groups=8, sample_size=8)


def course_prompts():
    """The 90 course captions and "" (the empty prompt of caption dropout and guidance), in a fixed order."""
    from . import data
    return [data.caption(*c) for c in data.combinations()] + [""]


def encode_course_data(vae, text_encoder, tokenizer, n=8000, seed=0, batch_size=500):
    """What the U-Net trains on, computed once with the frozen VAE and text encoder (chapter 9).

    n course images (never a `data.HELD_OUT` combination) -> latents (n, c, h, w) times
    `vae.scaling_factor` (the posterior means); every course prompt -> context (91, 77, D)
    (there are only 90 captions and "", so each is encoded once). Returns
    (latents, labels, contexts, prompts): labels (n,) index prompts/contexts.
    """
    import torch
    from . import data
    images, captions = data.sample(n, seed=seed, exclude=data.HELD_OUT)
    prompts = course_prompts()
    with torch.no_grad():
        latents = torch.cat([vae.encode(data.to_tensor(images[i:i + batch_size])).mean
                             for i in range(0, n, batch_size)]) * vae.scaling_factor
        contexts = text_encoder(tokenizer(prompts))                       # (91, 77, D)
    index = {p: i for i, p in enumerate(prompts)}
    labels = torch.tensor([index[c] for c in captions])
    return latents, labels, contexts, prompts


def train_unet_model(unet, latents, labels, contexts, prompts, steps=1500, batch_size=32, lr=4e-3,
                     drop=0.1, ema_decay=0.999, seed=0, progress=True):
    """SD's U-Net training loop (chapter 9) on precomputed latents; returns (unet, ema, log).

    Each step: a batch of latents x0 and their captions, each caption replaced by "" with
    probability `drop` (SD 1.3+: 10 %), then `diffusion.training_loss`: noise x0 to a random
    t and regress the noise, ||eps - eps_theta(x_t, t, c)||^2. AdamW with a short warm-up and
    a cosine decay. `ema` is an exponential moving average of the weights (decay
    `ema_decay`); `log["loss"]` holds every step's loss.
    """
    import copy
    import torch
    from tqdm import tqdm
    from .diffusion import drop_captions, training_loss
    g = torch.Generator().manual_seed(seed)
    index = {p: i for i, p in enumerate(prompts)}
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    log = {"loss": []}
    bar = tqdm(range(steps), desc="unet", disable=not progress)
    for step in bar:
        pick = torch.randint(0, len(latents), (batch_size,), generator=g)
        captions = drop_captions([prompts[k] for k in labels[pick].tolist()], drop, g)
        context = contexts[[index[c] for c in captions]]                  # (B, 77, D)
        loss = training_loss(unet, latents[pick], context, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))  # a short memory while the weights move fast
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        log["loss"].append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(log['loss'][-50:]) / len(log['loss'][-50:]):.4f}")
    return unet.eval(), ema, log


def sample_course_latents(unet, cond, uncond, steps=25, guidance=4.0, scheduler="ddim", seed=0):
    """Latents from noise with classifier-free guidance (chapter 10's loop, for evaluation here).

    cond (B, 77, D) the prompts' contexts, uncond (1, 77, D) the context of "". Each step
    runs the U-Net once on the batch [uncond, cond] and mixes eps_u + guidance (eps_c - eps_u).
    """
    import torch
    from .schedulers import make_scheduler
    c, size = unet.config.in_channels, unet.config.sample_size
    b = len(cond)
    sched = make_scheduler(scheduler)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, c, size, size), generator=g) * sched.init_noise_sigma
    context = torch.cat([uncond.expand(b, -1, -1), cond])                # (2B, 77, D)
    with torch.no_grad():
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t)
            eps_u, eps_c = unet(torch.cat([xin, xin]), t, context).chunk(2)
            x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x, g)
    return x


def judge_course_unet(unet, vae, contexts, prompts, judge, combos, seeds=(0,), steps=25, guidance=4.0,
                      scheduler="ddim"):
    """Generate one image per (combination, seed) and let the judge read colour, shape and position.

    Returns (accuracy dict from `Judge.accuracy`, uint8 images, captions)."""
    import numpy as np
    import torch
    from . import data
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


def save_course_unet(unet, path, metadata):
    """Write a U-Net (our keys, fp32) to safetensors with its config in the metadata."""
    import json
    from safetensors.torch import save_file
    meta = {**metadata, "config": json.dumps(dataclasses.asdict(unet.config))}
    save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, str(path), metadata=meta)


def cli_unet(argv):
    """python -m minisd train unet [--steps N] [--out PATH] [--seed S] ..."""
    import argparse
    import json
    import time
    from pathlib import Path
    import torch
    from . import DATA_DIR, data
    from .metrics import Judge
    from .unet import UNet
    p = argparse.ArgumentParser(prog="python -m minisd train unet",
                                description="Train the course U-Net (chapter 9) on latents of the frozen course VAE, "
                                            "conditioned on the frozen course CLIP text encoder; write "
                                            "data/course_unet.safetensors and data/course_unet_log.json.")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--images", type=int, default=8000, help="size of the fixed pool of training images")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=DATA_DIR / "course_unet.safetensors")
    p.add_argument("--log", type=Path, default=None, help="loss log (default: OUT with _log.json)")
    args = p.parse_args(argv)
    command = "python -m minisd train unet " + " ".join(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae, text_encoder, tokenizer = _frozen_course_models()
    t0, c0 = time.time(), time.process_time()
    latents, labels, contexts, prompts = encode_course_data(vae, text_encoder, tokenizer, args.images, args.seed)
    unet = UNet(course_unet_config(contexts.shape[-1]))
    unet, ema, log = train_unet_model(unet, latents, labels, contexts, prompts, args.steps, args.batch_size,
                                      args.lr, ema_decay=args.ema_decay, seed=args.seed)
    wall, cpu = time.time() - t0, time.process_time() - c0
    # the judge decides whether the moving average beats the last weights (same prompts, same noise)
    judge = Judge.load()
    train_combos = [c for c in data.combinations() if c not in data.HELD_OUT]
    score = {name: judge_course_unet(model, vae, contexts, prompts, judge, train_combos, seeds=(100,))[0]
             for name, model in (("last", unet), ("ema", ema))}
    best = "ema" if score["ema"]["all"] >= score["last"]["all"] else "last"
    model = ema if best == "ema" else unet
    seen = judge_course_unet(model, vae, contexts, prompts, judge, data.combinations(), seeds=(0, 1, 2))[0]
    held = judge_course_unet(model, vae, contexts, prompts, judge, data.HELD_OUT, seeds=tuple(range(10)))[0]
    real_images, real_captions = data.sample(1000, seed=12345)
    real = judge.accuracy(real_images, real_captions)
    as_float = lambda acc: {k: round(float(v), 4) for k, v in acc.items()}  # noqa: E731
    evaluation = {"sampler": "ddim", "steps": 25, "guidance": 4.0,
                  "last_vs_ema": {k: as_float(v) for k, v in score.items()}, "saved": best,
                  "all_90_combinations_x3_seeds": as_float(seen), "held_out_x10_seeds": as_float(held),
                  "judge_on_1000_real_images": as_float(real)}
    save_course_unet(model, args.out, {"command": command, "weights": best, "sampler": "ddim", "steps": "25",
                                       "guidance": "4.0", "train_wall_seconds": f"{wall:.0f}",
                                       "train_cpu_seconds": f"{cpu:.0f}", "threads": str(args.threads)})
    log_path = args.log or args.out.with_name(args.out.stem + "_log.json")
    log_path.write_text(json.dumps({"command": command, "steps": args.steps, "batch_size": args.batch_size,
                                    "lr": args.lr, "images": args.images, "ema_decay": args.ema_decay,
                                    "train_wall_seconds": round(wall), "train_cpu_seconds": round(cpu),
                                    "threads": args.threads, "evaluation": evaluation,
                                    "loss": [round(v, 5) for v in log["loss"]]}))
    print(json.dumps(evaluation, indent=1))
    print(f"trained in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} threads); wrote {args.out} ({best} weights) "
          f"and {log_path}")
    return 0


def _frozen_course_models():
    """The course VAE, text encoder and tokenizer from data/, frozen: SD trains only the U-Net."""
    from .clip import CLIPTextEncoder
    from .tokenizer import CLIPTokenizer
    from .vae import AutoencoderKL
    vae = AutoencoderKL.course().eval().requires_grad_(False)
    text_encoder = CLIPTextEncoder.course().eval().requires_grad_(False)
    return vae, text_encoder, CLIPTokenizer.sd15()


# --- LoRA (chapter 13) -------------------------------------------------------------------------


# --- command line --------------------------------------------------------------------------------
def main(argv):
    # each trainer adds itself here: "name": function taking the remaining argv
    trainers = {}
    trainers["vae"] = cli_vae
    trainers["clip"] = cli_clip
    trainers["unet"] = cli_unet
    if not argv or argv[0] not in trainers:
        print(f"usage: python -m minisd train {{{'|'.join(trainers) or 'vae|clip|unet|lora'}}} [--help]",
              file=sys.stderr)
        return 2
    return trainers[argv[0]](argv[1:])
