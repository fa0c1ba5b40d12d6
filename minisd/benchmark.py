"""`python -m minisd benchmark`: minisd vs diffusers on the same random weights, side by side.

One function per component (`bench_unet`; the VAE and the pipeline can join as
`bench_vae`, ... and a `--component` choice): it writes one random weight file in the
reference's format, times both libraries from that file to a ready model (each in a fresh
process, which also gives each side's own peak memory), then times their forward passes
interleaved in one process on the very same tensors, and prints medians and ratios.
"""
import argparse
import ctypes
import json
import math
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import paths, weights
from .clip import CLIPTextConfig
from .pipeline import StableDiffusion
from .tokenizer import CLIPTokenizer
from .unet import UNetConfig
from .vae import VAEConfig
from .weights import random_weights

# diffusers and transformers are the reference; they come with the test extra
MISSING_REFERENCE = ("python -m minisd benchmark compares minisd with diffusers and transformers, which are not "
                     "installed: install the test extra with  pip install -e '.[test]'  (or pip install diffusers "
                     "transformers)")


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    By default every buffer over a (dynamic, at most 32 MiB) threshold is its own mmap, given
    back on free, so each U-Net step page-faults its largest activations in again (~0.7M minor
    faults per 64x64 step). M_MMAP_MAX = 0 serves them from the heap, and a 1 GiB
    M_TRIM_THRESHOLD keeps the heap from shrinking after each step. Process-wide: it speeds
    up every library in the process alike, and the process keeps its peak memory until exit.
    The same as running with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824.
    Returns False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _timed_step(step, device):
    """Wall seconds, CPU seconds (all threads) and minor page faults of one call of step()."""
    _sync(device)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    step()
    _sync(device)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, after.ru_minflt - before.ru_minflt


def _interleaved(steps, device, repeats):
    """Time each named step `repeats` times, alternating the order (ABBA...), after a warm-up;
    medians of wall seconds, CPU seconds and minor page faults per step."""
    for step in steps.values():
        step()
    runs = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            runs[name].append(_timed_step(steps[name], device))
    return {name: dict(zip(("wall", "cpu", "faults"), map(statistics.median, zip(*v)))) for name, v in runs.items()}


# --- U-Net -----------------------------------------------------------------------------

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


def bench_unet(device, dtype, sizes, repeats, batch=2, tiny=False, keep_memory=False, compile=False):
    """minisd.UNet vs diffusers' UNet2DConditionModel at SD 1.5 size (or the tiny config for
    a smoke run), on the same random weights."""
    from diffusers import UNet2DConditionModel


    config = UNetConfig.tiny() if tiny else UNetConfig.sd15()
    print(f"U-Net, {'tiny' if tiny else 'SD 1.5'} config, random weights, batch {batch}, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads, medians of {repeats}"
          f"{', malloc keeps freed memory (both sides)' if keep_memory else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            theirs = UNet2DConditionModel(**config.to_diffusers())
        theirs.load_state_dict(random_weights(theirs), assign=True)
        theirs.save_pretrained(tmp)  # config.json + diffusion_pytorch_model.safetensors
        del theirs
        spawn = multiprocessing.get_context("spawn")
        print(f"\nweight file -> ready model, then one step at 4x{max(sizes)}x{max(sizes)} (fresh process each):")
        loads = {}
        for side in ("minisd", "diffusers"):
            with spawn.Pool(1, initializer=keep_freed_memory if keep_memory else None) as pool:
                loads[side] = pool.apply(_unet_load_and_step, (side, tmp, max(sizes), device, dtype, batch,
                                                            config.context_dim))
            print(f"  {side:9s} load {loads[side][0]:6.2f} s   peak memory {loads[side][1]:5.2f} GiB")
        print(f"  ratio     load {loads['minisd'][0] / loads['diffusers'][0]:6.2f}    "
              f"peak memory {loads['minisd'][1] / loads['diffusers'][1]:5.2f}")

        theirs = UNet2DConditionModel.from_pretrained(tmp, torch_dtype=getattr(torch, dtype)).to(device).eval()
    ours = weights.load_unet(theirs.state_dict(), config).eval()  # the very same tensors
    results = {}
    for size in sizes:
        x, ctx = _unet_inputs(config.context_dim, batch, size, torch.device(device), getattr(torch, dtype))
        t = torch.tensor([500] * batch, device=device)
        with torch.no_grad():
            med = _interleaved({
                "minisd": lambda: ours(x, t, ctx),
                "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx).sample,
            }, torch.device(device), repeats)
        ratio = med["minisd"]["wall"] / med["diffusers"]["wall"]
        cpu_ratio = med["minisd"]["cpu"] / med["diffusers"]["cpu"]
        results[size] = dict(medians=med, ratio=ratio, cpu_ratio=cpu_ratio)
        print(f"\nstep at 4x{size}x{size}:")
        for side, m in med.items():
            print(f"  {side:9s} {m['wall']:7.3f} s wall  {m['cpu']:7.3f} s CPU  {m['faults']:10,.0f} minor page faults")
        print(f"  ratio minisd/diffusers {ratio:.2f} (wall), {cpu_ratio:.2f} (CPU time)")
        if compile:
            results[size]["compiled"] = _compiled_steps(ours, theirs, x, t, ctx, device, repeats, med)
    return dict(loads=loads, steps=results)


def _compiled_steps(ours, theirs, x, t, ctx, device, repeats, eager):
    """The same step through torch.compile (default mode) on both sides: the first call's
    seconds (tracing and code generation) and the compiled medians next to the eager ones."""
    device = torch.device(device)
    compiled = {"minisd": torch.compile(ours), "diffusers": torch.compile(theirs)}
    calls = {"minisd": lambda: compiled["minisd"](x, t, ctx),
             "diffusers": lambda: compiled["diffusers"](x, t, encoder_hidden_states=ctx).sample}
    first = {}
    with torch.no_grad():
        for side, call in calls.items():
            first[side] = _timed_step(call, device)[0]
        med = _interleaved(calls, device, repeats)
    print("  torch.compile (default mode):")
    for side, m in med.items():
        print(f"  {side:9s} {m['wall']:7.3f} s wall compiled (first call {first[side]:5.1f} s), "
              f"{eager[side]['wall'] / m['wall']:.2f}x its eager speed")
    ratio = med["minisd"]["wall"] / med["diffusers"]["wall"]
    print(f"  ratio minisd/diffusers compiled {ratio:.2f} (wall)")
    return dict(medians=med, first_call=first, ratio=ratio)


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


def bench_pipeline(device, dtype, sizes, repeats, tiny=False, keep_memory=False):
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
          f"guidance 7.5, {dtype}, {device}, {torch.get_num_threads()} threads, medians of {repeats}")
    c, v = text_config, vae_config
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            parts = {
                "unet": diffusers.UNet2DConditionModel(**unet_config.to_diffusers()),
                "vae": diffusers.AutoencoderKL(
                    block_out_channels=list(v.block_out_channels), layers_per_block=v.layers_per_block,
                    norm_num_groups=v.norm_groups, down_block_types=["DownEncoderBlock2D"] * len(v.block_out_channels),
                    up_block_types=["UpDecoderBlock2D"] * len(v.block_out_channels)),
                "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(
                    hidden_size=c.width, intermediate_size=c.mlp_width, num_hidden_layers=c.layers,
                    num_attention_heads=c.heads, hidden_act="quick_gelu")),
            }
        for name, model in parts.items():
            model.load_state_dict(random_weights(model), assign=True)
            model.save_pretrained(f"{tmp}/{name}", max_shard_size="1GB")  # shards: a lower peak while saving
        del parts
        spawn = multiprocessing.get_context("spawn")
        print("\ndiffusers folder -> U-Net, VAE and text encoder ready (fresh process each):")
        loads = {}
        for side in ("minisd", "diffusers"):
            with spawn.Pool(1, initializer=keep_freed_memory if keep_memory else None) as pool:
                loads[side] = pool.apply(_pipeline_load, (side, tmp, device, dtype))
            print(f"  {side:9s} load {loads[side][0]:6.2f} s   peak memory {loads[side][1]:5.2f} GiB")
        print(f"  ratio     load {loads['minisd'][0] / loads['diffusers'][0]:6.2f}    "
              f"peak memory {loads['minisd'][1] / loads['diffusers'][1]:5.2f}")
        dt = getattr(torch, dtype)
        unet = diffusers.UNet2DConditionModel.from_pretrained(f"{tmp}/unet", torch_dtype=dt).to(device).eval()
        vae = diffusers.AutoencoderKL.from_pretrained(f"{tmp}/vae", torch_dtype=dt).to(device).eval()
        text = transformers.CLIPTextModel.from_pretrained(f"{tmp}/text_encoder", torch_dtype=dt).to(device).eval()
    # under float16 diffusers keeps the VAE in float16 and upcasts it for each decode (force_upcast);
    # minisd keeps its own copy in float32
    # ours holds the very same tensors, renamed: no second copy of the weights
    ours = StableDiffusion(*weights.from_diffusers(unet.state_dict(), vae.state_dict(), text.state_dict(),
                                                   unet_config, vae_config, text_config, device=device, dtype=dt))
    theirs = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=None, unet=unet,
        scheduler=diffusers.PNDMScheduler.from_config(dict(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    tokenizer = CLIPTokenizer.sd15()
    prompt = "a photograph of an astronaut riding a horse"
    x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0)).to(device, dt)

    def diffusers_run():  # their text encoder on the same token ids (diffusers needs a transformers tokenizer)
        embeds = text(tokenizer([prompt, ""]).to(device))[0]
        return theirs(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], latents=x, height=pixels,
                      width=pixels, num_inference_steps=steps, guidance_scale=7.5, output_type="np").images

    def minisd_run():
        return ours(prompt, latents=x, height=pixels, width=pixels, steps=steps, guidance=7.5, scheduler="pndm",
                    output_type="np", progress=False)

    with torch.no_grad():
        med = _interleaved({"minisd": minisd_run, "diffusers": diffusers_run}, torch.device(device), repeats)
        diff = float(abs(minisd_run() - diffusers_run()).max())
    ratio = med["minisd"]["wall"] / med["diffusers"]["wall"]
    print(f"\ntext to image, end to end (max |diff| between the two images = {diff:.1e}):")
    for side, m in med.items():
        print(f"  {side:9s} {m['wall']:7.3f} s wall  {m['cpu']:7.3f} s CPU  {m['faults']:10,.0f} minor page faults")
    print(f"  ratio minisd/diffusers {ratio:.2f} (wall), {med['minisd']['cpu'] / med['diffusers']['cpu']:.2f} (CPU time)")
    return dict(loads=loads, end_to_end=med, ratio=ratio, max_diff=diff)


COMPONENTS = {"unet": bench_unet, "pipeline": bench_pipeline}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minisd benchmark",
                                     description="minisd vs diffusers on the same random SD 1.5 weights")
    parser.add_argument("--component", choices=sorted(COMPONENTS), default="unet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--sizes", default="32,64", help="latent sizes, comma-separated (default 32,64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="mallopt: malloc keeps freed buffers (whole process, so both sides); see keep_freed_memory")
    parser.add_argument("--compile", action="store_true",
                        help="U-Net only: also time both models through torch.compile")
    parser.add_argument("--tiny", action="store_true", help="the tiny config: a smoke run, not a benchmark")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print(f"error: {MISSING_REFERENCE}", file=sys.stderr)
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    if args.dtype == "float16" and args.device == "cpu":
        parser.error("--dtype float16 needs --device cuda (fp16 convolutions on CPU are not what SD runs)")
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory needs glibc (Linux)")
    if args.compile and args.component != "unet":
        parser.error("--compile is measured for --component unet only")
    extra = dict(compile=True) if args.compile else {}
    result = COMPONENTS[args.component](args.device, args.dtype, sizes, args.repeats, tiny=args.tiny,
                                        keep_memory=args.keep_freed_memory, **extra)
    if args.json:
        paths.write_text(args.json, json.dumps(result, indent=1))
    return 0
