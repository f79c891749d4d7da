"""FID of images: two backends (clean-fid, torchmetrics) on one feature extractor, and reference statistics
(clean-fid's named sets, EDM-style .npz, or computed from images and cached). The Fréchet distance itself is
`onestep.evaluation.frechet`'s.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from onestep.errors import InputError

from .frechet import feature_statistics, fid_from_features, frechet_distance  # noqa: F401 (re-exported)

BACKENDS = ("clean-fid", "torchmetrics")
MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
#: clean-fid's precomputed statistics that we know the sizes of: name -> (dataset, res, split, N)
NAMED_REFERENCES = {"cifar10-train": ("cifar10", 32, "train", 50_000), "cifar10-test": ("cifar10", 32, "test", 10_000)}
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class FIDInputError(InputError):
    """Bad FID input (a path, a mode, a reference); the message is one line."""


class DigitsImageFeatures(nn.Module):
    """The digits-FID feature net behind the image interface of this module: [N, C, H, W] in
    [0, 255] -> grey, [-1, 1], 16x16 (bilinear, antialiased, only if the size differs) -> 128-d."""

    input_size = 16

    def __init__(self, net=None):
        super().__init__()
        from .features import FEATURE_NET_NAME, _state_sha256, load_digits_feature_net

        self.net = load_digits_feature_net() if net is None else net
        self.num_features = self.net.arch_args["feature_dim"]
        self.name = FEATURE_NET_NAME
        self.weights_sha256 = getattr(self.net, "weights_sha256", None) or _state_sha256(self.net)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().mean(dim=1, keepdim=True) / 127.5 - 1.0
        if tuple(x.shape[-2:]) != (16, 16):
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        return self.net.features(x)


def feature_extractor(name: str = "inception", mode: str = "clean", backend: str = "clean-fid",
                      inception_weights=None, device="cpu", download: bool | None = None) -> nn.Module:
    """`inception` (the FID Inception of `mode`; with the torchmetrics backend it resizes inside, as
    torchmetrics' own does) or `digits` (the shipped digits-FID net)."""
    if name == "digits":
        return DigitsImageFeatures().to(device)
    if name == "inception":
        from .inception import load_inception

        inside = True if backend == "torchmetrics" else None
        return load_inception(mode, inception_weights, device=device, download=download, resize_inside=inside)
    raise FIDInputError(f"unknown feature extractor {name!r}; choose inception or digits")


def _extractor_sha(extractor: nn.Module) -> str:
    from .report import module_sha256

    return module_sha256(extractor)


# ------------------------------------------------------------------------------------- images

def to_uint8_images(images) -> np.ndarray:
    """uint8 [N, H, W, 3] from a float tensor/array [N, C, H, W] in [-1, 1] (the library's sample
    convention) or uint8 [N, H, W, C] / [N, C, H, W]; one channel is repeated to three."""
    if isinstance(images, torch.Tensor):
        if images.is_floating_point():
            images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        images = images.cpu().numpy()
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)
    x = np.asarray(images)
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating):
            x = ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8)
            if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
                x = x.transpose(0, 2, 3, 1)
        else:
            raise FIDInputError(f"images must be uint8 or float in [-1, 1], got dtype {x.dtype}")
    if x.ndim == 4 and x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise FIDInputError(f"images must be [N, H, W, C] or [N, C, H, W] with C in (1, 3), got shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageChunk:
    """Images [start, stop) of a source (uint8 [n, H, W, 3] from `load()`), not read until loaded:
    a process reads only its own chunks."""

    def __init__(self, start: int, stop: int, load):
        self.start, self.stop, self.load = start, stop, load

    def __len__(self) -> int:
        return self.stop - self.start


def image_chunks(source, chunk: int = 1000) -> list[ImageChunk]:
    """The chunks of an image folder (recursive, sorted; `chunk` files each), a folder of
    `shard-*.npz` (`generate_shards`, a chunk a shard; refused while incomplete), an `.npz` of images
    (key `images`, else `arr_0`), or an array/tensor, in order."""
    if chunk < 1:
        raise FIDInputError(f"chunk size must be >= 1, got {chunk}")

    def slices(images, convert):
        return [ImageChunk(s, min(s + chunk, len(images)), lambda s=s: convert(images[s:s + chunk]))
                for s in range(0, len(images), chunk)]

    if not isinstance(source, (str, Path)):
        return slices(to_uint8_images(source), lambda x: x)
    path = Path(source)
    if not path.exists():
        raise FIDInputError(f"image source not found: {path}")
    if path.is_dir():
        shards = sorted(p for p in path.glob("shard-*.npz") if p.stem[6:].isdigit())  # not *.tmp.npz
        if shards:
            return _shard_chunks(path, shards)
        files = _image_files(path)
        if not files:
            raise FIDInputError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or shard-*.npz in {path}")

        def read(group):
            from PIL import Image

            return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in group])

        return [ImageChunk(s, min(s + chunk, len(files)), lambda s=s: read(files[s:s + chunk]))
                for s in range(0, len(files), chunk)]
    if path.suffix == ".npz":
        with np.load(path) as data:
            key = "images" if "images" in data else "arr_0" if "arr_0" in data else None
            if key is None:
                raise FIDInputError(f"{path} holds neither images (key images / arr_0) nor statistics (mu, sigma): "
                                    f"keys {sorted(data.keys())}")
            images = data[key]
        return slices(images, to_uint8_images)
    raise FIDInputError(f"unsupported image source {path}: give a folder of images, a folder of shard-*.npz, "
                        "or an .npz")


def _shard_chunks(path: Path, shards: list[Path]) -> list[ImageChunk]:
    def read(shard):
        with np.load(shard) as data:
            return to_uint8_images(data["images"])

    manifest = path / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        expected = -(-m["num_samples"] // m["shard_size"])
        if len(shards) != expected:
            raise FIDInputError(f"{path} holds {len(shards)} of {expected} shards: generation was interrupted; "
                                f"run the same command again to resume it")
        # shard i holds samples [i * shard_size, ...): sizes known without reading a shard
        bounds = [(i * m["shard_size"], min((i + 1) * m["shard_size"], m["num_samples"])) for i in range(expected)]
    else:  # shards of unknown size: read their lengths
        ends = np.cumsum([len(read(s)) for s in shards])
        bounds = list(zip([0, *ends[:-1]], ends))
    return [ImageChunk(int(lo), int(hi), lambda s=s: read(s)) for (lo, hi), s in zip(bounds, shards)]


def iter_images(source, chunk: int = 1000):
    """uint8 [n, H, W, 3] chunks of `source` (see `image_chunks`): large sample sets are scored
    without holding them all in memory."""
    for c in image_chunks(source, chunk):
        yield c.load()


def load_images(source) -> np.ndarray:
    """All of `iter_images(source)` as one uint8 [N, H, W, 3] array."""
    chunks = list(iter_images(source))
    return np.concatenate(chunks) if chunks else np.zeros((0, 1, 1, 3), np.uint8)


# ----------------------------------------------------------------------------------- features

def _cleanfid_batches(images: np.ndarray, mode: str, batch_size: int):
    """clean-fid's per-image preprocessing of `mode` (its own `build_resizer`: PIL bicubic to 299
    for clean, torch bilinear for legacy_pytorch, none for legacy_tensorflow), batched."""
    from cleanfid.resize import build_resizer

    resize = build_resizer(mode)
    for s in range(0, len(images), batch_size):
        batch = [np.asarray(resize(img), dtype=np.float32).transpose(2, 0, 1) for img in images[s:s + batch_size]]
        yield torch.from_numpy(np.stack(batch))


@torch.no_grad()
def image_features(images, extractor: nn.Module, backend: str = "clean-fid", mode: str = "clean",
                   batch_size: int = 64, device=None, progress: bool = False, keep: list | None = None) -> np.ndarray:
    """float64 features [N, D] of images (an array/tensor, or an iterable of uint8 [n, H, W, 3]
    chunks from `iter_images`) as `backend` feeds them to `extractor`: clean-fid: its resize of
    `mode`, float [0, 255]; torchmetrics: the uint8 images as they are (the extractor resizes, as
    torchmetrics' own Inception does). `keep`, a list, receives the first 64 images (for the grid)."""
    if backend not in BACKENDS:
        raise FIDInputError(f"unknown FID backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if mode not in MODES:
        raise FIDInputError(f"unknown FID mode {mode!r}; choose one of {', '.join(MODES)}")
    chunks = [to_uint8_images(images)] if isinstance(images, (np.ndarray, torch.Tensor)) else images
    device = device or next(iter(extractor.parameters()), torch.zeros(())).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"features ({backend})", unit="img")
    out, kept = [], 0
    for chunk in chunks:
        if keep is not None and kept < 64:
            keep.append(chunk[:64 - kept])
            kept += len(keep[-1])
        if backend == "clean-fid":
            batches = _cleanfid_batches(chunk, mode, batch_size)
        else:
            batches = (torch.from_numpy(chunk[s:s + batch_size]).permute(0, 3, 1, 2)
                       for s in range(0, len(chunk), batch_size))
        for b in batches:
            out.append(extractor(b.to(device)).double().cpu().reshape(len(b), -1))
            if bar is not None:
                bar.update(len(b))
    if bar is not None:
        bar.close()
    if not out:
        raise FIDInputError("no images to score")
    return torch.cat(out).numpy()


def sharded_image_features(source, extractor: nn.Module, backend: str = "clean-fid", mode: str = "clean",
                           batch_size: int = 64, *, processes=None, chunk: int = 1000,
                           progress: bool = False) -> tuple[np.ndarray, int]:
    """`image_features` of all of `source` (see `image_chunks`), on every process, in source order,
    and the number of images this process extracted. With `processes` (onestep.evaluation.distributed)
    each process extracts its own chunks only and one all-gather joins them; batches never span chunks,
    so the features are those of one process, whatever the number of processes."""
    chunks = image_chunks(source, chunk)
    if not chunks:
        raise FIDInputError("no images to score")
    mine = processes.mine(len(chunks)) if processes is not None else range(len(chunks))
    bar = None
    if progress and (processes is None or processes.is_main_process):
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(chunks[c]) for c in mine), desc=f"features ({backend})", unit="img")
    results = {}
    for c in mine:
        results[c] = image_features(chunks[c].load(), extractor, backend, mode, batch_size)
        if bar is not None:
            bar.update(len(results[c]))
    if bar is not None:
        bar.close()
    made = sum(len(f) for f in results.values())
    parts = processes.gather_chunks(results, len(chunks)) if processes is not None else [results[c] for c in mine]
    return np.concatenate(parts), made


def first_images(source, n: int = 64, chunk: int = 1000) -> np.ndarray:
    """The first n images of `source` (for the grid), reading no more chunks than needed."""
    out, have = [], 0
    for c in image_chunks(source, chunk):
        if have >= n:
            break
        out.append(c.load()[:n - have])
        have += len(out[-1])
    return np.concatenate(out)


# ------------------------------------------------------------------------- reference statistics

def default_cache_dir() -> Path:
    return Path(os.environ.get("ONESTEP_CACHE", Path.home() / ".cache" / "onestep")) / "fid_stats"


def _source_fingerprint(path: Path) -> str:
    """Cheap identity of a file or folder: names, sizes and mtimes (contents hashed for one file)."""
    h = hashlib.sha256()
    if path.is_file():
        from .report import file_sha256

        h.update(file_sha256(path).encode())
    else:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _named_statistics(name: str, mode: str, extractor: nn.Module, download: bool | None):
    dataset, res, split, n = NAMED_REFERENCES[name]
    if not str(getattr(extractor, "name", "")).startswith("inception"):
        raise FIDInputError(f"reference {name} is clean-fid's Inception statistics; it needs --features inception")
    import cleanfid

    from .inception import _download, offline

    fname = f"{dataset}_{mode}_{split}_{res}.npz".lower()
    folder = Path(cleanfid.__file__).parent / "stats"
    path, url = folder / fname, CLEANFID_STATS_URL + fname
    if not path.is_file():
        allowed = (not offline()) if download is None else download
        why = "downloads are off: download=False, HF_HUB_OFFLINE or ONESTEP_OFFLINE"
        if allowed:
            try:
                _download(url, path)
            except Exception as e:
                why = f"download failed: {type(e).__name__}: {' '.join(str(e).split())[:120]}"
        if not path.is_file():
            raise FIDInputError(f"reference statistics {fname} not found in {folder} ({why}); download {url} "
                                f"there, or pass --reference PATH.npz (mu, sigma)")
    with np.load(path) as data:
        return data["mu"], data["sigma"], n, f"clean-fid:{fname}"


def reference_statistics(reference, extractor: nn.Module, backend: str = "clean-fid", mode: str = "clean",
                         batch_size: int = 64, cache_dir=None, download: bool | None = None,
                         return_features: bool = False, progress: bool = False, *, processes=None,
                         chunk: int = 1000) -> dict:
    """{"mu", "sigma", "n" (None if unknown), "source", "features" (None unless asked for and the
    reference is images), "extracted" (images whose features this process extracted now)} for
    `reference`: a clean-fid name (cifar10-train, cifar10-test), an `.npz` with `mu` and `sigma`
    (EDM / clean-fid style), or images (folder, shards, `.npz` of images, array).

    Statistics and features computed from images are cached under `cache_dir`, keyed by the source,
    the extractor's weights hash, the backend and the mode. With `processes` the extraction is shared
    (`sharded_image_features`), the processes decide together whether the cache holds what they need
    (so none skips work that the others wait on), only the main process writes it, and only the main
    process gets mu, sigma and features (None elsewhere: the others only helped extract)."""
    if isinstance(reference, str) and reference in NAMED_REFERENCES:
        if backend == "torchmetrics" and mode != "legacy_tensorflow":
            # the torchmetrics backend resizes inside the network: only clean-fid's legacy_tensorflow
            # statistics were made that way
            raise FIDInputError(f"reference {reference} with --backend torchmetrics needs --mode legacy_tensorflow "
                                f"(statistics of in-network resizing); or use --backend clean-fid")
        mu, sigma, n, source = _named_statistics(reference, mode, extractor, download)
        return {"mu": mu, "sigma": sigma, "n": n, "source": source, "features": None, "extracted": 0}
    sha = _extractor_sha(extractor)
    cache_file = None
    main = processes is None or processes.is_main_process
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        if not path.exists():
            raise FIDInputError(f"reference not found: {path} (give a folder, an .npz, or one of "
                                f"{', '.join(NAMED_REFERENCES)})")
        if path.suffix == ".npz":
            with np.load(path) as data:
                if "mu" in data and "sigma" in data:
                    n = int(data["n"]) if "n" in data else None
                    return {"mu": data["mu"].astype(np.float64), "sigma": data["sigma"].astype(np.float64),
                            "n": n, "source": f"npz-stats:{path}", "features": None, "extracted": 0}
        key = hashlib.sha256(f"{path.resolve()}|{_source_fingerprint(path)}|"
                             f"{sha}|{backend}|{mode}".encode()).hexdigest()
        cache_file = Path(cache_dir or default_cache_dir()) / f"{path.stem}-{key[:20]}.npz"
        hit = _cache_holds(cache_file, "features" if return_features else "mu")
        if processes is not None:
            hit = processes.all_true(hit)
        if hit:
            if not main:
                return {"mu": None, "sigma": None, "n": None, "source": None, "features": None, "extracted": 0}
            with np.load(cache_file) as data:
                return {"mu": data["mu"], "sigma": data["sigma"], "n": int(data["n"]),
                        "source": f"images:{path} (cached {cache_file.name})",
                        "features": data["features"].astype(np.float64) if return_features else None, "extracted": 0}
        source = f"images:{path}"
    else:
        source = "images:in-memory"
    feats, made = sharded_image_features(reference, extractor, backend, mode, batch_size, processes=processes,
                                         chunk=chunk, progress=progress)
    if not main:
        return {"mu": None, "sigma": None, "n": None, "source": None, "features": None, "extracted": made}
    mu, sigma = feature_statistics(feats)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: independent jobs filling the same cache never share a file
        tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npz")
        # features are cached for precision/recall; float32 when that loses nothing (extractors give float32)
        stored = feats.astype(np.float32) if np.array_equal(feats.astype(np.float32), feats) else feats
        np.savez(tmp, mu=mu, sigma=sigma, n=len(feats), features=stored)
        tmp.replace(cache_file)
    return {"mu": mu, "sigma": sigma, "n": len(feats), "source": source,
            "features": feats if return_features else None, "extracted": made}


def _cache_holds(path: Path, key: str) -> bool:
    """Whether a statistics cache file exists and holds `key` (files written before features were
    cached hold only mu, sigma, n)."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            return key in data.files
    except (OSError, ValueError):  # unreadable (e.g. truncated): computed again and replaced
        return False


# ----------------------------------------------------------------------------------- distances

def torchmetrics_frechet(fake_features: np.ndarray, mu_ref, sigma_ref, n_ref: int | None,
                         extractor_dim: int) -> float:
    """torchmetrics' FrechetInceptionDistance.compute on these fake features and these reference
    statistics: its real-feature states are set to the sums the statistics imply (any n > 1 gives
    the same mean and covariance when the reference size is unknown)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class _Features(nn.Module):  # torchmetrics wants a module; the features are already computed
        num_features = extractor_dim

        def forward(self, x):
            return x

    # no synchronisation: under several processes only the main one computes, with every feature
    metric = FrechetInceptionDistance(feature=_Features(), reset_real_features=False, sync_on_compute=False)
    n = int(n_ref) if n_ref and n_ref > 1 else 2
    mu = torch.as_tensor(np.asarray(mu_ref, np.float64))
    sigma = torch.as_tensor(np.asarray(sigma_ref, np.float64))
    metric.real_features_sum = n * mu
    metric.real_features_cov_sum = (n - 1) * sigma + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, dtype=metric.real_features_num_samples.dtype)
    fake = torch.as_tensor(fake_features, dtype=torch.float64)
    for s in range(0, len(fake), 4096):
        metric.update(fake[s:s + 4096], real=False)
    return float(metric.compute())


def compute_fid(generated, reference, *, backend: str = "clean-fid", mode: str = "clean",
                features: str | nn.Module = "inception", inception_weights=None, batch_size: int = 64,
                device="cpu", cache_dir=None, download: bool | None = None, coverage_metrics: bool = True,
                progress: bool = False, processes=None, chunk: int = 1000) -> dict:
    """FID of `generated` images (folder, shards, .npz, array/tensor) against `reference` (see
    `reference_statistics`, or its result). Returns {"scores": {...}, "protocol": {...}, "grid_images",
    "work"} where the protocol holds the FID-specific fields (backend, mode, extractor and its sha256,
    reference source, counts); the caller adds seeds, steps, guidance (`report.make_protocol`).
    "work" counts the reference and generated images whose features this process extracted.

    With image references and `coverage_metrics`, precision/recall (k=3) and density/coverage (k=5)
    in the same features are added, computed on `device` (`coverage_metrics` of precision_recall).

    With `processes` (onestep.evaluation.distributed) feature extraction is shared by the processes,
    chunk by chunk, and the main process scores; the others get scores, protocol and grid None."""
    if backend not in BACKENDS:
        raise FIDInputError(f"unknown FID backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if mode not in MODES:
        raise FIDInputError(f"unknown FID mode {mode!r}; choose one of {', '.join(MODES)}")
    if processes is not None:
        device = processes.device
    extractor = features if isinstance(features, nn.Module) else feature_extractor(
        features, mode, backend, inception_weights, device, download)
    if isinstance(reference, dict):  # already resolved by reference_statistics
        ref = reference
    else:
        want_feats = coverage_metrics and not (isinstance(reference, str) and reference in NAMED_REFERENCES)
        ref = reference_statistics(reference, extractor, backend, mode, batch_size, cache_dir, download,
                                   return_features=want_feats, progress=progress, processes=processes, chunk=chunk)
    fake, made = sharded_image_features(generated, extractor, backend, mode, batch_size, processes=processes,
                                        chunk=chunk, progress=progress)
    work = {"reference_images": int(ref.get("extracted", 0)), "scored_images": int(made)}
    if processes is not None and not processes.is_main_process:
        return {"scores": None, "protocol": None, "grid_images": None, "work": work}
    if fake.shape[1] != np.asarray(ref["mu"]).shape[-1]:
        raise FIDInputError(f"reference statistics have {np.asarray(ref['mu']).shape[-1]} dimensions but the "
                            f"feature extractor gives {fake.shape[1]}: they come from another network")
    if backend == "clean-fid":
        from cleanfid.fid import frechet_distance as cleanfid_frechet

        mu, sigma = fake.mean(axis=0), np.cov(fake, rowvar=False)  # exactly clean-fid's statistics
        fid = float(cleanfid_frechet(mu, sigma, ref["mu"], ref["sigma"]))
    else:
        fid = torchmetrics_frechet(fake, ref["mu"], ref["sigma"], ref["n"], fake.shape[1])
    scores = {"fid": fid}
    if coverage_metrics and ref.get("features") is not None:
        from .precision_recall import coverage_metrics as mode_coverage

        scores.update(mode_coverage(ref["features"], fake, 3, 5, device=device))
    resize = {"clean-fid": {"clean": "PIL bicubic to 299 (float, clean-fid)", "legacy_pytorch": "torch bilinear to 299",
                            "legacy_tensorflow": "inside the network (TF-1 bilinear for Inception)"}[mode],
              "torchmetrics": "inside the feature extractor (uint8 input, as torchmetrics)"}[backend]
    shown = first_images(generated, 64, chunk)
    protocol = {"backend": backend, "mode": mode, "resize": resize,
                "feature_extractor": getattr(extractor, "name", type(extractor).__name__),
                "feature_extractor_sha256": _extractor_sha(extractor), "reference": ref["source"],
                "num_generated": int(len(fake)), "num_reference": ref["n"],
                "resolution": list(shown.shape[1:3]),
                "processes": 1 if processes is None else processes.num_processes}
    return {"scores": scores, "protocol": protocol, "grid_images": shown, "work": work}
