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
METRICS.register("frechet_distance")(_lazy("onestep.evaluation.fid", "frechet_distance"))
METRICS.register("sliced_wasserstein")(_lazy("onestep.evaluation.toy", "sliced_wasserstein"))
METRICS.register("energy_distance")(_lazy("onestep.evaluation.toy", "energy_distance"))
METRICS.register("mode_coverage")(_lazy("onestep.evaluation.toy", "mode_coverage"))
METRICS.register("images_per_second")(_lazy("onestep.evaluation.latency", "images_per_second"))
