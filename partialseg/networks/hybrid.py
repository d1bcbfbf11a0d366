"""A DeepLabV3+-like 2D network on MONAI parts, for the hybrid method (Pan et al., AAAI 2022).

The paper trains DeepLabV3+ (Chen et al., ECCV 2018) with an ImageNet-pretrained ResNet-50. Here
the encoder is MONAI's ``ResNet`` (its stem, ``layer1`` .. ``layer4``; no classification head),
the last stage(s) dilated instead of strided for output stride 16 (or 8), as DeepLabV3+ does;
the ASPP is MONAI's ``SimpleASPP`` plus DeepLab's image-pooling branch; the decoder joins the
ASPP output upsampled to stride 4 with 48 projected low-level channels (``layer1``), two 3x3
convolutions, a 1x1 classifier and a bilinear upsampling to the input size. Nothing is downloaded:
weights start random (load local weights with ``load_state_dict``).

The dynamic instance indicators differentiate the last layer only, so the network exposes it:
:meth:`HybridDeepLab.forward_features` (the classifier's input, stride 4), ``classifier`` (a 1x1
convolution) and :meth:`HybridDeepLab.upsample_logits` (the per-sample tail from the
classifier's output to the logits): ``forward(x) == upsample_logits(classifier(
forward_features(x)), x.shape[2:])``.

Encoders (``encoder=``): ``"small"`` (the CPU default: basic blocks ``[1, 1, 1, 1]``, widths
16-128, ASPP 4 x 32, decoder 64), ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` (the paper's,
ASPP 4 x 64 -> 256, decoder 256), ``"resnet101"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SimpleASPP
from monai.networks.nets import ResNet
from torch import Tensor, nn

from partialseg._checks import check_int, check_option

__all__ = ["ENCODERS", "AveragedNetworks", "BilinearTail", "HybridDeepLab"]

#: encoder presets: block, layers, widths, ASPP channels per branch, decoder channels, low-level channels
ENCODERS: dict[str, dict] = {
    "small": {"block": "basic", "layers": [1, 1, 1, 1], "widths": [16, 32, 64, 128], "aspp": 32, "decoder": 64, "low": 24},
    "resnet18": {"block": "basic", "layers": [2, 2, 2, 2], "widths": [64, 128, 256, 512], "aspp": 64, "decoder": 256, "low": 48},
    "resnet34": {"block": "basic", "layers": [3, 4, 6, 3], "widths": [64, 128, 256, 512], "aspp": 64, "decoder": 256, "low": 48},
    "resnet50": {"block": "bottleneck", "layers": [3, 4, 6, 3], "widths": [64, 128, 256, 512], "aspp": 64, "decoder": 256, "low": 48},
    "resnet101": {"block": "bottleneck", "layers": [3, 4, 23, 3], "widths": [64, 128, 256, 512], "aspp": 64, "decoder": 256, "low": 48},
}


def _dilate(layer: nn.Module, dilation: int) -> None:
    """Turn a ResNet stage's stride 2 into dilation (DeepLab's output-stride trick), in place."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride != (1, 1):
                m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilation, dilation), (dilation, dilation)


def _linear_matrix(n_in: int, n_out: int, device=None, dtype=torch.float32) -> Tensor:
    """``(n_out, n_in)`` matrix of 1D linear interpolation (``align_corners=False``), as ``F.interpolate`` computes it."""
    eye = torch.eye(n_in, device=device, dtype=dtype).unsqueeze(1)  # n_in impulses of length n_in
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].T.contiguous()


class BilinearTail:
    """Bilinear upsampling (``align_corners=False``) of ``(..., h, w)`` maps to ``(H, W)`` as two matrices.

    ``tail(z) = R z C^T`` with ``R (H, h)`` and ``C (W, w)`` the 1D linear interpolation matrices
    (bilinear interpolation is separable), equal to ``F.interpolate(z, (H, W), mode="bilinear")``
    up to rounding; :meth:`vjp` is its transpose ``R^T g C``. The indicators' closed-form gradient
    uses :meth:`vjp` to pass the pixel errors back to the classifier's resolution with two small
    matrix products instead of an autograd call through the upsampling.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> z = torch.rand(2, 3, 4, 5)
        >>> tail = BilinearTail((4, 5), (16, 20))
        >>> torch.allclose(tail(z), F.interpolate(z, size=(16, 20), mode="bilinear", align_corners=False), atol=1e-6)
        True
        >>> g = torch.rand(2, 3, 16, 20)
        >>> torch.allclose((tail(z) * g).sum(), (z * tail.vjp(g)).sum(), rtol=1e-5)
        True
    """

    def __init__(self, in_size: Sequence[int], out_size: Sequence[int], device=None, dtype=torch.float32) -> None:
        (h, w), (big_h, big_w) = (int(s) for s in in_size), (int(s) for s in out_size)
        self.rows = _linear_matrix(h, big_h, device, dtype)
        self.cols = _linear_matrix(w, big_w, device, dtype)

    def __call__(self, z: Tensor) -> Tensor:
        return torch.matmul(torch.matmul(self.rows, z.to(self.rows.dtype)), self.cols.T)

    def vjp(self, grad: Tensor) -> Tensor:
        """The transpose map: ``R^T grad C`` ``(..., h, w)``."""
        return torch.matmul(torch.matmul(self.rows.T, grad.to(self.rows.dtype)), self.cols)


class HybridDeepLab(nn.Module):
    """DeepLabV3+-like segmentation network (2D) with an exposed 1x1 classifier.

    Args:
        spatial_dims: 2 (the only one supported: the method's data are 2D frames).
        in_channels: 3 (RGB) or 1.
        out_channels: number of classes.
        encoder: a key of :data:`ENCODERS` (``"small"``: the CPU default; ``"resnet50"``: the paper).
        output_stride: 16 (layer4 dilated) or 8 (layer3 and layer4 dilated).
        aspp_channels, decoder_channels, low_level_channels: override the preset's widths.
        dilations: ASPP dilations of the three 3x3 branches (DeepLab: 6, 12, 18 at stride 16).

    Shapes:
        input ``(B, in_channels, H, W)``, output logits ``(B, out_channels, H, W)``; ``H, W``
        should be multiples of ``output_stride`` (others work, the upsampling is to the input size).

    Raises:
        ValueError: ``spatial_dims != 2``, an unknown encoder or output stride, bad channel counts.

    Example:
        >>> import torch
        >>> net = HybridDeepLab(2, 3, 2).eval()
        >>> x = torch.rand(1, 3, 64, 64)
        >>> f = net.forward_features(x)
        >>> tuple(f.shape), tuple(net(x).shape), type(net.classifier).__name__
        ((1, 64, 16, 16), (1, 2, 64, 64), 'Conv2d')
        >>> torch.allclose(net(x), net.upsample_logits(net.classifier(f), x.shape[2:]))
        True
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        encoder: str = "small",
        output_stride: int = 16,
        aspp_channels: int | None = None,
        decoder_channels: int | None = None,
        low_level_channels: int | None = None,
        dilations: Sequence[int] = (6, 12, 18),
    ) -> None:
        super().__init__()
        if check_int(spatial_dims, "spatial_dims") != 2:
            raise ValueError(f"HybridDeepLab is 2D (spatial_dims=2), got spatial_dims={spatial_dims}.")
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        out_channels = check_int(out_channels, "out_channels", minimum=2)
        preset = ENCODERS[check_option(encoder, tuple(ENCODERS), "encoder")]
        output_stride = check_int(output_stride, "output_stride")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}.")
        dilations = [check_int(d, "dilation", minimum=1) for d in dilations]
        if len(dilations) != 3:
            raise ValueError(f"dilations must give the three 3x3 ASPP branches, got {dilations}.")
        aspp = check_int(aspp_channels if aspp_channels is not None else preset["aspp"], "aspp_channels", minimum=1)
        dec = check_int(decoder_channels if decoder_channels is not None else preset["decoder"], "decoder_channels", minimum=1)
        low = check_int(low_level_channels if low_level_channels is not None else preset["low"], "low_level_channels", minimum=1)
        self.spatial_dims, self.in_channels, self.out_channels = 2, in_channels, out_channels
        self.encoder_name, self.output_stride = encoder, output_stride

        resnet = ResNet(
            block=preset["block"], layers=preset["layers"], block_inplanes=preset["widths"], spatial_dims=2,
            n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, feed_forward=False,
        )  # fmt: skip
        if output_stride == 8:
            _dilate(resnet.layer3, 2)
            _dilate(resnet.layer4, 4)
        else:
            _dilate(resnet.layer4, 2)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.act, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        expansion = 4 if preset["block"] == "bottleneck" else 1
        high_ch, low_ch = preset["widths"][3] * expansion, preset["widths"][0] * expansion
        scale = 16 // output_stride  # ASPP dilations are DeepLab's at stride 16, doubled at stride 8
        self.aspp = SimpleASPP(2, high_ch, aspp, kernel_sizes=(1, 3, 3, 3), dilations=(1, *(d * scale for d in dilations)), acti_type="RELU")
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), Convolution(2, high_ch, aspp, kernel_size=1, act="RELU", norm=None, bias=True))
        self.project = Convolution(2, 5 * aspp, dec, kernel_size=1, act="RELU", norm="BATCH")
        self.low_level = Convolution(2, low_ch, low, kernel_size=1, act="RELU", norm="BATCH")
        self.decoder = nn.Sequential(
            Convolution(2, dec + low, dec, kernel_size=3, act="RELU", norm="BATCH"),
            Convolution(2, dec, dec, kernel_size=3, act="RELU", norm="BATCH"),
        )
        #: the last layer (the parameters the dynamic instance indicators differentiate)
        self.classifier = nn.Conv2d(dec, out_channels, kernel_size=1)

    @property
    def feature_channels(self) -> int:
        """Channels of :meth:`forward_features` (the classifier's input)."""
        return self.classifier.in_channels

    def forward_features(self, x: Tensor) -> Tensor:
        """The classifier's input ``(B, decoder_channels, H / 4, W / 4)``."""
        low = self.layer1(self.stem(x))
        high = self.layer4(self.layer3(self.layer2(low)))
        pooled = self.image_pool(high).expand(-1, -1, *high.shape[2:])
        y = self.project(torch.cat([self.aspp(high), pooled], 1))
        y = F.interpolate(y, size=low.shape[2:], mode="bilinear", align_corners=False)
        return self.decoder(torch.cat([y, self.low_level(low)], 1))

    @staticmethod
    def upsample_logits(z: Tensor, spatial_size: Sequence[int]) -> Tensor:
        """The tail after the classifier: bilinear upsampling to ``spatial_size`` (per sample, linear)."""
        return F.interpolate(z, size=tuple(int(s) for s in spatial_size), mode="bilinear", align_corners=False)

    @staticmethod
    def logit_tail(low_size: Sequence[int], spatial_size: Sequence[int], device=None) -> BilinearTail:
        """:meth:`upsample_logits` from ``low_size`` to ``spatial_size`` as a :class:`BilinearTail` (matrices, with a VJP)."""
        return BilinearTail(low_size, spatial_size, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample_logits(self.classifier(self.forward_features(x)), x.shape[2:])


class AveragedNetworks(nn.Module):
    """Inference with both networks: ``log(mean_n softmax(f_n(x)))`` (the paper infers with network 1).

    The output is a log-probability map, so argmax and softmax post-processing read it as logits.

    Example:
        >>> import torch
        >>> class Const(torch.nn.Module):
        ...     def __init__(self, v): super().__init__(); self.v = torch.tensor(v).view(1, 2, 1, 1)
        ...     def forward(self, x): return self.v.expand(x.shape[0], 2, *x.shape[2:])
        >>> avg = AveragedNetworks(Const([0.0, 0.0]), Const([0.0, 100.0]))
        >>> [round(p, 4) for p in avg(torch.zeros(1, 1, 1, 1)).exp().flatten().tolist()]
        [0.25, 0.75]
    """

    def __init__(self, *networks: nn.Module) -> None:
        super().__init__()
        if len(networks) < 1 or not all(isinstance(n, nn.Module) for n in networks):
            raise TypeError("AveragedNetworks needs one or more nn.Module networks.")
        self.networks = nn.ModuleList(networks)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.stack([torch.softmax(n(x).float(), 1) for n in self.networks]).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
