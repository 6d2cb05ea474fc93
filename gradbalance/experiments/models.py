"""Teacher and student networks that expose their penultimate features.

Every network is a :class:`FeatureClassifier`: a ``body`` that maps an input to a feature vector
(the penultimate layer, which feeds the feature-distillation projector) and a linear ``head``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "FeatureClassifier",
    "Output",
    "cnn1d_teacher",
    "cnn2d_student",
    "cnn2d_teacher",
    "lenet_teacher",
    "mlp",
    "mlp_dropout_teacher",
]


class Output(NamedTuple):
    """Penultimate features ``(B, C)`` and class logits ``(B, num_classes)``."""

    features: torch.Tensor
    logits: torch.Tensor


class FeatureClassifier(nn.Module):
    """``body`` (input → features) followed by a linear ``head`` (features → logits)."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> Output:
        features = self.body(x)
        return Output(features, self.head(features))


# Every builder takes (input_shape, num_classes, width): the registry of datasets
# (gradbalance.experiments.datasets) names them; width is an MLP's hidden width.


def mlp(input_shape: tuple[int, ...], num_classes: int, width: int | None) -> FeatureClassifier:
    """A two-hidden-layer ReLU MLP of ``width`` units (on MNIST 784-800-800-10, Hinton et al.
    2015's small net)."""
    assert width is not None, "an MLP needs its width"
    return _mlp(math.prod(input_shape), hidden=width, num_classes=num_classes)


def mlp_dropout_teacher(
    input_shape: tuple[int, ...], num_classes: int, width: int | None
) -> FeatureClassifier:
    """Hinton et al. (2012)'s dropout net: a two-hidden-layer ReLU MLP of ``width`` units with
    dropout 0.2 on the inputs and 0.5 on each hidden layer (784-1200-1200-10 on MNIST)."""
    assert width is not None, "an MLP needs its width"
    return _mlp(math.prod(input_shape), width, num_classes, dropout=(0.2, 0.5))


def cnn1d_teacher(
    input_shape: tuple[int, ...], num_classes: int, width: int | None = None
) -> FeatureClassifier:
    """A 1-D CNN for signals ``(C, L)``: three convolutions, then a 256-unit layer."""
    channels, length = input_shape
    return _cnn1d(channels, length, width=64, feature_dim=256, num_classes=num_classes)


def lenet_teacher(
    input_shape: tuple[int, ...], num_classes: int, width: int | None = None
) -> FeatureClassifier:
    """A LeNet-like CNN (two convolutions, 16 and 32 channels, each pooled, then a 256-unit
    layer), cheap enough to train on MNIST's 60,000 images on a CPU."""
    return _lenet(input_shape, widths=(16, 32), feature_dim=256, num_classes=num_classes)


def cnn2d_teacher(
    input_shape: tuple[int, ...], num_classes: int, width: int | None = None
) -> FeatureClassifier:
    """A small image CNN: 32, 64 and 128 channels, global average pooling."""
    return _cnn2d(input_shape[0], widths=(32, 64, 128), num_classes=num_classes)


def cnn2d_student(
    input_shape: tuple[int, ...], num_classes: int, width: int | None = None
) -> FeatureClassifier:
    """The teacher's narrower and shallower sibling: 16 and 32 channels."""
    return _cnn2d(input_shape[0], widths=(16, 32), num_classes=num_classes)


def _mlp(
    in_features: int, hidden: int, num_classes: int, dropout: tuple[float, float] | None = None
) -> FeatureClassifier:
    """Flatten, two ReLU layers of ``hidden`` units; with ``dropout = (p_in, p_hidden)``,
    dropout on the inputs and after each hidden layer."""
    layers: list[nn.Module] = [nn.Flatten()]
    for index, size in enumerate((in_features, hidden)):
        if dropout is not None:
            layers.append(nn.Dropout(dropout[min(index, 1)]))
        layers += [nn.Linear(size, hidden), nn.ReLU()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout[1]))
    return FeatureClassifier(nn.Sequential(*layers), hidden, num_classes)


def _cnn1d(
    channels: int, length: int, width: int, feature_dim: int, num_classes: int
) -> FeatureClassifier:
    reduced = -(-length // 4)  # two stride-2 convolutions with padding 1: ceil(ceil(L / 2) / 2)
    body = nn.Sequential(
        nn.Conv1d(channels, width, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.Conv1d(width, width, kernel_size=3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv1d(width, width, kernel_size=3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * reduced, feature_dim),
        nn.ReLU(),
    )
    return FeatureClassifier(body, feature_dim, num_classes)


def _lenet(
    input_shape: tuple[int, ...], widths: tuple[int, ...], feature_dim: int, num_classes: int
) -> FeatureClassifier:
    """3×3 convolutions with batch norm, each followed by 2×2 max pooling, then a dense layer:
    unlike global average pooling, it keeps where the strokes are."""
    channels, height, width = input_shape
    layers = _conv_blocks(channels, widths, pooled=len(widths))
    pooled = widths[-1] * (height >> len(widths)) * (width >> len(widths))
    layers += [nn.Flatten(), nn.Linear(pooled, feature_dim), nn.ReLU()]
    return FeatureClassifier(nn.Sequential(*layers), feature_dim, num_classes)


def _cnn2d(channels: int, widths: tuple[int, ...], num_classes: int) -> FeatureClassifier:
    layers = _conv_blocks(channels, widths, pooled=len(widths) - 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return FeatureClassifier(nn.Sequential(*layers), widths[-1], num_classes)


def _conv_blocks(channels: int, widths: tuple[int, ...], pooled: int) -> list[nn.Module]:
    """3×3 convolution, batch norm and ReLU per width; 2×2 max pooling after the first
    ``pooled`` of them."""
    layers: list[nn.Module] = []
    for index, width in enumerate(widths):
        layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width)]
        layers += [nn.ReLU()] + ([nn.MaxPool2d(2)] if index < pooled else [])
        channels = width
    return layers
