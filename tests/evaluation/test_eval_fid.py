"""The FID harness: our two backends against clean-fid's and torchmetrics' own FID on identical images
with a shared offline feature extractor, reference statistics (npz, images, cache, named), Inception
loading and its one-line errors."""
import numpy as np
import pytest
import torch
from onestep.evaluation import fid as F
from onestep.evaluation import inception
from PIL import Image
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # inside clean-fid


class TinyFeatures(nn.Module):
    """A fixed random conv net: any input size, [0, 255] images -> 12-d features."""

    name = "tiny-random-conv"
    num_features = 12

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 12, 7, stride=5)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
            self.conv.bias.copy_(torch.randn(12, generator=g) * 0.1)

    @torch.no_grad()
    def forward(self, x):
        h = torch.tanh(self.conv(x.float() / 255.0 - 0.5))
        return 10 * torch.cat([h.mean(dim=(2, 3))[:, :6], h.amax(dim=(2, 3))[:, 6:]], dim=1)


def image_sets(n_fake=48, n_real=56, size=32, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    def make(n, shift):
        base = np.stack([np.sin(6 * xx + p) * np.cos(4 * yy - p) for p in rng.uniform(0, 6, n)])
        img = (base[..., None] * rng.uniform(60, 120, (n, 1, 1, 3)) + 128 + shift
               + rng.normal(0, 20, (n, size, size, 3)))
        return np.clip(img, 0, 255).astype(np.uint8)
    return make(n_fake, 25.0), make(n_real, 0.0)


def write_pngs(images, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    fake, real = image_sets()
    root = tmp_path_factory.mktemp("fid")
    return fake, real, write_pngs(fake, root / "fake"), write_pngs(real, root / "real"), root


@pytest.mark.parametrize("mode", F.MODES)
def test_cleanfid_backend_equals_cleanfid_compute_fid(data, mode):
    from cleanfid import fid as cfid

    fake, real, fake_dir, real_dir, root = data
    net = TinyFeatures()
    theirs = cfid.compute_fid(str(fake_dir), str(real_dir), mode=mode, custom_feat_extractor=net, num_workers=0,
                              batch_size=16, device=torch.device("cpu"), verbose=False)
    from_arrays = F.compute_fid(fake, real, backend="clean-fid", mode=mode, features=net, batch_size=16,
                                cache_dir=root / "cache")
    from_folders = F.compute_fid(fake_dir, real_dir, backend="clean-fid", mode=mode, features=net, batch_size=16,
                                 cache_dir=root / "cache")
    assert theirs > 1.0  # a distance that can be wrong, not ~0
    assert from_arrays["scores"]["fid"] == pytest.approx(theirs, rel=1e-4, abs=1e-6)
    assert from_folders["scores"]["fid"] == pytest.approx(theirs, rel=1e-4, abs=1e-6)
    assert from_arrays["protocol"]["num_generated"] == len(fake)
    assert from_arrays["protocol"]["num_reference"] == len(real)


def test_modes_resize_differently(data):
    fake, real, *_ = data
    net = TinyFeatures()
    fids = {m: F.compute_fid(fake, real, mode=m, features=net, coverage_metrics=False)["scores"]["fid"]
            for m in F.MODES}
    assert len({round(v, 6) for v in fids.values()}) == 3, fids


def test_torchmetrics_backend_equals_torchmetrics_own(data):
    from torchmetrics.image.fid import FrechetInceptionDistance

    fake, real, fake_dir, real_dir, root = data
    net = TinyFeatures()
    metric = FrechetInceptionDistance(feature=net)
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    theirs = float(metric.compute())
    ours = F.compute_fid(fake_dir, real_dir, backend="torchmetrics", features=net, batch_size=16,
                         cache_dir=root / "cache-tm")["scores"]["fid"]
    assert theirs > 1.0
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_backends_agree_on_the_same_features(data):
    # legacy_tensorflow does no resize outside the network: both backends hand the extractor the same
    # pixels, so the two Fréchet distances must agree.
    fake, real, *_ = data
    net = TinyFeatures(seed=3)
    a = F.compute_fid(fake, real, backend="clean-fid", mode="legacy_tensorflow", features=net)["scores"]["fid"]
    b = F.compute_fid(fake, real, backend="torchmetrics", features=net)["scores"]["fid"]
    assert a == pytest.approx(b, rel=1e-4)


def test_reference_npz_stats_images_and_cache(data, tmp_path):
    fake, real, fake_dir, real_dir, root = data
    net = TinyFeatures()
    direct = F.compute_fid(fake, real_dir, features=net, cache_dir=tmp_path)
    assert "precision" in direct["scores"] and "coverage" in direct["scores"]
    cached = list(tmp_path.glob("real-*.npz"))
    assert len(cached) == 1
    again = F.reference_statistics(real_dir, net, cache_dir=tmp_path)
    assert "cached" in again["source"] and again["n"] == len(real)
    # EDM-style statistics file (mu, sigma) of the same features gives the same FID
    for backend in F.BACKENDS:  # the statistics of each backend's own preprocessing
        mu, sigma = F.feature_statistics(F.image_features(real, net, backend=backend))
        stats = tmp_path / f"ref_stats_{backend}.npz"
        np.savez(stats, mu=mu, sigma=sigma)
        via_stats = F.compute_fid(fake, stats, backend=backend, features=net)["scores"]
        assert "precision" not in via_stats  # no reference features behind bare statistics
        via_images = F.compute_fid(fake, real, backend=backend, features=net, coverage_metrics=False)["scores"]
        assert via_stats["fid"] == pytest.approx(via_images["fid"], rel=1e-4)
    # an .npz of images (key arr_0, as guided-diffusion / EDM reference batches)
    batch = tmp_path / "ref_batch.npz"
    np.savez(batch, real)
    assert F.compute_fid(fake, batch, features=net, cache_dir=tmp_path)["scores"]["fid"] == pytest.approx(
        direct["scores"]["fid"], rel=1e-6)


def test_named_reference_offline_is_one_line(monkeypatch, data):
    fake, *_ = data
    monkeypatch.setenv("ONESTEP_OFFLINE", "1")
    net = TinyFeatures()
    net.name = "inception-v3-fid (stand-in)"
    with pytest.raises(F.FIDInputError) as e:
        F.reference_statistics("cifar10-train", net, mode="clean")
    msg = str(e.value)
    assert "\n" not in msg and "cifar10_clean_train_32.npz" in msg and "--reference" in msg
    with pytest.raises(F.FIDInputError, match="legacy_tensorflow"):
        F.reference_statistics("cifar10-train", net, backend="torchmetrics", mode="clean")
    with pytest.raises(F.FIDInputError, match="needs --features inception"):
        F.reference_statistics("cifar10-test", TinyFeatures())


def test_bad_inputs_are_one_line(data, tmp_path):
    fake, *_ = data
    for kwargs, words in [({"backend": "nope"}, "backend"), ({"mode": "bicubic"}, "mode")]:
        with pytest.raises(F.FIDInputError, match=words):
            F.compute_fid(fake, fake, features=TinyFeatures(), **kwargs)
    with pytest.raises(F.FIDInputError, match="not found"):
        F.compute_fid(fake, tmp_path / "missing", features=TinyFeatures())
    with pytest.raises(F.FIDInputError, match="dimensions"):
        np.savez(tmp_path / "s.npz", mu=np.zeros(5), sigma=np.eye(5))
        F.compute_fid(fake, tmp_path / "s.npz", features=TinyFeatures())


def test_inception_missing_weights_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(inception, "default_weights_path", lambda mode: tmp_path / "none.pt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for mode in F.MODES:
        with pytest.raises(inception.InceptionWeightsError) as e:
            inception.load_inception(mode)
        assert "\n" not in str(e.value) and "--inception-weights" in str(e.value)
    with pytest.raises(inception.InceptionWeightsError, match="missing.pt"):
        inception.load_inception("clean", weights=tmp_path / "missing.pt")


class _FakeLayers(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


class _FakeTorchscriptInception(nn.Module):
    """The interface of clean-fid's TorchScript Inception: .layers, forward(x, return_features)."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeLayers()

    def forward(self, x, return_features: bool = False):
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_inception_loads_a_local_torchscript_file(tmp_path):
    path = tmp_path / "my-inception.pt"
    torch.jit.script(_FakeTorchscriptInception()).save(str(path))
    from onestep.evaluation.report import file_sha256

    net = inception.load_inception("clean", weights=path)
    assert net.weights_sha256 == file_sha256(path) and net.num_features == 2048
    x = torch.rand(2, 3, 299, 299) * 255
    assert torch.allclose(net(x), _FakeLayers()((x - 128) / 128))
    with pytest.raises(ValueError, match="299"):
        net(torch.rand(2, 3, 64, 64))
    inside = inception.load_inception("legacy_tensorflow", weights=path)
    assert inside(torch.rand(2, 3, 64, 64) * 255).shape == (2, 2048)


def test_digits_features_through_the_image_path():
    from onestep.evaluation.features import extract_features

    from onestep.data import load_digits

    imgs = load_digits("heldout").images[:200]
    u8 = F.to_uint8_images(imgs)  # grey repeated to RGB, quantised
    quantised = torch.from_numpy(u8[..., :1]).permute(0, 3, 1, 2).float() / 127.5 - 1
    extractor = F.DigitsImageFeatures()
    ours = F.image_features(u8, extractor, backend="torchmetrics")
    np.testing.assert_allclose(ours, extract_features(extractor.net, quantised), rtol=1e-5, atol=1e-6)


def test_chunked_folders_give_the_same_features(data):
    fake, real, fake_dir, *_ = data
    net = TinyFeatures()
    whole = F.image_features(fake, net, mode="legacy_pytorch")
    keep = []
    chunked = F.image_features(F.iter_images(fake_dir, chunk=7), net, mode="legacy_pytorch", batch_size=5, keep=keep)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-8)
    assert sum(len(k) for k in keep) == len(fake) and (np.concatenate(keep) == fake).all()  # PNG is lossless


def test_cache_holds_the_features_and_old_caches_are_refilled(data, tmp_path):
    """Precision/recall need the reference features: they are cached beside mu and sigma (float32,
    losslessly: the extractor gives float32), so a second score reads them instead of extracting again;
    a cache file of the old layout (mu, sigma, n) is computed again and replaced."""
    fake, real, fake_dir, real_dir, root = data
    net = TinyFeatures()
    first = F.reference_statistics(real_dir, net, cache_dir=tmp_path, return_features=True)
    assert first["extracted"] == len(real)
    (cached,) = tmp_path.glob("real-*.npz")
    with np.load(cached) as stored:
        assert stored["features"].dtype == np.float32 and stored["features"].shape == first["features"].shape
    again = F.reference_statistics(real_dir, net, cache_dir=tmp_path, return_features=True)
    assert again["extracted"] == 0 and "cached" in again["source"]
    np.testing.assert_array_equal(again["features"], first["features"])
    a = F.compute_fid(fake, real_dir, features=net, cache_dir=tmp_path)  # from the cache
    b = F.compute_fid(fake, real, features=net)  # extracted now, in memory
    assert a["scores"] == b["scores"] and a["work"] == {"reference_images": 0, "scored_images": len(fake)}
    np.savez(cached, mu=first["mu"], sigma=first["sigma"], n=len(real))  # the layout before features
    refilled = F.reference_statistics(real_dir, net, cache_dir=tmp_path, return_features=True)
    assert refilled["extracted"] == len(real)
    with np.load(cached) as stored:
        assert "features" in stored.files
