"""What a run was: batch size, seed and training variant, read from the files beside its events.

Sources, first found wins for each field:

1. ``sweep.json`` written by ``hessian-sweep`` (batch size, seed, variant, status);
2. ``config.yaml`` saved by LightningCLI (``seed_everything``, ``data...batch_size``, model
   options);
3. ``hparams.yaml`` saved by ``LightningModule.save_hyperparameters`` (``batch_size``,
   ``adversarial``, ``activation`` ... anywhere in the mapping);
4. the directory names (``bs1024``, ``seed2``, as ``hessian-sweep`` names runs).

The *variant* is the training method that a table groups by: ``"standard"``, or for example
``"fgsm ε=0.1"`` for FGSM adversarial training at epsilon 0.1 and ``"standard, softplus β=5"``
for a non-ReLU activation. ``hessian-sweep --variant LABEL`` overrides it.

Also read, where present: the split each analysis group samples during ``fit`` (the ``split`` of
the callbacks in ``config.yaml``; :data:`DEFAULT_FIT_SPLITS` otherwise), which names the split of
the unqualified tags (:mod:`lightning_hessian.metrics`); the epochs and optimizer steps of the
saved model (``checkpoint.json``); the wall time of the run (``sweep.json``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_hessian.report.events import RunEvents, read_events
from lightning_hessian.sweep.records import SWEEP_FILE, read_record

__all__ = [
    "DEFAULT_FIT_SPLITS",
    "Run",
    "describe_variant",
    "fit_splits",
    "load_run",
    "read_run_metadata",
    "softplus_variant",
]

STANDARD_VARIANT = "standard"
#: the split each analysis group samples during ``fit`` when nothing says otherwise: the
#: callbacks' defaults (spectrum and landscape: training samples; robustness: validation samples)
DEFAULT_FIT_SPLITS: dict[str, str] = {"hessian": "train", "landscape": "train", "robust": "val"}
# the callback class (last part of its class_path) -> the tag group it logs
_CALLBACK_GROUPS = {
    "HessianSpectrumCallback": "hessian",
    "LossLandscapeCallback": "landscape",
    "AdversarialRobustnessCallback": "robust",
}
CHECKPOINT_RECORD = "checkpoint.json"
_BATCH_SIZE_PATTERN = re.compile(r"(?:^|[^a-z])(?:bs|batch_size|batch)[_=-]?(\d+)", re.IGNORECASE)
_SEED_PATTERN = re.compile(r"(?:^|[^a-z])seed[_=-]?(\d+)", re.IGNORECASE)
# Values of an ``adversarial.method`` style option that mean "no robust training".
_NO_METHOD = {None, "", "none", "None", "null", "standard", False}


@dataclass
class Run:
    """One run directory with its metadata and events."""

    path: Path
    batch_size: int | None
    seed: int | None
    variant: str
    status: str | None = None
    metadata_source: dict[str, str] = field(default_factory=dict)
    events: RunEvents = field(default_factory=RunEvents)
    #: tag group -> the split its unqualified (fit-time) tags were computed on
    fit_splits: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FIT_SPLITS))
    #: epochs and optimizer steps of the model the fit saved (``checkpoint.json``), if known
    epochs: int | None = None
    global_step: int | None = None
    #: wall time of the run's fit and test (``sweep.json``), if known
    wall_seconds: float | None = None
    #: the machines that made it (``sweep.json``; earlier kept attempts first), as
    #: :func:`describe_machine_record` writes them; empty when not recorded
    machines: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """A short name: the last two path components (``sweep_name/bs1024_seed0``)."""
        return "/".join(self.path.parts[-2:])

    @property
    def finished(self) -> bool:
        """Whether the run is usable: finished according to ``sweep.json``, or not swept."""
        return self.status in (None, "finished")


def _load_yaml(path: Path) -> Mapping[str, Any]:
    try:
        with path.open() as file:
            # hparams.yaml may hold python tags (e.g. dataclasses); read it without constructing them.
            loaded = yaml.load(file, Loader=_LenientLoader)
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, Mapping) else {}


class _LenientLoader(yaml.SafeLoader):
    """A safe YAML loader that reads unknown ``!!python/...`` tags as plain mappings/lists/scalars."""


def _construct_unknown(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_LenientLoader.add_multi_constructor("tag:yaml.org,2002:python/", _construct_unknown)
_LenientLoader.add_multi_constructor("!", _construct_unknown)


def _find_key(tree: Any, key: str) -> Any:
    """The value of ``key`` in a nested mapping, breadth first (top-level keys win)."""
    queue = [tree]
    while queue:
        node = queue.pop(0)
        if isinstance(node, Mapping):
            if key in node:
                return node[key]
            queue.extend(node.values())
        elif isinstance(node, list):
            queue.extend(node)
    return None


def _init_args(value: Any) -> Any:
    """``{"class_path": ..., "init_args": {...}}`` (jsonargparse) as its init args plus ``name``."""
    if isinstance(value, Mapping) and "class_path" in value:
        merged = dict(value.get("init_args") or {})
        merged.setdefault("name", str(value["class_path"]).rsplit(".", 1)[-1])
        return merged
    return value


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def describe_variant(options: Mapping[str, Any]) -> str | None:
    """The training variant described by model options (``hparams.yaml``/``config.yaml``).

    Looks for an ``adversarial`` option (a mapping with ``method`` and ``epsilon`` as
    :class:`~lightning_hessian.attacks.training.AdversarialTraining` saves it, or a string) and an
    ``activation`` option (a string, with ``softplus_beta`` for softplus, or a mapping with
    ``name`` and e.g. ``beta``).

    Returns:
        The variant, e.g. ``"standard"``, ``"fgsm ε=0.1"``, ``"standard, softplus β=5"``; ``None``
        when neither option is present, so that other sources can decide.
    """
    adversarial = _init_args(_find_key(options, "adversarial"))
    activation = _init_args(_find_key(options, "activation"))
    if adversarial is None and activation is None:
        return None
    parts = []
    if isinstance(adversarial, Mapping):
        method = adversarial.get("method", adversarial.get("name"))
        if method in _NO_METHOD:
            parts.append(STANDARD_VARIANT)
        else:
            epsilon = adversarial.get("epsilon")
            parts.append(f"{method} ε={_format_number(epsilon)}" if epsilon is not None else str(method))
    elif isinstance(adversarial, str) and adversarial not in _NO_METHOD:
        parts.append(adversarial)
    else:
        parts.append(STANDARD_VARIANT)
    activation_label = _describe_activation(activation, _find_key(options, "softplus_beta"))
    if activation_label is not None and activation_label.lower() != "relu":
        parts.append(activation_label)
    return ", ".join(parts)


def _format_number(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _describe_activation(activation: Any, softplus_beta: Any = None) -> str | None:
    if activation is None:
        return None
    if isinstance(activation, str):
        if activation == "softplus" and softplus_beta is not None:
            return f"softplus β={_format_number(softplus_beta)}"
        return activation
    if isinstance(activation, Mapping):
        name = str(activation.get("name", activation.get("type", "activation")))
        arguments = ", ".join(
            f"{key}={value}" for key, value in activation.items() if key not in ("name", "type") and value is not None
        )
        return f"{name}({arguments})" if arguments else name
    return str(activation)


# the label _describe_activation gives a softplus network, at the end of a variant
_SOFTPLUS_LABEL = re.compile(r"^(?P<base>.+), softplus β=(?P<beta>[0-9.eE+-]+)$")


def softplus_variant(variant: str) -> tuple[str, float] | None:
    """``(base variant, beta)`` of a softplus variant: ``"standard, softplus β=5"`` -> ``("standard", 5.0)``.

    Returns:
        The variant of the same training with ReLU (what softplus approaches as beta grows) and
        beta, or ``None`` for a variant without a softplus activation.
    """
    match = _SOFTPLUS_LABEL.match(variant)
    if match is None:
        return None
    try:
        return match.group("base"), float(match.group("beta"))
    except ValueError:
        return None


def read_run_metadata(run_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Batch size, seed, variant and status of ``run_dir`` and the file each came from."""
    fields: dict[str, Any] = {"batch_size": None, "seed": None, "variant": None, "status": None}
    sources: dict[str, str] = {}

    def offer(name: str, value: Any, source: str) -> None:
        if fields[name] is None and value is not None:
            fields[name] = value
            sources[name] = source

    sweep = read_record(run_dir)
    if sweep is not None:
        offer("batch_size", _as_int(sweep.get("batch_size")), SWEEP_FILE)
        offer("seed", _as_int(sweep.get("seed")), SWEEP_FILE)
        offer("variant", sweep.get("variant"), SWEEP_FILE)
        offer("status", sweep.get("status"), SWEEP_FILE)
    # LightningCLI's config.yaml: only its data and model sections describe the run (callbacks
    # have batch sizes of their own).
    config = _load_yaml(run_dir / "config.yaml")
    if config:
        offer("seed", _as_int(config.get("seed_everything")), "config.yaml")
        for section in ("data", "model"):
            offer("batch_size", _as_int(_find_key(_init_args(config.get(section)), "batch_size")), "config.yaml")
        model = _init_args(config.get("model"))
        if isinstance(model, Mapping):
            offer("variant", describe_variant(model), "config.yaml")
    hparams = _load_yaml(run_dir / "hparams.yaml")
    if hparams:
        offer("batch_size", _as_int(_find_key(hparams, "batch_size")), "hparams.yaml")
        offer("variant", describe_variant(hparams), "hparams.yaml")
    for part in reversed(run_dir.parts[-3:]):
        if (match := _BATCH_SIZE_PATTERN.search(part)) is not None:
            offer("batch_size", int(match.group(1)), "directory name")
        if (match := _SEED_PATTERN.search(part)) is not None:
            offer("seed", int(match.group(1)), "directory name")
    if fields["batch_size"] is None and fields["variant"] is None:
        # Not a run of this package's sweeps: never pool it with unlike runs. Its project (the
        # model class, else the logger's directory) is what tells it apart.
        model_class = (
            (config or {}).get("model", {}).get("class_path")
            if isinstance((config or {}).get("model"), Mapping)
            else None
        )
        project = run_dir.parent.name if run_dir.name.startswith("version_") else run_dir.name
        offer("variant", f"{project} ({model_class.rsplit('.', 1)[-1]})" if model_class else project, "run directory")
    offer("variant", STANDARD_VARIANT, "default")
    return fields, sources


def fit_splits(config: Mapping[str, Any]) -> dict[str, str]:
    """Tag group -> the split its callbacks sample during ``fit``, from a LightningCLI ``config.yaml``.

    The ``split`` of each :class:`~lightning_hessian.callbacks.spectrum.HessianSpectrumCallback`,
    :class:`~lightning_hessian.callbacks.landscape.LossLandscapeCallback` and
    :class:`~lightning_hessian.callbacks.robustness.AdversarialRobustnessCallback` in
    ``trainer.callbacks``; a group whose callbacks disagree gets their splits joined
    (``"train/val"``); groups without callbacks keep :data:`DEFAULT_FIT_SPLITS`.

    Args:
        config: the parsed ``config.yaml`` (an empty mapping for none).

    Returns:
        A new mapping for every group of :data:`DEFAULT_FIT_SPLITS`.
    """
    found: dict[str, list[str]] = {}
    trainer = config.get("trainer") if isinstance(config, Mapping) else None
    callbacks = trainer.get("callbacks") if isinstance(trainer, Mapping) else None
    for callback in callbacks if isinstance(callbacks, list) else []:
        if not isinstance(callback, Mapping):
            continue
        group = _CALLBACK_GROUPS.get(str(callback.get("class_path", "")).rsplit(".", 1)[-1])
        if group is None:
            continue
        arguments = callback.get("init_args") or {}
        split = (
            str(arguments.get("split", DEFAULT_FIT_SPLITS[group]))
            if isinstance(arguments, Mapping)
            else DEFAULT_FIT_SPLITS[group]
        )
        if split not in found.setdefault(group, []):
            found[group].append(split)
    return {group: "/".join(found.get(group) or [default]) for group, default in DEFAULT_FIT_SPLITS.items()}


def _checkpoint_counts(run_dir: Path) -> tuple[int | None, int | None]:
    """``(epochs, global_step)`` of the saved model from ``checkpoint.json``, if present."""
    try:
        record = json.loads((run_dir / CHECKPOINT_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None, None
    if not isinstance(record, Mapping):
        return None, None
    return _as_int(record.get("epoch")), _as_int(record.get("global_step"))


def describe_machine_record(machine: Any) -> str | None:
    """One line for a ``machine`` entry of ``sweep.json``
    (:func:`lightning_hessian.sweep.machine.describe_machine`).

    Returns:
        ``host (CPU, vector extension, GPUs, torch version, kernel/thread variables)``, or ``None``
        when ``machine`` is not an entry (older records have none).
    """
    if not isinstance(machine, Mapping):
        return None
    parts = [str(machine.get("cpu") or "unknown CPU")]
    if machine.get("cpu_vector"):
        parts.append(str(machine["cpu_vector"]))
    gpus = machine.get("gpus") or []
    parts += [f"{gpus.count(model)}x {model}" for model in sorted(set(gpus))]
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    environment = machine.get("environment") or {}
    parts += [f"{name}={value}" for name, value in sorted(environment.items())]
    return f"{machine.get('host') or 'unknown host'} ({', '.join(parts)})"


def _run_machines(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The machines of a run's attempts whose work it kept, in order, each once."""
    attempts = [
        entry.get("machine")
        for entry in record.get("resumed") or []
        if isinstance(entry, Mapping) and entry.get("kept_seconds") != 0  # an attempt that kept nothing
    ]
    described = [describe_machine_record(machine) for machine in [*attempts, record.get("machine")]]
    return tuple(dict.fromkeys(line for line in described if line is not None))


def load_run(run_dir: str | Path, *, read: bool = True) -> Run:
    """The :class:`Run` in ``run_dir``, with its events unless ``read=False``."""
    path = Path(run_dir)
    fields, sources = read_run_metadata(path)
    epochs, global_step = _checkpoint_counts(path)
    record = read_record(path) or {}
    wall = record.get("wall_seconds")
    return Run(
        path=path,
        batch_size=fields["batch_size"],
        seed=fields["seed"],
        variant=str(fields["variant"]),
        status=fields["status"],
        metadata_source=sources,
        events=read_events(path) if read else RunEvents(),
        fit_splits=fit_splits(_load_yaml(path / "config.yaml")),
        epochs=epochs,
        global_step=global_step,
        wall_seconds=float(wall) if isinstance(wall, (int, float)) and not isinstance(wall, bool) else None,
        machines=_run_machines(record),
    )
