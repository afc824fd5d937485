"""Model zoo: CIFAR-style ResNet-18, a VGG, a small CNN and a ViT for images; LSTMs for token sequences (IMDB, next
character) and a Conv1D keyword spotter for feature frames; width-scalable, with a choice of normalization."""

from prism_tf.models.zoo import (
    MODEL_SPECS,
    MODELS,
    ModelSpec,
    build_model,
    charlstm,
    kws,
    lstm,
    model_spec,
    resnet18,
    small_cnn,
    vgg11,
    vit,
)

__all__ = ["MODELS", "MODEL_SPECS", "ModelSpec", "build_model", "charlstm", "kws", "lstm", "model_spec", "resnet18",
           "small_cnn", "vgg11", "vit"]
