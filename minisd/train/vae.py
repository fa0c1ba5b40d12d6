"""Training the course VAE (chapter 6): `python -m minisd train vae`, the f/c sweep, PSNR."""
import dataclasses
import math

from .. import paths


def train_vae_model(config=None, steps=1500, batch_size=16, lr=3e-3, seed=0, l1_weight=1.0, fg_boost=4.0,
                    perceptual_weight=0.5, kl_weight=1e-6, disc_start=None, disc_weight=0.5,
                    vq_codes=None, logvar_init=-6.0, n_train=20000, log_every=25, progress=True,
                    images=None, eval_images=None, saturate=False):
    """Train an AutoencoderKL on course images with chapter 6's objective; returns (model, log).

    Per step: l1_weight * L1 (shape pixels weighted 1 + fg_boost) + perceptual_weight * LPIPS-form
    distance (RandomFeatures) + kl_weight * KL, and after `disc_start` steps the PatchGAN
    term with LDM's adaptive weight; then one discriminator step on the hinge loss. With
    `vq_codes` the latents go through a VectorQuantizer instead of being sampled (no KL).
    `log` holds each term's value every `log_every` steps and the held-out PSNR, and
    `log["discriminator"]` the PatchGAN, `log["quantizer"]` the VectorQuantizer (or None).
    With `saturate` the L1 term is one-sided where the target is saturated (black -1 or full
    +1): an output below -1 on the black background (above +1 on a full pixel) costs nothing,
    since every image is clamped to [-1, 1] when shown, so the decoder may overshoot there instead
    of hovering around -1 (issue 16: the haze and the corner pixels); the perceptual term then
    compares the clamped output.
    """
    import torch
    from tqdm import tqdm
    from .. import data, losses
    from ..vae import AutoencoderKL, VAEConfig

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
        if saturate:
            l1 = (saturated_l1(x, rec) * losses.foreground_weight(x, fg_boost)).mean()
            shown = rec.clamp(-1, 1)
        else:
            l1 = losses.l1_loss(x, rec, losses.foreground_weight(x, fg_boost)).mean()
            shown = rec
        p = perceptual(x, shown).mean() if perceptual is not None else torch.zeros(())
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


def saturated_l1(x, rec, eps=1e-3):
    """|x - rec| per element, except one-sided where x is saturated: relu(rec - x) where x = -1
    (black) and relu(x - rec) where x = +1; what lies beyond is clamped away when shown."""
    import torch
    err = (x - rec).abs()
    err = torch.where(x <= -1 + eps, (rec - x).clamp(min=0), err)
    return torch.where(x >= 1 - eps, (x - rec).clamp(min=0), err)


def held_out_images(n=256, seed=1):
    """The VAE's test images: n course images of the 9 held-out (colour, shape, position) combinations."""
    from .. import data
    images, _ = data.sample(n, seed=seed, only=data.HELD_OUT)
    return data.to_tensor(images)


def held_out_psnr(model, images, vq=None):
    """Mean PSNR (dB) of the reconstructions decode(mode(encode(x))) of `images`."""
    import torch
    from .. import losses
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
    from ..vae import VAEConfig
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
    from .. import data
    from ..checkpoint import save_checkpoint
    from ..paths import DATA_DIR
    p = argparse.ArgumentParser(prog="python -m minisd train vae",
                                description="Train the course VAE (chapter 6) and write data/course_vae.safetensors.")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disc-start", type=int, default=None,
                   help="step at which the PatchGAN term starts (default: 3/4 of --steps)")
    p.add_argument("--out", default=None, help="checkpoint path (default data/course_vae.safetensors; "
                   "with --sweep, data/vae_fc_sweep.json)")
    p.add_argument("--fg-boost", type=float, default=4.0, help="extra L1 weight of shape pixels (default 4)")
    p.add_argument("--saturate", action=argparse.BooleanOptionalAction, default=True,
                   help="one-sided L1 on black/full target pixels (the decoder may overshoot what is clamped; "
                        "default on: it is what cleans the corners and the background, issue 16)")
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
        paths.write_text(out, json.dumps({"command": command, "steps": args.sweep_steps, "batch_size": 8,
                                          "objective": "foreground-weighted L1 + 1e-6 KL", "rows": rows}, indent=1))
        print(f"wrote {out} ({time.time() - t0:.0f} s)")
        return 0
    out = args.out or DATA_DIR / "course_vae.safetensors"
    disc_start = args.disc_start if args.disc_start is not None else args.steps * 3 // 4
    t0, c0 = time.time(), time.process_time()
    model, log = train_vae_model(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                 disc_start=disc_start, log_every=100, fg_boost=args.fg_boost,
                                 saturate=args.saturate)
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
    save_checkpoint(out, model, metadata={"command": command, "scaling_factor": f"{scale:.5f}",
                                 "held_out_psnr_db": f"{psnr:.2f}", "rescaled_latent_std": f"{z_std:.3f}",
                                 "train_wall_seconds": f"{wall:.0f}", "train_cpu_seconds": f"{cpu:.0f}",
                                 "threads": str(args.threads)})
    print(f"held-out PSNR {psnr:.2f} dB; scaling_factor 1/std = {scale:.5f}; rescaled held-out latents std {z_std:.3f}")
    print(f"trained in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} thread(s)); wrote {out}")
    return 0
