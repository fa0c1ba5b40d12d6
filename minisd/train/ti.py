"""Textual inversion on the course model (chapter 16): `python -m minisd train ti --concept bar`
learns the vector(s) of a new word `<bar>` with the U-Net, VAE and text encoder frozen, and
`python -m minisd train ti --compare` measures it against chapter 13's LoRA on the same prompts."""
from .. import paths
from types import SimpleNamespace

from torch import nn

from .lora import concept_prompts, lora_judge
from .unet import course_sampling, frozen_course_models, judge_course_unet, warmup_cosine

# the course recipe (`python -m minisd train ti` with no options): 1000 steps of batch 32, as the
# course LoRA, so the two see the same images (its CPU time is logged next to the LoRA's)
TI_COURSE = {"steps": 1000, "batch_size": 32, "lr": 5e-2, "vectors": 1}
# the comparison: >= 300 images of the new concept per model (bar: 30 combinations x 10 seeds;
# orange: 15 x 20) and the 90 old prompts x 4 seeds
COMPARE_NEW_IMAGES, COMPARE_OLD_SEEDS = 300, (0, 1, 2, 3)


def ti_token(concept):
    """The new word that stands for a concept: "<bar>", "<orange>"."""
    return f"<{concept}>"


def ti_prompt(caption, concept, token=None):
    """A course caption with the concept's word replaced by its token: "a red bar in the center" ->
    "a red <bar> in the center"."""
    token = token or ti_token(concept)
    return " ".join(token if w == concept else w for w in caption.split(" "))


class NewRows(nn.Module):
    """The token table while textual inversion trains: the V frozen rows and the n new ones, the only
    parameter. Looking up ids in cat([frozen, new]) is nn.Embedding's forward."""

    def __init__(self, table, n):
        super().__init__()
        self.register_buffer("frozen", table.weight[:-n].detach().clone(), persistent=False)   # (V, D)
        self.new = nn.Parameter(table.weight[-n:].detach().clone())                           # (n, D)

    def forward(self, ids):
        import torch
        import torch.nn.functional as F
        return F.embedding(ids, torch.cat([self.frozen, self.new]))


def init_vectors(tokenizer, text_encoder, word, n):
    """n copies of the mean row of `word`'s tokens: where textual inversion starts."""
    import torch
    ids = tokenizer.encode(word)
    return text_encoder.embeddings.token_embedding.weight[ids].detach().mean(0, keepdim=True).repeat(n, 1)


def encode_concept_images(vae, concept, n=2000, seed=0, batch_size=500):
    """n images of the concept (its data.concept_combinations), as scaled latents, and their captions:
    the same images as the course LoRA's new set (`encode_concept_data`, seed + 13)."""
    import torch
    from .. import data
    images, captions = data.sample(n, seed=seed + 13, only=data.concept_combinations(concept))
    with torch.no_grad():
        latents = torch.cat([vae.encode(data.to_tensor(images[i:i + batch_size])).mean
                             for i in range(0, len(images), batch_size)]) * vae.scaling_factor
    return latents, captions


def train_ti(unet, vae, text_encoder, tokenizer, concept="bar", vectors=TI_COURSE["vectors"], init=None,
             steps=TI_COURSE["steps"], batch_size=TI_COURSE["batch_size"], lr=TI_COURSE["lr"], seed=0, n=2000,
             encoded=None, progress=True):
    """Teach the frozen course model a concept as a new word (chapter 16); returns (token, log).

    Adds `<concept>` (`vectors` rows, each starting at the embedding of `init`, default the concept's
    own word, so step 0 is the base model) to `tokenizer` and `text_encoder`, then takes AdamW steps on
    SD's loss ||eps - eps_theta(x_t, t, c(y))||^2 where y is the caption with the word replaced by the
    token: the gradient flows through the frozen U-Net and text encoder into the new rows only. No
    caption dropout (the empty prompt does not contain the token). `log["loss"]` holds every step's loss.
    """
    import torch
    from tqdm import tqdm
    from .. import textual_inversion
    from ..diffusion import training_loss
    torch.manual_seed(seed)
    token = ti_token(concept)
    latents, captions = encoded or encode_concept_images(vae, concept, n, seed)
    start = init_vectors(tokenizer, text_encoder, init or concept, vectors)
    textual_inversion.add_tokens(tokenizer, text_encoder, token, start)
    unet.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    table = text_encoder.embeddings.token_embedding
    rows = NewRows(table, vectors)
    text_encoder.embeddings.token_embedding = rows
    prompts = sorted(set(captions))
    ids = tokenizer([ti_prompt(p, concept, token) for p in prompts])          # (P, 77)
    index = {p: i for i, p in enumerate(prompts)}
    labels = torch.tensor([index[c] for c in captions])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([rows.new], lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    log = {"loss": [], "norm": []}
    bar = tqdm(range(steps), desc=f"ti {concept}", disable=not progress)
    try:
        for step in bar:
            pick = torch.randint(len(latents), (batch_size,), generator=g)
            contexts = text_encoder(ids)                                          # (P, 77, D), through the new rows
            loss = training_loss(unet, latents[pick], contexts[labels[pick]], generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            log["loss"].append(loss.item())
            log["norm"].append(rows.new.detach().norm(dim=1).mean().item())
            if step % 25 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sum(log['loss'][-25:]) / len(log['loss'][-25:]):.4f}")
    finally:   # the table is a plain nn.Embedding again, with the learned rows
        table.weight.data[-vectors:] = rows.new.detach()
        text_encoder.embeddings.token_embedding = table
    return token, log


def concept_contexts(text_encoder, tokenizer, concept, token=None):
    """(contexts, prompts) for judge_course_unet: the concept's captions, "" and the 90 course ones,
    each caption's context computed from the caption with `token` in place of the concept's word
    (token None: the plain captions)."""
    import torch
    from .unet import course_prompts
    prompts = course_prompts() + concept_prompts(concept)
    texts = [ti_prompt(p, concept, token) if token else p for p in prompts]
    with torch.no_grad():
        return text_encoder(tokenizer(texts)), prompts


def measure(unet, vae, contexts, prompts, concept, combos, seeds, judge):
    """Generate one image per (combination, seed) (the course sampling settings, `course_sampling()`) and
    measure it: the judge (colour, shape, position, all three) with Wilson 95 % intervals, and the
    pixel measure `metrics.fidelity` (soft IoU with the caption's shape) with its mean's interval."""
    from .. import data, metrics
    acc, images, captions = judge_course_unet(unet, vae, contexts, prompts, judge, combos, seeds=tuple(seeds))
    n = len(images)
    row = {"n": n, "judge": {k: [round(v, 4), *(round(x, 4) for x in metrics.wilson_interval(round(v * n), n))]
                             for k, v in acc.items()}}
    shapes = data.SHAPES + tuple(s for s in data.NEW_SHAPES if s == concept)
    colours = tuple(data.COLOURS) + tuple(c for c in data.NEW_COLOURS if c == concept)
    fid = metrics.summarise_fidelity(metrics.fidelity(images, captions, shapes=shapes, colours=colours))
    row["pixel"] = {k: [round(float(x), 4) for x in v] if isinstance(v, list) else v for k, v in fid.items()}
    return row, images, captions


def compare(concepts=("bar", "orange"), progress=True):
    """Chapter 16's table: for each concept, the base model, chapter 13's LoRA (data/course_lora_<c>)
    and the textual inversion (data/course_ti_<c>) on the same prompts and seeds. New prompts: >= 300
    images; old prompts (the 90 course captions x 4 seeds): the LoRA and the base model (textual
    inversion leaves every prompt without its token exactly as it was: checked, not sampled)."""
    import torch
    from .. import data, lora, paths, textual_inversion
    from ..checkpoint import course_path, course_unet
    vae, text_encoder, tokenizer = frozen_course_models()
    out = {"sampling": course_sampling(), "concepts": {}}
    for concept in concepts:
        combos = data.concept_combinations(concept)
        seeds = range(-(-COMPARE_NEW_IMAGES // len(combos)))
        judge = lora_judge(concept)
        base = course_unet(course_path("unet")).requires_grad_(False)
        plain, prompts = concept_contexts(text_encoder, tokenizer, concept)
        lora_file = paths.DATA_DIR / f"course_lora_{concept}.safetensors"
        ti_file = paths.DATA_DIR / f"course_ti_{concept}.safetensors"
        with_lora = lora.load(course_unet(course_path("unet")), lora_file).eval().requires_grad_(False)
        te, tok = frozen_course_models()[1:]
        token = textual_inversion.load(SimpleNamespace(tokenizer=tok, text_encoder=te), ti_file)
        ti_ctx, _ = concept_contexts(te, tok, concept, token)
        old = [i for i, p in enumerate(prompts) if p not in concept_prompts(concept)]
        assert torch.equal(ti_ctx[old], plain[old]), "the prompts without the token must not change"
        rows = {}
        for name, unet, ctx in (("base", base, plain), ("lora", with_lora, plain), ("ti", base, ti_ctx)):
            if progress:
                print(f"{concept}: {name} ...", flush=True)
            rows[name] = {"new": measure(unet, vae, ctx, prompts, concept, combos, seeds, judge)[0]}
            if name != "ti":
                rows[name]["old"] = measure(unet, vae, ctx, prompts, concept, data.combinations(), COMPARE_OLD_SEEDS,
                                            lora_judge(concept))[0]
        rows["ti"]["old"] = "identical to base: the old prompts' contexts are bit-for-bit unchanged"
        out["concepts"][concept] = {"new_prompts": f"{len(combos)} combinations x {len(seeds)} seeds",
                                    "old_prompts": f"90 combinations x {len(COMPARE_OLD_SEEDS)} seeds",
                                    "files": {"lora": lora_file.name, "ti": ti_file.name}, **rows}
    return out


def cli_ti(argv):
    """python -m minisd train ti --concept bar [...] | --compare"""
    import argparse
    import json
    import time
    from pathlib import Path
    import torch
    from .. import data, paths, textual_inversion
    from ..checkpoint import course_path, course_unet
    p = argparse.ArgumentParser(
        prog="python -m minisd train ti",
        description="Textual inversion (chapter 16): teach the frozen course model a new shape or colour as a new "
                    "word <concept> and write data/course_ti_<concept>.safetensors (diffusers' learned_embeds "
                    "format) and its _log.json; or, with --compare, measure base / LoRA / textual inversion on "
                    "bar and orange and write data/course_ti_comparison.json.")
    p.add_argument("--concept", default="bar", help="the new shape (data.NEW_SHAPES) or colour (data.NEW_COLOURS)")
    p.add_argument("--vectors", type=int, default=TI_COURSE["vectors"], help="how many vectors the word gets")
    p.add_argument("--init", default=None, help="the word the vectors start from (default: the concept's word)")
    p.add_argument("--steps", type=int, default=TI_COURSE["steps"])
    p.add_argument("--batch-size", type=int, default=TI_COURSE["batch_size"])
    p.add_argument("--lr", type=float, default=TI_COURSE["lr"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the course LoRA)")
    p.add_argument("--out", default=None, help="default data/course_ti_<concept>.safetensors")
    p.add_argument("--compare", action="store_true", help="measure base, LoRA and TI on bar and orange (>= 300 "
                   "images each) and write data/course_ti_comparison.json (needs both TI files)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m minisd train ti " + " ".join(argv)
    if args.compare:
        missing = [f for c in ("bar", "orange") for f in (f"course_ti_{c}.safetensors", f"course_lora_{c}.safetensors")
                   if not (paths.DATA_DIR / f).exists()]
        if missing:
            raise SystemExit(f"error: --compare needs {missing} in data/: run `python -m minisd train ti --concept C` "
                             "and `python -m minisd train lora --concept C` first")
        t0 = time.time()
        table = compare()
        table["command"], table["wall_seconds"] = command, round(time.time() - t0, 1)
        path = paths.DATA_DIR / "course_ti_comparison.json"
        paths.write_text(path, json.dumps(table, indent=1))
        print(f"wrote {path} ({table['wall_seconds']:.0f} s)")
        return 0
    if args.concept not in data.NEW_SHAPES and args.concept not in data.NEW_COLOURS:
        raise SystemExit(f"error: --concept {args.concept!r} is not a shape or colour the course data can draw but the "
                         f"base model never saw: choose a shape of {list(data.NEW_SHAPES)} or a colour of "
                         f"{list(data.NEW_COLOURS)}")
    out = Path(args.out) if args.out else paths.DATA_DIR / f"course_ti_{args.concept}.safetensors"
    vae, text_encoder, tokenizer = frozen_course_models()
    unet = course_unet(course_path("unet"))
    encoded = encode_concept_images(vae, args.concept, seed=args.seed)
    t0, c0 = time.time(), time.process_time()
    token, log = train_ti(unet, vae, text_encoder, tokenizer, args.concept, vectors=args.vectors, init=args.init,
                          steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, encoded=encoded)
    wall, cpu = time.time() - t0, time.process_time() - c0
    pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder)
    textual_inversion.save(pipe, token, out)
    record = {"command": command, "concept": args.concept, "token": token, "vectors": args.vectors,
              "init": args.init or args.concept, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "seed": args.seed, "threads": args.threads, "train_cpu_seconds": round(cpu, 1),
              "train_wall_seconds": round(wall, 1), "file_bytes": out.stat().st_size,
              "trained_parameters": args.vectors * text_encoder.config.width,
              "loss": [round(v, 5) for v in log["loss"]], "norm": [round(v, 4) for v in log["norm"][::10]]}
    log_path = out.with_name(out.stem + "_log.json")
    paths.write_text(log_path, json.dumps(record, indent=1))
    print(f"trained {token} in {wall:.0f} s wall ({cpu:.0f} s CPU, {args.threads} threads); wrote {out} "
          f"({record['file_bytes']:,d} bytes) and {log_path}")
    return 0
