#!/usr/bin/env bash
# The checks behind the GPU numbers in chapter 11 and the README: run on a machine with an NVIDIA
# GPU and this repo's test dependencies. Writes its logs to ${OUT:-gpu_logs}/.
#   bash scripts/gpu_checks.sh
set -uo pipefail
out=${OUT:-gpu_logs}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
# 1. the gpu-marked tests (they skip on a machine without CUDA)
timeout 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/test_pipeline.py tests/test_unet.py 2>&1 | tee "$out/tests.txt"
# 2. the course model on the GPU from the command line
timeout 45 $py -m minisd generate "a red circle in the top left" --device cuda --dtype float16 --seed 0 \
    --out "$out/course_fp16.png" 2>&1 | tail -3 | tee "$out/generate.txt"
# 3. text to image end to end, SD 1.5 sizes, 512x512, 30 PNDM steps, fp16 (random weights)
timeout 150 $py -m minisd benchmark --component pipeline --device cuda --dtype float16 --repeats 3 \
    --json "$out/pipeline.json" 2>&1 | tee "$out/pipeline.txt"
# 4. one U-Net step at 64x64 latents (batch 2, as with guidance), eager and through torch.compile
timeout 220 $py -m minisd benchmark --component unet --device cuda --dtype float16 --sizes 64 --repeats 20 \
    --compile --json "$out/unet.json" 2>&1 | tee "$out/unet.txt"
