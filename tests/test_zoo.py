"""The CIFAR model zoo: the published parameter counts, named stages, any input size, meta-device builds."""

import pytest
import torch

from kdrun.models.zoo import ZOO

# Published parameter counts at 100 classes, in millions (RepDistiller's, mdistiller's and DIST's tables).
PUBLISHED_M = {
    "resnet8": 0.08, "resnet14": 0.18, "resnet20": 0.28, "resnet32": 0.47, "resnet44": 0.67, "resnet56": 0.86,
    "resnet110": 1.74, "resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_16_1": 0.18, "wrn_16_2": 0.70,
    "wrn_40_1": 0.57, "wrn_40_2": 2.26, "vgg8": 3.97, "vgg11": 9.28, "vgg13": 9.46, "vgg16": 14.77,
    "vgg19": 20.09, "mobilenetv2": 0.81, "shufflenetv1": 0.95, "shufflenetv2": 1.36,
}
STAGES = {"resnet": ("layer1", "layer2", "layer3"), "wrn": ("block1", "block2", "block3"),
          "vgg": ("block0", "block1", "block2", "block3", "block4"),
          "mobilenetv2": tuple(f"stage{i}" for i in range(1, 8)), "shufflenet": ("layer1", "layer2", "layer3")}


def build(name, num_classes, device="meta", **extra):
    """On the meta device by default: shapes and counts without memory or initialisation cost."""
    builder, kwargs = ZOO[name]
    with torch.device(device):
        return builder(num_classes, **kwargs, **extra)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def head(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def test_every_model_has_a_published_count():
    assert set(ZOO) == set(PUBLISHED_M)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_parameter_count_at_100_classes_is_the_published_one(name):
    assert round(n_params(build(name, 100)) / 1e6, 2) == PUBLISHED_M[name]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_at_10_classes_only_the_head_shrinks(name):
    big, small = build(name, 100), build(name, 10)
    assert head(small).out_features == 10
    assert n_params(big) - n_params(small) == 90 * (head(big).in_features + 1)


def test_resnet20_by_hand():
    # stem 3->16 conv + BN: 432 + 32; stage 1: 3 blocks of two 16->16 convs + 2 BN: 3 * (2 * 2304 + 64);
    # stage 2: first block 16->32 + 32->32 + 2 BN + 1x1 projection 16->32 + BN, then 2 blocks of two 32->32;
    # stage 3 likewise with 64; head 64 -> 10.
    stage2 = (4608 + 9216 + 128 + 512 + 64) + 2 * (2 * 9216 + 128)
    stage3 = (18432 + 36864 + 256 + 2048 + 128) + 2 * (2 * 36864 + 256)
    assert n_params(build("resnet20", 10)) == 464 + 3 * (2 * 2304 + 64) + stage2 + stage3 + 650


def family(name):
    return next(f for f in STAGES if name.startswith(f))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_named_stages_halve_the_resolution_and_logits_come_out(name):
    model = build(name, 100).eval()  # meta
    seen = {}
    for stage in STAGES[family(name)]:
        getattr(model, stage).register_forward_hook(lambda m, i, o, stage=stage: seen.__setitem__(stage, o.shape))
    assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 100)
    sizes = [shape[-1] for shape in seen.values()]
    assert list(seen) == list(STAGES[family(name)])
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 32


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv2"])
def test_one_channel_and_other_sizes(name):
    model = build(name, 10, device="cpu", in_channels=1).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert build(name, 10, device="cpu")(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("builder_name, kwargs, message", [
    ("resnet20", {"depth": 21}, "depth must be 6n+2 (8, 14, 20, 32, ...), got 21"),
    ("wrn_16_1", {"depth": 15}, "depth must be 6n+4 (10, 16, 22, 28, 40, ...), got 15"),
    ("vgg8", {"depth": 12}, "depth must be one of 8, 11, 13, 16, 19, got 12"),
])
def test_bad_depths_are_refused(builder_name, kwargs, message):
    builder, defaults = ZOO[builder_name]
    with pytest.raises(ValueError) as e:
        builder(10, **{**defaults, **kwargs})
    assert str(e.value) == message
