"""GenEval scoring rules driven by hand-made detections whose verdicts follow from GenEval's rules
(evaluate_images.py, summary_scores.py), the Mask2Former decoding on hand-made logits, the masked
crops and CLIP colour classifier against a hand computation, and the folder round trip."""
import json

import numpy as np
import pytest
import torch
from onestep.evaluation import geneval as G
from onestep.evaluation.geneval import Detection as D
from PIL import Image


def box(cx, cy, w=10, h=10):
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


# ----------------------------------------------------------------------------- relative position

@pytest.mark.parametrize("a,b,expected", [
    (box(10, 50, 20, 20), box(90, 50, 20, 20), {"left of"}),          # offset (-80, 0): dx = -0.95
    (box(90, 50, 20, 20), box(10, 50, 20, 20), {"right of"}),
    (box(50, 10), box(50, 90), {"above"}),                            # image y grows downwards
    (box(50, 90), box(50, 10), {"below"}),
    (box(0, 0, 2, 2), box(100, 100, 2, 2), {"left of", "above"}),     # diagonal: both components -0.70
    (box(20, 0, 2, 2), box(50, 100, 2, 2), {"above"}),                # dx = -29.6/104.4 = -0.28: not left
    ((0, 0, 20, 20), (2, 0, 22, 20), set()),                          # |offset| 2 < 0.1 * 40: nothing
    ((0, 0, 20, 20), (15, 0, 35, 20), {"left of"}),                   # (15 - 4) / 15 = 0.73 > 0.5
])
def test_relative_position(a, b, expected):
    assert G.relative_position(a, b) == expected


def test_position_threshold_matters():
    # offset 15, extents 40: shrunk by 0.1 * 40 = 4 -> 11/15 = 0.73 (left); by 0.3 * 40 = 12 -> 0.2 (none)
    assert G.relative_position((0, 0, 20, 20), (15, 0, 35, 20), threshold=0.3) == set()


def test_iou_uses_inclusive_pixels():
    assert G.box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert G.box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # 5x10 of 10x10 + 10x10 - 50


# ------------------------------------------------------------------------------ object selection

def test_selection_thresholds_order_and_cap():
    dets = {"clock": [D(box(10, 10), 0.95), D(box(30, 10), 0.85), D(box(50, 10), 0.92), D(box(70, 10), 0.3)]}
    single = G.select_objects(dets, "single_object")
    assert [d.score for d in single["clock"]] == [0.95, 0.92, 0.85]  # > 0.3 strictly, sorted
    counting = G.select_objects(dets, "counting")
    assert [d.score for d in counting["clock"]] == [0.95, 0.92]      # > 0.9 for counting
    many = {"kite": [D(box(5 * i, 5), 0.5 + i / 100) for i in range(20)]}
    assert len(G.select_objects(many, "single_object")["kite"]) == 16
    assert "clock" not in G.select_objects({"clock": [D(box(1, 1), 0.2)]}, "single_object")
    # NMS only when max_overlap < 1 (GenEval's default 1.0 keeps overlapping boxes)
    overlapping = {"cup": [D((0, 0, 10, 10), 0.9), D((1, 0, 11, 10), 0.8)]}
    assert len(G.select_objects(overlapping, "two_object")["cup"]) == 2
    assert len(G.select_objects(overlapping, "two_object", G.Options(nms_threshold=0.5))["cup"]) == 1


# ----------------------------------------------------------------------------------- verdicts

def verdict(dets, meta, colors=None):
    objects = G.select_objects(dets, meta["tag"])
    fake_colors = None if colors is None else (lambda image, found, name: [colors[id(d)] for d in found])
    return G.judge(None, objects, meta, fake_colors)[0]


def test_single_two_object_and_counting():
    bench = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
    assert verdict({"bench": [D(box(50, 50), 0.31)]}, bench)
    assert not verdict({"bench": [D(box(50, 50), 0.29)]}, bench)
    assert not verdict({"cow": [D(box(50, 50), 0.99)]}, bench)
    two = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert verdict({"cat": [D(box(20, 20), 0.8)], "dog": [D(box(60, 60), 0.5)]}, two)
    assert not verdict({"cat": [D(box(20, 20), 0.8)]}, two)
    count = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
             "exclude": [{"class": "clock", "count": 3}]}
    assert verdict({"clock": [D(box(10, 10), 0.95), D(box(30, 10), 0.92), D(box(50, 10), 0.85)]}, count)
    assert not verdict({"clock": [D(box(10, 10), 0.95), D(box(30, 10), 0.92), D(box(50, 10), 0.91)]}, count)  # 3
    assert not verdict({"clock": [D(box(10, 10), 0.95), D(box(30, 10), 0.6)]}, count)  # one counts at 0.9


def test_colors_and_attribute_binding():
    car_red, car_blue, bench_blue = D(box(20, 20), 0.9), D(box(40, 20), 0.5), D(box(70, 70), 0.8)
    colors = {id(car_red): "red", id(car_blue): "blue", id(bench_blue): "blue"}
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert verdict({"car": [car_red, car_blue]}, meta, colors)
    # only the most confident `count` objects are classified: the red car ranked second does not count
    assert not verdict({"car": [car_blue, D(box(1, 1), 0.4)]}, meta, {**colors, id(car_blue): "blue"})
    attr = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "bench", "count": 1, "color": "blue"}]}
    assert verdict({"car": [car_red], "bench": [bench_blue]}, attr, colors)
    swapped = {id(car_red): "blue", id(bench_blue): "red"}
    assert not verdict({"car": [car_red], "bench": [bench_blue]}, attr, swapped)


def test_position_task():
    # "a photo of a dog right of a cat": include[0] = cat (target), include[1] = dog with ("right of", 0)
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    cat, dog_right, dog_left = D(box(20, 50), 0.9), D(box(80, 50), 0.9), D(box(5, 50), 0.95)
    assert verdict({"cat": [cat], "dog": [dog_right]}, meta)
    assert not verdict({"cat": [cat], "dog": [dog_left]}, meta)
    # only the most confident dog is checked; a less confident one on the right does not save it
    assert not verdict({"cat": [cat], "dog": [dog_left, dog_right]}, meta)
    # no cat: the target group failed, so the position clause fails too
    assert not verdict({"dog": [dog_right]}, meta)
    # all target objects are compared: with count 2 cats, the dog must be right of both
    meta2 = {"tag": "position", "include": [{"class": "cat", "count": 2},
                                            {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    assert verdict({"cat": [cat, D(box(40, 50), 0.8)], "dog": [dog_right]}, meta2)
    assert not verdict({"cat": [cat, D(box(95, 50), 0.8)], "dog": [dog_right]}, meta2)


def test_summary_is_a_mean_over_tasks():
    rows = []
    for tag, verdicts in [("single_object", [1, 1, 1, 0]), ("counting", [0, 1]), ("position", [0, 0, 0, 1, 1, 0])]:
        for i, v in enumerate(verdicts):
            rows.append({"tag": tag, "correct": bool(v), "metadata": json.dumps({"tag": tag, "p": i // 2})})
    s = G.summarize(rows)
    assert s["tasks"] == {"single_object": 0.75, "counting": 0.5, "position": pytest.approx(2 / 6)}
    assert list(s["tasks"]) == ["single_object", "counting", "position"]  # order of first appearance
    assert s["overall"] == pytest.approx((0.75 + 0.5 + 2 / 6) / 3)
    assert s["correct_images"] == pytest.approx(6 / 12)
    # prompts (2 images each): single (1,1) (1,0) -> 2; counting (0,1) -> 1; position (0,0) (0,1) (1,0) -> 2
    assert s["correct_prompts"] == pytest.approx(5 / 6) and s["num_prompts"] == 6


# ------------------------------------------------------------------------- detector decoding

def test_decode_mask2former_on_hand_made_logits():
    names = G.CLASSES
    q, k = 3, len(names)
    cls = torch.full((q, k + 1), -20.0)
    cls[0, 15] = 10.0   # query 0: cat, p ~ 1
    cls[1, 16] = 10.0   # query 1: dog
    cls[1, 15] = 10.0   #          and equally cat: p = 0.5 each
    cls[2, k] = 10.0    # query 2: no object
    masks = torch.full((q, 8, 8), -10.0)
    masks[0, 1:3, 2:6] = 10.0
    masks[1, 4:8, 0:4] = 10.0
    dets = G.decode_mask2former(cls, masks, (8, 8), names, max_per_image=3)  # same size: no resampling
    assert dets["cat"][0].box == (2.0, 1.0, 6.0, 3.0)  # x2, y2 exclusive
    assert dets["cat"][0].score == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item(), abs=1e-4)
    assert dets["cat"][0].mask.sum() == 8
    up = G.decode_mask2former(cls, masks, (16, 16), names, max_per_image=3)  # upsampled to the image
    assert up["cat"][0].mask.shape == (16, 16) and up["cat"][0].box == pytest.approx((4, 2, 12, 6), abs=1)
    assert [d.score for d in dets["dog"]] == pytest.approx([0.5], abs=1e-3)
    assert sorted(d.score for d in dets["cat"]) == pytest.approx([0.5, 1.0], abs=1e-3)  # query 1 is both
    assert sum(len(v) for v in dets.values()) == 3  # top-3 (query, class) pairs


# ------------------------------------------------------------------------------------- colours

def test_masked_crop_paints_the_background_grey():
    img = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:15] = True
    crop = np.asarray(G.masked_crop(img, D((0, 0, 20, 12), 0.9, mask)))
    assert crop.shape == (12, 20, 3)
    assert (crop[5:10, 5:15] == 200).all() and (crop[0, 0] == 0x99).all()


def test_clip_colour_classifier_matches_hand_computation(tmp_path):
    from test_eval_clip_score import tiny_clip
    from transformers import CLIPModel, CLIPProcessor

    path = tiny_clip(tmp_path)
    clf = G.ClipColorClassifier(path)
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    dets = [D((0, 0, 20, 20), 0.9), D((10, 10, 40, 40), 0.8)]
    ours = clf(img, dets, "car")
    model, proc = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    vec = lambda out: out if isinstance(out, torch.Tensor) else out.pooler_output
    with torch.no_grad():
        text = []
        for c in G.COLORS:
            embs = []
            for t in ("a photo of a {} car", "a photo of a {}-colored car", "a photo of a {} object"):
                tok = proc(text=[t.format(c)], return_tensors="pt")
                e = vec(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))[0]
                embs.append(e / e.norm())
            m = torch.stack(embs).mean(0)
            text.append(m / m.norm())
        expected = []
        for d in dets:
            pix = proc(images=[img.crop(d.box)], return_tensors="pt")["pixel_values"]
            f = vec(model.get_image_features(pixel_values=pix))[0]
            expected.append(G.COLORS[int(torch.argmax(torch.stack(text) @ (f / f.norm())))])
    assert ours == expected


# ---------------------------------------------------------------------------- folder round trip

class ColourBlobDetector:
    """Finds pure red / blue squares and calls them cats / dogs (boxes from the blobs)."""

    def detect(self, image):
        a = np.asarray(image).astype(int)
        out = {}
        for name, ch in (("cat", 0), ("dog", 2)):
            m = (a[..., ch] > 200) & (a.sum(-1) < 300)
            if m.any():
                out[name] = [D(G.box_from_mask(m), 0.95, m)]
        return out


def test_generate_and_evaluate_folder(tmp_path):
    meta_path = tmp_path / "evaluation_metadata.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "position", "include": [{"class": "dog", "count": 1},
                                            {"class": "cat", "count": 1, "position": ["left of", 0]}],
             "prompt": "a photo of a cat left of a dog"}]
    meta_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    metadata = G.read_metadata(meta_path)
    calls = []

    def sample(prompts, seed):  # a red square on the left, a blue one on the right, the second sample wrong
        calls.append(seed)
        imgs = np.zeros((len(prompts), 32, 32, 3), np.uint8)
        imgs[:, 10:20, 2:10, 0] = 255
        imgs[:, 10:20, 22:30, 2] = 255
        imgs[1] = imgs[1, :, ::-1]
        return imgs

    out = G.generate_images(sample, metadata, tmp_path / "images", images_per_prompt=2, progress=False)
    assert (out / "00001" / "samples" / "0001.png").is_file() and (out / "00000" / "grid.png").is_file()
    G.generate_images(sample, metadata, out, images_per_prompt=2, progress=False)
    assert calls == [0, 1]  # resumed: nothing regenerated
    results = G.evaluate_folder(out, ColourBlobDetector(), None, progress=False)
    assert [r["correct"] for r in results] == [True, True, True, False]
    s = G.summarize(results)
    assert s["tasks"] == {"single_object": 1.0, "position": 0.5} and s["overall"] == 0.75


def test_metadata_errors(tmp_path, monkeypatch):
    with pytest.raises(G.GenEvalError, match="not found"):
        G.read_metadata(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "single_object", "include": [{"class": "unicorn", "count": 1}], "prompt": "x"}\n')
    with pytest.raises(G.GenEvalError, match="line 1"):
        G.read_metadata(bad)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(G.GenEvalError, match="--metadata"):
        G.read_metadata(None)


def tiny_mask2former(folder):
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, num_labels=80, num_queries=8, hidden_dim=32, mask_feature_size=32,
                            feature_size=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            encoder_feedforward_dim=32, dim_feedforward=32,
                            id2label={i: n for i, n in enumerate(G.CLASSES)},
                            label2id={n: i for i, n in enumerate(G.CLASSES)})
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32).save_pretrained(folder)
    return folder


def test_mask2former_detector_from_a_local_tiny_model(tmp_path):
    det = G.Mask2FormerDetector(tiny_mask2former(tmp_path / "m2f"), input_size=(64, 96))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    out = det.detect(img)
    flat = [d for v in out.values() for d in v]
    assert len(flat) == min(100, 8 * 80) and set(out) <= set(G.CLASSES)
    for d in flat[:20]:
        assert d.mask.shape == (50, 70) and 0 <= d.score <= 1
        assert d.box == G.box_from_mask(d.mask)
    with pytest.raises(G.GenEvalError, match="--detector"):
        G.Mask2FormerDetector(tmp_path / "missing", local_files_only=True)
