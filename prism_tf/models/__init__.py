"""Model zoo: CIFAR-style ResNet-18, a VGG and a small CNN, width-scalable, with a choice of normalization."""

from prism_tf.models.zoo import MODELS, build_model, resnet18, small_cnn, vgg11

__all__ = ["MODELS", "build_model", "resnet18", "small_cnn", "vgg11"]
