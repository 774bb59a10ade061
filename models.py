"""Models: a small CNN for 28x28 and 32x32 images (the default), torchvision's ResNets and VGGs adapted to them, or a
user's own, named "package.module:function": the function takes the input shape and the number of classes and
returns an nn.Module."""
import torch
from torch import nn

from utils import user_code

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VGGS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
MODEL_NAMES = ("cnn",) + RESNETS + VGGS
TRAVELLING_DTYPES = (torch.float32, torch.float64)  # a model's floating-point state the codec carries


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
    """Refuse an unknown model before any data is loaded (a user's function is looked up, not yet called)."""
    try:
        if user_code.is_spec(name):
            user_code.find(name, "model_name")
        elif name not in MODEL_NAMES:
            raise ModelError(f"unknown model_name '{name}' (choose from {', '.join(MODEL_NAMES)}, or name your own "
                             f"as package.module:function)")
    except user_code.UserCodeError as e:
        raise ModelError(str(e)) from None


def build(name, input_shape, num_classes, pretrained=False, input_dtype=torch.float32):
    """Model `name` for inputs of `input_shape` (images: C, H, W) and `num_classes` outputs, on the CPU,
    channels-last."""
    model = _build(name, input_shape, num_classes, pretrained)
    _check_parameters(model, name)
    # channels-last convolutions train ~20% and evaluate ~3x faster on a CPU (benchmarks/bench.py), and suit cuDNN
    model = model.to(memory_format=torch.channels_last)
    _check_fits(model, name, input_shape, input_dtype, num_classes)
    return model


def for_data(name, dataset, pretrained=False):
    """Model `name` for the inputs and classes of `dataset` (datasets.Dataset)."""
    return build(name, dataset.input_shape, dataset.num_classes, pretrained, dataset.train_inputs.dtype)


def channels_last(inputs):
    """A batch of images (4-D) in the channels-last layout the models use; other inputs as they are."""
    return inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs


def _check_parameters(model, name):
    """What travels is float32 or float64 (the codec writes f32 and reads back into the model's dtype), and is there
    before the first input: a lazy module's parameters are not."""
    state = list(model.state_dict().values()) + list(model.parameters())
    if any(isinstance(v, nn.parameter.UninitializedParameter | nn.parameter.UninitializedBuffer) for v in state):
        raise ModelError(f"model {name} has lazy (uninitialized) parameters: size them from the input shape the "
                         f"function is given")
    odd = sorted({str(v.dtype) for v in state if v.is_floating_point() and v.dtype not in TRAVELLING_DTYPES})
    if odd:
        raise ModelError(f"model {name} has parameters or buffers of {', '.join(odd)}: its floating-point state must "
                         f"be float32 or float64 (compute in lower precision inside forward if you like)")
    if not any(p.is_floating_point() and p.requires_grad for p in model.parameters()):
        raise ModelError(f"model {name} has no floating-point parameters to train")


def _check_fits(model, name, input_shape, input_dtype, num_classes):
    """Two inputs of zeros through the model and a backward pass, so that a model that cannot take the inputs
    (images too small for its pooling, a head of the wrong width, an output the loss cannot reach) fails here with one
    clear line, before a run starts. In eval mode (BatchNorm's statistics stay, dropout draws nothing); gradients are
    dropped after."""
    model.eval()
    shape = "x".join(map(str, input_shape))
    try:
        with torch.random.fork_rng(devices=[]):  # a forward that draws leaves the run's random streams as they were
            output = model(channels_last(torch.zeros(2, *input_shape, dtype=input_dtype)))
        if isinstance(output, torch.Tensor) and tuple(output.shape) == (2, num_classes) and \
                output.is_floating_point() and output.requires_grad:
            output.float().sum().backward()
    except Exception as e:  # RuntimeError from torch, anything from a user's forward
        raise ModelError(f"model {name} cannot take inputs of shape {shape}: {user_code.failure(e)}") from None
    finally:
        model.zero_grad(set_to_none=True)
        model.train()
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (2, num_classes) or \
            not output.is_floating_point():
        got = f"{output.dtype} of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else \
            type(output).__name__
        raise ModelError(f"model {name} must return floating-point (batch, {num_classes}) logits for inputs of shape "
                         f"{shape}; for a batch of 2 it returned {got}")
    if not output.requires_grad:
        raise ModelError(f"model {name} returns logits that no parameter's gradient reaches (does forward detach "
                         f"them, or are its parameters frozen?)")


def _build(name, input_shape, num_classes, pretrained):
    if user_code.is_spec(name):
        if pretrained:
            raise ModelError(f"model {name} is your own: pretrained applies to torchvision's models only")
        try:
            model = user_code.call(name, "model_name", tuple(input_shape), num_classes)
        except user_code.UserCodeError as e:
            raise ModelError(str(e)) from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"model_name '{name}' returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if len(input_shape) != 3:
        raise ModelError(f"model {name} takes images (channels, height, width); the data's inputs have shape "
                         f"{'x'.join(map(str, input_shape))}: name a model of your own for them")
    in_channels, image_size = input_shape[0], input_shape[1]
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
