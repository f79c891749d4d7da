"""The digits teacher: a flow-matching diffusers `UNet2DModel` on scikit-learn's digits at 16x16.

It is trained by `onestep teacher-train` (configs/digits_teacher.yaml, objective `flow_matching`);
the weights that `onestep demo` uses ship in `onestep/assets/digits_teacher/` in diffusers' own
format (`config.json` + `diffusion_pytorch_model.safetensors`), so `from_pretrained` is the real
diffusers loading path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from onestep.teachers.base import Teacher
from onestep.teachers.capabilities import TeacherCapabilities
from onestep.teachers.loading import _first_line

from onestep.errors import ConfigError, TeacherWeightsError
from onestep.registry import TEACHERS
from onestep.student import AvgVelocityUNet

TIME_SCALE = 1000.0  # the UNet sees timestep = 1000 * flow time (unless the folder's onestep.json says otherwise)
#: what diffusers' config.json cannot hold: {"time_scale": s}, the UNet's timestep = s * flow time. Written only
#: for s != 1000 (e.g. the dense-time teacher, s = 1), so the shipped folder stays a plain diffusers folder
ONESTEP_CONFIG_NAME = "onestep.json"

#: the backbone of the digits teacher (about 1.0M parameters, no attention: fast on CPU)
DIGITS_UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    add_attention=False,
)


#: the weights shipped with onestep (teacher.shipped): "standard" embeds 1000 t (configs/digits_teacher.yaml);
#: "dense" is it fine-tuned to embed t itself (configs/digits_teacher_dense.yaml), for the JVP objectives
SHIPPED = {"standard": "digits_teacher", "dense": "digits_teacher_dense"}


def shipped_weights_dir(which: str = "standard") -> Path:
    import onestep

    if which not in SHIPPED:
        raise ConfigError(f"teacher.shipped must be one of {', '.join(SHIPPED)}, got {which!r}")
    return Path(onestep.__file__).resolve().parent / "assets" / SHIPPED[which]


def new_digits_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**DIGITS_UNET_CONFIG)


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
#: weight files that are pickles: never loaded (torch.load without weights_only runs arbitrary code)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_unet_config(config_file: Path) -> None:
    """config.json must be a UTF-8 JSON object (diffusers' own errors here are vague or multi-line)."""
    import json

    raw = config_file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TeacherWeightsError(f"{config_file} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                                  "check teacher.path") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise TeacherWeightsError(f"{config_file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                  "check teacher.path") from None
    if not isinstance(values, dict):
        raise TeacherWeightsError(f"{config_file} must hold a JSON object (a UNet2DModel config), "
                                  f"got a {type(values).__name__}; check teacher.path")


def _check_safetensors(weights: Path) -> set[str]:
    """The tensor names in a safetensors file; a truncated, empty or non-safetensors file is refused
    naming the file (safetensors checks that the header covers the whole file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise TeacherWeightsError(f"{weights} is not a readable safetensors file ({_first_line(e)}): "
                                  "truncated or corrupt? check teacher.path") from None


@dataclass
class DigitsTeacherConfig:
    path: Optional[str] = None  # folder written by `onestep teacher-train`; None: the shipped weights below
    # which shipped weights (path null): "standard" (timestep 1000 t) or "dense" (timestep t: a smooth d/dt
    # for MeanFlow's and sCM's JVPs; SANA-Sprint's dense time embedding)
    shipped: str = "standard"


@TEACHERS.register("digits")
class DigitsTeacher(Teacher):
    """Unconditional velocity teacher on 1x16x16 digits in [-1, 1]."""
    exporter = "onestep.teachers.digits.exporter:PixelUNetExporter"   # loaded only when a run is exported

    Config = DigitsTeacherConfig
    capabilities = TeacherCapabilities(conditioning="none", space="pixel", time="flow")
    sample_shape = (1, 16, 16)
    default_feature_layers = ("unet.down_blocks.1", "unet.down_blocks.2", "unet.mid_block")

    def __init__(self, model: AvgVelocityUNet):
        super().__init__()
        self.model = model
        self.freeze()

    def _velocity(self, x, t, cond):
        if cond is not None:
            raise ValueError("the digits teacher is unconditional")
        return self.model(x, t, t)

    def backbone(self) -> AvgVelocityUNet:
        return self.model

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device=None, dtype=None,
                        shipped: str = "standard") -> "DigitsTeacher":
        """Load a digits teacher saved with `save_pretrained` (default: the `shipped` weights of onestep).

        Only safetensors weights are read: a pickled `.bin`/`.pt` beside them is never opened, since
        unpickling can run code. A missing file raises FileNotFoundError; a file that is there but
        unusable (config.json that is not a JSON object, a truncated or foreign safetensors file, or
        weights that do not fit config.json) raises TeacherWeightsError. Both messages are one line
        naming the file and `teacher.path`.
        """
        from diffusers import UNet2DModel

        path = Path(path) if path is not None else shipped_weights_dir(shipped)
        config_file, weights = path / "config.json", path / WEIGHTS_NAME
        for f in (config_file, weights):
            if not f.is_file():
                pickled = ([p.name for p in sorted(path.glob("*")) if p.suffix in PICKLE_SUFFIXES]
                           if path.is_dir() else [])
                note = (f" (found {', '.join(pickled)}: pickle files, which onestep never loads; convert the "
                        "weights to safetensors)") if pickled and f == weights else ""
                raise FileNotFoundError(
                    f"digits teacher file missing: {f}{note}; set teacher.path to a folder written by "
                    "`onestep teacher-train`, or run `onestep teacher-train` to make one"
                )
        _check_unet_config(config_file)
        stored = _check_safetensors(weights)
        try:
            # the dtype goes to from_pretrained: diffusers warns on every model.to(dtype)
            unet = UNet2DModel.from_pretrained(path, use_safetensors=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
            # e.g. config.json describes another architecture than the weights (shape mismatches)
            # diffusers: one sentence is enough
            reason = _first_line(e).split(". ")[0].replace("Cannot load  because ", "")
            raise TeacherWeightsError(f"digits teacher in {path} cannot be loaded: {reason} (config.json and "
                                      f"{WEIGHTS_NAME} do not fit together?); check teacher.path") from None
        # diffusers leaves parameters the file lacks uninitialised (on the meta device) and only warns
        expected = set(unet.state_dict())
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
        if missing or unexpected:
            example = (missing + unexpected)[0]
            raise TeacherWeightsError(f"{weights} does not hold the weights config.json describes: {len(missing)} "
                                      f"missing, {len(unexpected)} unexpected (e.g. {example}); check teacher.path")
        if device is not None:
            unet = unet.to(device)
        return cls(AvgVelocityUNet(unet, _read_time_scale(path / ONESTEP_CONFIG_NAME)))

    @staticmethod
    def check_config(cfg: DigitsTeacherConfig) -> None:
        shipped_weights_dir(cfg.shipped)  # a ConfigError when the config is loaded, before any training

    @classmethod
    def from_config(cls, cfg: DigitsTeacherConfig) -> "DigitsTeacher":
        return cls.from_pretrained(cfg.path, shipped=cfg.shipped)

    def save_pretrained(self, path: str | Path) -> None:
        save_digits_unet(self.model, path)


def save_digits_unet(model: AvgVelocityUNet, path: str | Path) -> None:
    """A velocity AvgVelocityUNet as a digits-teacher folder: diffusers' files plus onestep.json for a
    time scale other than 1000."""
    import json

    model.unet.save_pretrained(path, safe_serialization=True)
    sidecar = Path(path) / ONESTEP_CONFIG_NAME
    if model.time_scale != TIME_SCALE:
        sidecar.write_text(json.dumps({"time_scale": float(model.time_scale)}) + "\n")
    elif sidecar.exists():  # an earlier save into this folder used another scale
        sidecar.unlink()


def _read_time_scale(sidecar: Path) -> float:
    import json
    import math

    if not sidecar.is_file():
        return TIME_SCALE
    try:
        scale = json.loads(sidecar.read_text(encoding="utf-8"))["time_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise TeacherWeightsError(f'{sidecar} must be a JSON object {{"time_scale": a finite number > 0}}; '
                                  "check teacher.path") from None
    return float(scale)
