"""Model zoo for loss-landscape experiments.

Every model is a plain ``nn.Module`` built only from ``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``,
pooling, dropout and parameter-free functional ops, so the sweep engine can rewrite every parameterized
layer into its multi-point form. Construction is deterministic given ``torch.manual_seed``.

Models are created by name::

    model = create("resnet20", num_classes=10, in_shape=(3, 32, 32), width=2, bn=False)

``in_shape`` adapts the model to the data set (1x28x28 for MNIST-like sets, 3x32x32 for CIFAR, 1x8x8
for scikit-learn's digits, ...). Each registered model also carries the OpenLTH default training
hyper-parameters for its standard setting (:func:`train_defaults`).

Initialization follows OpenLTH by default (``init="kaiming_normal"``: He-normal conv / linear weights,
biases left at PyTorch's default; ``bn_init="uniform"``: batch-norm scales drawn from U(0, 1)).
ResNet-50 follows torchvision's initialization instead, so that it matches a torchvision model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "create",
    "available",
    "train_defaults",
    "default_in_shape",
    "MLP",
    "CifarResNet",
    "CifarVGG",
    "NIN",
    "ResNet50",
    "Bottleneck",
    "DeepLinear",
]


# ----------------------------------------------------------------------------------------------------------------------
# Initialization helpers
# ----------------------------------------------------------------------------------------------------------------------


def _init_weights(model: nn.Module, init: str = "kaiming_normal", bn_init: str = "uniform") -> None:
    """Initialize conv / linear weights and batch-norm scales in place.

    Parameters
    ----------
    model : nn.Module
        Model whose submodules are re-initialized (in module registration order, so the result is a
        function of the global torch seed only).
    init : {"kaiming_normal", "kaiming_uniform", "xavier_normal", "default"} or "normal(mean,std)"
        Conv / linear weight initializer; ``"default"`` keeps PyTorch's own initialization. ``"normal(m,s)"``
        draws every conv / linear weight *and bias* from N(m, s^2), the "exotic" initializations of Im, Tao &
        Branson (2016, appendix A.5), e.g. ``"normal(-10,0.01)"`` or ``"normal(-1,1)"`` (s is the standard
        deviation).
    bn_init : {"uniform", "ones", "default"}
        Batch-norm scale initializer: ``U(0, 1)`` (OpenLTH's default), all ones, or PyTorch's default.
    """
    weight_inits: dict[str, Callable[[torch.Tensor], Any] | None] = {
        "kaiming_normal": nn.init.kaiming_normal_,
        "kaiming_uniform": nn.init.kaiming_uniform_,
        "xavier_normal": nn.init.xavier_normal_,
        "default": None,
    }
    exotic = _parse_normal(init)
    if init not in weight_inits and exotic is None:
        raise ValueError(f"unknown init {init!r}; choose from {sorted(weight_inits)} or 'normal(mean,std)'")
    if bn_init not in ("uniform", "ones", "default"):
        raise ValueError(f"unknown bn_init {bn_init!r}; choose from ['default', 'ones', 'uniform']")
    fn = weight_inits.get(init)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and exotic is not None:
            with torch.no_grad():
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.normal_(*exotic)
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and fn is not None:
            fn(m.weight)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            if bn_init == "uniform":
                with torch.no_grad():
                    m.weight.uniform_(0.0, 1.0)
            elif bn_init == "ones":
                nn.init.ones_(m.weight)
            # biases of batch norm stay at zero in every policy


def _parse_normal(init: str) -> tuple[float, float] | None:
    """``"normal(m,s)"`` -> ``(m, s)``; ``None`` for any other string (``s`` must be > 0)."""
    text = str(init).replace(" ", "")
    if not (text.startswith("normal(") and text.endswith(")")):
        return None
    parts = text[len("normal("):-1].split(",")
    try:
        mean, std = (float(v) for v in parts)
    except ValueError:
        raise ValueError(f"init {init!r}: write normal(mean,std), e.g. 'normal(-1,1)'") from None
    if not std > 0:
        raise ValueError(f"init {init!r}: the standard deviation must be > 0")
    return mean, std


def _bn_or_identity(channels: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


# ----------------------------------------------------------------------------------------------------------------------
# Multi-layer perceptrons (LeNet-300-100 and friends)
# ----------------------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Fully connected classifier: flatten -> [Linear -> activation -> dropout] * L -> Linear.

    Parameters
    ----------
    in_features : int
        Flattened input size (784 for 1x28x28).
    num_classes : int
        Output size.
    widths : sequence of int
        Hidden layer widths; ``(300, 100)`` is LeNet-300-100.
    activation : {"relu", "sigmoid", "tanh", "maxout"}
        Hidden nonlinearity. ``"maxout"`` makes each hidden Linear produce ``width * pieces`` outputs and
        keeps the maximum of each group of ``pieces`` (Goodfellow et al. 2013).
    pieces : int
        Number of linear pieces per maxout unit (ignored for the other activations).
    dropout : float
        Dropout probability after every hidden activation (0 disables it).
    bn : bool
        Batch norm (``nn.BatchNorm1d``, PyTorch's initialization: scale 1, shift 0) between every hidden Linear
        and its activation, as in Im, Tao & Branson's (2016) with / without batch-norm comparison. The Linear
        layers keep their biases and are drawn in the same order, so for a given seed the Linear weights equal
        those of the model without batch norm.

    Notes
    -----
    Parameter names: ``hidden.<i>.weight / bias``, ``out.weight / bias``, and with ``bn=True``
    ``norms.<i>.{weight, bias, running_mean, running_var, num_batches_tracked}``.
    """

    def __init__(self, in_features: int, num_classes: int, widths: Sequence[int] = (300, 100),
                 activation: str = "relu", pieces: int = 5, dropout: float = 0.0, bn: bool = False):
        super().__init__()
        if activation not in ("relu", "sigmoid", "tanh", "maxout"):
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation
        self.pieces = pieces if activation == "maxout" else 1
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        layers = []
        d = in_features
        for w in widths:
            layers.append(nn.Linear(d, w * self.pieces))
            d = w
        self.hidden = nn.ModuleList(layers)
        if bn:  # only registered with bn=True: the state dict of the default model is unchanged
            self.norms = nn.ModuleList(nn.BatchNorm1d(w * self.pieces) for w in widths)
        self.out = nn.Linear(d, num_classes)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "sigmoid":
            return torch.sigmoid(x)
        if self.activation == "tanh":
            return torch.tanh(x)
        # maxout: (N, width * pieces) -> (N, width, pieces) -> max over pieces
        return x.unflatten(-1, (-1, self.pieces)).amax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)  # (N, in_features)
        norms = getattr(self, "norms", None)
        for i, layer in enumerate(self.hidden):
            x = layer(x)  # (N, width * pieces)
            if norms is not None:
                x = norms[i](x)
            x = self.dropout(self._act(x))
        return self.out(x)  # (N, num_classes)


# ----------------------------------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2016, section 4.2: depth 6n+2, widths 16/32/64)
# ----------------------------------------------------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; a 1x1 projection shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, bn: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not bn)
        self.bn1 = _bn_or_identity(c_out, bn)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=not bn)
        self.bn2 = _bn_or_identity(c_out, bn)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not bn),
                                          _bn_or_identity(c_out, bn))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images with depth ``6n + 2`` (ResNet-20/32/44/56/110).

    Parameters
    ----------
    depth : int
        Total depth; ``(depth - 2)`` must be divisible by 6.
    num_classes : int
        Output size.
    in_channels : int
        Input channels (3 for CIFAR, 1 for MNIST-like sets).
    width : int
        Width multiplier: stage widths are ``16w, 32w, 64w``.
    bn : bool
        Batch norm after every conv; without it the convs carry biases.
    upsample : int
        Enlarge the input by this integer factor (bilinear) before the first conv: scikit-learn's 8x8 digits at
        16x16 keep a 4x4 map in the last stage, as CIFAR's 32x32 keeps 8x8 (Frankle's ResNet-20 on digits).
        1 (default): the input as it comes. The resize has no weights.

    Notes
    -----
    Parameter names: ``conv, bn, blocks.<i>.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}, fc``.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 1,
                 bn: bool = True, upsample: int = 1):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (got {depth})")
        if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 1:
            raise ValueError(f"CIFAR ResNet upsample must be an integer >= 1 (got {upsample!r})")
        self.upsample = upsample
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not bn)
        self.bn = _bn_or_identity(widths[0], bn)
        blocks = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(c_in, c_out, stride, bn))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        x = F.relu(self.bn(self.conv(x)))  # (N, 16w, H, W)
        x = self.blocks(x)  # (N, 64w, H/4, W/4)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 64w)
        return self.fc(x)


# ----------------------------------------------------------------------------------------------------------------------
# CIFAR VGGs (Simonyan & Zisserman 2015 adapted to 32x32: conv3x3 stacks, one linear classifier)
# ----------------------------------------------------------------------------------------------------------------------

_VGG_PLANS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class CifarVGG(nn.Module):
    """VGG-11/13/16/19 for small images: conv3x3 (+BN) + ReLU stacks, 2x2 max pools, global average
    pool and one linear layer (the CIFAR variant used by Frankle et al.).

    Parameters
    ----------
    depth : {11, 13, 16, 19}
        Which plan.
    num_classes : int
        Output size.
    in_channels : int
        Input channels.
    in_size : int
        Input height (= width). Pools that would shrink the feature map below 1x1 are left out, so
        8x8 inputs work.
    bn : bool
        Batch norm after every conv; without it the convs carry biases.
    width : float
        Channel multiplier.

    Notes
    -----
    Parameter names: ``features.<i>`` (conv / bn modules) and ``fc``.
    """

    def __init__(self, depth: int = 16, num_classes: int = 10, in_channels: int = 3, in_size: int = 32,
                 bn: bool = True, width: float = 1.0):
        super().__init__()
        if depth not in _VGG_PLANS:
            raise ValueError(f"VGG depth must be one of {sorted(_VGG_PLANS)} (got {depth})")
        layers: list[nn.Module] = []
        c_in, size = in_channels, in_size
        for item in _VGG_PLANS[depth]:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            c_out = max(1, int(round(int(item) * width)))
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 512, h, w)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 512)
        return self.fc(x)


# ----------------------------------------------------------------------------------------------------------------------
# Network in Network (Lin, Chen & Yan 2014), CIFAR-10 variant
# ----------------------------------------------------------------------------------------------------------------------


class NIN(nn.Module):
    """Network in Network: three mlpconv blocks (a kxk conv followed by two 1x1 convs), the last one
    producing one map per class, then global average pooling.

    Parameters
    ----------
    num_classes : int
        Output size (channels of the last 1x1 conv).
    in_channels : int
        Input channels.
    in_size : int
        Input height (= width); pools that would shrink the map below 1x1 are left out.
    bn : bool
        Batch norm after every conv (Im et al. compare with and without).
    dropout : float
        Dropout after the first two blocks (0.5 in the original).
    width : float
        Channel multiplier of every conv but the last (which has one map per class): ``width=0.25`` gives
        48 / 40 / 24 channels for the original 192 / 160 / 96.

    Notes
    -----
    Parameter names: ``features.<i>`` (conv / bn modules).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, in_size: int = 32, bn: bool = False,
                 dropout: float = 0.5, width: float = 1.0):
        super().__init__()
        if not width > 0:
            raise ValueError(f"NIN width must be > 0 (got {width})")

        def w(c: int) -> int:
            return max(1, int(round(c * width)))

        plan: list[tuple[int, int, int]] = [  # (out channels, kernel, padding) per conv of each block
            (w(192), 5, 2), (w(160), 1, 0), (w(96), 1, 0),
            (w(192), 5, 2), (w(192), 1, 0), (w(192), 1, 0),
            (w(192), 3, 1), (w(192), 1, 0), (num_classes, 1, 0),
        ]
        layers: list[nn.Module] = []
        c_in, size = in_channels, in_size
        for i, (c_out, k, p) in enumerate(plan):
            last = i == len(plan) - 1
            layers.append(nn.Conv2d(c_in, c_out, k, padding=p, bias=not bn or last))
            if bn and not last:
                layers.append(nn.BatchNorm2d(c_out))
            if not last:
                layers.append(nn.ReLU())
            c_in = c_out
            if i in (2, 5):  # end of block 1 and 2: 3x3 stride-2 pooling, then dropout
                if size >= 3:
                    pool = nn.MaxPool2d(3, stride=2, padding=1) if i == 2 else nn.AvgPool2d(3, stride=2, padding=1)
                    layers.append(pool)
                    size = (size + 1) // 2
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, num_classes, h, w)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, num_classes)


# ----------------------------------------------------------------------------------------------------------------------
# ResNet-50 for ImageNet (He et al. 2016, bottleneck stride on the 3x3 conv, i.e. torchvision's "v1.5")
# ----------------------------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck with expansion 4; same attribute names as torchvision."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ImageNet ResNet-50 (25,557,032 parameters at 1000 classes).

    The module tree and parameter names equal torchvision's ``resnet50`` (``conv1, bn1, layer1..4,
    layer<i>.<j>.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}, fc``), so a torchvision state
    dict loads with ``load_state_dict(strict=True)``.

    Parameters
    ----------
    num_classes : int
        Output size.
    in_channels : int
        Input channels.
    layers : sequence of int
        Bottleneck blocks per stage; ``(3, 4, 6, 3)`` is ResNet-50, ``(3, 4, 23, 3)`` ResNet-101.
    zero_init_residual : bool
        Zero the last BN scale of every block (Goyal et al. 2017).
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, layers: Sequence[int] = (3, 4, 6, 3),
                 zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or c_in != planes * Bottleneck.expansion:
                downsample = nn.Sequential(nn.Conv2d(c_in, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(planes * Bottleneck.expansion))
            stage = [Bottleneck(c_in, planes, stride, downsample)]
            c_in = planes * Bottleneck.expansion
            stage += [Bottleneck(c_in, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        # torchvision's initialization: He-normal (fan_out) convs, unit BN scales, zero BN shifts.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 2048, H/32, W/32)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------------------------------------
# Deep linear networks (Goodfellow, Vinyals & Saxe 2015, section 5)
# ----------------------------------------------------------------------------------------------------------------------


class DeepLinear(nn.Module):
    """Product of ``depth`` bias-free linear maps: ``y = W_depth ... W_2 W_1 x``.

    With ``in_features = out_features = width = 1`` and ``depth = 2`` this is Goodfellow et al.'s scalar
    model ``y = w1 * w2 * x``; wider and deeper settings give deep linear regression networks.

    Parameters
    ----------
    in_features, out_features : int
        Input and output sizes (inputs are flattened).
    depth : int
        Number of linear maps (>= 1).
    width : int
        Hidden width.
    bias : bool
        Give every layer a bias (an affine rather than linear network).

    Notes
    -----
    Parameter names: ``layers.<i>.weight`` (``layers.<i>.bias`` with ``bias=True``).
    """

    def __init__(self, in_features: int = 1, out_features: int = 1, depth: int = 2, width: int = 1,
                 bias: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        sizes = [in_features] + [width] * (depth - 1) + [out_features]
        self.layers = nn.Sequential(*[nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------

_CIFAR = (3, 32, 32)
_MNIST = (1, 28, 28)

# OpenLTH's default training hyper-parameters per setting; keys are TrainConfig field names.
_LENET_TRAIN = dict(dataset="mnist", batch_size=128, optimizer="sgd", lr=0.1, steps="40ep")
_CIFAR_TRAIN = dict(dataset="cifar10", batch_size=128, optimizer="sgdm", lr=0.1, momentum=0.9, weight_decay=1e-4,
                    milestones="80ep,120ep", gamma=0.1, steps="160ep")
_IMAGENET_TRAIN = dict(dataset="imagenet", batch_size=1024, optimizer="sgdm", lr=0.4, momentum=0.9,
                       weight_decay=1e-4, warmup="5ep", milestones="30ep,60ep,80ep", gamma=0.1, steps="90ep")


@dataclass(frozen=True)
class _Spec:
    build: Callable[..., nn.Module]  # (num_classes, in_shape, **kw) -> nn.Module
    in_shape: tuple[int, ...]
    num_classes: int
    train: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def _flat(in_shape: Sequence[int]) -> int:
    return int(math.prod(in_shape))


def _mlp(num_classes, in_shape, widths=(300, 100), activation="relu", pieces=5, dropout=0.0,
         init="kaiming_normal", bn=False):
    model = MLP(_flat(in_shape), num_classes, tuple(widths), activation, pieces, dropout, bn)
    _init_weights(model, init)
    return model


def _cifar_resnet(depth):
    def build(num_classes, in_shape, width=1, bn=True, init="kaiming_normal", bn_init="uniform", upsample=1):
        model = CifarResNet(depth, num_classes, in_shape[0], width, bn, upsample)
        _init_weights(model, init, bn_init)
        return model
    return build


def _cifar_vgg(depth):
    def build(num_classes, in_shape, bn=True, width=1.0, init="kaiming_normal", bn_init="uniform"):
        model = CifarVGG(depth, num_classes, in_shape[0], in_shape[-1], bn, width)
        _init_weights(model, init, bn_init)
        return model
    return build


def _nin(num_classes, in_shape, bn=False, dropout=0.5, width=1.0, init="kaiming_normal", bn_init="ones"):
    model = NIN(num_classes, in_shape[0], in_shape[-1], bn, dropout, width)
    _init_weights(model, init, bn_init)
    return model


def _resnet50(num_classes, in_shape, zero_init_residual=False):
    return ResNet50(num_classes, in_shape[0], (3, 4, 6, 3), zero_init_residual)


def _deep_linear(num_classes, in_shape, depth=2, width=1, bias=False, init="default"):
    model = DeepLinear(_flat(in_shape), num_classes, depth, width, bias)
    _init_weights(model, init)
    return model


_REGISTRY: dict[str, _Spec] = {
    "lenet_300_100": _Spec(_mlp, _MNIST, 10, _LENET_TRAIN, "LeNet-300-100: MLP 784-300-100-10, ReLU"),
    "mlp": _Spec(_mlp, _MNIST, 10, _LENET_TRAIN,
                 "MLP; widths, activation (relu|sigmoid|tanh|maxout), pieces, dropout, bn"),
    **{f"resnet{d}": _Spec(_cifar_resnet(d), _CIFAR, 10, _CIFAR_TRAIN, f"CIFAR ResNet-{d}; width, bn, upsample")
       for d in (20, 32, 44, 56, 110)},
    **{f"vgg{d}": _Spec(_cifar_vgg(d), _CIFAR, 10, _CIFAR_TRAIN, f"CIFAR VGG-{d}; bn, width")
       for d in (11, 13, 16, 19)},
    "nin": _Spec(_nin, _CIFAR, 10, _CIFAR_TRAIN, "Network in Network; bn, dropout, width"),
    "resnet50": _Spec(_resnet50, (3, 224, 224), 1000, _IMAGENET_TRAIN, "ImageNet ResNet-50 (torchvision names)"),
    "deep_linear": _Spec(_deep_linear, (1,), 1, dict(optimizer="sgd", lr=0.01),
                         "product of linear maps; depth, width, bias (depth 2 width 1: y = w1*w2*x)"),
}


def available() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def _spec(name: str) -> _Spec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}") from None


def default_in_shape(name: str) -> tuple[int, ...]:
    """Input shape (without the batch axis) a model is built for when none is given."""
    return _spec(name).in_shape


def train_defaults(name: str) -> dict[str, Any]:
    """OpenLTH's default training hyper-parameters for a model's standard setting.

    Returns
    -------
    dict
        A copy, keyed by :class:`lerpfast.train.TrainConfig` field names (``dataset, batch_size, optimizer,
        lr, momentum, weight_decay, milestones, gamma, warmup, steps``), only the keys that differ from the
        config's own defaults.
    """
    return dict(_spec(name).train)


def create(name: str, num_classes: int | None = None, in_shape: Sequence[int] | None = None, **kw: Any) -> nn.Module:
    """Build a model by name.

    Parameters
    ----------
    name : str
        One of :func:`available`.
    num_classes : int, optional
        Output size; defaults to the model's standard setting (10; 1000 for resnet50; 1 for deep_linear).
    in_shape : sequence of int, optional
        Input shape without the batch axis, e.g. ``(1, 28, 28)``, ``(3, 32, 32)``, ``(1, 8, 8)``;
        defaults to the model's standard setting.
    **kw
        Model options, e.g. ``widths=(500, 300), activation="maxout", dropout=0.5, bn=True`` (mlp, lenet_300_100),
        ``width=2, bn=False`` (resnets), ``bn=False`` (vgg, nin), ``depth=4, width=16`` (deep_linear),
        ``init="default"`` to keep PyTorch's initialization.

    Returns
    -------
    nn.Module
        A freshly initialized model in training mode; the result depends only on the global torch seed.
    """
    spec = _spec(name)
    shape = tuple(int(s) for s in (in_shape if in_shape is not None else spec.in_shape))
    return spec.build(int(num_classes if num_classes is not None else spec.num_classes), shape, **kw)
