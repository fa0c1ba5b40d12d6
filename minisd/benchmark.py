"""`python -m minisd benchmark`: minisd vs diffusers on the same random weights, side by side.

One function per component (`--component unet | vae | pipeline`): it writes one random
weight file in the reference's format, times both libraries from that file to a ready model
(each in a fresh process, which also gives each side's own peak memory: the two things
torch.utils.benchmark does not measure), then times their forward passes interleaved in one
process on the very same tensors with torch.utils.benchmark.Timer, and prints medians and
ratios, wall and CPU time. diffusers runs twice: as users run it by default, and given the
one speed choice it offers on the CPU (`channels_last` memory). `--profile` prints where
minisd's U-Net step spends its time, per module, from torch.profiler (appendix "Making it fast").
"""
import argparse
import contextlib
import copy
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.utils.benchmark as benchmark
from tqdm.auto import tqdm

from . import paths, resnet, weights
from .clip import CLIPTextConfig
from .pipeline import StableDiffusion
from .tokenizer import CLIPTokenizer
from .attention import fuse_qkv_projections
from .unet import UNet, UNetConfig
from .vae import VAEConfig
from .weights import random_weights

# diffusers and transformers are the reference; they come with the test extra
MISSING_REFERENCE = ("python -m minisd benchmark compares minisd with diffusers and transformers, which are not "
                     "installed: install the test extra with  pip install -e '.[test]'  (or pip install diffusers "
                     "transformers)")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _Clocks:
    """A clock for torch.utils.benchmark.Timer that returns wall seconds, synchronising CUDA
    first (a custom timer replaces Timer's own synchronising one), and also notes the
    process's CPU seconds (all threads) at each tick: Timer reads the clock before and after
    each block of calls, so the last 2n ticks belong to the last n blocks."""

    def __init__(self, device):
        self.device, self.cpu = device, []

    def __call__(self):
        _sync(self.device)
        self.cpu.append(time.process_time())
        return time.perf_counter()


def per_call(step, device, threads):
    """Seconds per call of step(), wall and CPU, from Timer.blocked_autorange (which warms up,
    sets the thread count and picks how many calls make a block); medians over its blocks."""
    clocks = _Clocks(device)
    timer = benchmark.Timer("step()", globals={"step": step}, num_threads=threads, timer=clocks)
    m = timer.blocked_autorange(min_run_time=0.5)
    ticks = clocks.cpu[-2 * len(m.raw_times):]
    cpu = [(b - a) / m.number_per_run for a, b in zip(ticks[::2], ticks[1::2])]
    return m.median, statistics.median(cpu)


def _interleaved(steps, device, repeats):
    """Each named step measured `repeats` times by per_call, the sides alternating (ABBA...):
    medians of wall and CPU seconds per call, and every round's wall seconds."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    runs = {name: [] for name in steps}
    names = list(steps)
    for r in tqdm(range(repeats), desc="interleaved rounds", leave=False):
        for name in (names if r % 2 == 0 else names[::-1]):
            runs[name].append(per_call(steps[name], device, threads))
    return {name: dict(wall=statistics.median(w for w, _ in v), cpu=statistics.median(c for _, c in v),
                       walls=[w for w, _ in v]) for name, v in runs.items()}


def _print_medians(med, label):
    print(f"\n{label}:")
    for side, m in med.items():
        print(f"  {side:26s} {m['wall']:8.3f} s wall  {m['cpu']:8.3f} s CPU   (rounds: "
              + " ".join(f"{w:.3f}" for w in m["walls"]) + ")")
    ratios = {}
    for side in med:
        if side != "minisd":
            ratios[side] = (med["minisd"]["wall"] / med[side]["wall"], med["minisd"]["cpu"] / med[side]["cpu"])
            print(f"  ratio minisd / {side:17s} {ratios[side][0]:.3f} (wall), {ratios[side][1]:.3f} (CPU time)")
    return ratios


# --- U-Net ---------------------------------------------------------------------------

def _unet_load_and_step(side, folder, size, device, dtype, batch, context_dim):
    """In a fresh process: weight file -> ready model (seconds), then one step; peak memory."""
    device, dtype = torch.device(device), getattr(torch, dtype)
    if side == "minisd":
        start = time.perf_counter()  # the clock starts after the library's import
        model = weights.load_unet_folder(folder).to(device, dtype).eval()
        step = lambda x, t, c: model(x, t, c)  # noqa: E731
    else:
        from diffusers import UNet2DConditionModel
        start = time.perf_counter()
        model = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
        step = lambda x, t, c: model(x, t, encoder_hidden_states=c).sample  # noqa: E731
    _sync(device)
    load_s = time.perf_counter() - start
    x, ctx = _unet_inputs(context_dim, batch, size, device, dtype)
    with torch.no_grad():
        step(x, torch.tensor([500] * batch, device=device), ctx)
    _sync(device)
    return load_s, _peak_memory_gib(device)


def _unet_inputs(context_dim, batch, size, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, context_dim, generator=g).to(device, dtype)
    return x, ctx


def _fresh_process_loads(target, folder, *args):
    spawn = multiprocessing.get_context("spawn")
    loads = {}
    for side in ("minisd", "diffusers"):
        with spawn.Pool(1) as pool:
            loads[side] = pool.apply(target, (side, folder, *args))
        print(f"  {side:9s} load {loads[side][0]:6.2f} s   peak memory {loads[side][1]:5.2f} GiB")
    print(f"  ratio     load {loads['minisd'][0] / loads['diffusers'][0]:6.2f}    "
          f"peak memory {loads['minisd'][1] / loads['diffusers'][1]:5.2f}")
    return loads


def _channels_last_copy(model):
    """A second diffusers model in channels_last memory, sharing no storage with the first."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def step_flops(config, batch, size):
    """The multiply-adds x 2 of one U-Net step, counted by torch.utils.flop_counter on the meta
    device (no memory, no time): the numerator of the model FLOP utilisation."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unet = UNet(config).eval()
        x, ctx = torch.randn(batch, config.in_channels, size, size), torch.randn(batch, 77, config.context_dim)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor([500] * batch), ctx)
    return counter.get_total_flops()


def bench_unet(device, dtype, sizes, repeats, batch=2, tiny=False, compile=False, compile_mode=None,
               fuse_qkv=False):
    """minisd.UNet vs diffusers' UNet2DConditionModel at SD 1.5 size (or the tiny config for
    a smoke run), on the same random weights. `fuse_qkv` adds both models with their q/k/v
    projections fused (diffusers' fuse_qkv_projections) as two more sides; `compile_mode` is
    torch.compile's mode for `compile` ("reduce-overhead": CUDA graphs)."""
    from diffusers import UNet2DConditionModel

    config = UNetConfig.tiny() if tiny else UNetConfig.sd15()
    print(f"U-Net, {'tiny' if tiny else 'SD 1.5'} config, random weights, batch {batch}, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads, medians of {repeats} interleaved rounds")
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            theirs = UNet2DConditionModel(**config.to_diffusers())
        theirs.load_state_dict(random_weights(theirs), assign=True)
        theirs.save_pretrained(tmp)  # config.json + diffusion_pytorch_model.safetensors
        del theirs
        print(f"\nweight file -> ready model, then one step at 4x{max(sizes)}x{max(sizes)} (fresh process each):")
        loads = _fresh_process_loads(_unet_load_and_step, tmp, max(sizes), device, dtype, batch, config.context_dim)
        theirs = UNet2DConditionModel.from_pretrained(tmp, torch_dtype=getattr(torch, dtype)).to(device).eval()
    ours = weights.load_unet(theirs.state_dict(), config).eval()  # the very same tensors
    theirs_cl = _channels_last_copy(theirs)
    if fuse_qkv:
        ours_fused = fuse_qkv_projections(copy.deepcopy(ours))
        theirs_fused = copy.deepcopy(theirs)
        theirs_fused.fuse_qkv_projections()
    results = {}
    for size in sizes:
        x, ctx = _unet_inputs(config.context_dim, batch, size, torch.device(device), getattr(torch, dtype))
        x_cl = x.contiguous(memory_format=torch.channels_last)
        t = torch.tensor([500] * batch, device=device)
        with torch.no_grad():
            diff = float((ours(x, t, ctx) - theirs(x, t, encoder_hidden_states=ctx).sample).abs().max())
            sides = {
                "minisd": lambda: ours(x, t, ctx),
                "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx).sample,
                "diffusers channels_last": lambda: theirs_cl(x_cl, t, encoder_hidden_states=ctx).sample,
            }
            if fuse_qkv:
                sides["minisd fused qkv"] = lambda: ours_fused(x, t, ctx)
                sides["diffusers fused qkv"] = lambda: theirs_fused(x, t, encoder_hidden_states=ctx).sample
            med = _interleaved(sides, device, repeats)
        ratios = _print_medians(med, f"step at {batch}x4x{size}x{size} (max |diff| minisd - diffusers = {diff:.1e})")
        flops = step_flops(config, batch, size)
        results[size] = dict(medians=med, ratios=ratios, max_diff=diff, flops=flops)
        print(f"  {flops / 1e12:.3f} TFLOP per step (counted): minisd runs at "
              f"{flops / med['minisd']['wall'] / 1e12:.3f} TFLOP/s")
        if fuse_qkv:
            results[size]["fused_ratio"] = med["minisd fused qkv"]["wall"] / med["diffusers fused qkv"]["wall"]
            print(f"  fused q/k/v on both sides: minisd / diffusers {results[size]['fused_ratio']:.3f}")
        if compile:
            pair = (ours_fused, theirs_fused) if fuse_qkv else (ours, theirs)  # compiled: the fastest eager pair
            results[size]["compiled"] = _compiled_steps(*pair, x, t, ctx, device, repeats, med, compile_mode)
    return dict(loads=loads, steps=results)


@contextlib.contextmanager
def _fresh_compile_cache():
    """An empty TorchInductor cache folder for the duration: a first call then pays the whole
    compile, as on a user's first run, instead of reading kernels an earlier run left in /tmp."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="minisd-inductor-") as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def _compiled_steps(ours, theirs, x, t, ctx, device, repeats, eager, mode=None):
    """The same step through torch.compile (`mode`, None: the default) on both sides: the first
    call's seconds (tracing and code generation) and the compiled medians next to the eager ones."""
    compiled = {"minisd": torch.compile(ours, mode=mode), "diffusers": torch.compile(theirs, mode=mode)}
    calls = {"minisd": lambda: compiled["minisd"](x, t, ctx),
             "diffusers": lambda: compiled["diffusers"](x, t, encoder_hidden_states=ctx).sample}
    first = {}
    with torch.no_grad(), _fresh_compile_cache():
        for side, call in calls.items():
            start = time.perf_counter()
            call()
            _sync(torch.device(device))
            first[side] = time.perf_counter() - start
        med = _interleaved(calls, device, repeats)
    ratios = _print_medians(med, f"torch.compile ({mode or 'default'} mode)")
    for side, m in med.items():
        print(f"  {side:9s} first call {first[side]:6.1f} s (compiling), then {eager[side]['wall'] / m['wall']:.2f}x "
              "its eager speed")
    return dict(medians=med, first_call=first, ratios=ratios)


# --- VAE decode ---------------------------------------------------------------------------

def bench_vae(device, dtype, sizes, repeats, tiny=False, **_):
    """minisd.AutoencoderKL.decode vs diffusers' AutoencoderKL.decode, latents (1, 4, s, s) -> an
    image 8s x 8s, on the same random SD 1.5 weights."""
    import diffusers

    v = VAEConfig.tiny() if tiny else VAEConfig.sd15()
    dt = getattr(torch, dtype)
    print(f"VAE decode, {'tiny' if tiny else 'SD 1.5'} config, random weights, batch 1, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads, medians of {repeats} interleaved rounds")
    with torch.device("meta"):
        theirs = _diffusers_vae(diffusers, v)
    theirs.load_state_dict(random_weights(theirs), assign=True)
    theirs = theirs.to(device, dt).eval()
    ours = weights.load_vae(theirs.state_dict(), v).to(device, dt).eval()
    theirs_cl = _channels_last_copy(theirs)
    results = {}
    for size in sizes:
        z = torch.randn(1, v.latent_channels, size, size, generator=torch.Generator().manual_seed(0)).to(device, dt)
        z_cl = z.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            diff = float((ours.decode(z) - theirs.decode(z).sample).abs().max())
            med = _interleaved({"minisd": lambda: ours.decode(z),
                                "diffusers": lambda: theirs.decode(z).sample,
                                "diffusers channels_last": lambda: theirs_cl.decode(z_cl).sample}, device, repeats)
        pixels = size * v.factor
        ratios = _print_medians(med, f"decode {size}x{size} latents -> {pixels}x{pixels} image "
                                     f"(max |diff| minisd - diffusers = {diff:.1e})")
        results[size] = dict(medians=med, ratios=ratios, max_diff=diff)
    return dict(decode=results)


def _diffusers_vae(diffusers, v):
    n = len(v.block_out_channels)
    return diffusers.AutoencoderKL(block_out_channels=list(v.block_out_channels), layers_per_block=v.layers_per_block,
                                   norm_num_groups=v.norm_groups, down_block_types=["DownEncoderBlock2D"] * n,
                                   up_block_types=["UpDecoderBlock2D"] * n)


# --- the whole pipeline -------------------------------------------------------------------

def _pipeline_load(side, folder, device, dtype):
    """In a fresh process: a diffusers folder -> the three parts ready (seconds); peak memory."""
    device, dtype = torch.device(device), getattr(torch, dtype)
    if side == "minisd":
        start = time.perf_counter()
        parts = StableDiffusion.from_pretrained(folder, device=device, dtype=dtype)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel
        start = time.perf_counter()
        parts = [UNet2DConditionModel.from_pretrained(f"{folder}/unet", torch_dtype=dtype).to(device),
                 AutoencoderKL.from_pretrained(f"{folder}/vae", torch_dtype=dtype).to(device),
                 CLIPTextModel.from_pretrained(f"{folder}/text_encoder", torch_dtype=dtype).to(device)]
    _sync(device)
    del parts  # held until here: the peak counts all three parts in memory at once, on both sides
    return time.perf_counter() - start, _peak_memory_gib(device)


def bench_pipeline(device, dtype, sizes, repeats, tiny=False, **_):
    """Text to image end to end, minisd.StableDiffusion vs diffusers' StableDiffusionPipeline on
    the same random SD 1.5 weights: PNDM, guidance 7.5, 4 steps at 256x256 on the CPU (the latent
    size is the first of `sizes` x 8), 30 steps at 512x512 on CUDA."""
    import diffusers
    import transformers

    unet_config = UNetConfig.tiny() if tiny else UNetConfig.sd15()
    vae_config = VAEConfig.tiny() if tiny else VAEConfig.sd15()
    text_config = CLIPTextConfig.tiny() if tiny else CLIPTextConfig.sd15()
    steps = 30 if device == "cuda" else 4
    size = (64 if device == "cuda" else sizes[0]) if not tiny else 8
    pixels = size * vae_config.factor
    print(f"pipeline, {'tiny' if tiny else 'SD 1.5'} config, random weights, {pixels}x{pixels}, {steps} PNDM steps, "
          f"guidance 7.5, {dtype}, {device}, {torch.get_num_threads()} threads, medians of {repeats} interleaved rounds")
    c = text_config
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            parts = {
                "unet": diffusers.UNet2DConditionModel(**unet_config.to_diffusers()),
                "vae": _diffusers_vae(diffusers, vae_config),
                "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(
                    hidden_size=c.width, intermediate_size=c.mlp_width, num_hidden_layers=c.layers,
                    num_attention_heads=c.heads, hidden_act="quick_gelu")),
            }
        for name, model in parts.items():
            model.load_state_dict(random_weights(model), assign=True)
            model.save_pretrained(f"{tmp}/{name}", max_shard_size="1GB")  # shards: a lower peak while saving
        del parts
        print("\ndiffusers folder -> U-Net, VAE and text encoder ready (fresh process each):")
        loads = _fresh_process_loads(_pipeline_load, tmp, device, dtype)
        dt = getattr(torch, dtype)
        unet = diffusers.UNet2DConditionModel.from_pretrained(f"{tmp}/unet", torch_dtype=dt).to(device).eval()
        vae = diffusers.AutoencoderKL.from_pretrained(f"{tmp}/vae", torch_dtype=dt).to(device).eval()
        text = transformers.CLIPTextModel.from_pretrained(f"{tmp}/text_encoder", torch_dtype=dt).to(device).eval()
    # under float16 diffusers keeps the VAE in float16 and upcasts it for each decode (force_upcast);
    # minisd keeps its own copy in float32
    # ours holds the very same tensors, renamed: no second copy of the weights
    ours = StableDiffusion(*weights.from_diffusers(unet.state_dict(), vae.state_dict(), text.state_dict(),
                                                   unet_config, vae_config, text_config, device=device, dtype=dt))
    scheduler = diffusers.PNDMScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False))
    pipes = {"diffusers": diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)}
    if device == "cpu":  # diffusers' one CPU speed choice, on a copy: the first pipeline keeps its defaults
        pipes["diffusers channels_last"] = diffusers.StableDiffusionPipeline(
            vae=_channels_last_copy(vae), text_encoder=text, tokenizer=None, unet=_channels_last_copy(unet),
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    tokenizer = CLIPTokenizer.sd15()
    prompt = "a photograph of an astronaut riding a horse"
    x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0)).to(device, dt)

    def diffusers_run(pipe):  # their text encoder on the same token ids (diffusers needs a transformers tokenizer)
        embeds = text(tokenizer([prompt, ""]).to(device))[0]
        return pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], latents=x, height=pixels,
                    width=pixels, num_inference_steps=steps, guidance_scale=7.5, output_type="np").images

    def minisd_run():
        return ours(prompt, latents=x, height=pixels, width=pixels, steps=steps, guidance=7.5, scheduler="pndm",
                    output_type="np", progress=False)

    runs = {"minisd": minisd_run}
    runs.update({name: (lambda pipe=pipe: diffusers_run(pipe)) for name, pipe in pipes.items()})
    with torch.no_grad():
        diff = float(abs(minisd_run() - diffusers_run(pipes["diffusers"])).max())
        med = _interleaved(runs, device, repeats)
    ratios = _print_medians(med, f"text to image, end to end (max |diff| between the two images = {diff:.1e})")
    return dict(loads=loads, end_to_end=med, ratios=ratios, max_diff=diff)


# --- where the time goes -------------------------------------------------------------------

PROFILED = ("ResNetBlock", "SpatialTransformer", "SelfAttention", "CrossAttention", "FeedForward", "Downsample",
            "Upsample", "GSC", "Conv2d", "GroupNorm", "LayerNorm", "Linear", "TimestepEmbedding")


@contextlib.contextmanager
def plain_kernels():
    """minisd as it was before its CPU speed work, for a before/after profile: every Conv2d and
    Upsample through nn.Conv2d's convolution, the feed-forward in one piece (resnet.FAST_CPU)."""
    resnet.FAST_CPU = False
    try:
        yield
    finally:
        resnet.FAST_CPU = True


def profile_unet(device, dtype, size, batch=2, tiny=False, row_limit=30, plain=False):
    """One U-Net step under torch.profiler, each module of the kinds in PROFILED wrapped in a
    record_function named after its class: the table's rows are modules (their CPU total counts
    what runs inside them, nested modules included), then the operators. `plain`: under
    plain_kernels()."""
    if plain:
        with plain_kernels():
            return profile_unet(device, dtype, size, batch, tiny, row_limit)
    config = UNetConfig.tiny() if tiny else UNetConfig.sd15()
    from .unet import UNet
    with torch.device("meta"):
        model = UNet(config)
    model.load_state_dict(random_weights(model), assign=True)
    model = model.to(device, getattr(torch, dtype)).eval()
    labels = {}

    def enter(module, args):
        labels[id(module)] = torch.profiler.record_function(f"module: {type(module).__name__}")
        labels[id(module)].__enter__()

    def leave(module, args, out):
        labels.pop(id(module)).__exit__(None, None, None)

    hooks = []
    for module in model.modules():
        if type(module).__name__ in PROFILED:
            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    x, ctx = _unet_inputs(config.context_dim, batch, size, torch.device(device), getattr(torch, dtype))
    t = torch.tensor([500] * batch, device=device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad():
        model(x, t, ctx)  # warm-up
        with torch.profiler.profile(activities=activities) as prof:
            model(x, t, ctx)
    for h in hooks:
        h.remove()
    events = prof.key_averages()
    modules = [e for e in events if e.key.startswith("module: ")]
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"U-Net step {batch}x4x{size}x{size}, {'tiny' if tiny else 'SD 1.5'} config, {dtype}, {device}, "
          f"{'' if resnet.FAST_CPU else 'plain kernels (before), '}"
          f"{torch.get_num_threads()} threads: {total:.3f} s of CPU time profiled")
    print(f"\nper module (CPU total includes the modules nested inside):")
    print(f"  {'module':22s} {'calls':>6s} {'CPU total s':>12s} {'% of step':>10s}")
    rows = []
    for e in sorted(modules, key=lambda e: -e.cpu_time_total):
        name = e.key.removeprefix("module: ")
        rows.append(dict(module=name, calls=e.count, cpu_total_s=e.cpu_time_total / 1e6))
        print(f"  {name:22s} {e.count:6d} {e.cpu_time_total / 1e6:12.3f} {100 * e.cpu_time_total / 1e6 / total:9.1f}%")
    ops = [e for e in events if not e.key.startswith("module: ")]
    print("\nper operator (self CPU time):")
    op_rows = []
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:row_limit]:
        op_rows.append(dict(op=e.key, calls=e.count, self_cpu_s=e.self_cpu_time_total / 1e6))
        print(f"  {e.key:52s} {e.count:6d} {e.self_cpu_time_total / 1e6:8.3f} s "
              f"{100 * e.self_cpu_time_total / 1e6 / total:6.1f}%")
    return dict(total_cpu_s=total, modules=rows, ops=op_rows)


COMPONENTS = {"unet": bench_unet, "vae": bench_vae, "pipeline": bench_pipeline}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minisd benchmark",
                                     description="minisd vs diffusers on the same random SD 1.5 weights")
    parser.add_argument("--component", choices=sorted(COMPONENTS), default="unet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--sizes", default="32,64", help="latent sizes, comma-separated (default 32,64)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's own choice)")
    parser.add_argument("--compile", action="store_true",
                        help="U-Net only: also time both models through torch.compile")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"],
                        help="with --compile: torch.compile's mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--fuse-qkv", action="store_true",
                        help="U-Net only: also time both models with fused q/k/v projections")
    parser.add_argument("--profile", action="store_true",
                        help="instead of comparing: where minisd's U-Net step spends its time (torch.profiler), "
                             "at the largest of --sizes")
    parser.add_argument("--plain", action="store_true",
                        help="with --profile: minisd without its CPU speed choices (see plain_kernels), for a before/after")
    parser.add_argument("--tiny", action="store_true", help="the tiny config: a smoke run, not a benchmark")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    if args.dtype == "float16" and args.device == "cpu":
        parser.error("--dtype float16 needs --device cuda (fp16 convolutions on CPU are not what SD runs)")
    if args.compile and args.component != "unet":
        parser.error("--compile is measured for --component unet only")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads}: give a positive number of threads")
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.profile:
        result = profile_unet(args.device, args.dtype, max(sizes), tiny=args.tiny, plain=args.plain)
    else:
        try:
            import diffusers  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print(f"error: {MISSING_REFERENCE}", file=sys.stderr)
            return 1
        if args.compile_mode and not args.compile:
            parser.error("--compile-mode needs --compile")
        if args.fuse_qkv and args.component != "unet":
            parser.error("--fuse-qkv is measured for --component unet only")
        extra = dict(compile=True) if args.compile else {}
        if args.compile_mode not in (None, "default"):
            extra["compile_mode"] = args.compile_mode
        if args.fuse_qkv:
            extra["fuse_qkv"] = True
        result = COMPONENTS[args.component](args.device, args.dtype, sizes, args.repeats, tiny=args.tiny, **extra)
    if args.json:
        paths.write_text(args.json, json.dumps(result, indent=1))
    return 0
