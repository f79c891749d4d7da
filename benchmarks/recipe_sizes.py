"""Full-size parameter counts of every real recipe, as `onestep distill --config X --dry-run` prints them.

    python benchmarks/recipe_sizes.py

Each recipe is built tiny once (which counts the objective's teacher-copied networks) and its published
architecture on the meta device (nothing downloaded, no memory); writes benchmarks/results/recipe_sizes.json,
one row per recipe. The docs' table of parameter counts is rendered from it.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "recipe_sizes.json"
RECIPES = ("cifar10_splitmeanflow", "imagenet64_smd", "sd15_splitmeanflow", "sd15_fdistill", "sdxl_fdistill",
           "sd3_splitmeanflow", "flux_splitmeanflow", "sana_splitmeanflow")


def sizes(recipe: str) -> dict:
    from onestep.config import load_config
    from onestep.dryrun import _quiet, full_size_estimate, tiny_run

    cfg = load_config(recipe)
    with _quiet(), tempfile.TemporaryDirectory(prefix="onestep-sizes-") as tmp:
        copies = tiny_run(cfg, Path(tmp))["aux_copies"]
    est = full_size_estimate(cfg, copies)
    return {"recipe": recipe, "teacher_params": est.teacher_params, "student_trainable": est.student_trainable,
            "student_total": est.student_total, "copies": copies, "copies_trainable": est.aux_trainable,
            "copies_total": est.aux_total, "source": est.source}


def main(argv: list[str] | None = None) -> int:
    recipes = (argv if argv else None) or list(RECIPES)
    rows = []
    for recipe in recipes:
        start = time.perf_counter()
        rows.append(sizes(recipe))
        print(f"{recipe}: {time.perf_counter() - start:.1f} s", flush=True)
    RESULTS.write_text(json.dumps({"command": "python benchmarks/recipe_sizes.py", "date": time.strftime("%Y-%m-%d"),
                                   "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
