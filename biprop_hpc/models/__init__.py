"""The model zoo: every model is built from a LayerBuilder and registered by name."""
from biprop_hpc.models import conv, resnet_cifar, resnet_imagenet, vgg  # noqa: F401  (registers the models)
from biprop_hpc.models.builder import LayerBuilder
from biprop_hpc.models.registry import MODELS, build_model

__all__ = ["LayerBuilder", "MODELS", "build_model"]
