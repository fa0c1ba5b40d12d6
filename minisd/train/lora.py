"""The course LoRA (chapter 13): `python -m minisd train lora --concept bar`, its evaluation and
rank sweep."""
from .. import paths
from ..lora import TARGETS as LORA_TARGETS
from .unet import course_prompts, course_sampling, frozen_course_models, judge_course_unet, warmup_cosine


def concept_prompts(concept):
    """The captions of a new concept (a shape of data.NEW_SHAPES: 30; a colour of data.NEW_COLOURS:
    15), in data.concept_combinations' order."""
    from .. import data
    return [data.caption(*c) for c in data.concept_combinations(concept)]


def lora_judge(concept="bar"):
    """The judge of chapter 13, used for the base model and the LoRA alike, on old prompts and new.

    For a new shape: the judge that knows data.SHAPES + data.NEW_SHAPES
    (data/course_judge_new_shapes.safetensors); for a new colour: the course judge with the
    palette data.COLOURS + that colour."""
    from .. import data, paths
    from ..metrics import NEW_SHAPES_JUDGE_FILE, Judge
    if concept in data.NEW_SHAPES:
        return Judge.load(paths.DATA_DIR / NEW_SHAPES_JUDGE_FILE)
    data.concept_combinations(concept)   # a clear error for a word that is no new concept
    return Judge.load(colours={**data.COLOURS, concept: data.NEW_COLOURS[concept]})


def encode_concept_data(vae, text_encoder, tokenizer, concept="bar", n_new=2000, n_old=4000, seed=0,
                        batch_size=500):
    """What the LoRA trains on, encoded once with the frozen VAE and text encoder (chapter 13).

    n_new images of the new concept (all its combinations) and n_old course images (the
    replay set: never a data.HELD_OUT combination), as scaled latents. Returns
    (latents, labels, contexts, prompts, is_new): prompts = the 90 course captions, "" and the
    new ones; labels (n_new + n_old,) index prompts/contexts; is_new (n,) bool.
    """
    import torch
    from .. import data
    new_images, new_captions = data.sample(n_new, seed=seed + 13, only=data.concept_combinations(concept))
    old_images, old_captions = data.sample(n_old, seed=seed + 14, exclude=data.HELD_OUT)
    import numpy as np
    images = np.concatenate([new_images, old_images])
    captions = new_captions + old_captions
    prompts = course_prompts() + concept_prompts(concept)
    with torch.no_grad():
        latents = torch.cat([vae.encode(data.to_tensor(images[i:i + batch_size])).mean
                             for i in range(0, len(images), batch_size)]) * vae.scaling_factor
        contexts = text_encoder(tokenizer(prompts))                       # (91 + new, 77, D)
    index = {p: i for i, p in enumerate(prompts)}
    labels = torch.tensor([index[c] for c in captions])
    is_new = torch.arange(len(captions)) < n_new
    return latents, labels, contexts, prompts, is_new


# the course LoRA's recipe (`python -m minisd train lora` with no options, and train_lora's
# defaults; chapter 13). What it reaches on "bar" and on orange is in the committed logs,
# data/course_lora_bar_log.json and data/course_lora_orange_log.json, and the rank sweep in
# data/course_lora_bar_rank_sweep.json. The replay, lr and all-attention variants that chose it
# were run by hand and not logged (chapter 13 says so), so no numbers of theirs are kept here.
LORA_COURSE = {"steps": 1000, "lr": 1e-2, "replay": 0.4, "targets": LORA_TARGETS, "only_cross": True}


def check_replay(replay):
    """`replay`, the share of each LoRA batch that is old course images, must lie in [0, 1)."""
    if not 0.0 <= replay < 1.0:
        raise ValueError(f"replay is the share of each batch that is old course images: give a number in [0, 1), "
                         f"e.g. {LORA_COURSE['replay']}; got {replay}")


def train_lora(unet, vae, text_encoder, tokenizer, concept="bar", rank=4, alpha=None, steps=LORA_COURSE["steps"],
               batch_size=32, lr=LORA_COURSE["lr"], seed=0, targets=LORA_COURSE["targets"],
               only_cross=LORA_COURSE["only_cross"], replay=LORA_COURSE["replay"], drop=0.1, n_new=2000, n_old=4000,
               progress=True, encoded=None):
    """Teach the course U-Net a shape or colour it never saw with a LoRA (chapter 13); returns (unet, log).

    `unet` gets LoRALinear layers (rank, alpha) on the `targets` projections; everything
    else is frozen, so only the LoRA factors train. Each step draws a batch of which a
    fraction `replay` are old course images with their captions (so the old prompts are
    not forgotten) and the rest images of the new concept, drops 10 % of the captions to ""
    (as the base model trained, for guidance), and takes an AdamW step on SD's loss
    ||eps - eps_theta(x_t, t, c)||^2. The learning rate warms up for 5 % of the steps and
    decays along a cosine (as chapter 9's loop).
    `encoded` takes `encode_concept_data`'s output to skip encoding. `log["loss"]` holds every
    step's loss.
    """
    import torch
    from tqdm import tqdm
    from .. import lora
    from ..diffusion import drop_captions, training_loss
    check_replay(replay)
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
    sched = warmup_cosine(opt, steps)
    index = {p: i for i, p in enumerate(prompts)}
    unet.train()
    log = {"loss": []}
    bar = tqdm(range(steps), desc=f"lora {concept} r{rank}", disable=not progress)
    for step in bar:
        pick = torch.cat([new_idx[torch.randint(len(new_idx), (batch_size - n_old_batch,), generator=g)],
                          old_idx[torch.randint(len(old_idx), (n_old_batch,), generator=g)]])
        captions = drop_captions([prompts[k] for k in labels[pick].tolist()], drop, g)
        loss = training_loss(unet, latents[pick], contexts[[index[c] for c in captions]], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log["loss"].append(loss.item())
        if step % 25 == 0 or step == steps - 1:  # the last redraw shows the final mean
            bar.set_postfix(loss=f"{sum(log['loss'][-25:]) / len(log['loss'][-25:]):.4f}")
    return unet.eval(), log


def fidelity_summary(images, captions):
    """`metrics.fidelity` of generated images against their captions, as chapter 13 reads it: the
    mean soft IoU with the caption's fitted ideal shape and its 95 % interval, [mean, lo, hi]
    (`metrics.mean_interval`), rounded to 4 decimals."""
    from .. import metrics
    return [round(v, 4) for v in metrics.mean_interval(metrics.fidelity(images, captions)["fidelity"])]


def evaluate_lora(unet, vae, text_encoder, tokenizer, concept="bar", new_seeds=tuple(range(6)),
                  old_seeds=(0, 1), judge=None, n_real=1000):
    """Judge a (LoRA or base) course U-Net on the new concept and on the old prompts (chapter 13).

    Generates (at the course U-Net's stored sampling settings, `course_sampling()`) one image per combination
    and seed: the new combinations x `new_seeds`, the 90 course ones x `old_seeds`, and
    lets `lora_judge(concept)` read them. Also
    the judge on n_real real images of each kind, the ceiling of what it can measure (None
    with n_real=0).
    And the judge on the VAE's reconstructions of those real images, decode(encode(x)): a
    latent model's ceiling (the course VAE spreads orange's hue and blurs a plus into a blob). Returns
    {"new": acc, "old": acc, "fidelity_new": fid, "fidelity_old": fid, "judge_on_real_new": acc,
    "judge_on_real_old": acc, "judge_on_vae_reconstructions_new": acc, "judge_on_vae_reconstructions_old": acc,
    "images_new": uint8, "captions_new": list}, each acc a dict colour/shape/position/all and each fid
    `fidelity_summary` of the same samples the judge read ([mean, lo, hi], `metrics.fidelity`).
    """
    import torch
    from .. import data
    judge = judge or lora_judge(concept)
    prompts = course_prompts() + concept_prompts(concept)
    with torch.no_grad():
        contexts = text_encoder(tokenizer(prompts))
    new, images_new, captions_new = judge_course_unet(unet, vae, contexts, prompts, judge,
                                                      data.concept_combinations(concept), seeds=tuple(new_seeds))
    old, images_old, captions_old = judge_course_unet(unet, vae, contexts, prompts, judge, data.combinations(),
                                                      seeds=tuple(old_seeds))
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
    return {"new": new, "old": old, "fidelity_new": fidelity_summary(images_new, captions_new),
            "fidelity_old": fidelity_summary(images_old, captions_old),
            "judge_on_real_new": real_new, "judge_on_real_old": real_old,
            "judge_on_vae_reconstructions_new": vae_new, "judge_on_vae_reconstructions_old": vae_old,
            "images_new": images_new, "captions_new": captions_new}




def _lora_size(unet_with_lora):
    """(bytes of the LoRA file that lora.save writes for this U-Net, its LoRA parameters)."""
    import os
    import tempfile
    import torch
    from .. import lora
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "lora.safetensors")
        lora.save(unet_with_lora, path, dtype=torch.float16)
        return os.path.getsize(path), lora.count_parameters(unet_with_lora)[0]


def lora_rank_sweep(ranks, concept="bar", steps=300, seed=0, progress=True, seeds=None, **train_kwargs):
    """Chapter 13's rank sweep: for each rank (and each training seed of `seeds`, default just
    `seed`), a fresh course U-Net, `steps` LoRA steps, then new-concept and old-prompt accuracy
    (fewer seeds than the main evaluation), parameters, file size and the size of the update
    (`delta_norm`: sqrt of the sum over layers of ||delta W||_F^2). The data are encoded once
    with `seed`. Returns a list of dicts."""
    import time
    import torch
    from .. import lora
    from ..checkpoint import course_unet
    seeds = (seed,) if seeds is None else tuple(seeds)
    vae, text_encoder, tokenizer = frozen_course_models()
    encoded = encode_concept_data(vae, text_encoder, tokenizer, concept, seed=seed)
    rows = []
    for rank in ranks:
        for s in seeds:
            unet = course_unet().requires_grad_(False)
            c0 = time.process_time()
            unet, _ = train_lora(unet, vae, text_encoder, tokenizer, concept, rank=rank, steps=steps, seed=s,
                                 encoded=encoded, progress=progress, **train_kwargs)
            cpu = time.process_time() - c0
            with torch.no_grad():
                delta = sum(float(m.delta_weight().pow(2).sum()) for m in unet.modules()
                            if isinstance(m, lora.LoRALinear)) ** 0.5
            file_bytes, params = _lora_size(unet)
            rows.append({"rank": rank, "seed": s, "params": params, "file_bytes": file_bytes,
                         **sweep_evaluation(unet, vae, text_encoder, tokenizer, concept),
                         "delta_norm": round(delta, 4), "train_cpu_seconds": round(cpu, 1)})
            if progress:
                print(f"rank {rank:3d} seed {s}: {params:7,d} parameters, {file_bytes:8,d} bytes, "
                      f"new {rows[-1]['new_accuracy']:.3f} (fidelity {rows[-1]['new_fidelity'][0]:.3f}), "
                      f"old {rows[-1]['old_accuracy']:.3f} (fidelity {rows[-1]['old_fidelity'][0]:.3f}), "
                      f"|dW| {delta:.3f}, {cpu:.0f} s CPU", flush=True)
    return rows


SWEEP_NEW_SEEDS, SWEEP_OLD_SEEDS = (0, 1, 2), (0,)   # the rank sweep's sampling seeds (fewer than the main LoRA's)


def sweep_evaluation(unet, vae, text_encoder, tokenizer, concept="bar"):
    """What the rank sweep records of one (LoRA or base) U-Net: `evaluate_lora` on the new
    combinations x SWEEP_NEW_SEEDS and the 90 old ones x SWEEP_OLD_SEEDS, no real images:
    {"new_accuracy", "old_accuracy"} (the judge, all three attributes right) and
    {"new_fidelity", "old_fidelity"} ([mean, lo, hi] of `metrics.fidelity` on the same samples)."""
    ev = evaluate_lora(unet, vae, text_encoder, tokenizer, concept, new_seeds=SWEEP_NEW_SEEDS,
                       old_seeds=SWEEP_OLD_SEEDS, n_real=0)
    return {"new_accuracy": round(ev["new"]["all"], 4), "old_accuracy": round(ev["old"]["all"], 4),
            "new_fidelity": ev["fidelity_new"], "old_fidelity": ev["fidelity_old"]}


def cli_lora(argv):
    """python -m minisd train lora --concept bar [...] | --weights PATH --images DIR [...]"""
    import argparse
    p = argparse.ArgumentParser(
        prog="python -m minisd train lora",
        description="Train a LoRA (chapter 13). Course mode (default): teach the course U-Net a new shape or "
                    "colour (--concept, from minisd.data.NEW_SHAPES or NEW_COLOURS) and write data/course_lora_<concept>.safetensors "
                    "and its _log.json. Real mode (--weights PATH --images DIR): fine-tune SD 1.x weights on a "
                    "folder of captioned images (also under torchrun).")
    p.add_argument("--concept", default="bar", help="course mode: the new shape (data.NEW_SHAPES) or colour "
                   "(data.NEW_COLOURS) to teach")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, update scale 1)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (course default {LORA_COURSE['steps']}, "
                   "real default 1000)")
    p.add_argument("--batch-size", type=int, default=None, help="course default 32, real default 1 per process")
    p.add_argument("--lr", type=float, default=None, help=f"course default {LORA_COURSE['lr']:g}, real default 1e-4")
    p.add_argument("--replay", type=float, default=None, help="course mode: the share of each batch that is old "
                   f"course images (default {LORA_COURSE['replay']})")
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
    p.add_argument("--sweep-seeds", default=None, help="course mode: comma-separated training seeds for each rank "
                   "of the sweep (default: --seed only)")
    p.add_argument("--sweep-alpha", type=float, default=None, help="course mode: one alpha for every rank of the "
                   "sweep (default: alpha = rank, update scale 1)")
    p.add_argument("--eval-only", action="store_true", help="course mode: train nothing; re-measure the existing "
                   "LoRA file (--out) and the base model as the main run does (judge and metrics.fidelity, same "
                   "seeds and sampling settings) and replace the 'evaluation' of its log (--log), keeping the rest")
    p.add_argument("--sweep-only", action="store_true", help="course mode: run only the rank sweep (no main LoRA, "
                   "nothing else written) and write it to --log (default data/course_lora_<concept>_rank_sweep.json)")
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
        from .lora_folder import cli_lora_real
        try:
            return cli_lora_real(args, argv)
        except (FileNotFoundError, ValueError) as e:   # bad input: the message says what to do, no traceback
            raise SystemExit(f"error: {e}") from None
    return _cli_lora_course(args, argv)


FIDELITY_NOTE = ("new_fidelity / old_fidelity and evaluation.fidelity: [mean, lo, hi] of metrics.fidelity (soft "
                 "IoU of the image's foreground with the caption's ideal shape at its fitted centre and size; real "
                 "images read about 0.998) on the same samples the judge read, 95 % interval mean -+ 1.96 s / sqrt(n)")


def _evaluation_record(concept, judge, before, after):
    """The log's "evaluation": `evaluate_lora` of the base model (`before`) and of the LoRA (`after`)
    at the stored sampling settings, the judge's rates and `metrics.fidelity` (mean, 95 % interval)."""
    from .. import data
    as_float = lambda acc: {k: round(float(v), 4) for k, v in acc.items()}  # noqa: E731
    n_combos = len(data.concept_combinations(concept))
    return {**course_sampling(), "judge_palette": list(judge.colours),
            "new_prompts": f"the {n_combos} {concept} combinations x 6 seeds",
            "old_prompts": "the 90 course combinations x 2 seeds",
            "base": {"new": as_float(before["new"]), "old": as_float(before["old"])},
            "lora": {"new": as_float(after["new"]), "old": as_float(after["old"])},
            "fidelity": {"base": {"new": before["fidelity_new"], "old": before["fidelity_old"]},
                         "lora": {"new": after["fidelity_new"], "old": after["fidelity_old"]},
                         "definition": FIDELITY_NOTE},
            "judge_on_real": {"new": as_float(after["judge_on_real_new"]),
                              "old": as_float(after["judge_on_real_old"])},
            "judge_on_vae_reconstructions": {"new": as_float(after["judge_on_vae_reconstructions_new"]),
                                             "old": as_float(after["judge_on_vae_reconstructions_old"])}}


def _eval_only(concept, out, log_path, unet_path, command, threads):
    """`--eval-only`: re-measure an existing LoRA file and the base model without training, and
    replace its log's "evaluation" (the rest of the log, loss and rank sweep included, is kept).
    The judge's rates are compared with the log's old ones: the samples are the same only if the
    course model and its sampling settings are those the log was made with."""
    import json
    import time
    from .. import lora, paths
    from ..checkpoint import course_unet
    for path, what in ((out, "LoRA file"), (log_path, "log")):
        if not path.exists():
            raise SystemExit(f"error: --eval-only re-measures an existing {what}, but {path} does not exist: train it "
                             f"first (python -m minisd train lora --concept {concept}) or give --out/--log")
    record = json.loads(log_path.read_text())
    c0, t0 = time.process_time(), time.time()
    vae, text_encoder, tokenizer = frozen_course_models()
    judge = lora_judge(concept)
    before = evaluate_lora(course_unet(unet_path).requires_grad_(False), vae, text_encoder, tokenizer, concept,
                           judge=judge)
    after = evaluate_lora(lora.load(course_unet(unet_path), out).eval(), vae, text_encoder, tokenizer, concept,
                          judge=judge)
    evaluation = _evaluation_record(concept, judge, before, after)
    old = record.get("evaluation", {})
    same = all(old.get(m, {}).get(k) == evaluation[m][k] for m in ("base", "lora") for k in ("new", "old"))
    evaluation.update(command=command, threads=threads, cpu_seconds=round(time.process_time() - c0, 1),
                      wall_seconds=round(time.time() - t0, 1), judge_as_before=same)
    if not same:
        evaluation["judge_before_re_evaluation"] = {m: old.get(m) for m in ("base", "lora")}
    record["evaluation"] = evaluation
    paths.write_text(log_path, json.dumps(record, indent=1))
    print(json.dumps({k: evaluation[k] for k in ("base", "lora", "fidelity")}, indent=1))
    print(f"re-measured {out} in {evaluation['cpu_seconds']:.0f} s CPU ({evaluation['wall_seconds']:.0f} s wall); "
          f"the judge's rates {'are those the log had' if same else 'differ from the log'}; wrote {log_path}")
    return 0


def _cli_lora_course(args, argv):
    import json
    import time
    from pathlib import Path
    import torch
    from .. import data, lora, paths
    from ..checkpoint import course_path, course_unet
    if args.concept not in data.NEW_SHAPES and args.concept not in data.NEW_COLOURS:
        raise SystemExit(f"--concept {args.concept!r} is not a shape or colour the course data can draw but the base "
                         f"model never saw: choose a shape of {list(data.NEW_SHAPES)} or a colour of "
                         f"{list(data.NEW_COLOURS)}")
    command = "python -m minisd train lora " + " ".join(argv)
    torch.set_num_threads(args.threads)
    steps, batch_size, lr = args.steps or LORA_COURSE["steps"], args.batch_size or 32, args.lr or LORA_COURSE["lr"]
    replay = LORA_COURSE["replay"] if args.replay is None else args.replay
    try:
        check_replay(replay)                 # before the minutes of judging the base model
    except ValueError as e:
        raise SystemExit(f"error: --replay: {e}") from None
    n_combos = len(data.concept_combinations(args.concept))
    sweep_kwargs = dict(batch_size=batch_size, lr=lr, targets=LORA_COURSE["targets"],
                        only_cross=LORA_COURSE["only_cross"], replay=replay, alpha=args.sweep_alpha)
    sweep_seeds = None if args.sweep_seeds is None else [int(s) for s in args.sweep_seeds.split(",")]
    if args.sweep_only:
        if not args.rank_sweep:
            raise SystemExit("error: --sweep-only needs --rank-sweep, e.g. --rank-sweep 1,4,16")
        log_path = Path(args.log) if args.log else paths.DATA_DIR / f"course_lora_{args.concept}_rank_sweep.json"
        ranks = [int(r) for r in args.rank_sweep.split(",")]
        c0, t0 = time.process_time(), time.time()
        base = sweep_evaluation(course_unet().requires_grad_(False), *frozen_course_models(), args.concept)
        print(f"base model: new {base['new_accuracy']:.3f} (fidelity {base['new_fidelity'][0]:.3f}), "
              f"old {base['old_accuracy']:.3f} (fidelity {base['old_fidelity'][0]:.3f})", flush=True)
        rows = lora_rank_sweep(ranks, args.concept, steps=args.sweep_steps, seed=args.seed, seeds=sweep_seeds,
                               **sweep_kwargs)
        record = {"command": command, "concept": args.concept, "ranks": ranks,
                  "seeds": sweep_seeds or [args.seed],
                  "alpha": args.sweep_alpha if args.sweep_alpha is not None else "rank",
                  "steps": args.sweep_steps, "batch_size": batch_size, "lr": lr, "replay": replay,
                  "threads": args.threads,
                  "note": f"each (rank, seed) trained {args.sweep_steps} steps on the data of seed {args.seed}, "
                          f"judged on {n_combos} new combinations x 3 sampling seeds and 90 old x 1 "
                          f"({course_sampling()})",
                  "fidelity": FIDELITY_NOTE,
                  "cpu_seconds": round(time.process_time() - c0, 1), "wall_seconds": round(time.time() - t0, 1),
                  "base": base, "rank_sweep": rows}
        paths.write_text(log_path, json.dumps(record, indent=1))
        print(f"wrote {log_path} ({record['cpu_seconds']:.0f} s CPU)")
        return 0
    out = Path(args.out) if args.out else paths.DATA_DIR / f"course_lora_{args.concept}.safetensors"
    log_path = Path(args.log) if args.log else out.with_name(out.stem + "_log.json")
    unet_path = course_path("unet")
    if args.eval_only:
        return _eval_only(args.concept, out, log_path, unet_path, command, args.threads)
    vae, text_encoder, tokenizer = frozen_course_models()
    base = course_unet(unet_path).requires_grad_(False)
    judge = lora_judge(args.concept)
    print("judging the base model ...", flush=True)
    before = evaluate_lora(base, vae, text_encoder, tokenizer, args.concept, judge=judge)
    unet = course_unet(unet_path)
    t0, c0 = time.time(), time.process_time()
    unet, log = train_lora(unet, vae, text_encoder, tokenizer, args.concept, rank=args.rank, alpha=args.alpha,
                           steps=steps, batch_size=batch_size, lr=lr, seed=args.seed,
                           targets=LORA_COURSE["targets"], only_cross=LORA_COURSE["only_cross"],
                           replay=replay)
    wall, cpu = time.time() - t0, time.process_time() - c0
    lora.save(unet, out, dtype=torch.float16)   # float16, as community LoRA files are
    # evaluate what was written: the file loaded into a fresh copy of the base model
    shipped = lora.load(course_unet(unet_path), out).eval()
    after = evaluate_lora(shipped, vae, text_encoder, tokenizer, args.concept, judge=judge)
    evaluation = _evaluation_record(args.concept, judge, before, after)
    n_lora, n_unet = lora.count_parameters(unet)
    sizes = {"lora_bytes": out.stat().st_size, "unet_bytes": unet_path.stat().st_size,
             "lora_parameters": n_lora, "unet_parameters": n_unet}
    sizes["ratio"] = round(sizes["lora_bytes"] / sizes["unet_bytes"], 5)
    sizes["lora_dtype"] = "float16"
    record = {"command": command, "concept": args.concept,
              "kind": "shape" if args.concept in data.NEW_SHAPES else "colour",
              "rank": args.rank, "alpha": args.alpha if args.alpha is not None else float(args.rank),
              "targets": list(LORA_COURSE["targets"]), "only_cross": LORA_COURSE["only_cross"],
              "replay": replay, "steps": steps, "batch_size": batch_size, "lr": lr,
              "seed": args.seed, "threads": args.threads, "train_cpu_seconds": round(cpu, 1),
              "train_wall_seconds": round(wall, 1), "evaluation": evaluation, "sizes": sizes,
              "loss": [round(v, 5) for v in log["loss"]]}
    if args.rank_sweep:
        ranks = [int(r) for r in args.rank_sweep.split(",")]
        record["rank_sweep_steps"] = args.sweep_steps
        record["rank_sweep_note"] = (f"each rank trained {args.sweep_steps} steps (the main LoRA: {steps}), "
                                     f"judged on {n_combos} new combinations x 3 seeds and 90 old x 1 seed")
        record["rank_sweep"] = lora_rank_sweep(ranks, args.concept, steps=args.sweep_steps, seed=args.seed,
                                               seeds=sweep_seeds, **sweep_kwargs)
    paths.write_text(log_path, json.dumps(record, indent=1))
    print(json.dumps(evaluation, indent=1))
    print(f"trained in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} threads); wrote {out} "
          f"({sizes['lora_bytes']:,d} bytes, {100 * sizes['ratio']:.2f} % of the U-Net's file) and {log_path}")
    return 0
