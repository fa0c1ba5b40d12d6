"""The CUDA side of `python -m minisd train lora --weights --images` (chapter 13), on a tiny random
SD 1.x single file: fp16 autocast + GradScaler and bf16 autocast train (finite losses, the LoRA moves, base
weights stay), an interrupted fp16 run resumed equals the uninterrupted one, and torchrun with one
process (nccl) runs unchanged. The tiny model is written as an original single file (no diffusers needed).
    python scripts/gpu_lora_check.py OUT_DIR
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minisd import StableDiffusion, data, lora, train, weights  # noqa: E402
from minisd.clip import CLIPTextConfig, CLIPTextEncoder  # noqa: E402
from minisd.unet import UNet, UNetConfig  # noqa: E402
from minisd.vae import AutoencoderKL, VAEConfig  # noqa: E402


def tiny_single_file(path):
    """A random tiny SD 1.x written as an original single file (SD's conventions, so that
    from_original reads every config number back from the shapes); no diffusers needed."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    unet = UNet(UNetConfig(block_channels=(32, 64), cross_attention=(True, False), heads=(8, 8), layers_per_block=1,
                           context_dim=64, groups=32, sample_size=8))
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                  norm_groups=32, sample_size=16))
    text = CLIPTextEncoder(CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=128))
    sd = weights.to_original(StableDiffusion(unet, vae, text))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_logs")
out.mkdir(parents=True, exist_ok=True)
work = Path("/tmp/lora_gpu")
pics = work / "pics"
pics.mkdir(parents=True, exist_ok=True)
sd = tiny_single_file(work / "tiny_sd.safetensors")
images, captions = data.sample(8, seed=5)
for i, (im, cap) in enumerate(zip(images, captions)):
    Image.fromarray(im).save(pics / f"img{i}.png")
    (pics / f"img{i}.txt").write_text(cap)
report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "torch": torch.__version__}


def run(name, **kw):
    args = dict(rank=4, steps=20, batch_size=2, lr=1e-3, resolution=16, save_every=5, progress=False, device="cuda" if torch.cuda.is_available() else "cpu")
    args.update(kw)
    t0 = time.time()
    unet, _, log = train.train_lora_folder(sd, pics, work / name, **args)
    torch.cuda.synchronize()
    factors = [p.detach().float().cpu() for p in lora.trainable_parameters(unet)]
    report[name] = {"losses_finite": bool(np.isfinite(log["loss"]).all()), "first_loss": log["loss"][0],
                    "last_loss": log["loss"][-1], "steps": len(log["loss"]), "seconds": round(time.time() - t0, 2),
                    "up_moved": bool(any(f.abs().sum() > 0 for f in factors[1::2])),
                    "base_dtype": str(next(unet.parameters()).dtype)}
    return factors


fp16 = run("fp16", mixed_precision="fp16")
run("bf16", mixed_precision="bf16")
run("fp16_cut", mixed_precision="fp16", max_steps_this_run=7)
resumed = run("fp16_cut", mixed_precision="fp16", resume=True)
report["fp16_resume_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(fp16, resumed))
cmd = ["torchrun", "--nproc_per_node", "1", "-m", "minisd", "train", "lora", "--weights", str(sd), "--images",
       str(pics), "--resolution", "16", "--steps", "10", "--batch-size", "2", "--output-dir", str(work / "torchrun"),
       "--save-every", "5"]
p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
report["torchrun_rc"] = p.returncode
report["torchrun_tail"] = (p.stdout + p.stderr)[-1500:]
report["torchrun_lora_written"] = (work / "torchrun" / "lora.safetensors").exists()
(out / "lora_gpu.json").write_text(json.dumps(report, indent=1))
print(json.dumps(report, indent=1))
