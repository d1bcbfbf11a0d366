"""CompNet: the compatible network of Deep Compatible Learning (Zhang & Zhuang, DCL, section 3.2).

CompNet segments a target image given ``m`` conditional image-label pairs, one per class. It
predicts ``2m`` maps: for every class ``j`` the *intersection* ``z_cap_j`` of the target's class
``j`` with the conditional label of class ``j``, and the *extra* part ``z_delta_j`` (the target's
class ``j`` outside that conditional label), with one softmax over all ``2m`` maps. The ``m``-class
segmentation is ``y = z_cap + z_delta`` (Eq. 5-6).
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor, nn

from partialseg._checks import check_int

__all__ = ["CompNet", "compnet_segment", "pack_conditional_input"]

BackboneSpec = Union[nn.Module, Callable[..., nn.Module], None]


def compnet_segment(logits: Tensor, softmax: bool = True) -> Tensor:
    """The ``m``-class segmentation ``y = z_cap + z_delta`` from CompNet's ``2m`` maps.

    Args:
        logits: ``(B, 2m, H, W[, D])``, intersection maps (channels ``0..m-1``) then extra maps
            (channels ``m..2m-1``). Logits when ``softmax`` is True, else probabilities.
        softmax: take the softmax over the ``2m`` channels first (True for network outputs).

    Returns:
        ``(B, m, H, W[, D])`` class probabilities (they sum to 1 over the ``m`` channels).

    Raises:
        ValueError: ``logits`` has fewer than 3 dimensions or an odd number of channels.

    Example:
        >>> import torch
        >>> compnet_segment(torch.zeros(1, 4, 1, 1)).flatten().tolist()
        [0.5, 0.5]
    """
    if logits.ndim < 3 or logits.shape[1] % 2 or logits.shape[1] == 0:
        raise ValueError(f"CompNet maps must be (B, 2m, *spatial) with an even, non-zero 2m; got shape {tuple(logits.shape)}.")
    probs = torch.softmax(logits, dim=1) if softmax else logits
    m = probs.shape[1] // 2
    return probs[:, :m] + probs[:, m:]


def pack_conditional_input(image: Tensor, cond_image: Tensor, cond_label: Tensor) -> Tensor:
    """Concatenate target, conditional images and conditional labels along channels.

    Channel order: the target image (``C`` channels), then the conditional image of class 0,
    class 1, ... (``C`` channels each, ``m * C`` in all), then the conditional labels of class
    0, 1, ... (one channel each, ``m`` in all): ``C * (1 + m) + m`` channels.

    Args:
        image: ``(B, C, *spatial)`` target images.
        cond_image: ``(B, m * C, *spatial)`` conditional images, class ``j`` at channels
            ``j * C .. (j + 1) * C - 1``.
        cond_label: ``(B, m, *spatial)`` conditional labels, channel ``j`` = the label of class
            ``j`` on the conditional image of class ``j`` (1 inside, 0 outside).

    Returns:
        ``(B, C * (1 + m) + m, *spatial)`` in the dtype of ``image``.

    Raises:
        ValueError: batch sizes, grids or channel counts disagree.

    Example:
        >>> import torch
        >>> pack_conditional_input(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 7, 8, 8])
    """
    if image.ndim < 3 or cond_image.ndim != image.ndim or cond_label.ndim != image.ndim:
        raise ValueError(
            "image (B, C, *spatial), cond_image (B, m*C, *spatial) and cond_label (B, m, *spatial) expected,"
            f" got {tuple(image.shape)}, {tuple(cond_image.shape)}, {tuple(cond_label.shape)}."
        )
    c, m = image.shape[1], cond_label.shape[1]
    if cond_image.shape[1] != m * c:
        raise ValueError(f"cond_image must have m * C = {m} * {c} = {m * c} channels, got {cond_image.shape[1]}.")
    for name, t in (("cond_image", cond_image), ("cond_label", cond_label)):
        if t.shape[0] != image.shape[0] or t.shape[2:] != image.shape[2:]:
            raise ValueError(f"{name} {tuple(t.shape)} does not match the batch and grid of image {tuple(image.shape)}.")
    return torch.cat([image, cond_image.to(image.dtype), cond_label.to(image.dtype)], dim=1)


class CompNet(nn.Module):
    """Compatible network (DCL section 3.2): target + ``m`` conditional pairs -> ``2m`` maps.

    The backbone sees ``in_channels * (1 + num_classes) + num_classes`` input channels (see
    :func:`pack_conditional_input` for the order) and gives ``2 * num_classes`` logits:
    intersection maps for classes ``0..m-1`` then extra maps for classes ``0..m-1``. The softmax
    is taken over all ``2m`` channels (by the loss, :meth:`segment` or
    :func:`compnet_segment`), so ``forward`` returns logits, as MONAI networks do.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels ``C`` of one image (target and each conditional image).
        num_classes: number of classes ``m`` (background included).
        backbone: ``None`` for a small MONAI ``UNet``; an ``nn.Module`` instance (its input and
            output channels must be the ones above, checked on the first call); or a callable
            (a class or factory) called as ``backbone(spatial_dims=..., in_channels=...,
            out_channels=..., **backbone_kwargs)``.
        backbone_kwargs: extra arguments for a callable backbone (or the default UNet:
            ``channels``, ``strides``, ``num_res_units``, ``norm``, ...).

    Raises:
        TypeError: an argument of the wrong type (e.g. a backbone that is neither a module nor
            callable).
        ValueError: ``spatial_dims`` not 2 or 3, ``in_channels < 1``, ``num_classes < 2``.

    Example:
        >>> import torch
        >>> net = CompNet(spatial_dims=2, in_channels=1, num_classes=4)
        >>> net.backbone_in_channels, net.out_channels
        (9, 8)
        >>> x = net.pack(torch.rand(2, 1, 32, 32), torch.rand(2, 4, 32, 32), torch.zeros(2, 4, 32, 32))
        >>> logits = net(x)
        >>> tuple(logits.shape), tuple(net.segment(logits).shape)
        ((2, 8, 32, 32), (2, 4, 32, 32))
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        backbone: BackboneSpec = None,
        backbone_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        check_int(spatial_dims, "spatial_dims", minimum=1)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims
        self.in_channels = check_int(in_channels, "in_channels", minimum=1)
        self.num_classes = check_int(num_classes, "num_classes", minimum=2)
        self.backbone_in_channels = in_channels * (1 + num_classes) + num_classes
        self.out_channels = 2 * num_classes
        if backbone_kwargs is not None and not isinstance(backbone_kwargs, dict):
            raise TypeError(f"backbone_kwargs must be a dict or None, got {type(backbone_kwargs).__name__}.")
        kwargs = dict(backbone_kwargs or {})
        if backbone is None:
            from monai.networks.nets import UNet

            defaults = {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1}
            defaults.update(kwargs)
            self.backbone = UNet(spatial_dims=spatial_dims, in_channels=self.backbone_in_channels, out_channels=self.out_channels, **defaults)
        elif isinstance(backbone, nn.Module):
            if kwargs:
                raise ValueError(f"backbone_kwargs {sorted(kwargs)} given with a backbone instance; they would be ignored.")
            self.backbone = backbone
        elif callable(backbone):
            net = backbone(spatial_dims=spatial_dims, in_channels=self.backbone_in_channels, out_channels=self.out_channels, **kwargs)
            if not isinstance(net, nn.Module):
                raise TypeError(f"the backbone factory {backbone!r} returned {type(net).__name__}, not an nn.Module.")
            self.backbone = net
        else:
            raise TypeError(f"backbone must be None, an nn.Module or a callable returning one, got {type(backbone).__name__}.")

    def pack(self, image: Tensor, cond_image: Tensor, cond_label: Tensor) -> Tensor:
        """Concatenate the inputs in CompNet's channel order (see :func:`pack_conditional_input`)."""
        x = pack_conditional_input(image, cond_image, cond_label)
        if x.shape[1] != self.backbone_in_channels:
            raise ValueError(
                f"CompNet(in_channels={self.in_channels}, num_classes={self.num_classes}) expects"
                f" {self.backbone_in_channels} packed channels, got {x.shape[1]} from image {tuple(image.shape)},"
                f" cond_image {tuple(cond_image.shape)}, cond_label {tuple(cond_label.shape)}."
            )
        return x

    def forward(self, x: Tensor, cond_image: Tensor | None = None, cond_label: Tensor | None = None) -> Tensor:
        """Logits of the ``2m`` maps.

        Args:
            x: the packed input ``(B, C * (1 + m) + m, *spatial)``; or the target image
                ``(B, C, *spatial)`` when ``cond_image`` and ``cond_label`` are given.
            cond_image: ``(B, m * C, *spatial)`` or None.
            cond_label: ``(B, m, *spatial)`` or None.

        Returns:
            ``(B, 2m, *spatial)`` logits: intersection maps, then extra maps.
        """
        if (cond_image is None) != (cond_label is None):
            raise ValueError("give both cond_image and cond_label, or neither (a packed input).")
        if cond_image is not None:
            x = self.pack(x, cond_image, cond_label)  # type: ignore[arg-type]
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.backbone_in_channels:
            raise ValueError(
                f"CompNet expects (B, {self.backbone_in_channels}, *{self.spatial_dims} spatial dims), got {tuple(x.shape)}."
            )
        out = self.backbone(x)
        if out.shape[1] != self.out_channels:
            raise ValueError(f"the backbone returned {out.shape[1]} channels, CompNet needs 2m = {self.out_channels}.")
        return out

    def segment(self, logits: Tensor, softmax: bool = True) -> Tensor:
        """``m``-class probabilities ``z_cap + z_delta`` from the ``2m`` maps (see :func:`compnet_segment`)."""
        if logits.shape[1] != self.out_channels:
            raise ValueError(f"expected {self.out_channels} CompNet maps, got shape {tuple(logits.shape)}.")
        return compnet_segment(logits, softmax=softmax)
