"""LeNet-5 and the CIFAR ResNet: shapes, the features/head split, parameter counts, meta-device builds."""

import pytest
import torch

from kdrun.models import LeNet5, ResNet

CASES = [
    (LeNet5, {}, [1, 28, 28]),
    (LeNet5, {"dropout": 0.5}, [3, 32, 32]),
    (ResNet, {"depth": 20}, [3, 32, 32]),
    (ResNet, {"depth": 8}, [3, 32, 32]),
]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cls, kwargs, in_shape", CASES)
def test_logits_and_features_shapes_and_forward_is_head_of_features(cls, kwargs, in_shape):
    torch.manual_seed(0)
    model = cls(in_shape, 10, **kwargs).eval()
    x = torch.randn(5, *in_shape)
    logits, features = model(x), model.features(x)
    assert logits.shape == (5, 10)
    assert features.shape == (5, model.head.in_features)
    assert torch.allclose(logits, model.head(features))


@pytest.mark.parametrize("cls, kwargs, in_shape", CASES)
def test_builds_on_the_meta_device(cls, kwargs, in_shape):
    with torch.device("meta"):
        model = cls(in_shape, 10, **kwargs)
    assert all(p.is_meta for p in model.parameters())
    assert model(torch.empty(2, *in_shape, device="meta")).shape == (2, 10)


def test_lenet5_parameter_count():
    # conv 1->6 5x5: 150+6; conv 6->16 5x5: 2400+16; a 28x28 image is 28 -> 14 -> 10 -> 5, so
    # fc 16*5*5=400 -> 120: 48000+120; 120 -> 84: 10080+84; head 84 -> 10: 840+10
    assert n_params(LeNet5([1, 28, 28], 10)) == 156 + 2416 + 48120 + 10164 + 850 == 61706


def test_resnet20_has_the_textbook_parameter_count():
    # Convs have no bias (BatchNorm follows); a BatchNorm of c channels has 2c parameters.
    # stem: conv 3->16 (432) + BN (32)                                         =    464
    # stage 1, 3 blocks of two 16->16 convs (2304 each) + 2 BN (64)            = 14,016
    # stage 2, first block: 16->32 (4608) + 32->32 (9216) + 2 BN (128)
    #          + projection 1x1 16->32 (512) + BN (64)                         = 14,528
    #          2 more blocks of two 32->32 convs + 2 BN: 2 * 18,560            = 37,120
    # stage 3, first block: 32->64 (18432) + 64->64 (36864) + 2 BN (256)
    #          + projection 1x1 32->64 (2048) + BN (128)                       = 57,728
    #          2 more blocks of two 64->64 convs + 2 BN: 2 * 73,984            = 147,968
    # head: 64*10 + 10                                                         =    650
    # 272,474 in all: the "0.27M" of He et al. 2016, whose option A shortcuts (zero padding, no
    # parameters) would leave out the projections' 512+64+2048+128, giving 269,722.
    assert n_params(ResNet([3, 32, 32], 10, depth=20)) == 272_474
    # ResNet-8 (one block per stage): 464 + 4672 + 14528 + 57728 + 650
    assert n_params(ResNet([3, 32, 32], 10, depth=8)) == 78_042


@pytest.mark.parametrize("depth", [7, 2, 21])
def test_resnet_refuses_a_depth_that_is_not_6n_plus_2(depth):
    with pytest.raises(ValueError) as e:
        ResNet([3, 32, 32], 10, depth=depth)
    assert str(e.value) == f"depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}"


def test_resnet_downsamples_twice_and_pools_globally():
    model = ResNet([3, 32, 32], 10, depth=8).eval()
    blocks = [m for m in model.body if m.__class__.__name__ == "BasicBlock"]
    assert [b.conv1.stride for b in blocks] == [(1, 1), (2, 2), (2, 2)]
    assert model(torch.randn(2, 3, 40, 24)).shape == (2, 10)  # any input size


def test_lenet5_refuses_an_input_too_small():
    with pytest.raises(ValueError, match="too small"):
        LeNet5([1, 8, 8], 10)
