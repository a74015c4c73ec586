"""The paper study's setup: the analysis overlays on the paper configs, the study script's commands,
and one tiny study end to end (fit, test from the checkpoint, report) on the embedded digits."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import CONFIGS, PAPER_STUDY_CALLBACKS, QUICKSTART, REPO_ROOT

from lightning_hessian.cli import main as train_main
from lightning_hessian.models import ImageClassifier
from lightning_hessian.report import build_report
from lightning_hessian.report.events import read_events
from lightning_hessian.sweep.settings import SweepSettings, train_arguments

pytestmark = pytest.mark.usefixtures("one_thread")

STUDY = CONFIGS / "overlays" / "paper_study.yaml"
SAME_LOSS = CONFIGS / "overlays" / "paper_study_same_loss.yaml"
SCRIPT = REPO_ROOT / "benchmarks" / "run_paper_study.sh"


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["hessian-train"])


def _resolved(capsys: pytest.CaptureFixture, *configs: Path) -> dict:
    arguments = ["fit"]
    for config in configs:
        arguments += ["--config", str(config)]
    with pytest.raises(SystemExit) as info:
        train_main([*arguments, "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("base", ["paper_fashion_mnist_lenet5", "paper_fashion_mnist_m1", "paper_cifar10_c1"])
def test_study_overlay_holds_every_analysis_of_the_paper(capsys: pytest.CaptureFixture, base: str) -> None:
    config = _resolved(capsys, CONFIGS / f"{base}.yaml", STUDY)
    callbacks = config["trainer"]["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[-1] for c in callbacks] == PAPER_STUDY_CALLBACKS
    test_spectrum, curve, final, landscape, robust = (c["init_args"] for c in callbacks[1:])
    # under hessian-train test only: lambda_1 and the input curvature of test samples, and the
    # direction of the test-sample landscape (the first spectrum callback)
    assert test_spectrum["evaluation_stages"] == ["test"] and test_spectrum["every_n_epochs"] is None
    assert not test_spectrum["analyse_on_train_end"] and test_spectrum["quantities"] == ["eigenvalues", "input_hessian"]
    # during fit, on 1024 training samples: the top eigenvalue every few epochs ...
    assert curve["every_n_epochs"] == 2 and curve["quantities"] == ["eigenvalues"] and curve["evaluation_stages"] == []
    # ... and at the end the top-10, smallest eigenvalue, trace, density and input curvature
    assert final["top_k"] == 10 and final["every_n_epochs"] is None and final["analyse_on_train_end"]
    assert final["quantities"] == ["eigenvalues", "smallest_eigenvalue", "trace", "density", "input_hessian"]
    assert final["evaluation_stages"] == []
    for spectrum in (test_spectrum, curve, final):
        assert spectrum["num_samples"] == 1024 and spectrum["split"] == "train" and spectrum["seed"] == 0
    # the loss along the top eigenvector at the end of fit (training samples) and under test
    assert landscape["curves"] == ["eig1"] and landscape["surfaces"] == [] and landscape["analyse_on_train_end"]
    assert landscape["every_n_epochs"] is None and landscape["split"] == "train" and landscape["sharpness"]
    # FGSM and PGD accuracy vs epsilon, DeepFool and CW median norms, on 1000 test samples
    attacks = {attack["name"]: attack for attack in robust["attacks"]}
    assert set(attacks) == {"fgsm", "linf_pgd", "l2_deepfool", "l2_cw"} and robust["every_n_epochs"] is None
    assert len(attacks["fgsm"]["epsilons"]) >= 4 and attacks["linf_pgd"]["steps"] == 10
    assert robust["num_samples"] == 1000
    # the recipe itself is the base config's
    base_config = yaml.safe_load((CONFIGS / f"{base}.yaml").read_text())
    for key in (
        "arch",
        "lr",
        "lr_scaling",
        "lr_schedule",
        "lr_milestones",
        "momentum",
        "weight_decay",
        "bn_virtual_batch_size",
    ):
        assert config["model"][key] == base_config["model"][key], key


def test_same_loss_overlay_is_the_study_overlay_plus_the_early_stop(capsys: pytest.CaptureFixture) -> None:
    base = CONFIGS / "paper_fashion_mnist_lenet5.yaml"
    study = _resolved(capsys, base, STUDY)["trainer"]["callbacks"]
    control = _resolved(capsys, base, SAME_LOSS)["trainer"]["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[-1] for c in control] == [*PAPER_STUDY_CALLBACKS, "EarlyStopping"]
    stop = control[-1]["init_args"]
    assert (stop["monitor"], stop["mode"], stop["stopping_threshold"]) == ("train/loss", "min", 0.3)
    assert stop["check_on_train_epoch_end"] is True and stop["patience"] >= 10**5
    # the same analyses, the top eigenvalue every epoch (runs stop at different epochs)
    assert control[2]["init_args"]["every_n_epochs"] == 1
    control[2]["init_args"]["every_n_epochs"] = study[2]["init_args"]["every_n_epochs"]
    assert control[:-1] == study


def _dry_run(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    inherited = {key: value for key, value in os.environ.items() if key != "ATTACK_BATCH_SIZE"}
    environment = {**inherited, "DRY_RUN": "1", "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *arguments], capture_output=True, text=True, timeout=120,
                          env=environment, cwd=REPO_ROOT)  # fmt: skip


def test_study_script_commands_are_valid_and_complete() -> None:
    """Every command the script would run parses as its console script; the sweeps cover the recipe,
    the control, robust training, the noise baseline and softplus with 3 seeds each."""
    from lightning_hessian.cli.landscape import _parser as landscape_parser
    from lightning_hessian.cli.sweep import settings_from_args

    runs_dir = REPO_ROOT / "runs" / "paper_study" / "lenet5"
    existed = runs_dir.exists()
    result = _dry_run("lenet5")
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    sweeps, landscapes, others = [], [], []
    for command in commands:
        module = command[2] if command[1] == "-m" else None
        if module == "lightning_hessian.cli.sweep":
            settings, _ = settings_from_args(command[3:])
            sweeps.append(settings)
        elif module == "lightning_hessian.cli.landscape":
            landscapes.append(landscape_parser().parse_known_args(command[3:]))
        else:
            others.append(command)
    runs: dict[str, set] = {}
    for settings in sweeps:
        assert settings.configs[-1] in (str(STUDY.relative_to(REPO_ROOT)), str(SAME_LOSS.relative_to(REPO_ROOT)))
        for batch_size in settings.batch_sizes:
            for seed in settings.seeds:
                runs.setdefault(settings.sweep_name, set()).add((batch_size, seed))
    sizes = {128, 512, 2048, 8192, 16384}
    assert runs["recipe"] == runs["same_train_loss"] == {(b, s) for b in sizes for s in (0, 1, 2)}
    for name in ("fgsm", "gaussian_noise", "pgd", "trades"):
        assert runs[name] == {(b, s) for b in (128, 16384) for s in (0, 1, 2)}, name
    for beta in (1, 5, 20, 100):
        assert runs[f"softplus_beta={beta}"] == {(b, s) for b in (128, 16384) for s in (0, 1, 2)}
    control = next(s for s in sweeps if s.sweep_name == "same_train_loss")
    assert control.variant == "standard, same train loss" and "model.lr_schedule=constant" in control.overrides
    assert control.extra_args == ("--trainer.max_epochs", "200")
    pgd = next(s for s in sweeps if s.sweep_name == "pgd")
    assert {"model.adversarial.method=pgd", "model.adversarial.epsilon=0.1", "model.adversarial.steps=5"} <= set(
        pgd.overrides
    )
    # lenet5's robust runs attack whole batches, as its recorded runs did
    assert not any("attack_batch_size" in override for settings in sweeps for override in settings.overrides)
    interpolations = [args for args, _ in landscapes if args.command == "interpolate"]
    assert len(interpolations) == 6 and all(
        args.eigenvalue and args.splits == ["train", "test"] for args in interpolations
    )
    assert (interpolations[0].alpha_min, interpolations[0].alpha_max) == (-0.5, 1.5)
    surfaces = [args for args, _ in landscapes if args.command == "surface"]
    assert [Path(args.output_dir).parts[-3:] for args in surfaces] == [
        ("recipe", "bs128_seed0", "landscape"), ("recipe", "bs16384_seed0", "landscape"),
        ("same_train_loss", "bs128_seed0", "landscape"), ("same_train_loss", "bs16384_seed0", "landscape"),
    ]  # fmt: skip
    assert any("input_hessian_psd.py" in " ".join(command) for command in others)
    assert runs_dir.exists() == existed  # a dry run writes nothing
    bad = _dry_run("lenet5", "recipes")
    assert bad.returncode == 2 and "unknown stage recipes" in bad.stderr


# A stand-in for the study's Python, which appends each command to calls.log and writes what the real
# command writes last: `-m lightning_hessian.cli.sweep ... --root R --name N --batch-sizes B --seeds S`
# a finished run R/N/bsB_seedS with its checkpoint and an event file; `-m lightning_hessian.cli.landscape
# interpolate|surface ... --output-dir DIR` interpolation.json or surface.json in DIR;
# `benchmarks/input_hessian_psd.py ... --out FILE` FILE and the table's header.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> calls.log
declare -A option
previous=""
for argument in "$@"; do
    case $previous in --*) option[$previous]=$argument ;; esac
    previous=$argument
done
case "$2 $3" in
    "lightning_hessian.cli.sweep "*)
        run="${option[--root]}/${option[--name]}/bs${option[--batch-sizes]}_seed${option[--seeds]}"
        mkdir -p "$run/checkpoints"
        echo weights > "$run/checkpoints/last.ckpt"
        echo events > "$run/events.out.tfevents.1"
        echo "{\"checkpoint\": \"$run/checkpoints/last.ckpt\", \"status\": \"finished\"}" > "$run/checkpoint.json"
        echo '{"status": "finished"}' > "$run/sweep.json" ;;
    "lightning_hessian.cli.landscape interpolate")
        mkdir -p "${option[--output-dir]}" && echo {} > "${option[--output-dir]}/interpolation.json" ;;
    "lightning_hessian.cli.landscape surface")
        mkdir -p "${option[--output-dir]}" && echo {} > "${option[--output-dir]}/surface.json" ;;
esac
if [ "$1" = benchmarks/input_hessian_psd.py ]; then
    echo "| run | activation |"
    echo {} > "${option[--out]}"
fi
"""


def _fake_study(tmp_path: Path) -> Path:
    """A copy of the study script in ``tmp_path`` and the stand-in for its Python."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SCRIPT, tmp_path / "benchmarks" / SCRIPT.name)
    python = tmp_path / "fake_python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return python


def _calls(tmp_path: Path, command: str | None = None) -> list[str]:
    """The commands the stand-in ran (those of one sweep, landscape or script command)."""
    log = tmp_path / "calls.log"
    calls = log.read_text().splitlines() if log.exists() else []
    if command is None:
        return calls
    return [call for call in calls if command in call.split()[:3]]


needs_jq = pytest.mark.skipif(shutil.which("jq") is None, reason="the study script reads sweep.json with jq")


@needs_jq
def test_interpolate_and_surface_keep_what_they_made_before(tmp_path: Path) -> None:
    """Rerun (a study continued after a stop), the interpolate and surface stages keep the outputs
    they made before; REDO=1 makes them again."""
    python = _fake_study(tmp_path)
    root = tmp_path / "runs" / "paper_study" / "lenet5"
    runs = (
        "recipe/bs128_seed0",
        "recipe/bs16384_seed0",
        "same_train_loss/bs128_seed0",
        "same_train_loss/bs16384_seed0",
    )
    for run in (*runs, "fgsm/bs128_seed0"):
        (root / run / "checkpoints").mkdir(parents=True)
        (root / run / "checkpoints" / "last.ckpt").write_text("weights")
        (root / run / "checkpoint.json").write_text(json.dumps({"checkpoint": f"{root / run}/checkpoints/last.ckpt"}))

    def study(**environment: str) -> str:
        env = {**os.environ, "PYTHON": str(python), "SEEDS": "0", "BATCH_SIZES": "128 16384", **environment}
        result = subprocess.run(
            ["bash", "benchmarks/run_paper_study.sh", "lenet5", "interpolate", "surface"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    study()
    assert sorted(call.split()[2] for call in _calls(tmp_path)) == ["interpolate"] * 2 + ["surface"] * 4
    assert (root / "interpolation" / "standard_vs_fgsm_bs128" / "seed0" / "interpolation.json").is_file()
    assert (root / "recipe" / "bs16384_seed0" / "landscape" / "surface.json").is_file()
    study()
    assert len(_calls(tmp_path)) == 6
    lanes = "".join(log.read_text() for log in root.glob("*_lane*.log"))
    assert lanes.count("was made before, kept") == 6
    study(REDO="1")
    assert len(_calls(tmp_path)) == 12


@needs_jq
def test_each_run_is_followed_by_what_needs_its_checkpoint(tmp_path: Path) -> None:
    """In the lanes, after each run: the PSD check, and every interpolation and surface whose
    checkpoints are all there, once; then the run is kept in records/ without its checkpoint."""
    python = _fake_study(tmp_path)
    env = {**os.environ, "PYTHON": str(python), "SEEDS": "0", "BATCH_SIZES": "128 16384", "ROBUST_METHODS": "fgsm"}
    result = subprocess.run(
        ["bash", "benchmarks/run_paper_study.sh", "lenet5", "recipe", "robust"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(_calls(tmp_path, "lightning_hessian.cli.sweep")) == 4
    assert len(_calls(tmp_path, "benchmarks/input_hessian_psd.py")) == 4  # after each run
    # B=128 vs B=16384 after the recipe, standard vs FGSM after the robust stage; the recipe's two
    # surfaces, not the control's (not run)
    interpolations = _calls(tmp_path, "interpolate")
    assert len(interpolations) == 2 and "recipe/bs16384_seed0" in interpolations[0]
    assert "fgsm/bs128_seed0" in interpolations[1]
    surfaces = _calls(tmp_path, "surface")
    assert len(surfaces) == 2 and all("/recipe/" in call for call in surfaces)
    records = tmp_path / "docs" / "results" / "paper_study_lenet5" / "records"
    kept = {str(path.relative_to(records)) for path in records.rglob("*") if path.is_file()}
    assert {
        "recipe/bs128_seed0/sweep.json",
        "recipe/bs128_seed0/events.out.tfevents.1",
        "recipe/bs16384_seed0/landscape/surface.json",
        "fgsm/bs16384_seed0/checkpoint.json",
        "interpolation/standard_vs_fgsm_bs128/seed0/interpolation.json",
    } <= kept
    assert not any("checkpoints" in path or path.endswith(".ckpt") for path in kept)
    assert (tmp_path / "docs" / "results" / "paper_study_lenet5" / "input_hessian_psd.md").is_file()


@needs_jq
def test_records_continue_a_study_on_another_machine(tmp_path: Path) -> None:
    """With runs/ gone (another machine) and records/ kept, the finished runs are restored: the sweeps
    skip them, the interpolations made before are kept, and a surface that needs a checkpoint lost with
    the machine fails naming the run and how to train it again."""
    python = _fake_study(tmp_path)
    env = {**os.environ, "PYTHON": str(python), "SEEDS": "0", "BATCH_SIZES": "128 16384", "ROBUST_METHODS": "fgsm"}

    def study(*stages: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "benchmarks/run_paper_study.sh", "lenet5", *stages],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    assert study("recipe", "robust").returncode == 0
    root = tmp_path / "runs" / "paper_study" / "lenet5"
    shutil.rmtree(root)
    (tmp_path / "calls.log").unlink()
    result = study("interpolate")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restored runs/paper_study/lenet5/recipe/bs128_seed0" in result.stdout
    assert json.loads((root / "fgsm" / "bs128_seed0" / "sweep.json").read_text())["status"] == "finished"
    assert not (root / "fgsm" / "bs128_seed0" / "checkpoints").exists()
    assert (root / "interpolation" / "bs128_vs_bs16384" / "seed0" / "interpolation.json").is_file()
    assert _calls(tmp_path) == []  # both interpolations kept
    control = study("control")  # new runs train, as on the first machine
    assert control.returncode == 0 and len(_calls(tmp_path, "lightning_hessian.cli.sweep")) == 2
    shutil.rmtree(root / "recipe" / "bs16384_seed0" / "landscape")
    records = tmp_path / "docs" / "results" / "paper_study_lenet5" / "records"
    shutil.rmtree(records / "recipe" / "bs16384_seed0" / "landscape")
    surface = study("surface")
    assert surface.returncode == 1
    lanes = "".join(log.read_text() for log in root.glob("surface_lane*.log"))
    assert "runs/paper_study/lenet5/recipe/bs16384_seed0 was restored from" in lanes and "rerun its stage" in lanes


def test_m1_analyses_run_in_micro_batches_of_256(tmp_path: Path) -> None:
    """For m1 the script writes the study's overlays with micro-batches of 256 for the Hessian and
    landscape analyses (everything else unchanged, the attacks' batch too) and trains with them."""
    python = _fake_study(tmp_path)
    shutil.copytree(CONFIGS / "overlays", tmp_path / "configs" / "overlays")
    env = {**os.environ, "PYTHON": str(python)}
    result = subprocess.run(
        ["bash", "benchmarks/run_paper_study.sh", "m1", "psd"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("paper_study.yaml", "paper_study_same_loss.yaml"):
        original = (CONFIGS / "overlays" / name).read_text().splitlines()
        derived = (tmp_path / "runs" / "paper_study" / "m1" / "overlays" / name).read_text().splitlines()
        changed = [(a.strip(), b.strip()) for a, b in zip(original, derived, strict=True) if a != b]
        assert changed and set(changed) == {("analysis_batch_size: 1024", "analysis_batch_size: 256")}, name
        assert "analysis_batch_size: 1000" in "\n".join(derived)  # the attacks'
    # the sweeps train with them; lenet5 keeps the overlays as they are
    m1 = _dry_run("m1", "recipe", "control")
    lenet5 = _dry_run("lenet5", "recipe")
    assert m1.returncode == 0 and lenet5.returncode == 0
    m1_configs = {line.split("--config ")[2].split()[0] for line in m1.stdout.splitlines() if line.startswith("+ ")}
    assert {Path(config).parent.name for config in m1_configs} == {"overlays"} and all(
        not config.startswith("configs/") for config in m1_configs
    )
    assert " --config configs/overlays/paper_study.yaml " in lenet5.stdout


def test_m1_robust_training_attacks_in_slices_of_256() -> None:
    """m1's FGSM, PGD and TRADES runs attack in slices of 256 (ATTACK_BATCH_SIZE overrides it, empty
    for whole batches); the noise baseline has no attack to slice."""

    def slices(result: subprocess.CompletedProcess) -> dict[str, set[str]]:
        assert result.returncode == 0, result.stderr
        found: dict[str, set[str]] = {}
        for line in result.stdout.splitlines():
            if line.startswith("+ ") and "lightning_hessian.cli.sweep" in line:
                command = shlex.split(line[2:])
                name = command[command.index("--name") + 1]
                found.setdefault(name, set()).update(a for a in command if "attack_batch_size" in a)
        return found

    assert slices(_dry_run("m1", "robust")) == {
        "fgsm": {"model.adversarial.attack_batch_size=256"},
        "gaussian_noise": set(),
        "pgd": {"model.adversarial.attack_batch_size=256"},
        "trades": {"model.adversarial.attack_batch_size=256"},
    }
    assert slices(_dry_run("m1", "robust", env={"ATTACK_BATCH_SIZE": "1024"}))["pgd"] == {
        "model.adversarial.attack_batch_size=1024"
    }
    assert slices(_dry_run("m1", "robust", env={"ATTACK_BATCH_SIZE": ""}))["pgd"] == set()


def test_tiny_study_end_to_end(in_tmp_dir: Path) -> None:
    """The control's overlay on the digits (quickstart config): the early stop ends each run at the
    first epoch with a training loss below 0.3; the test from the recorded checkpoint logs the
    test-sample analyses beside the fit's; the report has both, the claims and the figures."""
    settings = SweepSettings(
        configs=(str(QUICKSTART), str(SAME_LOSS)), batch_sizes=(64, 512), seeds=(0,),
        overrides=("model.lr_schedule=constant",), extra_args=("--trainer.max_epochs=12",),
        root=str(in_tmp_dir / "runs"), name="same_loss",
    )  # fmt: skip
    cap = 12
    for batch_size in settings.batch_sizes:
        arguments = train_arguments(settings, batch_size, 0)
        train_main(["fit", *arguments])
        run_dir = settings.sweep_dir / f"bs{batch_size}_seed0"
        record = json.loads((run_dir / "checkpoint.json").read_text())
        train_main(["test", *arguments, f"--ckpt_path={record['checkpoint']}"])
        events = read_events(run_dir)
        losses = [p.value for p in events.scalars["train/loss"]]
        assert len(losses) == record["epoch"]
        if record["epoch"] < cap:  # stopped by the threshold, at the first epoch below it
            assert losses[-1] < 0.3 and all(loss >= 0.3 for loss in losses[:-1])
        else:
            assert all(loss >= 0.3 for loss in losses)
        if batch_size == 64:
            assert record["epoch"] < cap
        # the weight norm of the saved model
        model = ImageClassifier.load_from_checkpoint(record["checkpoint"], map_location="cpu")
        norm = math.sqrt(sum(float(p.detach().double().square().sum()) for p in model.parameters() if p.requires_grad))
        assert events.final("model/weight_norm") == pytest.approx(norm, rel=1e-5)
        # fit: training samples, unqualified; test: split-qualified, at the checkpoint's step
        assert (
            events.scalars["hessian/test/eig_1"][-1].step
            == events.scalars["hessian/eig_10"][-1].step
            == record["global_step"]
        )
        assert {"hessian/eig_min", "hessian/trace", "hessian/input_eig_1", "landscape/curvature/eig1"} <= set(
            events.scalars
        )
        assert {"robust/test/fgsm/eps_0.1", "robust/test/l2_cw/median_norm", "landscape/test/loss"} <= set(
            events.scalars
        )
        assert not any(tag.startswith("robust/") and "/test/" not in tag for tag in events.scalars)  # test only

    content = build_report([settings.sweep_dir], in_tmp_dir / "report")
    keys = {column.key for column in content.columns}
    assert {
        "hessian/eig_1",
        "hessian/test/eig_1",
        "hessian/eig_10",
        "robust/test/l2_deepfool/median_norm",
        "run/epochs",
    } <= keys
    assert any(
        claim.claim.startswith("Large batches converge to points of larger curvature") for claim in content.claims
    )
    names = {figure.file_name for figure in content.figures}
    assert {
        "topk_spectrum.png",
        "spectral_density.png",
        "landscape_curves_0_standard.png",
        "median_norms_vs_batch_size.png",
    } <= names
