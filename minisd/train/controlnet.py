"""Training the course ControlNet (chapter 14): `python -m minisd train controlnet`.

The control image is the shape's silhouette (white where the shape is, black elsewhere: where
and what to draw, not its colour). The frozen course U-Net learns nothing; a ControlNet copied
from its encoder learns to make it draw the silhouette, and half of the training captions name
another position than the silhouette's, so that the control wins over the prompt's position.
"""


def silhouettes(images):
    """uint8 course images (N, H, W, 3) -> control images (N, H, W, 3) uint8: each pixel's
    brightest channel, grey, so the silhouette carries the shape and its place but no colour."""
    import numpy as np
    grey = images.max(axis=-1, keepdims=True)
    return np.repeat(grey, 3, axis=-1)


def hints(controls):
    """uint8 control images (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], the ControlNet's input."""
    import torch
    return torch.from_numpy(controls).permute(0, 3, 1, 2).float() / 255


def conflicting_captions(truth, p, generator):
    """Each (colour, shape, position) -> its caption, or with probability p the caption of the same
    colour and shape at another position (the control then disagrees with the prompt)."""
    import torch
    from .. import data
    positions = list(data.POSITIONS)
    out = []
    for (colour, shape, position), u, k in zip(truth, torch.rand(len(truth), generator=generator).tolist(),
                                               torch.randint(0, len(positions) - 1, (len(truth),),
                                                             generator=generator).tolist()):
        if u < p:
            others = [q for q in positions if q != position]
            position = others[k]
        out.append(data.caption(colour, shape, position))
    return out


def train_controlnet_model(net, unet, latents, controls, truth, contexts, prompts, steps=1500, batch_size=32,
                           lr=1e-3, drop=0.1, conflict=0.5, seed=0, progress=True, every=100, probe=None):
    """The ControlNet training loop (chapter 14) on precomputed latents; returns (net, log).

    Each step: a batch of latents x0, their silhouettes and captions (with probability `conflict`
    naming another position, then with probability `drop` replaced by ""), and SD's loss with the
    U-Net frozen and the ControlNet's residuals added to it: ||eps - eps_theta(x_t, t, c, control)||^2.
    `probe(net)` (if given) is called every `every` steps and its result logged under "probe"."""
    import torch
    from tqdm import tqdm
    from ..diffusion import drop_captions, training_loss
    from .unet import warmup_cosine
    g = torch.Generator().manual_seed(seed)
    index = {p: i for i, p in enumerate(prompts)}
    unet.eval().requires_grad_(False)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    log = {"loss": [], "probe": []}
    bar = tqdm(range(steps), desc="controlnet", disable=not progress)
    for step in bar:
        if probe is not None and step % every == 0:
            log["probe"].append({"step": step, **probe(net.eval())})
            net.train()
        pick = torch.randint(0, len(latents), (batch_size,), generator=g)
        captions = conflicting_captions([truth[k] for k in pick.tolist()], conflict, g)
        context = contexts[[index[c] for c in drop_captions(captions, drop, g)]]        # (B, 77, D)
        hint = controls[pick]

        def model(x, t, c):
            down, mid = net(x, t, c, hint)
            return unet(x, t, c, down_residuals=down, mid_residual=mid)

        loss = training_loss(model, latents[pick], context, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log["loss"].append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(log['loss'][-50:]) / len(log['loss'][-50:]):.4f}")
    if probe is not None:
        log["probe"].append({"step": steps, **probe(net.eval())})
    return net.eval(), log


def held_out_controls(n, seed=777):
    """n held-out controls: silhouettes of fresh course images (their own jitter and size), each with
    a prompt of a random colour that names its shape at another position. Returns (controls uint8,
    control truth [(colour, shape, position)], prompts)."""
    import numpy as np
    from .. import data
    images, captions = data.sample(n, seed=seed)
    rng = np.random.default_rng(seed)
    truth = [data.parse(c) for c in captions]
    prompts = []
    for _, shape, position in truth:
        colour = list(data.COLOURS)[rng.integers(len(data.COLOURS))]
        other = [q for q in data.POSITIONS if q != position][rng.integers(len(data.POSITIONS) - 1)]
        prompts.append(data.caption(colour, shape, other))
    return silhouettes(images), truth, prompts


def generate(unet, vae, contexts, prompts, index, controls=None, net=None, scale=1.0, steps=None, guidance=None,
             seed=0, batch=100):
    """uint8 images of `prompts` from the course U-Net, with `net` following `controls` (uint8
    silhouettes) if given; the pipeline's own loop, `pipeline.denoise`, with the course model's
    sampler and the given (default: its recommended) steps and guidance."""
    import numpy as np
    import torch
    from .. import data
    from ..pipeline import denoise
    from ..schedulers import make_scheduler
    from .unet import course_sampling
    settings = course_sampling()
    steps = settings["steps"] if steps is None else steps
    guidance = settings["guidance"] if guidance is None else guidance
    out = []
    for i in range(0, len(prompts), batch):
        part = prompts[i:i + batch]
        b = len(part)
        sched = make_scheduler(settings["sampler"])
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed + i)
        size = unet.config.sample_size
        x = torch.randn((b, unet.config.in_channels, size, size), generator=g) * sched.init_noise_sigma
        cond = contexts[[index[p] for p in part]]
        context = torch.cat([contexts[index[""]][None].expand(b, -1, -1), cond])
        control = ()
        if net is not None:
            hint = hints(controls[i:i + b])
            control = [(net, torch.cat([hint, hint]), scale)]
        with torch.no_grad():
            lat = denoise(unet, x, context, sched, guidance=guidance, generator=g, control=control)
            out.append(data.to_uint8(vae.decode(lat / vae.scaling_factor)))
    return np.concatenate(out)


def follow_scores(images, controls, truth, prompts):
    """Per image: IoU of its foreground (soft mask > 0.5) with the control's, whether the pixel
    judge puts it at the control's position, and whether its colour is the prompt's."""
    import numpy as np
    from .. import data
    from ..metrics import pixel_judge, soft_mask
    a, b = soft_mask(images) > 0.5, soft_mask(controls) > 0.5
    iou = (a & b).sum(axis=(1, 2)) / np.maximum((a | b).sum(axis=(1, 2)), 1)
    judged = pixel_judge(images)
    position = np.array([j["position"] == t[2] for j, t in zip(judged, truth)])
    colour = np.array([j["colour"] == data.parse(p)[0] for j, p in zip(judged, prompts)])
    return {"iou": iou, "position": position, "colour": colour}


def summarise(scores):
    """Mean IoU (95 % interval), the IoU >= 0.5 rate, the position and colour rates (Wilson 95 %)."""
    from ..metrics import mean_interval, wilson_interval
    n = len(scores["iou"])
    row = {"n": n, "iou": [round(v, 4) for v in mean_interval(scores["iou"])]}
    for k, v in (("iou_over_half", scores["iou"] >= 0.5), ("position", scores["position"]),
                 ("colour", scores["colour"])):
        s = int(v.sum())
        row[k] = [round(s / n, 4), *[round(x, 4) for x in wilson_interval(s, n)]]
    return row


def cli_controlnet(argv):
    """python -m minisd train controlnet [--steps N] [--out PATH] [--threads T] ..."""
    import argparse
    import json
    import time
    from pathlib import Path
    import torch
    from .. import data
    from ..checkpoint import course_unet, save_checkpoint
    from ..controlnet import ControlNet
    from ..paths import DATA_DIR
    from .unet import course_prompts, course_sampling, frozen_course_models
    p = argparse.ArgumentParser(prog="python -m minisd train controlnet",
                                description="Train a ControlNet on the frozen course U-Net (chapter 14) whose control "
                                            "image is the shape's silhouette; write data/course_controlnet.safetensors "
                                            "and data/course_controlnet_log.json.")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--images", type=int, default=6000, help="size of the fixed pool of training images")
    p.add_argument("--conflict", type=float, default=0.5, help="share of captions naming another position")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", type=int, default=300, help="held-out controls for the final evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=DATA_DIR / "course_controlnet.safetensors")
    args = p.parse_args(argv)
    command = "python -m minisd train controlnet " + " ".join(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae, text_encoder, tokenizer = frozen_course_models()
    unet = course_unet().requires_grad_(False).eval()
    t0, c0 = time.time(), time.process_time()
    images, captions = data.sample(args.images, seed=args.seed + 1)
    prompts = course_prompts()
    index = {q: i for i, q in enumerate(prompts)}
    with torch.no_grad():
        latents = torch.cat([vae.encode(data.to_tensor(images[i:i + 500])).mean
                             for i in range(0, len(images), 500)]) * vae.scaling_factor
        contexts = text_encoder(tokenizer(prompts))                           # (91, 77, D)
    controls = hints(silhouettes(images))
    truth = [data.parse(c) for c in captions]
    probe_controls, probe_truth, probe_prompts = held_out_controls(48, seed=4242)

    def probe(net):  # the "sudden convergence": does it follow the control yet? (fewer steps, 48 controls)
        imgs = generate(unet, vae, contexts, probe_prompts, index, probe_controls, net, steps=10)
        s = follow_scores(imgs, probe_controls, probe_truth, probe_prompts)
        return {"iou": round(float(s["iou"].mean()), 4), "position": round(float(s["position"].mean()), 4)}

    net = ControlNet.from_unet(unet, hint_channels=(16, 32, 64))
    net, log = train_controlnet_model(net, unet, latents, controls, truth, contexts, prompts, args.steps,
                                      args.batch_size, args.lr, conflict=args.conflict, seed=args.seed, probe=probe)
    wall, cpu = time.time() - t0, time.process_time() - c0
    controls_e, truth_e, prompts_e = held_out_controls(args.eval)
    evaluation = {**course_sampling(), "controls": args.eval}
    for name, cn in (("controlnet", net), ("base", None)):
        imgs = generate(unet, vae, contexts, prompts_e, index, controls_e, cn)
        evaluation[name] = summarise(follow_scores(imgs, controls_e, truth_e, prompts_e))
    save_checkpoint(args.out, net, dtype=torch.float16,
                    metadata={"command": command, "train_wall_seconds": f"{wall:.0f}",
                              "train_cpu_seconds": f"{cpu:.0f}", "threads": str(args.threads)})
    log_path = args.out.with_name(args.out.stem + "_log.json")
    paths.write_text(log_path, json.dumps({"command": command, "steps": args.steps, "batch_size": args.batch_size,
                                    "lr": args.lr, "images": args.images, "conflict": args.conflict,
                                    "train_wall_seconds": round(wall), "train_cpu_seconds": round(cpu),
                                    "threads": args.threads, "evaluation": evaluation, "probe": log["probe"],
                                    "loss": [round(v, 5) for v in log["loss"]]}))
    print(json.dumps(evaluation, indent=1))
    print(f"trained in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} threads); wrote {args.out} and {log_path}")
    return 0
