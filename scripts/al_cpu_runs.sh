#!/usr/bin/env bash
# CPU-scale runs behind the committed associated-learning records (scale=cpu). The paper-scale configs
# are conf/experiment/al_table{2,3,4,56}.yaml (200 epochs, paper widths); here, on 2 shared CPU cores:
#   - MLPs at a quarter of the paper's width (n = 256: hidden 256-256-1280-256-256, 5n top bridge kept);
#     the vanilla CNN at the paper's size, lower AL bridges average-pooled to 4x4 (method.bridge_pool=4);
#   - training subsets and one epoch (set below per run; always the full test set), Adam lr 1e-3 for BP and AL alike (1e-4, the
#     paper's, leaves AL near chance in a few hundred steps: its sigmoid t side starts slowly);
#   - CIFAR-10 cells on cifar10_jpeg (lossy JPEG copy; real CIFAR-10 is not available offline).
# Then Table 7 / Figures 5-6 features from the CIFAR checkpoints: python -m bpfree.figures_al <records>.
# Usage: scripts/al_cpu_runs.sh [step ...]   steps: t2mlp t3mlp features_mlp t56 t3cnn features_cnn t2cnn t3resnet20
set -euo pipefail
PY=${PY:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-$PWD}
CPU=(scale=cpu trainer.progress=false optim.lr=1e-3)
MLP=(model=mlp1024 "model.hidden=[256,256,1280,256,256]")
run() { echo "== $*"; /usr/bin/time -f "wall %e s" nice -n 10 "$PY" run.py "$@" "${CPU[@]}"; }
steps=("${@:-t2mlp t3mlp features_mlp t56 t3cnn features_cnn t2cnn t3resnet20}")
for s in ${steps[@]}; do case $s in
  t2mlp) for m in bp al; do run experiment=al_table2 method=$m "${MLP[@]}" data.subset=20000 trainer.epochs=1; done ;;
  t3mlp) for m in bp al; do run experiment=al_table3 dataset=cifar10_jpeg method=$m "${MLP[@]}" data.subset=20000 trainer.epochs=1; done ;;
  t3cnn) run experiment=al_table3 dataset=cifar10_jpeg method=bp model=cnn data.subset=20000 trainer.epochs=1
         run experiment=al_table3 dataset=cifar10_jpeg method=al model=cnn method.bridge_pool=4 data.subset=20000 trainer.epochs=1 ;;
  t56)   run experiment=al_table56 column=1 "model.hidden=[256,1280,256]" data.subset=20000 trainer.epochs=1
         run experiment=al_table56 column=2 "model.hidden=[256,256,1280,256,256]" data.subset=20000 trainer.epochs=1
         run experiment=al_table56 column=3 "model.hidden=[256,256,256,1280,256,256,256]" data.subset=20000 trainer.epochs=1 ;;
  t2cnn) run experiment=al_table2 method=bp model=cnn data.subset=12800 trainer.epochs=1
         run experiment=al_table2 method=al model=cnn method.bridge_pool=4 data.subset=12800 trainer.epochs=1 ;;
  t3resnet20) run experiment=al_table3 dataset=cifar10_jpeg method=bp model=resnet20fc data.subset=12800 trainer.epochs=1
         run experiment=al_table3 dataset=cifar10_jpeg method=al model=resnet20fc method.bridge_pool=4 data.subset=12800 trainer.epochs=1 ;;
  features_mlp|features_cnn)
         nice -n 10 "$PY" -m bpfree.figures_al results/records/associated-learning/table3/{bp,al}-${s#features_}-cifar10_jpeg-s0.json ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
