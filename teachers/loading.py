"""Loading teachers from a Hugging Face hub id or a local folder, with one-line errors.

Every adapter loads through diffusers' / transformers' own `from_pretrained` (with `subfolder=`), and
only safetensors weights (`use_safetensors=True`: a pickled `.bin` is never unpickled). `HF_HUB_OFFLINE`
is read at call time (huggingface_hub reads it once at import), and then only local or cached files
are used. Whatever goes wrong becomes one line that names what is missing and the config option that
points to a local copy:

* a file or folder that is not there, or the hub unreachable / offline without a cached copy:
  :class:`TeacherFilesMissingError` (a FileNotFoundError, like the digits teacher's missing files);
* files that are there but unusable: :class:`onestep.errors.TeacherWeightsError`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from onestep.errors import ConfigError, TeacherFilesMissingError, TeacherWeightsError

__all__ = [
    "TeacherFilesMissingError",
    "TeacherWeightsError",
    "hub_offline",
    "resolve_dtype",
    "dtype_kwargs",
    "check_dtype_option",
    "load_from_pretrained",
    "check_local_pipeline",
    "DTYPES",
]


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


#: dtype names a teacher config accepts
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

#: files whose presence marks a folder as holding a component (checked before the loaders run, so
#: a missing one is named exactly instead of through the loader's own, vaguer message)
_COMPONENT_MARKERS = {
    "model": ("config.json",),
    "scheduler": ("scheduler_config.json",),
    "pipeline": ("model_index.json",),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model"),
}


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network access (read now, not at import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown teacher dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_dtype_option(dtype) -> None:
    """teacher.dtype must be one of DTYPES (checked at config load, before any weights are read)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"teacher.dtype={dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")


def dtype_kwargs(dtype: str | torch.dtype | None) -> dict:
    """The dtype keyword of diffusers' from_pretrained: `dtype` where diffusers renamed `torch_dtype`
    (it warns on the old name), `torch_dtype` before."""
    dtype = resolve_dtype(dtype)
    if dtype is None:
        return {}
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _is_local(source: str | os.PathLike) -> bool:
    """A source that names a local folder (exists, or is written like a path rather than `owner/name`)."""
    text = str(source)
    # hub ids are `name` or `owner/name`; anything else that is written like a path is a path
    return Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") > 1


def _hint(source: str, option: str) -> str:
    if _is_local(source):
        return f"set {option} to a folder that holds it"
    offline = " (HF_HUB_OFFLINE is set: only cached files are read)" if hub_offline() else ""
    return (f"no cached copy of {source} could be used{offline}; download it where there is network "
            f"(`hf download {source} --local-dir DIR`) and set {option}=DIR")


def _check_local(source: str, subfolder: str | None, kind: str, family: str, option: str) -> None:
    root = Path(source).expanduser()
    if not root.is_dir():
        raise TeacherFilesMissingError(f"{family} teacher: folder {root} not found; set {option} to a local "
                                       "folder or a hub id")
    folder = root / subfolder if subfolder else root
    markers = _COMPONENT_MARKERS[kind]
    if not any((folder / m).is_file() for m in markers):
        raise TeacherFilesMissingError(f"{family} teacher file missing: {folder / markers[0]}; "
                                       f"{_hint(source, option)}")


def load_from_pretrained(loader: Callable[..., Any], source: str | os.PathLike, subfolder: str | None, *,
                         family: str, option: str, kind: str = "model", what: str | None = None, **kwargs):
    """`loader(source, subfolder=subfolder, **kwargs)` with offline handling and one-line errors.

    `loader` is a `from_pretrained` of diffusers or transformers; `kind` ("model", "scheduler",
    "tokenizer") says which file marks the component, for the check of a local folder.
    """
    source = str(source)
    what = what or (subfolder or kind)
    if _is_local(source):
        _check_local(source, subfolder, kind, family, option)
        source = str(Path(source).expanduser())
    if hub_offline():
        kwargs.setdefault("local_files_only", True)
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        return loader(source, **kwargs)
    except OSError as e:
        # diffusers/transformers turn missing files and hub failures into OSError (EnvironmentError)
        raise TeacherFilesMissingError(f"{family} teacher: cannot load {what} from {source} "
                                       f"({_first_line(e)}); {_hint(source, option)}") from None
    except (ValueError, RuntimeError, TypeError, KeyError) as e:
        raise TeacherWeightsError(f"{family} teacher: {what} in {source} cannot be used ({_first_line(e)}); "
                                  f"check {option}") from None


def check_local_pipeline(source: str | os.PathLike, components: dict[str, str], *, family: str, option: str,
                         optional: tuple[str, ...] = ()) -> None:
    """For a local pipeline folder: every component in `components` (subfolder -> kind) that
    model_index.json lists (or, without model_index.json, that is not optional) has its marker file."""
    if not _is_local(source):
        return
    root = Path(source).expanduser()
    if not root.is_dir():
        raise TeacherFilesMissingError(f"{family} teacher: folder {root} not found; set {option} to a local "
                                       "folder or a hub id")
    index_file = root / "model_index.json"
    listed = None
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TeacherWeightsError(f"{index_file} is not valid JSON ({_first_line(e)}); check {option}") from None
        if not isinstance(index, dict):
            raise TeacherWeightsError(f"{index_file} must hold a JSON object; check {option}")
        # a component saved as None (e.g. a pipeline without its third text encoder) is not expected
        listed = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
    for sub, kind in components.items():
        expected = (sub in listed) if listed is not None else sub not in optional
        if expected:
            _check_local(str(root), sub, kind, family, option)
