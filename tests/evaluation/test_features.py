"""The shipped digits-FID feature net and the digits_fid metric."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from onestep.evaluation.features import (
    classifier_accuracy,
    default_asset_dir,
    digits_fid,
    load_digits_feature_net,
)

from onestep.data import load_digits


@pytest.fixture(scope="module")
def net():
    return load_digits_feature_net()


def test_shipped_net_is_accurate_and_frozen(net):
    heldout = load_digits("heldout")
    assert classifier_accuracy(net, heldout.images, heldout.labels) >= 0.97
    assert not net.training
    assert not any(p.requires_grad for p in net.parameters())


def test_shipped_sha256_matches_config():
    directory = default_asset_dir()
    config = json.loads((directory / "config.json").read_text())
    assert hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest() == config["sha256"]


def test_features_shape(net):
    x = load_digits("heldout").images[:7]
    assert net.features(x).shape == (7, 128)
    assert net(x).shape == (7, 10)


def test_heldout_fid_is_far_below_noise(net):
    heldout = load_digits("heldout").images
    real = digits_fid(heldout, net=net)
    noise = digits_fid(torch.randn(len(heldout), 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1),
                       net=net)
    assert np.isfinite(real["digits_fid"]) and real["digits_fid"] >= 0
    assert noise["digits_fid"] >= 10 * real["digits_fid"]
    p = real["protocol"]
    assert p["feature_net"] == "digits-cnn-128" and p["reference"] == "sklearn-digits/train"
    assert p["reference_size"] == 1257 and p["num_samples"] == len(heldout) and p["image_size"] == 16
    assert p["feature_net_sha256"] == json.loads((default_asset_dir() / "config.json").read_text())["sha256"]


def test_default_net_and_bad_input():
    x = load_digits("heldout").images[:100]
    assert digits_fid(x)["digits_fid"] > 0  # loads the shipped net itself
    with pytest.raises(ValueError, match="16"):
        digits_fid(torch.zeros(4, 3, 32, 32))


def test_corrupt_or_missing_weights_give_a_clear_error(tmp_path):
    shutil.copytree(default_asset_dir(), tmp_path / "net")
    (tmp_path / "net" / "model.safetensors").write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match=r"model\.safetensors.*python -m onestep\.evaluation\.features"):
        load_digits_feature_net(tmp_path / "net")
    (tmp_path / "net" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*python -m onestep\.evaluation\.features"):
        load_digits_feature_net(tmp_path / "net")
