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
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")


def concept_prompts(concept):
    """The 15 captions of a new colour (data.NEW_COLOURS), in data.concept_combinations' order."""
    from . import data
    return [data.caption(*c) for c in data.concept_combinations(concept)]


def lora_judge(concept="orange"):
    """The judge of chapter 13: the course judge with the palette data.COLOURS + the new colour,
    used for the base model and the LoRA alike, on old prompts and new."""
    from . import data
    from .metrics import Judge
    return Judge.load(colours={**data.COLOURS, concept: data.NEW_COLOURS[concept]})


def encode_concept_data(vae, text_encoder, tokenizer, concept="orange", n_new=2000, n_old=4000, seed=0,
                        batch_size=500):
    """What the LoRA trains on, encoded once with the frozen VAE and text encoder (chapter 13).

    n_new images of the new colour (all 15 of its combinations) and n_old course images (the
    replay set: never a data.HELD_OUT combination), as scaled latents. Returns
    (latents, labels, contexts, prompts, is_new): prompts = the 90 course captions, "" and the
    15 new ones; labels (n_new + n_old,) index prompts/contexts; is_new (n,) bool.
    """
    import torch
    from . import data
    new_images, new_captions = data.sample(n_new, seed=seed + 13, only=data.concept_combinations(concept))
    old_images, old_captions = data.sample(n_old, seed=seed + 14, exclude=data.HELD_OUT)
    import numpy as np
    images = np.concatenate([new_images, old_images])
    captions = new_captions + old_captions
    prompts = course_prompts() + concept_prompts(concept)
    with torch.no_grad():
        latents = torch.cat([vae.encode(data.to_tensor(images[i:i + batch_size])).mean
                             for i in range(0, len(images), batch_size)]) * vae.scaling_factor
        contexts = text_encoder(tokenizer(prompts))                       # (106, 77, D)
    index = {p: i for i, p in enumerate(prompts)}
    labels = torch.tensor([index[c] for c in captions])
    is_new = torch.arange(len(captions)) < n_new
    return latents, labels, contexts, prompts, is_new


def train_lora(unet, vae, text_encoder, tokenizer, concept="orange", rank=4, alpha=None, steps=800, batch_size=32,
               lr=1e-2, seed=0, targets=LORA_TARGETS, only_cross=True, replay=0.25, drop=0.1, n_new=2000, n_old=4000,
               late=0.0, progress=True, encoded=None):
    """Teach the course U-Net a colour it never saw with a LoRA (chapter 13); returns (unet, log).

    `unet` gets LoRALinear layers (rank, alpha) on the `targets` projections; everything
    else is frozen, so only the LoRA factors train. Each step draws a batch of which a
    fraction `replay` are old course images with their captions (so the old prompts are
    not forgotten) and the rest images of the new colour, drops 10 % of the captions to ""
    (as the base model trained, for guidance), and takes an AdamW step on SD's loss
    ||eps - eps_theta(x_t, t, c)||^2. The learning rate warms up for 5 % of the steps and
    decays along a cosine. `late` is the fraction of each batch whose timesteps are drawn
    from the noisier half [T/2, T) instead of all of [0, T) (diffusers' "timestep bias"
    towards later steps: a colour is decided early in sampling, at high noise; on orange it
    did not help: 43 % vs 45 % with late=0.5).
    `encoded` takes `encode_concept_data`'s output to skip encoding. `log["loss"]` holds every
    step's loss.
    """
    import torch
    from tqdm import tqdm
    from . import lora
    from .diffusion import NoiseSchedule, add_noise, drop_captions
    if not 0.0 <= replay < 1.0:
        raise ValueError(f"replay is the fraction of old images per batch, in [0, 1), got {replay}")
    torch.manual_seed(seed)
    latents, labels, contexts, prompts, is_new = encoded or encode_concept_data(
        vae, text_encoder, tokenizer, concept, n_new, n_old, seed)
    lora.inject(unet, rank, alpha, targets, only_cross=only_cross)
    params = lora.trainable_parameters(unet)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}, "only the LoRA factors may train"
    new_idx, old_idx = torch.nonzero(is_new).flatten(), torch.nonzero(~is_new).flatten()
    n_old_batch = round(batch_size * replay)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    schedule = NoiseSchedule.sd15()
    index = {p: i for i, p in enumerate(prompts)}
    unet.train()
    log = {"loss": []}
    bar = tqdm(range(steps), desc=f"lora {concept} r{rank}", disable=not progress)
    for step in bar:
        pick = torch.cat([new_idx[torch.randint(len(new_idx), (batch_size - n_old_batch,), generator=g)],
                          old_idx[torch.randint(len(old_idx), (n_old_batch,), generator=g)]])
        captions = drop_captions([prompts[k] for k in labels[pick].tolist()], drop, g)
        x0 = latents[pick]
        T = schedule.num_train_timesteps
        t = torch.randint(0, T, (batch_size,), generator=g)
        n_late = round(batch_size * late)
        if n_late:
            t[:n_late] = torch.randint(T // 2, T, (n_late,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        eps = unet(add_noise(x0, noise, t, schedule), t, contexts[[index[c] for c in captions]])
        loss = torch.nn.functional.mse_loss(eps, noise)                 # SD's ||eps - eps_theta(x_t, t, c)||^2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log["loss"].append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(log['loss'][-25:]) / len(log['loss'][-25:]):.4f}")
    return unet.eval(), log


def evaluate_lora(unet, vae, text_encoder, tokenizer, concept="orange", new_seeds=tuple(range(6)),
                  old_seeds=(0, 1), judge=None, n_real=1000):
    """Judge a (LoRA or base) course U-Net on the new colour and on the old prompts (chapter 13).

    Generates (DDIM, 25 steps, guidance 4, as chapter 9 judges) one image per combination
    and seed: the 15 new combinations x `new_seeds`, the 90 course ones x `old_seeds`, and
    lets `lora_judge(concept)` (palette: the course colours + the new one) read them. Also
    the judge on n_real real images of each kind, the ceiling of what it can measure (None
    with n_real=0).
    And the judge on the VAE's reconstructions of those real images, decode(encode(x)): a
    latent model's ceiling (for orange the course VAE already spreads the hue). Returns
    {"new": acc, "old": acc, "judge_on_real_new": acc, "judge_on_real_old": acc,
    "judge_on_vae_reconstructions_new": acc, "judge_on_vae_reconstructions_old": acc,
    "images_new": uint8, "captions_new": list}, each acc a dict colour/shape/position/all.
    """
    import torch
    from . import data
    judge = judge or lora_judge(concept)
    prompts = course_prompts() + concept_prompts(concept)
    with torch.no_grad():
        contexts = text_encoder(tokenizer(prompts))
    new, images_new, captions_new = judge_course_unet(unet, vae, contexts, prompts, judge,
                                                      data.concept_combinations(concept), seeds=tuple(new_seeds))
    old = judge_course_unet(unet, vae, contexts, prompts, judge, data.combinations(), seeds=tuple(old_seeds))[0]
    real_new = real_old = vae_new = vae_old = None
    if n_real:
        real = {"new": data.sample(n_real, seed=4321, only=data.concept_combinations(concept)),
                "old": data.sample(n_real, seed=12345)}
        real_new, real_old = (judge.accuracy(*real[k]) for k in ("new", "old"))
        # the VAE's own reconstructions decode(encode(x)): the best a latent model can hope for
        with torch.no_grad():
            rec = {k: data.to_uint8(torch.cat([vae.decode(vae.encode(data.to_tensor(im[i:i + 500])).mean)
                                               for i in range(0, len(im), 500)])) for k, (im, _) in real.items()}
        vae_new, vae_old = (judge.accuracy(rec[k], real[k][1]) for k in ("new", "old"))
    return {"new": new, "old": old, "judge_on_real_new": real_new, "judge_on_real_old": real_old,
            "judge_on_vae_reconstructions_new": vae_new, "judge_on_vae_reconstructions_old": vae_old,
            "images_new": images_new, "captions_new": captions_new}



# the course LoRA's recipe (`python -m minisd train lora` with no options, and train_lora's
# defaults; chapter 13). Measured on orange (15 prompts x 6 seeds, DDIM 25, guidance 4): base
# 18 %, this recipe 49 % in 115 CPU s (1 thread); 3000 steps at lr 5e-3 (400 CPU s) 64 %. The
# course VAE itself spreads orange's hue (its reconstructions of real orange: 97.7 % judged
# orange, green/red 0.50 +- 0.11), and the U-Net's samples spread it about 3x wider (+- 0.30),
# so half of them cross into red or yellow. Other settings tried, all 37-57 %: all attention
# layers, + feed-forward, + ResNet convs, ranks 1-16, lr 5e-3..2e-2, replay 0.1-0.5, caption
# dropout 0-0.5, timesteps biased late or early, batch 8 x 2400 steps.
LORA_COURSE = {"steps": 800, "lr": 1e-2, "replay": 0.25, "targets": LORA_TARGETS, "only_cross": True}

def _save_half(unet, path):
    """lora.save with the factors in float16, as community LoRA files are (half the bytes)."""
    from . import lora
    params = lora.trainable_parameters(unet)
    keep = [p.data for p in params]
    for p in params:
        p.data = p.data.half()
    try:
        lora.save(unet, path)
    finally:
        for p, d in zip(params, keep):
            p.data = d


def _lora_size(unet_with_lora):
    """(bytes of the LoRA file that lora.save writes for this U-Net, its LoRA parameters)."""
    import os
    import tempfile
    from . import lora
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "lora.safetensors")
        _save_half(unet_with_lora, path)
        return os.path.getsize(path), lora.count_parameters(unet_with_lora)[0]


def lora_rank_sweep(ranks, concept="orange", steps=300, seed=0, progress=True, **train_kwargs):
    """Chapter 13's rank sweep: for each rank, a fresh course U-Net, `steps` LoRA steps, then
    new-concept and old-prompt accuracy (fewer seeds than the main evaluation), parameters and
    file size. Returns a list of dicts."""
    import time
    from .pipeline import _load_course_unet, COURSE_FILES
    from . import DATA_DIR
    vae, text_encoder, tokenizer = _frozen_course_models()
    encoded = encode_concept_data(vae, text_encoder, tokenizer, concept, seed=seed)
    rows = []
    for rank in ranks:
        unet = _load_course_unet(DATA_DIR / COURSE_FILES["unet"]).requires_grad_(False)
        c0 = time.process_time()
        unet, _ = train_lora(unet, vae, text_encoder, tokenizer, concept, rank=rank, steps=steps, seed=seed,
                             encoded=encoded, progress=progress, **train_kwargs)
        cpu = time.process_time() - c0
        ev = evaluate_lora(unet, vae, text_encoder, tokenizer, concept, new_seeds=(0, 1, 2), old_seeds=(0,),
                           n_real=0)
        file_bytes, params = _lora_size(unet)
        rows.append({"rank": rank, "params": params, "file_bytes": file_bytes,
                     "new_accuracy": round(ev["new"]["all"], 4), "old_accuracy": round(ev["old"]["all"], 4),
                     "train_cpu_seconds": round(cpu, 1)})
        if progress:
            print(f"rank {rank:3d}: {params:7,d} parameters, {file_bytes:8,d} bytes, new {rows[-1]['new_accuracy']:.3f}, "
                  f"old {rows[-1]['old_accuracy']:.3f}, {cpu:.0f} s CPU", flush=True)
    return rows


def cli_lora(argv):
    """python -m minisd train lora --concept orange [...] | --weights PATH --images DIR [...]"""
    import argparse
    p = argparse.ArgumentParser(
        prog="python -m minisd train lora",
        description="Train a LoRA (chapter 13). Course mode (default): teach the course U-Net a new colour "
                    "(--concept, from minisd.data.NEW_COLOURS) and write data/course_lora_<concept>.safetensors "
                    "and its _log.json. Real mode (--weights PATH --images DIR): fine-tune SD 1.x weights on a "
                    "folder of captioned images (also under torchrun).")
    p.add_argument("--concept", default="orange", help="course mode: the new colour to teach")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, update scale 1)")
    p.add_argument("--steps", type=int, default=None, help="training steps (course default 600, real default 1000)")
    p.add_argument("--batch-size", type=int, default=None, help="course default 32, real default 1 per process")
    p.add_argument("--lr", type=float, default=None, help="course default 1e-2, real default 1e-4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: this U-Net is so small that a second thread mostly adds "
                        "synchronisation; on a 2-core machine 2 threads took ~2x the CPU seconds per step)")
    p.add_argument("--out", default=None, help="the LoRA file (course default data/course_lora_<concept>.safetensors; "
                   "real default OUTPUT_DIR/lora.safetensors)")
    p.add_argument("--log", default=None, help="course mode: the log (default: OUT with _log.json)")
    p.add_argument("--rank-sweep", default=None, help="course mode: comma-separated ranks, e.g. 1,2,4,8,16: "
                   "also train one LoRA per rank (--sweep-steps steps each) and log accuracy vs rank vs file size")
    p.add_argument("--sweep-steps", type=int, default=300)
    real = p.add_argument_group("real SD 1.x mode")
    real.add_argument("--weights", default=None, help="SD 1.x weights: a diffusers folder or one .safetensors/.ckpt")
    real.add_argument("--images", default=None, help="folder of images (.png/.jpg/.jpeg/.webp), each with a "
                      "caption in <name>.txt beside it, or all captions in DIR/metadata.jsonl "
                      "({\"file_name\": ..., \"text\": ...} per line)")
    real.add_argument("--resolution", type=int, default=512, help="images are resized and centre-cropped to this")
    real.add_argument("--output-dir", default="lora-output", help="where checkpoints, the log and the LoRA go")
    real.add_argument("--train-text-encoder", action="store_true", help="also put LoRAs on the text encoder")
    real.add_argument("--save-every", type=int, default=100, help="a resumable checkpoint every N steps")
    real.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    real.add_argument("--max-steps-this-run", type=int, default=None,
                      help="stop (after checkpointing) once this many steps have run in this process")
    real.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; under torchrun, "
                      "cuda:LOCAL_RANK)")
    real.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                      help="autocast dtype on CUDA (default fp16 with a GradScaler; always 'no' on CPU)")
    real.add_argument("--targets", default=",".join(LORA_TARGETS), help="U-Net layer names to wrap")
    args = p.parse_args(argv)
    if args.weights is not None or args.images is not None:
        try:
            return _cli_lora_real(args, argv)
        except (FileNotFoundError, ValueError) as e:   # bad input: the message says what to do, no traceback
            raise SystemExit(f"error: {e}") from None
    return _cli_lora_course(args, argv)


def _cli_lora_course(args, argv):
    import json
    import time
    from pathlib import Path
    import torch
    from . import DATA_DIR, data, lora
    from .pipeline import COURSE_FILES, _load_course_unet
    if args.concept not in data.NEW_COLOURS:
        raise SystemExit(f"--concept {args.concept!r} is not a colour the course data can draw but the base model "
                         f"never saw: choose one of {list(data.NEW_COLOURS)}")
    command = "python -m minisd train lora " + " ".join(argv)
    torch.set_num_threads(args.threads)
    steps, batch_size, lr = args.steps or LORA_COURSE["steps"], args.batch_size or 32, args.lr or LORA_COURSE["lr"]
    out = Path(args.out) if args.out else DATA_DIR / f"course_lora_{args.concept}.safetensors"
    log_path = Path(args.log) if args.log else out.with_name(out.stem + "_log.json")
    unet_path = DATA_DIR / COURSE_FILES["unet"]
    vae, text_encoder, tokenizer = _frozen_course_models()
    base = _load_course_unet(unet_path).requires_grad_(False)
    judge = lora_judge(args.concept)
    print("judging the base model ...", flush=True)
    before = evaluate_lora(base, vae, text_encoder, tokenizer, args.concept, judge=judge)
    unet = _load_course_unet(unet_path)
    t0, c0 = time.time(), time.process_time()
    unet, log = train_lora(unet, vae, text_encoder, tokenizer, args.concept, rank=args.rank, alpha=args.alpha,
                           steps=steps, batch_size=batch_size, lr=lr, seed=args.seed,
                           targets=LORA_COURSE["targets"], only_cross=LORA_COURSE["only_cross"],
                           replay=LORA_COURSE["replay"])
    wall, cpu = time.time() - t0, time.process_time() - c0
    _save_half(unet, out)
    # evaluate what was written: the file loaded into a fresh copy of the base model
    shipped = lora.load(_load_course_unet(unet_path), out).eval()
    after = evaluate_lora(shipped, vae, text_encoder, tokenizer, args.concept, judge=judge)
    as_float = lambda acc: {k: round(float(v), 4) for k, v in acc.items()}  # noqa: E731
    evaluation = {"sampler": "ddim", "steps": 25, "guidance": 4.0, "judge_palette": list(judge.colours),
                  "new_prompts": f"the 15 {args.concept} combinations x 6 seeds",
                  "old_prompts": "the 90 course combinations x 2 seeds",
                  "base": {"new": as_float(before["new"]), "old": as_float(before["old"])},
                  "lora": {"new": as_float(after["new"]), "old": as_float(after["old"])},
                  "judge_on_real": {"new": as_float(after["judge_on_real_new"]),
                                    "old": as_float(after["judge_on_real_old"])},
                  "judge_on_vae_reconstructions": {"new": as_float(after["judge_on_vae_reconstructions_new"]),
                                                   "old": as_float(after["judge_on_vae_reconstructions_old"])}}
    n_lora, n_unet = lora.count_parameters(unet)
    sizes = {"lora_bytes": out.stat().st_size, "unet_bytes": unet_path.stat().st_size,
             "lora_parameters": n_lora, "unet_parameters": n_unet}
    sizes["ratio"] = round(sizes["lora_bytes"] / sizes["unet_bytes"], 5)
    sizes["lora_dtype"] = "float16"
    record = {"command": command, "concept": args.concept, "rgb": list(data.NEW_COLOURS[args.concept]),
              "rank": args.rank, "alpha": args.alpha if args.alpha is not None else float(args.rank),
              "targets": list(LORA_COURSE["targets"]), "only_cross": LORA_COURSE["only_cross"],
              "replay": LORA_COURSE["replay"], "steps": steps, "batch_size": batch_size, "lr": lr,
              "seed": args.seed, "threads": args.threads, "train_cpu_seconds": round(cpu, 1),
              "train_wall_seconds": round(wall, 1), "evaluation": evaluation, "sizes": sizes,
              "loss": [round(v, 5) for v in log["loss"]]}
    if args.rank_sweep:
        ranks = [int(r) for r in args.rank_sweep.split(",")]
        record["rank_sweep_steps"] = args.sweep_steps
        record["rank_sweep_note"] = (f"each rank trained {args.sweep_steps} steps (the main LoRA: {steps}), "
                                     "judged on 15 new combinations x 3 seeds and 90 old x 1 seed")
        record["rank_sweep"] = lora_rank_sweep(ranks, args.concept, steps=args.sweep_steps, seed=args.seed,
                                               batch_size=batch_size, lr=lr, targets=LORA_COURSE["targets"],
                                               only_cross=LORA_COURSE["only_cross"], replay=LORA_COURSE["replay"])
    log_path.write_text(json.dumps(record, indent=1))
    print(json.dumps(evaluation, indent=1))
    print(f"trained in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} threads); wrote {out} "
          f"({sizes['lora_bytes']:,d} bytes, {100 * sizes['ratio']:.2f} % of the U-Net's file) and {log_path}")
    return 0


# --- LoRA on real SD 1.x weights and a folder of images (chapter 13) -----------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def caption_folder(folder):
    """[(image path, caption)] of a training folder, sorted by file name.

    Captions come from DIR/metadata.jsonl if it exists (one JSON object per line with
    "file_name" and "text", as diffusers' / Hugging Face's imagefolder reads them), else from
    a <name>.txt beside each image (kohya's layout). Errors say what is missing.
    """
    import json
    from pathlib import Path
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder; pass a folder of images with a caption "
                                "in <name>.txt beside each one (or a metadata.jsonl)")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"--images {folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files)")
    meta = folder / "metadata.jsonl"
    if meta.exists():
        captions = {}
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "file_name" not in row or "text" not in row:
                    raise ValueError(f"{meta}, line {n}: expected {{\"file_name\": ..., \"text\": ...}}, got {line!r}")
                captions[row["file_name"]] = row["text"]
        missing = [p.name for p in images if p.name not in captions]
        if missing:
            raise ValueError(f"{meta} has no caption for {missing[0]} ({len(missing)} images without one)")
        return [(p, captions[p.name]) for p in images]
    out = []
    for p in images:
        txt = p.with_suffix(".txt")
        if not txt.exists():
            raise FileNotFoundError(f"{p} has no caption: write it to {txt.name} in the same folder "
                                    "(or put all captions in metadata.jsonl)")
        out.append((p, txt.read_text().strip()))
    return out


def load_training_image(path, resolution):
    """An image file -> float tensor (3, resolution, resolution) in [-1, 1]: RGB, the shorter side
    resized to `resolution` (bicubic), then the centre square cropped (as SD's fine-tuning scripts do)."""
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        from . import data
        return data.to_tensor(np.array(im)[None])[0]


class _LoRAModel(__import__("torch").nn.Module):
    """The U-Net (and optionally the text encoder) in one module, so that one
    DistributedDataParallel wrapper averages all LoRA gradients."""

    def __init__(self, unet, text_encoder, train_text_encoder):
        super().__init__()
        self.unet, self.text_encoder, self.train_text_encoder = unet, text_encoder, train_text_encoder

    def forward(self, x_t, t, ids):
        import torch
        if self.train_text_encoder:
            context = self.text_encoder(ids)
        else:
            with torch.no_grad():
                context = self.text_encoder(ids)
        return self.unet(x_t, t, context)


def _dist_env():
    """(rank, world size, local rank) from torchrun's environment variables (0, 1, 0 without)."""
    import os
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def train_lora_folder(weights_path, images_dir, output_dir, rank=4, alpha=None, steps=1000, batch_size=1, lr=1e-4,
                      seed=0, resolution=512, targets=LORA_TARGETS, train_text_encoder=False, save_every=100,
                      resume=False, max_steps_this_run=None, device=None, mixed_precision=None, out=None,
                      progress=True, command=""):
    """Fine-tune a LoRA on real SD 1.x weights and a folder of captioned images (chapter 13).

    The VAE and the text encoder are frozen (the text encoder gets LoRAs too with
    `train_text_encoder`); only the LoRA factors train, with AdamW and SD's noise-prediction
    loss. Under torchrun (WORLD_SIZE > 1) every process takes its share of each epoch
    (DistributedSampler), DistributedDataParallel averages the gradients (gloo on CPU, nccl on
    CUDA), and only rank 0 shows progress and writes files. `batch_size` is per process.

    Every `save_every` steps (and at the end of a run) rank 0 writes
    OUTPUT_DIR/checkpoint.pt: LoRA weights, optimizer, scheduler, grad scaler, step and RNG
    states. `resume=True` continues from it; the noise and timesteps of step s on rank r come
    from a generator seeded with (seed, s, r), and the data order of each epoch from
    (seed, epoch), so a resumed run takes exactly the steps the uninterrupted one would have.
    `max_steps_this_run` stops early (a planned interruption). Returns (unet, text_encoder, log);
    the final LoRA goes to `out` (default OUTPUT_DIR/lora.safetensors) with lora.save.
    """
    import os
    import random
    import time
    from pathlib import Path
    import numpy as np
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from . import lora
    from .diffusion import NoiseSchedule, add_noise
    from .pipeline import StableDiffusion

    rank_id, world, local_rank = _dist_env()
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if mixed_precision is None:
        mixed_precision = "fp16" if device.type == "cuda" else "no"
    if mixed_precision != "no" and device.type != "cuda":
        raise ValueError(f"--mixed-precision {mixed_precision} needs a CUDA device; on {device} use 'no'")
    amp_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    items = caption_folder(images_dir)                        # errors before any weights are read
    if not Path(weights_path).exists():
        raise FileNotFoundError(f"--weights {weights_path}: no such file or folder; pass a diffusers SD 1.x folder "
                                "or one SD 1.x .safetensors/.ckpt file")
    output_dir = Path(output_dir)
    ckpt_path = output_dir / "checkpoint.pt"
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: there is no checkpoint at {ckpt_path} (checkpoints are written every "
                                "--save-every steps into --output-dir); run without --resume to start afresh")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank_id, world_size=world)
    main = rank_id == 0
    # base weights in the autocast dtype (the VAE stays float32); LoRA factors in float32
    pipe = StableDiffusion.from_pretrained(weights_path, device=device, dtype=amp_dtype)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    factor = vae.config.factor * 2 ** (len(unet.config.block_channels) - 1)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} must be a multiple of {factor} for these weights")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    torch.manual_seed(seed)                                   # the LoRA factors' initialisation
    lora.inject(unet, rank, alpha, tuple(targets))
    if train_text_encoder:
        lora.inject(text_encoder, rank, alpha, ("q_proj", "k_proj", "v_proj", "out_proj"))
    params = lora.trainable_parameters(unet) + (lora.trainable_parameters(text_encoder) if train_text_encoder else [])
    for p in params:
        p.data = p.data.float()
    frozen_trainable = [n for n, p in [*unet.named_parameters(), *text_encoder.named_parameters(),
                                       *vae.named_parameters()] if p.requires_grad and not any(p is q for q in params)]
    assert not frozen_trainable, f"only LoRA factors may train, but {frozen_trainable[:3]} require grad"
    model = _LoRAModel(unet, text_encoder, train_text_encoder).to(device)
    model.train()
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 1.0))   # warm-up, then constant
    scaler = torch.amp.GradScaler("cuda", enabled=mixed_precision == "fp16")
    meta = {"weights": str(weights_path), "rank": rank, "alpha": alpha, "targets": list(targets),
            "train_text_encoder": train_text_encoder, "steps": steps, "world_size": world, "batch_size": batch_size,
            "resolution": resolution, "seed": seed}
    start, log = 0, {"loss": []}
    if resume:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for k in ("rank", "targets", "train_text_encoder", "world_size", "batch_size", "resolution", "seed"):
            if ck["meta"][k] != meta[k]:
                raise ValueError(f"{ckpt_path} was made with {k}={ck['meta'][k]!r}, this run has {k}={meta[k]!r}: "
                                 "resume with the same settings, or use another --output-dir")
        if len(ck["lora"]) != len(params) or any(a.shape != p.shape for a, p in zip(ck["lora"], params)):
            raise ValueError(f"{ckpt_path} holds LoRA factors that do not fit these weights ({weights_path}): "
                             "it was made for another model")
        with torch.no_grad():
            for p, saved in zip(params, ck["lora"]):
                p.copy_(saved)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        np.random.set_state(ck["rng"]["numpy"])
        start, log = ck["step"], ck["log"]

    def checkpoint(step):
        if not main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        state = {"meta": meta, "step": step, "lora": [p.detach().cpu().clone() for p in params],
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
                 "log": log}
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt_path)   # a kill while writing leaves the previous checkpoint whole

    sampler = torch.utils.data.DistributedSampler(range(len(items)), num_replicas=world, rank=rank_id, shuffle=True,
                                                  seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(items)} images are too few for {world} process(es) x batch size {batch_size}")
    schedule = NoiseSchedule.sd15()
    scaling = vae.scaling_factor
    stop = steps if max_steps_this_run is None else min(steps, start + max_steps_this_run)
    bar = tqdm(range(start, stop), initial=start, total=steps, desc="lora", disable=not (progress and main))
    t0, c0 = time.time(), time.process_time()
    step = start
    for step in range(start, stop):
        epoch, k = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        pick = list(sampler)[k * batch_size:(k + 1) * batch_size]
        pixels = torch.stack([load_training_image(items[i][0], resolution) for i in pick]).to(device)
        ids = tokenizer([items[i][1] for i in pick]).to(device)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank_id)
        with torch.no_grad():
            post = vae.encode(pixels.to(next(vae.parameters()).dtype))
            # z = mean + std * eps with eps from the step's CPU generator (so CPU and CUDA runs draw alike)
            latents = (post.mean.float() + post.std.float() * torch.randn(post.mean.shape, generator=g).to(device))
            latents = latents * scaling
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, schedule.num_train_timesteps, (len(pick),), generator=g).to(device)
        x_t = add_noise(latents, noise, t, schedule)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=mixed_precision != "no"):
            eps = ddp(x_t.to(amp_dtype), t, ids)
        loss = torch.nn.functional.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        value = loss.detach()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        log["loss"].append(round(value.item(), 6))
        bar.update(1)
        bar.set_postfix(loss=f"{value.item():.4f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            checkpoint(step + 1)
    bar.close()
    done = stop
    checkpoint(done)
    if main and done == steps:
        out = Path(out) if out else output_dir / "lora.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        lora.save(pipe if train_text_encoder else unet, out)
        import json
        (output_dir / "log.json").write_text(json.dumps({
            "command": command, **meta, "lr": lr, "mixed_precision": mixed_precision, "device": str(device),
            "train_wall_seconds_last_run": round(time.time() - t0, 1),
            "train_cpu_seconds_last_run": round(time.process_time() - c0, 1), "lora_file": str(out),
            "lora_bytes": out.stat().st_size, "loss": log["loss"]}, indent=1))
    if world > 1:
        dist.barrier()
    log["steps_done"] = done
    return unet, text_encoder, log


def _cli_lora_real(args, argv):
    import torch
    if args.weights is None or args.images is None:
        raise SystemExit("real mode needs both --weights PATH (SD 1.x) and --images DIR (captioned images)")
    torch.set_num_threads(args.threads)
    rank_id, world, _ = _dist_env()
    _, _, log = train_lora_folder(
        args.weights, args.images, args.output_dir, rank=args.rank, alpha=args.alpha, steps=args.steps or 1000,
        batch_size=args.batch_size or 1, lr=args.lr or 1e-4, seed=args.seed, resolution=args.resolution,
        targets=tuple(args.targets.split(",")), train_text_encoder=args.train_text_encoder,
        save_every=args.save_every, resume=args.resume, max_steps_this_run=args.max_steps_this_run,
        device=args.device, mixed_precision=args.mixed_precision, out=args.out,
        command="python -m minisd train lora " + " ".join(argv))
    if rank_id == 0:
        print(f"{log['steps_done']} steps done; checkpoint in {args.output_dir}/checkpoint.pt"
              + (f"; LoRA in {args.out or args.output_dir + '/lora.safetensors'}" if log['steps_done'] == (args.steps or 1000) else ""))
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


# --- command line --------------------------------------------------------------------------------
def main(argv):
    # each trainer adds itself here: "name": function taking the remaining argv
    trainers = {}
    trainers["vae"] = cli_vae
    trainers["clip"] = cli_clip
    trainers["unet"] = cli_unet
    trainers["lora"] = cli_lora
    if not argv or argv[0] not in trainers:
        print(f"usage: python -m minisd train {{{'|'.join(trainers) or 'vae|clip|unet|lora'}}} [--help]",
              file=sys.stderr)
        return 2
    return trainers[argv[0]](argv[1:])
