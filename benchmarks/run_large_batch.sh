#!/usr/bin/env bash
# The large-batch evidence (README "Large batches that train"): Fashion-MNIST, lenet5, the authors'
# recipe (configs/paper_fashion_mnist_lenet5.yaml), 3 seeds.
#
#   benchmarks/run_large_batch.sh                 # every stage
#   benchmarks/run_large_batch.sh recipe report   # only some stages
#   stages: recipe | diverge | lars_pilot | lars | absa | report
#
# recipe    : the recipe at B = 128, 512, 2048, 8192, 16384, seeds 0 1 2 (30 epochs each)
# diverge   : the previous rule lr = 0.05 * sqrt(B / 128) (no warm-up) at B = 4096, 8192, 16384,
#             seeds 0 1 2, 10 epochs, with the top eigenvalue and the stability ratio every 2
#             optimizer steps (configs/overlays/stability_watch.yaml); no test run (it would log its
#             test-sample analysis at the last training step)
# lars_pilot: LARS's learning rate, chosen once: 5 epochs at B = 8192, seed 0, lr 0.5 | 2 | 8, no
#             analysis; the lr with the best val/acc is LARS_LR below
# lars      : LARS instead of SGD at B = 8192 and 16384, seeds 0 1 2, lr LARS_LR, otherwise the recipe
#             (same lr at both sizes, step decay, no weight decay)
# absa      : the adaptive batch size (ABSA, configs/overlays/absa.yaml) from B = 128 up to 16384,
#             seeds 0 1 2, with the authors' 10 epochs at most per size and with 3, beside the
#             recipe's fixed B = 128 and fixed B = 16384
# report    : the tables (benchmarks/large_batch_tables.py) into docs/results/large_batch/: tables.md,
#             summary.json, runs.csv (per-epoch curves: the runs' TensorBoard events)
#
# Runs go to runs/large_batch/ (not tracked); finished runs are skipped on a rerun (hessian-sweep
# reads their sweep.json), so the study can be stopped and resumed stage by stage.
set -u -o pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
# One thread per process, two processes side by side (one per core of the 2-core CI machine).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SWEEP="$PYTHON -m lightning_hessian.cli.sweep"
CONFIG=configs/paper_fashion_mnist_lenet5.yaml
ROOT=runs/large_batch
DOCS=docs/results/large_batch
STAGES=${*:-recipe diverge lars_pilot lars absa report}
# Chosen by the lars_pilot stage (its runs are in $ROOT/../large_batch_pilot; see the tables).
LARS_LR=${LARS_LR:-2}
mkdir -p "$ROOT" "$DOCS"

two_lanes() {
    # two_lanes NAME "CMD A" "CMD B": runs two sweep commands side by side, one per core, logs in
    # $ROOT/NAME_{a,b}.log; fails if either failed.
    local name=$1 failed=0
    bash -c "$2" >> "$ROOT/${name}_a.log" 2>&1 &
    local lane_a=$!
    bash -c "$3" >> "$ROOT/${name}_b.log" 2>&1 &
    local lane_b=$!
    wait $lane_a || failed=1
    wait $lane_b || failed=1
    tail -n 3 "$ROOT/${name}_a.log" "$ROOT/${name}_b.log"
    return $failed
}

recipe() {
    # Small batches take more steps per epoch: lane a gets 128 and 2048, lane b 512, 8192, 16384.
    two_lanes recipe \
        "$SWEEP --config $CONFIG --root $ROOT --batch-sizes 128 2048 --seeds 0 1 2" \
        "$SWEEP --config $CONFIG --root $ROOT --batch-sizes 16384 8192 512 --seeds 0 1 2"
}

diverge() {
    local set="--set model.lr=0.05 --set model.lr_scaling=sqrt --no-test"
    two_lanes diverge \
        "$SWEEP --config $CONFIG --config configs/overlays/stability_watch.yaml --root $ROOT --name sqrt_lr_rule $set --batch-sizes 4096 16384 --seeds 0 1 2 -- --trainer.max_epochs 10" \
        "$SWEEP --config $CONFIG --config configs/overlays/stability_watch.yaml --root $ROOT --name sqrt_lr_rule $set --batch-sizes 8192 --seeds 0 1 2 -- --trainer.max_epochs 10"
}

lars_pilot() {
    local lr
    for lr in 0.5 2 8; do
        $SWEEP --config $CONFIG --config configs/overlays/no_analysis.yaml --root ${ROOT}_pilot --name lars_lr$lr \
            --batch-sizes 8192 --seeds 0 --no-test --set model.optimizer=lars --set model.lr=$lr \
            -- --trainer.max_epochs 5 >> "$ROOT/lars_pilot.log" 2>&1 || return 1
    done
    tail -n 3 "$ROOT/lars_pilot.log"
}

lars() {
    local set="--set model.optimizer=lars --set model.lr=$LARS_LR"
    two_lanes lars \
        "$SWEEP --config $CONFIG --root $ROOT --name lars $set --batch-sizes 16384 --seeds 0 1 2" \
        "$SWEEP --config $CONFIG --root $ROOT --name lars $set --batch-sizes 8192 --seeds 0 1 2"
}

absa() {
    # The authors' settings (an increase at the latest after 10 epochs at one size), and a faster
    # variant that allows an increase every 3 epochs (--trainer.callbacks.X sets the last callback's
    # argument, here AdaptiveBatchSizeCallback's).
    local fast="--name absa_every_3_epochs -- --trainer.callbacks.max_epochs_per_size=3"
    two_lanes absa \
        "$SWEEP --config $CONFIG --config configs/overlays/absa.yaml --root $ROOT --name absa --batch-sizes 128 --seeds 0 1 \
         && $SWEEP --config $CONFIG --config configs/overlays/absa.yaml --root $ROOT --batch-sizes 128 --seeds 1 $fast" \
        "$SWEEP --config $CONFIG --config configs/overlays/absa.yaml --root $ROOT --name absa --batch-sizes 128 --seeds 2 \
         && $SWEEP --config $CONFIG --config configs/overlays/absa.yaml --root $ROOT --batch-sizes 128 --seeds 0 2 $fast"
}

report() {
    $PYTHON benchmarks/large_batch_tables.py $ROOT --pilot ${ROOT}_pilot --out $DOCS
}

for stage in $STAGES; do
    echo "== $stage ($(date -u +%H:%M:%S))"
    "$stage" || { echo "stage $stage failed"; exit 1; }
done
