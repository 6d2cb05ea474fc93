"""Teacher and student networks that expose their penultimate features.

Every network is a :class:`FeatureClassifier`: a ``body`` that maps an input to a feature vector
(the penultimate layer, which feeds the feature-distillation projector) and a linear ``head``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["MLP_STUDENTS", "FeatureClassifier", "Output", "make_student", "make_teacher"]

# Datasets whose student is an MLP, and its default hidden width.
MLP_STUDENTS = {"mnist1d": 256, "mnist": 800}


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


def make_teacher(dataset: str, input_shape: tuple[int, ...], num_classes: int) -> FeatureClassifier:
    """The teacher: a small CNN, 1-D for signals ``(C, L)``, 2-D for images ``(C, H, W)``; on
    MNIST a LeNet-like one (two convolutions, 16 and 32 channels, each pooled, then a 256-unit
    layer), cheap enough to train on 60,000 images on a CPU."""
    channels = input_shape[0]
    if len(input_shape) == 2:
        return _cnn1d(channels, input_shape[1], width=64, feature_dim=256, num_classes=num_classes)
    if dataset == "mnist":
        return _lenet(input_shape, widths=(16, 32), feature_dim=256, num_classes=num_classes)
    return _cnn2d(channels, widths=(32, 64, 128), num_classes=num_classes)


def make_student(
    dataset: str, input_shape: tuple[int, ...], num_classes: int, width: int | None = None
) -> FeatureClassifier:
    """The student: on :data:`MLP_STUDENTS` a two-hidden-layer ReLU MLP of ``width`` units (on
    MNIST 784-800-800-10, Hinton et al. 2015's small net), else a narrower and shallower CNN."""
    if dataset in MLP_STUDENTS:
        hidden = MLP_STUDENTS[dataset] if width is None else width
        return _mlp(math.prod(input_shape), hidden=hidden, num_classes=num_classes)
    return _cnn2d(input_shape[0], widths=(16, 32), num_classes=num_classes)


def _mlp(in_features: int, hidden: int, num_classes: int) -> FeatureClassifier:
    body = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
    )
    return FeatureClassifier(body, hidden, num_classes)


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
