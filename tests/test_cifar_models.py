"""The CIFAR models: mdistiller's parameter counts and state_dict keys, outputs, checkpoints."""

import pytest
import torch

from gradbalance.experiments.cifar_models import (
    CIFAR_MODELS,
    load_teacher_checkpoint,
    make_cifar_model,
)
from gradbalance.experiments.models import Output

# At 100 classes. resnet8x4, resnet32x4, wrn_40_2, wrn_16_2: the counts the literature publishes
# (issue 25); the others counted from mdistiller's definitions (models/cifar/{resnet,wrn,vgg}.py,
# vgg<d> being its vgg<d>_bn) with torch, and equal to CRD's table (0.28M, 0.86M, 1.74M, 0.57M,
# 3.96M, 9.46M).
PARAMETERS = {
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_40_2": 2_255_156,
    "wrn_16_2": 703_284,
    "resnet20": 278_324,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "wrn_40_1": 569_780,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
}
FEATURES = {
    "resnet8x4": 256,
    "resnet32x4": 256,
    "wrn_40_2": 128,
    "wrn_16_2": 128,
    "resnet20": 64,
    "resnet56": 64,
    "resnet110": 64,
    "wrn_40_1": 64,
    "vgg8": 512,
    "vgg13": 512,
}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def test_the_registry_is_the_ten_models():
    assert set(CIFAR_MODELS) == set(PARAMETERS)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_parameter_count_is_mdistillers(name):
    model = make_cifar_model(name)
    assert sum(parameter.numel() for parameter in model.parameters()) == PARAMETERS[name]
    assert model.feature_dim == FEATURES[name]


def test_the_classifier_follows_num_classes():
    model = make_cifar_model("resnet8x4", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS["resnet8x4"] - 90 * (256 + 1)


# One of each family and width (resnet56 and resnet110 are resnet20's code with more blocks).
@pytest.mark.parametrize("name", ["resnet20", "resnet8x4", "wrn_16_2", "wrn_40_1", "vgg8", "vgg13"])
def test_forward_gives_pooled_features_and_logits(name):
    model = make_cifar_model(name)
    output = model(torch.randn(2, 3, 32, 32))
    assert isinstance(output, Output)
    assert output.features.shape == (2, FEATURES[name])
    assert output.logits.shape == (2, 100)
    # The logits are the linear classifier of the features.
    head = model.fc if hasattr(model, "fc") else model.classifier
    torch.testing.assert_close(output.logits, head(output.features))


def bn_keys(prefix, width):
    return {f"{prefix}.{name}": (width,) if name != "num_batches_tracked" else () for name in BN}


def resnet8x4_keys():
    """resnet8x4's state_dict as mdistiller's resnet.py names it: one BasicBlock per stage, each
    with a downsample (32 → 64 channels, then stride 2 twice), written out by hand."""
    keys = {"conv1.weight": (32, 3, 3, 3), **bn_keys("bn1", 32)}
    for stage, (inp, out) in enumerate(((32, 64), (64, 128), (128, 256)), start=1):
        block = f"layer{stage}.0"
        keys[f"{block}.conv1.weight"] = (out, inp, 3, 3)
        keys.update(bn_keys(f"{block}.bn1", out))
        keys[f"{block}.conv2.weight"] = (out, out, 3, 3)
        keys.update(bn_keys(f"{block}.bn2", out))
        keys[f"{block}.downsample.0.weight"] = (out, inp, 1, 1)
        keys.update(bn_keys(f"{block}.downsample.1", out))
    keys.update({"fc.weight": (100, 256), "fc.bias": (100,)})
    return keys


def wrn_16_2_keys():
    """wrn_16_2's as mdistiller's wrn.py names it: NetworkBlock's blocks in ``.layer``, two per
    stage, a ``convShortcut`` in each stage's first block (16 → 32 → 64 → 128 channels)."""
    keys = {"conv1.weight": (16, 3, 3, 3)}
    for stage, (inp, out) in enumerate(((16, 32), (32, 64), (64, 128)), start=1):
        for index, width_in in enumerate((inp, out)):
            block = f"block{stage}.layer.{index}"
            keys.update(bn_keys(f"{block}.bn1", width_in))
            keys[f"{block}.conv1.weight"] = (out, width_in, 3, 3)
            keys.update(bn_keys(f"{block}.bn2", out))
            keys[f"{block}.conv2.weight"] = (out, out, 3, 3)
            if index == 0:
                keys[f"{block}.convShortcut.weight"] = (out, inp, 1, 1)
    keys.update(bn_keys("bn1", 128))
    keys.update({"fc.weight": (100, 128), "fc.bias": (100,)})
    return keys


def vgg8_keys():
    """vgg8 (mdistiller's vgg8_bn, cfg "S"): one conv (with bias) + BN per stage, ``classifier``."""
    keys = {}
    for stage, (inp, out) in enumerate(((3, 64), (64, 128), (128, 256), (256, 512), (512, 512))):
        keys.update({f"block{stage}.0.weight": (out, inp, 3, 3), f"block{stage}.0.bias": (out,)})
        keys.update(bn_keys(f"block{stage}.1", out))
    keys.update({"classifier.weight": (100, 512), "classifier.bias": (100,)})
    return keys


def checkpoint_state(keys, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(240 * 782)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


@pytest.mark.parametrize(
    ("name", "keys"),
    [("resnet8x4", resnet8x4_keys), ("wrn_16_2", wrn_16_2_keys), ("vgg8", vgg8_keys)],
)
def test_the_state_dict_is_mdistillers(name, keys):
    expected = keys()
    state = make_cifar_model(name).state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == expected


@pytest.mark.parametrize("data_parallel", [False, True])
def test_a_checkpoint_in_mdistillers_layout_loads(tmp_path, data_parallel):
    state = checkpoint_state(resnet8x4_keys())
    prefix = "module." if data_parallel else ""
    saved = {f"{prefix}{key}": value for key, value in state.items()}
    # What mdistiller's trainer saves: the model beside the optimizer state, epoch and accuracy.
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": saved, "optimizer": {"state": {}}, "epoch": 240, "best_acc": 79.4}, path)
    model = load_teacher_checkpoint(make_cifar_model("resnet8x4"), path)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_a_bare_state_dict_loads(tmp_path):
    state = checkpoint_state(wrn_16_2_keys(), seed=1)
    path = tmp_path / "wrn.pth"
    torch.save(state, path)
    model = load_teacher_checkpoint(make_cifar_model("wrn_16_2"), path)
    torch.testing.assert_close(model.fc.weight, state["fc.weight"], rtol=0, atol=0)


def test_a_checkpoint_of_another_model_names_file_and_keys(tmp_path):
    state = checkpoint_state(resnet8x4_keys())
    state["layer1.0.conv3.weight"] = state.pop("layer1.0.conv2.weight")
    path = tmp_path / "tampered.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError) as error:
        load_teacher_checkpoint(make_cifar_model("resnet8x4"), path)
    message = str(error.value)
    assert str(path) in message
    assert "missing keys: layer1.0.conv2.weight" in message
    assert "unexpected keys: layer1.0.conv3.weight" in message


def test_a_checkpoint_with_other_shapes_is_refused(tmp_path):
    state = checkpoint_state(resnet8x4_keys())
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 256), torch.zeros(10)  # CIFAR-10's
    path = tmp_path / "cifar10.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"wrong shapes: fc\.bias \(10,\) \(model: \(100,\)\)"):
        load_teacher_checkpoint(make_cifar_model("resnet8x4"), path)


def test_a_file_with_code_is_not_run(tmp_path):
    """A checkpoint whose pickle calls a function: torch's weights_only loader refuses it."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_teacher_checkpoint(make_cifar_model("resnet8x4"), path)
    assert not marker.exists()


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_missing_checkpoint_and_unknown_model_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth"):
        load_teacher_checkpoint(make_cifar_model("resnet8x4"), tmp_path / "nothing.pth")
    with pytest.raises(ValueError, match="unknown CIFAR model 'resnet18'"):
        make_cifar_model("resnet18")
