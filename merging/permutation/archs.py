"""Small architectures whose checkpoints the permutation merge can rebuild from config.json.

A folder written by `zoo.digits` holds `config.json` with `"evomerge_arch": {"kind": ...,
...}`; `build(config)` rebuilds the torch module, so the permutation spec is derived from
its graph (`spec.spec_from_module`) and REPAIR can run it. Kinds:

- `mlp`: Linear-ReLU stack (`layers.<i>`), inputs flattened.
- `cnn`: VGG-style: conv3x3-ReLU blocks with max-pooling, flattened into a linear classifier.
- `resnet`: CIFAR-style ResNet (BasicBlocks with BatchNorm; 1x1 conv + BN shortcuts where
  the width or stride changes), global average pooling, linear head.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, inputs: int, hidden: list[int], outputs: int):
        super().__init__()
        dims = [inputs, *hidden, outputs]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        x = torch.flatten(x, 1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class CNN(nn.Module):
    """VGG-style: `channels` conv3x3 (padding 1) + ReLU, max-pool 2 after each entry of `pool_after`."""

    def __init__(self, in_channels: int, channels: list[int], pool_after: list[int], image: int, outputs: int,
                 hidden: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image
        for i, w in enumerate(channels):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
            if i in pool_after:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c = w
        self.features = nn.Sequential(*layers)
        flat = c * size * size
        head: list[nn.Module] = [nn.Flatten()]
        if hidden:
            head += [nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, outputs)]
        else:
            head.append(nn.Linear(flat, outputs))
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: stem conv+BN, `blocks` BasicBlocks per stage at widths w, 2w, 4w."""

    def __init__(self, in_channels: int = 3, width: int = 16, blocks: int = 1, outputs: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c = [], width
        for s, w in enumerate([width, 2 * width, 4 * width]):
            stage = [BasicBlock(c if b == 0 else w, w, (1 if s == 0 else 2) if b == 0 else 1) for b in range(blocks)]
            stages.append(nn.Sequential(*stage))
            c = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(4 * width, outputs)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


KINDS = {"mlp": MLP, "cnn": CNN, "resnet": ResNet}


def build(arch: Mapping[str, Any]) -> nn.Module:
    """The module described by an `evomerge_arch` entry ({"kind": ..., constructor arguments})."""
    arch = dict(arch)
    kind = arch.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"config.json: evomerge_arch.kind must be one of {sorted(KINDS)}, got {kind!r}")
    try:
        return KINDS[kind](**arch)
    except TypeError as e:
        raise ValueError(f"config.json: evomerge_arch for {kind}: {e}") from None
