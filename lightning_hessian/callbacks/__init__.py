"""Lightning callbacks that analyse any LightningModule during ``fit``, ``validate`` and ``test``.

* :class:`HessianSpectrumCallback`: top/smallest Hessian eigenvalues, trace, spectral density,
  input-Hessian quantities.
* :class:`AdversarialRobustnessCallback`: robust accuracy under native and foolbox attacks.
* :class:`LossLandscapeCallback`: 1-D/2-D loss landscapes and epsilon-sharpness.
* :class:`EpochAnalysisCallback`: their shared base (schedule, fixed samples, state restore), with
  :class:`TimeBudget`, the collective time budget of one analysis.
* :class:`AdaptiveBatchSizeCallback`: grow the batch size and learning rate as the top Hessian
  eigenvalue falls (ABSA, Yao et al. 2018), reading the spectrum callback's eigenvalue.
"""

from lightning_hessian.callbacks.absa import AdaptiveBatchSizeCallback
from lightning_hessian.callbacks.base import AnalysisSamples, EpochAnalysisCallback, batch_loss
from lightning_hessian.callbacks.budget import TimeBudget
from lightning_hessian.callbacks.landscape import LossLandscapeCallback
from lightning_hessian.callbacks.robustness import AdversarialRobustnessCallback
from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback

__all__ = [
    "AdaptiveBatchSizeCallback",
    "AdversarialRobustnessCallback",
    "AnalysisSamples",
    "EpochAnalysisCallback",
    "HessianSpectrumCallback",
    "LossLandscapeCallback",
    "TimeBudget",
    "batch_loss",
]
