"""LoRA on real SD 1.x weights and a folder of captioned images (chapter 13):
`python -m minisd train lora --weights PATH --images DIR`, under torchrun too."""
from .. import paths
from ..lora import TARGETS as LORA_TARGETS

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
        from .. import data
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


def _numpy_rng_state():
    """numpy's global RNG state as plain Python and a tensor, so the checkpoint loads with
    torch.load(weights_only=True) (a numpy array would need the unsafe unpickler)."""
    import numpy as np
    import torch
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_rng(state):
    import numpy as np
    name, keys, pos, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached


def _python_rng(state):
    """random.getstate() after a round trip (a tuple may come back as a list)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


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
    import random
    import time
    from pathlib import Path
    import numpy as np
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from .. import lora
    from ..diffusion import NoiseSchedule, add_noise
    from ..pipeline import StableDiffusion

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
    if pipe.scheduler_config.prediction_type != "epsilon":
        raise ValueError(f"--weights {weights_path}: a {pipe.scheduler_config.prediction_type} model (SD 2.x at 768 px); "
                         "this trainer's loss is SD 1.x's epsilon MSE: use SD 1.x or an SD 2.x-base (epsilon) model")
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    if resolution % vae.config.factor:   # the VAE's factor: the U-Net takes any latent size
        raise ValueError(f"--resolution {resolution} must be a multiple of {vae.config.factor} for these weights")
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
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)   # tensors and plain Python only
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
        random.setstate(_python_rng(ck["rng"]["python"]))
        np.random.set_state(_numpy_rng(ck["rng"]["numpy"]))
        start, log = ck["step"], ck["log"]

    def checkpoint(step):
        if not main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        state = {"meta": meta, "step": step, "lora": [p.detach().cpu().clone() for p in params],
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "numpy": _numpy_rng_state()},
                 "log": log}
        paths.write_atomically(ckpt_path, lambda tmp: torch.save(state, tmp))  # a kill mid-write keeps the last one

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
            latents = post.sample(g).float() * scaling
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
        paths.write_text(output_dir / "log.json", json.dumps({
            "command": command, **meta, "lr": lr, "mixed_precision": mixed_precision, "device": str(device),
            "train_wall_seconds_last_run": round(time.time() - t0, 1),
            "train_cpu_seconds_last_run": round(time.process_time() - c0, 1), "lora_file": str(out),
            "lora_bytes": out.stat().st_size, "loss": log["loss"]}, indent=1))
    if world > 1:
        dist.barrier()
    log["steps_done"] = done
    return unet, text_encoder, log


def cli_lora_real(args, argv):
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
