"""The small convolutional network each comparison trains.

A plain VGG-style stack (3x3 conv, BatchNorm, ReLU; max-pool between stages;
global average pool; one linear layer): small enough for a laptop CPU on
digits, big enough to memorise noisy CIFAR labels, which is the regime where
sharpness-aware methods are supposed to help. BatchNorm is deliberate: its
running statistics must not be updated by SAM's second forward, which the
training loop handles with the package's ``disable_running_stats``.
"""

from __future__ import annotations

from torch import nn

# Channels per stage, per data set: digits' 8x8 images get two stages
# (8x8 -> 4x4, about 66k parameters), CIFAR's 32x32 three (32 -> 16 -> 8,
# about 290k parameters).
STAGE_WIDTHS = {
    "digits": (32, 64),
    "cifar10": (32, 64, 128),
    "cifar100": (32, 64, 128),
}


class SmallCNN(nn.Module):
    """Stages of two conv-BN-ReLU blocks each, max-pooled between stages."""

    def __init__(self, in_channels: int, num_classes: int, widths=(32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, width in enumerate(widths):
            if stage > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build_model(dataset) -> SmallCNN:
    """The network for ``dataset`` (an ``ImageDataset``); call after seeding
    torch so every optimizer of one seed starts from the same weights."""
    widths = STAGE_WIDTHS.get(dataset.name, STAGE_WIDTHS["cifar10"])
    return SmallCNN(dataset.in_channels, dataset.num_classes, widths)
