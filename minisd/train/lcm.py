"""Latent consistency distillation of the course U-Net (chapter 15): `python -m minisd train lcm`.

The recipe of Luo et al. 2023 (diffusers' examples/consistency_distillation), on the course
model. A student f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t), initialised from the
teacher, learns to give the same answer at two neighbouring points of one probability-flow ODE
trajectory: x_t (real latents noised to a timestep t of the 50-point schedule 19, 39, ..., 999)
and x_s, s = t - k, reached from x_t by one DDIM step of the guided teacher. The answer at x_s
comes from a target network, an EMA of the student, without gradients. Guidance is folded in
at one fixed scale (the course's own), so the student samples without classifier-free
guidance: one U-Net call per step instead of two.
"""
import copy

import torch

SKIP = 20                 # k: the solver jumps t -> t - 20, so the schedule has 1000 / 20 = 50 points
EVAL_SEEDS = tuple(range(9100, 9136))   # 36 seeds x the 9 held-out combinations = 324 images per row


def boundary(t, timestep_scaling=10.0, sigma_data=0.5):
    """(c_skip, c_out) of LCM at integer timesteps t (a tensor): LCM's scheduler's formula,
    c_skip(0) = 1 and c_out(0) = 0."""
    s = t.float() * timestep_scaling
    return sigma_data ** 2 / (s ** 2 + sigma_data ** 2), s / (s ** 2 + sigma_data ** 2) ** 0.5


def _view(v, x):
    return v.view(-1, *([1] * (x.dim() - 1)))        # (B,) -> (B, 1, 1, 1)


def consistency(unet, x, t, context, abar):
    """The consistency function f(x_t, t) = c_skip x_t + c_out x0_hat of an epsilon-predicting U-Net."""
    a = _view(abar[t], x)
    eps = unet(x, t, context)
    x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    c_skip, c_out = boundary(t)
    return _view(c_skip, x) * x + _view(c_out, x) * x0


def ddim_solver_step(x, eps, abar_t, abar_s):
    """One deterministic DDIM step of the probability-flow ODE from x_t to x_s (chapter 10):
    the clean guess x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), renoised along the same eps."""
    x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
    return abar_s ** 0.5 * x0 + (1 - abar_s) ** 0.5 * eps


def guided_eps(teacher, x, t, cond, uncond, guidance):
    """The teacher's classifier-free-guided noise eps_u + g (eps_c - eps_u), in one batched call."""
    b = len(x)
    eps_u, eps_c = teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond.expand(b, -1, -1), cond])).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def distill_lcm(teacher, latents, labels, contexts, prompts, guidance, steps=800, batch_size=32, lr=1e-4,
                ema_decay=0.95, skip=SKIP, loss_type="huber", huber_c=0.001, seed=0, progress=True):
    """Latent consistency distillation (chapter 15); returns (student, target, log).

    Each step: real latents x0 (B) and their captions; an index n of the schedule t_n = (n + 1) k - 1
    and s = max(t_n - k, 0); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. The student's f(x_t, t);
    without gradients the guided teacher's DDIM step x_t -> x_s and the target network's f(x_s, s);
    the loss is the pseudo-Huber distance sqrt(d^2 + c^2) - c (or "l2": the mean squared error)
    between the two. AdamW; after each step the target becomes an EMA of the student
    (`ema_decay`, LCM's 0.95). At n = 0, s = 0 and f(x_0, 0) = x_0: the boundary anchors the chain.
    """
    from tqdm import tqdm
    from ..schedulers import SchedulerConfig
    g = torch.Generator().manual_seed(seed)
    T = 1000
    abar = SchedulerConfig.sd15().alphas_cumprod(False)
    schedule = torch.arange(1, T // skip + 1) * skip - 1          # 19, 39, ..., 999
    index = {p: i for i, p in enumerate(prompts)}
    uncond = contexts[index[""]][None]
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    target = copy.deepcopy(teacher).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    log = {"loss": []}
    bar = tqdm(range(steps), desc="lcm", disable=not progress)
    for step in bar:
        pick = torch.randint(0, len(latents), (batch_size,), generator=g)
        x0, cond = latents[pick], contexts[labels[pick]]
        n = torch.randint(0, len(schedule), (batch_size,), generator=g)
        t = schedule[n]
        s = (t - skip).clamp(min=0)
        noise = torch.randn(x0.shape, generator=g)
        a_t, a_s = _view(abar[t], x0), _view(abar[s], x0)
        x_t = a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * noise
        pred = consistency(student, x_t, t, cond, abar)
        with torch.no_grad():
            x_s = ddim_solver_step(x_t, guided_eps(teacher, x_t, t, cond, uncond, guidance), a_t, a_s)
            want = consistency(target, x_s, s, cond, abar)
        if loss_type == "huber":
            loss = (((pred - want) ** 2 + huber_c ** 2) ** 0.5 - huber_c).mean()
        else:
            loss = ((pred - want) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(target.parameters(), student.parameters()):
                e.lerp_(p, 1 - ema_decay)
        log["loss"].append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(log['loss'][-50:]) / len(log['loss'][-50:]):.5f}")
    return student.eval(), target, log


# --- measuring: few steps against the teacher ---------------------------------------------------

def generate_images(unet, vae, contexts, prompts, captions, scheduler, steps, guidance, seed):
    """uint8 images for `captions` from one seed's noise: the pipeline's loop (pipeline.denoise)."""
    from .. import data
    from ..pipeline import denoise
    from ..schedulers import make_scheduler
    index = {p: i for i, p in enumerate(prompts)}
    cond = contexts[[index[c] for c in captions]]
    b, size = len(captions), unet.config.sample_size
    sched = make_scheduler(scheduler)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, unet.config.in_channels, size, size), generator=g) * sched.init_noise_sigma
    if guidance > 1.0:
        context, guide = torch.cat([contexts[index[""]][None].expand(b, -1, -1), cond]), guidance
    else:
        context, guide = cond, None
    with torch.no_grad():
        x = denoise(unet, x, context, sched, guidance=guide, generator=g)
        return data.to_uint8(vae.decode(x / vae.scaling_factor))


def evaluate_few_step(student, teacher, vae, contexts, prompts, teacher_sampling, step_counts=(1, 2, 4, 8),
                      seeds=EVAL_SEEDS, progress=True):
    """The table of chapter 15: for each step count, the LCM student (no guidance) and the teacher
    with DDIM and DPM-Solver++ (its own guidance), and the teacher at its own settings; each row
    `evaluate.row` (pixel judge, fitted-shape fidelity, 95 % intervals) on the held-out
    combinations x `seeds`, with the seconds it took per image. The rows are generated one
    seed at a time in turn, so that the timings share the machine's state."""
    import time
    import numpy as np
    from .. import data
    from ..evaluate import row
    captions = [data.caption(*c) for c in data.HELD_OUT]
    configs = {"teacher": (teacher, teacher_sampling["sampler"], teacher_sampling["steps"], teacher_sampling["guidance"])}
    for n in step_counts:
        configs[f"lcm_{n}"] = (student, "lcm", n, 1.0)
        configs[f"ddim_{n}"] = (teacher, "ddim", n, teacher_sampling["guidance"])
        configs[f"dpm++2m_{n}"] = (teacher, "dpm++2m", n, teacher_sampling["guidance"])
    images = {k: [] for k in configs}
    seconds = dict.fromkeys(configs, 0.0)
    for i, seed in enumerate(seeds):
        for k, (unet, sched, n, g) in configs.items():
            t0 = time.perf_counter()
            images[k].append(generate_images(unet, vae, contexts, prompts, captions, sched, n, g, seed))
            seconds[k] += time.perf_counter() - t0
        if progress and i % 6 == 0:
            print(f"seed {i + 1}/{len(seeds)}", flush=True)
    rows = {}
    for k, (unet, sched, n, g) in configs.items():
        r = row(np.concatenate(images[k]), captions * len(seeds))
        r.pop("per_image_fidelity")
        per_image = seconds[k] / (len(seeds) * len(captions))
        r.update(sampler=sched, steps=n, guidance=g, seconds_per_image=per_image,
                 seconds_vs_teacher=per_image / (seconds["teacher"] / (len(seeds) * len(captions))))
        rows[k] = r
    return rows, {k: np.concatenate(v[:1]) for k, v in images.items()}


FID_N = 400   # chapter 12's N


def fid_seeds(n=FID_N, per_seed=9):
    """EVAL_SEEDS continued until n images (per_seed held-out combinations each): 9100-9144 for 400."""
    return tuple(range(EVAL_SEEDS[0], EVAL_SEEDS[0] + -(-n // per_seed)))


def course_fid_features(clip, images):
    """Chapter 12's feature network: uint8 course images (N, 32, 32, 3) -> the course CLIP's 64-d
    image embedding before normalisation (N, 64), `clip.image(data.to_tensor(images))`."""
    from .. import data
    with torch.no_grad():
        return clip.image(data.to_tensor(images))


def held_out_fid(student, teacher, vae, contexts, prompts, teacher_sampling, clip, n=FID_N, lcm_steps=4,
                 progress=True):
    """FID at N = n, computed as chapter 12 computes it (`metrics.frechet_distance` of
    `course_fid_features`), for the LCM student at `lcm_steps` steps (guidance 1, as the table)
    and the teacher at its own settings, against n real images with the same captions; beside
    them the real-vs-real floor, a second real draw of those captions. The captions are the
    held-out combinations x `fid_seeds(n)` in the evaluation's order (one seed's 9 images at a time, the
    first 324 the very images of the table's rows), cut to n. The real images are drawn as
    chapter 12 draws its pair: `data.render` of each caption with numpy.random.default_rng(100),
    the second set with default_rng(101). Also chapter 12's own floor (its 400 real images
    `data.sample(400, seed=100)` against their second draw): the number the chapter shows.
    Returns a dict for the eval JSON."""
    import time
    import numpy as np
    from .. import data, metrics
    captions = [data.caption(*c) for c in data.HELD_OUT]
    seeds = fid_seeds(n, len(captions))
    configs = {f"lcm_{lcm_steps}": (student, "lcm", lcm_steps, 1.0),
               "teacher": (teacher, teacher_sampling["sampler"], teacher_sampling["steps"],
                           teacher_sampling["guidance"])}
    images = {k: [] for k in configs}
    t0 = time.time()
    for i, seed in enumerate(seeds):
        for k, (unet, sched, steps, g) in configs.items():
            images[k].append(generate_images(unet, vae, contexts, prompts, captions, sched, steps, g, seed))
        if progress and i % 9 == 0:
            print(f"FID: seed {i + 1}/{len(seeds)}", flush=True)
    all_captions = (captions * len(seeds))[:n]
    rng_real, rng_twin = np.random.default_rng(100), np.random.default_rng(101)
    real = np.stack([data.render(*data.parse(c), rng=rng_real) for c in all_captions])
    twin = np.stack([data.render(*data.parse(c), rng=rng_twin) for c in all_captions])
    f_real = course_fid_features(clip, real)
    out = {"n": n, "captions": f"the {len(captions)} held-out combinations x seeds {seeds[0]}-{seeds[-1]}, "
                               f"first {n}",
           "features": "the course CLIP's 64-d image embedding before normalisation (chapter 12)",
           "real_vs_real_floor": metrics.frechet_distance(f_real, course_fid_features(clip, twin))}
    for k, (unet, sched, steps, g) in configs.items():
        out[k] = {"fid": metrics.frechet_distance(f_real, course_fid_features(clip, np.concatenate(images[k])[:n])),
                  "sampler": sched, "steps": steps, "guidance": g}
    out[f"lcm_{lcm_steps}_vs_teacher"] = out[f"lcm_{lcm_steps}"]["fid"] / out["teacher"]["fid"]
    ch12_real, ch12_captions = data.sample(400, seed=100)
    rng = np.random.default_rng(101)
    ch12_twin = np.stack([data.render(*data.parse(c), rng=rng) for c in ch12_captions])
    out["chapter12_floor"] = metrics.frechet_distance(course_fid_features(clip, ch12_real),
                                                      course_fid_features(clip, ch12_twin))
    out["wall_seconds"] = round(time.time() - t0)
    return out


def cli_lcm(argv):
    """python -m minisd train lcm [--steps N] [--out PATH] [--evaluate] ..."""
    import argparse
    import json
    import time
    from pathlib import Path
    from ..checkpoint import course_path, course_unet, load_checkpoint, sampling_settings, save_checkpoint
    from .. import paths
    from ..paths import DATA_DIR
    from .unet import encode_course_data, frozen_course_models
    p = argparse.ArgumentParser(prog="python -m minisd train lcm",
                                description="Latent consistency distillation of the course U-Net (chapter 15): write "
                                            "data/course_lcm_unet.safetensors and data/course_lcm_log.json; with "
                                            "--evaluate, the few-step table data/course_lcm_eval.json.")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema-decay", type=float, default=0.95)
    p.add_argument("--skip", type=int, default=SKIP, help="k: timesteps the DDIM solver jumps (default 20)")
    p.add_argument("--loss", choices=["huber", "l2"], default="huber")
    p.add_argument("--guidance", type=float, default=None, help="the guidance folded in (default: the teacher's own)")
    p.add_argument("--images", type=int, default=4000, help="size of the pool of training latents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=DATA_DIR / "course_lcm_unet.safetensors")
    p.add_argument("--evaluate", action="store_true", help="after training (or alone, with --no-train), measure "
                   "1/2/4/8-step LCM against DDIM, DPM++ and the teacher; write OUT with _eval.json")
    p.add_argument("--no-train", action="store_true", help="only --evaluate (or --fid) the existing OUT")
    p.add_argument("--fid", action="store_true", help=f"also FID at N = {FID_N} as chapter 12 computes it: the "
                   "4-step LCM and the teacher against real images of the same held-out captions, beside the "
                   "real-vs-real floor; stored under 'fid' in OUT with _eval.json (the rest of that file is kept)")
    args = p.parse_args(argv)
    command = "python -m minisd train lcm " + " ".join(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    stem = args.out.stem.removesuffix("_unet")
    log_path, eval_path = args.out.with_name(stem + "_log.json"), args.out.with_name(stem + "_eval.json")
    teacher_sampling = sampling_settings(course_path("unet"))
    guidance = teacher_sampling["guidance"] if args.guidance is None else args.guidance
    vae, text_encoder, tokenizer = frozen_course_models()
    teacher = course_unet().requires_grad_(False)
    from .unet import course_prompts
    prompts = course_prompts()
    with torch.no_grad():
        contexts = text_encoder(tokenizer(prompts))
    if not args.no_train:
        t0, c0 = time.time(), time.process_time()
        latents, labels, contexts, prompts = encode_course_data(vae, text_encoder, tokenizer, args.images, args.seed)
        student, target, log = distill_lcm(teacher, latents, labels, contexts, prompts, guidance, args.steps,
                                           args.batch_size, args.lr, args.ema_decay, args.skip, args.loss,
                                           seed=args.seed)
        wall, cpu = time.time() - t0, time.process_time() - c0
        sampling = {"sampler": "lcm", "steps": 4, "guidance": 1.0}
        save_checkpoint(args.out, target, sampling=sampling, dtype=torch.float16,
                        metadata={"command": command, "weights": "target (EMA)", "teacher_guidance": str(guidance),
                                  "train_wall_seconds": f"{wall:.0f}", "train_cpu_seconds": f"{cpu:.0f}",
                                  "threads": str(args.threads)})
        paths.write_text(log_path, json.dumps({
            "command": command, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "ema_decay": args.ema_decay, "skip": args.skip, "loss_type": args.loss, "guidance": guidance,
            "images": args.images, "teacher_sampling": teacher_sampling, "train_wall_seconds": round(wall),
            "train_cpu_seconds": round(cpu), "threads": args.threads,
            "loss": [round(v, 6) for v in log["loss"]]}))
        print(f"distilled in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} threads); wrote {args.out}, {log_path}")
    if args.evaluate:
        student = load_checkpoint(args.out)
        t0 = time.time()
        rows, _ = evaluate_few_step(student, teacher, vae, contexts, prompts, teacher_sampling)
        from .. import data
        table = {"command": command, "held_out_combinations": len(data.HELD_OUT), "seeds": list(EVAL_SEEDS),
                 "threads": args.threads, "wall_seconds": round(time.time() - t0), "rows": rows}
        paths.write_text(eval_path, json.dumps(table, indent=1))
        for k, r in rows.items():
            print(f"{k:12s} colour {r['colour'][0]:.3f} shape {r['shape'][0]:.3f} position {r['position'][0]:.3f} "
                  f"fidelity {r['fidelity'][0]:.3f} [{r['fidelity'][1]:.3f}, {r['fidelity'][2]:.3f}] "
                  f"time x{r['seconds_vs_teacher']:.3f}", flush=True)
        print(f"wrote {eval_path}")
    if args.fid:
        from ..checkpoint import course_clip
        student = load_checkpoint(args.out)
        fid = held_out_fid(student, teacher, vae, contexts, prompts, teacher_sampling, course_clip().eval())
        fid.update(command=command, threads=args.threads)
        table = json.loads(eval_path.read_text()) if eval_path.exists() else {}
        table["fid"] = fid
        paths.write_text(eval_path, json.dumps(table, indent=1))
        print(f"FID at N = {fid['n']}: LCM 4 steps {fid['lcm_4']['fid']:.3f}, teacher {fid['teacher']['fid']:.3f} "
              f"(ratio {fid['lcm_4_vs_teacher']:.2f}), real vs real {fid['real_vs_real_floor']:.3f} "
              f"(chapter 12's floor {fid['chapter12_floor']:.3f}); {fid['wall_seconds']} s wall; wrote {eval_path}")
    return 0

