"""Fused q/k/v projections on the CPU (issue 22): each SD 1.5 attention shape, plain and fused.

For every kind of attention layer in the SD 1.5 U-Net at 512x512 under guidance (batch 2:
self-attention over 4096, 1024, 256 and 64 tokens, cross-attention from those tokens to the 77
text tokens), one layer with random weights is timed by `torch.utils.benchmark` with its
projections plain and fused (`CrossAttention.fuse_projections`), alternating, best of two
`blocked_autorange` medians each. Writes the milliseconds and the layers' counts per step.

    PYTHONPATH=$PWD python scripts/measure_fused_qkv.py [--threads 2] [--out data/speed/fused_qkv.json]
"""
import argparse
import copy
import json
import platform

import torch
import torch.utils.benchmark as benchmark

from minisd.attention import CrossAttention, SelfAttention

# (channels, tokens, layers per step) of SD 1.5's SpatialTransformers at 64x64 latents:
# 2 down + 3 up at 64x64 and at 32x32, the same at 16x16, and the mid block's one at 8x8
SHAPES = [(320, 4096, 5), (640, 1024, 5), (1280, 256, 5), (1280, 64, 1)]


def time_ms(module, args, threads):
    timer = benchmark.Timer("m(*a)", globals=dict(m=module, a=args), num_threads=threads)
    return 1e3 * timer.blocked_autorange(min_run_time=1.0).median


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="data/speed/fused_qkv.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for dim, tokens, count in SHAPES:
        for kind in ("self", "cross"):
            plain = (SelfAttention(dim, 8) if kind == "self" else CrossAttention(dim, 768, 8)).eval()
            fused = copy.deepcopy(plain)
            fused.fuse_projections()
            x, context = torch.randn(2, tokens, dim), torch.randn(2, 77, 768)
            inputs = (x,) if kind == "self" else (x, context)
            with torch.no_grad():
                diff = float((plain(*inputs) - fused(*inputs)).abs().max())
                times = {"plain": [], "fused": []}
                for _ in range(2):
                    for name, m in (("plain", plain), ("fused", fused)):
                        times[name].append(time_ms(m, inputs, args.threads))
            row = dict(kind=kind, channels=dim, tokens=tokens, layers_per_step=count, max_diff=diff,
                       plain_ms=min(times["plain"]), fused_ms=min(times["fused"]))
            rows.append(row)
            print(f"{kind:5s} {dim:4d} ch x {tokens:4d} tokens: plain {row['plain_ms']:7.2f} ms, "
                  f"fused {row['fused_ms']:7.2f} ms (max |diff| {diff:.1e})", flush=True)
    per_step = {k: sum(r[f"{k}_ms"] * r["layers_per_step"] for r in rows) for k in ("plain", "fused")}
    print(f"per U-Net step: plain {per_step['plain']:.0f} ms, fused {per_step['fused']:.0f} ms")
    result = dict(threads=args.threads, torch=torch.__version__, machine=platform.machine(), rows=rows,
                  per_step_ms=per_step)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
