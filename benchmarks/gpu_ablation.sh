#!/usr/bin/env bash
# ResNet18 x no CBAM / CBAM in every block / CBAM before the classifier x seeds 0,1,2 with the fast recipe
# (24 epochs) on one GPU, several jobs side by side (Hydra's joblib launcher), then the sweep report into a
# results folder (results.csv/.md/.png, provenance.json; see results/README.md):
#   bash benchmarks/gpu_ablation.sh <CIFAR-10 folder> <sweep dir> <results dir> [more overrides, e.g. hydra.launcher.n_jobs=9]
# The data description written into the provenance is that of the JPEG copy this project measures on;
# set DATA_DESCRIPTION for other data.
set -u
data=$1 sweep=$2 results=$3
shift 3
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
python3 train.py -m experiment=fast hydra/launcher=joblib hydra.launcher.n_jobs=3 \
  model.depth=18 cbam=none,block,classifier seed=0,1,2 \
  data.root="$data" data.download=false data.val_size=5000 callbacks.best_checkpoint.monitor=val/acc \
  hydra.sweep.dir="$sweep" "$@"
python3 -m cbam.report "$sweep" --out "$results" \
  --data "${DATA_DESCRIPTION:-CIFAR-10 JPEG copy (quality 75), shared/data/cifar10-jpeg.tar.gz}"
