#!/usr/bin/env bash
# The GPU speed measurements of docs/benchmarks.md:
#   bash benchmarks/gpu_speed.sh <CIFAR-10 folder (image tree or batches)> <output folder> [stage ...]
# Stages, run in the order given (default: throughput tta compile), each under its own time limit and
# writing its JSON or log into the output folder as soon as it has a result:
#   throughput   images/s, step time, MFU: lightning / plain / conventional x ResNet18, 50 x CBAM none, block
#   tta          experiment=fast: training seconds until 94% and 95% test accuracy
#   tta_compile  the same with model.compile=true (its one earlier GPU run did not learn)
#   compile      throughput with torch.compile, ResNet18, lightning and plain
#   profile      top GPU operators of ResNet18 with and without CBAM (what CBAM costs)
set -u
data=$1 out=$2
shift 2
stages=${*:-throughput tta compile}
mkdir -p "$out"
cache=$(mktemp -d)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)" | tee -a "$out/gpu.txt"
tta=(python3 benchmarks/time_to_accuracy.py data.root="$data" data.download=false data.cache_dir="$cache")
throughput=(python3 benchmarks/throughput.py --data "$data" --cache-dir "$cache" --warmup 20 --steps 60)
for stage in $stages; do
  case $stage in
    throughput) timeout 170 "${throughput[@]}" --out "$out/throughput_eager.json" ;;
    tta) timeout 170 "${tta[@]}" --out "$out/time_to_accuracy_fast.json" ;;
    tta_compile) timeout 200 "${tta[@]}" model.compile=true --out "$out/time_to_accuracy_fast_compile.json" ;;
    compile) timeout 170 "${throughput[@]}" --compile --depths 18 --pipelines lightning,plain --out "$out/throughput_compile.json" ;;
    profile) timeout 90 "${throughput[@]}" --depths 18 --pipelines plain --profile 5 > "$out/profile.txt" ;;
    *) echo "unknown stage $stage" >&2 ;;
  esac 2>&1 | grep -E '^\{|^#|Error|error' | tee -a "$out/log.txt"
done
rm -rf "$cache"
