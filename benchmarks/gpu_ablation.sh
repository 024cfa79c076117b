#!/usr/bin/env bash
# ResNet18 x no CBAM / CBAM in every block / CBAM before the classifier x seeds 0,1,2 with the fast recipe
# on one GPU, three jobs at a time (Hydra's joblib launcher), then the sweep report:
#   bash benchmarks/gpu_ablation.sh <CIFAR-10 folder> <sweep dir> [more overrides, e.g. trainer.max_epochs=10]
set -u
data=$1 sweep=$2
shift 2
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
python3 train.py -m experiment=fast hydra/launcher=joblib hydra.launcher.n_jobs=3 \
  model.depth=18 cbam=none,block,classifier seed=0,1,2 \
  data.root="$data" data.download=false data.val_size=5000 callbacks.best_checkpoint.monitor=val/acc \
  hydra.sweep.dir="$sweep" "$@"
python3 -m cbam.report "$sweep"
