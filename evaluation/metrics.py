"""The metric registry: names that `onestep list` prints and reports use, mapped to their functions."""
from __future__ import annotations

from onestep.registry import METRICS


def _lazy(module: str, attr: str):
    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__name__ = attr
    call.__doc__ = f"{module}.{attr}"
    return call


METRICS.register("digits_fid")(_lazy("onestep.evaluation.features", "digits_fid"))
METRICS.register("frechet_distance")(_lazy("onestep.evaluation.frechet", "frechet_distance"))
METRICS.register("sliced_wasserstein")(_lazy("onestep.evaluation.toy", "sliced_wasserstein"))
METRICS.register("energy_distance")(_lazy("onestep.evaluation.toy", "energy_distance"))
METRICS.register("mode_coverage")(_lazy("onestep.evaluation.toy", "mode_coverage"))
METRICS.register("images_per_second")(_lazy("onestep.evaluation.latency", "images_per_second"))
METRICS.register("fid")(_lazy("onestep.evaluation.fid", "compute_fid"))
METRICS.register("precision_recall")(_lazy("onestep.evaluation.precision_recall", "precision_recall"))
METRICS.register("density_coverage")(_lazy("onestep.evaluation.precision_recall", "density_coverage"))
METRICS.register("clip_score")(_lazy("onestep.evaluation.clip_score", "clip_score"))
METRICS.register("geneval")(_lazy("onestep.evaluation.geneval", "summarize"))
METRICS.register("latency")(_lazy("onestep.evaluation.latency", "measure_latency"))
