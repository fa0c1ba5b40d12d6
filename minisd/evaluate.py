"""`python -m minisd evaluate`: the course model judged from pixels (issue 16).

Every one of the 90 (colour, shape, position) combinations, held-out ones included, at seeds no
chapter uses, for (a) real course images, (b) the course VAE's reconstructions of those images,
(c) the course model at the sampler and steps it defaults to, at each guidance asked for. Each
image is read by `metrics.fidelity` (the pixel judge, the fitted-shape IoU, the background), and
each row gives every figure with its 95 % interval (`metrics.summarise_fidelity`); the learned
judge's accuracy is given beside it for comparison.
"""
import json
import time

import numpy as np

from . import paths


SEEDS = (9001, 9002, 9003, 9004)   # no chapter or training run uses these


def real_images(seeds=SEEDS, combos=None):
    """Real course images: each combination once per seed, jittered by data.render with the
    generator numpy.random.default_rng([seed, k]) (k: the combination's index)."""
    from . import data
    combos = data.combinations() if combos is None else combos
    images, captions = [], []
    for seed in seeds:
        for k, c in enumerate(combos):
            images.append(data.render(*c, rng=np.random.default_rng([seed, k])))
            captions.append(data.caption(*c))
    return np.stack(images), captions


def reconstruct(vae, images, batch_size=180):
    """decode(mode(encode(x))) of uint8 images, as uint8."""
    import torch
    from . import data
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = data.to_tensor(images[i:i + batch_size])
            out.append(data.to_uint8(vae.decode(vae.encode(x).mode())))
    return np.concatenate(out)


def generate(pipe, captions_per_seed, seeds=SEEDS, guidance=None):
    """The pipeline's images (uint8) for each seed's batch of captions, at its default sampler and steps."""
    out = []
    for seed in seeds:
        x = pipe(captions_per_seed, seed=seed, guidance=guidance, output_type="np", progress=False)
        out.append(np.rint(x * 255).astype(np.uint8))
    return np.concatenate(out)


# How `--set-default` picks the course model's guidance among the scales it measured.
DEFAULT_CRITERION = ("the guidance with the highest mean fidelity among those whose colour, shape and position "
                     "rates all reach 99 % (python -m minisd evaluate --set-default; all 90 combinations x seeds "
                     "9001-9004)")


def choose_guidance(rows, floor=0.99):
    """The `DEFAULT_CRITERION` applied to the evaluate table's model rows
    ({"model_guidance_<g>": row}): returns (guidance, row). A ValueError when no scale qualifies."""
    ok = {float(k.rsplit("_", 1)[1]): r for k, r in rows.items() if k.startswith("model_guidance_")
          and min(r["colour"][0], r["shape"][0], r["position"][0]) >= floor}
    if not ok:
        raise ValueError(f"no guidance reached {floor:.0%} on colour, shape and position; nothing to choose")
    g = max(ok, key=lambda g: (round(ok[g]["fidelity"][0], 4), -g))   # ties: the smaller scale
    return g, ok[g]


WELL_DRAWN = 0.9   # an image "well drawn" when its fidelity reaches this (real images: >= 0.98 each)


def row(images, captions, judge=None):
    """The table row of `metrics.summarise_fidelity`, plus: the rate of well-drawn images
    (fidelity >= WELL_DRAWN, Wilson interval), the mean fidelity per shape and on the held-out
    combinations, each image's fidelity (4 decimals, in caption order), and the learned judge."""
    from . import data, metrics
    per = metrics.fidelity(images, captions)
    r = metrics.summarise_fidelity(per)
    n, good = len(captions), int((per["fidelity"] >= WELL_DRAWN).sum())
    r["well_drawn"] = [good / n, *metrics.wilson_interval(good, n)]
    truth = [data.parse(c) for c in captions]
    for shape in data.SHAPES:
        pick = np.array([t[1] == shape for t in truth])
        r[f"fidelity_{shape}"] = list(metrics.mean_interval(per["fidelity"][pick]))
    held = np.array([t in data.HELD_OUT for t in truth])
    r["fidelity_held_out"] = list(metrics.mean_interval(per["fidelity"][held]))
    r["per_image_fidelity"] = [round(float(v), 4) for v in per["fidelity"]]
    if judge is not None:
        acc = judge.accuracy(images, captions)
        r["learned_judge"] = {k: round(v, 4) for k, v in acc.items()}
    return r


def main(argv=None):
    import argparse
    import torch
    from . import data
    from .metrics import Judge
    from .pipeline import StableDiffusion
    from . import checkpoint
    p = argparse.ArgumentParser(prog="python -m minisd evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--guidance", default="1.5,2,3,default", help="comma-separated guidance scales; "
                   "'default' is the model's own, 'none' generates nothing (default: 1.5,2,3,default)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="one image per combination per seed")
    p.add_argument("--vae", default=None, help="a VAE checkpoint (default: data/course_vae.safetensors)")
    p.add_argument("--unet", default=None, help="a U-Net checkpoint (default: data/course_unet.safetensors)")
    p.add_argument("--no-real", action="store_true", help="skip the real images and the VAE's reconstructions")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on the shared 2-core "
                   "machine 2 threads ran this several times slower)")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.add_argument("--set-default", action="store_true", help="store the guidance chosen by DEFAULT_CRITERION "
                   "among those measured in the U-Net checkpoint's sampling settings")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    pipe = StableDiffusion.course_model()
    if args.vae:
        pipe.vae = checkpoint.course_vae(args.vae).eval()
    if args.unet:
        pipe.unet = checkpoint.course_unet(args.unet).eval()
    judge = Judge.load()
    combos = data.combinations()
    prompts = [data.caption(*c) for c in combos]
    table = {"command": " ".join(["python -m minisd evaluate", *(argv or [])]), "seeds": list(seeds),
             "combinations": len(combos), "held_out_included": len(data.HELD_OUT),
             "sampler": str(pipe.scheduler), "steps": pipe.steps, "default_guidance": pipe.guidance,
             "vae": args.vae or "data/course_vae.safetensors", "unet": args.unet or "data/course_unet.safetensors",
             "rows": {}}
    t0 = time.time()

    def show(name, r):
        table["rows"][name] = r
        f = lambda k: f"{100 * r[k][0]:5.1f} % [{100 * r[k][1]:.1f}, {100 * r[k][2]:.1f}]"  # noqa: E731
        print(f"{name:28s} n={r['n']}  colour {f('colour')}  shape {f('shape')}  position {f('position')}  "
              f"fidelity {r['fidelity'][0]:.3f} [{r['fidelity'][1]:.3f}, {r['fidelity'][2]:.3f}]  "
              f"background {r['background'][0]:.2f}/255 [{r['background'][1]:.2f}, {r['background'][2]:.2f}]  "
              f"corners {r['corners'][0]:.1f}/255  well drawn {f('well_drawn')}  "
              f"by shape {' '.join(f'{r[k][0]:.3f}' for k in ('fidelity_circle', 'fidelity_square', 'fidelity_triangle'))}"
              f"  held-out {r['fidelity_held_out'][0]:.3f}  learned judge shape {r.get('learned_judge', {}).get('shape')}",
              flush=True)

    if not args.no_real:
        real, captions = real_images(seeds, combos)
        show("real", row(real, captions, judge))
        show("vae_reconstruction", row(reconstruct(pipe.vae, real), captions, judge))
    captions = prompts * len(seeds)
    for g in ([] if args.guidance == "none" else args.guidance.split(",")):
        guidance = pipe.guidance if g == "default" else float(g)
        images = generate(pipe, prompts, seeds, guidance)
        show(f"model_guidance_{guidance:g}", row(images, captions, judge))
    table["wall_seconds"] = round(time.time() - t0)
    table["definitions"] = {
        "fidelity": "soft IoU of m = clip((L - 0.25) / 0.5, 0, 1), L = brightest channel / 255, with the same ramp "
                    "of the ideal coverage of the caption's shape drawn by minisd.data at the best-fitting centre and "
                    "half-width (metrics.fit_shape)",
        "shape/colour/position": "metrics.pixel_judge: best-IoU shape of data.SHAPES, nearest hue of the "
                                 "mask- and saturation-weighted circular mean hue, nearest position to the mask centroid",
        "background": "mean L (in /255) of pixels > 2 px (Chebyshev) from the fitted ideal shape",
        "corners": "mean L (in /255) of the four corner pixels",
        "well_drawn": f"fraction of images with fidelity >= {WELL_DRAWN}",
        "intervals": "95 %: Wilson for rates, mean -+ 1.96 s / sqrt(n) for means"}
    if args.set_default:
        g, r = choose_guidance(table["rows"])
        sampling = {"sampler": table["sampler"], "steps": table["steps"], "guidance": g}
        path = args.unet or checkpoint.course_path("unet")
        checkpoint.set_sampling(path, sampling, note=f"{DEFAULT_CRITERION}: guidance {g:g}, fidelity "
                                f"{r['fidelity'][0]:.3f}")
        table["chosen_default"] = {**sampling, "criterion": DEFAULT_CRITERION}
        print(f"default sampling of {path}: {sampling} ({DEFAULT_CRITERION})")
    if args.out:
        paths.write_text(args.out, json.dumps(table, indent=1))
        print(f"wrote {args.out}")
    return 0
