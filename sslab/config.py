"""The trial config: one typed, immutable object that flows CLI -> study -> trainer -> store.

Every field is a possible ablation axis. Defaults are chosen so that a bare `sslab run` trains a small model
on the embedded dataset in well under a minute on a laptop CPU; each default's reason sits beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sslab.errors import ConfigError

CONFIG_VERSION = 1  # bump when a field's meaning changes, so old hashes no longer match


@dataclass(frozen=True)
class TrialConfig:
    """Everything that determines one pretraining + evaluation trial."""

    # --- what is trained --------------------------------------------------------------------------------
    method: str = "simclr"  # self-supervised method (see `sslab methods`)
    backbone: str = "smallcnn"  # smallcnn (~0.37M parameters, fast on CPU) | resnet18 | resnet50
    dataset: str = "fashion-mnist-mini"  # dataset name (see `sslab data list`); the default ships embedded
    image_size: int | None = None  # resize images to this side; None keeps the native size
    train_subset: int | None = None  # use only the first N class-balanced training images
    cifar_stem: bool | None = None  # 3x3 stride-1 stem, no max-pool; None: on for images <= 64 px

    # --- augmentation: a view is a comma-separated list of named ops (see `sslab augment list`) ----------
    aug: str = "crop(scale=0.2-1),flip,color(s=0.5)"  # ops for both views (crop milder than on ImageNet)
    aug1: str | None = None  # ops for the first view only; None uses --aug
    aug2: str | None = None  # ops for the second view only; None uses --aug

    # --- projection head ------------------------------------------------------------------------------
    head: int = 2  # head depth: 0 none, 1 linear, 2 SimCLR's non-linear head, 3+ as in SimCLRv2
    head_width: int | None = None  # hidden width of the head; None uses the backbone's feature dimension
    out_dim: int = 128  # output dimension of the head (SimCLR's default)
    head_bn: bool = True  # batch-norm after each hidden head layer, as in SimCLR's code

    # --- contrastive loss -----------------------------------------------------------------------------
    temperature: float = 0.5  # softmax temperature (SimCLR's default for batches of a few hundred)
    normalize: bool = True  # l2-normalise embeddings before the similarity (SimCLR Table 5 ablates it)

    # --- momentum encoders, predictors, queues (MoCo, MoCo v3, BYOL, SimSiam, DINO, SimCLR v2) ----------
    ema: float = 0.99  # base momentum tau of the momentum (target/teacher) encoder
    ema_cosine: bool = True  # raise the momentum to 1 on a cosine schedule (BYOL, MoCo v3, DINO)
    momentum_encoder: bool = False  # SimCLR v2: negatives and second view from a momentum encoder
    queue_size: int = 0  # queue of negative keys (MoCo) or of past features (SwAV); 0 = none
    predictor: bool = True  # predictor MLP on the online branch (BYOL, SimSiam, MoCo v3)
    pred_width: int = 512  # hidden width of the predictor
    pred_bn: bool = True  # batch-norm in the predictor's hidden layer (BYOL's batch-norm ablation)
    stop_gradient: bool = True  # stop-gradient on the target branch (SimSiam's key ablation)
    pred_lr_fixed: bool = True  # keep the predictor's learning rate constant (SimSiam Table 1)

    # --- SwAV ---------------------------------------------------------------------------------------
    prototypes: int = 3000  # number of prototypes K
    sinkhorn_eps: float = 0.05  # entropy regularisation of the Sinkhorn-Knopp codes
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations
    freeze_prototypes: float = 1.0  # epochs during which the prototypes are not updated

    # --- multi-crop: global views plus small local crops (SwAV, DINO; any method that supports it) -----
    local_crops: int = 0  # number of extra low-resolution crops per image
    local_size: int = 0  # side of the local crops in pixels; 0 = 3/7 of the image side (96/224 in DINO)
    local_scale: str = "0.05-0.4"  # area range of the local crops (DINO's default)

    # --- DINO ---------------------------------------------------------------------------------------
    teacher_temp: float = 0.04  # teacher softmax temperature after warm-up
    teacher_temp_start: float = 0.04  # teacher temperature at the start of the warm-up
    teacher_temp_epochs: float = 0.0  # linear warm-up of the teacher temperature, in epochs
    centering: bool = True  # subtract the running centre from the teacher's output
    center_momentum: float = 0.9  # momentum of the running centre

    # --- Barlow Twins, InstDisc ---------------------------------------------------------------------
    lambd: float = 0.0051  # Barlow Twins weight of the off-diagonal (redundancy) term
    bank_momentum: float = 0.5  # InstDisc proximal update of the memory bank
    negatives: int = 4096  # InstDisc noise samples per positive
    bank_init: str = "random"  # InstDisc memory bank at the start: random (the paper) | first-visit

    # --- optimisation ---------------------------------------------------------------------------------
    optimizer: str = "sgd"  # sgd | lars | adam | adamw
    lr: float = 0.5  # learning rate for batch 256, scaled linearly with the batch size
    weight_decay: float = 5e-4  # on weights only, not biases or batch-norm (usual for small images)
    momentum: float = 0.9  # SGD / LARS momentum
    warmup_epochs: float = 0.5  # linear warm-up length, then cosine decay to zero
    epochs: int = 4  # pretraining epochs (4 clears the random-init baseline on the embedded set)
    batch_size: int = 256  # images per step; each gives one sample of every view
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto uses mixed precision only where it is faster
    seed: int = 0  # seeds initialisation, batch order and augmentation

    # --- evaluation on frozen features ----------------------------------------------------------------
    knn_k: int = 200  # neighbours of the weighted kNN (Wu et al. 2018)
    knn_t: float = 0.1  # temperature of the weighted kNN vote
    probe_layers: str = "h"  # h: backbone output only; all: also every head layer (SimCLR Fig. 8)
    val_fraction: float = 0.0  # > 0: hold out this share of train to choose the probe's weight decay

    # --- distributed -------------------------------------------------------------------------------
    sync_bn: bool = False  # synchronise batch-norm statistics across processes under torchrun

    # --- runtime: where and how to run, not what; excluded from the trial hash -------------------------
    data_dir: str | None = None  # where to look for the dataset first
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that define the trial's result (runtime fields left out)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def hash(self) -> str:
        """Stable hash of the identity: the same trial gets the same hash on any machine."""
        payload = json.dumps({"v": CONFIG_VERSION, **self.identity()}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def view_specs(self) -> tuple[str, str]:
        return (
            self.aug1 if self.aug1 is not None else self.aug,
            self.aug2 if self.aug2 is not None else self.aug,
        )

    def replace(self, **changes: Any) -> TrialConfig:
        return from_mapping({**self.to_dict(), **changes})


RUNTIME_FIELDS = frozenset({"data_dir", "device"})
FIELD_NAMES = tuple(f.name for f in fields(TrialConfig))

_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "lars", "adam", "adamw"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "probe_layers": ("h", "all"),
    "bank_init": ("random", "first-visit"),
}
_POSITIVE = (
    "epochs",
    "batch_size",
    "out_dim",
    "knn_k",
    "temperature",
    "knn_t",
    "lr",
    "pred_width",
    "prototypes",
    "sinkhorn_eps",
    "sinkhorn_iters",
    "teacher_temp",
    "teacher_temp_start",
    "negatives",
)
_NON_NEGATIVE = (
    "head",
    "weight_decay",
    "momentum",
    "warmup_epochs",
    "seed",
    "queue_size",
    "freeze_prototypes",
    "local_crops",
    "local_size",
    "teacher_temp_epochs",
    "lambd",
)
_UNIT_INTERVAL = ("ema", "center_momentum", "bank_momentum")


def field_help() -> dict[str, str]:
    """Each field's help text: the comment beside its default in the class body above."""
    source = inspect.getsource(TrialConfig)
    pattern = re.compile(r"^[ \t]+(\w+): [^=\n]+=[^#\n]*#[ \t]*(.+)$", re.MULTILINE)
    return {name: text.strip() for name, text in pattern.findall(source) if name in FIELD_NAMES}


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrialConfig)
    return {f.name: hints[f.name] for f in fields(TrialConfig)}


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(underlying scalar type, whether None is allowed) of a field annotation such as `int | None`."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return annotation, False


def coerce_value(name: str, value: Any) -> Any:
    """Convert a value (possibly a CLI string) to the type of field `name`, or raise ConfigError."""
    types_ = _field_types()
    if name not in types_:
        raise ConfigError(f"unknown config field '{name}'; valid fields: {', '.join(FIELD_NAMES)}")
    kind, nullable = _base_type(types_[name])
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and nullable):
        if nullable:
            return None
        raise ConfigError(f"{name} cannot be empty")
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, bool | int):
                return bool(value)
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    raise ConfigError(f"{name}: unsupported field type")  # pragma: no cover


def validate(config: TrialConfig) -> TrialConfig:
    """Check ranges and choices that types alone cannot express; return the config unchanged."""
    problems = list(_problems(config))
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def _problems(config: TrialConfig) -> typing.Iterator[str]:
    for name, choices in _CHOICES.items():
        value = getattr(config, name)
        if value not in choices:
            yield f"{name} must be one of {', '.join(choices)} (got {value!r})"
    for name in _POSITIVE:
        if getattr(config, name) <= 0:
            yield f"{name} must be > 0 (got {getattr(config, name)})"
    for name in _NON_NEGATIVE:
        if getattr(config, name) < 0:
            yield f"{name} must be >= 0 (got {getattr(config, name)})"
    for name in ("image_size", "train_subset", "head_width"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            yield f"{name} must be > 0 (got {value})"
    for name in _UNIT_INTERVAL:
        if not 0.0 <= getattr(config, name) <= 1.0:
            yield f"{name} must be in [0, 1] (got {getattr(config, name)})"
    low, sep, high = config.local_scale.partition("-")
    try:
        if not sep or not 0 < float(low) <= float(high) <= 1:
            raise ValueError
    except ValueError:
        yield f"local_scale must be 'lo-hi' with 0 < lo <= hi <= 1 (got {config.local_scale!r})"
    if not 0.0 <= config.val_fraction < 0.5:
        yield f"val_fraction must be in [0, 0.5) (got {config.val_fraction})"
    if config.batch_size < 2:
        yield "batch_size must be at least 2 (contrastive losses need negatives)"


def method_defaults(method: str) -> dict[str, Any]:
    """The method's own defaults (its paper's settings scaled to small images); {} for an unknown method."""
    from sslab.methods import METHODS  # methods import this module: resolve at call time

    cls = METHODS.get(method)
    return dict(cls.defaults) if cls is not None else {}


def from_mapping(values: Mapping[str, Any], source: str = "config") -> TrialConfig:
    """Build and validate a TrialConfig from a mapping; every problem is reported at once.

    Fields missing from `values` take the chosen method's defaults, then the class defaults.
    """
    unknown = sorted(set(values) - set(FIELD_NAMES))
    problems: list[str] = []
    if unknown:
        problems.append(f"unknown field(s) {', '.join(unknown)}")
    coerced: dict[str, Any] = {}
    for name, value in values.items():
        if name in unknown:
            continue
        try:
            coerced[name] = coerce_value(name, value)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    defaults = method_defaults(coerced.get("method", TrialConfig.method))
    config = TrialConfig(**{**defaults, **coerced})
    try:
        return validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict, turning read and syntax errors into one-line ConfigErrors."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """Parse `key=value` strings (from `--set`) into a dict, checking the keys."""
    result: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key not in FIELD_NAMES:
            raise ConfigError(f"--set: unknown field '{key}'; valid fields: {', '.join(FIELD_NAMES)}")
        result[key] = value.strip()
    return result


DEFAULT = TrialConfig()
