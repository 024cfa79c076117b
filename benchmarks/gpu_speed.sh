#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, in one call of under 8 minutes on an H100:
#   bash benchmarks/gpu_speed.sh [--quick] <CIFAR-10 folder (image tree or batches)> <output folder> [stage ...]
# Stages, in priority order (default: all but compiled50), each under a hard time limit, each writing its JSON (and
# log) into the output folder as soon as it has a result, so a run cut short keeps what came first.
# With the study stage, the others share the first ~4 minutes: compiled and tta then get little or no
# time; run them in a second call (`... <out2> compiled tta`: without study there is no reserve).
#   fused_check   benchmarks/check_fused_gpu.py, when present: the fused CBAM against the reference
#   throughput    ResNet18 lightning/plain/conventional x CBAM none/block x impl reference/fused, eager
#   host_ops      benchmarks/host_ops.py on the GPU: operations per CBAM block and per training step,
#                 plain / reference / fused at ResNet18 and ResNet50 (the count the CPU gives, checked)
#   profile       benchmarks/host_ops.py --profile: where the host time of one fused ResNet18 step goes
#                 (operators, Triton launches, the rest), and the kernels' device time
#   resnet50      ResNet50 plain loop, CBAM none/block x impl reference/fused, eager: throughput and peak
#                 memory at batch 512
#   compiled      ResNet18 plain + lightning x CBAM none/block x impl reference/fused, torch.compile
#   graphs        ResNet18 plain loop x CBAM none/block x impl reference/fused, torch.compile
#                 mode=reduce-overhead (CUDA graphs)
#   compiled50    ResNet50 plain loop x CBAM none/block x impl reference/fused, torch.compile default and
#                 reduce-overhead (the slowest to build: not in the default list, name it)
#   tta           experiment=fast (compiled, as the recipe says) until 94%/95% test accuracy
#   study         the last ~4 minutes: benchmarks/gpu_ablation.sh, ResNet18 x cbam none/block/classifier x
#                 seeds 0,1,2 with the 24-epoch fast recipe, nine jobs side by side; report in <out>/study/
# --quick: the same stages with tiny sizes on the CPU (a check of this script, not a measurement).
# Needs python3 with torch, lightning, torchmetrics; hydra-core/omegaconf importable (PYTHONPATH) for tta.
set -u
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
data=$1 out=$2
shift 2
stages=${*:-fused_check throughput host_ops profile resnet50 compiled graphs tta study}
mkdir -p "$out"
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
export PYTHONUNBUFFERED=1
started=$SECONDS
total=470 study_reserve=240   # seconds: the whole call, and what is kept for the study stage (if run)
case " $stages " in *" study "*) ;; *) study_reserve=0 ;; esac
[ $quick = 1 ] && study_reserve=0  # the CPU check runs every stage's command to its end (compiled: to its limit)
# the CPU check: each stage's limit x 4 and no overall limit (the CPU, and Triton's interpreter for the fused
# kernels, are far slower than the GPU the limits are set for)
scale=1
[ $quick = 1 ] && scale=4 total=100000

if [ $quick = 1 ]; then
  sizes=(--quick) tta_sizes=(--quick model.compile=false) impls=reference,auto  # a CPU compile takes minutes
  host_ops_sizes=(--device cpu --depths 18 --width 2) profile_sizes=(--quick) check_sizes=(--quick)
  study_overrides=(trainer=cpu model.compile=false model.width=4 model.reduction_ratio=4 data.batch_size=8
    data.val_size=16 data.loader=device trainer.max_epochs=1 +trainer.limit_train_batches=2
    +trainer.limit_val_batches=1 +trainer.limit_test_batches=1 hydra.launcher.n_jobs=2)
  export DATA_DESCRIPTION="the images given to gpu_speed.sh --quick (a check of the script, not a result)"
else
  sizes=(--warmup 10 --steps 30) tta_sizes=() impls=reference,fused
  host_ops_sizes=(--device cuda) profile_sizes=() check_sizes=()
  study_overrides=(hydra.launcher.n_jobs=9)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
python3 -c "import torch, triton, pytorch_lightning as pl; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, 'lightning', pl.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tee -a "$out/gpu.txt"

# limit <stage seconds>: that, cut to what is left before the study's reserve (the study: before the end)
limit() {
  local want=$(($1 * scale)) left=$((total - study_reserve - (SECONDS - started)))
  [ "$stage" = study ] && left=$((total - (SECONDS - started)))
  echo $(( want < left ? want : (left > 0 ? left : 0) ))
}

run_stage() {  # run_stage <seconds> <command ...>: under a hard limit, output into log.txt and <stage>.log
  local seconds
  seconds=$(limit "$1"); shift
  if [ "$seconds" -lt 10 ]; then
    echo "# stage $stage: skipped, no time left at $((SECONDS - started))s" | tee -a "$out/log.txt"
    return
  fi
  echo "# stage $stage: limit ${seconds}s, at $((SECONDS - started))s" | tee -a "$out/log.txt"
  timeout -k 10 "$seconds" "$@" > "$out/$stage.log" 2>&1
  local status=$?
  grep -E '^\{|^verdict|Error|error' "$out/$stage.log" | tail -40 | tee -a "$out/log.txt"
  echo "# stage $stage: exit $status after $((SECONDS - started))s" | tee -a "$out/log.txt"
}

throughput=(python3 benchmarks/throughput.py "${sizes[@]}" --cache-dir "$cache")
[ $quick = 1 ] || throughput+=(--data "$data")
for stage in $stages; do
  case $stage in
    fused_check)
      if [ -f benchmarks/check_fused_gpu.py ]; then
        run_stage 90 python3 benchmarks/check_fused_gpu.py "${check_sizes[@]}" --out "$out/fused_check.json"
      else
        echo "# stage fused_check: benchmarks/check_fused_gpu.py not present, skipped" | tee -a "$out/log.txt"
      fi ;;
    host_ops)
      run_stage 60 python3 benchmarks/host_ops.py "${host_ops_sizes[@]}" --out "$out/host_ops.json" ;;
    profile)
      run_stage 40 python3 benchmarks/host_ops.py --profile "${profile_sizes[@]}" --impl fused --out "$out/step_profile.json" ;;
    throughput)
      run_stage 70 "${throughput[@]}" --depths 18 --impl "$impls" --out "$out/throughput_eager.json" ;;
    resnet50)
      run_stage 40 "${throughput[@]}" --depths 50 --cbam none,block --impl "$impls" --pipelines plain \
        --out "$out/throughput_resnet50.json" ;;
    compiled)
      run_stage 150 "${throughput[@]}" --compile --depths 18 --impl "$impls" --pipelines plain,lightning \
        --out "$out/throughput_compile.json" ;;
    graphs)
      run_stage 120 "${throughput[@]}" --compile --compile-mode reduce-overhead --depths 18 --impl "$impls" \
        --pipelines plain --out "$out/throughput_graphs.json" ;;
    compiled50)
      for mode in default reduce-overhead; do  # stage names the log: one per mode
        stage=compiled50_$mode run_stage 120 "${throughput[@]}" --compile --compile-mode "$mode" --depths 50 \
          --impl "$impls" --pipelines plain --out "$out/throughput_compile50_$mode.json"
      done ;;
    tta)
      run_stage 200 python3 benchmarks/time_to_accuracy.py "${tta_sizes[@]}" data.root="$data" data.download=false \
        data.cache_dir="$cache" --out "$out/time_to_accuracy_fast.json" ;;
    study)
      # The 24-epoch fast-recipe placement study, nine jobs side by side; its report comes back in study/.
      run_stage 240 bash benchmarks/gpu_ablation.sh "$data" "$cache/study_sweep" "$out/study" "${study_overrides[@]}" ;;
    *) echo "unknown stage $stage (known: fused_check host_ops profile throughput resnet50 compiled graphs compiled50 tta study)" >&2; exit 2 ;;
  esac
done
echo "# done after $((SECONDS - started))s" | tee -a "$out/log.txt"
