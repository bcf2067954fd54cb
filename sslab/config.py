"""The trial config: one typed, immutable object that flows CLI -> study -> trainer -> store.

It holds what every trial has (data, backbone, augmentation, head, optimiser, schedule, evaluation, seed) and
the chosen method's own settings, which each method declares in its file (`sslab.settings`).
`from_mapping` is the one front door: CLI options, `--set`, TOML files, study cells and compare cells all
become configs through it. Defaults are chosen so that a bare `sslab run` trains a small model on the embedded
dataset in well under a minute on a laptop CPU; each default's reason sits beside it. Nothing here imports
torch.

A trial's identity (`identity()`, `hash()`) is canonical: fields at their defaults and fields the method
does not read are left out, and view specs are written in one spelling. So a release that adds a field (at a
default that keeps today's behaviour) recognises every trial an older one recorded. `IDENTITY_VERSION`
changes only when the meaning of an existing field changes; a fix that changes what one method computes bumps
that method's `version` instead, so its older trials stay listed, marked as computed by the older behaviour;
a fix of the pipeline every method shares (augmentation ops, random streams) bumps `PIPELINE_VERSION`
(`sslab.pipeline`) the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sslab.augment.spec import canonical_view, format_value, parse_steps
from sslab.errors import ConfigError
from sslab.fingerprint import folder_fingerprint
from sslab.methods.catalog import method_info, methods
from sslab.pipeline import PIPELINE_VERSION, VERSIONS, effective_version
from sslab.settings import MethodInfo, SettingValues, coerce

IDENTITY_VERSION = 2  # 1: every field hashed as spelled (schema-0 stores); 2: the canonical identity


@dataclass(frozen=True)
class TrialConfig:
    """Everything that determines one pretraining + evaluation trial. Build it with `from_mapping`."""

    # --- what is trained --------------------------------------------------------------------------------
    method: str = "simclr"  # self-supervised method (see `sslab methods`)
    backbone: str = "smallcnn"  # smallcnn (fast CPU) | resnet18 | resnet50 | vit_micro | vit_tiny | vit_small
    dataset: str = "fashion-mnist-mini"  # dataset name (see `sslab data list`); the default ships embedded
    image_size: int | None = None  # resize images to this side; None keeps the native size
    data_fingerprint: str | None = None  # content of an imagefolder: PATH (files, sizes, times); set by sslab
    train_subset: int | None = None  # use only the first N class-balanced training images
    pretrain_unlabelled: bool = False  # also pretrain on the unlabelled split (STL-10's 100,000 images)
    cifar_stem: bool | None = None  # 3x3 stride-1 stem, no max-pool; None: on for images <= 64 px
    resnet_width: float = 1.0  # ResNet channel multiplier (SimCLR's ResNet-50 (2x)); 1 is torchvision's
    patch_size: int | None = None  # ViT patch side in px; None: 4 up to 32-px images, 8 up to 96, else 16
    vit_pool: str = "cls"  # ViT features: cls (the class token) | mean (of the patch tokens; no class token)

    # --- augmentation: a view is a comma-separated list of named ops (see `sslab augment list`) ----------
    aug: str = "crop(scale=0.2-1),flip,color(s=0.5)"  # ops for both views (crop milder than on ImageNet)
    aug1: str | None = None  # ops for the first view only; None uses --aug
    aug2: str | None = None  # ops for the second view only; None uses --aug
    # SimCLR Fig. 5 first crops every image, one box shared by both branches: --base-aug crop
    base_aug: str | None = None  # ops drawn once per image that both views start from; None: the image

    # --- projection head ------------------------------------------------------------------------------
    head: int = 2  # head depth: 0 none, 1 linear, 2 SimCLR's non-linear head, 3+ as in SimCLRv2
    head_width: int | None = None  # hidden width of the head; None uses the backbone's feature dimension
    out_dim: int = 128  # output dimension of the head (SimCLR's default)
    head_bn: bool = True  # batch-norm after each hidden head layer, as in SimCLR's code

    # --- multi-crop: global views plus small local crops (SwAV, DINO; any method that supports it) -----
    local_crops: int = 0  # number of extra low-resolution crops per image
    local_size: int = 0  # side of the local crops in pixels; 0 = 3/7 of the image side (96/224 in DINO)
    local_scale: str = "0.05-0.4"  # area range of the local crops (DINO's default)

    # --- optimisation ---------------------------------------------------------------------------------
    optimizer: str = "sgd"  # sgd | lars | adam | adamw
    lr: float = 0.5  # learning rate for batch 256, scaled linearly with the batch size
    weight_decay: float = 5e-4  # on weights only, not biases or batch-norm (usual for small images)
    weight_decay_end: float | None = None  # None: constant; else a cosine from weight_decay to this (DINO)
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
    knn_sweep: bool = False  # also the kNN over a grid of k and temperature, on the same features

    # --- evaluation by fine-tuning: the whole backbone trained on labels (SimCLRv2 semi-supervised) --------
    finetune_labels: str = ""  # percents of the train labels to fine-tune on, e.g. "1,10,100"; "" none
    finetune_from: str = "h"  # h: the backbone; g1: also the head's first layer, as SimCLRv2 does
    finetune_steps: int = 300  # optimiser steps for every label fraction (fractions differ only in labels)
    finetune_batch: int = 256  # labelled images per step (fewer when fewer are labelled)
    finetune_lr: float = 0.05  # SGD (Nesterov, momentum 0.9) learning rate, cosine-decayed to zero
    finetune_weight_decay: float = 0.0  # SimCLRv2 fine-tunes without weight decay
    finetune_aug: str = "crop(scale=0.2-1),flip"  # augmentation of the labelled images (SimCLRv2: crop, flip)

    # --- transfer: probe (and fine-tune) on another dataset than the one pretrained on -------------------
    probe_dataset: str | None = None  # None: the pretraining dataset; images fitted to its size and channels

    # --- distributed -------------------------------------------------------------------------------
    sync_bn: bool = False  # synchronise batch-norm statistics across processes under torchrun

    # --- the method's own settings (declared in its file; see `sslab methods NAME`) ----------------------
    settings: SettingValues = SettingValues()  # every setting of the method, filled in by from_mapping
    method_version: int = 1  # the version of the method's behaviour that the trial was (or is to be) run with
    pipeline_version: int = PIPELINE_VERSION  # the shared pipeline's version (sslab.pipeline); stored trials
    # without one ran version 1

    # --- runtime: where and how to run, not what; excluded from the trial hash -------------------------
    data_dir: str | None = None  # where to look for the dataset first
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: bool = False  # torch.compile the backbone: a minute or more to compile, then a faster step

    @property
    def view_specs(self) -> tuple[str, str]:
        return (
            self.aug1 if self.aug1 is not None else self.aug,
            self.aug2 if self.aug2 is not None else self.aug,
        )

    @property
    def info(self) -> MethodInfo:
        return method_info(self.method)

    def values(self) -> dict[str, Any]:
        """The config as `from_mapping` takes it back: shared fields, then `method.setting` keys."""
        shared = {name: getattr(self, name) for name in SHARED_FIELDS + RUNTIME_FIELDS}
        own = {f"{self.method}.{name}": value for name, value in self.settings.items()}
        versions = {"method_version": self.method_version, "pipeline_version": self.pipeline_version}
        return {**shared, **own, **versions}

    def record(self) -> dict[str, Any]:
        """Everything that defines the trial, as stored with it (runtime fields left out)."""
        return {
            "v": IDENTITY_VERSION,
            **{name: getattr(self, name) for name in SHARED_FIELDS},
            "method_version": self.method_version,
            "pipeline_version": self.pipeline_version,
            "settings": dict(self.settings),
        }

    def identity(self) -> dict[str, Any]:
        """The canonical form of what the trial computes: what the hash is taken over.

        Shared fields at the method's defaults, fields the method does not read, and settings at their
        defaults or switched off (`needs`) are left out; both views are written canonically.
        """
        info = self.info
        defaults = shared_defaults(info, self.method_version)
        skipped = set(info.ignores) | {"method", "aug", "aug1", "aug2"}
        if self.local_crops == 0:
            skipped |= {"local_size", "local_scale"}
        if not self.finetune_labels:
            skipped |= set(FINETUNE_FIELDS)
        identity: dict[str, Any] = {"v": IDENTITY_VERSION, "method": self.method}
        if self.method_version != 1:
            identity["method_version"] = self.method_version
        pipeline = effective_version(self.pipeline_version, self.precision)
        if pipeline != 1:
            identity["pipeline_version"] = pipeline
        for name in SHARED_FIELDS:
            if name not in skipped and getattr(self, name) != defaults[name]:
                identity[name] = getattr(self, name)
        first, second = (canonical_view(spec) for spec in self.view_specs)
        if first != second:
            identity.update(aug1=first, aug2=second)
        elif first != canonical_view(defaults["aug"]):
            identity["aug"] = first
        own = info.read(self.settings)
        changed = {k: v for k, v in own.items() if v != info.settings[k].default_at(self.method_version)}
        if changed:
            identity["settings"] = changed
        return identity

    def hash(self) -> str:
        """Stable hash of the identity: the same trial gets the same hash on any machine and release."""
        return _digest(self.identity())

    def pretraining_hash(self) -> str:
        """The hash of what pretraining computes: the identity without the evaluation fields. Trials that
        differ only in how they are evaluated share it, and so share one pretraining's weights."""
        identity = {k: v for k, v in self.identity().items() if k not in EVALUATION_FIELDS}
        return _digest({**identity, "part": "pretraining"})

    def replace(self, **changes: Any) -> TrialConfig:
        """A validated copy with `changes` (shared fields, runtime fields or settings of this method)."""
        values = self.values()
        if "dataset" in changes:  # other data: its fingerprint is taken anew
            values.pop("data_fingerprint")
        for key, value in changes.items():
            own = key in self.settings
            values[f"{self.method}.{key}" if own else key] = value
        return from_mapping(values)

    def with_runtime(self, **changes: Any) -> TrialConfig:
        """A copy with other runtime fields (where it runs, not what): the identity is unchanged."""
        unknown = set(changes) - set(RUNTIME_FIELDS)
        if unknown:
            raise ConfigError(f"not runtime fields: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


def _digest(identity: Mapping[str, Any]) -> str:
    payload = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


FINETUNE_FIELDS = (
    "finetune_from",
    "finetune_steps",
    "finetune_batch",
    "finetune_lr",
    "finetune_weight_decay",
    "finetune_aug",
)
# Fields that change how a trial is evaluated, not what it pretrains.
EVALUATION_FIELDS = (
    "knn_k",
    "knn_t",
    "probe_layers",
    "val_fraction",
    "knn_sweep",
    "finetune_labels",
    *FINETUNE_FIELDS,
    "probe_dataset",
)
RUNTIME_FIELDS = ("data_dir", "device", "compile")
SET_BY_SSLAB = ("data_fingerprint",)  # recorded with the trial, never given on the command line
IMAGEFOLDER = "imagefolder:"
WITH_UNLABELLED = ("stl10",)  # datasets with an unlabelled split (`ImageDataset.unlabelled_images`)
# Which behaviour a trial ran (its method's, the shared pipeline's): recorded, and settable to look one up.
VERSION_FIELDS = ("method_version", "pipeline_version")
_INTERNAL_FIELDS = ("settings", *VERSION_FIELDS)
FIELD_NAMES = tuple(f.name for f in fields(TrialConfig) if f.name not in _INTERNAL_FIELDS)
SHARED_FIELDS = tuple(name for name in FIELD_NAMES if name not in RUNTIME_FIELDS)
BACKBONES = ("smallcnn", "resnet18", "resnet50", "vit_micro", "vit_tiny", "vit_small")  # models.backbones

_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "lars", "adam", "adamw"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "probe_layers": ("h", "all"),
    "finetune_from": ("h", "g1"),
    "backbone": BACKBONES,
    "vit_pool": ("cls", "mean"),
}
_POSITIVE = (
    "epochs",
    "batch_size",
    "out_dim",
    "knn_k",
    "knn_t",
    "lr",
    "finetune_steps",
    "finetune_batch",
    "resnet_width",
)
_NON_NEGATIVE = (
    "head",
    "weight_decay",
    "momentum",
    "warmup_epochs",
    "seed",
    "local_crops",
    "local_size",
    "finetune_lr",
    "finetune_weight_decay",
)


def field_help() -> dict[str, str]:
    """Each shared field's help text: the comment beside its default in the class body above."""
    source = inspect.getsource(TrialConfig)
    pattern = re.compile(r"^[ \t]+(\w+): [^=\n]+=[^#\n]*#[ \t]*(.+)$", re.MULTILINE)
    return {name: text.strip() for name, text in pattern.findall(source) if name in FIELD_NAMES}


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrialConfig, globalns={"SettingValues": SettingValues})
    return {f.name: hints[f.name] for f in fields(TrialConfig)}


def field_type(name: str) -> tuple[type, bool]:
    """(underlying scalar type, whether None is allowed) of a shared or runtime field."""
    annotation = _field_types()[name]
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return annotation, False


def coerce_value(name: str, value: Any) -> Any:
    """Convert a value (possibly a CLI string) to the type of shared field `name`, or raise ConfigError."""
    if name not in FIELD_NAMES:
        raise ConfigError(f"unknown config field '{name}'; valid fields: {', '.join(FIELD_NAMES)}")
    kind, nullable = field_type(name)
    value = coerce(kind, nullable, name, value)
    if name == "local_scale" and isinstance(value, str):
        value = _canonical_range(value)
    if name == "finetune_labels" and isinstance(value, str):
        value = ",".join(format_value(p) for p in label_percents(value))
    if name == "probe_dataset" and isinstance(value, str) and value.lower() in ("", "none"):
        value = None
    if name == "base_aug" and isinstance(value, str):
        try:
            canonical = canonical_view(value) if value.lower() not in ("", "none") else "identity"
        except ConfigError as exc:
            raise ConfigError(f"base_aug: {exc}") from None
        value = None if canonical == "identity" else canonical  # no shared step: the same trial as none
    return value


def label_percents(text: str) -> tuple[float, ...]:
    """The label percents of a `finetune_labels` value ("10, 1" -> (1.0, 10.0)), or a one-line ConfigError."""
    percents: set[float] = set()
    for part in (p.strip().removesuffix("%") for p in text.split(",")):
        if not part:
            continue
        try:
            percent = float(part)
        except ValueError:
            percent = math.nan
        if not 0 < percent <= 100:
            raise ConfigError(f"finetune_labels: each entry must be a percent in (0, 100], got {part!r}")
        percents.add(percent)
    return tuple(sorted(percents))


def _canonical_range(text: str) -> str:
    low, sep, high = text.partition("-")
    try:
        return f"{format_value(float(low))}-{format_value(float(high))}" if sep else text
    except ValueError:
        return text


def shared_defaults(info: MethodInfo, version: int | None = None) -> dict[str, Any]:
    """The shared fields' defaults for trials of this method (and version; None: the current one):
    TrialConfig's, then the method's own."""
    base = {f.name: f.default for f in fields(TrialConfig) if f.name in FIELD_NAMES}
    return {**base, **info.shared_defaults_at(version)}


def setting_owners(name: str) -> list[str]:
    """The methods that have a setting called `name`."""
    return [method for method, info in methods().items() if name in info.settings]


def is_known_key(key: str) -> bool:
    """Whether `key` names a shared field, a version field or a setting of some method (bare or as
    `method.setting`)."""
    if key in FIELD_NAMES or key in VERSION_FIELDS:
        return True
    method, dot, setting = key.partition(".")
    if dot:
        return method in methods() and setting in methods()[method].settings
    return bool(setting_owners(key))


def flatten_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """`[dino]`-style tables (a method name mapping to its settings) become `dino.setting` keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        key = key.strip().replace("-", "_")
        if isinstance(value, Mapping) and key in methods():
            flat.update({f"{key}.{k.strip().replace('-', '_')}": v for k, v in value.items()})
        elif isinstance(value, Mapping) and key == "settings":  # a stored record
            flat.update({f"settings.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _unknown_key(key: str) -> str:
    candidates = [*FIELD_NAMES, *{s for info in methods().values() for s in info.settings}]
    close = difflib.get_close_matches(key, candidates, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown field '{key}'{hint}; see `sslab run --help` and `sslab methods NAME`"


def from_mapping(
    values: Mapping[str, Any], source: str = "config", *, other_methods: str = "error"
) -> TrialConfig:
    """Build and validate a TrialConfig from a mapping; every problem is reported at once, on one line.

    Keys are shared fields, settings of the trial's method as `method.setting` (or a `[method]` table, or the
    bare setting name), `method_version` and `pipeline_version`, and, in stored records, `settings`. Missing
    shared fields take the method's defaults, then TrialConfig's; missing settings their declared defaults; a
    stored record (it has `v`) without `pipeline_version` ran version 1. A setting of another
    method is an error unless `other_methods="ignore"` (a study or comparison whose cells differ in method).
    """
    flat = flatten_keys(values)
    problems: list[str] = []
    try:
        method = coerce_value("method", flat.get("method", TrialConfig.method))
        info = method_info(method)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    shared: dict[str, Any] = {}
    own: dict[str, Any] = {}
    versions = {"method_version": info.version, "pipeline_version": 1 if "v" in flat else PIPELINE_VERSION}
    for key, value in flat.items():
        name = key
        if key in FIELD_NAMES:
            try:
                shared[key] = coerce_value(key, value)
            except ConfigError as exc:
                problems.append(str(exc))
            continue
        if key in VERSION_FIELDS:
            try:
                versions[key] = coerce(int, False, key, value)
            except ConfigError as exc:
                problems.append(str(exc))
            continue
        if key == "v":  # a stored record's identity version
            continue
        owner, dot, name = key.partition(".")
        if not dot:
            owner, name = method, key
            if name not in info.settings:
                owners = setting_owners(name)
                if not owners:
                    problems.append(_unknown_key(key))
                elif other_methods != "ignore":
                    problems.append(
                        f"{name} is a setting of {', '.join(owners)}, not of {method} "
                        f"(its settings: {', '.join(info.settings) or 'none'})"
                    )
                continue
        elif owner == "settings":
            owner = method
        if owner != method:
            if owner not in methods() or name not in methods()[owner].settings:
                problems.append(_unknown_key(key))
            elif other_methods != "ignore":
                problems.append(f"{key} is a setting of {owner}, but the trial's method is {method}")
            continue
        if name not in info.settings:
            settings_list = ", ".join(info.settings) or "none"
            problems.append(f"{method} has no setting '{name}'; its settings: {settings_list}")
            continue
        try:
            own[name] = info.settings[name].coerce(f"{method}.{name}", value)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    dataset = shared.get("dataset", "")
    if dataset.startswith(IMAGEFOLDER) and "data_fingerprint" not in shared:  # a stored record keeps its own
        shared["data_fingerprint"] = folder_fingerprint(dataset[len(IMAGEFOLDER) :])
    method_version = versions["method_version"]
    config = TrialConfig(
        **{**shared_defaults(info, method_version), **shared},
        settings=SettingValues({**info.defaults(method_version), **own}),
        method_version=method_version,
        pipeline_version=versions["pipeline_version"],
    )
    problems = list(_problems(config, info))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return config


def _problems(config: TrialConfig, info: MethodInfo) -> Iterator[str]:
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
    if config.weight_decay_end is not None and config.weight_decay_end < 0:
        yield f"weight_decay_end must be >= 0 or none (got {config.weight_decay_end})"
    for name in ("image_size", "train_subset", "head_width", "patch_size"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            yield f"{name} must be > 0 (got {value})"
    # Options of one kind of backbone are errors on another: they would split trials that compute the same.
    if config.resnet_width != 1.0 and not config.backbone.startswith("resnet"):
        yield f"resnet_width applies to ResNet backbones, not {config.backbone}"
    if (config.patch_size is not None or config.vit_pool != "cls") and not config.backbone.startswith("vit_"):
        yield f"patch_size and vit_pool apply to ViT backbones, not {config.backbone}"
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
    if config.pretrain_unlabelled and config.dataset not in WITH_UNLABELLED:
        yield f"pretrain_unlabelled needs a dataset with an unlabelled split ({', '.join(WITH_UNLABELLED)})"
    elif config.pretrain_unlabelled and info.uses_labels:
        yield f"method {config.method} trains on labels, not on unlabelled images: drop pretrain_unlabelled"
    if config.local_crops and not info.multicrop:
        yield f"method {config.method} does not use local crops; set local_crops=0"
    if not 1 <= config.method_version <= info.version:
        yield f"method_version must be in 1..{info.version} for {config.method} (got {config.method_version})"
    if config.pipeline_version not in VERSIONS:
        known = ", ".join(map(str, VERSIONS))
        yield f"pipeline_version must be one of {known} (got {config.pipeline_version})"
    for spec in config.view_specs:
        try:
            parse_steps(spec)
        except ConfigError as exc:
            yield str(exc)
    if config.finetune_labels:
        try:
            parse_steps(config.finetune_aug)
        except ConfigError as exc:
            yield f"finetune_aug: {exc}"
        if config.finetune_from == "g1" and config.head < 2 and "head" not in info.ignores:
            yield "finetune_from=g1 needs a head with a hidden layer (head >= 2)"
    for name, setting in info.settings.items():
        yield from setting.problems(f"{config.method}.{name}", config.settings[name])


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
    """Parse `key=value` strings (from `--set`) into a dict, checking that each key exists somewhere."""
    result: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if not is_known_key(key):
            raise ConfigError(f"--set: {_unknown_key(key)}")
        result[key] = value.strip()
    return result


def from_sources(
    config_file: str | Path | None = None,
    sets: list[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> TrialConfig:
    """Defaults < a TOML file < `--set key=value` < explicit options (None = not given)."""
    values: dict[str, Any] = {}
    source = "command line"
    if config_file is not None:
        values.update(flatten_keys(load_toml(config_file)))
        source = str(config_file)
    values.update(parse_assignments(sets or []))
    values.update({k: v for k, v in (options or {}).items() if v is not None})
    return from_mapping(values, source=source)
