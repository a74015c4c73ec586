"""The names of everything the package logs, in one place: the callbacks write these tags and
``hessian-report`` reads them back.

Fixed tags are constants; tags with a part that varies (an eigenvalue's index, an attack and its
epsilon, a layer, a direction) are built by a function and recognised by a pattern, so that the
writer and the reader cannot drift apart. Every tag is ``"<group>/<name>"``: TensorBoard shows
one section per group.

Groups:

* ``train/``, ``val/``, ``test/``: the model's own metrics (:class:`~lightning_hessian.ImageClassifier`
  logs ``loss`` and ``acc``); the group is the :data:`Split`.
* ``hessian/``: :class:`~lightning_hessian.callbacks.spectrum.HessianSpectrumCallback`.
* ``robust/``: :class:`~lightning_hessian.callbacks.robustness.AdversarialRobustnessCallback`.
* ``landscape/``: :class:`~lightning_hessian.callbacks.landscape.LossLandscapeCallback`.
* ``absa/``: :class:`~lightning_hessian.callbacks.absa.AdaptiveBatchSizeCallback`.
* ``model/``: properties of the weights themselves (:data:`WEIGHT_NORM`), logged by
  :class:`~lightning_hessian.ImageClassifier`.

**Which samples: the split in the tag.** The analyses of the ``hessian/``, ``robust/`` and
``landscape/`` groups (:data:`ANALYSIS_GROUPS`) run on a fixed sample of one split. During
``trainer.fit`` they log under the tags above, unqualified: the samples are those of the callback's
``split`` argument (by default the training split for the spectrum and the landscape, the
validation split for robustness). Under ``trainer.validate`` and ``trainer.test`` (for example
``hessian-train test`` on the last checkpoint, which ``hessian-sweep`` runs after every fit) the
same analyses log under *split-qualified* tags, the split of their samples after the group:
``hessian/test/eig_1``, ``robust/test/fgsm/eps_0.1``, ``landscape/test/loss`` (:func:`split_tag`;
:func:`parse_split_tag` reads them back). A test from a checkpoint logs at the checkpoint's step,
which is the step of the fit's last analysis; without the qualifier the test-sample value would
replace the training-sample value there (one value per tag and step), and the Hessian of the
training loss (the paper's) would be lost to the report.

This module imports nothing from the package (and nothing heavy), so any layer may use it.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = [
    "ABSA_ADVERSARIAL",
    "ABSA_BATCH_SIZE",
    "ABSA_LR",
    "ABSA_STEPS",
    "ANALYSIS_GROUPS",
    "BUDGET_EXHAUSTED",
    "CLEAN_ACC",
    "CONVERGED",
    "DENSITY",
    "DENSITY_PLOT",
    "EIGENVALUE_PATTERN",
    "EIG_1_X_LR",
    "EIG_MIN",
    "HESSIAN_SECONDS",
    "HVPS",
    "INPUT_EIG_1",
    "INPUT_GRAD_NORM",
    "LANDSCAPE_CURVES",
    "LANDSCAPE_LOSS",
    "LANDSCAPE_SECONDS",
    "MEDIAN_NORM_PATTERN",
    "PRECONDITIONED_EIG_1",
    "ROBUST_ACCURACY_PATTERN",
    "ROBUST_SECONDS",
    "SHARPNESS",
    "SPLITS",
    "STABILITY",
    "TEST_ACC",
    "TOP_EIGENVALUE",
    "TRACE",
    "TRACE_STDERR",
    "TRAIN_ACC",
    "TRAIN_LOSS",
    "VAL_ACC",
    "WEIGHT_NORM",
    "Split",
    "accuracy_tag",
    "contour_tag",
    "curvature_tag",
    "eigenvalue_tag",
    "format_epsilon",
    "landscape_eigenvalue_tag",
    "layer_eigenvalue_tag",
    "loss_tag",
    "median_norm_tag",
    "parse_split_tag",
    "rise_tag",
    "robust_accuracy_tag",
    "robust_curve_tag",
    "split_tag",
    "surface3d_tag",
]

#: A dataset split: where an analysis draws its samples, and the group of the model's metrics.
Split = Literal["train", "val", "test"]
#: The values of :data:`Split`, in training order.
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def loss_tag(split: Split) -> str:
    """The model's mean loss on ``split``: ``"val/loss"``."""
    return f"{split}/loss"


def accuracy_tag(split: Split) -> str:
    """The model's accuracy (a fraction in [0, 1]) on ``split``: ``"test/acc"``."""
    return f"{split}/acc"


#: the accuracies the report's table reads (``test/acc``, else ``val/acc``)
VAL_ACC = accuracy_tag("val")
TEST_ACC = accuracy_tag("test")
#: the final training loss and accuracy (epoch means over the batches trained on): the
#: under-training check of the report
TRAIN_LOSS = loss_tag("train")
TRAIN_ACC = accuracy_tag("train")

# -------------------------------------------------------------------------------------- model/
#: ``model/weight_norm``: the Euclidean norm of all trainable parameters together, at epoch end.
WEIGHT_NORM = "model/weight_norm"

# ------------------------------------------------------------------------------- split qualifier
#: The groups of this package's analyses, whose tags name the split of their samples under
#: ``validate``/``test`` (module docstring).
ANALYSIS_GROUPS: tuple[str, ...] = ("hessian", "robust", "landscape")


def split_tag(tag: str, split: Split) -> str:
    """``tag`` qualified by the split its samples came from: ``hessian/eig_1`` -> ``hessian/test/eig_1``.

    The split goes right after the group, so TensorBoard keeps it in the group's section and the
    unqualified patterns (:data:`EIGENVALUE_PATTERN`, :data:`ROBUST_ACCURACY_PATTERN`, ...) do not
    match it; :func:`parse_split_tag` is the inverse. Any group works (a user's own
    :class:`~lightning_hessian.callbacks.base.EpochAnalysisCallback` may log its own); a tag
    without a group gets the split appended (``loss`` -> ``loss/test``).

    Args:
        tag: an unqualified tag.
        split: one of :data:`SPLITS`.

    Returns:
        The qualified tag.

    Raises:
        ValueError: ``split`` is not a split, ``tag`` is one of the model's own split metrics
            (``test/acc``), or names a split already.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    group, sep, rest = tag.partition("/")
    if group in SPLITS:
        raise ValueError(f"{tag!r} is a metric of the model on a split, not an analysis tag")
    if parse_split_tag(tag)[0] is not None:
        raise ValueError(f"{tag!r} already names a split")
    return f"{group}/{split}/{rest}" if sep else f"{tag}/{split}"


def parse_split_tag(tag: str) -> tuple[Split | None, str]:
    """The split named in a tag and the unqualified tag: ``hessian/test/eig_1`` -> ``("test", "hessian/eig_1")``.

    Args:
        tag: any logged tag.

    Returns:
        ``(split, base_tag)``; ``(None, tag)`` for a tag without a split qualifier (a fit-time
        analysis, or one of the model's own metrics such as ``test/acc``).
    """
    parts = tag.split("/")
    if len(parts) >= 2 and parts[0] not in SPLITS and parts[1] in SPLITS:
        if len(parts) == 2:
            return parts[1], parts[0]
        return parts[1], "/".join([parts[0], *parts[2:]])
    return None, tag


# ------------------------------------------------------------------------------------- hessian/
#: ``hessian/eig_<i>``: the i-th largest eigenvalue of the loss Hessian (1-based).
EIGENVALUE_PATTERN = re.compile(r"^hessian/eig_(\d+)$")
EIG_MIN = "hessian/eig_min"
TRACE = "hessian/trace"
TRACE_STDERR = "hessian/trace_stderr"
#: SLQ spectral density: a TensorBoard histogram (:mod:`lightning_hessian.density_histogram`) and a figure.
DENSITY = "hessian/density"
DENSITY_PLOT = "hessian/density_plot"
INPUT_EIG_1 = "hessian/input_eig_1"
INPUT_GRAD_NORM = "hessian/input_grad_norm"
EIG_1_X_LR = "hessian/eig_1_x_lr"
STABILITY = "hessian/stability"
PRECONDITIONED_EIG_1 = "hessian/preconditioned_eig_1"
HVPS = "hessian/hvps"
HESSIAN_SECONDS = "hessian/seconds"
CONVERGED = "hessian/converged"
BUDGET_EXHAUSTED = "hessian/budget_exhausted"


def eigenvalue_tag(index: int) -> str:
    """``hessian/eig_<index>``: the ``index``-th largest Hessian eigenvalue (``index >= 1``)."""
    return f"hessian/eig_{index}"


def layer_eigenvalue_tag(layer: str, index: int) -> str:
    """``hessian/layer/<layer>/eig_<index>``: an eigenvalue of one module's diagonal Hessian block."""
    return f"hessian/layer/{layer}/eig_{index}"


#: the top eigenvalue, what the report's curves over training and ABSA read
TOP_EIGENVALUE = eigenvalue_tag(1)

# -------------------------------------------------------------------------------------- robust/
CLEAN_ACC = "robust/clean_acc"
ROBUST_SECONDS = "robust/seconds"
#: ``robust/<attack>/eps_<epsilon>``; groups ``attack`` and ``eps`` (the epsilon as written).
ROBUST_ACCURACY_PATTERN = re.compile(r"^robust/(?P<attack>[^/]+)/eps_(?P<eps>[^/]+)$")
#: ``robust/<attack>/median_norm``
MEDIAN_NORM_PATTERN = re.compile(r"^robust/(?P<attack>[^/]+)/median_norm$")


def format_epsilon(epsilon: float) -> str:
    """An epsilon as it appears in a tag: ``%g`` (``0.0313725``, ``0``, ``0.5``)."""
    return f"{epsilon:g}"


def robust_accuracy_tag(attack: str, epsilon: float) -> str:
    """``robust/<attack>/eps_<epsilon>``: robust accuracy (a fraction) of ``attack`` at ``epsilon``."""
    return f"robust/{attack}/eps_{format_epsilon(epsilon)}"


def median_norm_tag(attack: str) -> str:
    """``robust/<attack>/median_norm``: median smallest adversarial perturbation (minimal attacks)."""
    return f"robust/{attack}/median_norm"


def robust_curve_tag(attack: str) -> str:
    """``robust/<attack>/curve``: the figure of robust accuracy against epsilon."""
    return f"robust/{attack}/curve"


# ----------------------------------------------------------------------------------- landscape/
LANDSCAPE_LOSS = "landscape/loss"
SHARPNESS = "landscape/sharpness"
LANDSCAPE_SECONDS = "landscape/seconds"
LANDSCAPE_CURVES = "landscape/curves"


def landscape_eigenvalue_tag(index: int) -> str:
    """``landscape/eig_<index>``: an eigenvalue the landscape callback computed for its directions."""
    return f"landscape/eig_{index}"


def rise_tag(direction: str) -> str:
    """``landscape/rise/<direction>``: largest loss on the curve minus the model's loss."""
    return f"landscape/rise/{direction}"


def curvature_tag(direction: str) -> str:
    """``landscape/curvature/<direction>``: second difference of the curve at ``t = 0``."""
    return f"landscape/curvature/{direction}"


def contour_tag(surface: str) -> str:
    """``landscape/contour/<d1>_<d2>``: contour figure of a surface."""
    return f"landscape/contour/{surface}"


def surface3d_tag(surface: str) -> str:
    """``landscape/surface3d/<d1>_<d2>``: 3-D figure of a surface."""
    return f"landscape/surface3d/{surface}"


# ---------------------------------------------------------------------------------------- absa/
ABSA_BATCH_SIZE = "absa/batch_size"
ABSA_LR = "absa/lr"
ABSA_STEPS = "absa/steps"
ABSA_ADVERSARIAL = "absa/adversarial"
