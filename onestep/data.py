"""Data that ships inside installed packages: scikit-learn's handwritten digits and Gaussian mixtures.

Digits: 1797 grey 8x8 images (values 0..16). We upsample them to 16x16 (bilinear), scale to [-1, 1]
and split them once, stratified by class with a fixed seed, into a training split (teachers and
students learn from it; it is also the FID reference) and a held-out split (the `real` row of every
report: how far real, unseen digits are from the reference under the same protocol).

Files from the user: `load_image_folder` (an image folder, e.g. an FID reference set) and
`load_prompts` (a prompts file for text-to-image); what is wrong with them is a one-line DataError.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from onestep.errors import DataError

DIGITS_SIZE = 16
DIGITS_HELDOUT_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0


@dataclass
class ImageSplit:
    images: torch.Tensor  # [N, 1, 16, 16] float32 in [-1, 1]
    labels: torch.Tensor  # [N] int64


def _digits_to_tensor(raw: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(raw.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


def load_digits(split: str = "train", size: int = DIGITS_SIZE) -> ImageSplit:
    """`split` is "train", "heldout" or "all"."""
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"digits split must be 'train', 'heldout' or 'all', got {split!r}")
    d = _sk_load_digits()
    idx = np.arange(len(d.target))
    if split != "all":
        train_idx, heldout_idx = train_test_split(
            idx, test_size=DIGITS_HELDOUT_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=d.target
        )
        idx = np.sort(train_idx if split == "train" else heldout_idx)
    return ImageSplit(_digits_to_tensor(d.images[idx], size), torch.from_numpy(d.target[idx]).long())


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255] (for PNG grids and image folders)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# Every data source draws the randomness of the *global* batch (`size` = processes x per-process batch) from
# the trainer's generator, seeded alike on every process, and then does the work (reading, encoding, teacher
# sampling) only for this process's rows `part`: N processes with batch B see exactly the batch one process
# with N x B sees, and each does 1/N of the work.


def _rows(size: int, part: slice | None) -> slice:
    return slice(0, size) if part is None else part


class TensorData:
    """An in-memory dataset; batches are drawn with replacement from the trainer's generator."""

    def __init__(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        self.x, self.cond = x, cond

    def batch(self, size: int, generator: torch.Generator, device=None, part: slice | None = None) -> dict:
        idx = torch.randint(len(self.x), (size,), generator=generator)[_rows(size, part)]
        return {"x": self.x[idx].to(device), "cond": None if self.cond is None else self.cond[idx].to(device)}

    def sample_conditions(self, n: int):
        return None if self.cond is None else self.cond[torch.arange(n) % len(self.cond)]


class MixtureData:
    """Fresh samples from a Gaussian mixture each batch (unconditional)."""

    def __init__(self, mixture):
        self.mixture = mixture

    def batch(self, size: int, generator: torch.Generator, device=None, part: slice | None = None) -> dict:
        x, _ = self.mixture.sample(size, generator)  # cheap: drawn whole, so the stream is the global batch's
        return {"x": x[_rows(size, part)].to(device), "cond": None}

    def sample_conditions(self, n: int):
        return None


# ------------------------------------------------------------------------------------------------
# files from the user: image folders (e.g. FID reference sets) and prompt files (text-to-image)


#: the PIL modes `load_image_folder` converts to (grey or colour; alpha is dropped)
IMAGE_MODES = {"L": 1, "RGB": 3}


def _image_size(size) -> tuple[int, int] | None:
    """`size` as (height, width): None, an int (square) or a (height, width) pair of ints >= 1."""
    if size is None:
        return None
    is_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    hw = (size, size) if is_count(size) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(hw) != 2 or not all(is_count(v) for v in hw):
        raise DataError(f"image size must be an int >= 1 or a (height, width) pair of them, got {size!r}")
    return hw


def load_image_folder(path, size=None, mode: str = "L") -> torch.Tensor:
    """Every image in a folder as a uint8 tensor [N, C, H, W] (C = 1 for mode "L", 3 for "RGB").

    Files are read in sorted name order; hidden files (".DS_Store") and subfolders are not read. Every
    other file must be an image PIL can decode completely: a non-image, truncated or otherwise
    unreadable file is a DataError naming it (a reference set silently missing images would shift
    every score computed against it). Images of different sizes are an error naming two of them,
    unless `size` (an int or (height, width)) is given: then each is resized to it (bicubic).
    """
    from PIL import Image, UnidentifiedImageError

    if mode not in IMAGE_MODES:
        raise DataError(f"image mode must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
    target = _image_size(size)
    folder = Path(path)
    if not folder.exists():
        raise DataError(f"image folder {folder} not found")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder (give the folder that holds the images)")
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and not p.name.startswith(".")]
    if not files:
        subfolders = [p.name for p in entries if p.is_dir()]
        hint = f" (it has subfolders: {', '.join(subfolders[:3])}{', ...' if len(subfolders) > 3 else ''}; " \
               "give one of them)" if subfolders else ""
        raise DataError(f"image folder {folder} holds no images{hint}")
    arrays, first = [], None
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()  # decode now: a truncated file fails here, not later as a black image
                img = img.convert(mode)
        except UnidentifiedImageError:
            raise DataError(f"{f} is not an image (PIL cannot identify it); "
                            "image folders must hold only images") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            detail = " ".join(str(e).split()) or type(e).__name__
            raise DataError(f"{f} is an unreadable image ({detail}): truncated or corrupt?") from None
        hw = (img.height, img.width)
        if target is not None and hw != target:
            img = img.resize((target[1], target[0]), Image.BICUBIC)
        elif target is None:
            if first is None:
                first = (f, hw)
            elif hw != first[1]:
                (f0, (h0, w0)), (h1, w1) = first, hw
                raise DataError(f"images differ in size: {f0} is {w0}x{h0}, {f} is {w1}x{h1} (width x height); "
                                "pass size=... to resize them all")
        arrays.append(np.asarray(img, dtype=np.uint8).reshape(img.height, img.width, IMAGE_MODES[mode]))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_prompts(path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line (blank lines and lines starting with # skipped),
    or from a `.jsonl` file with one {"prompt": "..."} object per line (blank lines skipped).

    A file that is not UTF-8 is a DataError naming the byte offset (and line) of the first bad byte;
    a bad JSON line is one naming its line number. A UTF-8 byte-order mark is accepted.
    """
    import json

    f = Path(path)
    if not f.is_file():
        raise DataError(f"prompts file {f} not found" if not f.exists() else f"prompts file {f} is not a file")
    raw = f.read_bytes()
    bom = raw.startswith(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start + (3 if bom else 0)
        line = raw[:offset].count(b"\n") + 1
        raise DataError(f"{f} is not UTF-8 text: byte 0x{raw[offset]:02x} at offset {offset} (line {line}); "
                        "save it as UTF-8") from None
    if "\x00" in text:
        offset = raw.index(b"\x00")
        line = raw[:offset].count(b"\n") + 1
        raise DataError(f"{f} holds a NUL byte at offset {offset} (line {line}): "
                        "a binary file, or UTF-16? save it as UTF-8 text")
    # split on \n only: str.splitlines would also split inside a prompt at \x0b, \x1c, \u2028, ...
    lines = [line.rstrip("\r") for line in text.split("\n")]
    prompts = []
    if f.suffix.lower() == ".jsonl":
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}, line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise DataError(f'{f}, line {number}: expected an object with a string "prompt", '
                                f"got {line.strip()[:60]!r}")
            prompts.append(record["prompt"])
    else:
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DataError(f"prompts file {f} holds no prompts")
    return prompts


# ------------------------------------------------------------------------------------------------
# batches for the adapter teachers (unet, edm, SD, SDXL, SD3, FLUX, SANA): x in the teacher's
# sample space (its latents for latent teachers), cond in the teacher's own conditioning type


def _teacher_device_dtype(teacher) -> tuple[torch.device, torch.dtype]:
    p = next(teacher.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


class _TeacherSampledData:
    """x = the teacher's own samples from fresh noise (`teacher_steps` steps, CFG `guidance`), or, with
    teacher_steps = 0, a zero placeholder of the teacher's sample shape (for objectives that read x only
    for its shape). Noise is drawn for the global batch from the trainer's data generator on the CPU, so
    every process and device sees the same numbers; each process samples only its own rows, where the
    teacher is (at call time: after `prepare`). `teacher_passes` counts the rows this process sampled."""

    def __init__(self, teacher, teacher_steps: int = 0, guidance: float | None = None):
        self.teacher, self.teacher_steps, self.guidance = teacher, int(teacher_steps), guidance
        self.teacher_passes = 0

    def _x(self, size: int, rows: slice, cond, generator: torch.Generator) -> torch.Tensor:
        device, dtype = _teacher_device_dtype(self.teacher)
        shape = (size, *self.teacher.sample_shape)
        if self.teacher_steps == 0:
            return torch.zeros(shape, device=device)[rows]
        noise = torch.randn(shape, generator=generator)[rows].to(device, dtype)
        with torch.no_grad():
            x = self.teacher.sample(noise, cond, steps=self.teacher_steps, guidance=self.guidance)
        self.teacher_passes += len(noise) * self.teacher_steps
        return x.float()

    def sample_conditions(self, n: int):
        """Conditions for a grid of n samples (None: unconditional)."""
        return None


class PromptData(_TeacherSampledData):
    """Prompts drawn with replacement from a list; cond = teacher.encode_prompt(prompts) (a PromptCondition),
    encoded only for this process's rows."""

    def __init__(self, prompts: list[str], teacher, teacher_steps: int = 0, guidance: float | None = None):
        super().__init__(teacher, teacher_steps, guidance)
        self.prompts = list(prompts)

    def batch(self, size: int, generator: torch.Generator, device=None, part: slice | None = None) -> dict:
        rows = _rows(size, part)
        idx = torch.randint(len(self.prompts), (size,), generator=generator)[rows]
        with torch.no_grad():
            cond = self.teacher.encode_prompt([self.prompts[i] for i in idx.tolist()])
        x = self._x(size, rows, cond, generator)
        return {"x": x if device is None else x.to(device), "cond": cond if device is None else cond.to(device)}

    def sample_conditions(self, n: int):
        """The first n prompts of the file (cycled), encoded."""
        with torch.no_grad():
            return self.teacher.encode_prompt([self.prompts[i % len(self.prompts)] for i in range(n)])


class ClassLabelData(_TeacherSampledData):
    """Uniform random class labels of a class-conditional teacher (labels=False: unconditional, cond None)."""

    def __init__(self, teacher, teacher_steps: int = 0, guidance: float | None = None, labels: bool = True):
        super().__init__(teacher, teacher_steps, guidance)
        if labels and teacher.num_classes is None:
            raise ValueError(f"{type(teacher).__name__} is unconditional: it has no class labels to draw")
        self.labels = labels

    def batch(self, size: int, generator: torch.Generator, device=None, part: slice | None = None) -> dict:
        rows = _rows(size, part)
        cond = None
        if self.labels:
            cond = torch.randint(self.teacher.num_classes, (size,), generator=generator)[rows]
            cond = cond.to(_teacher_device_dtype(self.teacher)[0])
        x = self._x(size, rows, cond, generator)
        move = (lambda v: v) if device is None else (lambda v: None if v is None else v.to(device))  # noqa: E731
        return {"x": move(x), "cond": move(cond)}

    def sample_conditions(self, n: int):
        """Labels 0, 1, 2, ... (cycled over the classes)."""
        if not self.labels:
            return None
        return (torch.arange(n) % self.teacher.num_classes).to(_teacher_device_dtype(self.teacher)[0])


def teacher_image_size(teacher) -> tuple[int, int]:
    """(height, width) in pixels of the teacher's images: its sample shape, times the VAE's factor."""
    factor = getattr(getattr(teacher, "pipeline", None), "vae_scale_factor", 1) if teacher.capabilities.vae else 1
    h, w = teacher.sample_shape[-2:]
    return h * factor, w * factor


class ImageFolderDataset(torch.utils.data.Dataset):
    """The images of a folder, read one at a time when asked (never the whole folder into memory): item i is
    the i-th file in sorted name order as a uint8 tensor [C, H, W], resized to `size` (bicubic). A file that
    is not a readable image is a DataError naming it, when it is read."""

    def __init__(self, path, size, mode: str = "RGB"):
        from PIL import Image

        if mode not in IMAGE_MODES:
            raise DataError(f"image mode must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
        folder = Path(path)
        if not folder.exists():
            raise DataError(f"image folder {folder} not found")
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder (give the folder that holds the images)")
        self.files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not self.files:
            raise DataError(f"image folder {folder} holds no images")
        self.size, self.mode, self._bicubic = _image_size(size), mode, Image.BICUBIC
        self[0]  # the first file now: a folder of non-images fails before training starts

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        f = self.files[i]
        try:
            with Image.open(f) as img:
                img.load()
                img = img.convert(self.mode)
        except UnidentifiedImageError:
            raise DataError(f"{f} is not an image (PIL cannot identify it); "
                            "image folders must hold only images") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            detail = " ".join(str(e).split()) or type(e).__name__
            raise DataError(f"{f} is an unreadable image ({detail}): truncated or corrupt?") from None
        if (img.height, img.width) != self.size:
            img = img.resize((self.size[1], self.size[0]), self._bicubic)
        pixels = np.asarray(img, dtype=np.uint8).reshape(img.height, img.width, IMAGE_MODES[self.mode])
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


class ImageFolderData:
    """Images of a folder (resized to the teacher's resolution) as x in the teacher's space: [-1, 1] pixels for
    pixel teachers, `teacher.encode` latents (VAE posterior mean, with the VAE's scaling and shift) for latent
    teachers. Each process reads and encodes only its own rows of the global batch, `num_workers` threads
    decoding the files. cond None."""

    def __init__(self, path, teacher, num_workers: int = 4):
        self.teacher = teacher
        self.latent = teacher.capabilities.vae
        channels = 3 if self.latent else teacher.sample_shape[0]
        if channels not in (1, 3):
            raise DataError(f"the teacher's images have {channels} channels; image folders give 1 (grey) or 3 (RGB)")
        self.dataset = ImageFolderDataset(path, teacher_image_size(teacher), "L" if channels == 1 else "RGB")
        self.num_workers = num_workers
        self._pool = None

    def _read(self, indices: list[int]) -> torch.Tensor:
        if self.num_workers <= 1 or len(indices) <= 1:
            return torch.stack([self.dataset[i] for i in indices])
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="onestep-images")
        return torch.stack(list(self._pool.map(self.dataset.__getitem__, indices)))

    def batch(self, size: int, generator: torch.Generator, device=None, part: slice | None = None) -> dict:
        idx = torch.randint(len(self.dataset), (size,), generator=generator)[_rows(size, part)]
        x = self._read(idx.tolist()).float() / 127.5 - 1.0
        if self.latent:
            teacher_device, _ = _teacher_device_dtype(self.teacher)
            x = self.teacher.encode(x.to(teacher_device)).float()
        return {"x": x if device is None else x.to(device), "cond": None}

    def sample_conditions(self, n: int):
        return None

    def __getstate__(self):  # the thread pool is not copied (deepcopy, pickling)
        return {**self.__dict__, "_pool": None}
