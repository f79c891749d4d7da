"""The "digits-FID" protocol: Fréchet distance in the 128-d penultimate features of a small CNN
classifier trained on the training split of scikit-learn's digits (16x16, [-1, 1]).

Inception features mean nothing on 16x16 grey digits, so we ship our own feature network
(`onestep/assets/digits_features/`, ~0.5 MB). Regenerate it with

    python -m onestep.evaluation.features [--out DIR] [--seed 0]
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from onestep.data import DIGITS_SIZE, load_digits

from .frechet import feature_statistics, frechet_distance

FEATURE_NET_NAME = "digits-cnn-128"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REGENERATE_HINT = "regenerate it with `python -m onestep.evaluation.features`"
DEFAULT_EPOCHS = 20


class DigitsFeatureNet(nn.Module):
    """conv32 -> pool -> conv64 -> pool -> conv128 -> global average pool -> Linear+ReLU (the
    features) -> Linear. Pooling early keeps training cheap (~15 s on one CPU core; the digits are
    8x8 upsampled, so 16x16 carries little extra detail) and gives conv128 a receptive field that
    spans the whole image before the global pool."""

    def __init__(self, in_channels: int = 1, channels: tuple[int, int, int] = (32, 64, 128),
                 feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.arch_args = {"in_channels": in_channels, "channels": list(channels),
                          "feature_dim": feature_dim, "num_classes": num_classes}
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 -> 4
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(c3, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, 16, 16] images in [-1, 1] -> [N, feature_dim] penultimate activations."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------- training

def _random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift every image independently by -1, 0 or +1 pixel in each direction (background fill -1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 3, (n, 1, 1), generator=generator)
    rows = dy + torch.arange(h).view(1, h, 1)
    cols = dx + torch.arange(w).view(1, 1, w)
    # Advanced indices around a slice put the broadcast dims [n, h, w] first, channels last.
    return padded[torch.arange(n).view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2)


@torch.no_grad()
def classifier_accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for s in range(0, len(images), batch_size):
        logits = net(images[s : s + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == labels[s : s + batch_size]).sum().item()
    net.train(was_training)
    return correct / len(images)


def train_digits_feature_net(seed: int = 0, epochs: int = DEFAULT_EPOCHS, device: str = "cpu",
                             batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 1e-4,
                             ) -> tuple[DigitsFeatureNet, float]:
    """Train the feature net on the digits training split; returns (net in eval mode, held-out accuracy).

    Deterministic for a seed: the seed fixes the initialisation, and a private torch.Generator drives
    shuffling and augmentation (random +-1 pixel shifts). Bitwise identical weights also need the same
    machine and torch thread count (reduction order), hence `--threads 1` by default in the CLI.
    """
    torch.manual_seed(seed)
    net = DigitsFeatureNet().to(device)
    gen = torch.Generator().manual_seed(seed)
    train = load_digits("train")
    x, y = train.images, train.labels
    steps_per_epoch = math.ceil(len(x) / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            xb = _random_shift(x[idx], gen).to(device)
            loss = F.cross_entropy(net(xb), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    heldout = load_digits("heldout")
    return net, classifier_accuracy(net, heldout.images, heldout.labels)


# --------------------------------------------------------------------------------- shipped weights

def default_asset_dir() -> Path:
    import onestep

    root = Path(onestep.__file__).parent if getattr(onestep, "__file__", None) else Path(list(onestep.__path__)[0])
    return root / "assets" / "digits_features"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_digits_feature_net(net: DigitsFeatureNet, directory: str | Path, heldout_accuracy: float,
                            seed: int | None = None, epochs: int | None = None) -> Path:
    """Write `model.safetensors` and `config.json` (architecture, accuracy, seed, epochs, sha256)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(weights))
    config = {
        "feature_net": FEATURE_NET_NAME,
        "arch_args": net.arch_args,
        "image_size": DIGITS_SIZE,
        "train_data": "sklearn-digits/train",
        "heldout_accuracy": heldout_accuracy,
        "seed": seed,
        "epochs": epochs,
        "sha256": _sha256(weights),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_digits_feature_net(directory: str | Path | None = None, device: str = "cpu") -> DigitsFeatureNet:
    """Load the shipped feature net (eval mode, requires_grad False). Its weights' sha256 is checked
    against config.json and kept as `net.weights_sha256`."""
    from safetensors.torch import load_file

    directory = Path(directory) if directory is not None else default_asset_dir()
    weights, config_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    for path in (config_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"digits feature net file missing: {path}; {REGENERATE_HINT}")
    try:
        config = json.loads(config_path.read_text())
        expected_sha, arch_args = config["sha256"], config["arch_args"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt digits feature net config {config_path} ({e!r}); {REGENERATE_HINT}") from None
    sha = _sha256(weights)
    if sha != expected_sha:
        raise ValueError(f"corrupt digits feature net weights {weights}: sha256 {sha[:12]}... does not match "
                         f"config.json ({str(expected_sha)[:12]}...); {REGENERATE_HINT}")
    try:
        arch_args = dict(arch_args, channels=tuple(arch_args["channels"]))
        net = DigitsFeatureNet(**arch_args)
        net.load_state_dict(load_file(str(weights)))
    except Exception as e:  # wrong keys/shapes/format: a file that does not fit this code
        raise ValueError(f"cannot load digits feature net weights {weights} ({type(e).__name__}); "
                         f"{REGENERATE_HINT}") from None
    net.weights_sha256 = sha
    net.eval().requires_grad_(False)
    return net.to(device)


@functools.lru_cache(maxsize=None)
def _shipped_net() -> DigitsFeatureNet:
    return load_digits_feature_net()


# ------------------------------------------------------------------------------------------- metric

@torch.no_grad()
def extract_features(net: DigitsFeatureNet, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """[N, 1, 16, 16] images in [-1, 1] -> float64 numpy features [N, feature_dim]."""
    if (not isinstance(images, torch.Tensor) or images.ndim != 4
            or tuple(images.shape[1:]) != (1, DIGITS_SIZE, DIGITS_SIZE)):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"expected images as a tensor [N, 1, {DIGITS_SIZE}, {DIGITS_SIZE}], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [-1, 1], got dtype {images.dtype}")
    was_training = net.training
    net.eval()  # the protocol is defined in eval mode
    device = next(net.parameters()).device
    out = [net.features(images[s : s + batch_size].to(device, torch.float32)).double().cpu()
           for s in range(0, len(images), batch_size)]
    net.train(was_training)
    return torch.cat(out).numpy()


def _state_sha256(net: nn.Module) -> str:
    """sha256 of the safetensors serialisation of the weights: equals the file's sha for a saved net."""
    from safetensors.torch import save

    return hashlib.sha256(save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})).hexdigest()


# net -> {"sha256": str, reference split -> (mu, sigma, size)}. Weak keys: a dropped net frees its
# entry. The cache assumes a net is not modified after its first use here.
_REFERENCE_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def digits_fid(images: torch.Tensor, reference: str = "train", net: DigitsFeatureNet | None = None,
               batch_size: int = 500) -> dict:
    """digits-FID of `images` ([N, 1, 16, 16] in [-1, 1]) against the digits split `reference`.

    Returns {"digits_fid": float, "protocol": {...}}; the protocol block says what the number is
    comparable with (feature net and its sha256, reference split and size, sample count).
    FID is biased upwards for small N: compare numbers computed with the same N.
    """
    net = _shipped_net() if net is None else net
    cache = _REFERENCE_CACHE.setdefault(net, {})
    if "sha256" not in cache:
        cache["sha256"] = getattr(net, "weights_sha256", None) or _state_sha256(net)
    if reference not in cache:
        ref_images = load_digits(reference).images  # validates the split name
        cache[reference] = (*feature_statistics(extract_features(net, ref_images, batch_size)), len(ref_images))
    mu_ref, sigma_ref, ref_size = cache[reference]
    mu, sigma = feature_statistics(extract_features(net, images, batch_size))
    return {
        "digits_fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "protocol": {
            "feature_net": FEATURE_NET_NAME,
            "feature_net_sha256": cache["sha256"],
            "reference": f"sklearn-digits/{reference}",
            "reference_size": int(ref_size),
            "num_samples": int(len(images)),
            "image_size": DIGITS_SIZE,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the digits-FID feature net and save its weights.")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the package assets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: fast for this small net, and reproducible weights)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else default_asset_dir()
    start = time.perf_counter()
    net, acc = train_digits_feature_net(seed=args.seed, epochs=args.epochs, device=args.device)
    seconds = time.perf_counter() - start
    save_digits_feature_net(net, out, acc, seed=args.seed, epochs=args.epochs)
    print(f"held-out accuracy {acc:.4f}, trained in {seconds:.1f} s (torch threads: {torch.get_num_threads()}); "
          f"saved to {out}")


if __name__ == "__main__":
    main()
