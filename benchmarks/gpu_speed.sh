#!/usr/bin/env bash
# The GPU speed measurements of docs/benchmarks.md, in one go:
#   bash benchmarks/gpu_speed.sh <CIFAR-10 folder (image tree or batches)> <output folder> [cache dir]
# Each stage has its own time limit and writes its JSON as soon as it has a result.
set -u
data=$1 out=$2 cache=${3:-$(mktemp -d)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)" | tee -a "$out/gpu.txt"

# 1. images/s of the three pipelines, eager: ResNet18/50 x no CBAM / CBAM in every block
timeout 150 python3 benchmarks/throughput.py --data "$data" --cache-dir "$cache" --warmup 20 --steps 60 \
  --out "$out/throughput_eager.json" 2>&1 | grep -E '^\{|Error'
# 2. time to 94% / 95% test accuracy with experiment=fast (ResNet18, CBAM in every block, compiled)
timeout 170 python3 benchmarks/time_to_accuracy.py data.root="$data" data.download=false data.cache_dir="$cache" \
  --out "$out/time_to_accuracy_fast.json" 2>&1 | grep -E '^\{|Error'
# 3. the same throughput with torch.compile, ResNet18: Lightning against the bare loop, CBAM cost
timeout 150 python3 benchmarks/throughput.py --data "$data" --cache-dir "$cache" --compile --depths 18 \
  --pipelines lightning,plain --warmup 20 --steps 60 --out "$out/throughput_compile.json" 2>&1 | grep -E '^\{|Error'
