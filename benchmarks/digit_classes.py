"""Which digits a model draws: the class shares of its samples under the digits classifier (mode coverage on digits).

    python benchmarks/digit_classes.py RUN [RUN ...] [--seeds 5] [--steps 1]
        [--out benchmarks/results/digit_classes.json]

`gmm_modes.py` counts the modes a one-step student covers on the 2-D mixture; this is the same question on the
digits teacher. Each run's EMA student (its last checkpoint) and its teacher at 50 Euler steps sample the demo
protocol's noise (540 images per noise seed, seeds eval.seed, eval.seed + 1, ...); the digits-FID feature net,
which is a classifier of the ten digits (evaluation/features.py), labels every sample. Per model: the share of
each digit over all seeds, the total-variation distance of those shares to the training split's label shares
(0: the same mix of digits; a dropped digit adds half its share), the smallest share, the mean top-class
probability (how unambiguous the samples are) and, per seed, the digits-FID. The held-out real digits, labelled by
the same classifier, give the floor (540 images: their own sampling noise). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "digit_classes.json"


def label_shares(labels, classes: int = 10):
    """Share of each class among integer `labels`, as float64."""
    import torch

    return torch.bincount(labels, minlength=classes).double() / len(labels)


def total_variation(p, q) -> float:
    return round(0.5 * (p - q).abs().sum().item(), 4)


def class_summary(probs, train_shares) -> dict:
    """Shares, TV distance to `train_shares`, smallest share and mean top probability of classifier `probs` [N, 10]."""
    shares = label_shares(probs.argmax(1), probs.shape[1])
    return {"n": len(probs), "class_share": [round(s, 4) for s in shares.tolist()],
            "tv_to_train": total_variation(shares, train_shares),
            "min_share": round(shares.min().item(), 4),
            "mean_top_prob": round(probs.max(1).values.mean().item(), 4)}


def classify(net, images):
    import torch

    net.eval()
    with torch.no_grad():
        return torch.cat([net(images[s:s + 500].float()).softmax(1) for s in range(0, len(images), 500)]).double()


def main() -> None:
    import torch
    from onestep.evaluation.features import load_digits_feature_net

    from onestep.data import load_digits
    from onestep.demo import evaluate_digits_seeds, reference_teacher
    from onestep.export import ExportError
    from onestep.runs import load_run, load_student

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1, help="student steps")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    try:
        loaded = [(info, *load_student(info)) for info in map(load_run, args.runs)]
    except ExportError as e:
        ap.error(str(e))

    net = load_digits_feature_net()
    train_shares = label_shares(load_digits("train").labels)
    heldout = load_digits("heldout")
    rows = [{"model": "held-out real digits", "steps": 0, **class_summary(classify(net, heldout.images), train_shares),
             "label_tv_to_train": total_variation(label_shares(heldout.labels), train_shares)}]
    teachers_done = set()
    for info, student, teacher in loaded:
        teacher = reference_teacher(teacher)
        teacher_key = str(info.cfg.teacher)   # score each distinct teacher once
        with_teacher = teacher_key not in teachers_done
        teachers_done.add(teacher_key)
        cfg = replace(info.cfg, eval=replace(info.cfg.eval, teacher_steps=[50] if with_teacher else [],
                                             student_steps=[args.steps]))
        results = evaluate_digits_seeds(teacher, student, cfg, "cpu", args.seeds)
        models = ([("teacher", 50)] if with_teacher else []) + [("student", args.steps)]
        for model, steps in models:
            images = torch.cat([res["samples"][(model, steps)] for res in results])
            fids = [next(r["digits_fid"] for r in res["rows"] if (r["model"], r["steps"]) == (model, steps))
                    for res in results]
            name = (f"{info.run_dir.name} ({info.checkpoint.name})" if model == "student"
                    else f"teacher of {info.run_dir.name}")
            rows.append({"model": name, "steps": steps, **class_summary(classify(net, images), train_shares),
                         "noise_seeds": [res["protocol"]["noise_seed"] for res in results], "digits_fid_seeds": fids})

    print("| model | steps | TV to the training mix | smallest digit share | mean top prob | shares of 0-9 (%) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        shares = " ".join(f"{100 * s:.1f}" for s in r["class_share"])
        print(f"| {r['model']} | {r['steps']} | {r['tv_to_train']:.3f} | {r['min_share']:.3f} | "
              f"{r['mean_top_prob']:.3f} | {shares} |")
    out = {"train_label_share": [round(s, 4) for s in train_shares.tolist()], "rows": rows,
           "protocol": {"seeds": args.seeds, "images_per_seed": rows[-1]["n"] // args.seeds,
                        "classifier": "digits-FID feature net (its argmax)"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
