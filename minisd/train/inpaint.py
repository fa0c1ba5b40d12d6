"""The course inpainting U-Net (chapter 16): `python -m minisd train inpaint`, and its measurement
against latent blending on the base course model.

SD's inpainting checkpoints are an SD U-Net whose first convolution takes 9 channels: the noisy
latents (4), the mask shrunk to the latents' size (1) and the latents of the masked image (4).
`extend_unet` makes one from any U-Net with the 5 new input channels' weights at zero, so it
starts as exactly the base model; `train_inpaint_model` fine-tunes it on course images with
random masks (the caption always describes the whole image); `evaluate_inpainting` repaints the
shape of held-out images with another caption and measures the inside (does the new shape follow
the prompt?) and the outside (is the rest kept? PSNR).
"""
import math

import numpy as np

# The course recipe (`python -m minisd train inpaint` with no options; chapter 16)
INPAINT_COURSE = {"steps": 1500, "batch_size": 32, "lr": 1e-3, "images": 8000, "full_mask": 0.1, "drop": 0.1}
BOX = 10          # half-width (px) of the box that covers a course shape around its position's centre
EVAL_SEED = 16    # the evaluation's images, captions and noise (no training run uses it)
EVAL_FILE = "course_inpaint_eval.json"


def extend_unet(unet, extra_channels=5):
    """A copy of `unet` whose first convolution also reads `extra_channels` more input channels,
    their weights zero: for any extra input it computes exactly what `unet` computes on the
    first channels (the output equals the base model's, so fine-tuning starts from it)."""
    import dataclasses
    import torch
    from ..unet import UNet
    config = dataclasses.replace(unet.config, in_channels=unet.config.in_channels + extra_channels)
    new = UNet(config)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    w = state["conv_in.weight"]                                         # (C, c_in, 3, 3)
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra_channels, *w.shape[2:])], dim=1)
    new.load_state_dict(state)
    return new.to(next(unet.parameters()).dtype).eval()


def position_box(position, size=32, factor=4, half=BOX):
    """(top, bottom, left, right) in pixels of the box around a course position's centre that
    covers any shape drawn there (half-width `half` px), widened to whole latent cells."""
    from .. import data
    fx, fy = data.POSITIONS[position]
    cx, cy = fx * size, fy * size
    lo = lambda c: max(0, int(math.floor((c - half) / factor)) * factor)            # noqa: E731
    hi = lambda c: min(size, int(math.ceil((c + half) / factor)) * factor)          # noqa: E731
    return lo(cy), hi(cy), lo(cx), hi(cx)


def box_mask(position, size=32, factor=4, side=None):
    """The float mask (size, size) of `position_box` (1 = repaint), or with `side` ("left",
    "right", "top", "bottom") only that half of it, split at the position's centre."""
    from .. import data
    top, bottom, left, right = position_box(position, size, factor)
    fx, fy = data.POSITIONS[position]
    cx, cy = (int(round(f * size / factor)) * factor for f in (fx, fy))
    if side is not None:
        top, bottom, left, right = {"left": (top, bottom, left, cx), "right": (top, bottom, cx, right),
                                    "top": (top, cy, left, right), "bottom": (cy, bottom, left, right)}[side]
    m = np.zeros((size, size), np.float32)
    m[top:bottom, left:right] = 1.0
    return m


def random_masks(n, positions, size=32, factor=4, full=0.1, seed=0):
    """n training masks (n, 1, size, size) of 0/1, each whole latent cells: a share `full` all
    white (the model must also draw from nothing), a third of the rest the box around the shape's
    own position (`positions`: each image's) or one half of it, the others random rectangles of 1-6 cells a side."""
    import torch
    rng = np.random.default_rng(seed)
    cells = size // factor
    masks = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        u = rng.random()
        if u < full:
            masks[i] = 1.0
        elif u < full + (1 - full) / 3:
            side = (None, "left", "right", "top", "bottom")[rng.integers(5)]
            masks[i, 0] = box_mask(positions[i], size, factor, side)
        else:
            h, w = rng.integers(1, 7, size=2)
            top, left = rng.integers(0, cells - h + 1), rng.integers(0, cells - w + 1)
            masks[i, 0, top * factor:(top + h) * factor, left * factor:(left + w) * factor] = 1.0
    return torch.from_numpy(masks)


def encode_inpaint_data(vae, text_encoder, tokenizer, n=INPAINT_COURSE["images"], seed=0, full=0.1,
                        batch_size=500):
    """What the inpainting U-Net trains on, encoded once with the frozen VAE and text encoder.

    n course images (never a data.HELD_OUT combination), one random mask each (`random_masks`),
    the latents of the image and of the masked image (the repainted part set to 0, grey in
    [-1, 1], as diffusers' pipeline does), each the posterior mean times the scaling factor, and
    the mask shrunk to the latents' size (nearest). Returns (latents, masks_small,
    masked_latents, labels, contexts, prompts)."""
    import torch
    from .. import data
    from .unet import course_prompts
    images, captions = data.sample(n, seed=seed + 16, exclude=data.HELD_OUT)
    positions = [data.parse(c)[2] for c in captions]
    masks = random_masks(n, positions, images.shape[1], vae.config.factor, full, seed)
    x = data.to_tensor(images)
    masked = x * (masks < 0.5)
    with torch.no_grad():
        enc = lambda t: torch.cat([vae.encode(t[i:i + batch_size]).mean      # noqa: E731
                                   for i in range(0, n, batch_size)]) * vae.scaling_factor
        latents, masked_latents = enc(x), enc(masked)
        prompts = course_prompts()
        contexts = text_encoder(tokenizer(prompts))
    small = torch.nn.functional.interpolate(masks, size=latents.shape[-2:])
    index = {p: i for i, p in enumerate(prompts)}
    labels = torch.tensor([index[c] for c in captions])
    return latents, small, masked_latents, labels, contexts, prompts


def train_inpaint_model(unet, encoded, steps=INPAINT_COURSE["steps"], batch_size=INPAINT_COURSE["batch_size"],
                        lr=INPAINT_COURSE["lr"], drop=INPAINT_COURSE["drop"], seed=0, progress=True):
    """Fine-tune a 9-channel U-Net (`extend_unet`) on `encode_inpaint_data`'s output; returns (unet, log).

    SD's loss ||eps - eps_theta([x_t, m, z_masked], t, c)||^2: x_t the whole image's latents
    noised to a random t, m and z_masked beside it, unchanged by the noise; captions dropped to ""
    with probability `drop` (for guidance). AdamW, warm-up and cosine decay as chapter 9; every
    weight trains."""
    import torch
    from tqdm import tqdm
    from ..diffusion import drop_captions, training_loss
    from .unet import warmup_cosine
    latents, small, masked_latents, labels, contexts, prompts = encoded
    g = torch.Generator().manual_seed(seed)
    index = {p: i for i, p in enumerate(prompts)}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    unet.train()
    log = {"loss": []}
    bar = tqdm(range(steps), desc="inpaint", disable=not progress)
    for step in bar:
        pick = torch.randint(0, len(latents), (batch_size,), generator=g)
        captions = drop_captions([prompts[k] for k in labels[pick].tolist()], drop, g)
        extra = torch.cat([small[pick], masked_latents[pick]], dim=1)
        model = lambda x_t, t, c: unet(torch.cat([x_t, extra], dim=1), t, c)   # noqa: E731
        loss = training_loss(model, latents[pick], contexts[[index[c] for c in captions]], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log["loss"].append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(log['loss'][-50:]) / len(log['loss'][-50:]):.4f}")
    return unet.eval(), log


TASKS = {
    "complete": "half of the box around each course image's shape (left, right, top or bottom, whole latent "
                "cells) repainted with the image's own caption: the model must finish the half-shape it sees",
    "replace": "the whole box around each course image's shape repainted with a caption of another colour and "
               "another shape at the same position",
}


def inpaint_task(n=300, seed=EVAL_SEED, kind="complete", size=32, factor=4):
    """The evaluation's tasks (TASKS) on n course images (any combination). Returns (images uint8
    (n, size, size, 3), masks float tensor (n, 1, size, size), the captions to paint with)."""
    import torch
    from .. import data
    if kind not in TASKS:
        raise ValueError(f"kind={kind!r}: choose one of {list(TASKS)}")
    images, captions = data.sample(n, seed=seed, size=size)
    rng = np.random.default_rng(seed + 1)
    prompts, masks = [], []
    for c in captions:
        colour, shape, position = data.parse(c)
        if kind == "replace":
            colours = [k for k in data.COLOURS if k != colour]
            shapes = [s for s in data.SHAPES if s != shape]
            prompts.append(data.caption(colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))],
                                        position))
            masks.append(box_mask(position, size, factor))
        else:
            prompts.append(c)
            masks.append(box_mask(position, size, factor, ("left", "right", "top", "bottom")[rng.integers(4)]))
    return images, torch.from_numpy(np.stack(masks))[:, None], prompts


def psnr_outside(images, originals, masks, inside=False):
    """Per image: PSNR (dB, peak 1) of the pixels outside the mask (mask < 0.5) against the
    original; with inside=True of the pixels inside it."""
    a = np.asarray(images, np.float64) / 255
    b = np.asarray(originals, np.float64) / 255
    keep = ((np.asarray(masks)[:, 0] >= 0.5) == inside)[..., None]      # (n, H, W, 1)
    mse = ((a - b) ** 2 * keep).sum(axis=(1, 2, 3)) / (3 * keep.sum(axis=(1, 2, 3)))
    return 10 * np.log10(1 / np.maximum(mse, 1e-10))


def judge_inside(images, masks, captions):
    """The pixel judge (`metrics.fidelity`) on the inside of the mask only (the outside set to
    black, the course background): does the repainted region show the caption's shape?"""
    from ..metrics import fidelity
    inside = (np.asarray(images) * (np.asarray(masks)[:, 0] >= 0.5)[..., None]).astype(np.uint8)
    return fidelity(inside, captions)


def _row(images, masks, captions, originals, kind):
    """One table row: `summarise_fidelity` of the image ("replace": of the mask's inside only), "all"
    (colour, shape and position right), and the outside's PSNR, each with its 95 % interval."""
    from ..metrics import fidelity, mean_interval, summarise_fidelity, wilson_interval
    judged = judge_inside(images, masks, captions) if kind == "replace" else fidelity(images, captions)
    row = summarise_fidelity(judged)
    right = judged["colour"] & judged["shape"] & judged["position"]
    row["all"] = [float(right.mean()), *wilson_interval(int(right.sum()), len(right))]
    row["psnr_outside"] = list(mean_interval(psnr_outside(images, originals, masks)))
    if kind == "complete":   # one right answer inside too: the original's other half
        row["psnr_inside"] = list(mean_interval(psnr_outside(images, originals, masks, inside=True)))
    return {k: ([round(x, 4) for x in v] if isinstance(v, list) else v) for k, v in row.items()}


def evaluate_inpainting(inpaint_unet=None, n=300, seed=EVAL_SEED, kinds=tuple(TASKS), progress=False):
    """Chapter 16's table: for each task of TASKS on `inpaint_task(n)`, each method's images judged
    (the caption's colour, shape, position and fidelity, with Wilson/normal 95 % intervals; for
    "replace" on the mask's inside only) and the PSNR outside the mask. Methods: the base course
    model with latent blending, the 9-channel `inpaint_unet` (default
    data/course_inpaint_unet.safetensors), text-to-image with the caption (no image: a reference)
    and the VAE's round trip of the original (the outside's ceiling). Course sampling (DDIM, 25
    steps, guidance 4), the same seed for every method. Returns ({kind: {method: row}},
    {kind: {method or "original"/"masks"/"captions": array}})."""
    import torch
    from .. import data, paths
    from ..checkpoint import load_checkpoint
    from ..pipeline import StableDiffusion
    pipe = StableDiffusion.course_model()
    if inpaint_unet is None:
        inpaint_unet = load_checkpoint(paths.DATA_DIR / "course_inpaint_unet.safetensors")
    nine = StableDiffusion(inpaint_unet, pipe.vae, pipe.text_encoder, steps=pipe.steps, guidance=pipe.guidance,
                           scheduler=pipe.scheduler)
    to_uint8 = lambda x: np.rint(x * 255).astype(np.uint8)              # noqa: E731
    rows, shown = {}, {}
    for kind in kinds:
        images, masks, prompts = inpaint_task(n, seed, kind)
        out = {"blending": pipe.inpaint(prompts, images, masks, seed=seed, output_type="np", progress=progress),
               "nine_channel": nine.inpaint(prompts, images, masks, seed=seed, output_type="np", progress=progress),
               "text_to_image": pipe(prompts, seed=seed, output_type="np", progress=progress)}
        out = {k: to_uint8(v) for k, v in out.items()}
        with torch.no_grad():
            out["vae_round_trip"] = data.to_uint8(pipe.vae.decode(pipe.vae.encode(data.to_tensor(images)).mean))
        rows[kind] = {k: _row(v, masks, prompts, images, kind) for k, v in out.items()}
        shown[kind] = {**out, "original": images, "masks": masks, "captions": prompts}
    return rows, shown


def cli_inpaint(argv):
    """python -m minisd train inpaint [--steps N] [--eval-only] ..."""
    import argparse
    import json
    import time
    from pathlib import Path
    import torch
    from .. import paths
    from ..checkpoint import course_path, course_unet, load_checkpoint, save_checkpoint
    from .unet import COURSE_SAMPLING, frozen_course_models
    p = argparse.ArgumentParser(
        prog="python -m minisd train inpaint",
        description="Extend the course U-Net to 9 input channels (latents, mask, masked-image latents; the new "
                    "weights zero) and fine-tune it on masked course images (chapter 16); write "
                    "data/course_inpaint_unet.safetensors and its _log.json, then measure it against latent "
                    f"blending on the base model and write data/{EVAL_FILE}.")
    p.add_argument("--steps", type=int, default=INPAINT_COURSE["steps"])
    p.add_argument("--batch-size", type=int, default=INPAINT_COURSE["batch_size"])
    p.add_argument("--lr", type=float, default=INPAINT_COURSE["lr"])
    p.add_argument("--images", type=int, default=INPAINT_COURSE["images"], help="training images (one mask each)")
    p.add_argument("--full-mask", type=float, default=INPAINT_COURSE["full_mask"],
                   help="share of training masks that cover the whole image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--eval-n", type=int, default=300, help="evaluation images (default 300)")
    p.add_argument("--eval-only", action="store_true", help="only re-measure the committed checkpoint")
    p.add_argument("--out", type=Path, default=None, help="default data/course_inpaint_unet.safetensors")
    p.add_argument("--eval-out", type=Path, default=None, help=f"default data/{EVAL_FILE}")
    args = p.parse_args(argv)
    command = "python -m minisd train inpaint " + " ".join(argv)
    torch.set_num_threads(args.threads)
    out = args.out or paths.DATA_DIR / "course_inpaint_unet.safetensors"
    eval_out = args.eval_out or paths.DATA_DIR / EVAL_FILE
    if not args.eval_only:
        vae, text_encoder, tokenizer = frozen_course_models()
        base_path = course_path("unet")
        unet = extend_unet(course_unet(base_path))
        t0, c0 = time.time(), time.process_time()
        encoded = encode_inpaint_data(vae, text_encoder, tokenizer, args.images, args.seed, args.full_mask)
        unet, log = train_inpaint_model(unet, encoded, args.steps, args.batch_size, args.lr, seed=args.seed)
        wall, cpu = time.time() - t0, time.process_time() - c0
        save_checkpoint(out, unet, sampling=COURSE_SAMPLING, dtype=torch.float16,    # half the bytes
                        metadata={"command": command, "base": base_path.name, "train_wall_seconds": f"{wall:.0f}",
                                  "train_cpu_seconds": f"{cpu:.0f}", "threads": str(args.threads)})
        log_path = out.with_name(out.stem + "_log.json")
        paths.write_text(log_path, json.dumps({"command": command, "steps": args.steps, "batch_size": args.batch_size,
                                        "lr": args.lr, "images": args.images, "full_mask": args.full_mask,
                                        "seed": args.seed, "threads": args.threads,
                                        "train_wall_seconds": round(wall), "train_cpu_seconds": round(cpu),
                                        "loss": [round(v, 5) for v in log["loss"]]}))
        print(f"trained in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} threads); wrote {out} and {log_path}")
    c0 = time.process_time()
    rows, _ = evaluate_inpainting(load_checkpoint(out), n=args.eval_n)
    record = {"command": command, "n": args.eval_n, "seed": EVAL_SEED, **COURSE_SAMPLING,
              "tasks": TASKS,
              "judged": "pixel judge and fidelity (metrics.fidelity) against the caption painted with: of the "
                        "whole image for 'complete', of the mask's inside (the outside set to black) for 'replace'",
              "outside": "PSNR (dB) of the pixels outside the mask against the original",
              "intervals": "95 %: Wilson for rates, normal for means",
              "eval_cpu_seconds": round(time.process_time() - c0, 1), "rows": rows}
    paths.write_text(eval_out, json.dumps(record, indent=1))
    print(json.dumps(rows, indent=1))
    print(f"wrote {eval_out}")
    return 0

