#!/usr/bin/env bash
# Reproduces the README's "Results" section: the Fashion-MNIST batch-size sweep, the robust-training
# and softplus variants, the input-Hessian PSD check, and the report.
#
#   benchmarks/run_results.sh            # everything (sweeps, long, psd, fullspec, report)
#   benchmarks/run_results.sh psd report # only some stages
#   stages: sweeps (= standard and variants side by side) | standard | variants | long | psd | fullspec | report
#   benchmarks/run_results.sh m1         # the same study with the CNN m1 (not in the default stages)
#
# Outputs: runs/results/ (TensorBoard runs, sweep logs, report; not tracked) and docs/results/
# (report.md, its PNG figures, summary.json, input_hessian_psd.*, full_test_spectrum.*; tracked).
# Finished runs are skipped on a rerun (hessian-sweep reads their sweep.json).
set -u -o pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
# One thread per process: on this shared, loaded 2-core machine torch's default of 2 threads made
# a training step of the mlp several times slower in a quick check.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SWEEP="$PYTHON -m lightning_hessian.report.sweep"   # the hessian-sweep console script
REPORT="$PYTHON -m lightning_hessian.report.report" # the hessian-report console script
CONFIG=configs/results_fashion_mnist.yaml
ROOT=runs/results
DOCS=docs/results
STAGES=${*:-sweeps long psd fullspec report}
mkdir -p "$ROOT" "$DOCS"

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
    local lane_b=$!
    local failed=0
    wait $lane_a || failed=1
    wait $lane_b || failed=1
    tail -n 4 "$ROOT/sweep_long_a.log" "$ROOT/sweep_long_b.log"
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
    local lane_b=$!
    local failed=0
    wait $lane_a || failed=1
    wait $lane_b || failed=1
    tail -n 4 "$root/sweep_a.log" "$root/sweep_b.log"
    rm -rf "$root/report" && rm -f "$docs"/*.png "$docs/report.md"  # no stale figures
    $REPORT $root --out $root/report --title "Fashion-MNIST results (m1 CNN)" || failed=1
    cp $root/report/report.md $root/report/*.png "$docs/"
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
            wait $standard || status=1
            wait $variants || status=1
            tail -n 4 "$ROOT/sweep_standard.log" "$ROOT/sweep_variants.log"
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
            echo "unknown stage $stage (sweeps, standard, variants, long, psd, fullspec, report, m1)" >&2
            exit 2
            ;;
    esac
    echo "== $stage: done in $(( $(date +%s) - start )) s"
done
exit $status
