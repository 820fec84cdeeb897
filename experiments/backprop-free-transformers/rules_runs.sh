#!/usr/bin/env bash
# CPU-scale runs behind tables rules_source, rules_tune and rules_tuned (issue 12), one process at a time,
# one torch thread (2 shared CPU cores). The paper-scale settings are the experiment files themselves
# (conf/experiment/bpf_rules_source_*.yaml: the sources' epochs); here every run is shortened:
#   source   Akrout et al. rows (bp fa wm kp): 10 of 400 epochs, compared with their own log at epoch 10;
#            Lee et al. rows (dtp tp) and LRA-E (lra): $EPOCHS_SOURCE (default 3) of 100 epochs; one seed;
#            plain TP on 1 and 2 hidden layers (bpf_rules_source_tp_shallow): 1 epoch
#   probe    experiments/backprop-free-transformers/tp_probe.py (TP's first 500 steps, measured)
#   tune     bpf_rules_tune + bpf_rules_tune_kp: 1 epoch per learning rate, validation split, one seed
#   tuned    bpf_rules_tuned(_kp): the chosen learning rates, 3 seeds, $EPOCHS_TUNED (default 5, as mnist_rules) epochs
# Usage: experiments/backprop-free-transformers/rules_runs.sh [step ...]; then make tables and
#        python experiments/backprop-free-transformers/rule_card.py
set -euo pipefail
PY=${PY:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-$PWD} OMP_NUM_THREADS=1
EPOCHS_SOURCE=${EPOCHS_SOURCE:-3} EPOCHS_TUNED=${EPOCHS_TUNED:-5}
CPU=(scale=cpu trainer.progress=false trainer.num_threads=1 trainer.resume=true)
run() { echo "== $(date +%T) $*"; nice -n 10 "$PY" run.py "$@" "${CPU[@]}"; }
for s in ${@:-source probe tune tuned}; do case $s in
  source) for r in bp fa wm kp; do run experiment=bpf_rules_source_$r trainer.epochs=10; done
          for r in dtp tp lra; do run experiment=bpf_rules_source_$r trainer.epochs=$EPOCHS_SOURCE; done
          run -m experiment=bpf_rules_source_tp_shallow trainer.epochs=1 ;;
  probe)  nice -n 10 "$PY" experiments/backprop-free-transformers/tp_probe.py ;;
  tune)   for e in bpf_rules_tune bpf_rules_tune_kp bpf_rules_tune_sgd bpf_rules_tune_sgd_inv; do run -m experiment=$e; done ;;
  tuned)  run -m experiment=bpf_rules_tuned trainer.epochs=$EPOCHS_TUNED
          run -m experiment=bpf_rules_tuned_kp trainer.epochs=$EPOCHS_TUNED ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
