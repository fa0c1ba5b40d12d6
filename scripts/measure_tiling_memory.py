"""Big images on small machines (issue 22): peak memory and wall time at 1024x1024 on the CPU.

Each case runs in a fresh Python process (so that one case's freed memory cannot hide the next
one's peak), with SD 1.5-size models holding random weights (`minisd.weights.random_weights`):

- the VAE decoding one 1x4x128x128 latent (a 1024x1024 image), untiled and tiled
  (`vae.use_tiling`, what `StableDiffusion.enable_vae_tiling()` switches on);
- one U-Net step at 128x128 latents (batch 1, 77 context tokens), with and without attention
  slicing (`set_attention_slice(unet, "max")`: one (image, head) pair at a time);
- the same at 64x64 latents (512x512) with torch's MATH attention kernel forced, the kernel
  that builds the (heads, N, N) weights: where slicing has something to save. (Forced at
  128x128 it would need 8 x 16384^2 x 4 B = 8 GiB per weight matrix unsliced: not run.)

In each process the weights are made and the input drawn first; then the peak-RSS counter is
reset (`/proc/self/clear_refs`, Linux) and the call runs once under `torch.no_grad()`. Reported:
the resident memory before the call, the peak during it (`resource.getrusage` ru_maxrss), their
difference (what the call itself needs), the process's lifetime peak, and the call's wall time.

    PYTHONPATH=$PWD python scripts/measure_tiling_memory.py [--threads 2] [--out data/tiling_memory.json]
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time

CASES = {  # name -> what it measures
    "vae_decode": "SD 1.5 VAE decode 1x4x128x128 -> 1024x1024, untiled",
    "vae_decode_tiled": "SD 1.5 VAE decode 1x4x128x128 -> 1024x1024, tiled (64x64-latent tiles)",
    "unet_step": "SD 1.5 U-Net step, 1x4x128x128 latents, unsliced attention",
    "unet_step_sliced": "SD 1.5 U-Net step, 1x4x128x128 latents, attention slicing 'max'",
    "unet_step_math_64": "SD 1.5 U-Net step, 1x4x64x64 latents, MATH attention kernel, unsliced",
    "unet_step_math_64_sliced": "SD 1.5 U-Net step, 1x4x64x64 latents, MATH attention kernel, slicing 'max'",
}
TIMEOUT_S = {"vae_decode": 240, "vae_decode_tiled": 240, "unet_step": 180, "unet_step_sliced": 180,
             "unet_step_math_64": 120, "unet_step_math_64_sliced": 120}


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def measure(case, threads):
    """Run one case in this process; return its numbers as a dict."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from minisd.pipeline import set_attention_slice
    from minisd.unet import UNet, UNetConfig
    from minisd.vae import AutoencoderKL, VAEConfig
    from minisd.weights import load_into, random_weights

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    calls = []
    if case.startswith("vae"):
        with torch.device("meta"):
            model = AutoencoderKL(VAEConfig.sd15())
        load_into(model, random_weights(model)).eval()
        model.use_tiling = case == "vae_decode_tiled"
        model.decoder.register_forward_hook(lambda *_: calls.append(1))
        z = torch.randn(1, 4, 128, 128, generator=g)
        run = lambda: model.decode(z)  # noqa: E731
    else:
        with torch.device("meta"):
            model = UNet(UNetConfig.sd15())
        load_into(model, random_weights(model)).eval()
        set_attention_slice(model, "max" if case.endswith("sliced") else None)
        size = 64 if "math" in case else 128
        x, context = torch.randn(1, 4, size, size, generator=g), torch.randn(1, 77, 768, generator=g)
        kernel = sdpa_kernel(SDPBackend.MATH) if "math" in case else contextlib.nullcontext()

        def run():
            with kernel:
                return model(x, torch.tensor([500]), context)
    load_peak, before = peak_mib(), rss_mib()
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS := current RSS
        f.write("5")
    with torch.no_grad():
        start = time.perf_counter()
        out = run()
        wall = time.perf_counter() - start
    peak = peak_mib()
    return {"case": case, "what": CASES[case], "output_shape": list(out.shape),
            "tiles": len(calls) if case.startswith("vae") else None,
            "rss_before_mib": round(before), "peak_during_mib": round(peak),
            "extra_mib": round(peak - before), "process_peak_mib": round(max(load_peak, peak)),
            "wall_s": round(wall, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file (default: data/tiling_memory.json)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated cases to (re-)measure; the file keeps the others' rows")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(measure(args.case, args.threads)))
        return 0

    import torch

    from minisd import paths
    out = args.out or paths.DATA_DIR / "tiling_memory.json"
    cases = args.cases.split(",")
    if set(cases) - set(CASES):
        parser.error(f"unknown cases {sorted(set(cases) - set(CASES))}: choose from {', '.join(CASES)}")
    kept = json.loads(open(out).read())["cases"] if os.path.exists(out) else []
    rows = [r for r in kept if r["case"] in CASES and r["case"] not in cases]
    for case in cases:
        try:
            done = subprocess.run([sys.executable, __file__, "--case", case, "--threads", str(args.threads)],
                                  capture_output=True, text=True, timeout=TIMEOUT_S[case], env=os.environ)
        except subprocess.TimeoutExpired:
            rows.append({"case": case, "what": CASES[case], "skipped": f"longer than {TIMEOUT_S[case]} s"})
            print(f"{case}: skipped, longer than {TIMEOUT_S[case]} s", flush=True)
            continue
        if done.returncode:
            raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)

    rows.sort(key=lambda r: list(CASES).index(r["case"]))
    print(f"\n{'case':<26} {'before MiB':>10} {'peak MiB':>9} {'extra MiB':>9} {'process MiB':>11} {'wall s':>7} tiles")
    for r in rows:
        if "skipped" in r:
            print(f"{r['case']:<26} skipped: {r['skipped']}")
        else:
            print(f"{r['case']:<26} {r['rss_before_mib']:>10} {r['peak_during_mib']:>9} {r['extra_mib']:>9} "
                  f"{r['process_peak_mib']:>11} {r['wall_s']:>7} {r['tiles'] if r['tiles'] is not None else ''}")
    result = {"machine": {"torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count(),
                          "processor": platform.processor() or platform.machine()},
              "method": "one call per fresh process after the weights are made; peak RSS reset before the call "
                        "(/proc/self/clear_refs), then read with resource.getrusage (ru_maxrss)",
              "cases": rows}
    paths.write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
