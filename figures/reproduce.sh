#!/usr/bin/env bash
# Re-runs every experiment behind README.md's results and figures (about an hour on a 2-core CPU).
#   bash figures/reproduce.sh            # all of it
#   bash figures/reproduce.sh table      # only the sparsifier table runs (runs/table/...)
# Runs go two at a time, one thread each: on 2 cores that finishes sooner than one 2-thread run after another.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
export OMP_NUM_THREADS=1
run() {  # run OUT [--set KEY=VALUE ...]: one 30-round run, skipped when already finished
  local out=$1; shift
  if [ -f "$out/metrics.csv" ] && [ "$(($(wc -l < "$out/metrics.csv") - 1))" -ge 30 ]; then return; fi
  local resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)
  python main.py -c utils/conf.json --set global_epochs=30 "$@" --out "$out" "${resume[@]}"
}
if [ "$what" = all ] || [ "$what" = table ]; then
  for part in iid dirichlet; do (
    d=runs/table/$part
    p=(--set partition=$part)
    run $d/dense                    "${p[@]}" --set sparsifier=none
    run $d/random0.5-lambda         "${p[@]}" --set prop=0.5 --set aggregation=lambda
    run $d/random0.5-mean           "${p[@]}" --set prop=0.5 --set aggregation=mean
    run $d/random0.5-masked_mean    "${p[@]}" --set prop=0.5
    run $d/random0.1-fixed          "${p[@]}" --set prop=0.1
    run $d/random0.1-round          "${p[@]}" --set prop=0.1 --set mask=round
    run $d/topk0.01                 "${p[@]}" --set sparsifier=topk --set prop=0.01
    run $d/topk0.01-ef              "${p[@]}" --set sparsifier=topk --set prop=0.01 --set error_feedback=true
  ) > "runs/table-$part.log" 2>&1 &
  done
  wait
  python -m utils.plot runs/table/iid/* --table
  python -m utils.plot runs/table/dirichlet/* --table
fi
if [ "$what" = all ] || [ "$what" = gap ]; then  # ideas for closing top-k's gap to dense (IID)
  d=runs/gap
  tk=(--set sparsifier=topk --set error_feedback=true)
  ( run $d/topk0.01-ef-model              "${tk[@]}" --set prop=0.01 --set topk_scope=model
    run $d/topk0.01-ef-momentum0.9        "${tk[@]}" --set prop=0.01 --set server_momentum=0.9
    run $d/topk0.01-ef-decay0.5           "${tk[@]}" --set prop=0.01 --set residual_decay=0.5
  ) > runs/gap-1.log 2>&1 &
  ( run $d/topk0.01-ef-model-decay0.5     "${tk[@]}" --set prop=0.01 --set topk_scope=model --set residual_decay=0.5
    run $d/topk0.012-ef-model             "${tk[@]}" --set prop=0.012 --set topk_scope=model
  ) > runs/gap-2.log 2>&1 &
  ( run $d/topk0.01-ef-model-momentum0.5  "${tk[@]}" --set prop=0.01 --set topk_scope=model --set server_momentum=0.5
    run $d/topk0.01-ef-model-mean         "${tk[@]}" --set prop=0.01 --set topk_scope=model --set aggregation=mean
  ) > runs/gap-3.log 2>&1 &
  ( run $d/topk0.01-ef-model-momentum0.7  "${tk[@]}" --set prop=0.01 --set topk_scope=model --set server_momentum=0.7
  ) > runs/gap-4.log 2>&1 &
  ( run $d/topk0.0125-ef-model-momentum0.5 "${tk[@]}" --set prop=0.0125 --set topk_scope=model --set server_momentum=0.5
  ) > runs/gap-5.log 2>&1 &
  wait
  # a second seed for dense and the best variant: how much of the difference is noise
  ( run $d/seed1-dense                    --set seed=1 --set sparsifier=none
    run $d/seed1-topk0.01-ef              --set seed=1 "${tk[@]}" --set prop=0.01
  ) > runs/gap-6.log 2>&1 &
  ( run $d/seed1-topk0.01-ef-model-momentum0.5 --set seed=1 "${tk[@]}" --set prop=0.01 --set topk_scope=model \
      --set server_momentum=0.5
  ) > runs/gap-7.log 2>&1 &
  wait
  # random-k at the same byte budget: no index bytes, every entry gets its turn
  ( run $d/random0.025-round-ef           --set prop=0.025 --set mask=round --set error_feedback=true ) > runs/gap-8.log 2>&1 &
  ( run $d/random0.025-round              --set prop=0.025 --set mask=round ) > runs/gap-9.log 2>&1 &
  wait
  python -m utils.plot runs/table/iid/dense runs/table/iid/topk0.01 runs/table/iid/topk0.01-ef $d/* --table
fi
if [ "$what" = all ] || [ "$what" = figures ]; then
  # the chapter's figure on Fashion-MNIST: prop 1.0 / 0.8 / 0.5, 30 rounds
  python main.py -c utils/conf.json --set global_epochs=30 --sweep prop=1.0,0.8,0.5 --out runs/prop-sweep \
    $([ -f runs/prop-sweep/prop=1.0/checkpoint.pt ] && echo --resume)
  cp runs/prop-sweep/comparison.png figures/prop-sweep-fashion-mnist.png
  # the same sweep under the chapter's aggregation rule (global += lambda * sum of diffs)
  python main.py -c utils/conf.json --set global_epochs=30 --set aggregation=lambda --sweep prop=1.0,0.8,0.5 \
    --out runs/prop-sweep-lambda $([ -f runs/prop-sweep-lambda/prop=1.0/checkpoint.pt ] && echo --resume)
  cp runs/prop-sweep-lambda/comparison.png figures/prop-sweep-fashion-mnist-lambda.png
  for part in iid dirichlet; do
    python -m utils.plot runs/table/$part/dense runs/table/$part/random0.5-masked_mean runs/table/$part/random0.1-round \
      runs/table/$part/topk0.01 runs/table/$part/topk0.01-ef -o figures/sparsifiers-$part.png \
      --title "Fashion-MNIST, CNN, 10 clients, k=2, $part partition"
  done
fi
