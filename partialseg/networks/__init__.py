"""Networks: CompNet (DCL), the DTML signed-distance network and predictor."""

from partialseg.networks.dcl import CompNet, compnet_segment, pack_conditional_input
from partialseg.networks.dtml import DTMLPredictor, SignedDistanceNet, probabilities_to_label
from partialseg.networks.hybrid import AveragedNetworks, HybridDeepLab
from partialseg.networks.atlas import AtlasDiscriminator, AtlasRefiner, AtlasUNet, PrototypeAnchoring, erase_fill

__all__ = ["CompNet", "compnet_segment", "pack_conditional_input", "DTMLPredictor", "SignedDistanceNet", "probabilities_to_label",
           "HybridDeepLab", "AveragedNetworks",
           "AtlasUNet", "AtlasRefiner", "AtlasDiscriminator", "PrototypeAnchoring", "erase_fill"]
