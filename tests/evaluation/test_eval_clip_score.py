"""CLIP score through torchmetrics with a tiny CLIP built from a config and a local tokenizer,
against a hand computation of 100 * cos; loading by local path and the offline error.

torchmetrics clamps the mean, max(mean_i 100 cos_i, 0), where Hessel et al. clamp each image,
mean_i max(100 cos_i, 0); the two agree whenever no cosine is negative (always, for trained CLIPs)."""
import numpy as np
import pytest
import torch
from tiny_models import clip_tokenizer


def tiny_clip(folder, seed=0):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = clip_tokenizer(folder / "tok")
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(folder / "clip")
    proc.save_pretrained(folder / "clip")
    return folder / "clip"


def _vec(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def hand_clip_score(model, proc, images_u8, prompts):
    scores = []
    for img, prompt in zip(images_u8, prompts):
        pix = proc(images=[img], return_tensors="pt")["pixel_values"]
        tok = proc(text=[prompt], return_tensors="pt")
        a = _vec(model.get_image_features(pixel_values=pix))[0]
        b = _vec(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))[0]
        scores.append(100 * float(torch.dot(a, b) / (a.norm() * b.norm())))
    return max(float(np.mean(scores)), 0.0), scores


def test_clip_score_equals_hand_computation(tmp_path):
    from onestep.evaluation.clip_score import clip_score
    from transformers import CLIPModel, CLIPProcessor

    path = tiny_clip(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    prompts = ["a cat", "the dog", "a red cat", "two dogs", "the cat", "a blue car"]
    ours = clip_score(images, prompts, model=path, batch_size=4)
    model, proc = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    expected, per_image = hand_clip_score(model, proc, list(torch.from_numpy(images).permute(0, 3, 1, 2)), prompts)
    assert any(s > 0 for s in per_image)
    assert ours["clip_score"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert ours["num_images"] == 6


def test_missing_clip_model_is_one_line(tmp_path, monkeypatch):
    from onestep.evaluation.clip_score import ClipModelError, load_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipModelError) as e:
        load_clip("someone/not-a-cached-clip")
    assert "\n" not in str(e.value) and "--clip-model" in str(e.value)
