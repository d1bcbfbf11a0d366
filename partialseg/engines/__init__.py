"""Training machinery on MONAI's ignite engines: handlers and helpers the bundles use.

The marginal bundle trains with MONAI's own ``SupervisedTrainer`` (the partial-label logic lives
in the loss, :class:`partialseg.losses.MixedSupervisionLoss`); methods whose iteration differs
(DCL's dual loop, ...) subclass it in their own module here.
"""

from partialseg.engines.handlers import MetricsRecorder, require_checkpoint

__all__ = ["MetricsRecorder", "require_checkpoint"]
