#!/usr/bin/env bash
# The checks behind the GPU numbers in chapter 11, the appendix "Making it fast" and the README:
# run on a machine with an NVIDIA GPU and this repo's test dependencies. Logs go to ${OUT:-gpu_logs}/.
#   bash scripts/gpu_checks.sh          all six parts (about 12 minutes on an H200)
#   bash scripts/gpu_checks.sh 5 6      only parts 5 and 6 (one device call is at most 10 minutes)
set -uo pipefail
out=${OUT:-gpu_logs}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
parts=" ${*:-1 2 3 4 5 6} "
part() { [[ "$parts" == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

# 1. the gpu-marked tests (they skip on a machine without CUDA)
part 1 && timeout 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/test_pipeline.py tests/test_unet.py 2>&1 \
    | tee "$out/tests.txt"
# 2. the course model on the GPU from the command line
part 2 && timeout 45 $py -m minisd generate "a red circle in the top left" --device cuda --dtype float16 --seed 0 \
    --out "$out/course_fp16.png" 2>&1 | tail -3 | tee "$out/generate.txt"
# 3. text to image end to end, SD 1.5 sizes, 512x512, 30 PNDM steps, fp16 (random weights)
part 3 && timeout 150 $py -m minisd benchmark --component pipeline --device cuda --dtype float16 --repeats 3 \
    --json "$out/pipeline.json" 2>&1 | tee "$out/pipeline.txt"
# 4. one U-Net step at 64x64 latents (batch 2, as with guidance), eager and through torch.compile
part 4 && timeout 220 $py -m minisd benchmark --component unet --device cuda --dtype float16 --sizes 64 --repeats 20 \
    --compile --json "$out/unet.json" 2>&1 | tee "$out/unet.txt"
# 5. the same step with fused q/k/v on both sides (diffusers' fuse_qkv_projections), eager and then
#    compiled with CUDA graphs (mode reduce-overhead)
part 5 && timeout 300 $py -m minisd benchmark --component unet --device cuda --dtype float16 --sizes 64 --repeats 20 \
    --fuse-qkv --compile --compile-mode reduce-overhead --json "$out/unet_fused_graphs.json" 2>&1 \
    | tee "$out/unet_fused_graphs.txt"
# 6. model FLOP utilisation: counted FLOPs per step / median seconds / the GPU's dense fp16 peak
part 6 && $py - "$out" <<'PY' 2>&1 | tee "$out/mfu.txt"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
PEAK = 989e12  # H100/H200 SXM dense fp16 tensor-core FLOP/s (NVIDIA's data sheet, without sparsity)
for name in ("unet.json", "unet_fused_graphs.json"):
    if not (out / name).exists():
        continue
    step = json.loads((out / name).read_text())["steps"]["64"]
    rows = {side: m["wall"] for side, m in step["medians"].items()}
    rows.update({f"compiled {side}": m["wall"] for side, m in step.get("compiled", {}).get("medians", {}).items()})
    print(f"{name}: {step['flops'] / 1e12:.3f} TFLOP per guided step")
    for side, s in rows.items():
        print(f"  {side:32s} {1e3 * s:7.2f} ms  {1 / s:6.1f} it/s  MFU {step['flops'] / s / PEAK:6.1%}")
PY
exit 0
