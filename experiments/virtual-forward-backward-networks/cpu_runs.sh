#!/usr/bin/env bash
# CPU-scale runs of virtual-forward-backward-networks (what is committed under
# results/records/virtual-forward-backward-networks/). One training process at a time, one thread.
#   experiments/virtual-forward-backward-networks/cpu_runs.sh [mnist] [table1]
# then `make tables`. PY=.venv/bin/python by default.
set -euo pipefail
PY=${PY:-.venv/bin/python}
COMMON="trainer.num_threads=1 trainer.progress=false"
steps=${*:-mnist table1}
for step in $steps; do
  case $step in
    mnist)  # Jaderberg et al.'s MNIST MLP check, every hidden layer decoupled: 6 rows x 3 seeds, 5 epochs
      $PY run.py -m experiment=vfbn_mnist_dni $COMMON  # bp, sg_linear (cDNI), vfbn (eq. 8), local_supervised
      $PY run.py -m experiment=vfbn_mnist_dni_nocontext $COMMON  # dni
      $PY run.py -m experiment=vfbn_mnist_dni_eq9 $COMMON        # vfbn_eq9
      ;;
    table1)  # Table 1 on resnet14_vfbn / cifar10_jpeg, 200 steps, one seed, seven rows
      for m in bp bottom_half_bp local_supervised vfbn a0 sg_linear sg_resnet; do
        if [ $m = a0 ]; then $PY run.py experiment=vfbn_table1_a0_cpu $COMMON  # vfbn_a0
        else $PY run.py experiment=vfbn_table1_cpu $COMMON method=$m; fi
      done
      ;;
    *) echo "unknown step $step (mnist | table1)" >&2; exit 2 ;;
  esac
done
