"""Partial-label losses: every loss takes logits (B, C, *spatial) and a ``<0,p,1>`` target.

See ``docs/losses.md`` for the equations, the decisions (empty annotation, unknown voxels,
absent classes, dtypes) and the measured speed.
"""

from partialseg.losses.dcl import CompatibleLoss, ConditionalCompatibleLoss, PriorLoss, conditional_compatible_terms
from partialseg.losses.dtml import DTMLLoss, consistency_ramp, masked_dice_loss, sdm_to_mask
from partialseg.losses.hybrid import DCRLoss, InstanceIndicators, last_layer_gradients, weighted_cross_entropy
from partialseg.losses.marginal import (
    ExclusionCELoss,
    ExclusionDiceLoss,
    MarginalCELoss,
    MarginalDiceLoss,
    MarginalExclusionLoss,
)
from partialseg.losses.mixed import MixedSupervisionLoss
from partialseg.losses.atlas import (
    AtlasLoss,
    adversarial_loss,
    confident_mask,
    consensus_masks,
    discriminator_loss,
    labelled_classes,
    masked_dice_loss as atlas_masked_dice_loss,
    unknown_entries,
)

__all__ = [
    "CompatibleLoss",
    "PriorLoss",
    "ConditionalCompatibleLoss",
    "conditional_compatible_terms",
    "MarginalCELoss",
    "MarginalDiceLoss",
    "ExclusionCELoss",
    "ExclusionDiceLoss",
    "MarginalExclusionLoss",
    "MixedSupervisionLoss",
    "DTMLLoss",
    "consistency_ramp",
    "masked_dice_loss",
    "sdm_to_mask",
    "DCRLoss",
    "InstanceIndicators",
    "last_layer_gradients",
    "weighted_cross_entropy",
    "AtlasLoss",
    "adversarial_loss",
    "confident_mask",
    "consensus_masks",
    "discriminator_loss",
    "labelled_classes",
    "atlas_masked_dice_loss",
    "unknown_entries",
]
