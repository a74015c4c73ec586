#!/usr/bin/env bash
# Reproduces the README's "Results" section: the Fashion-MNIST batch-size sweep, the robust-training
# and softplus variants, the input-Hessian PSD check, and the report.
#
#   benchmarks/run_results.sh            # everything (sweeps, long, psd, fullspec, report)
#   benchmarks/run_results.sh psd report # only some stages
#   stages: sweeps (= standard and variants side by side) | standard | variants | long | psd | fullspec | report
#   benchmarks/run_results.sh lenet5_long lenet5
#       # the README's main study: the small CNN lenet5 (40-epoch control, then the 15-epoch sweep,
#       # variants, PSD check and report into docs/results/lenet5)
#   benchmarks/run_results.sh c1         # the full-size GPU version with c1 (docs/results/c1; not run yet)
#   benchmarks/run_results.sh m1         # the same study with the CNN m1, shortened (5 epochs, 1 seed)
#
# Outputs: runs/results/ (TensorBoard runs, sweep logs, report; not tracked) and docs/results/mlp/
# (report.md, its PNG figures, summary.json, input_hessian_psd.*, full_test_spectrum.*; tracked).
# Finished runs are skipped on a rerun (hessian-sweep reads their sweep.json).
set -u -o pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
# One thread per process: on this shared, loaded 2-core machine torch's default of 2 threads made
# a training step of the mlp several times slower in a quick check.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SWEEP="$PYTHON -m lightning_hessian.cli.sweep"     # the hessian-sweep console script
REPORT="$PYTHON -m lightning_hessian.cli.report"   # the hessian-report console script
CONFIG=configs/results_fashion_mnist.yaml
ROOT=runs/results
DOCS=docs/results/mlp
STAGES=${*:-sweeps long psd fullspec report}
mkdir -p "$ROOT" "$DOCS"

wait_lanes() {
    # wait_lanes PID_A PID_B LOG_A LOG_B: waits for two background sweep processes (one per core),
    # prints the end of their logs, and fails if either failed.
    local failed=0
    wait $1 || failed=1
    wait $2 || failed=1
    tail -n 4 "$3" "$4"
    return $failed
}

standard_sweep() {
    $SWEEP --config "$CONFIG" --root "$ROOT" --batch-sizes 64 256 1024 4096 8192 16384 --seeds 0 1 2
}

variant_sweeps() {
    # At batch 256 (compare with the standard runs at 256): FGSM and Gaussian-noise training
    # (Linf 0.1 sign steps and N(0, 0.1^2) noise have the same expected L2 norm), softplus(beta);
    # then FGSM and noise training at batch 4096, and seeds 1 and 2 of FGSM and noise at 256.
    $SWEEP --config "$CONFIG" --root "$ROOT" --batch-sizes 256 --seeds 0 \
        --set model.adversarial.method=fgsm --set model.adversarial.epsilon=0.1
    $SWEEP --config "$CONFIG" --root "$ROOT" --batch-sizes 256 --seeds 0 \
        --set model.adversarial.method=gaussian_noise --set model.adversarial.epsilon=0.1
    for beta in 1 5 20 100; do
        $SWEEP --config "$CONFIG" --root "$ROOT" --batch-sizes 256 --seeds 0 \
            --set model.activation=softplus --set model.softplus_beta=$beta
    done
    for method in fgsm gaussian_noise; do
        $SWEEP --config "$CONFIG" --root "$ROOT" --batch-sizes 4096 --seeds 0 \
            --set model.adversarial.method=$method --set model.adversarial.epsilon=0.1
    done
    for method in fgsm gaussian_noise; do
        $SWEEP --config "$CONFIG" --root "$ROOT" --batch-sizes 256 --seeds 0 1 2 \
            --set model.adversarial.method=$method --set model.adversarial.epsilon=0.1
    done
}

long_sweeps() {
    # Control for under-training: the same config for 40 epochs instead of 8 (one seed), to see
    # whether the large batches' trend changes once they have taken more steps.
    local name=results_fashion_mnist_40epochs variant="standard, 40 epochs"
    $SWEEP --config "$CONFIG" --root "$ROOT" --name $name --variant "$variant" --batch-sizes 64 256 1024 --seeds 0 \
        -- --trainer.max_epochs 40 >> "$ROOT/sweep_long_a.log" 2>&1 &
    local lane_a=$!
    $SWEEP --config "$CONFIG" --root "$ROOT" --name $name --variant "$variant" --batch-sizes 4096 8192 16384 --seeds 0 \
        -- --trainer.max_epochs 40 >> "$ROOT/sweep_long_b.log" 2>&1 &
    local lane_b=$! failed=0
    wait_lanes $lane_a $lane_b "$ROOT/sweep_long_a.log" "$ROOT/sweep_long_b.log" || failed=1
    return $failed
}

study_lane() {
    # One sweep process (one core, or one GPU): seed 0 of the given batch sizes, then the given variants at
    # B = 256 (seed 0), then seeds 1 and 2; so that a complete one-seed picture exists early.
    local config=$1 root=$2 batch_sizes=$3
    shift 3
    $SWEEP --config $config --root $root --batch-sizes $batch_sizes --seeds 0
    local variant
    for variant in "$@"; do
        # word splitting of $variant into --set options is intended
        $SWEEP --config $config --root $root --batch-sizes 256 --seeds 0 $variant
    done
    $SWEEP --config $config --root $root --batch-sizes $batch_sizes --seeds 1 2
}

study_variants() {
    # --set options of the one-seed variants at B = 256, one string each: FGSM training, Gaussian-
    # noise training (epsilon 0.1), softplus(beta) for beta in 1 5 20 100.
    local method
    for method in fgsm gaussian_noise; do
        echo "--set model.adversarial.method=$method --set model.adversarial.epsilon=0.1"
    done
    local beta
    for beta in 1 5 20 100; do
        echo "--set model.activation=softplus --set model.softplus_beta=$beta"
    done
}

finish_study() {
    # finish_study ROOT DOCS TITLE [REPORT_OPTION...]: the input-Hessian PSD check on every run,
    # then the report into the tracked docs folder.
    local root=$1 docs=$2 title=$3 failed=0
    shift 3
    $PYTHON benchmarks/input_hessian_psd.py --root $root --out $docs/input_hessian_psd.json \
        --num-samples 512 --all-seeds | tee $docs/input_hessian_psd.md || failed=1
    rm -rf "$root/report" && rm -f "$docs"/*.png "$docs/report.md" "$docs/summary.json"  # no stale figures
    $REPORT $root --out $root/report --title "$title" "$@" || failed=1
    cp $root/report/report.md $root/report/summary.json $root/report/*.png "$docs/"
    return $failed
}

lenet5_study() {
    # The README's main results: configs/results_fashion_mnist_lenet5.yaml (15 epochs), batch sizes
    # 64 ... 16384 x seeds 0 1 2 and the one-seed variants at B = 256, in two sweep processes side
    # by side (one per core); then lambda_1 on the whole test set (runs that diverged skipped), the
    # PSD check and the report.
    local config=configs/results_fashion_mnist_lenet5.yaml root=runs/results_lenet5 docs=docs/results/lenet5
    local variants=()
    mapfile -t variants < <(study_variants)
    mkdir -p "$root" "$docs"
    study_lane $config $root "64 1024 8192" "${variants[1]}" "${variants[2]}" "${variants[3]}" >> "$root/sweep_a.log" 2>&1 &
    local lane_a=$!
    study_lane $config $root "256 4096 16384" "${variants[0]}" "${variants[4]}" "${variants[5]}" >> "$root/sweep_b.log" 2>&1 &
    local lane_b=$! failed=0
    wait_lanes $lane_a $lane_b "$root/sweep_a.log" "$root/sweep_b.log" || failed=1
    $PYTHON benchmarks/full_test_spectrum.py --root $root --out $docs/full_test_spectrum.json --min-accuracy 30 \
        | grep -v -i warn | tee $docs/full_test_spectrum.md || failed=1
    # Some runs at B >= 4096 diverge to chance accuracy (10%); they would swamp the means.
    finish_study $root $docs "Fashion-MNIST results (lenet5 CNN)" --min-accuracy 30 || failed=1
    return $failed
}

lenet5_long() {
    # Control for under-training: the lenet5 config for 40 epochs instead of 15 and a 5-epoch
    # learning-rate warm-up instead of 1 (in 15 epochs B >= 8192 trains slowly or diverges; one
    # epoch is 3 steps at B = 16384), seed 0, in two sweep processes side by side; its runs join
    # the lenet5 report as "standard, 40 epochs, 5 warm-up".
    local config=configs/results_fashion_mnist_lenet5.yaml root=runs/results_lenet5
    local name=results_fashion_mnist_lenet5_40epochs variant="standard, 40 epochs, 5 warm-up"
    $SWEEP --config $config --root $root --name $name --variant "$variant" --batch-sizes 64 1024 8192 --seeds 0 \
        -- --trainer.max_epochs 40 --model.warmup_epochs 5 >> "$root/sweep_long_a.log" 2>&1 &
    local lane_a=$!
    $SWEEP --config $config --root $root --name $name --variant "$variant" --batch-sizes 256 4096 16384 --seeds 0 \
        -- --trainer.max_epochs 40 --model.warmup_epochs 5 >> "$root/sweep_long_b.log" 2>&1 &
    local lane_b=$! failed=0
    wait_lanes $lane_a $lane_b "$root/sweep_long_a.log" "$root/sweep_long_b.log" || failed=1
    return $failed
}

c1_study() {
    # The full-size GPU study: configs/results_fashion_mnist_c1.yaml (c1, 30 epochs, analyses on
    # 4096 samples), the same runs as lenet5_study in one sweep process on one GPU. A machine
    # without network needs the Fashion-MNIST IDX files in data/ (carry them).
    local config=configs/results_fashion_mnist_c1.yaml root=runs/results_c1 docs=docs/results/c1
    local variants=()
    mapfile -t variants < <(study_variants)
    mkdir -p "$root" "$docs"
    local failed=0
    study_lane $config $root "64 256 1024 4096 8192 16384" "${variants[@]}" 2>&1 | tee -a "$root/sweep.log" || failed=1
    finish_study $root $docs "Fashion-MNIST results (c1 CNN, GPU)" || failed=1
    return $failed
}

m1_sweeps() {
    # The same study with the CNN `m1` (configs/results_fashion_mnist_m1.yaml: 5 epochs, 1 seed),
    # in two sweep processes side by side (one per core), each ending with one variant at B = 256.
    local config=configs/results_fashion_mnist_m1.yaml root=runs/results_m1 docs=docs/results/m1
    mkdir -p "$root" "$docs"
    ( $SWEEP --config $config --root $root --batch-sizes 64 256 1024 --seeds 0
      $SWEEP --config $config --root $root --batch-sizes 256 --seeds 0 \
          --set model.adversarial.method=gaussian_noise --set model.adversarial.epsilon=0.1
    ) >> "$root/sweep_a.log" 2>&1 &
    local lane_a=$!
    ( $SWEEP --config $config --root $root --batch-sizes 4096 8192 16384 --seeds 0
      $SWEEP --config $config --root $root --batch-sizes 256 --seeds 0 \
          --set model.adversarial.method=fgsm --set model.adversarial.epsilon=0.1
    ) >> "$root/sweep_b.log" 2>&1 &
    local lane_b=$! failed=0
    wait_lanes $lane_a $lane_b "$root/sweep_a.log" "$root/sweep_b.log" || failed=1
    finish_study $root $docs "Fashion-MNIST results (m1 CNN)" || failed=1
    return $failed
}

status=0
for stage in $STAGES; do
    start=$(date +%s)
    echo "== $stage: started $(date -u +%FT%TZ)"
    case $stage in
        sweeps)
            # two sweep processes side by side, one per core
            standard_sweep >> "$ROOT/sweep_standard.log" 2>&1 &
            standard=$!
            variant_sweeps >> "$ROOT/sweep_variants.log" 2>&1 &
            variants=$!
            wait_lanes $standard $variants "$ROOT/sweep_standard.log" "$ROOT/sweep_variants.log" || status=1
            ;;
        standard)
            standard_sweep 2>&1 | tee -a "$ROOT/sweep_standard.log" || status=1
            ;;
        variants)
            variant_sweeps 2>&1 | tee -a "$ROOT/sweep_variants.log" || status=1
            ;;
        long)
            long_sweeps || status=1
            ;;
        lenet5)
            lenet5_study || status=1
            ;;
        lenet5_long)
            lenet5_long || status=1
            ;;
        c1)
            c1_study || status=1
            ;;
        m1)
            m1_sweeps || status=1
            ;;
        psd)
            $PYTHON benchmarks/input_hessian_psd.py --root "$ROOT" --out "$DOCS/input_hessian_psd.json" \
                --num-samples 512 --all-seeds | tee "$DOCS/input_hessian_psd.md" || status=1
            ;;
        fullspec)
            $PYTHON benchmarks/full_test_spectrum.py --root "$ROOT" --out "$DOCS/full_test_spectrum.json" \
                | grep -v -i warn | tee "$DOCS/full_test_spectrum.md" || status=1
            ;;
        report)
            rm -rf "$ROOT/report" && rm -f "$DOCS"/*.png "$DOCS/report.md" "$DOCS/summary.json"  # no stale figures
            $REPORT "$ROOT" --out "$ROOT/report" --title "Fashion-MNIST results (mlp, 784-256-128-10)" || status=1
            cp "$ROOT/report/report.md" "$ROOT/report/summary.json" "$ROOT"/report/*.png "$DOCS/"
            ;;
        *)
            echo "unknown stage $stage (sweeps, standard, variants, long, psd, fullspec, report, lenet5_long, lenet5, c1, m1)" >&2
            exit 2
            ;;
    esac
    echo "== $stage: done in $(( $(date +%s) - start )) s"
done
exit $status
