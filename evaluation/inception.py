"""The FID Inception-v3 as a feature extractor, from the standard download or a local file.

Two weight files are standard, one per clean-fid mode family:

* ``inception-2015-12-05.pt`` (TorchScript port of the TF Inception by StyleGAN2-ADA): clean-fid's
  ``clean`` and ``legacy_tensorflow`` modes. clean-fid keeps it at ``/tmp/inception-2015-12-05.pt``.
* ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's state dict): the ``legacy_pytorch`` mode;
  loaded with ``torch.load(weights_only=True)``.

Offline, pass the file with ``--inception-weights PATH`` (``weights=``); a missing file is one line
naming it and the option. The TorchScript file is code as well as weights (TorchScript is how it is
distributed); its sha256 goes into every score's protocol so a different file is visible.

Every extractor here (and every custom one used with `onestep.evaluation.fid`) is an ``nn.Module``
taking float images [N, 3, H, W] with values in [0, 255] and returning features [N, D], with
attributes ``name``, ``num_features``, ``weights_sha256``.
"""
from __future__ import annotations

import os
import urllib.request
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn

from .report import file_sha256

TORCHSCRIPT_FILE = "inception-2015-12-05.pt"
TORCHSCRIPT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_FILE
MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights are not available; the message is one line."""


def offline() -> bool:
    """Downloads are off when HF_HUB_OFFLINE or ONESTEP_OFFLINE is set (to anything but 0/false)."""
    return any(os.environ.get(k, "0").lower() not in ("", "0", "false", "no")
               for k in ("HF_HUB_OFFLINE", "ONESTEP_OFFLINE"))


def default_weights_path(mode: str) -> Path:
    """Where clean-fid (TorchScript) or torch.hub (pytorch-fid) keep the standard download."""
    if mode == "legacy_pytorch":
        return Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_FILE
    return Path("/tmp") / TORCHSCRIPT_FILE


def _download(url: str, dest: Path, timeout: float = 60.0) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # processes downloading at once never share it
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
        while block := response.read(1 << 20):
            f.write(block)
    tmp.replace(dest)


def resolve_weights(mode: str, weights: str | Path | None = None, download: bool | None = None) -> Path:
    """The local weights file for `mode`: `weights` if given (it must exist), else the standard
    location, downloaded there first when downloads are allowed."""
    if mode not in MODES:
        raise ValueError(f"unknown FID mode {mode!r}; choose one of {', '.join(MODES)}")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(f"Inception weights not found: {path} (given with --inception-weights)")
        return path
    path = default_weights_path(mode)
    if path.is_file():
        return path
    url, name = (PYTORCH_FID_URL, PYTORCH_FID_FILE) if mode == "legacy_pytorch" else (TORCHSCRIPT_URL, TORCHSCRIPT_FILE)
    download = (not offline()) if download is None else download
    why = "downloads are off: download=False, HF_HUB_OFFLINE or ONESTEP_OFFLINE" if not download else ""
    if download:
        try:
            _download(url, path)
            return path
        except Exception as e:  # no network, proxy, HTTP error: all mean "not available here"
            why = f"download failed: {type(e).__name__}: {' '.join(str(e).split())[:120]}"
    raise InceptionWeightsError(f"Inception weights {name} not found at {path} ({why}); download {url} and pass "
                                f"--inception-weights PATH")


class InceptionFeatures(nn.Module):
    """2048-d pool3 features of the FID Inception for images in [0, 255].

    `resize_inside`: the network resizes any input to 299 itself (TF-1-style bilinear in the
    TorchScript model, torch bilinear in pytorch-fid's), as clean-fid's ``legacy_tensorflow`` mode
    and torchmetrics expect; otherwise inputs must already be 299x299 (clean-fid resizes them).
    """

    num_features = 2048
    input_size = 299

    def __init__(self, net: nn.Module, kind: str, resize_inside: bool, weights_sha256: str, path: Path):
        super().__init__()
        self.net, self.kind, self.resize_inside = net, kind, resize_inside
        self.weights_sha256, self.weights_path = weights_sha256, str(path)
        self.name = f"inception-v3-fid ({'torchscript' if kind == 'torchscript' else 'pytorch-fid'})"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        n = x.shape[0]
        if not self.resize_inside and tuple(x.shape[-2:]) != (299, 299):
            raise ValueError(f"this Inception expects 299x299 inputs (resized outside), got {tuple(x.shape[-2:])}")
        if self.kind == "torchscript":
            if self.resize_inside:
                return self.net(x, return_features=True).view(n, 2048)
            return self.net.layers.forward((x - 128) / 128).view(n, 2048)
        return self.net(x / 255)[0].view(n, 2048)


def load_inception(mode: str = "clean", weights: str | Path | None = None, device="cpu",
                   download: bool | None = None, resize_inside: bool | None = None) -> InceptionFeatures:
    """The Inception of clean-fid's `mode` (eval, no grad) from `weights` or the standard download.
    `resize_inside` defaults to what the mode does (True only for legacy_tensorflow)."""
    path = resolve_weights(mode, weights, download)
    resize_inside = (mode == "legacy_tensorflow") if resize_inside is None else resize_inside
    sha = file_sha256(path)
    if mode == "legacy_pytorch":
        from cleanfid import inception_pytorch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InceptionWeightsError(f"cannot read pytorch-fid Inception weights {path} ({type(e).__name__}); "
                                        f"expected {PYTORCH_FID_FILE} from {PYTORCH_FID_URL}") from None
        # clean-fid builds this network by downloading the state dict; hand it the local one instead.
        with mock.patch.object(inception_pytorch, "load_state_dict_from_url", lambda *a, **k: state):
            net = inception_pytorch.InceptionV3(output_blocks=[3], resize_input=resize_inside)
        kind = "pytorch"
    else:
        try:
            with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; it is this file's format
                warnings.simplefilter("ignore", FutureWarning)
                net = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise InceptionWeightsError(f"cannot load TorchScript Inception {path} ({type(e).__name__}); expected "
                                        f"{TORCHSCRIPT_FILE} from {TORCHSCRIPT_URL}") from None
        kind = "torchscript"
    module = InceptionFeatures(net.eval(), kind, resize_inside, sha, path)
    return module.to(device).requires_grad_(False).eval()
