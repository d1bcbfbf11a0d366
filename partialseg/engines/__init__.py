"""Training machinery on MONAI's ignite engines: trainers, handlers and helpers the bundles use.

The marginal bundle trains with MONAI's own ``SupervisedTrainer`` (the partial-label logic lives
in the loss, :class:`partialseg.losses.MixedSupervisionLoss`); methods with several networks or
optimisers run on the shared :class:`MultiNetworkTrainer` (:mod:`partialseg.engines.multi_network`)
and write only their losses, each in its own module here (:mod:`partialseg.engines.dcl`: DCL's
primal/dual loop; :mod:`partialseg.engines.dtml`: DTML's two networks).
"""

from partialseg.engines.checkpoint import AtomicCheckpointSaver, BestMetricState, ClassNamedModel, ResumeCheckpoint, atomic_save, checkpoint_classes, require_classes
from partialseg.engines.multi_network import FrozenCopy, MultiNetworkEvents, MultiNetworkTrainer, freeze, frozen_copy
from partialseg.engines.dcl import DCLTrainer, DualNetworkUpdater, dual_swap
from partialseg.engines.dtml import DTMLBatch, DTMLTrainer
from partialseg.engines.hybrid import HybridPairSampler, HybridTrainer
from partialseg.engines.atlas import AtlasBatch, AtlasTrainer, modality_classes_from_datalist
from partialseg.engines.distributed import get_rank, quiet_non_zero_ranks, rank_zero_only, training_sampler
from partialseg.engines.tracking import ConfigSaver
from partialseg.engines.handlers import MetricsRecorder, as_bool, positive_int, require_checkpoint
from partialseg.engines.launch import bundle_command, run_bundle

__all__ = ["MultiNetworkTrainer", "MultiNetworkEvents", "FrozenCopy", "freeze", "frozen_copy", "DCLTrainer", "DualNetworkUpdater", "dual_swap", "DTMLTrainer", "DTMLBatch", "MetricsRecorder", "as_bool", "positive_int", "require_checkpoint", "bundle_command", "run_bundle", "get_rank", "rank_zero_only", "quiet_non_zero_ranks", "training_sampler",
           "AtomicCheckpointSaver", "BestMetricState", "ResumeCheckpoint", "atomic_save", "ConfigSaver",
           "ClassNamedModel", "checkpoint_classes", "require_classes",
           "HybridTrainer", "HybridPairSampler",
           "AtlasTrainer", "AtlasBatch", "modality_classes_from_datalist"]
