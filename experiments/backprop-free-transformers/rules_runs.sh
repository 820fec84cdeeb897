#!/usr/bin/env bash
# CPU-scale runs behind tables rules_source, rules_tune and rules_tuned (issue 12), one process at a time,
# one torch thread (2 shared CPU cores). The sources' settings are conf/experiment/bpf_rules_source_<r>.yaml
# (their epochs at scale=paper; `scale=cpu` picks the shorter budget of their `scales:` node):
#   source   Akrout et al. rows (bp fa wm kp): 10 of 400 epochs, compared with their own log at epoch 10;
#            Lee et al. rows (dtp tp) and LRA-E (lra): 3 of 100 epochs; one seed;
#            plain TP on 1 and 2 hidden layers (bpf_rules_source_tp_shallow): 1 epoch
#   probe    experiments/backprop-free-transformers/tp_probe.py (TP's first 500 steps, measured)
#   tune     bpf_rules_tune + bpf_rules_tune_kp: 1 epoch per learning rate, validation split, one seed
#   tuned    bpf_rules_tuned(_kp): the chosen learning rates, 3 seeds, 20 epochs (the first records: 5)
# Usage: experiments/backprop-free-transformers/rules_runs.sh [step ...]; then make tables and
#        python experiments/backprop-free-transformers/rule_card.py
set -euo pipefail
PY=${PY:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-$PWD} OMP_NUM_THREADS=1
# only settings that leave a run official (records under results/): no epoch overrides
CPU=(trainer.progress=false trainer.num_threads=1 trainer.resume=true)
run() { echo "== $(date +%T) $*"; nice -n 10 "$PY" run.py "$@" "${CPU[@]}"; }
for s in ${@:-source probe tune tuned}; do case $s in
  source) for r in bp fa wm kp dtp tp lra; do run experiment=bpf_rules_source_${r} scale=cpu; done
          run -m experiment=bpf_rules_source_tp_shallow scale=cpu ;;
  probe)  nice -n 10 "$PY" experiments/backprop-free-transformers/tp_probe.py ;;
  tune)   for e in bpf_rules_tune bpf_rules_tune_kp bpf_rules_tune_sgd bpf_rules_tune_sgd_inv; do run -m experiment=$e; done ;;
  tuned)  run -m experiment=bpf_rules_tuned; run -m experiment=bpf_rules_tuned_kp ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
