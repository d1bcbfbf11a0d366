"""Hybrid supervision (Pan et al., AAAI 2022): dynamic instance indicators (DII) and the DCR loss.

Few strong masks and many weak ones (ellipses, distorted outlines, missing polyps). Each weak
instance ``k`` gets an indicator ``gamma_k`` in ``[0, 1]`` (init 0.5; strong instances are 1,
fixed) weighting its loss. Every ``tau`` iterations the indicators take one Adam step (lr
``beta = 0.1``) on the upper-level gradient of Eq. 3 with the Hessian taken as the identity and
the parameters restricted to the last layer::

    d L(D_S) / d gamma_k  ~=  - g_S . g_k,
    g_S = grad_theta' CE(strong set),   g_k = grad_theta' CE(weak instance k),   theta' = last layer

then are clipped to ``[0, 1]`` (:class:`InstanceIndicators`). Per-instance gradients of a 1x1
convolution classifier have a closed form (:func:`last_layer_gradients`): with ``f`` the
classifier's input, ``e = softmax(z) - onehot(y)`` and ``r_k`` the instance's pixel weights,
``g_k = (sum_p r_k(p) e(p) f(p)^T, sum_p r_k(p) e(p))``, one einsum for every instance at once
(a per-sample linear tail after the classifier, such as DeepLabV3+'s final upsampling, is passed
back by one vector-Jacobian product). ``torch.func.vmap(grad)`` serves any other last layer.

The lower level (Eq. 7, :class:`DCRLoss`) trains two networks on pairs ``(x_i, x_j)`` (primary
tutorial drawn with probability proportional to gamma, auxiliary uniformly) and the mixed image
``x_m = B x_i + (1 - B) x_j``::

    L = gamma_i l1(x_i) + gamma_j l2(x_j) + lambda (gamma_i + gamma_j) / 2 [CE(f1(x_m), y2_m) + CE(f2(x_m), y1_m)]

with plain pixel cross-entropy, ``lambda = 4`` and pseudo-labels ``y1_m = B argmax f1(x_i) + (1 -
B) argmax f1(x_j)`` (option: KL divergence to the mixed soft predictions instead).

Beyond the paper, a weak mask of several classes can get one indicator per class present
(``per_class``): instance ``(k, c)`` owns the pixels labelled ``c`` and an equal share of the
background, so the instances of a case add up to the case's loss and one foreground class gives
exactly the paper's per-image indicator. See ``docs/hybrid.md``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

from partialseg._checks import check_float, check_option

__all__ = [
    "WHOLE_CASE",
    "DCRLoss",
    "channel_argmax",
    "InstanceIndicators",
    "class_indices",
    "indicator_gradient",
    "instance_pixel_weights",
    "last_layer_gradient_dots",
    "last_layer_gradients",
    "weighted_cross_entropy",
]

#: the class entry of an indicator that covers a whole case (the paper's per-image indicator)
WHOLE_CASE = -1

GRADIENT_METHODS = ("closed_form", "functional", "loop")
CONSISTENCIES = ("ce", "kl")


# ---------------------------------------------------------------------------------------- targets


def class_indices(target: Tensor, num_classes: int | None = None, spatial_dims: int | None = None) -> Tensor:
    """A label batch as class indices ``(B, *spatial)`` (long).

    Args:
        target: ``(B, 1, *spatial)`` or ``(B, *spatial)`` class indices, or a one-hot ``(B, C,
            *spatial)`` map (a fully annotated ``<0,p,1>`` map: one 1 per pixel, the rest 0) when
            ``num_classes`` is given and equals ``C > 1``.
        num_classes: the number of classes (needed to tell a one-hot map from an index map).
        spatial_dims: 2 or 3, to tell ``(B, 1, *spatial)`` from ``(B, *spatial)`` (None: a
            channel dimension is present when ``target`` has 4 or more dims, the 2D reading).

    Raises:
        ValueError: a multi-channel target that is not one-hot (partial annotation, soft labels):
            the hybrid method expects every mask, strong or weak, to label every pixel; a target
            whose dims fit neither layout.

    Example:
        >>> import torch
        >>> class_indices(torch.tensor([[[0, 2]]])).tolist()
        [[[0, 2]]]
        >>> class_indices(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])[None], num_classes=2).tolist()
        [[[0, 1]]]
    """
    has_channel = target.ndim >= 4 if spatial_dims is None else target.ndim == spatial_dims + 2
    if spatial_dims is not None and target.ndim not in (spatial_dims + 1, spatial_dims + 2):
        raise ValueError(f"a {spatial_dims}D label batch must be (B, [1,] *spatial), got {tuple(target.shape)}.")
    if has_channel and num_classes is not None and num_classes > 1 and target.shape[1] == num_classes:
        t = target.float()
        if not bool(((t == 0) | (t == 1)).all()) or not bool((t.sum(1) == 1).all()):
            raise ValueError(
                f"the hybrid method needs fully labelled masks: a {tuple(target.shape)} target with channel values other "
                "than one 1 and zeros per pixel (unknown classes or soft labels) cannot be a strong or weak mask."
            )
        return t.argmax(1)
    if has_channel:
        if target.shape[1] != 1:
            raise ValueError(f"class-index targets have one channel, got {tuple(target.shape)} (one-hot maps need num_classes).")
        target = target[:, 0]
    if target.is_floating_point() and not bool((target == target.round()).all()):
        raise ValueError(f"class-index targets must hold whole numbers, got a {tuple(target.shape)} float map with fractions.")
    return target.long()


def channel_argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(1, keepdim=True)`` by a comparison per class (the hard pseudo-labels of Eq. 6).

    The same indices (the first maximum on ties), without ``argmax`` over the strided channel
    dimension, which costs about 20x more on CPU for the few classes of a segmentation map.

    Example:
        >>> import torch
        >>> z = torch.tensor([[[[0.0, 2.0]], [[1.0, 2.0]], [[0.5, -1.0]]]])  # (1, 3, 1, 2)
        >>> channel_argmax(z).tolist(), z.argmax(1, keepdim=True).tolist()
        ([[[[1, 0]]]], [[[[1, 0]]]])
    """
    best = logits[:, 0]
    index = torch.zeros_like(best, dtype=torch.long)
    for c in range(1, logits.shape[1]):
        better = logits[:, c] > best
        best = torch.where(better, logits[:, c], best)
        index.masked_fill_(better, c)
    return index.unsqueeze(1)


def weighted_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-sample pixel cross-entropy ``mean_p w(p) CE(p)`` (plain CE when ``weight`` is None).

    Args:
        logits: ``(B, C, *spatial)`` logits.
        target: ``(B, *spatial)`` / ``(B, 1, *spatial)`` class indices.
        weight: None, per-sample ``(B,)`` weights (gamma) or per-pixel ``(B, 1, *spatial)`` /
            ``(B, *spatial)`` weights (per-class indicators).

    Returns:
        ``(B,)`` float32 losses.

    Example:
        >>> import math, torch
        >>> z = torch.zeros(2, 2, 1, 2)  # p = 0.5 everywhere: CE = log 2
        >>> out = weighted_cross_entropy(z, torch.zeros(2, 1, 2, dtype=torch.long), torch.tensor([1.0, 0.5]))
        >>> [round(v / math.log(2), 4) for v in out.tolist()]
        [1.0, 0.5]
    """
    y = class_indices(target, logits.shape[1], logits.ndim - 2)
    ce = F.cross_entropy(logits.float(), y, reduction="none")  # (B, *spatial)
    if weight is not None:
        w = weight.to(ce.dtype)
        if w.ndim == 1:
            if w.shape[0] != ce.shape[0]:
                raise ValueError(f"per-sample weights {tuple(w.shape)} do not match the batch of {ce.shape[0]}.")
            w = w.view(-1, *([1] * (ce.ndim - 1)))
        else:
            if w.ndim == ce.ndim + 1:
                w = w[:, 0]
            if w.shape != ce.shape:
                raise ValueError(f"pixel weights {tuple(weight.shape)} do not match the loss map {tuple(ce.shape)}.")
        ce = ce * w
    return ce.flatten(1).mean(1)


def _pixel_ce(logits: Tensor, target: Tensor, consistency: str) -> Tensor:
    """Per-sample consistency term: CE to class indices (``"ce"``) or KL(target || pred) to probabilities (``"kl"``)."""
    if consistency == "ce":
        return weighted_cross_entropy(logits, target)
    logp = F.log_softmax(logits.float(), 1)
    t = target.float()
    if t.shape != logp.shape:
        raise ValueError(f"KL consistency needs probability targets of the logits' shape {tuple(logp.shape)}, got {tuple(t.shape)}.")
    kl = torch.special.xlogy(t, t) - t * logp  # 0 log 0 = 0
    return kl.sum(1).flatten(1).mean(1)


class DCRLoss(_Loss):
    """Eq. 7 of Pan et al.: the supervised terms of both networks plus the cross pseudo-supervision.

    ``L = mean_b [gamma_i l1_i + gamma_j l2_j + lambda (gamma_i + gamma_j) / 2 (CE(f1(x_m), y2_m)
    + CE(f2(x_m), y1_m))]`` over the ``B`` pairs of a batch (the paper's sum over pairs, as a
    mean), all terms plain pixel cross-entropy (``consistency="kl"``: KL divergence from the
    mixed soft predictions instead).

    Args:
        lambda_reg: ``lambda`` (the paper's best: 4).
        consistency: ``"ce"`` (pseudo-label CE, the paper) or ``"kl"`` (the paper's ablation).
        reduction: ``"mean"`` / ``"sum"`` over pairs, or ``"none"`` (``(B,)``).

    Inputs (``forward``):
        logits1_i, logits2_j: ``(B, C, *spatial)`` network 1 on ``x_i``, network 2 on ``x_j``.
        target_i, target_j: class indices ``(B, [1,] *spatial)`` (strong or weak masks).
        logits1_m, logits2_m: ``(B, C, *spatial)`` both networks on ``x_m``.
        pseudo1_m, pseudo2_m: mixed pseudo-labels of network 1 and 2: class indices (``"ce"``) or
            probabilities ``(B, C, *spatial)`` (``"kl"``); detached by the loss.
        gamma_i, gamma_j: ``(B,)`` indicators of the two tutorials' cases.
        weight_i, weight_j: optional pixel weights ``(B, 1, *spatial)`` replacing ``gamma`` in the
            supervised terms (per-class indicators); the regulariser keeps the case gammas.

    Example:
        >>> import math, torch
        >>> z = torch.zeros(1, 2, 1, 1); y = torch.zeros(1, 1, 1, 1, dtype=torch.long); g = torch.ones(1)
        >>> loss = DCRLoss(lambda_reg=4.0)(z, y, z, y, z, z, y, y, g, g)
        >>> round(loss.item() / math.log(2), 6)  # 1 + 1 + 4 * (1 + 1)
        10.0
    """

    def __init__(self, lambda_reg: float = 4.0, consistency: str = "ce", reduction: str = "mean") -> None:
        super().__init__(reduction=check_option(reduction, ("mean", "sum", "none"), "reduction"))
        self.lambda_reg = check_float(lambda_reg, "lambda_reg", minimum=0.0)
        self.consistency = check_option(consistency, CONSISTENCIES, "consistency")

    def terms(
        self,
        logits1_i: Tensor,
        target_i: Tensor,
        logits2_j: Tensor,
        target_j: Tensor,
        logits1_m: Tensor,
        logits2_m: Tensor,
        pseudo1_m: Tensor,
        pseudo2_m: Tensor,
        gamma_i: Tensor,
        gamma_j: Tensor,
        weight_i: Tensor | None = None,
        weight_j: Tensor | None = None,
        lambda_reg: float | None = None,
    ) -> dict[str, Tensor]:
        """Per-pair terms: ``sup1`` (``gamma_i l1``), ``sup2``, ``reg`` (``r_ij``, unweighted) and ``loss`` (Eq. 7), each ``(B,)``.

        ``lambda_reg`` overrides the constructor's (a trainer's ramp-up).
        """
        gamma_i, gamma_j = gamma_i.float().flatten(), gamma_j.float().flatten()
        n = logits1_i.shape[0]
        for name, t in (("gamma_i", gamma_i), ("gamma_j", gamma_j)):
            if t.shape[0] != n:
                raise ValueError(f"{name} has {t.shape[0]} values for a batch of {n} pairs.")
        sup1 = weighted_cross_entropy(logits1_i, target_i, gamma_i if weight_i is None else weight_i)
        sup2 = weighted_cross_entropy(logits2_j, target_j, gamma_j if weight_j is None else weight_j)
        reg = _pixel_ce(logits1_m, pseudo2_m.detach(), self.consistency) + _pixel_ce(logits2_m, pseudo1_m.detach(), self.consistency)
        lam = self.lambda_reg if lambda_reg is None else lambda_reg
        loss = sup1 + sup2 + lam * 0.5 * (gamma_i + gamma_j) * reg
        return {"sup1": sup1, "sup2": sup2, "reg": reg, "loss": loss}

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:  # type: ignore[override]
        loss = self.terms(*args, **kwargs)["loss"]
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


# ---------------------------------------------------------------------------- per-instance gradients


def instance_pixel_weights(
    target: Tensor, classes: Sequence[Sequence[int]], spatial_dims: int | None = None
) -> tuple[Tensor, Tensor, list[int]]:
    """Pixel weights ``r_k`` of every instance of a batch (one per case, or one per class present).

    Row ``b`` with classes ``[-1]`` (:data:`WHOLE_CASE`) gives one instance over the whole image
    (``r = 1 / P``, the paper). Row ``b`` with foreground classes ``[c1, ..., cn]`` gives ``n``
    instances: instance ``c`` weighs the pixels labelled ``c`` by ``1 / P`` and every pixel
    labelled with none of them (background) by ``1 / (n P)``, so the row's instances add up to
    its mean CE.

    Args:
        target: ``(B, [1,] *spatial)`` class indices.
        classes: per row, its instances' classes.
        spatial_dims: as :func:`class_indices`.

    Returns:
        ``(rows, weights, classes)``: ``(K,)`` batch row of each instance, ``(K, *spatial)``
        weights, and the ``K`` classes in order.

    Example:
        >>> import torch
        >>> rows, w, cls = instance_pixel_weights(torch.tensor([[0, 1, 2, 2]]), [[1, 2]])
        >>> rows.tolist(), cls, (w * 8).tolist()
        ([0, 0], [1, 2], [[1.0, 2.0, 0.0, 0.0], [1.0, 0.0, 2.0, 2.0]])
    """
    y = class_indices(target, spatial_dims=spatial_dims)
    if len(classes) != y.shape[0]:
        raise ValueError(f"{len(classes)} class lists for a batch of {y.shape[0]}.")
    npix = y[0].numel()
    rows, weights, out_classes = [], [], []
    for b, cls in enumerate(classes):
        cls = [int(c) for c in cls]
        if not cls:
            raise ValueError(f"row {b} has no instance (give [{WHOLE_CASE}] for a whole-case indicator).")
        if WHOLE_CASE in cls:
            if len(cls) > 1:
                raise ValueError(f"row {b}: a whole-case indicator ({WHOLE_CASE}) cannot share a case with class indicators {cls}.")
            rows.append(b)
            weights.append(torch.full_like(y[b], 1.0 / npix, dtype=torch.float32))
            out_classes.append(WHOLE_CASE)
            continue
        labelled = torch.zeros_like(y[b], dtype=torch.bool)
        for c in cls:
            labelled |= y[b] == c
        share = (~labelled).float() / (len(cls) * npix)
        for c in cls:
            rows.append(b)
            weights.append((y[b] == c).float() / npix + share)
            out_classes.append(c)
    return torch.tensor(rows, dtype=torch.long, device=y.device), torch.stack(weights), out_classes


def _identity(z: Tensor) -> Tensor:
    return z


def _instance_inputs(features: Tensor, target: Tensor, rows: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """The class indices of ``target`` and ``rows`` on the features' device, after checking that
    ``weights`` holds one map per instance on the target's grid."""
    y = class_indices(target, spatial_dims=features.ndim - 2)
    rows = rows.to(features.device)
    if weights.shape[0] != rows.shape[0]:
        raise ValueError(f"{weights.shape[0]} weight maps for {rows.shape[0]} instances.")
    if tuple(weights.shape[1:]) != tuple(y.shape[1:]):
        raise ValueError(f"instance weights {tuple(weights.shape)} do not match the target {tuple(y.shape)}.")
    return y, rows


def last_layer_gradients(
    features: Tensor,
    classifier: nn.Module,
    target: Tensor,
    rows: Tensor,
    weights: Tensor,
    tail: Callable[[Tensor], Tensor] | None = None,
    method: str = "closed_form",
) -> Tensor:
    """Per-instance gradients of ``sum_p r_k(p) CE(p)`` w.r.t. the classifier's parameters.

    The logits are ``tail(classifier(features))``; ``tail`` (default identity) must act on each
    sample alone (bilinear upsampling does). Instance ``k`` reads batch row ``rows[k]`` with pixel
    weights ``weights[k]``.

    Methods:
        ``"closed_form"`` (a 1x1 convolution classifier, weight ``(C, F, 1, ...)`` and optional
        bias): ``e = softmax(z) - onehot(y)``, ``E_k = r_k e_{rows[k]}`` passed back through
        ``tail`` by one vector-Jacobian product (identity: nothing to do), then ``g_W[k] = E_k
        f_{rows[k]}^T`` (one batched matrix product), ``g_b[k] = sum_p E_k``: every instance at once.
        ``"functional"``: ``torch.func.vmap(torch.func.grad(...))`` over the instances, for any
        classifier. ``"loop"``: one autograd call per instance (the reference; slow).

    Args:
        features: ``(B, F, *s)`` the classifier's input (no gradient needed).
        classifier: the last layer.
        target: ``(B, [1,] *S)`` class indices at the logits' resolution.
        rows: ``(K,)`` batch row of each instance.
        weights: ``(K, *S)`` pixel weights of each instance.
        tail: per-sample map from the classifier's output to the logits (e.g. upsampling).
        method: ``"closed_form"``, ``"functional"`` or ``"loop"``.

    Returns:
        ``(K, n)`` gradients, flattened in the order of ``classifier.parameters()``.

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv2d(2, 2, 1)
        >>> _ = torch.nn.init.zeros_(conv.weight); _ = torch.nn.init.zeros_(conv.bias)
        >>> f = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1); y = torch.ones(1, 1, 1, 1, dtype=torch.long)
        >>> g = last_layer_gradients(f, conv, y, torch.tensor([0]), torch.ones(1, 1, 1))
        >>> (g + 0.0).tolist()  # e = p - onehot = [0.5, -0.5]: g_W = e f^T, g_b = e
        [[0.5, 0.0, -0.5, 0.0, 0.5, -0.5]]
    """
    method = check_option(method, GRADIENT_METHODS, "method")
    tail = _identity if tail is None else tail
    y, rows = _instance_inputs(features, target, rows, weights)
    features = features.detach()
    if method == "closed_form":
        return _closed_form(features, classifier, y, rows, weights, tail)
    params = {k: v.detach() for k, v in classifier.named_parameters()}
    if method == "functional":
        return _functional(features, classifier, params, y, rows, weights, tail)
    return _loop(features, classifier, params, y, rows, weights, tail)


def _conv_parameters(classifier: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` of a 1x1 convolution classifier; TypeError for any other last layer."""
    weight = getattr(classifier, "weight", None)
    bias = getattr(classifier, "bias", None)
    names = [n for n, _ in classifier.named_parameters()]
    if weight is None or weight.ndim < 3 or any(s != 1 for s in weight.shape[2:]) or names not in (["weight"], ["weight", "bias"]):
        raise TypeError(
            f"the closed-form gradient needs a 1x1 convolution classifier with weight and bias only, got "
            f"{type(classifier).__name__} with parameters {names}; use method='functional'."
        )
    return weight, bias


def _closed_form(features: Tensor, classifier: nn.Module, y: Tensor, rows: Tensor, weights: Tensor, tail: Callable) -> Tensor:
    _, bias = _conv_parameters(classifier)
    with torch.no_grad():
        z_low = classifier(features).float().index_select(0, rows)  # (K, C, *s)
        f = features.float().index_select(0, rows)
    y = y.index_select(0, rows)
    vjp = getattr(tail, "vjp", None)  # a linear tail with its own transpose (BilinearTail): no autograd
    with torch.enable_grad():  # one forward of the tail, kept for its vector-Jacobian product
        z_low.requires_grad_(tail is not _identity and vjp is None)
        z = tail(z_low)
    with torch.no_grad():
        e = torch.softmax(z.detach().float(), 1)
        for c in range(e.shape[1]):  # softmax - onehot (a loop over the few classes beats scatter_add_)
            e[:, c].sub_((y == c).to(e.dtype))
        err = e.mul_(weights.to(e.dtype).unsqueeze(1))  # (K, C, *S): r_k (softmax - onehot)
    if vjp is not None:
        err = vjp(err).float()
    elif tail is not _identity:
        (err,) = torch.autograd.grad(z, z_low, err)
    err = err.flatten(2)
    g_w = torch.bmm(err, f.flatten(2).transpose(1, 2)).reshape(rows.shape[0], -1)  # (K, C * F)
    parts = [g_w]
    if bias is not None:
        parts.append(err.sum(2))
    return torch.cat(parts, 1)


def _instance_loss(classifier: nn.Module, tail: Callable, params: dict, f: Tensor, y: Tensor, r: Tensor) -> Tensor:
    z = tail(torch.func.functional_call(classifier, params, (f.unsqueeze(0),)).float())
    return (F.cross_entropy(z, y.unsqueeze(0), reduction="none")[0] * r).sum()


def _functional(features, classifier, params, y, rows, weights, tail) -> Tensor:
    def loss(p, f, t, r):
        return _instance_loss(classifier, tail, p, f, t, r)

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(
        params, features.index_select(0, rows), y.index_select(0, rows), weights.float()
    )
    return torch.cat([grads[k].reshape(rows.shape[0], -1) for k in params], 1)


def _loop(features, classifier, params, y, rows, weights, tail) -> Tensor:
    out = []
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    for k in range(rows.shape[0]):
        b = int(rows[k])
        loss = _instance_loss(classifier, tail, leaves, features[b], y[b], weights[k].float())
        grads = torch.autograd.grad(loss, list(leaves.values()))
        out.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(out)


def last_layer_gradient_dots(
    features: Tensor,
    classifier: nn.Module,
    target: Tensor,
    rows: Tensor,
    weights: Tensor,
    direction: Tensor,
    tail: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``g_k . v`` for every instance, without forming the per-instance gradients ``g_k``.

    The indicator update needs only ``g_S . g_k``. For a 1x1 convolution classifier with weight
    ``W``, bias ``b`` and a linear per-sample tail ``U`` (bilinear upsampling), the gradient of
    instance ``k`` is ``g_k = (sum_q (U^T e_k)(q) f_k(q)^T, sum_q (U^T e_k)(q))`` with ``e_k = r_k
    (softmax(z_k) - onehot(y_k))``, so for ``v = (G, c)`` (``G`` shaped like ``W``, ``c`` like ``b``)::

        g_k . v = <U^T e_k, G f_k + c> = <e_k, U(G f_k + c)>

    ``v`` acts as a second 1x1 convolution on the features, its ``C`` output channels go through
    the same tail as the logits (one call for both), and the dot product with the pixel errors is
    taken at the output resolution: no per-instance gradient, no vector-Jacobian product. With two
    classes only differences matter (``sum_c e_c = 0`` and softmax sees ``z_1 - z_0``): ``g_k . v
    = <r_k (sigmoid(U dz) - [y = 1]), U ds>`` with ``dz = (W_1 - W_0) f + b_1 - b_0`` and ``ds =
    (G_1 - G_0) f + c_1 - c_0``, two channels through the tail. Equal to
    ``last_layer_gradients(...) @ v`` up to rounding (tested against the loop).

    Args:
        features, classifier, target, rows, weights, tail: as :func:`last_layer_gradients` (the
            classifier a 1x1 convolution with weight and optional bias; ``tail`` linear).
        direction: ``(n,)`` the vector ``v`` (e.g. ``g_S``) in the order of
            ``classifier.parameters()`` (weight then bias), as :func:`last_layer_gradients` returns.

    Returns:
        ``(K,)`` float32 dot products (``-`` of them is the indicator gradient).

    Raises:
        TypeError: a classifier that is not a 1x1 convolution with weight and bias only.
        ValueError: mismatched shapes.

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv2d(2, 2, 1)
        >>> _ = torch.nn.init.zeros_(conv.weight); _ = torch.nn.init.zeros_(conv.bias)
        >>> f = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1); y = torch.ones(1, 1, 1, 1, dtype=torch.long)
        >>> v = torch.tensor([0.5, 0.0, -0.5, 0.0, 0.5, -0.5])  # the gradient itself: g . g = 4 * 0.25
        >>> last_layer_gradient_dots(f, conv, y, torch.tensor([0]), torch.ones(1, 1, 1), v).tolist()
        [1.0]
    """
    tail = _identity if tail is None else tail
    y, rows = _instance_inputs(features, target, rows, weights)
    weight, bias = _conv_parameters(classifier)
    n_classes, n_features = weight.shape[0], weight.shape[1]
    n = n_classes * n_features + (n_classes if bias is not None else 0)
    direction = direction.detach().flatten()
    if direction.shape[0] != n:
        raise ValueError(f"the direction has {direction.shape[0]} entries, the classifier {n} parameters.")
    with torch.no_grad():
        w = weight.detach().float().reshape(n_classes, n_features)
        b = bias.detach().float() if bias is not None else torch.zeros(n_classes, device=w.device)
        v = direction.to(w.device, torch.float32)
        g, c = v[: n_classes * n_features].view(n_classes, n_features), v[n_classes * n_features :]
        if bias is None:
            c = torch.zeros(n_classes, device=w.device)
        if n_classes == 2:  # differences: two channels through the tail
            w2, b2 = torch.stack([w[1] - w[0], g[1] - g[0]]), torch.stack([b[1] - b[0], c[1] - c[0]])
        else:
            w2, b2 = torch.cat([w, g]), torch.cat([b, c])
        f = features.detach().float()
        low = torch.matmul(w2, f.flatten(2)).add_(b2[:, None]).view(f.shape[0], w2.shape[0], *f.shape[2:])
        out = tail(low).float()  # (B, 2 or 2C, *S)
        if tuple(out.shape[2:]) != tuple(y.shape[1:]):
            raise ValueError(f"the tail gives {tuple(out.shape[2:])} maps for a target of {tuple(y.shape)}.")
        if n_classes == 2:
            t = torch.sigmoid(out[:, 0]).sub_((y == 1).float()).mul_(out[:, 1])  # (B, *S): e_1 (s_1 - s_0)
        else:
            s = out[:, n_classes:]
            t = (torch.softmax(out[:, :n_classes], 1) * s).sum(1)
            for k in range(n_classes):
                t.sub_(torch.where(y == k, s[:, k], 0.0))
        t = t.flatten(1).index_select(0, rows)
        return (t * weights.to(t.device, torch.float32).flatten(1)).sum(1)


def indicator_gradient(strong_gradients: Tensor, weak_gradients: Tensor) -> Tensor:
    """The upper-level gradient of Eq. 3 with ``H = I``: ``d gamma_k = -g_S . g_k``.

    Args:
        strong_gradients: ``(N, n)`` per-instance gradients of strong instances (``g_S`` is their
            mean, the gradient of the mean CE over the strong set) or ``(n,)`` ``g_S`` itself.
        weak_gradients: ``(M, n)`` per-instance gradients of weak instances.

    Returns:
        ``(M,)`` gradients with respect to the indicators.

    Example:
        >>> import torch
        >>> indicator_gradient(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [-2.0, 0.0]])).tolist()
        [-1.0, 1.0]
    """
    g_s = strong_gradients if strong_gradients.ndim == 1 else strong_gradients.mean(0)
    if g_s.shape[0] != weak_gradients.shape[-1]:
        raise ValueError(f"g_S has {g_s.shape[0]} entries, the weak gradients {weak_gradients.shape[-1]}.")
    return -(weak_gradients.double() @ g_s.double()).to(weak_gradients.dtype)


# ------------------------------------------------------------------------------------- indicators


class InstanceIndicators:
    """The dynamic instance indicators: one ``gamma`` in ``[0, 1]`` per weak instance, Adam-updated.

    Instances are keyed by ``(case, class)``: ``class`` is :data:`WHOLE_CASE` (-1) for the paper's
    one indicator per weak image, or a foreground class for the per-class extension (a weak mask
    of several classes: one indicator per class present; a case with no foreground class present,
    such as a missing polyp, keeps one whole-case indicator). Strong cases have ``gamma = 1``,
    fixed. Each :meth:`step` is one Adam step (``lr``, ``betas``, ``eps`` as ``torch.optim.Adam``;
    each instance counts its own steps, so an instance left out of an update keeps its moments),
    then a clip to ``[0, 1]``.

    A checkpointable object (``state_dict`` / ``load_state_dict``): register it on the trainer
    (``MultiNetworkTrainer.register_state``); a state of other cases or classes is refused with
    the first differing cases named.

    Args:
        weak: weak case names (one whole-case indicator each), or case -> its foreground classes
            present (empty or None: one whole-case indicator).
        strong: strong case names.
        weak_types: case -> weak-mask type (``"ellipse"``, ``"scribble"``, ...) for the report.
        init: initial gamma (0.5).
        lr: Adam learning rate ``beta`` (0.1).
        betas, eps: Adam's.
        class_names: class index -> name for the report.

    Raises:
        ValueError: no weak case, no strong case, a case both strong and weak or repeated, a
            class < 1, ``init`` outside [0, 1].

    Example:
        >>> import torch
        >>> ind = InstanceIndicators(["w1", "w2"], strong=["s1"])
        >>> ind.step(torch.tensor([0, 1]), torch.tensor([-3.0, 0.2]))  # first Adam step: -lr * sign
        >>> [round(g, 6) for g in ind.gamma.tolist()], ind.case_gamma(["s1", "w1"]).tolist()
        ([0.6, 0.4], [1.0, 0.6000000238418579])
    """

    def __init__(
        self,
        weak: Sequence[str] | Mapping[str, Sequence[int] | None],
        strong: Sequence[str],
        weak_types: Mapping[str, str] | None = None,
        init: float = 0.5,
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(weak, str) or isinstance(strong, str):
            raise TypeError("weak and strong must be collections of case names, not a single string.")
        per_case = dict(weak) if isinstance(weak, Mapping) else {str(c): None for c in weak}
        if not isinstance(weak, Mapping) and len(per_case) != len(weak):
            dup = sorted({str(c) for c in weak if list(map(str, weak)).count(str(c)) > 1})
            raise ValueError(f"weak cases listed more than once: {dup[:5]}.")
        self.strong = [str(c) for c in strong]
        if not per_case:
            raise ValueError("InstanceIndicators needs at least one weak case.")
        if not self.strong:
            raise ValueError("the hybrid method needs at least one strong case (the indicators follow the strong gradient).")
        dup = sorted({c for c in self.strong if self.strong.count(c) > 1})
        if dup:
            raise ValueError(f"strong cases listed more than once: {dup[:5]}.")
        both = sorted(set(self.strong) & set(map(str, per_case)))
        if both:
            raise ValueError(f"cases both strong and weak: {both[:5]}.")
        self.keys: list[tuple[str, int]] = []
        for case, classes in per_case.items():
            cls = sorted({int(c) for c in classes}) if classes else [WHOLE_CASE]
            if cls != [WHOLE_CASE] and min(cls) < 1:
                raise ValueError(f"weak case {case!r}: indicator classes must be foreground classes (>= 1), got {cls}.")
            self.keys.extend((str(case), c) for c in cls)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self._case_rows: dict[str, list[int]] = {}
        for i, (case, _) in enumerate(self.keys):
            self._case_rows.setdefault(case, []).append(i)
        self._strong_set = set(self.strong)
        self.weak_types = {str(k): str(v) for k, v in (weak_types or {}).items()}
        self.init = check_float(init, "init", minimum=0.0, maximum=1.0)
        self.lr = check_float(lr, "lr", minimum=0.0)
        self.betas = (check_float(betas[0], "betas[0]", 0.0, 1.0, include_maximum=False), check_float(betas[1], "betas[1]", 0.0, 1.0, include_maximum=False))
        self.eps = check_float(eps, "eps", minimum=0.0)
        self.class_names = list(class_names) if class_names is not None else None
        m = len(self.keys)
        self.gamma = torch.full((m,), self.init)
        self.exp_avg = torch.zeros(m)
        self.exp_avg_sq = torch.zeros(m)
        self.steps = torch.zeros(m, dtype=torch.long)
        self.updates = 0

    @classmethod
    def from_datalist(
        cls,
        datalist: Iterable[Mapping],
        key: str = "source",
        strong_value: str = "strong",
        weak_value: str = "weak",
        case_key: str = "case",
        type_key: str = "weak_type",
        present_classes: Mapping[str, Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> InstanceIndicators:
        """Indicators of a datalist whose ``key`` marks each case ``strong_value`` or ``weak_value``.

        ``present_classes`` (case -> foreground classes of its weak mask) gives per-class
        indicators; without it every weak case has one. ``kwargs`` go to the constructor.

        Raises:
            ValueError: an item without ``case_key`` or ``key``, or with another value (named).

        Example:
            >>> data = [{"case": "a", "source": "strong"}, {"case": "b", "source": "weak", "weak_type": "ellipse"}]
            >>> ind = InstanceIndicators.from_datalist(data)
            >>> ind.keys, ind.weak_types
            ([('b', -1)], {'b': 'ellipse'})
        """
        strong, weak, types = [], [], {}
        for i, item in enumerate(datalist):
            case = item.get(case_key)
            if case is None:
                raise ValueError(f"datalist item {i} ({item.get('image', '?')}) has no {case_key!r}.")
            value = item.get(key)
            if value == strong_value:
                strong.append(str(case))
            elif value == weak_value:
                weak.append(str(case))
                if type_key in item:
                    types[str(case)] = str(item[type_key])
            else:
                raise ValueError(f"case {case!r}: {key!r} must be {strong_value!r} or {weak_value!r}, got {value!r}.")
        weak_spec: Any = weak if present_classes is None else {c: present_classes.get(c) for c in weak}
        return cls(weak_spec, strong, weak_types=types, **kwargs)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def per_class(self) -> bool:
        """True when some weak case has class indicators."""
        return any(c != WHOLE_CASE for _, c in self.keys)

    def is_strong(self, case: str) -> bool:
        """Whether ``case`` is strong (False for a weak case; ValueError for an unknown one)."""
        case = str(case)
        if case in self._strong_set:
            return True
        if case in self._case_rows:
            return False
        raise ValueError(f"case {case!r} is neither a strong nor a weak case of these indicators.")

    def instances(self, case: str) -> list[int]:
        """Indicator rows of a weak ``case`` (one, or one per class)."""
        if self.is_strong(case):
            return []
        return self._case_rows[str(case)]

    def instance_classes(self, case: str) -> list[int]:
        """The classes of a case's instances (``[-1]`` for strong or whole-case)."""
        rows = self.instances(case)
        return [self.keys[i][1] for i in rows] if rows else [WHOLE_CASE]

    def case_gamma(self, cases: Sequence[str]) -> Tensor:
        """``(n,)`` gamma of each case: 1 for strong cases, the mean of its instances otherwise."""
        return torch.tensor([1.0 if self.is_strong(c) else float(self.gamma[self._case_rows[str(c)]].mean()) for c in cases])

    def pixel_weights(self, cases: Sequence[str], target: Tensor, spatial_dims: int | None = None) -> Tensor:
        """``(B, 1, *spatial)`` weight of each pixel's loss: gamma of the instance owning it.

        A whole-case (or strong) row is its gamma everywhere; a per-class row weighs pixels of
        class ``c`` by ``gamma_{k,c}`` and the others by the mean of the case's class gammas
        (the split of :func:`instance_pixel_weights`); ``spatial_dims`` as :func:`class_indices`.
        """
        y = class_indices(target, spatial_dims=spatial_dims)
        out = torch.empty(y.shape, dtype=torch.float32, device=y.device)
        for b, case in enumerate(cases):
            rows = self.instances(case)
            if not rows:
                out[b] = 1.0
                continue
            g = self.gamma[rows].to(out.device)
            out[b] = g.mean()
            for r, gk in zip(rows, g):
                c = self.keys[r][1]
                if c != WHOLE_CASE:
                    out[b][y[b] == c] = gk
        return out.unsqueeze(1)

    @torch.no_grad()
    def step(self, rows: Tensor | Sequence[int], grad: Tensor) -> None:
        """One Adam step of the indicators ``rows`` along ``grad`` (``d L / d gamma``), then clip to [0, 1]."""
        rows = torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
        grad = torch.as_tensor(grad).detach().flatten().to(torch.float32).cpu()
        if rows.shape != grad.shape:
            raise ValueError(f"{rows.numel()} indicator rows but {grad.numel()} gradients.")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self.keys)):
            raise ValueError(f"indicator rows outside [0, {len(self.keys)}).")
        if len(set(rows.tolist())) != rows.numel():
            raise ValueError("an indicator row appears twice in one step.")
        if not bool(torch.isfinite(grad).all()):
            raise ValueError("non-finite indicator gradients (the network's last layer diverged?).")
        b1, b2 = self.betas
        m = self.exp_avg[rows].mul_(b1).add_(grad, alpha=1 - b1)
        v = self.exp_avg_sq[rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = self.steps[rows] + 1
        bc1 = 1 - b1 ** t.double()
        bc2 = 1 - b2 ** t.double()
        denom = (v.double().sqrt() / bc2.sqrt()) + self.eps
        new = self.gamma[rows].double() - self.lr / bc1 * m.double() / denom
        self.gamma[rows] = new.clamp_(0.0, 1.0).float()
        self.exp_avg[rows], self.exp_avg_sq[rows], self.steps[rows] = m, v, t
        self.updates += 1

    # ------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "cases": [k[0] for k in self.keys],
            "classes": torch.tensor([k[1] for k in self.keys], dtype=torch.long),
            "strong": list(self.strong),
            "gamma": self.gamma.clone(),
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "steps": self.steps.clone(),
            "updates": int(self.updates),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore gamma and the Adam moments; refuse a state of other instances (cases named)."""
        keys = list(zip([str(c) for c in state["cases"]], torch.as_tensor(state["classes"]).tolist()))
        if keys != self.keys or sorted(map(str, state["strong"])) != sorted(self.strong):
            mine, theirs = set(self.keys), set(keys)
            extra = sorted(theirs - mine)[:5]
            missing = sorted(mine - theirs)[:5]
            strong_diff = sorted(set(map(str, state["strong"])) ^ set(self.strong))[:5]
            raise ValueError(
                "the indicator state belongs to another dataset: "
                f"(case, class) only in the state {extra}, only in this dataset {missing}, strong cases that differ "
                f"{strong_diff}{' (same instances, other order)' if not (extra or missing or strong_diff) else ''}."
            )
        for name in ("gamma", "exp_avg", "exp_avg_sq"):
            setattr(self, name, torch.as_tensor(state[name], dtype=torch.float32).clone().cpu())
        self.steps = torch.as_tensor(state["steps"], dtype=torch.long).clone().cpu()
        self.updates = int(state.get("updates", 0))

    # ------------------------------------------------------------------------------ report

    def rows(self, include_strong: bool = False) -> list[dict[str, Any]]:
        """One record per instance: case, class, weak_type, gamma, steps (strong cases last, gamma 1)."""
        def name(c: int) -> str:
            if c == WHOLE_CASE:
                return "all"
            return self.class_names[c] if self.class_names is not None and c < len(self.class_names) else str(c)

        out = [
            {"case": case, "class": name(c), "weak_type": self.weak_types.get(case, ""), "gamma": float(self.gamma[i]), "steps": int(self.steps[i])}
            for i, (case, c) in enumerate(self.keys)
        ]
        if include_strong:
            out += [{"case": c, "class": "all", "weak_type": "strong", "gamma": 1.0, "steps": 0} for c in self.strong]
        return out

    def to_csv(self, path: str | Path, include_strong: bool = False) -> Path:
        """Write :meth:`rows` as CSV (atomically): which weak annotations the model trusts.

        Example:
            >>> import tempfile, pathlib
            >>> ind = InstanceIndicators({"w": [1]}, ["s"], weak_types={"w": "ellipse"}, class_names=["bg", "polyp"])
            >>> p = ind.to_csv(pathlib.Path(tempfile.mkdtemp()) / "gamma.csv")
            >>> p.read_text().splitlines()
            ['case,class,weak_type,gamma,steps', 'w,polyp,ellipse,0.5,0']
        """
        from partialseg._fileio import atomic_open

        path = Path(path)
        with atomic_open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["case", "class", "weak_type", "gamma", "steps"])
            writer.writeheader()
            for row in self.rows(include_strong):
                writer.writerow({**row, "gamma": f"{row['gamma']:.6g}"})
        return path

    def __repr__(self) -> str:
        g = self.gamma
        return (
            f"InstanceIndicators({len(self.keys)} weak instances, {len(self.strong)} strong cases, "
            f"gamma mean {float(g.mean()):.3f} [{float(g.min()):.3f}, {float(g.max()):.3f}], {self.updates} updates)"
        )
