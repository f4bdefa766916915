"""Model architectures both roles build by name (the blog's ResNet-18, CIFAR variants, a tiny CNN) and their BatchNorm upkeep."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fedgrpc.config.choices import CHANNELS_LAST_SETTINGS


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet of BasicBlocks with either the ImageNet stem (the blog's) or a CIFAR stem."""

    def __init__(
        self,
        layers: list[int],
        widths: list[int],
        num_classes: int = 10,
        imagenet_stem: bool = True,
    ) -> None:
        super().__init__()
        first = widths[0]
        if imagenet_stem:
            # 7x7 stride-2 convolution and max-pool: the torchvision ResNet the blog used.
            self.stem = nn.Sequential(
                nn.Conv2d(3, first, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(first),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            # 3x3 stride-1 convolution, no pooling: keeps 32x32 inputs at full resolution.
            self.stem = nn.Sequential(
                nn.Conv2d(3, first, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(first),
                nn.ReLU(inplace=True),
            )
        stages = []
        in_planes = first
        for index, (blocks, width) in enumerate(zip(layers, widths, strict=False)):
            stride = 1 if index == 0 else 2
            stage = []
            for block in range(blocks):
                stage.append(BasicBlock(in_planes, width, stride if block == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class TinyCNN(nn.Module):
    """Two convolutions and a linear layer, without BatchNorm: for tests and smoke runs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        return self.fc(out.flatten(1))


class SmallCNN(nn.Module):
    """Two unpadded convolutions and a linear layer (16.6 k parameters): the CNN of Flower's simulation benchmarks."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.fc = nn.Linear(32 * 6 * 6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        return self.fc(out.flatten(1))


def resnet18(num_classes: int = 10) -> nn.Module:
    """The blog's ResNet-18: BasicBlock, layers [2, 2, 2, 2], ImageNet stem (11.2 M parameters)."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, imagenet_stem=True)


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """ResNet-18 with a 3x3 stem and no max-pool, the usual CIFAR variant."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, imagenet_stem=False)


def resnet20(num_classes: int = 10) -> nn.Module:
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages of 3 blocks, 16/32/64 channels (0.27 M parameters)."""
    return ResNet([3, 3, 3], [16, 32, 64], num_classes, imagenet_stem=False)


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """A BatchNorm-free CNN of 11.6 k parameters."""
    return TinyCNN(num_classes)


# The fixed list of architectures a leader may name; learners build only these.
MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": resnet18,
    "resnet18-cifar": resnet18_cifar,
    "resnet20": resnet20,
    "tiny-cnn": tiny_cnn,
    "small-cnn": SmallCNN,
}


# Models that train faster in the channels-last memory format on a CPU (bench/channels_last.py: 1.3-1.9x for
# these; the ImageNet-style resnet18 at 32x32 gains nothing, so it is left out).
CHANNELS_LAST_FASTER_ON_CPU = frozenset({"resnet20", "resnet18-cifar", "small-cnn", "tiny-cnn"})


def memory_format_for(setting: str, name: str, device: torch.device) -> torch.memory_format:
    """The memory format to train model `name` in: channels-last when `setting` is on, or auto where it was measured faster."""
    if setting not in CHANNELS_LAST_SETTINGS:
        raise ValueError(f"unknown channels-last setting {setting!r}; choose one of {', '.join(CHANNELS_LAST_SETTINGS)}")
    if setting == "on" or (setting == "auto" and device.type == "cpu" and name in CHANNELS_LAST_FASTER_ON_CPU):
        return torch.channels_last
    return torch.contiguous_format


def compiled_for_training(model: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` through torch.compile, for training steps; parameters and buffers stay the module's own.

    On CUDA the compiled step is also replayed as a CUDA graph (mode reduce-overhead): there a ResNet-20
    step is bound by the host launching kernels, not by the GPU. Shapes are static, so an epoch's last,
    shorter batch compiles once more instead of every shape going dynamic. The first steps pay the compile.
    """
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default", dynamic=False)


def recompute_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor | tuple[torch.Tensor, ...]]) -> int:
    """Set every BatchNorm layer's running statistics to their average over `batches`, the weights untouched.

    Averaged weights do not compute what any of the models they came from computed, so the average of those
    models' statistics does not describe them (torch.optim.swa_utils.update_bn recomputes them after weight
    averaging for the same reason). Returns how many BatchNorm layers there were; the model's mode is kept.
    """
    layers = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches rather than an exponential one
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(*batch) if isinstance(batch, tuple) else model(batch)
    for layer, momentum in zip(layers, momenta, strict=False):
        layer.momentum = momentum
    model.train(training)
    return len(layers)


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build an architecture from MODELS by name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return MODELS[name](num_classes)
