"""The networks of Dual-Task Mutual Learning (Zhang & Zhang, DTML, section 2.1).

DTML's two networks share one backbone structure: ``M_s`` is the backbone itself (raw logits, one
sigmoid channel per foreground class) and ``M_d`` is :class:`SignedDistanceNet`, the same kind of
backbone followed by ``tanh`` (one signed distance map per foreground class, negative inside).
:class:`DTMLPredictor` turns them into per-class foreground probabilities for inference
(``M_s`` alone, as the paper, or the mean of ``M_s`` and ``M_d``'s mask) and
:func:`probabilities_to_label` into a label map.

Example:
    >>> import torch
    >>> from monai.networks.nets import UNet
    >>> def backbone():
    ...     return UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0)
    >>> seg_net, sdm_net = backbone(), SignedDistanceNet(backbone())
    >>> x = torch.randn(1, 1, 8, 8, 8)
    >>> sdm = sdm_net(x); bool(sdm.abs().max() <= 1)
    True
    >>> probabilities_to_label(DTMLPredictor(seg_net, sdm_net, average=True)(x)).shape
    torch.Size([1, 1, 8, 8, 8])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from partialseg._checks import check_float, check_int, unwrap_network

__all__ = ["DTMLPredictor", "SignedDistanceNet", "probabilities_to_label"]

#: the SDM-to-mask factor of Eq. 2 (kept here too: networks sit below losses in the import layers)
DEFAULT_K = 1500.0


def _check_module(net: object, name: str) -> nn.Module:
    if not isinstance(net, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(net).__name__}.")
    return net


class SignedDistanceNet(nn.Module):
    """``M_d``: any backbone followed by ``tanh``, one signed distance map per output channel.

    The reference code adds a ``tanh`` head to its V-Net; here the backbone's output layer is the
    regression head and ``tanh`` bounds it to ``(-1, 1)``, the range of the normalised SDM
    (:class:`~partialseg.transforms.SignedDistanceMap`: negative inside an object).

    Args:
        backbone: a network mapping ``(B, in_channels, *spatial)`` to ``(B, m-1, *spatial)`` (e.g.
            MONAI's ``VNet`` or ``UNet`` with ``out_channels = m - 1``), built like ``M_s``.

    Raises:
        TypeError: ``backbone`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> net = SignedDistanceNet(torch.nn.Conv3d(1, 2, 1))
        >>> net(torch.randn(1, 1, 4, 4, 4)).shape
        torch.Size([1, 2, 4, 4, 4])
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = _check_module(backbone, "backbone")

    def forward(self, x: Tensor) -> Tensor:
        """``tanh(backbone(x))``, shape of the backbone's output."""
        return torch.tanh(self.backbone(x))


class DTMLPredictor(nn.Module):
    """Per-class foreground probabilities from ``M_s`` (and optionally ``M_d``), for inference.

    ``average=False`` (the paper: ``M_s`` alone): ``sigmoid(M_s(x))``. ``average=True``:
    ``(sigmoid(M_s(x)) + sigmoid(-k M_d(x))) / 2``, the mean of the two networks' masks. Run it
    through MONAI's ``SlidingWindowInferer`` as any network; threshold with
    :func:`probabilities_to_label`.

    Args:
        seg_net: ``M_s`` (raw logits ``(B, m-1, *spatial)``).
        sdm_net: ``M_d`` (``tanh`` output, e.g. :class:`SignedDistanceNet`); needed when ``average``.
        k: the SDM-to-mask factor (1500).
        average: average ``M_s``'s and ``M_d``'s masks.

    Raises:
        TypeError: a network that is not an ``nn.Module``, ``average`` not a bool.
        ValueError: ``average`` without ``sdm_net``, ``k <= 0``, networks whose outputs differ in shape.

    Example:
        >>> import torch
        >>> seg, sdm = torch.nn.Conv2d(1, 2, 1), SignedDistanceNet(torch.nn.Conv2d(1, 2, 1))
        >>> DTMLPredictor(seg)(torch.randn(3, 1, 4, 4)).shape
        torch.Size([3, 2, 4, 4])
    """

    def __init__(self, seg_net: nn.Module, sdm_net: nn.Module | None = None, k: float = DEFAULT_K, average: bool = False) -> None:
        super().__init__()
        self.seg_net = _check_module(seg_net, "seg_net")
        if sdm_net is not None:
            _check_module(sdm_net, "sdm_net")
        if not isinstance(average, bool):
            raise TypeError(f"average must be a bool, got {type(average).__name__} {average!r}.")
        if average and sdm_net is None:
            raise ValueError("average=True needs sdm_net (M_d): the prediction is the mean of M_s's and M_d's masks.")
        self.sdm_net = sdm_net
        self.k = check_float(k, "k", minimum=0.0, include_minimum=False)
        self.average = average

    def forward(self, x: Tensor) -> Tensor:
        """``(B, m-1, *spatial)`` foreground probabilities of ``x`` ``(B, in_channels, *spatial)``."""
        prob = torch.sigmoid(self.seg_net(x).float())
        if not self.average:
            return prob
        sdm = self.sdm_net(x).float()  # type: ignore[misc]
        if sdm.shape != prob.shape:
            raise ValueError(f"M_d's output {tuple(sdm.shape)} differs from M_s's {tuple(prob.shape)}; build both with m-1 output channels.")
        return 0.5 * (prob + torch.sigmoid(sdm * -self.k))

    @property
    def networks(self) -> dict[str, nn.Module]:
        """The wrapped networks, unwrapped from DDP: ``{"seg": M_s}`` plus ``"sdm"`` when given."""
        out = {"seg": unwrap_network(self.seg_net)}
        if self.sdm_net is not None:
            out["sdm"] = unwrap_network(self.sdm_net)
        return out


def probabilities_to_label(prob: Tensor, threshold: float = 0.5, dim: int = 1) -> Tensor:
    """Per-class foreground probabilities -> a label map of global class indices.

    A voxel takes ``1 + argmax_c prob_c`` (the most probable foreground class; class 0 is the
    background) where that probability is ``>= threshold``, else 0. With one foreground class
    this is the paper's ``prob >= 0.5``. Ties go to the lower class (``argmax``).

    Args:
        prob: ``(B, m-1, *spatial)`` probabilities (``dim=1``), or ``(m-1, *spatial)`` for one
            decollated case (``dim=0``, MONAI post transforms).
        threshold: the foreground threshold, in ``(0, 1)``.
        dim: the channel dimension.

    Returns:
        The label map with that dimension of size 1, in ``prob``'s floating dtype (as MONAI's
        ``AsDiscrete(argmax=True)``).

    Raises:
        ValueError: ``threshold`` outside ``(0, 1)``, ``dim`` outside the tensor, no channel.

    Example:
        >>> import torch
        >>> prob = torch.tensor([[[0.2, 0.7, 0.6]], [[0.1, 0.8, 0.3]]])  # (2 classes, 1, 3)
        >>> probabilities_to_label(prob, dim=0).tolist()
        [[[0.0, 2.0, 1.0]]]
    """
    threshold = check_float(threshold, "threshold", minimum=0.0, maximum=1.0, include_minimum=False, include_maximum=False)
    dim = check_int(dim, "dim", minimum=-prob.ndim, maximum=prob.ndim - 1)
    if prob.shape[dim] < 1:
        raise ValueError(f"prob of shape {tuple(prob.shape)} has no class along dim {dim}.")
    best, idx = prob.max(dim=dim, keepdim=True)
    dtype = prob.dtype if prob.is_floating_point() else torch.float32
    return torch.where(best >= threshold, idx + 1, torch.zeros_like(idx)).to(dtype)
