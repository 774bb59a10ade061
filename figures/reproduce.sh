#!/usr/bin/env bash
# Re-runs the experiments behind the results and figures of README.md and docs/: 30-round runs of the default conf, two
# single-threaded runs at a time (on 2 cores that finishes sooner than one 2-thread run after another; another thread
# count can change the last digits). A finished run is skipped, an interrupted one resumed; each run's output goes to
# output.log in its folder.
#   bash figures/reproduce.sh              # everything
#   bash figures/reproduce.sh frontier     # compression methods, IID and Dirichlet(0.5), seed 0 (runs/frontier)
#   bash figures/reproduce.sh explore      # STC variants searched for the 100x target (runs/explore)
#   bash figures/reproduce.sh seeds        # the winners again on seed 1 (runs/seed1)
#   bash figures/reproduce.sh chapter      # the chapter's prop sweep, masked_mean and the chapter's lambda rule
#   bash figures/reproduce.sh twoway       # downloads too: relay and compressed, two seeds, and 100 clients (runs/twoway)
#   bash figures/reproduce.sh robust       # attacks against each defense, k=5 and k=2, dense and STC 4% (runs/robust)
#   bash figures/reproduce.sh methods      # QSGD, PowerSGD and the hybrid, two seeds; 100-round runs (runs/methods)
#   bash figures/reproduce.sh time         # time to accuracy on the simulated clock, re-timed under every preset
#   bash figures/reproduce.sh privacy      # DP-FedAvg, the shared mask and secure aggregation at 1000 clients
#   bash figures/reproduce.sh figures      # draw the figures and print the tables from finished runs
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1

if [ "${1:-}" = --one ]; then  # --one OUT [--rounds N] [--set KEY=VALUE ...]: one run, of 30 rounds unless told
  out=$2 rounds=30; shift 2
  if [ "${1:-}" = --rounds ]; then rounds=$2; shift 2; fi
  if [ -f "$out/metrics.csv" ] && [ "$(($(wc -l < "$out/metrics.csv") - 1))" -ge "$rounds" ]; then exit 0; fi
  resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)
  mkdir -p "$out"
  exec python main.py -c utils/conf.json --set global_epochs="$rounds" "$@" --out "$out" "${resume[@]}" \
    >> "$out/output.log" 2>&1
fi

what=${1:-all}
queue=()
job() { queue+=("$(printf '%q ' "$@")"); }  # job OUT [--set KEY=VALUE ...]
run_queue() {
  [ ${#queue[@]} -eq 0 ] ||
    printf '%s\n' "${queue[@]}" | xargs -d '\n' -P 2 -I{} bash -c 'bash figures/reproduce.sh --one {}'
  queue=()
}
stc=(--set sparsifier=topk --set topk_scope=model --set quantize=ternary --set error_feedback=true)
methods() {  # methods DIR [--set ...]: every method of the frontier table into DIR/<name>
  local d=$1; shift
  job "$d/dense"                "$@" --set sparsifier=none
  job "$d/stc0.01"              "$@" "${stc[@]}" --set prop=0.01
  job "$d/f16"                  "$@" --set sparsifier=none --set quantize=f16
  job "$d/int8"                 "$@" --set sparsifier=none --set quantize=int8
  job "$d/sign-ef"              "$@" --set sparsifier=none --set quantize=sign --set error_feedback=true
  job "$d/random0.5"            "$@" --set prop=0.5
  job "$d/random0.5-chapter"    "$@" --set prop=0.5 --set aggregation=lambda
  job "$d/topk0.01-ef"          "$@" --set sparsifier=topk --set prop=0.01 --set error_feedback=true
  job "$d/topk0.01-ef-model-m0.5" "$@" --set sparsifier=topk --set prop=0.01 --set error_feedback=true \
    --set topk_scope=model --set server_momentum=0.5
  job "$d/int8-topk0.025-ef"    "$@" --set sparsifier=topk --set topk_scope=model --set prop=0.025 \
    --set quantize=int8 --set error_feedback=true
  job "$d/stc0.0025"            "$@" "${stc[@]}" --set prop=0.0025
  job "$d/stc0.05"              "$@" "${stc[@]}" --set prop=0.05
}
if [ "$what" = all ] || [ "$what" = frontier ]; then
  methods runs/frontier/iid --set partition=iid
  methods runs/frontier/dirichlet --set partition=dirichlet
  run_queue
fi
if [ "$what" = all ] || [ "$what" = explore ]; then
  for part in iid dirichlet; do
    d=runs/explore/$part
    job $d/stc0.01-mean    --set partition=$part "${stc[@]}" --set prop=0.01 --set aggregation=mean
    job $d/stc0.04         --set partition=$part "${stc[@]}" --set prop=0.04
    job $d/stc0.04-mean    --set partition=$part "${stc[@]}" --set prop=0.04 --set aggregation=mean
    job $d/stc0.02         --set partition=$part "${stc[@]}" --set prop=0.02
    job $d/stc0.01-m0.5    --set partition=$part "${stc[@]}" --set prop=0.01 --set server_momentum=0.5
  done
  run_queue
fi
if [ "$what" = all ] || [ "$what" = seeds ]; then  # the winners again on seed 1: how much of a difference is noise
  for part in iid dirichlet; do
    d=runs/seed1/$part
    job $d/dense        --set seed=1 --set partition=$part --set sparsifier=none
    job $d/stc0.04      --set seed=1 --set partition=$part "${stc[@]}" --set prop=0.04
    job $d/stc0.04-mean --set seed=1 --set partition=$part "${stc[@]}" --set prop=0.04 --set aggregation=mean
    job $d/stc0.01-mean --set seed=1 --set partition=$part "${stc[@]}" --set prop=0.01 --set aggregation=mean
  done
  run_queue
fi
if [ "$what" = all ] || [ "$what" = chapter ]; then  # the chapter's figure: prop 1.0 / 0.8 / 0.5, both rules
  for prop in 1.0 0.8 0.5; do
    job runs/chapter/masked_mean/prop=$prop --set prop=$prop
    job runs/chapter/lambda/prop=$prop      --set prop=$prop --set aggregation=lambda
  done
  run_queue
fi
if [ "$what" = all ] || [ "$what" = twoway ]; then  # both directions coded: STC 4% uploads, relay or STC downloads
  down=(--set download=compressed)  # STC on the server's step: topk over the model, ternary, server residual
  job runs/frontier/iid/dense --set partition=iid --set sparsifier=none  # dense FedAvg, as the frontier runs it
  job runs/frontier/dirichlet/dense --set partition=dirichlet --set sparsifier=none
  for part in iid dirichlet; do job runs/seed1/$part/dense --set seed=1 --set partition=$part --set sparsifier=none; done
  for seed in 0 1; do
    d=runs/twoway/seed$seed
    job $d/iid/relay           --set seed=$seed --set partition=iid "${stc[@]}" --set prop=0.04 --set download=relay
    for p in 0.04 0.02 0.015 0.01; do
      job $d/iid/down$p        --set seed=$seed --set partition=iid "${stc[@]}" --set prop=0.04 "${down[@]}" \
        --set download_prop=$p
    done
    for p in 0.04 0.02; do
      job $d/dirichlet/down$p  --set seed=$seed --set partition=dirichlet "${stc[@]}" --set prop=0.04 \
        --set aggregation=mean "${down[@]}" --set download_prop=$p
    done
  done
  d=runs/twoway/cross-device  # 100 clients of 600 examples, 10 sampled per round: most rounds' clients are stale
  job $d/dense --set no_models=100 --set k=10 --set sparsifier=none
  job $d/down0.02 --set no_models=100 --set k=10 "${stc[@]}" --set prop=0.04 "${down[@]}" --set download_prop=0.02
  run_queue
fi
if [ "$what" = all ] || [ "$what" = robust ]; then  # attacks and defenses (runs/robust), in the order of the targets
  upload() {  # upload METHOD: the settings of dense or STC 4% uploads
    if [ "$1" = dense ]; then echo --set sparsifier=none; else echo "${stc[@]}" --set prop=0.04; fi
  }
  # the default-settings target: one hostile upload in round 1, no defense, k=2 (client 0 is sampled in round 1);
  # the honest runs are the frontier's dense and STC 4%
  job runs/frontier/iid/dense --set partition=iid --set sparsifier=none
  job runs/explore/iid/stc0.04 --set partition=iid "${stc[@]}" --set prop=0.04
  once=(--set attackers=1 --set attack_until=1)
  job runs/robust/round1/dense-fill1e30 --set sparsifier=none "${once[@]}" --set attack=fill --set attack_scale=1e30
  job runs/robust/round1/stc0.04-fill1e30 $(upload stc0.04) "${once[@]}" --set attack=fill --set attack_scale=1e30
  job runs/robust/round1/stc0.04-fill1e38 $(upload stc0.04) "${once[@]}" --set attack=fill --set attack_scale=1e38
  job runs/robust/round1/dense-count --set sparsifier=none "${once[@]}" --set attack=count
  job runs/robust/round1/default --set partition=iid  # the default conf itself: random 0.6 masks
  job runs/robust/round1/default-fill1e30 "${once[@]}" --set attack=fill --set attack_scale=1e30
  defenses="none norm_bound median trimmed_mean geometric_median"
  grid() {  # grid K NAME [--set ...]: one attack (or none) against every defense, dense and STC 4% uploads
    local k=$1 name=$2 method defense
    shift 2
    for method in dense stc0.04; do
      for defense in $defenses; do
        job runs/robust/k$k/$method/$name-$defense --set k=$k $(upload $method) --set defense=$defense "$@"
      done
    done
  }
  boost=(--set attack=scale --set attack_scale=100)
  for k in 5 2; do  # k=5 of 10: the best-defense target's setting; k=2: the default
    grid $k honest
    grid $k boost100 --set attackers=1 "${boost[@]}"
  done
  for k in 2 5; do grid $k 2boost100 --set attackers=2 "${boost[@]}"; done
  for k in 2 5; do
    grid $k signflip --set attackers=1 --set attack=sign_flip --set attack_scale=1
    grid $k noise100 --set attackers=1 --set attack=noise --set attack_scale=100
  done
  for k in 2 5; do
    grid $k 2signflip --set attackers=2 --set attack=sign_flip --set attack_scale=1
    grid $k 2noise100 --set attackers=2 --set attack=noise --set attack_scale=100
  done
  run_queue
  for k in 5 2; do for method in dense stc0.04; do python -m utils.plot runs/robust/k$k/$method/* --table; done; done
fi
if [ "$what" = all ] || [ "$what" = methods ]; then  # more method families, IID and Dirichlet(0.5), seeds 0 and 1
  for seed in 0 1; do
    for part in iid dirichlet; do
      d=runs/methods/seed$seed/$part s=(--set seed=$seed --set partition=$part)
      job $d/qsgd4       "${s[@]}" --set sparsifier=none --set quantize=qsgd --set levels=4
      job $d/qsgd16      "${s[@]}" --set sparsifier=none --set quantize=qsgd --set levels=16
      job $d/hybrid0.02  "${s[@]}" "${stc[@]}" --set sparsifier=hybrid --set prop=0.02 --set aggregation=mean
      job $d/powersgd1   "${s[@]}" --set sparsifier=powersgd --set rank=1 --set error_feedback=true
      job $d/powersgd4   "${s[@]}" --set sparsifier=powersgd --set rank=4 --set error_feedback=true
    done
  done
  d=runs/methods/stretch  # other candidates for 300x (<= 0.33% of dense bytes), IID
  job $d/hybrid0.008-int8   "${stc[@]}" --set sparsifier=hybrid --set prop=0.008 --set quantize=int8 \
    --set aggregation=mean
  for seed in 0 1; do
    job $d/seed$seed/powersgd1-int8 --set seed=$seed --set sparsifier=powersgd --set rank=1 --set quantize=int8 \
      --set error_feedback=true
  done
  for seed in 0 1; do  # the 300x stretch at a longer schedule, side by side with dense at the same one
    d=runs/methods/long/seed$seed
    job $d/dense --rounds 100 --set seed=$seed --set sparsifier=none
    job $d/stc0.01-mean --rounds 100 --set seed=$seed "${stc[@]}" --set prop=0.01 --set aggregation=mean
    job $d/hybrid0.02 --rounds 100 --set seed=$seed "${stc[@]}" --set sparsifier=hybrid --set prop=0.02 \
      --set aggregation=mean
  done
  run_queue
fi
if [ "$what" = all ] || [ "$what" = time ]; then  # the simulated clock (runs/time/PRESET/seedS/METHOD)
  clk=(--set clock=simulated --set profile=mobile)
  for seed in 0 1; do  # the target's pair on two seeds
    d=runs/time/mobile/seed$seed
    job $d/dense    --set seed=$seed "${clk[@]}" --set sparsifier=none
    job $d/stc-both --set seed=$seed "${clk[@]}" "${stc[@]}" --set prop=0.04 --set download=compressed
  done
  d=runs/time/mobile/seed0
  job $d/int8   "${clk[@]}" --set sparsifier=none --set quantize=int8
  job $d/qsgd   "${clk[@]}" --set sparsifier=none --set quantize=qsgd
  job $d/stc-up "${clk[@]}" "${stc[@]}" --set prop=0.04
  job $d/relay  "${clk[@]}" "${stc[@]}" --set prop=0.04 --set download=relay
  run_queue
  # policies whose clients depend on the profile, so each is its own run: a deadline of 10 s with 1.3x
  # over-selection, and FedBuff (4 clients at once, a step per 2 uploads, 45 steps)
  for preset in mobile mixed; do
    d=runs/time-policies/$preset
    for method in dense stc-both; do
      if [ $method = dense ]; then m=(--set sparsifier=none); else m=("${stc[@]}" --set prop=0.04 --set download=compressed); fi
      job $d/$method-deadline --set clock=simulated --set profile=$preset "${m[@]}" --set deadline=10 --set over_select=1.3
      job $d/$method-fedbuff --rounds 45 --set clock=simulated --set profile=$preset "${m[@]}" --set mode=async \
        --set concurrency=4 --set buffer_size=2
    done
  done
  run_queue
  # ResNet-18 (step_seconds as python -m utils.step_seconds --model resnet18 measured it), 5 rounds: 2 cores take
  # about 40 minutes for the pair. Not STC: both of its ResNet-18 runs here blew up in their first rounds (docs/time.md),
  # so the compressed run codes every entry as int8, both ways
  job runs/time/mobile/resnet18/dense --rounds 5 "${clk[@]}" --set sparsifier=none --set model_name=resnet18 \
    --set step_seconds=0.474
  job runs/time/mobile/resnet18/int8-both --rounds 5 "${clk[@]}" --set sparsifier=none --set quantize=int8 \
    --set download=compressed --set download_sparsifier=none --set download_quantize=int8 --set model_name=resnet18 \
    --set step_seconds=0.474
  run_queue
  # nothing in these runs depends on the profile: re-timed, they are what a run under another preset would be
  for run in runs/time/mobile/seed*/* runs/time/mobile/resnet18/*; do
    for preset in datacenter wifi mixed; do
      out=${run/\/mobile\//\/$preset\/}
      [ -f "$out/metrics.csv" ] || python -m utils.retime "$run" --profile $preset --out "$out"
    done
  done
  # how much depends on the phones' assumed slowness (3): phones as fast as this machine (a third of the run's
  # step_seconds), and links alone
  for run in runs/time/mobile/seed*/* runs/time/mobile/resnet18/*; do
    step=0.003333; [[ $run == *resnet18* ]] && step=0.158
    for variant in phone1x:$step links-only:0.000001; do
      out=${run/\/mobile\//\/mobile-${variant%%:*}\/}
      [ -f "$out/metrics.csv" ] || python -m utils.retime "$run" --profile mobile --step-seconds ${variant#*:} --out "$out"
    done
  done
fi
if [ "$what" = all ] || [ "$what" = privacy ]; then  # DP-FedAvg and secure aggregation, 1000 clients, 100 a round
  d=runs/privacy
  cross=(--set no_models=1000 --set k=100 --set lr=0.05 --set server_momentum=0.9)
  shared=(--set sparsifier=random --set mask=shared)
  fixed=(--set sparsifier=none --set quantize=fixed --set fixed_bits=8 --set fixed_range=0.005 --set error_feedback=true)
  job $d/plain          "${cross[@]}" --set sparsifier=none
  job $d/clip-only      "${cross[@]}" --set sparsifier=none --set dp_clip=0.1
  for z in 0.5 1.0 2.0; do
    job $d/dense-z$z      "${cross[@]}" --set sparsifier=none --set dp_clip=0.1 --set dp_noise_multiplier=$z
    job $d/shared0.1-z$z  "${cross[@]}" "${shared[@]}" --set prop=0.1 --set dp_clip=0.1 --set dp_noise_multiplier=$z
  done
  job $d/shared0.01-z1.0  "${cross[@]}" "${shared[@]}" --set prop=0.01 --set dp_clip=0.1 --set dp_noise_multiplier=1.0
  job $d/fixed8-z1.0      "${cross[@]}" "${fixed[@]}" --set dp_clip=0.1 --set dp_noise_multiplier=1.0
  job $d/fixed8           "${cross[@]}" "${fixed[@]}"
  job $d/fixed8-secagg    "${cross[@]}" "${fixed[@]}" --set secure_aggregation=true
  job $d/shared0.1-fixed8-secagg "${cross[@]}" "${fixed[@]}" "${shared[@]}" --set prop=0.1 --set secure_aggregation=true
  # 3-bit fixed point (10.7x fewer bytes); DP under secure aggregation, its field as small as DP's headroom allows
  # (every one of the 1000 clients, weighing 1: 13 bits for 3-bit codes, 18 for 8-bit)
  fixed3=(--set sparsifier=none --set quantize=fixed --set fixed_bits=3 --set fixed_range=0.000732421875
          --set error_feedback=true)
  dp=(--set dp_clip=0.1 --set dp_noise_multiplier=1.0)
  job $d/fixed3-z1.0              "${cross[@]}" "${fixed3[@]}" "${dp[@]}"
  job $d/fixed3-z1.0-secagg       "${cross[@]}" "${fixed3[@]}" "${dp[@]}" --set secure_aggregation=true --set secagg_bits=13
  job $d/fixed8-z1.0-secagg       "${cross[@]}" "${fixed[@]}" "${dp[@]}" --set secure_aggregation=true --set secagg_bits=18
  job $d/shared0.1-fixed8-z1.0-secagg "${cross[@]}" "${fixed[@]}" "${shared[@]}" --set prop=0.1 "${dp[@]}" \
    --set secure_aggregation=true --set secagg_bits=18
  # the issue's target: 100 rounds (epsilon 6.0 at z 1), dense DP-FedAvg against 3-bit fixed point
  job $d/100/dense-z1.0           --rounds 100 "${cross[@]}" --set sparsifier=none "${dp[@]}"
  job $d/100/fixed3-z1.0          --rounds 100 "${cross[@]}" "${fixed3[@]}" "${dp[@]}"
  job $d/100/fixed3-z1.0-secagg   --rounds 100 "${cross[@]}" "${fixed3[@]}" "${dp[@]}" --set secure_aggregation=true \
    --set secagg_bits=13
  run_queue
fi
if [ "$what" = all ] || [ "$what" = figures ]; then  # every figure in figures/ is drawn here, and only here
  finished() {  # finished RUN...: whether every run has its rounds (30, or $rounds)
    local run
    for run in "$@"; do
      [ -f "$run/metrics.csv" ] && [ "$(($(wc -l < "$run/metrics.csv") - 1))" -ge "${rounds:-30}" ] || return 1
    done
  }
  draw() {  # draw FIGURE SECTION [plot options ...] -- RUN...: the figure, when its section's runs are all finished
    local figure=$1 section=$2 options=()
    shift 2
    while [ "$1" != -- ]; do options+=("$1"); shift; done
    shift
    if finished "$@"; then
      python -m utils.plot "$@" -o "$figure" "${options[@]}"
    else
      echo "not drawn: $figure (its runs are not finished: bash figures/reproduce.sh $section)" >&2
    fi
  }
  p=runs/privacy
  draw figures/privacy.png privacy --x epsilon \
    --labels "DP z 0.5,DP z 1.0,DP z 2.0,shared mask 10% + DP z 0.5,shared mask 10% + DP z 1.0,shared mask 10% + DP z 2.0,shared mask 1% + DP z 1.0,fixed 8-bit + EF + DP z 1.0" \
    --title "Fashion-MNIST, CNN, 1000 clients, k=100 (Poisson), clip 0.1: accuracy against the privacy spent, round by round" \
    -- $p/dense-z0.5 $p/dense-z1.0 $p/dense-z2.0 $p/shared0.1-z0.5 $p/shared0.1-z1.0 $p/shared0.1-z2.0 \
    $p/shared0.01-z1.0 $p/fixed8-z1.0
  draw figures/privacy-secagg.png privacy --x epsilon \
    --labels "DP z 1.0,fixed 8-bit + EF + DP,fixed 8-bit + EF + DP + secure aggregation,fixed 3-bit + EF + DP,fixed 3-bit + EF + DP + secure aggregation,shared mask 10% + DP,shared mask 10% + fixed 8-bit + EF + DP + secure aggregation" \
    --title "Fashion-MNIST, CNN, 1000 clients, k=100 (Poisson), clip 0.1, z 1.0: with and without secure aggregation (the clients clip)" \
    -- $p/dense-z1.0 $p/fixed8-z1.0 $p/fixed8-z1.0-secagg $p/fixed3-z1.0 $p/fixed3-z1.0-secagg $p/shared0.1-z1.0 \
    $p/shared0.1-fixed8-z1.0-secagg
  rounds=100 draw figures/privacy-100.png privacy --x epsilon \
    --labels "DP z 1.0 (dense),fixed 3-bit + EF + DP z 1.0,fixed 3-bit + EF + DP z 1.0 + secure aggregation" \
    --title "Fashion-MNIST, CNN, 1000 clients, k=100 (Poisson), clip 0.1, 100 rounds: the target at epsilon 6.0" \
    -- $p/100/dense-z1.0 $p/100/fixed3-z1.0 $p/100/fixed3-z1.0-secagg
  draw figures/prop-sweep-fashion-mnist.png chapter \
    --title "Fashion-MNIST, CNN, 10 clients, k=2: the chapter's prop sweep, per-entry mean (masked_mean)" \
    -- runs/chapter/masked_mean/prop=1.0 runs/chapter/masked_mean/prop=0.8 runs/chapter/masked_mean/prop=0.5
  draw figures/prop-sweep-fashion-mnist-lambda.png chapter \
    --title "Fashion-MNIST, CNN, 10 clients, k=2: the chapter's prop sweep, the chapter's rule (lambda 0.5)" \
    -- runs/chapter/lambda/prop=1.0 runs/chapter/lambda/prop=0.8 runs/chapter/lambda/prop=0.5
  for part in iid dirichlet; do
    d=runs/frontier/$part e=runs/explore/$part
    draw figures/frontier-$part.png frontier \
      --labels "dense,f16,int8,sign + EF,random 0.5,top-k 1% + EF (whole model; server momentum 0.5),int8 top-k 2.5% + EF,STC 5%,STC 4%,STC 4% (unsent = 0),STC 1%,STC 1% (unsent = 0),STC 0.25%" \
      --title "Fashion-MNIST, CNN, 10 clients, k=2, $part partition: accuracy per uploaded byte" \
      -- $d/dense $d/f16 $d/int8 $d/sign-ef $d/random0.5 $d/topk0.01-ef-model-m0.5 $d/int8-topk0.025-ef \
      $d/stc0.05 $e/stc0.04 $e/stc0.04-mean $d/stc0.01 $e/stc0.01-mean $d/stc0.0025
    finished $d/* $e/* && python -m utils.plot $d/* $e/* --table
  done
  t=runs/twoway/seed0
  draw figures/twoway-iid.png twoway --bytes total \
    --labels "dense FedAvg,int8,sign + EF,STC 4% up / dense down,STC 1% up / dense down,STC 4% up / relay down,STC 4% up / STC 4% down,STC 4% up / STC 2% down,STC 4% up / STC 1% down" \
    --title "Fashion-MNIST, CNN, 10 clients, k=2, IID: accuracy per byte, uploaded and downloaded" \
    -- runs/frontier/iid/dense runs/frontier/iid/int8 runs/frontier/iid/sign-ef runs/explore/iid/stc0.04 \
    runs/frontier/iid/stc0.01 $t/iid/relay $t/iid/down0.04 $t/iid/down0.02 $t/iid/down0.01
  draw figures/twoway-dirichlet.png twoway --bytes total \
    --labels "dense FedAvg,STC 4% up (unsent = 0) / dense down,STC 4% up (unsent = 0) / STC 4% down,STC 4% up (unsent = 0) / STC 2% down" \
    --title "Fashion-MNIST, CNN, 10 clients, k=2, Dirichlet(0.5): accuracy per byte, uploaded and downloaded" \
    -- runs/frontier/dirichlet/dense runs/explore/dirichlet/stc0.04-mean $t/dirichlet/down0.04 $t/dirichlet/down0.02
  for part in iid dirichlet; do
    finished runs/seed1/$part/* && python -m utils.plot runs/seed1/$part/* --table
    for seed in 0 1; do
      finished runs/twoway/seed$seed/$part/* && python -m utils.plot runs/twoway/seed$seed/$part/* --table
    done
  done
  finished runs/twoway/cross-device/* && python -m utils.plot runs/twoway/cross-device/* --table
  python figures/syncs.py runs/twoway/seed0/*/* runs/twoway/cross-device/*
  python figures/robust.py runs/robust -o figures/robust.png  # blank where a run is missing: run the robust section
  for part in iid dirichlet; do  # the method families against dense and STC, seed 0
    m=runs/methods/seed0/$part
    draw figures/families-$part.png methods \
      --labels "dense,STC 4%,STC 1% (unsent = 0),QSGD s=4,QSGD s=16,PowerSGD rank 1 + EF,PowerSGD rank 4 + EF,hybrid 2% (half top-k; unsent = 0)" \
      --title "Fashion-MNIST, CNN, 10 clients, k=2, $part partition: QSGD, PowerSGD and the hybrid per uploaded byte" \
      -- runs/frontier/$part/dense runs/explore/$part/stc0.04 runs/explore/$part/stc0.01-mean $m/qsgd4 $m/qsgd16 \
      $m/powersgd1 $m/powersgd4 $m/hybrid0.02
    for seed in 0 1; do
      finished runs/methods/seed$seed/$part/* && python -m utils.plot runs/methods/seed$seed/$part/* --table
    done
  done
  for preset in mobile mixed wifi datacenter mobile-phone1x mobile-links-only; do  # time to accuracy (docs/time.md)
    tm=runs/time/$preset
    finished $tm/seed*/* && python -m utils.plot $tm/seed*/* --table --target 0.89
  done
  for preset in mobile mixed wifi datacenter mobile-phone1x mobile-links-only; do
    rounds=5 finished runs/time/$preset/resnet18/* && python -m utils.plot runs/time/$preset/resnet18/* --table --target 0.85
  done
  tm=runs/time/mobile/seed0
  draw figures/time-mobile.png time --x time --bytes total \
    --labels "dense FedAvg,int8,QSGD s=4,STC 4% up / dense down,STC 4% up / relay down,STC 4% both ways" \
    --title "Fashion-MNIST, CNN, 10 clients, k=2, IID, mobile preset: accuracy against simulated time" \
    -- $tm/dense $tm/int8 $tm/qsgd $tm/stc-up $tm/relay $tm/stc-both
  for preset in mobile mixed; do
    p=runs/time-policies/$preset
    finished runs/time/$preset/seed0/dense runs/time/$preset/seed0/stc-both $p/*-deadline &&
      rounds=45 finished $p/*-fedbuff &&
      python -m utils.plot runs/time/$preset/seed0/dense runs/time/$preset/seed0/stc-both $p/*-deadline $p/*-fedbuff \
        --table --target 0.89
  done
  draw figures/time-policies-mobile.png time --x time --bytes total \
    --labels "dense: wait for all,dense: deadline 10 s + 1.3x over-selection,dense: FedBuff (4 at once; a step per 2),STC both ways: wait for all,STC both ways: deadline 10 s + 1.3x over-selection,STC both ways: FedBuff" \
    --title "Fashion-MNIST, CNN, 10 clients, IID, mobile preset: synchronous rounds, a deadline, FedBuff" \
    -- runs/time/mobile/seed0/dense runs/time-policies/mobile/dense-deadline runs/time-policies/mobile/dense-fedbuff \
    runs/time/mobile/seed0/stc-both runs/time-policies/mobile/stc-both-deadline runs/time-policies/mobile/stc-both-fedbuff
  stretch=(runs/methods/stretch/hybrid0.008-int8 runs/methods/stretch/seed*/*)
  finished "${stretch[@]}" && python -m utils.plot "${stretch[@]}" --table
  l=runs/methods/long
  rounds=100 draw figures/stretch-100-rounds.png methods \
    --labels "dense (seed 0),STC 1% unsent = 0 (seed 0),hybrid 2% (seed 0),dense (seed 1),STC 1% unsent = 0 (seed 1),hybrid 2% (seed 1)" \
    --title "Fashion-MNIST, CNN, 10 clients, k=2, IID, 100 rounds: the 300x stretch at a longer schedule" \
    -- $l/seed0/dense $l/seed0/stc0.01-mean $l/seed0/hybrid0.02 $l/seed1/dense $l/seed1/stc0.01-mean $l/seed1/hybrid0.02
  rounds=100 finished $l/*/* && python -m utils.plot $l/*/* --table
fi
