"""Training the course CLIP (chapter 8): `python -m minisd train clip` and zero-shot accuracy."""
import math

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
    from .. import data, losses
    from ..clip import CLIP, CLIPConfig
    from ..tokenizer import CLIPTokenizer

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
        elif step == steps:  # the last redraw shows the final steps' mean, not the last logged one
            bar.set_postfix(loss=f"{total / (steps % log_every):.3f}", scale=f"{model.scale().item():.1f}")
    table.sparse = False
    return model.eval(), log


def clip_zero_shot_accuracy(model, images, captions):
    """Zero-shot classification of course images (chapter 8): each image gets the one of the 90
    course captions whose embedding is closest to its own; returns the fraction of images whose
    colour, shape, position (and whole caption) that caption gets right."""
    import torch
    from .. import data
    from ..tokenizer import CLIPTokenizer
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
    from .. import data
    return {"seen combinations": data.sample(n, seed=seed, exclude=data.HELD_OUT),
            "held-out combinations": data.sample(n, seed=seed + 1, only=data.HELD_OUT)}


def cli_clip(argv):
    """python -m minisd train clip [--steps N] [--out PATH] [--seed S] ..."""
    import argparse
    import json
    import time
    from pathlib import Path
    import torch
    from ..checkpoint import course_clip, save_checkpoint
    from ..paths import DATA_DIR
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
    save_checkpoint(args.out, model, dtype=torch.float16,   # float16: half the bytes, nothing measurable lost
                    metadata={"command": command, "train_wall_seconds": f"{wall:.0f}",
                              "train_cpu_seconds": f"{cpu:.0f}", "threads": str(args.threads),
                              "final_loss": f"{log['loss'][-1]:.4f}"})
    shipped = course_clip(args.out)  # evaluate what was written (float16 weights)
    results = {name: clip_zero_shot_accuracy(shipped, *test) for name, test in clip_test_sets().items()}
    print(json.dumps({k: {a: round(v, 4) for a, v in r.items()} for k, r in results.items()}, indent=1))
    print(f"trained in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} threads); "
          f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0
