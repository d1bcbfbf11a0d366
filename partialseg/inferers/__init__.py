"""Inferers that need more than an image: conditional images for DCL's CompNet."""

from partialseg.inferers.dcl import ConditionalInferer, SupportBank

__all__ = ["ConditionalInferer", "SupportBank"]
