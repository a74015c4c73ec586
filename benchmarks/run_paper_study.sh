#!/usr/bin/env bash
# The paper's study, faithfully (issue 14): Yao et al. 2018 ("Hessian-based Analysis of Large Batch
# Training and Robustness to Adversaries") redone with the authors' recipe on Fashion-MNIST (lenet5, m1)
# or CIFAR-10 (c1, on a GPU), every element of the paper produced by hessian-report from the runs.
#
#   benchmarks/run_paper_study.sh                          # lenet5, every stage in order
#   benchmarks/run_paper_study.sh lenet5 recipe control    # some stages of one network
#   benchmarks/run_paper_study.sh m1                       # the same study with m1
#   benchmarks/run_paper_study.sh c1                       # CIFAR-10 c1 on one GPU (data in data/)
#   DRY_RUN=1 benchmarks/run_paper_study.sh lenet5         # print every command, run nothing
#
# usage: run_paper_study.sh [NET] [STAGE ...]
#   NET: lenet5 (default) | m1 | c1
#   STAGE: recipe control robust softplus interpolate surface psd report (default: all, in this order)
#
# Outputs: runs/paper_study/NET/ (TensorBoard runs, one folder per sweep, lane logs, interpolations,
# report; not tracked) and docs/results/paper_study_NET/ (report.md, summary.json, runs.csv, the PNG
# figures, input_hessian_psd.{json,md}, wall_times.log, records/; tracked). Resumable: hessian-sweep skips
# runs whose sweep.json says finished and continues a run that was killed from its last checkpoint (an
# epoch's work at most is lost), so a killed study continues where it stopped when rerun with the same
# arguments; the interpolate and surface stages keep what they made before (REDO=1 redoes it), psd
# measures only runs it has not measured, report redoes its (short) work.
#
# A study outlives the machine: records/ holds every finished run without its checkpoints (event files,
# sweep.json, config, landscapes) and the interpolations, and is copied back into runs/ when the script
# starts, so that a study continued on another machine (after committing records/) skips what finished
# and reports it. What needs a run's checkpoint is done as soon as it exists, in the lane after every
# run: the input-Hessian PSD check of the new run, and the interpolations and surfaces whose
# checkpoints are all there. A pair whose checkpoint was lost with the machine needs that run trained
# again (delete its folder in runs/ and in records/, rerun its stage).
#
# What runs (the recipe: configs/paper_fashion_mnist_NET.yaml, the authors' HessianFlow settings: SGD
# with momentum 0.9, learning rate 0.02 at every batch size, step decay x0.2, no weight decay, no
# augmentation, BatchNorm statistics per 128 samples; analyses: configs/overlays/paper_study.yaml):
#   recipe     B = 128 512 2048 8192 16384, seeds 0 1 2, the same number of epochs at every B.
#   control    the same batch sizes and seeds trained to the SAME TRAINING LOSS: early stop once the
#              epoch-mean training loss is below 0.3 (configs/overlays/paper_study_same_loss.yaml), a
#              constant learning rate 0.02 (the recipe's, without its epoch milestones, which mean nothing
#              when runs stop at different epochs), at most CONTROL_MAX_EPOCHS epochs. Not equal steps:
#              lenet5 at B = 128 takes 12,630 steps in 30 epochs, which is 4,210 epochs at B = 16384
#              (about 15 hours a run on one core); the overlay's header has the numbers behind 0.3.
#   robust     FGSM, PGD, TRADES (robust training) and Gaussian noise of the same size (the reviewers'
#              baseline), epsilon EPSILON, at the smallest and the largest batch size, seeds 0 1 2.
#   softplus   softplus(beta) for beta in 1 5 20 100 at the smallest and the largest batch size, seeds 0 1 2:
#              the reviewers' twice-differentiable activation, which approaches ReLU as beta grows; at two
#              batch sizes so that the paper's batch-size claims are judged for it too.
#   interpolate  hessian-landscape interpolate, alpha in [-0.5, 1.5], loss and accuracy on 2048 training
#              and 2048 test images and the top Hessian eigenvalue (training images) at every alpha, with
#              BatchNorm statistics recomputed at every alpha on the training images (the default):
#              smallest vs largest batch, and standard vs FGSM training at the smallest batch, per seed.
#   surface    hessian-landscape surface: 21 x 21 loss surface along the top two Hessian eigenvectors (of
#              1024 training images) on training and test images, seed 0 of the smallest and largest batch,
#              of the recipe (equal epochs) and of the control (equal training loss).
#   psd        benchmarks/input_hessian_psd.py: the smallest input-Hessian eigenvalue of 512 test images
#              per run (is the ReLU input Hessian PSD?), every run (Fashion-MNIST networks only).
#   report     hessian-report over everything into docs/results/paper_study_NET/.
#
# Costs (estimated for lenet5 from measured figures: recipe, 30 epochs, one process on a quiet core:
# B = 128 ~160 s fit, B = 16384 ~480 s fit including the recipe config's own analyses; intermediate batch
# sizes interpolated). The study's analyses add about 3 min a run: the end-of-training spectrum ~60 s
# (top-10, smallest eigenvalue, trace, density, input Hessian on 1024 images; the trace, density and
# smallest eigenvalue took 46 s in the earlier lenet5 study), the every-2-epochs top eigenvalue ~30 s,
# under test FGSM/PGD ~5 s (measured before), DeepFool and CW ~1-2 min (estimated: ~500 gradient passes
# over 1000 images each), the test-sample spectrum and landscapes ~10 s. Two lanes side by side on the
# 2-core machine, OMP_NUM_THREADS=1 each, so wall times are about half the CPU times (more when loaded):
#   recipe       15 runs, ~340 s (B = 128) to ~660 s (B = 16384): ~7,300 s CPU, ~1 h wall. Measured
#                (2026-11-29, lenet5, the shared machine also running tests and benchmarks): 8,895 s wall,
#                585-3,172 s per run (sweep.json), 14,947 s in all.
#   control      15 runs; B = 128 stops after ~3 epochs (~200 s), B = 16384 after ~100 epochs (~1,700 s;
#                up to ~3,300 s at the cap of 200): ~10,000 s CPU, ~1.4 h wall (up to ~2 h).
#   robust       24 runs; training costs x2 (FGSM), x1 (noise), x(steps + 1) (PGD), x(steps + 2) (TRADES):
#                per seed at B = 128 / 16384 FGSM ~460 / 1,020 s, noise ~320 / 600 s, PGD-5 ~1,020 / 2,700 s,
#                TRADES-5 ~1,160 / 3,120 s: ~31,000 s CPU, ~4.3 h wall.
#   softplus     24 runs: 12 at B = 128, ~340 s each, 12 at B = 16384, ~600 s each: ~11,300 s CPU, ~1.6 h wall.
#                Measured (2026-11-30, lenet5, two sessions, up to three processes side by side): 514-903 s a
#                run at B = 128, 561-1,348 s at B = 16384 (sweep.json), 17,101 s in all.
#   interpolate  6 interpolations, ~4 min each (21 alphas, a Lanczos run on 2048 images at each): ~12 min wall.
#   surface      4 checkpoints x 2 splits x 441 points (and a top-2 Lanczos run): ~2-3 min each (two
#                side by side: 306 s wall for the recipe's two, measured with the robust stage beside).
#   psd          ~78 runs x ~3 s (74 s for 30 runs in the earlier study): ~3 min.
#   report       ~2 min.
#   lenet5 in all: ~8.5-9 h wall. m1 has 10x lenet5's multiply-adds and a 15-epoch recipe (~12 min a run at
#   B = 128, 47 s an epoch): recipe ~2 h, control ~3 h, robust ~40 h of CPU (~20 h wall; ROBUST_METHODS or
#   ROBUST_BATCH_SIZES shorten it: one training step of PGD-5 / TRADES-5 at B = 16384 took 164 / 198 s
#   with the process's start, beside two study processes, attacking the whole batch (slices of 256, the
#   m1 default, make a PGD-5 step 1.28x faster), so such a run trains ~2-2.5 h; TRADES peaks at
#   8.6 GB there, PGD 4.9 GB), softplus ~4 h of CPU (SOFTPLUS_BATCH_SIZES shortens it). Measured
#   (2026-11-30, m1 recipe, two sessions, two processes side by side and other work beside): 857-1,953 s a
#   run with its analyses and test (sweep.json), 18,746 s in all. c1 (one GPU, 90 epochs of CIFAR-10): not
#   measured.
#
# Settings (environment): PYTHON, BATCH_SIZES, SEEDS, ROBUST_BATCH_SIZES (default: smallest and largest of
# BATCH_SIZES), ROBUST_METHODS, EPSILON, PGD_STEPS, BETAS, SOFTPLUS_BATCH_SIZES (default: smallest and
# largest of BATCH_SIZES), CONTROL_MAX_EPOCHS, LANES, ANALYSIS_BATCH_SIZE
# (micro-batch of the Hessian and landscape analyses; default 1024, m1 256), ATTACK_BATCH_SIZE (slices of
# robust training's attacks; default none: whole batches, m1 256), DRY_RUN=1, REDO=1.
set -u -o pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
# One thread per process: on the shared 2-core machine torch's default of 2 threads per process made a
# training step several times slower (benchmarks/run_results.sh).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SWEEP="$PYTHON -m lightning_hessian.cli.sweep"         # hessian-sweep
REPORT="$PYTHON -m lightning_hessian.cli.report"       # hessian-report
LANDSCAPE="$PYTHON -m lightning_hessian.cli.landscape" # hessian-landscape
OVERLAY=configs/overlays/paper_study.yaml
CONTROL_OVERLAY=configs/overlays/paper_study_same_loss.yaml
DRY_RUN=${DRY_RUN:-0}
REDO=${REDO:-0}   # 1: the interpolate and surface stages redo what they made before

NET=lenet5
case ${1:-} in
    lenet5|m1|c1) NET=$1; shift ;;
esac
case $NET in
    lenet5) CONFIG=configs/paper_fashion_mnist_lenet5.yaml; LANES=${LANES:-2}; DEFAULT_EPSILON=0.1; DEFAULT_CAP=200
            DEFAULT_ANALYSIS_BATCH=1024; DEFAULT_ATTACK_BATCH= ;;
    # m1: Hessian-vector products in micro-batches of 256, about 1.7x faster than one of 1024 on this CPU
    # (m1's first activations outgrow the cache; benchmarks/RESULTS.md, configs/paper_fashion_mnist_m1.yaml)
    # Control cap 100 epochs: m1 at B = 16384 with the control's constant lr 0.02 had an epoch-mean training
    # loss of 0.474 after 10 epochs (about 55 s an epoch on one core; measured 2026-11-30), lenet5 after
    # ~20, and lenet5 reached 0.3 after ~75, so m1 should stop after ~35-45.
    # Robust training's attacks in slices of 256 (model.adversarial.attack_batch_size): the same perturbations,
    # a PGD-5 step at B = 16384 1.28x faster on one core (benchmarks/robust_training_step.py, RESULTS.md).
    m1)     CONFIG=configs/paper_fashion_mnist_m1.yaml;     LANES=${LANES:-2}; DEFAULT_EPSILON=0.1; DEFAULT_CAP=100
            DEFAULT_ANALYSIS_BATCH=256; DEFAULT_ATTACK_BATCH=256 ;;
    c1)     CONFIG=configs/paper_cifar10_c1.yaml;           LANES=${LANES:-1}; DEFAULT_EPSILON=0.031; DEFAULT_CAP=300
            DEFAULT_ANALYSIS_BATCH=1024; DEFAULT_ATTACK_BATCH= ;;
esac
ANALYSIS_BATCH_SIZE=${ANALYSIS_BATCH_SIZE:-$DEFAULT_ANALYSIS_BATCH}
ATTACK_BATCH_SIZE=${ATTACK_BATCH_SIZE-$DEFAULT_ATTACK_BATCH}   # empty: attack whole batches
BATCH_SIZES=${BATCH_SIZES:-128 512 2048 8192 16384}
SEEDS=${SEEDS:-0 1 2}
read -r -a _SIZES <<< "$BATCH_SIZES"
B_MIN=${_SIZES[0]}
B_MAX=${_SIZES[${#_SIZES[@]}-1]}
ROBUST_BATCH_SIZES=${ROBUST_BATCH_SIZES:-$B_MIN $B_MAX}
ROBUST_METHODS=${ROBUST_METHODS:-fgsm gaussian_noise pgd trades}
EPSILON=${EPSILON:-$DEFAULT_EPSILON}   # Linf radius (robust training), std of the noise baseline
PGD_STEPS=${PGD_STEPS:-5}               # PGD and TRADES steps in training (step 2.5 eps / steps, eps / 4)
BETAS=${BETAS:-1 5 20 100}
SOFTPLUS_BATCH_SIZES=${SOFTPLUS_BATCH_SIZES:-$B_MIN $B_MAX}
CONTROL_MAX_EPOCHS=${CONTROL_MAX_EPOCHS:-$DEFAULT_CAP}
ROOT=runs/paper_study/$NET
DOCS=docs/results/paper_study_$NET
RECORDS=$DOCS/records
STAGES=${*:-recipe control robust softplus interpolate surface psd report}
if [ "$DRY_RUN" = 1 ]; then
    LOGS=$(mktemp -d)   # queues and lane logs of a dry run: nothing is written into runs/ or docs/
    trap 'rm -rf "$LOGS"' EXIT
else
    LOGS=$ROOT
    mkdir -p "$ROOT" "$DOCS"
fi

# ------------------------------------------------------------------------------------------ helpers

run() {
    # run COMMAND...: runs it, or with DRY_RUN=1 prints it.
    if [ "$DRY_RUN" = 1 ]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

add_jobs() {
    # add_jobs QUEUE SWEEP_ARGUMENT...: one hessian-sweep job per (seed, batch size) of the arguments'
    # --seeds/--batch-sizes lists, appended to the queue file, seed-major (a complete one-seed picture
    # first). The other arguments are kept, shell-quoted.
    local queue=$1
    shift
    local args=() seeds=() sizes=() mode=""
    local arg
    for arg in "$@"; do
        case $arg in
            --seeds) mode=seeds; continue ;;
            --batch-sizes) mode=sizes; continue ;;
            -*) mode="" ;;
        esac
        case $mode in
            seeds) seeds+=("$arg") ;;
            sizes) sizes+=("$arg") ;;
            *) args+=("$arg") ;;
        esac
    done
    local seed size
    for seed in "${seeds[@]}"; do
        for size in "${sizes[@]}"; do
            local line
            line=$(printf ' %q' "${args[@]}")
            # the arguments after `--` (if any) stay last
            if [[ " ${args[*]} " == *" -- "* ]]; then
                local before=() after=() seen=0
                for arg in "${args[@]}"; do
                    if [ "$seen" = 0 ] && [ "$arg" = "--" ]; then seen=1; continue; fi
                    if [ "$seen" = 0 ]; then before+=("$arg"); else after+=("$arg"); fi
                done
                line="$(printf ' %q' "${before[@]}") --batch-sizes $size --seeds $seed --$(printf ' %q' "${after[@]}")"
            else
                line="$line --batch-sizes $size --seeds $seed"
            fi
            echo "$line" >> "$queue"
        done
    done
}

take_job() {
    # take_job QUEUE: prints and removes the queue's first line (under a lock: lanes share the queue).
    (
        flock 9
        head -n 1 "$1"
        sed -i '1d' "$1"
    ) 9> "$1.lock"
}

lane() {
    # lane QUEUE LOG: one sweep process after the other until the queue is empty; fails if one failed.
    local queue=$1 log=$2 failed=0 job
    while true; do
        job=$(take_job "$queue")
        [ -z "$job" ] && break
        echo "== $(date -u +%FT%TZ) hessian-sweep$job" >> "$log"
        eval "$SWEEP $job" >> "$log" 2>&1 || failed=1
        after_run >> "$log" 2>&1
    done
    return $failed
}

run_queue() {
    # run_queue QUEUE NAME: LANES lanes take the queue's jobs side by side (one core each); prints the
    # end of each lane's log; fails if a run failed.
    local queue=$1 name=$2 failed=0 pids=() i
    if [ "$DRY_RUN" = 1 ]; then
        sed "s|^|+ $SWEEP|" "$queue"
        rm -f "$queue" "$queue.lock"
        return 0
    fi
    for ((i = 0; i < LANES; i++)); do
        lane "$queue" "$LOGS/${name}_lane$i.log" &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || failed=1
        tail -n 3 "$LOGS/${name}_lane$i.log"
    done
    rm -f "$queue" "$queue.lock"
    return $failed
}

new_queue() {
    local queue="$LOGS/.queue_$1"
    rm -f "$queue" "$queue.lock"
    : > "$queue"
    echo "$queue"
}

checkpoint_of() {
    # checkpoint_of RUN_DIR: the checkpoint the fit recorded (checkpoint.json), as hessian-sweep tests it.
    if [ "$DRY_RUN" = 1 ]; then echo "$1/checkpoints/last.ckpt"; return; fi
    jq -r .checkpoint "$1/checkpoint.json"
}

checkpoint_missing() {
    # checkpoint_missing RUN_DIR: why the run's checkpoint cannot be used (prints it), or fails if it can.
    [ "$DRY_RUN" = 1 ] && return 1
    if [ ! -f "$1/checkpoint.json" ]; then
        echo "$1 has no checkpoint.json; run its stage first"
    elif [ ! -f "$(checkpoint_of "$1")" ]; then
        echo "$1 was restored from $RECORDS without its checkpoint; delete it there and in $ROOT and rerun its stage to train it again"
    else
        return 1
    fi
}

# ------------------------------------------------------------------------------------------- records

finished_runs() {
    # finished_runs DIR: the run folders DIR/SWEEP/bsB_seedS whose sweep.json says finished.
    local record
    for record in "$1"/*/bs*_seed*/sweep.json; do
        [ -f "$record" ] && [ "$(jq -r .status "$record")" = finished ] && dirname "$record"
    done
    return 0
}

keep_records() {
    # Copies the finished runs of ROOT, without checkpoints, and the interpolations into RECORDS.
    (
        flock 9
        local runs=() run
        for run in $(finished_runs "$ROOT"); do runs+=("${run#"$ROOT"/}"); done
        [ -d "$ROOT/interpolation" ] && runs+=(interpolation)
        [ ${#runs[@]} = 0 ] && exit 0
        mkdir -p "$RECORDS"
        tar -C "$ROOT" --exclude=checkpoints --exclude='*.ckpt' --exclude='*.lock' -cf - "${runs[@]}" | tar -C "$RECORDS" -xf -
    ) 9> "$LOGS/.records.lock"
}

restore_records() {
    # Copies the runs and interpolations of RECORDS that ROOT lacks (or has unfinished) into ROOT.
    [ -d "$RECORDS" ] || return 0
    local run relative made
    for run in $(finished_runs "$RECORDS"); do
        relative=${run#"$RECORDS"/}
        if [ -f "$ROOT/$relative/sweep.json" ] && [ "$(jq -r .status "$ROOT/$relative/sweep.json")" = finished ]; then
            continue
        fi
        rm -rf "${ROOT:?}/$relative" && mkdir -p "$ROOT/$relative" && cp -a "$run/." "$ROOT/$relative/"
        echo "restored $ROOT/$relative from $RECORDS (without its checkpoint)"
    done
    if [ -d "$RECORDS/interpolation" ]; then
        while IFS= read -r made; do
            relative=$(dirname "${made#"$RECORDS"/}")
            [ -f "$ROOT/$relative/interpolation.json" ] && continue
            mkdir -p "$ROOT/$relative" && cp -a "$(dirname "$made")/." "$ROOT/$relative/"
        done < <(find "$RECORDS/interpolation" -name interpolation.json)
    fi
}

after_run() {
    # In a lane after each run: what needs the new checkpoints (PSD check, interpolations and
    # surfaces whose checkpoints are all there), then the records. Failures are the stages' to report.
    psd || true
    ready_landscapes
    keep_records
}

# ------------------------------------------------------------------------------------------- stages

recipe() {
    local queue
    queue=$(new_queue recipe)
    add_jobs "$queue" --config $CONFIG --config $OVERLAY --root $ROOT --name recipe --batch-sizes $BATCH_SIZES --seeds $SEEDS
    run_queue "$queue" recipe
}

control() {
    local queue
    queue=$(new_queue control)
    add_jobs "$queue" --config $CONFIG --config $CONTROL_OVERLAY --root $ROOT --name same_train_loss \
        --variant "standard, same train loss" --set model.lr_schedule=constant \
        --batch-sizes $BATCH_SIZES --seeds $SEEDS -- --trainer.max_epochs $CONTROL_MAX_EPOCHS
    run_queue "$queue" control
}

robust() {
    # the cheap methods first, so that all methods have seed 0 early; every method seed-major
    local queue method extra
    queue=$(new_queue robust)
    for method in $ROBUST_METHODS; do
        extra=()
        case $method in
            pgd|trades) extra=(--set model.adversarial.steps=$PGD_STEPS) ;;
        esac
        case $method in
            gaussian_noise|uniform_noise) ;;   # no attack to slice
            *) [ -n "$ATTACK_BATCH_SIZE" ] && extra+=(--set model.adversarial.attack_batch_size=$ATTACK_BATCH_SIZE) ;;
        esac
        add_jobs "$queue" --config $CONFIG --config $OVERLAY --root $ROOT --name $method \
            --set model.adversarial.method=$method --set model.adversarial.epsilon=$EPSILON "${extra[@]}" \
            --batch-sizes $ROBUST_BATCH_SIZES --seeds $SEEDS
    done
    run_queue "$queue" robust
}

softplus() {
    local queue beta
    queue=$(new_queue softplus)
    for beta in $BETAS; do
        add_jobs "$queue" --config $CONFIG --config $OVERLAY --root $ROOT --name softplus_beta=$beta \
            --set model.activation=softplus --set model.softplus_beta=$beta --batch-sizes $SOFTPLUS_BATCH_SIZES --seeds $SEEDS
    done
    run_queue "$queue" softplus
}

interpolations() {
    # One line per model interpolation, RUN_A RUN_B LABEL_A LABEL_B OUT: per seed, smallest vs largest
    # batch (recipe), standard vs FGSM training at the smallest batch.
    local seed
    for seed in $SEEDS; do
        echo "$ROOT/recipe/bs${B_MIN}_seed$seed $ROOT/recipe/bs${B_MAX}_seed$seed B=$B_MIN B=$B_MAX $ROOT/interpolation/bs${B_MIN}_vs_bs${B_MAX}/seed$seed"
        echo "$ROOT/recipe/bs${B_MIN}_seed$seed $ROOT/fgsm/bs${B_MIN}_seed$seed standard FGSM $ROOT/interpolation/standard_vs_fgsm_bs${B_MIN}/seed$seed"
    done
}

surfaces() {
    # One line per loss surface, RUN_DIR BATCH_SIZE: seed 0 of the smallest and the largest batch, of
    # the recipe (equal epochs) and of the control (equal training loss).
    local sweep size
    for sweep in recipe same_train_loss; do
        for size in $B_MIN $B_MAX; do
            echo "$ROOT/$sweep/bs${size}_seed${SEEDS%% *} $size"
        done
    done
}

interpolate_pair() {
    # interpolate_pair RUN_A RUN_B LABEL_A LABEL_B OUT
    local a=$1 b=$2 label_a=$3 label_b=$4 out=$5 why
    if [ "$DRY_RUN" != 1 ] && [ "$REDO" != 1 ] && [ -f "$out/interpolation.json" ]; then
        echo "interpolate: $out was made before, kept (REDO=1 makes it again)"
        return 0
    fi
    for run_dir in "$a" "$b"; do
        if why=$(checkpoint_missing "$run_dir"); then
            echo "interpolate: skipped $out ($why)" >&2
            return 1
        fi
    done
    run $LANDSCAPE interpolate --ckpt-a "$(checkpoint_of "$a")" --ckpt-b "$(checkpoint_of "$b")" --config $CONFIG \
        --alpha-min -0.5 --alpha-max 1.5 --num 21 --eigenvalue --splits train test --num-samples 2048 \
        --label-a "$label_a" --label-b "$label_b" --output-dir "$out"
}

surface_of() {
    # surface_of RUN_DIR BATCH_SIZE: the loss surface into the run's landscape/ folder (the report reads it)
    local run_dir=$1 size=$2 why
    if [ "$DRY_RUN" != 1 ] && [ "$REDO" != 1 ] && [ -f "$run_dir/landscape/surface.json" ]; then
        echo "surface: $run_dir/landscape was made before, kept (REDO=1 makes it again)"
        return 0
    fi
    if why=$(checkpoint_missing "$run_dir"); then
        echo "surface: skipped $run_dir ($why)" >&2
        return 1
    fi
    run $LANDSCAPE surface --ckpt "$(checkpoint_of "$run_dir")" --config $CONFIG --directions eig1 eig2 \
        --range 0.5 --points 21 --splits train test --num-samples 1024 --label "B=$size" \
        --output-dir "$run_dir/landscape"
}

two_at_a_time() {
    # two_at_a_time NAME FUNCTION < LINES: FUNCTION with each line's words, two side by side, logged to
    # LOGS/NAME_lane{0,1}.log; fails if one failed.
    local name=$1 function=$2 failed=0 pids=() line i=0 pid
    local -a words
    if [ "$DRY_RUN" = 1 ]; then  # print the commands in order
        while IFS= read -r line; do
            read -r -a words <<< "$line"
            "$function" "${words[@]}"
        done
        return 0
    fi
    while IFS= read -r line; do
        read -r -a words <<< "$line"
        "$function" "${words[@]}" >> "$LOGS/${name}_lane$((i % 2)).log" 2>&1 &
        pids+=($!)
        i=$((i + 1))
        if [ ${#pids[@]} = 2 ]; then
            for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
            pids=()
        fi
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    return $failed
}

interpolate() {
    interpolations | two_at_a_time interpolate interpolate_pair
}

surface() {
    surfaces | two_at_a_time surface surface_of
}

ready_landscapes() {
    # The interpolations and surfaces whose checkpoints are all there and that were not made, one after
    # the other; one that another lane is making is left to it.
    local a b label_a label_b out run_dir size
    while read -r a b label_a label_b out; do
        [ -f "$out/interpolation.json" ] && continue
        checkpoint_missing "$a" > /dev/null || checkpoint_missing "$b" > /dev/null && continue
        (flock -n 9 || exit 0; interpolate_pair "$a" "$b" "$label_a" "$label_b" "$out" < /dev/null) 9> "$LOGS/.landscape_${out//\//_}.lock"
    done < <(interpolations)
    while read -r run_dir size; do
        [ -f "$run_dir/landscape/surface.json" ] && continue
        checkpoint_missing "$run_dir" > /dev/null && continue
        (flock -n 9 || exit 0; surface_of "$run_dir" "$size" < /dev/null) 9> "$LOGS/.landscape_${run_dir//\//_}.lock"
    done < <(surfaces)
    return 0
}

psd() {
    # The smallest input-Hessian eigenvalue of every run not measured before (one PSD check at a time).
    if [ "$NET" = c1 ]; then
        echo "psd: benchmarks/input_hessian_psd.py reads Fashion-MNIST test images; skipped for $NET" >&2
        return 0
    fi
    if [ "$DRY_RUN" = 1 ]; then
        run $PYTHON benchmarks/input_hessian_psd.py --root $ROOT --out $DOCS/input_hessian_psd.json --num-samples 512 --all-seeds
        return 0
    fi
    (
        flock 9
        status=0
        $PYTHON benchmarks/input_hessian_psd.py --root $ROOT --out $DOCS/input_hessian_psd.json \
            --num-samples 512 --all-seeds < /dev/null > "$LOGS/.psd.md" || status=$?
        # the table of every measured run, kept unless nothing was measured
        if grep -q '^| run ' "$LOGS/.psd.md"; then mv "$LOGS/.psd.md" "$DOCS/input_hessian_psd.md"; fi
        exit $status
    ) 9> "$LOGS/.psd.lock"
}

report() {
    local title="Yao et al. 2018 redone: $NET, the authors' recipe ($(basename $CONFIG))"
    if [ "$DRY_RUN" = 1 ]; then
        run $REPORT $ROOT --out $ROOT/report --title "$title"
        return 0
    fi
    local failed=0
    rm -rf "$ROOT/report" && rm -f "$DOCS"/*.png "$DOCS/report.md" "$DOCS/summary.json" "$DOCS/runs.csv"  # no stale figures
    $REPORT $ROOT --out $ROOT/report --title "$title" || failed=1
    cp $ROOT/report/report.md $ROOT/report/summary.json $ROOT/report/runs.csv $ROOT/report/*.png "$DOCS/" || failed=1
    return $failed
}

derive_overlays() {
    # With ANALYSIS_BATCH_SIZE other than the overlays' 1024: the study's overlays with that micro-batch
    # for the Hessian and landscape analyses (the same sums, in other pieces), written to ROOT/overlays/
    # and used instead. The attacks keep their batch of 1000.
    [ "$ANALYSIS_BATCH_SIZE" = 1024 ] && return 0
    local derived=$ROOT/overlays overlay
    [ "$DRY_RUN" = 1 ] && derived=$LOGS/overlays
    mkdir -p "$derived"
    for overlay in $OVERLAY $CONTROL_OVERLAY; do
        sed "s/analysis_batch_size: 1024\$/analysis_batch_size: $ANALYSIS_BATCH_SIZE/" "$overlay" > "$derived/$(basename "$overlay")"
    done
    OVERLAY=$derived/$(basename "$OVERLAY")
    CONTROL_OVERLAY=$derived/$(basename "$CONTROL_OVERLAY")
}

# --------------------------------------------------------------------------------------------- main

status=0
for stage in $STAGES; do
    case $stage in
        recipe|control|robust|softplus|interpolate|surface|psd|report) ;;
        *) echo "unknown stage $stage (recipe control robust softplus interpolate surface psd report)" >&2; exit 2 ;;
    esac
done
derive_overlays
[ "$DRY_RUN" = 1 ] || restore_records
for stage in $STAGES; do
    start=$(date +%s)
    echo "== $NET $stage: started $(date -u +%FT%TZ)"
    $stage || status=1
    [ "$DRY_RUN" = 1 ] || keep_records
    line="== $NET $stage: done in $(( $(date +%s) - start )) s ($(date -u +%FT%TZ))"
    echo "$line"
    [ "$DRY_RUN" = 1 ] || echo "$line" >> "$DOCS/wall_times.log"
done
exit $status
