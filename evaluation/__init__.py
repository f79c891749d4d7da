"""Evaluation: FID (fid: clean-fid and torchmetrics backends, reference statistics; inception),
precision/recall and density/coverage, CLIP score, GenEval, latency, the protocol record of every
score (report), the digits-FID feature net, toy-distribution metrics and sharded generation."""
from .frechet import feature_statistics, fid_from_features, frechet_distance
from .latency import images_per_second
from .toy import energy_distance, mode_coverage, sliced_wasserstein

_FEATURES_API = ("DigitsFeatureNet", "digits_fid", "load_digits_feature_net", "train_digits_feature_net")

__all__ = [
    *_FEATURES_API, "energy_distance", "feature_statistics", "fid_from_features", "frechet_distance",
    "images_per_second", "mode_coverage", "sliced_wasserstein",
]


def __getattr__(name: str):
    # Imported lazily so that `python -m onestep.evaluation.features` does not find the module
    # already imported by its package (runpy warns about that).
    if name in _FEATURES_API:
        from . import features

        return getattr(features, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
