"""The CIFAR-100 networks of the distillation literature, as CRD and mdistiller define them.

    Yonglong Tian, Dilip Krishnan, Phillip Isola. "Contrastive Representation Distillation".
    ICLR 2020 (github.com/HobbitLong/RepDistiller). Borui Zhao et al., mdistiller
    (github.com/megvii-research/mdistiller), ``mdistiller/models/cifar/{resnet,wrn,vgg}.py``.

Written from a reading of mdistiller's code, not copied from it. What has to match is kept
exactly: the layers, hence the parameter counts (resnet8x4 1,233,540, resnet32x4 7,433,860,
wrn_40_2 2,255,156, wrn_16_2 703,284 at 100 classes), the module names, hence the
``state_dict`` keys, so that the teacher checkpoints trained with that code
(``cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``, ``{"model": state_dict, ...}``) load with
:func:`load_teacher_checkpoint`, and the weight initialisation. What differs is the output: every
network returns :class:`~gradbalance.experiments.models.Output`, the pooled penultimate features
``(B, feature_dim)`` and the logits ``(B, num_classes)``, instead of mdistiller's
``(logits, feature dict)``.

The three families, for 32 × 32 inputs:

* ``resnet<d>`` (He et al. 2016's CIFAR ResNet): a 3×3 stem, three stages of ``(d − 2) / 6``
  post-activation basic blocks at strides 1, 2, 2, global average pooling over the 8 × 8 map, a
  linear classifier. ``resnet<d>`` has widths (16, 16, 32, 64); ``resnet<d>x4`` (32, 64, 128, 256).
* ``wrn_<d>_<k>`` (Zagoruyko & Komodakis 2016): a 3×3 stem of 16 channels, three stages of
  ``(d − 4) / 6`` pre-activation blocks of widths 16k, 32k, 64k, a final BN-ReLU, pooling, linear.
* ``vgg<d>`` (mdistiller's ``vgg<d>_bn``): five stages of 3×3 conv-BN(-ReLU) layers with 2 × 2 max
  pooling after the first three, global average pooling of the last 512 channels, linear.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance.experiments.models import Output

__all__ = [
    "CIFAR_MODELS",
    "CifarResNet",
    "CifarVGG",
    "WideResNet",
    "load_teacher_checkpoint",
    "make_cifar_model",
]


# ---- ResNet -----------------------------------------------------------------------------------


class _ResNetBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is the identity, or
    ``downsample`` (1×1 convolution and BN) where the width or the resolution changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """mdistiller's ``ResNet(depth, num_filters, "basicblock")``: keys ``conv1``, ``bn1``,
    ``layer{1,2,3}.<i>.{conv1,bn1,conv2,bn2,downsample.{0,1}}``, ``fc``."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet's depth is 6n + 2, not {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = _resnet_stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = _resnet_stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = _resnet_stage(widths[2], widths[3], blocks, stride=2)
        self.feature_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> Output:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        features = x.mean(dim=(2, 3))  # mdistiller's AvgPool2d(8) of the 8 × 8 map
        return Output(features, self.fc(features))


def _resnet_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        _ResNetBlock(in_planes, planes, stride),
        *(_ResNetBlock(planes, planes, 1) for _ in range(blocks - 1)),
    )


# ---- Wide ResNet ------------------------------------------------------------------------------


class _WideBlock(nn.Module):
    """Pre-activation block: ``a = relu(bn1(x))``, ``conv2(relu(bn2(conv1(a)))) + shortcut``,
    where the shortcut is ``x`` itself, or ``convShortcut(a)`` (1×1) where the width changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.convShortcut = None  # mdistiller's name, hence the state_dict key
        if in_planes != planes:
            self.convShortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return out + shortcut


class _WideStage(nn.Module):
    """mdistiller's ``NetworkBlock``: the blocks sit in ``.layer`` (keys ``block1.layer.0...``)."""

    def __init__(self, in_planes: int, planes: int, blocks: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            _WideBlock(in_planes, planes, stride),
            *(_WideBlock(planes, planes, 1) for _ in range(blocks - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """mdistiller's ``WideResNet(depth, widen_factor)`` without dropout: keys ``conv1``,
    ``block{1,2,3}.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet's depth is 6n + 4, not {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = _WideStage(widths[0], widths[1], blocks, stride=1)
        self.block2 = _WideStage(widths[1], widths[2], blocks, stride=2)
        self.block3 = _WideStage(widths[2], widths[3], blocks, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.feature_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        _init_fan_out(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> Output:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        features = F.relu(self.bn1(x)).mean(dim=(2, 3))
        return Output(features, self.fc(features))


# ---- VGG --------------------------------------------------------------------------------------


class CifarVGG(nn.Module):
    """mdistiller's ``VGG(cfg, batch_norm=True)``: stages ``block0`` … ``block4``, each a
    ``Sequential`` of ``[conv, BN, ReLU, conv, BN, ReLU, …]`` without the last ReLU (keys
    ``block<s>.<3j>`` for the j-th convolution, ``block<s>.<3j+1>`` its BN), and ``classifier``.

    Forward: ReLU after every stage, 2 × 2 max pooling after the first three (32 → 4), global
    average pooling of the 4 × 4 × 512 map after the last, the classifier.
    """

    def __init__(self, stages: Sequence[Sequence[int]], num_classes: int = 100) -> None:
        super().__init__()
        in_channels = 3
        for index, widths in enumerate(stages):
            self.add_module(f"block{index}", _vgg_stage(in_channels, widths))
            in_channels = widths[-1]
        self.stages = len(stages)
        self.feature_dim = in_channels
        self.classifier = nn.Linear(in_channels, num_classes)
        _init_fan_out(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> Output:
        for index in range(self.stages):
            x = F.relu(getattr(self, f"block{index}")(x))
            if index < 3:
                x = F.max_pool2d(x, 2)
        features = x.mean(dim=(2, 3))
        return Output(features, self.classifier(features))


def _vgg_stage(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers[:-1])  # the stage's ReLU is applied in forward


def _init_fan_out(model: nn.Module) -> None:
    """mdistiller's initialisation of the wide ResNets and VGG: convolutions ~ N(0, 2 / fan_out)
    (bias 0), batch norms γ = 1, β = 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# ---- registry and checkpoints -----------------------------------------------------------------

_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)
# mdistiller's cfg "B" (vgg13) and "S" (vgg8).
_VGG13 = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))
_VGG8 = ((64,), (128,), (256,), (512,), (512,))

CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda num_classes=100: CifarResNet(20, _NARROW, num_classes),
    "resnet56": lambda num_classes=100: CifarResNet(56, _NARROW, num_classes),
    "resnet110": lambda num_classes=100: CifarResNet(110, _NARROW, num_classes),
    "resnet8x4": lambda num_classes=100: CifarResNet(8, _WIDE, num_classes),
    "resnet32x4": lambda num_classes=100: CifarResNet(32, _WIDE, num_classes),
    "wrn_16_2": lambda num_classes=100: WideResNet(16, 2, num_classes),
    "wrn_40_1": lambda num_classes=100: WideResNet(40, 1, num_classes),
    "wrn_40_2": lambda num_classes=100: WideResNet(40, 2, num_classes),
    "vgg8": lambda num_classes=100: CifarVGG(_VGG8, num_classes),
    "vgg13": lambda num_classes=100: CifarVGG(_VGG13, num_classes),
}
"""Model name (mdistiller's ``cifar_model_dict`` key) → constructor ``(num_classes=100)``."""


def make_cifar_model(name: str, num_classes: int = 100) -> nn.Module:
    """The network ``name`` of :data:`CIFAR_MODELS` with ``num_classes`` outputs.

    Raises:
        ValueError: an unknown name.
    """
    if name not in CIFAR_MODELS:
        raise ValueError(f"unknown CIFAR model {name!r}; choose from {', '.join(CIFAR_MODELS)}")
    return CIFAR_MODELS[name](num_classes=num_classes)


def load_teacher_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights of ``path`` into ``model`` (in place) and return it.

    The file is read with ``torch.load(weights_only=True)`` (tensors and containers only: a file
    from outside runs no code). It holds ``{"model": state_dict, ...}`` (mdistiller's and CRD's
    checkpoints) or a bare state dict; a ``module.`` prefix on every key (a model saved inside
    ``DataParallel``) is removed.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint torch can read safely, holds no state dict, or its
            keys or shapes are not ``model``'s (the message names the file and the keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike
        raise ValueError(f"teacher checkpoint {path}: cannot be read safely: {error}") from error
    state = loaded.get("model", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ValueError(f"teacher checkpoint {path}: holds no state dict (tensors by name)")
    state = _without_data_parallel_prefix(state)
    _check_matches(model, state, path)
    model.load_state_dict(state)
    return model


def _without_data_parallel_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "module."
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return dict(state)


def _check_matches(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = {key: value.shape for key, value in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = sorted(
        f"{key} {tuple(state[key].shape)} (model: {tuple(expected[key])})"
        for key in expected.keys() & state.keys()
        if state[key].shape != expected[key]
    )
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", wrong_shape),
        )
        if keys
    ]
    if problems:
        found = "; ".join(problems)
        raise ValueError(f"teacher checkpoint {path} does not fit {type(model).__name__}: {found}")
