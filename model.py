"""The blog's model.py: the models both roles build by name (the code lives in fedgrpc/model.py)."""

from fedgrpc.model import MODELS, BasicBlock, ResNet, SmallCNN, TinyCNN, build_model, resnet18, resnet18_cifar, resnet20, tiny_cnn

__all__ = ["MODELS", "BasicBlock", "ResNet", "SmallCNN", "TinyCNN", "build_model", "resnet18", "resnet18_cifar", "resnet20", "tiny_cnn"]
