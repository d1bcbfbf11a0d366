"""Training machinery on MONAI's ignite engines: trainers, handlers and helpers the bundles use.

The marginal bundle trains with MONAI's own ``SupervisedTrainer`` (the partial-label logic lives
in the loss, :class:`partialseg.losses.MixedSupervisionLoss`); methods whose iteration differs
subclass it in their own module here (:mod:`partialseg.engines.dcl`: DCL's primal/dual loop).
"""

from partialseg.engines.checkpoint import AtomicCheckpointSaver, BestMetricState, ResumeCheckpoint, atomic_save
from partialseg.engines.dcl import DCLTrainer, DualNetworkUpdater, DualState, dual_swap
from partialseg.engines.distributed import get_rank, quiet_non_zero_ranks, rank_zero_only, training_sampler
from partialseg.engines.tracking import ConfigSaver
from partialseg.engines.handlers import MetricsRecorder, as_bool, require_checkpoint
from partialseg.engines.launch import bundle_command, run_bundle

__all__ = ["DCLTrainer", "DualNetworkUpdater", "DualState", "dual_swap", "MetricsRecorder", "as_bool", "require_checkpoint", "bundle_command", "run_bundle", "get_rank", "rank_zero_only", "quiet_non_zero_ranks", "training_sampler",
           "AtomicCheckpointSaver", "BestMetricState", "ResumeCheckpoint", "atomic_save", "ConfigSaver"]
