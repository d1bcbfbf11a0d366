"""The networks of the atlas-guided multimodal partial-label method (Liu et al., MICCAI 2024).

Four modules, all built from MONAI parts:

* :class:`AtlasUNet`, the main segmentation network: MONAI's ``DynUNet`` (residual blocks, group
  normalisation, as the paper's DoDNet backbone) whose forward can also return its decoder
  features at the intermediate scales (what the prototype modules read). At inference it is a
  plain ``DynUNet``: ``net(x)`` gives the logits.
* :class:`AtlasRefiner`, APRN: a small residual ``DynUNet`` on ``[p_c, atlas_c]`` (two channels),
  one network shared by every organ (the organs are folded into the batch), run at half the
  input's resolution, its logits resized back; default filters ``(16, 32, 64)``
  (:data:`CODE_REFINER_FILTERS`, ``(24, 48, 96)``, are the public code's widths).
  :func:`erase_fill` is its optional input augmentation (random cubes of ``p_c`` set to 0 or 1).
* :class:`AtlasDiscriminator`, AMAN: 4x4x4 stride-2 convolutions (MONAI ``Convolution``,
  LeakyReLU 0.2), global average pooling and a linear layer to one logit per ``[p_c, atlas_c]``
  pair ("is organ c labelled in this image's modality"); by default five layers at half the
  input's resolution (:data:`CODE_DISCRIMINATOR_CHANNELS`, six layers at full resolution, are the
  public code's widths).
* :class:`PrototypeAnchoring`, the MICPAMs of every decoder scale: class prototypes kept as
  buffers (so they are saved with the module's state dict and restored on resume), updated by
  exponential moving average from masked average pooling of the features
  (:meth:`PrototypeAnchoring.update`), and a projected multi-head cross-attention between the
  prototypes and the features, normalised over the classes at every voxel (softmax, Eq. 3 of the
  paper; ``activation="sigmoid"`` is the public code's choice).

``docs/atlas.md`` has the equations and the choices where the paper, its code and this
implementation differ.

Example:
    >>> import torch
    >>> net = AtlasUNet(3, 1, 3, filters=(4, 8, 8, 16, 16), norm_name="instance")
    >>> logits, feats = net(torch.randn(1, 1, 32, 32, 32), return_features=True)
    >>> logits.shape, [tuple(f.shape[1:]) for f in feats]
    (torch.Size([1, 3, 32, 32, 32]), [(16, 4, 4, 4), (8, 8, 8, 8), (8, 16, 16, 16)])
    >>> micpam = PrototypeAnchoring(3, net.feature_channels, num_heads=2)
    >>> [tuple(a.shape) for a in micpam(feats)]
    [(1, 3, 4, 4, 4), (1, 3, 8, 8, 8), (1, 3, 16, 16, 16)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import DynUNet
from torch import Tensor, nn

from partialseg._checks import check_float, check_int, check_option

__all__ = [
    "AtlasUNet", "AtlasRefiner", "AtlasDiscriminator", "PrototypeAnchoring", "erase_fill", "resize_to",
    "CODE_REFINER_FILTERS", "CODE_DISCRIMINATOR_CHANNELS",
]

#: the normalisation of the paper's backbones (group normalisation)
DEFAULT_NORM = ("group", {"num_groups": 8})

#: APRN's default filters. The paper says only "a similar but smaller segmentation network"; these
#: keep the full iteration under 1.8x a supervised one (``docs/atlas.md``, Cost).
REFINER_FILTERS = (16, 32, 64)
#: the public code's APRN widths (24 base filters): an option, ``AtlasRefiner(filters=CODE_REFINER_FILTERS)``.
CODE_REFINER_FILTERS = (24, 48, 96)
#: AMAN's default layers (run at ``scale=0.5``). The paper says only "a 3D classification network".
DISCRIMINATOR_CHANNELS = (32, 64, 128, 256, 256)
#: the public code's AMAN widths (six layers, full resolution): an option,
#: ``AtlasDiscriminator(channels=CODE_DISCRIMINATOR_CHANNELS, scale=1.0)``.
CODE_DISCRIMINATOR_CHANNELS = (32, 64, 128, 256, 256, 256)


def resize_to(x: Tensor, size: Sequence[int], mode: str = "trilinear") -> Tensor:
    """``x`` (B, C, *spatial) resized to ``size`` (no copy when it already has it).

    ``mode`` is a ``torch.nn.functional.interpolate`` mode; ``"trilinear"`` / ``"bilinear"`` /
    ``"linear"`` follow the number of spatial dimensions (``align_corners=False``), ``"area"`` is
    average pooling (what masks use: a fraction stays a fraction).

    Example:
        >>> resize_to(torch.ones(1, 1, 4, 4), (2, 2), "area").shape
        torch.Size([1, 1, 2, 2])
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if mode in ("linear", "bilinear", "trilinear"):
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    return F.interpolate(x, size=size, mode=mode)


def _dynunet_layout(filters: Sequence[int], strides: Sequence | None, kernel_size: int | Sequence, name: str):
    filters = [check_int(f, f"{name}: filters entry", minimum=1) for f in filters]
    if len(filters) < 3:
        raise ValueError(f"{name}: filters needs at least three levels (DynUNet's minimum), got {filters}.")
    strides = [1] + [2] * (len(filters) - 1) if strides is None else list(strides)
    if len(strides) != len(filters):
        raise ValueError(f"{name}: strides has {len(strides)} entries but filters {len(filters)} (one stride per level).")
    kernels = list(kernel_size) if isinstance(kernel_size, (list, tuple)) else [kernel_size] * len(filters)
    return filters, strides, kernels, strides[1:]


class AtlasUNet(DynUNet):
    """The main segmentation network: a MONAI ``DynUNet`` that can return its decoder features.

    A 3D U-Net with one encoder and one decoder, residual blocks (``res_block``) and group
    normalisation by default, as the paper's main network (DoDNet's). ``DynUNet`` was chosen over
    ``BasicUNet``/``UNet`` because it has residual blocks, any normalisation, anisotropic strides
    (the paper's 2 x 1 x 1 mm grid) and an explicit list of decoder blocks (``upsamples``), whose
    outputs are the features the MICPAMs read; its forward is walked here block by block (the
    same blocks, in the same order, as ``DynUNet.forward``), so the state dict is ``DynUNet``'s.

    ``forward(x)`` returns the logits ``(B, out_channels, *spatial)`` (what inference, sliding
    windows and export see); ``forward(x, return_features=True)`` returns ``(logits, features)``
    with ``features`` the outputs of the ``feature_levels`` decoder blocks before the last one
    (the intermediate scales), coarsest first: with the default five levels, 1/8, 1/4 and 1/2 of
    the input with ``filters[3], filters[2], filters[1]`` channels (128, 64, 32 for the default
    filters, the public code's prototype sizes).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes including the background (softmax output).
        filters: channels per level (default ``(16, 32, 64, 128, 256)``).
        strides: stride per level (default 1 then 2 for each deeper level); entries may be
            tuples (anisotropic).
        kernel_size: one kernel size for every level, or one per level.
        norm_name: MONAI norm (default group normalisation, 8 groups; ``"instance"`` for tiny nets).
        res_block: residual blocks (the paper's).
        feature_levels: how many intermediate decoder scales ``return_features`` gives (the paper: 3).
        dropout: as ``DynUNet``.

    Raises:
        ValueError: fewer decoder blocks than ``feature_levels + 1``, mismatched ``strides``.

    Example:
        >>> import torch
        >>> net = AtlasUNet(3, 1, 4, filters=(4, 8, 8, 16), norm_name="instance", feature_levels=2)
        >>> net(torch.zeros(2, 1, 16, 16, 16)).shape, net.feature_channels
        (torch.Size([2, 4, 16, 16, 16]), (8, 8))
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        filters: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence | None = None,
        kernel_size: int | Sequence = 3,
        norm_name: tuple | str = DEFAULT_NORM,
        res_block: bool = True,
        feature_levels: int = 3,
        dropout: float | None = None,
    ) -> None:
        filters, strides, kernels, up_kernels = _dynunet_layout(filters, strides, kernel_size, "AtlasUNet")
        feature_levels = check_int(feature_levels, "feature_levels", minimum=0)
        if feature_levels > len(filters) - 2:
            raise ValueError(
                f"AtlasUNet: feature_levels={feature_levels} needs at least {feature_levels + 2} levels (filters), got {len(filters)}:"
                " the features are the decoder outputs before the last one."
            )
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=up_kernels,
            filters=filters,
            dropout=dropout,
            norm_name=norm_name,
            res_block=res_block,
        )
        self.feature_levels = feature_levels

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Channels of the features ``return_features`` gives, coarsest first."""
        decoder = list(self.filters[:-1])[::-1]  # output channels of upsamples[0], upsamples[1], ...
        return tuple(decoder[-1 - self.feature_levels : -1])

    def forward(self, x: Tensor, return_features: bool = False):  # type: ignore[override]
        skips = [self.input_block(x)]
        for down in self.downsamples:
            skips.append(down(skips[-1]))
        h = self.bottleneck(skips[-1])
        decoded = []
        for up, skip in zip(self.upsamples, reversed(skips)):
            h = up(h, skip)
            decoded.append(h)
        logits = self.output_block(h)
        if not return_features:
            return logits
        return logits, decoded[-1 - self.feature_levels : -1]


def erase_fill(prob: Tensor, num_patches: int = 1, patch_size: int | Sequence[int] = 16, generator: torch.Generator | None = None) -> Tensor:
    """APRN's input augmentation: ``num_patches`` random cubes of each sample set to 0 or to 1.

    Each cube (clipped to the volume) is erased (0) or filled (1) with equal chance, so the
    refiner learns to restore missing or spurious parts of ``p_c`` from the atlas. A new tensor is
    returned; ``prob`` is unchanged.

    Args:
        prob: ``(N, 1, *spatial)`` organ probabilities.
        num_patches: cubes per sample.
        patch_size: cube side (or one side per dimension), in voxels of ``prob``.
        generator: optional torch generator (default: the global one).

    Example:
        >>> out = erase_fill(torch.full((2, 1, 8, 8, 8), 0.5), 1, 4, torch.Generator().manual_seed(0))
        >>> sorted(set(out.unique().tolist()) - {0.5}) in ([0.0], [1.0], [0.0, 1.0]), int((out != 0.5).sum())
        (True, 128)
    """
    num_patches = check_int(num_patches, "num_patches", minimum=0)
    spatial = prob.shape[2:]
    sizes = [patch_size] * len(spatial) if isinstance(patch_size, int) else list(patch_size)
    if len(sizes) != len(spatial):
        raise ValueError(f"erase_fill: patch_size {patch_size!r} does not match {len(spatial)} spatial dimensions.")
    out = prob.clone()
    for n in range(prob.shape[0]):
        for _ in range(num_patches):
            sl = [n, slice(None)]
            for s, p in zip(spatial, sizes):
                p = min(int(p), int(s))
                start = int(torch.randint(0, int(s) - p + 1, (1,), generator=generator))
                sl.append(slice(start, start + p))
            out[tuple(sl)] = float(torch.randint(0, 2, (1,), generator=generator))
    return out


class AtlasRefiner(nn.Module):
    """APRN: refines one organ's probability map guided by that organ's atlas channel.

    One network for every organ (the paper's APRN learns on whichever organs an image labels and
    is applied to the others, so it must be shared; the organs are folded into the batch): the
    input ``[p_c, atlas_c]`` is resized to ``scale`` of its size (1/2, the paper), passed through
    a small residual ``DynUNet`` with one output channel, and the logit is resized back to the
    input size (trilinear). The refined probability is ``sigmoid`` of it.

    Default ``filters=(16, 32, 64)``: the paper says only "a similar but smaller segmentation
    network" (than the main one); these widths keep a full training iteration at about 1.5x a
    supervised one (``docs/atlas.md``, Cost). ``filters=CODE_REFINER_FILTERS`` ``(24, 48, 96)``
    are the public code's widths (about 0.2x more per iteration).

    Args:
        spatial_dims: 2 or 3.
        filters: channels per level.
        strides: stride per level (default 1, then 2).
        kernel_size: as :class:`AtlasUNet`.
        norm_name: MONAI norm.
        scale: the resolution it works at, as a fraction of the input (0 < scale <= 1).
        erase_patches: with ``augment=True``, cubes per sample set to 0 / 1 in ``p_c``
            (:func:`erase_fill`; 0: no augmentation).
        erase_size: the cubes' side at the working resolution.

    Shapes:
        ``forward(prob, atlas)``: both ``(N, 1, *spatial)`` (or ``(N, *spatial)``); returns logits
        ``(N, 1, *spatial)``.

    Example:
        >>> import torch
        >>> apr = AtlasRefiner(3, filters=(4, 8, 8), norm_name="instance")
        >>> apr(torch.rand(3, 1, 16, 16, 16), torch.rand(3, 1, 16, 16, 16)).shape
        torch.Size([3, 1, 16, 16, 16])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        filters: Sequence[int] = REFINER_FILTERS,
        strides: Sequence | None = None,
        kernel_size: int | Sequence = 3,
        norm_name: tuple | str = DEFAULT_NORM,
        scale: float = 0.5,
        erase_patches: int = 0,
        erase_size: int | Sequence[int] = 16,
    ) -> None:
        super().__init__()
        filters, strides, kernels, up_kernels = _dynunet_layout(filters, strides, kernel_size, "AtlasRefiner")
        self.net = DynUNet(
            spatial_dims, 2, 1, kernel_size=kernels, strides=strides, upsample_kernel_size=up_kernels, filters=filters,
            norm_name=norm_name, res_block=True,
        )
        self.scale = check_float(scale, "scale", minimum=0.0, maximum=1.0, include_minimum=False)
        self.erase_patches = check_int(erase_patches, "erase_patches", minimum=0)
        self.erase_size = erase_size

    def forward(self, prob: Tensor, atlas: Tensor, augment: bool = False) -> Tensor:
        if prob.ndim == atlas.ndim and prob.shape != atlas.shape:
            raise ValueError(f"AtlasRefiner: prob {tuple(prob.shape)} and atlas {tuple(atlas.shape)} differ in shape.")
        if prob.ndim == self.net.spatial_dims + 1:
            prob, atlas = prob[:, None], atlas[:, None]
        size = prob.shape[2:]
        work = [max(1, int(s * self.scale)) for s in size]
        p, a = resize_to(prob, work), resize_to(atlas.to(prob.dtype), work)
        if augment and self.erase_patches:
            p = erase_fill(p, self.erase_patches, self.erase_size)
        return resize_to(self.net(torch.cat([p, a], 1)), size)


class AtlasDiscriminator(nn.Module):
    """AMAN: one logit per ``[p_c, atlas_c]`` pair, "organ c is labelled in this modality".

    ``len(channels)`` convolutions (MONAI ``Convolution``) of kernel 4, stride 2, padding 1, each
    with LeakyReLU 0.2 (and ``norm`` if given), then global average pooling and a linear layer to
    one logit (the probability of Eq. 1 is its sigmoid). MONAI's ``PatchDiscriminator`` does not
    fit: its last convolution has stride 1, its channels double without bound (32 to 2048 for six
    layers) and it ends in a patch map, not a global decision.

    Default: five layers ``(32, 64, 128, 256, 256)`` at ``scale=0.5`` (the input average-pooled
    by 2). The paper says only "a 3D classification network"; AMAN judges an organ's location,
    size and shape against the atlas, which survive at half resolution for an eighth of the cost,
    and with the smaller APRN this keeps a full training iteration at about 1.5x a supervised one
    (``docs/atlas.md``, Cost). ``channels=CODE_DISCRIMINATOR_CHANNELS, scale=1.0`` (six layers of
    32 to 256 at full resolution) are the public code's widths.

    Every layer halves the size (floor), so the input needs at least ``2 ** len(channels)`` voxels
    per dimension at the working resolution (default: 32 at half resolution, i.e. 64 per input
    axis; the code's six layers at full resolution: 64 too); fewer is refused with a message
    naming the size (use fewer layers for small patches).

    Args:
        spatial_dims: 2 or 3.
        in_channels: 2 (``p_c`` and ``atlas_c``).
        channels: output channels of each convolution.
        norm: MONAI norm of the convolutions (None: none, the default).
        scale: the resolution it works at, as a fraction of the input (average pooling first;
            default 0.5; 1: the input's, the public code's).

    Shapes:
        input ``(N, in_channels, *spatial)``; output ``(N, 1)`` logits.

    Example:
        >>> import torch
        >>> d = AtlasDiscriminator(3, channels=(4, 8, 8))
        >>> d(torch.rand(5, 2, 16, 16, 16)).shape  # half resolution: 8^3, three layers
        torch.Size([5, 1])
        >>> len(AtlasDiscriminator(3).features), AtlasDiscriminator(3).min_size  # default: 5 layers, 32 voxels at scale 0.5
        (5, 32)
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 2,
        channels: Sequence[int] = DISCRIMINATOR_CHANNELS,
        norm: tuple | str | None = None,
        scale: float = 0.5,
    ) -> None:
        super().__init__()
        self.scale = check_float(scale, "scale", minimum=0.0, maximum=1.0, include_minimum=False)
        channels = [check_int(c, "AtlasDiscriminator: channels entry", minimum=1) for c in channels]
        if not channels:
            raise ValueError("AtlasDiscriminator: channels must name at least one layer.")
        layers, c_in = [], check_int(in_channels, "in_channels", minimum=1)
        for c in channels:
            layers.append(
                Convolution(spatial_dims, c_in, c, strides=2, kernel_size=4, padding=1, act=("leakyrelu", {"negative_slope": 0.2}), norm=norm)
            )
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, 1)
        self.min_size = 2 ** len(channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.scale < 1.0:
            x = resize_to(x, [max(1, int(s * self.scale)) for s in x.shape[2:]], "area")
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(
                f"AtlasDiscriminator: input of spatial size {tuple(x.shape[2:])} (at scale {self.scale}) is too small for"
                f" {len(self.features)} stride-2 layers (needs >= {self.min_size} per dimension); use fewer channels entries or larger patches."
            )
        h = self.features(x)
        return self.head(h.flatten(2).mean(2))


class PrototypeAnchoring(nn.Module):
    """MICPAMs at every decoder scale: EMA class prototypes and prototype-feature cross-attention.

    For scale ``s`` with features ``F`` (B, n_s, *spatial_s): the prototypes ``A_s`` (classes, n_s)
    are buffers (``prototypes_<s>``, initialised from a standard normal, as the paper's random
    initialisation; ``updates_<s>`` counts the updates of each class). :meth:`update` computes the
    batch prototype of each class by masked average pooling (Eq. 2) with the class's weight map
    resized to the scale by averaging (a fraction of consensus voxels per feature voxel, so a small
    organ keeps a weight at a coarse scale), sums over the whole batch (and over the processes
    under ``torch.distributed``), and updates the classes that had any weight:
    ``A = momentum * A + (1 - momentum) * a`` (momentum 0.99, the paper's epsilon).

    The forward gives, per scale, the attention of Eq. 3: queries ``A W^A`` and keys ``F W^F``
    (``W^F`` a 1x1 convolution), ``num_heads`` heads of ``embed_dim / num_heads`` channels, scaled
    dot products; ``activation="softmax"`` (the paper) normalises each head over the classes at
    every voxel and the heads are averaged, so the map sums to 1 over the classes everywhere
    (a segmentation by distance to the prototypes); ``"sigmoid"`` (the public code) applies a
    sigmoid to each class independently (heads averaged). The prototypes are constants here (no
    gradient): the loss on the maps trains the projections and, through the features, the main
    network.

    Args:
        num_classes: classes including the background (the main network's channels).
        feature_channels: channels of each scale's features (``AtlasUNet.feature_channels``).
        embed_dim: projection size per scale (default: the scale's channels), a multiple of
            ``num_heads``.
        num_heads: attention heads (the public code: 4).
        momentum: the EMA's weight of the old value (0.99).
        activation: ``"softmax"`` (over the classes) or ``"sigmoid"``.

    Example:
        >>> import torch
        >>> m = PrototypeAnchoring(2, (4,), num_heads=2)
        >>> f = torch.zeros(1, 4, 2, 2, 2); f[0, 0] = 1.0
        >>> w = torch.zeros(1, 2, 2, 2, 2); w[0, 1] = 1.0  # every voxel is a consensus voxel of class 1
        >>> before = m.prototypes_0.clone(); m.update([f], w).tolist()
        [[False, True]]
        >>> torch.allclose(m.prototypes_0[1], 0.99 * before[1] + 0.01 * torch.tensor([1.0, 0, 0, 0])), m.updates_0.tolist()
        (True, [0, 1])
        >>> float(m([f])[0].sum(1).mean().detach())  # softmax over the classes
        1.0
    """

    def __init__(
        self,
        num_classes: int,
        feature_channels: Sequence[int],
        embed_dim: int | Sequence[int] | None = None,
        num_heads: int = 4,
        momentum: float = 0.99,
        activation: str = "softmax",
    ) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", minimum=2)
        self.feature_channels = tuple(check_int(c, "feature_channels entry", minimum=1) for c in feature_channels)
        if not self.feature_channels:
            raise ValueError("PrototypeAnchoring: feature_channels must name at least one scale.")
        self.num_heads = check_int(num_heads, "num_heads", minimum=1)
        self.momentum = check_float(momentum, "momentum", minimum=0.0, maximum=1.0)
        self.activation = check_option(activation, ("softmax", "sigmoid"), "activation")
        if embed_dim is None:
            dims = list(self.feature_channels)
        elif isinstance(embed_dim, int):
            dims = [embed_dim] * len(self.feature_channels)
        else:
            dims = list(embed_dim)
        if len(dims) != len(self.feature_channels):
            raise ValueError(f"PrototypeAnchoring: embed_dim {embed_dim!r} does not give one size per scale ({len(self.feature_channels)}).")
        self.query = nn.ModuleList()
        self.key = nn.ModuleList()
        for s, (n, k) in enumerate(zip(self.feature_channels, dims)):
            k = check_int(k, "embed_dim", minimum=1)
            if k % self.num_heads:
                raise ValueError(f"PrototypeAnchoring: embed_dim {k} of scale {s} is not a multiple of num_heads={self.num_heads}.")
            self.query.append(nn.Linear(n, k))  # W^A
            self.key.append(nn.Linear(n, k))  # W^F (a 1x1 convolution on the features)
            self.register_buffer(f"prototypes_{s}", torch.randn(self.num_classes, n))
            self.register_buffer(f"updates_{s}", torch.zeros(self.num_classes, dtype=torch.long))

    @property
    def num_scales(self) -> int:
        return len(self.feature_channels)

    def prototypes(self, scale: int) -> Tensor:
        """The prototypes of ``scale``, ``(num_classes, channels)``."""
        return getattr(self, f"prototypes_{scale}")

    def _check(self, features: Sequence[Tensor]) -> None:
        if len(features) != self.num_scales:
            raise ValueError(f"PrototypeAnchoring: {len(features)} feature scales given, built for {self.num_scales}.")
        for s, (f, n) in enumerate(zip(features, self.feature_channels)):
            if f.ndim < 3 or f.shape[1] != n:
                raise ValueError(f"PrototypeAnchoring: scale {s} features have shape {tuple(f.shape)}, expected (B, {n}, *spatial).")

    @torch.no_grad()
    def update(self, features: Sequence[Tensor], weights: Tensor) -> Tensor:
        """EMA update of every scale's prototypes from masked average pooling.

        Args:
            features: per scale ``(B, n_s, *spatial_s)`` (detached here).
            weights: ``(B, num_classes, *spatial)`` consensus masks (or weights in [0, 1]) at any
                resolution; resized to each scale by averaging.

        Returns:
            ``(num_scales, num_classes)`` bool: the classes updated at each scale.
        """
        self._check(features)
        if weights.shape[:2] != (features[0].shape[0], self.num_classes):
            raise ValueError(
                f"PrototypeAnchoring.update: weights of shape {tuple(weights.shape)}, expected ({features[0].shape[0]}, {self.num_classes}, *spatial)."
            )
        done = []
        for s, f in enumerate(features):
            f = f.detach().float().flatten(2)  # (B, n, N)
            w = resize_to(weights.detach().float(), features[s].shape[2:], "area").flatten(2)  # (B, C, N)
            with torch.autocast(f.device.type, enabled=False):  # sums over every voxel: float32, not autocast's float16
                sums = torch.einsum("bcn,bfn->cf", w, f)
            mass = w.sum((0, 2))
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sums)
                dist.all_reduce(mass)
            has = mass > 0
            proto = self.prototypes(s)
            batch = sums / mass.clamp_min(1e-12)[:, None]
            proto[has] = self.momentum * proto[has] + (1.0 - self.momentum) * batch[has].to(proto.dtype)
            getattr(self, f"updates_{s}")[has] += 1
            done.append(has)
        return torch.stack(done)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Attention maps ``(B, num_classes, *spatial_s)`` per scale (see the class docstring)."""
        self._check(features)
        maps = []
        for s, f in enumerate(features):
            b, n, spatial = f.shape[0], f.shape[1], f.shape[2:]
            q = self.query[s](self.prototypes(s).to(f.dtype))  # (C, k)
            keys = self.key[s](f.flatten(2).transpose(1, 2))  # (B, N, k)
            h, k = self.num_heads, q.shape[1]
            dh = k // h
            qh = q.view(-1, h, dh).permute(1, 0, 2)  # (h, C, dh)
            kh = keys.view(b, -1, h, dh).permute(0, 2, 3, 1)  # (B, h, dh, N)
            logits = torch.matmul(qh.unsqueeze(0), kh) / dh**0.5  # (B, h, C, N)
            attn = torch.softmax(logits, 2) if self.activation == "softmax" else torch.sigmoid(logits)
            maps.append(attn.mean(1).view(b, -1, *spatial))
        return maps
