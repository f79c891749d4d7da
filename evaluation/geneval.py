"""GenEval (Ghosh et al. 2023): object-focused text-to-image alignment, without mmdet.

The scoring follows GenEval's `evaluation/evaluate_images.py` and `evaluation/summary_scores.py`:

* detections per class: score > 0.3 (0.9 for the `counting` task), sorted by score, at most 16 per
  class, then greedy NMS at IoU 1.0, which keeps everything (GenEval's default `max_overlap`);
* a prompt's `include` clauses must all hold (AND): at least `count` objects of the class; with
  `color`, CLIP must call at least `count` of the `count` most confident ones that colour; with
  `position` (relation, target clause), every one of them must stand in that relation to every
  object matched by the target clause (`relative_position`, threshold 0.1); `exclude` clauses fail
  the image if `count` or more of the class are detected (OR);
* colours: CLIP zero-shot over 10 colours with three templates per colour on the object's crop,
  its mask composited over a #999 grey background;
* summary: per task, the fraction of correct images; overall, the mean of the task scores.

Detector: Mask2Former through transformers (`Mask2FormerForUniversalSegmentation`, default
`facebook/mask2former-swin-small-coco-instance`, the Swin-S COCO-instance model GenEval runs in mmdet)
or mmdet itself (optional). Deviations from GenEval: the detector weights are the transformers port,
its preprocessing is the port's image processor at mmdet's test scale (shortest edge 800, longest
1333; mmdet's own normalisation and padding may differ in detail), and CLIP is the
transformers ViT-L/14 (`openai/clip-vit-large-patch14`) instead of open_clip's identical weights.
"""
from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from onestep.errors import InputError

METADATA_URL = "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/evaluation_metadata.jsonl"
DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
#: GenEval's class names, in COCO's category order (the detector's label index i is name i)
CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


@dataclass
class Options:
    """GenEval's `--options` and their defaults."""
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    nms_threshold: float = 1.0
    position_threshold: float = 0.1
    bgcolor: str = "#999"
    crop: bool = True


@dataclass
class Detection:
    """One detected object: box (x1, y1, x2, y2) in pixels, confidence, optional boolean mask [H, W]."""
    box: tuple
    score: float
    mask: np.ndarray | None = field(default=None, repr=False)


class GenEvalError(InputError):
    """Bad GenEval input (metadata, folders, weights); one line."""


# ------------------------------------------------------------------------------------ metadata

def read_metadata(source: str | Path | None = None, download: bool | None = None) -> list[dict]:
    """GenEval's `evaluation_metadata.jsonl`: a local path, or None/URL for the file in GenEval's
    repository (downloaded unless offline)."""
    from .inception import offline

    source = METADATA_URL if source is None else source
    if str(source).startswith(("http://", "https://")):
        if (offline() if download is None else not download):
            raise GenEvalError(f"GenEval metadata not available offline; download {source} and pass --metadata PATH")
        try:
            with urllib.request.urlopen(str(source), timeout=60) as r:
                text = r.read().decode()
        except Exception as e:
            raise GenEvalError(f"cannot download GenEval metadata {source} ({type(e).__name__}); "
                               f"pass --metadata PATH to a local evaluation_metadata.jsonl") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise GenEvalError(f"GenEval metadata not found: {path} (--metadata)")
        text = path.read_text()
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row["prompt"], str) or not isinstance(row["tag"], str):
                raise TypeError("prompt/tag")
            for req in row.get("include", []) + row.get("exclude", []):
                if req["class"] not in CLASSES or int(req["count"]) < 1:
                    raise ValueError(f"class {req['class']!r} / count {req['count']!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise GenEvalError(f"{source}, line {i + 1}: not a GenEval metadata row "
                               f"({type(e).__name__}: {e})") from None
        rows.append(row)
    if not rows:
        raise GenEvalError(f"{source} holds no metadata rows")
    return rows


# ------------------------------------------------------------------------------- scoring rules

def box_iou(a, b) -> float:
    """IoU with GenEval's inclusive-pixel convention (+1 on widths and heights)."""
    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def relative_position(box_a, box_b, threshold: float = 0.1) -> set[str]:
    """Where A is relative to B: the centre offset, shrunk on each axis by `threshold` times the two
    boxes' summed extent, as a direction; a component beyond +-0.5 of the unshrunk offset's length
    names the relation. Empty when the shrunk offset vanishes (overlapping, near-concentric)."""
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    extent = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    shrunk = np.maximum(np.abs(offset) - threshold * extent, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:  # image y grows downwards
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def select_objects(detections: dict[str, list[Detection]], tag: str, options: Options = Options()) -> dict:
    """Per class: above the task's threshold, most confident first, at most `max_objects`, greedy NMS."""
    threshold = options.counting_threshold if tag == "counting" else options.threshold
    kept = {}
    for name, dets in detections.items():
        order = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[:options.max_objects]
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            if options.nms_threshold != 1:
                order = [d for d in order if box_iou(best.box, d.box) < options.nms_threshold]
        if chosen:
            kept[name] = chosen
    return kept


ColorFn = Callable[[object, list, str], list]


def judge(image, objects: dict[str, list[Detection]], metadata: dict, classify_colors: ColorFn | None = None,
          options: Options = Options()) -> tuple[bool, str]:
    """GenEval's verdict on one image from its selected objects: (correct, reasons joined by newlines)."""
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = objects.get(name, [])[:count]
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                if classify_colors is None:
                    raise GenEvalError("a colour clause needs a colour classifier")
                colors = list(classify_colors(image, found, name))
                if colors.count(req["color"]) < count:
                    ok = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {name}>={count}, found {colors.count(req['color'])} "
                                   f"{req['color']}; and {seen}")
            if "position" in req and ok:
                relation, target = req["position"]
                if groups[target] is None:
                    ok = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        for other in groups[target]:
                            actual = relative_position(obj.box, other.box, options.position_threshold)
                            if relation not in actual:
                                ok = False
                                reasons.append(f"expected {name} {relation} target, "
                                               f"found {' and '.join(sorted(actual))} target")
                                break
                        if not ok:
                            break
        correct = correct and ok
        groups.append(found if ok else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], int(req["count"])
        if len(objects.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
    return correct, "\n".join(reasons)


def summarize(results: Sequence[dict]) -> dict:
    """summary_scores.py: per-task accuracy over images (tasks in order of first appearance), the
    overall score (mean over tasks), % correct images, % correct prompts (any image correct)."""
    if not results:
        raise GenEvalError("no GenEval results to summarise")
    by_task: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for r in results:
        by_task.setdefault(r["tag"], []).append(bool(r["correct"]))
        key = r["metadata"] if isinstance(r["metadata"], str) else json.dumps(r["metadata"])
        by_prompt.setdefault(key, []).append(bool(r["correct"]))
    tasks = {t: float(np.mean(v)) for t, v in by_task.items()}
    return {"overall": float(np.mean(list(tasks.values()))), "tasks": tasks,
            "task_counts": {t: [int(sum(v)), len(v)] for t, v in by_task.items()},
            "correct_images": float(np.mean([bool(r["correct"]) for r in results])),
            "correct_prompts": float(np.mean([any(v) for v in by_prompt.values()])),
            "num_images": len(results), "num_prompts": len(by_prompt)}


# --------------------------------------------------------------------------------- detectors

def box_from_mask(mask: np.ndarray) -> tuple:
    """Tight box (x1, y1, x2, y2) of a boolean mask, x2/y2 exclusive (as mmdet's mask2bbox)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def decode_mask2former(class_logits: torch.Tensor, mask_logits: torch.Tensor, image_size: tuple[int, int],
                       class_names: Sequence[str], max_per_image: int = 100) -> dict[str, list[Detection]]:
    """Instance detections of one image from Mask2Former's raw outputs, as mmdet's Mask2Former
    does: the top `max_per_image` (query, class) pairs by class probability (softmax without the
    no-object column), masks upsampled bilinearly to the image and thresholded at logit 0, score =
    class probability x mean mask probability inside the mask, box from the mask.
    class_logits [Q, K+1], mask_logits [Q, h, w], image_size (H, W)."""
    probs = class_logits.float().softmax(-1)[:, :-1]
    q, k = probs.shape
    scores, flat = probs.flatten().topk(min(max_per_image, q * k))
    query, label = flat // k, flat % k
    masks = torch.nn.functional.interpolate(mask_logits[query][None].float(), size=tuple(image_size),
                                            mode="bilinear", align_corners=False)[0]
    binary = masks > 0
    mask_score = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    final = scores * mask_score
    out: dict[str, list[Detection]] = {}
    for i in range(len(final)):
        m = binary[i].cpu().numpy()
        out.setdefault(class_names[int(label[i])], []).append(Detection(box_from_mask(m), float(final[i]), m))
    return out


class Mask2FormerDetector:
    """Mask2Former (transformers) for GenEval: `detect(image) -> {class name: [Detection]}`."""

    def __init__(self, model: str = DEFAULT_DETECTOR, device="cpu", local_files_only: bool | None = None,
                 input_size: tuple[int, int] | None = (800, 1333)):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        from .inception import offline

        local = offline() if local_files_only is None else local_files_only
        try:
            self.processor = AutoImageProcessor.from_pretrained(model, local_files_only=local)
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(model, local_files_only=local)
        except (OSError, ValueError) as e:
            raise GenEvalError(f"cannot load the Mask2Former detector {model!r} ({type(e).__name__}); pass "
                               f"--detector PATH to a local copy (save_pretrained folder)") from None
        self.model.eval().requires_grad_(False).to(device)
        # (shortest, longest) edge of the resized input: GenEval's mmdet test pipeline (and Detectron2's)
        # use 800 / 1333; None keeps the image processor's own setting
        self.size = None if input_size is None else {"shortest_edge": int(input_size[0]),
                                                     "longest_edge": int(input_size[1])}
        self.device, self.name = device, str(model)
        labels = self.model.config.id2label
        if len(labels) != len(CLASSES):
            raise GenEvalError(f"detector {model!r} has {len(labels)} classes; GenEval needs the 80 COCO classes")
        self.class_names = CLASSES  # COCO order; the port's label names differ only in spelling

    @torch.no_grad()
    def detect(self, image) -> dict[str, list[Detection]]:
        extra = {} if self.size is None else {"size": self.size}
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt", **extra).to(self.device)
        out = self.model(**inputs)
        # mask logits cover the padded, resized input at 1/4 resolution: back to the input size, drop
        # the padding (pixel_mask), then decode at the image's own size
        h, w = inputs["pixel_values"].shape[-2:]
        logits = torch.nn.functional.interpolate(out.masks_queries_logits, size=(h, w), mode="bilinear",
                                                 align_corners=False)[0]
        if "pixel_mask" in inputs:
            valid = inputs["pixel_mask"][0].bool()
            logits = logits[:, : int(valid.any(1).sum()), : int(valid.any(0).sum())]
        return decode_mask2former(out.class_queries_logits[0], logits, (image.height, image.width),
                                  self.class_names)


class MMDetDetector:
    """GenEval's own detector through mmdet 2.x (optional; `pip install mmdet==2.27.0` with mmcv)."""

    def __init__(self, config: str, checkpoint: str, device="cuda"):
        try:
            from mmdet.apis import inference_detector, init_detector
        except ImportError:
            raise GenEvalError("the mmdet backend needs mmdet 2.x and mmcv-full; use --detector-backend "
                               "transformers (the default) otherwise") from None
        self._infer = inference_detector
        self.model = init_detector(config, checkpoint, device=device)
        self.name = f"mmdet:{Path(checkpoint).name}"

    def detect(self, image) -> dict[str, list[Detection]]:
        result = self._infer(self.model, np.asarray(image.convert("RGB"))[..., ::-1])  # mmdet wants BGR
        bbox, segm = (result if isinstance(result, tuple) else (result, None))[:2]
        out = {}
        for i, name in enumerate(CLASSES):
            dets = [Detection(tuple(map(float, b[:4])), float(b[4]), None if segm is None else np.asarray(segm[i][j]))
                    for j, b in enumerate(bbox[i])]
            if dets:
                out[name] = dets
        return out


# --------------------------------------------------------------------------------- colours

def masked_crop(image, det: Detection, options: Options = Options()):
    """The object as GenEval shows it to CLIP: outside the mask the background colour, cropped to the box."""
    from PIL import Image

    image = image.convert("RGB")
    if det.mask is not None:
        if tuple(det.mask.shape) != (image.height, image.width):
            raise GenEvalError(f"mask shape {det.mask.shape} does not match the image {(image.height, image.width)}")
        blank = image.copy() if options.bgcolor == "original" else Image.new("RGB", image.size, options.bgcolor)
        image = Image.composite(image, blank, Image.fromarray(det.mask.astype(np.uint8) * 255))
    return image.crop(tuple(det.box[:4])) if options.crop else image


class ClipColorClassifier:
    """CLIP zero-shot colour of masked crops; callable as `(image, detections, class name) -> colours`."""

    def __init__(self, model="openai/clip-vit-large-patch14", processor=None, device="cpu",
                 options: Options = Options(), local_files_only: bool | None = None):
        from .clip_score import load_clip

        if isinstance(model, (str, Path)):
            model, processor = load_clip(model, local_files_only)
        self.model, self.processor = model.eval().requires_grad_(False).to(device), processor
        self.device, self.options, self._text = device, options, {}

    @torch.no_grad()
    def text_classifier(self, classname: str) -> torch.Tensor:
        """[D, 10]: per colour, the normalised mean of the normalised template embeddings."""
        if classname not in self._text:
            cols = []
            for c in COLORS:
                texts = [t.format(c=c, obj=classname) for t in COLOR_TEMPLATES]
                tok = self.processor(text=texts, return_tensors="pt", padding=True).to(self.device)
                emb = _features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                             attention_mask=tok["attention_mask"]))
                emb = torch.nn.functional.normalize(emb.float(), dim=-1).mean(0)
                cols.append(torch.nn.functional.normalize(emb, dim=0))
            self._text[classname] = torch.stack(cols, dim=1)
        return self._text[classname]

    @torch.no_grad()
    def __call__(self, image, detections: list[Detection], classname: str) -> list[str]:
        crops = [masked_crop(image, d, self.options) for d in detections]
        pix = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        img = torch.nn.functional.normalize(_features(self.model.get_image_features(pixel_values=pix)).float(), dim=-1)
        logits = 100.0 * img @ self.text_classifier(classname)
        return [COLORS[i] for i in logits.argmax(dim=1).tolist()]


def _features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features (projection in `pooler_output`)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ------------------------------------------------------------------------ generate and evaluate

def prompt_folder(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"{index:05d}"


def generate_images(sample_fn: Callable[[list[str], int], object], metadata: list[dict], out_dir,
                    images_per_prompt: int = 4, seed: int = 0, progress: bool = True) -> Path:
    """GenEval's folder layout: `<out>/<NNNNN>/metadata.jsonl`, `samples/<iiii>.png`, `grid.png`.
    `sample_fn(prompts, seed) -> images` (float [-1, 1] [B, C, H, W] or uint8 [B, H, W, 3]); prompt n
    uses seed `seed + n`. Prompts whose samples are all there are skipped (resume)."""
    from PIL import Image

    from .fid import to_uint8_images
    from .report import save_grid

    out_dir = Path(out_dir)
    indices = range(len(metadata))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="GenEval generation", unit="prompt")
    for n in indices:
        folder = prompt_folder(out_dir, n)
        samples = folder / "samples"
        if all((samples / f"{i:04d}.png").is_file() for i in range(images_per_prompt)):
            continue
        samples.mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(metadata[n]) + "\n")
        images = to_uint8_images(sample_fn([metadata[n]["prompt"]] * images_per_prompt, seed + n))
        for i, img in enumerate(images):
            tmp = samples / f"{i:04d}.tmp.png"
            Image.fromarray(img).save(tmp)
            tmp.replace(samples / f"{i:04d}.png")
        save_grid(images, folder / "grid.png")
    return out_dir


def evaluate_folder(image_dir, detector, classify_colors: ColorFn, options: Options = Options(),
                    progress: bool = True) -> list[dict]:
    """One result row per image (GenEval's results.jsonl fields) for a GenEval image folder."""
    from PIL import Image, ImageOps

    image_dir = Path(image_dir)
    folders = sorted(p for p in image_dir.iterdir() if p.is_dir() and p.name.isdigit()) if image_dir.is_dir() else []
    if not folders:
        raise GenEvalError(f"no GenEval prompt folders (00000/, 00001/, ...) in {image_dir}")
    if progress:
        from tqdm.auto import tqdm

        folders = tqdm(folders, desc="GenEval scoring", unit="prompt")
    results = []
    for folder in folders:
        metadata = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        for path in sorted((folder / "samples").glob("[0-9]*.png")):
            if not path.stem.isdigit():
                continue
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            objects = select_objects(detector.detect(image), metadata["tag"], options)
            correct, reason = judge(image, objects, metadata, classify_colors, options)
            results.append({"filename": str(path), "tag": metadata["tag"], "prompt": metadata["prompt"],
                            "correct": correct, "reason": reason, "metadata": json.dumps(metadata),
                            "details": json.dumps({k: [list(d.box) + [d.score] for d in v]
                                                   for k, v in objects.items()})})
    return results
