"""Networks: CompNet (DCL)."""

from partialseg.networks.dcl import CompNet, compnet_segment, pack_conditional_input

__all__ = ["CompNet", "compnet_segment", "pack_conditional_input"]
