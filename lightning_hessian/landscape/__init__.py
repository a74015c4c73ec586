"""landscape layer of lightning_hessian: directions, 1-D/2-D loss landscapes, interpolation, sharpness.

Pure torch (plus numpy/matplotlib for results and figures); imports only ``curvature``.

* :mod:`~lightning_hessian.landscape.directions`: top Hessian eigenvectors, the gradient,
  filter-normalised random directions (Li et al. 2018).
* :mod:`~lightning_hessian.landscape.evaluation`: loss and accuracy at many parameter sets per
  forward pass (``vmap`` over ``functional_call``), curves and surfaces.
* :mod:`~lightning_hessian.landscape.interpolation`: the path between two models, BatchNorm
  buffers included.
* :mod:`~lightning_hessian.landscape.batch_norm`: BatchNorm running statistics recomputed for
  weights off the training trajectory.
* :mod:`~lightning_hessian.landscape.sharpness`: Keskar et al.'s epsilon-sharpness.
* :mod:`~lightning_hessian.landscape.plotting` / :mod:`~lightning_hessian.landscape.export`:
  figures and raw ``.npz``/``.csv`` files.
"""

from lightning_hessian.landscape.batch_norm import has_running_statistics, recompute_batch_norm_statistics
from lightning_hessian.landscape.directions import (
    Direction,
    direction_dot,
    direction_norm,
    eigenvector_directions,
    filter_normalize,
    gradient_direction,
    normalize_direction,
    random_direction,
    trainable_parameters,
    unit_normalize,
)
from lightning_hessian.landscape.evaluation import (
    LossCurve,
    LossSurface,
    default_batch_loss,
    evaluate_points,
    evaluate_stacked,
    loss_curve,
    loss_surface,
)
from lightning_hessian.landscape.export import load_landscape, save_landscape, write_interpolation_csv
from lightning_hessian.landscape.interpolation import (
    InterpolationResult,
    StateMismatchError,
    check_state_matches,
    interpolate_state,
    interpolation_path,
)
from lightning_hessian.landscape.plotting import plot_contour, plot_curves, plot_interpolation, plot_surface_3d
from lightning_hessian.landscape.sharpness import SharpnessResult, epsilon_sharpness

__all__ = [
    "Direction",
    "InterpolationResult",
    "LossCurve",
    "LossSurface",
    "SharpnessResult",
    "StateMismatchError",
    "check_state_matches",
    "default_batch_loss",
    "direction_dot",
    "direction_norm",
    "eigenvector_directions",
    "epsilon_sharpness",
    "evaluate_points",
    "evaluate_stacked",
    "filter_normalize",
    "gradient_direction",
    "has_running_statistics",
    "interpolate_state",
    "interpolation_path",
    "load_landscape",
    "loss_curve",
    "loss_surface",
    "normalize_direction",
    "plot_contour",
    "plot_curves",
    "plot_interpolation",
    "plot_surface_3d",
    "random_direction",
    "recompute_batch_norm_statistics",
    "save_landscape",
    "trainable_parameters",
    "unit_normalize",
    "write_interpolation_csv",
]
