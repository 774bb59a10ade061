"""Models: a small CNN for 28x28 and 32x32 images (the default), and torchvision's ResNets and VGGs adapted to them."""
import torch
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VGGS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
MODEL_NAMES = ("cnn",) + RESNETS + VGGS


class ModelError(Exception):
    """The model cannot be built (unknown name, weights that cannot be fetched)."""


def small_cnn(in_channels, image_size, num_classes):
    """Two 3x3 conv + max-pool stages and two dense layers: fast on a CPU, ~0.91 on Fashion-MNIST."""
    if image_size < 4:  # two 2x2 poolings leave nothing of a smaller image
        raise ModelError(f"model cnn needs images of at least 4x4 pixels, the data has {image_size}x{image_size}")
    flat = 64 * (image_size // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


def check_name(name):
    if name not in MODEL_NAMES:
        raise ModelError(f"unknown model_name '{name}' (choose from {', '.join(MODEL_NAMES)})")


def build(name, image_shape, num_classes, pretrained=False):
    """Model `name` for images of `image_shape` (C, H, W) and `num_classes` outputs, on the CPU, channels-last."""
    # channels-last convolutions train ~20% and evaluate ~3x faster on a CPU (benchmarks/bench.py), and suit cuDNN
    model = _build(name, image_shape, num_classes, pretrained).to(memory_format=torch.channels_last)
    _check_fits(model, name, image_shape)
    return model


@torch.no_grad()
def _check_fits(model, name, image_shape):
    """One image through the model, so that images too small for its pooling fail here with one clear line."""
    model.eval()  # BatchNorm in training mode refuses a batch of one
    try:
        model(torch.zeros(1, *image_shape).contiguous(memory_format=torch.channels_last))
    except RuntimeError as e:
        raise ModelError(f"model {name} cannot take images of shape {'x'.join(map(str, image_shape))}: "
                         f"{' '.join(str(e).split())[:200]}") from None
    finally:
        model.train()


def _build(name, image_shape, num_classes, pretrained):
    in_channels, image_size = image_shape[0], image_shape[1]
    if name == "cnn":
        if pretrained:
            raise ModelError("model 'cnn' has no pretrained weights; set pretrained to false")
        return small_cnn(in_channels, image_size, num_classes)
    check_name(name)
    import torchvision  # a second to import; the small CNN does without it
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    except Exception as e:  # torchvision raises URLError, RuntimeError, ... when weights cannot be fetched
        raise ModelError(f"cannot fetch pretrained weights for {name}: {e}") from None
    if name in RESNETS:
        # ImageNet's 7x7 stride-2 stem and max-pool would shrink a 32x32 image to 8x8 before the first block
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        first = model.features[0]
        model.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1) if in_channels != 3 else first
        if image_size < 32:  # a fifth 2x2 pool would shrink 28 -> 14 -> 7 -> 3 -> 1 -> 0
            model.features[-1] = nn.Identity()
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return model
