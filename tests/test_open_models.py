"""Any nn.Module as teacher or student: building from a config (kdrun passes only num_classes), the
optional capabilities (constraint, head, penultimate features), loading a plain state_dict trained
elsewhere, and `kdrun models`."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import kdrun_in_process
from kdrun.commands import models as models_command
from kdrun.model_files import check_model_payload, load_model
from kdrun.parts import RolePart
from kdrun.preflight import check_buildable
from kdrun.errors import KdrunError
from kdrun.models import MLP, capabilities
from kdrun.models.build import build_model, with_input_shape
from kdrun.run import save_model

CONF = Path(__file__).resolve().parents[1] / "conf"
ME = __name__  # this module, importable by name: its classes serve as `_target_`s


class Spy(nn.Module):
    """Records the keyword arguments it was built with."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.fc = nn.Linear(2, kwargs["num_classes"])

    def forward(self, x):
        return self.fc(x.flatten(1)[:, :2])


class Net(nn.Module):
    """A user's model: no `head` attribute, no `constrain`, its own names."""

    def __init__(self, num_classes=10, in_channels=1, width=8):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


class Headless(nn.Module):
    """Logits from a 1x1 convolution: no nn.Linear anywhere."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, num_classes, 1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class NoBias(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.out = nn.Linear(784, num_classes, bias=False)

    def forward(self, x):
        return self.out(x.flatten(1))


class NeedsValues(nn.Module):
    """A forward that reads a value: it cannot run on the meta device."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(784, num_classes)

    def forward(self, x):
        if x.abs().max().item() > 1e9:
            raise ValueError("huge input")
        return self.fc(x.flatten(1))


def not_a_module(num_classes):
    return "a string"


def student_of(cfg):
    """check_buildable's arguments for the student of `cfg`."""
    return cfg.dataset, [RolePart.of(cfg, "student")]


def cfg_with(model, shape=(1, 28, 28), num_classes=10):
    """A config like a command's: a dataset, and a student built from `model`."""
    return OmegaConf.create({
        "dataset": {"name": "fashion_mnist", "shape": list(shape), "num_classes": num_classes},
        "student": {"name": "mynet", "model": model, "recipe": {
            "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
            "scheduler": {"_target_": "kdrun.schedules.lr_schedule", "_partial_": True, "kind": "cosine",
                          "warmup_steps": 0}}}})


# ---------------------------------------------------------------- build_model


def test_build_model_passes_only_num_classes_and_strips_the_reserved_keys():
    model = build_model({"_target_": f"{ME}.Spy", "width": 3, "head": "fc", "features": {"s1": "fc"}}, 7)
    assert model.kwargs == {"width": 3, "num_classes": 7}


def test_build_model_passes_plain_lists_as_torchvision_and_timm_expect():
    model = build_model(OmegaConf.create({"_target_": f"{ME}.Spy", "sizes": [1, 2], "opts": {"a": 1}}), 3)
    assert type(model.kwargs["sizes"]) is list and type(model.kwargs["opts"]) is dict


def test_build_model_refuses_what_is_not_a_module():
    with pytest.raises(Exception) as e:
        build_model({"_target_": f"{ME}.not_a_module"}, 10)
    assert str(e.value) == f"{ME}.not_a_module returned a str, not a torch.nn.Module"


def test_a_target_whose_package_is_missing_says_so(monkeypatch):
    with pytest.raises(ModuleNotFoundError) as e:
        build_model({"_target_": "no_such_package_kd.Net"}, 10)
    assert str(e.value) == ("no_such_package_kd.Net: no module named no_such_package_kd "
                            "(is it installed, or its folder on PYTHONPATH?)")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(ModuleNotFoundError) as e:
        build_model({"_target_": "timm.create_model", "model_name": "resnet18"}, 10)
    assert str(e.value) == "timm.create_model: no module named timm (pip install 'kdrun[timm]')"


def test_kdrun_model_configs_ask_for_their_shape_and_a_resolved_arch_rebuilds():
    node = OmegaConf.load(CONF / "model" / "mlp30.yaml")
    root = OmegaConf.create({"dataset": {"shape": [3, 8, 8]}, "model": node})
    assert OmegaConf.to_container(node)["in_shape"] == "${dataset.shape}"
    arch = OmegaConf.to_container(root.model, resolve=True)  # what model.pt records
    assert arch["in_shape"] == [3, 8, 8]
    model = build_model(arch, 4)
    assert model.body[2].in_features == 3 * 8 * 8 and model.head.out_features == 4


def test_an_arch_recorded_before_in_shape_still_rebuilds_and_others_are_left_alone():
    legacy = {"_target_": "kdrun.models.MLP", "hidden": [5]}
    assert with_input_shape(legacy, (1, 28, 28)) == {**legacy, "in_shape": [1, 28, 28]}
    assert build_model(with_input_shape(legacy, (1, 28, 28)), 10).head.in_features == 5
    for arch in ({"_target_": "torchvision.models.resnet18"}, {"_target_": "kdrun.models.zoo.resnet", "depth": 8},
                 {"_target_": "kdrun.models.MLP", "hidden": [5], "in_shape": [3, 4, 4]}):
        assert with_input_shape(arch, (1, 28, 28)) == arch


def test_torchvision_and_timm_models_build_with_num_classes():
    with torch.device("meta"):
        tv = build_model(OmegaConf.load(CONF / "model" / "tv_resnet18.yaml"), 10)
        tm = build_model({"_target_": "timm.create_model", "model_name": "resnet10t", "in_chans": 1}, 7)
    assert tv.fc.out_features == 10 and capabilities.head_module(tv, "fc")[1] is tv.fc
    assert tm.fc.out_features == 7 and tm.conv1[0].in_channels == 1


# ---------------------------------------------------------------- capabilities


def test_constrain_calls_the_models_own_and_does_nothing_for_others():
    mlp = MLP([1, 2, 2], 3, hidden=[4], max_norm=0.1)
    capabilities.constrain(mlp)
    assert torch.linalg.vector_norm(mlp.head.weight, dim=1).max() <= 0.1 + 1e-6
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    capabilities.constrain(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_head_module_named_then_model_head_then_last_linear():
    net = Net()
    assert capabilities.head_module(net) == ("fc", net.fc)
    mlp = MLP([1, 2, 2], 3, hidden=[4])
    assert capabilities.head_module(mlp) == ("head", mlp.head)
    seq = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 3)))
    assert capabilities.head_module(seq) == ("2.0", seq[2][0])
    assert capabilities.head_module(seq, "0") == ("0", seq[0])


def test_head_module_errors():
    with pytest.raises(KdrunError) as e:
        capabilities.head_module(Headless())
    assert str(e.value) == "Headless has no nn.Linear layer to serve as its head (name one with head: in the model config)"
    with pytest.raises(KdrunError) as e:
        capabilities.head_module(Net(), "classifier")
    assert str(e.value) == "head: 'classifier' is not a module of Net (its top-level children: conv, pool, fc)"
    with pytest.raises(KdrunError) as e:
        capabilities.head_module(Net(), "pool")
    assert str(e.value) == "head: 'pool' of Net is a AdaptiveAvgPool2d, not an nn.Linear"


def test_detect_and_require():
    caps = capabilities.detect(Net())
    assert (caps.head, caps.head_bias, caps.head_outputs, caps.constrain) == ("fc", True, 10, False)
    assert capabilities.detect(MLP([1, 2, 2], 3, hidden=[4])).constrain
    caps.require("kdrun specialists", bias=True)  # nothing missing: no error
    with pytest.raises(KdrunError) as e:
        capabilities.detect(Headless()).require("transfer.bias_correction=true", bias=True)
    assert str(e.value) == ("transfer.bias_correction=true needs the model's final nn.Linear layer (its head), but "
                            "Headless has no nn.Linear layer to serve as its head (name one with head: in the model config)")
    with pytest.raises(KdrunError) as e:
        capabilities.detect(NoBias()).require("kdrun specialists", bias=True)
    assert str(e.value) == "kdrun specialists needs a bias on the model's head, but NoBias.out has none (bias=False)"


def test_penultimate_features_are_the_heads_input():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, 1, 5, 5)
    features, logits = capabilities.features_and_logits(net, x)
    by_hand = torch.relu(net.conv(x)).mean((2, 3))
    assert torch.allclose(features, by_hand, atol=1e-6)
    assert torch.allclose(logits, net.fc(by_hand), atol=1e-6) and torch.allclose(logits, net(x))
    assert not net.fc._forward_pre_hooks  # the hook is gone afterwards


def test_head_bias_and_bias_shift_on_a_user_model():
    from kdrun import bias

    net = Net()
    before = net.fc.bias.detach().clone()
    bias.apply_shift(net, [2, 5], 1.5)
    assert torch.allclose(net.fc.bias - before, torch.tensor([0, 0, 1.5, 0, 0, 1.5, 0, 0, 0, 0]))
    with pytest.raises(KdrunError) as e:
        bias.apply_shift(NoBias(), [1], 1.0)
    assert str(e.value) == "NoBias.out has no bias to correct (bias=False)"


def test_specialist_head_from_a_generalist_with_another_head_name():
    from kdrun.specialists.heads import init_from_generalist

    torch.manual_seed(0)
    generalist, specialist = Net(num_classes=4), Net(num_classes=3)
    init_from_generalist(specialist, generalist, (1, 3))
    assert torch.equal(specialist.conv.weight, generalist.conv.weight)
    assert torch.equal(specialist.fc.weight[:2], generalist.fc.weight[[1, 3]])
    assert torch.allclose(specialist.fc.weight[2], generalist.fc.weight[[0, 2]].mean(0))


# ---------------------------------------------------------------- preflight: build on meta, forward a dummy batch


def test_check_buildable_returns_capabilities():
    found = check_buildable(*student_of(cfg_with({"_target_": f"{ME}.Net"})))
    assert found["student"].head == "fc"


@pytest.mark.parametrize("model, shape, message", [
    ({"_target_": "torchvision.models.resnet18"}, (1, 28, 28),
     "invalid student config: ResNet does not take inputs of shape [1, 28, 28]: its first convolution takes 3 "
     "channels, the data have 1"),
    ({"_target_": f"{ME}.Net", "in_channels": 3}, (1, 28, 28),
     "invalid student config: Net does not take inputs of shape [1, 28, 28]: its first convolution takes 3 "
     "channels, the data have 1"),
    ({"_target_": f"{ME}.Spy"}, (1, 28, 28), None),
    ({"_target_": "torch.nn.Flatten"}, (1, 28, 28),
     "invalid student config: Flatten.__init__() got an unexpected keyword argument 'num_classes'"),
    ({"_target_": f"{ME}.Net", "head": "nope"}, (1, 28, 28),
     "invalid student config: head: 'nope' is not a module of Net (its top-level children: conv, pool, fc)"),
])
def test_check_buildable_refuses_a_model_that_does_not_fit_the_data(model, shape, message):
    cfg = cfg_with(model, shape)
    if message is None:  # Spy takes any shape
        check_buildable(*student_of(cfg))
        return
    with pytest.raises(KdrunError) as e:
        check_buildable(*student_of(cfg))
    assert str(e.value) == message


def test_logits_of_the_wrong_shape_are_refused_and_a_meta_unfriendly_forward_is_let_through():
    class Wide(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    with pytest.raises(ValueError) as e:
        capabilities.check_forward(Wide(), (1, 2, 2), 10)
    assert str(e.value) == "Wide gives [2, 4] on a batch of 2 inputs of shape [1, 2, 2], not logits [2, 10]"
    with torch.device("meta"):
        model = NeedsValues()
    capabilities.check_forward(model, (1, 28, 28), 10)  # .item() on meta: cannot be checked, not refused


# ---------------------------------------------------------------- a teacher trained elsewhere: plain state_dict


ARCH = {"_target_": f"{ME}.Net", "in_channels": 3}


def plain(tmp_path, state, name="elsewhere.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_a_plain_state_dict_loads_for_any_dataset_as_the_named_architecture(tmp_path):
    torch.manual_seed(1)
    trained = Net(in_channels=3)
    path = plain(tmp_path, trained.state_dict())
    payload, sha = check_model_payload(path, "cifar10", "mynet", ARCH, num_classes=10)
    assert payload["format"] == "state_dict" and payload["arch"] == ARCH and payload["name"] == "mynet" and len(sha) == 64
    data = SimpleNamespace(num_classes=10, shape=(3, 32, 32), train=SimpleNamespace(device=torch.device("cpu")))
    model, _ = load_model(path, data, "svhn", None, None, plain_name="mynet", plain_arch=ARCH)
    x = torch.randn(2, 3, 32, 32)
    assert not model.training and torch.equal(model(x), trained.eval()(x))


@pytest.mark.parametrize("state, arch, message", [
    (Net(in_channels=3).state_dict(), None,
     "teacher checkpoint {path} is a plain state_dict, which records no architecture; pass it as "
     "teacher_ckpt={path} with teacher=NAME naming its architecture"),
    (Net(in_channels=3, num_classes=5).state_dict(), ARCH,
     "teacher checkpoint {path} has 5 outputs (fc.weight is [5, 8]), not the 10 classes of cifar10"),
    ({("head.b" if k == "fc.bias" else k): v for k, v in Net(in_channels=3).state_dict().items()}, ARCH,
     "teacher checkpoint {path} is a state_dict that does not fit teacher=mynet: missing key fc.bias; "
     "unexpected key head.b"),
    (Net(in_channels=3, width=4).state_dict(), {**ARCH, "width": 8},
     "teacher checkpoint {path} is a state_dict that does not fit teacher=mynet: conv.weight is [4, 3, 3, 3] "
     "there, [8, 3, 3, 3] in mynet"),
    ({"weights": torch.zeros(3)}, ARCH, "{path} is not a kdrun model checkpoint"),
])
def test_a_state_dict_that_does_not_fit_is_one_line(tmp_path, state, arch, message):
    path = plain(tmp_path, state)
    with pytest.raises(KdrunError) as e:
        check_model_payload(path, "cifar10", "mynet", arch, num_classes=10)
    assert str(e.value) == message.format(path=path)


def test_save_model_records_the_callers_num_classes_and_a_user_model_round_trips(tmp_path):
    net = Net(num_classes=4)
    arch = {"_target_": f"{ME}.Net"}
    save_model(tmp_path / "model.pt", net, arch, "fashion_mnist", 4, {"name": "mynet", "role": "teacher"})
    payload, _ = check_model_payload(tmp_path / "model.pt", "fashion_mnist", "mynet", arch, num_classes=4)
    assert payload["num_classes"] == 4 and payload["arch"] == arch


def test_a_kdrun_checkpoint_of_before_in_shape_matches_todays_config(tmp_path):
    legacy = {"_target_": "kdrun.models.MLP", "hidden": [30, 30], "dropout_input": 0.0}
    model = MLP([1, 28, 28], 10, hidden=[30, 30])
    save_model(tmp_path / "model.pt", model, legacy, "mnist", 10, {"name": "mlp30"})
    today = {**legacy, "in_shape": [1, 28, 28]}
    check_model_payload(tmp_path / "model.pt", "mnist", "mlp30", today, num_classes=10)
    with pytest.raises(KdrunError) as e:
        check_model_payload(tmp_path / "model.pt", "mnist", "mlp300", {**today, "hidden": [300, 300]}, num_classes=10)
    assert str(e.value) == (f"teacher checkpoint {tmp_path / 'model.pt'} is mlp30 (hidden=[30, 30], dropout_input=0.0), "
                            "but teacher=mlp300 is (hidden=[300, 300], dropout_input=0.0); pass teacher=mlp30")


# ---------------------------------------------------------------- kdrun models


def test_models_rows_count_parameters_and_macs_by_hand():
    dataset = OmegaConf.create({"name": "mnist", "shape": [1, 28, 28], "num_classes": 10})
    table = {r.name: r for r in models_command.rows(dataset)}
    # mlp30: 784*30+30 + 30*30+30 + 30*10+10 parameters; one MAC per weight of the three matmuls
    assert table["mlp30"].params == 23550 + 930 + 310 == 24790
    assert table["mlp30"].macs == 784 * 30 + 30 * 30 + 30 * 10 == 24720
    assert table["mlp30"].head == "head" and table["tv_resnet18"].head == "fc"
    assert table["tv_resnet18"].params == 11_181_642 and table["tv_resnet18"].macs is None
    assert table["tv_resnet18"].note == ("ResNet does not take inputs of shape [1, 28, 28]: its first convolution "
                                         "takes 3 channels, the data have 1")


def test_kdrun_models_lists_every_model_config_at_the_datasets_shape():
    out = kdrun_in_process(["models", "dataset=cifar10"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("models for cifar10 (input [3, 32, 32], 10 classes); MACs of one forward pass of one input")
    assert "| tv_resnet18 | torchvision.models.resnet18 | 11,181,642 | 37.02M | fc |" in lines
    names = [line.split(" | ")[0].lstrip("| ") for line in lines[4:]]
    assert names == sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
    bad = kdrun_in_process(["models", "student=mlp30"])
    assert bad.returncode == 2
    assert bad.stderr.strip() == "kdrun: error: kdrun models takes dataset=NAME and dataset.KEY=VALUE, got 'student=mlp30'"
