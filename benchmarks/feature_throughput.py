"""Feature-extraction throughput of the FID feature networks on this machine.

    python benchmarks/feature_throughput.py [--threads 1] [--batch-size 500] [--repeats 5]
                                            [--inception-weights PATH] [--device cpu]

Rows: the digits-FID net (16x16 grey, the spine's protocol) on [-1, 1] tensors, the same net behind the
image interface of onestep.evaluation.fid (uint8 RGB in, grey + [-1, 1] conversion included), and,
the FID Inception on 299x299 inputs when its weights are available (the standard download location or
--inception-weights), else torchvision's Inception-v3 architecture with random weights (same cost).
Throughput = batch / median time of `repeats` timed batches after one
warm-up (device-synchronised). Prints a table, writes benchmarks/results/feature_throughput.json.
Target (issue 7): digits net >= 1,000 images/s on CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "feature_throughput.json"
TARGET = 1000.0


def main(argv=None) -> int:
    from onestep.evaluation.features import load_digits_feature_net
    from onestep.evaluation.fid import DigitsImageFeatures
    from onestep.evaluation.inception import InceptionWeightsError, load_inception
    from onestep.evaluation.latency import measure_latency
    from onestep.evaluation.report import library_versions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--inception-batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inception-weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev, b = args.device, args.batch_size
    g = torch.Generator().manual_seed(0)
    rows = []

    net = load_digits_feature_net(device=dev)
    grey = (torch.rand(b, 1, 16, 16, generator=g) * 2 - 1).to(dev)
    with torch.no_grad():
        rows.append({"network": "digits-cnn-128 ([-1, 1] tensors)", "input": "1x16x16",
                     **measure_latency(lambda: net.features(grey), b, warmup=1, repeats=args.repeats, device=dev)})
        image_net = DigitsImageFeatures(net)
        rgb = torch.randint(0, 256, (b, 3, 16, 16), generator=g, dtype=torch.uint8).to(dev)
        rows.append({"network": "digits-cnn-128 (uint8 RGB, image interface)", "input": "3x16x16",
                     **measure_latency(lambda: image_net(rgb), b, warmup=1, repeats=args.repeats, device=dev)})
        inception_note = None
        try:
            inc = load_inception("clean", args.inception_weights, device=dev, download=False)
            bi = args.inception_batch_size
            x = (torch.rand(bi, 3, 299, 299, generator=g) * 255).to(dev)
            rows.append({"network": inc.name, "input": "3x299x299",
                         **measure_latency(lambda: inc(x), bi, warmup=1, repeats=args.repeats, device=dev)})
        except InceptionWeightsError as e:
            # no FID weights here: time torchvision's Inception-v3 architecture with random weights
            # instead (the same convolutions, so the same cost), and say so
            import torchvision

            inception_note = f"FID Inception weights absent ({e}); row timed with random weights"
            arch = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval().to(dev)
            arch.fc = torch.nn.Identity()  # pool3 features, 2048-d
            bi = args.inception_batch_size
            x = torch.rand(bi, 3, 299, 299, generator=g).to(dev)
            rows.append({"network": "inception-v3 architecture, random weights (torchvision)", "input": "3x299x299",
                         **measure_latency(lambda: arch(x), bi, warmup=1, repeats=args.repeats, device=dev)})
    print("| network | input | batch | images/s | ms/image |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['network']} | {r['input']} | {r['batch_size']} | {r['images_per_s']:.0f} | "
              f"{r['ms_per_image']:.4f} |")
    if inception_note:
        print(inception_note)
    digits = rows[0]["images_per_s"]
    print(f"digits net: {digits:.0f} images/s (target >= {TARGET:.0f}: {'met' if digits >= TARGET else 'NOT met'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "target_images_per_s": TARGET, "target_met": digits >= TARGET,
                                    "inception_note": inception_note,
                                    "protocol": {"threads": args.threads, "device": dev, "repeats": args.repeats,
                                                 "machine": platform.processor() or platform.machine(),
                                                 "versions": library_versions()}}, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
