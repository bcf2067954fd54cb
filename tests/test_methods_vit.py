"""MoCo v3 and DINO on Vision Transformers: their ViT heads against the official code, the CNN heads
unchanged, DINO's teacher entropy, the two ViT presets at tiny scale, and a short real MoCo v3 ViT run."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from rich.console import Console
from steps import step_context
from torch import nn

from sslab.config import from_mapping
from sslab.methods.base import Method, build_method
from sslab.methods.dino import teacher_entropy
from sslab.models import build_backbone
from sslab.runner import run_trial
from sslab.store import Store
from sslab.study import load_plan
from sslab.study.scheduler import RunOptions, run_study

N, SIDE = 8, 28


def make(method: str, backbone: str = "vit_micro", **fields: Any) -> Method:
    config = from_mapping({"method": method, "backbone": backbone, "batch_size": N, **fields})
    torch.manual_seed(0)
    return build_method(config, build_backbone(backbone, 1, SIDE), num_classes=10)


def official_mlp(
    num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True
) -> list:
    """The layers of MoCo v3's `MoCo._build_mlp` (facebookresearch/moco-v3, moco/builder.py), flattened."""
    mlp: list[nn.Module] = []
    for index in range(num_layers):
        dim1 = input_dim if index == 0 else mlp_dim
        dim2 = output_dim if index == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if index < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return mlp


def official_dino_mlp(in_dim: int, use_bn: bool, nlayers: int, hidden_dim: int, bottleneck_dim: int) -> list:
    """The layers of DINO's `DINOHead.mlp` (facebookresearch/dino, vision_transformer.py) for nlayers >= 2.

    A Linear followed by batch-norm has no bias here: the batch-norm cancels it (sslab's heads leave it out).
    """
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not use_bn)]
    for _ in range(nlayers - 1):
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, hidden_dim, bias=not use_bn))
    layers[-1] = nn.Linear(hidden_dim, bottleneck_dim)
    return layers


def describe(layers: list[nn.Module] | nn.Module) -> list[tuple[Any, ...]]:
    """Each layer's type and what defines it: shapes and bias of a Linear, width and affine of a BatchNorm."""
    modules = (
        [m for m in layers.modules() if not list(m.children())] if isinstance(layers, nn.Module) else layers
    )
    out: list[tuple[Any, ...]] = []
    for m in modules:
        if isinstance(m, nn.Linear):
            out.append(("Linear", m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("BatchNorm1d", m.num_features, m.affine))
        else:
            out.append((type(m).__name__,))
    return out


# ------------------------------------------------------------------------------------------ MoCo v3 heads


def test_mocov3_vit_heads_are_moco_vits() -> None:
    """MoCo_ViT: a 3-layer projector and a 2-layer predictor, each ending in a BN without gamma or beta."""
    method = make("mocov3", head=3, head_width=64, pred_width=96)
    d = method.config.out_dim
    assert describe(method.head) == describe(official_mlp(3, 128, 64, d))
    assert method.predictor is not None
    assert describe(method.predictor) == describe(official_mlp(2, d, 96, d))
    assert len(method.head.layers) == 3 and len(method.predictor.layers) == 2
    for mlp in (method.head, method.predictor):
        last = mlp.layers[-1][-1]
        assert isinstance(last, nn.BatchNorm1d) and not last.affine
    assert describe(method.momentum_head) == describe(method.head)


def test_mocov3_defaults_are_its_vit_recipes() -> None:
    s = make("mocov3").settings
    assert s.temperature == 0.2 and s.ema == 0.99 and s.ema_cosine and s.pred_bn  # --moco-t=.2, --moco-m-cos


# The head and predictor of MoCo v3 on the small CNN, as built before the ViT recipes were added (the same
# keys, shapes and, for a fixed seed, values), but for the predictor's output BN, which MoCo_ResNet's lacks
# (version 3).
MOCOV3_CNN_HEADS = [
    ("head.layers.0.0.weight", (256, 256)),
    ("head.layers.0.1.weight", (256,)),
    ("head.layers.0.1.bias", (256,)),
    ("head.layers.0.1.running_mean", (256,)),
    ("head.layers.0.1.running_var", (256,)),
    ("head.layers.0.1.num_batches_tracked", ()),
    ("head.layers.1.0.weight", (256, 256)),
    ("head.layers.1.1.running_mean", (256,)),
    ("head.layers.1.1.running_var", (256,)),
    ("head.layers.1.1.num_batches_tracked", ()),
    ("predictor.layers.0.0.weight", (512, 256)),
    ("predictor.layers.0.1.weight", (512,)),
    ("predictor.layers.0.1.bias", (512,)),
    ("predictor.layers.0.1.running_mean", (512,)),
    ("predictor.layers.0.1.running_var", (512,)),
    ("predictor.layers.0.1.num_batches_tracked", ()),
    ("predictor.layers.1.0.weight", (256, 512)),
]


@pytest.mark.parametrize(
    ("backbone", "pred_out_bn", "out_bn"),
    [
        ("smallcnn", "auto", False),
        ("vit_micro", "auto", True),
        ("smallcnn", "on", True),
        ("vit_micro", "off", False),
    ],
)
def test_mocov3_predictor_is_the_official_one_for_its_backbone(
    backbone: str, pred_out_bn: str, out_bn: bool
) -> None:
    """MoCo_ResNet's predictor: _build_mlp(2, dim, mlp_dim, dim, last_bn=False); MoCo_ViT's keeps last_bn."""
    method = make("mocov3", backbone=backbone, pred_width=96, pred_out_bn=pred_out_bn)
    d = method.config.out_dim
    assert method.predictor is not None
    assert describe(method.predictor) == describe(official_mlp(2, d, 96, d, last_bn=out_bn))
    assert method.config.method_version == 3
    old = make("mocov3", backbone="smallcnn", pred_width=96, method_version=2)  # read back, never trained
    assert old.settings.pred_out_bn == "on"


def test_mocov3_cnn_heads_are_unchanged() -> None:
    method = make("mocov3", backbone="smallcnn")
    heads = [
        (k, tuple(v.shape)) for k, v in method.state_dict().items() if k.startswith(("head.", "predictor."))
    ]
    assert heads == MOCOV3_CNN_HEADS
    assert {type(m) for m in method.head.modules()} >= {nn.ReLU} and nn.GELU not in map(
        type, method.modules()
    )


# ------------------------------------------------------------------------------------------ DINO's head


@pytest.mark.parametrize("head_bn", [False, True])
def test_dino_vit_head_is_dinohead(head_bn: bool) -> None:
    """DINOHead: GELU, batch-norm only with use_bn_in_head (off for ViTs), truncated-normal weights."""
    method = make("dino", head_bn=head_bn, head_width=64)
    assert describe(method.head) == describe(official_dino_mlp(128, head_bn, 3, 64, 256))
    linears = [m for m in method.head.modules() if isinstance(m, nn.Linear)]
    for layer in linears:  # trunc_normal_(std=.02), bias 0
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert layer.bias is None or not layer.bias.any()
    assert describe(method.teacher["head"]) == describe(method.head)
    assert method.prototypes.shape == (method.config.out_dim, 256)  # weight-normalised last layer, g = 1
    z = torch.randn(4, 256)
    out = method._out(z, method.prototypes)
    assert out.abs().max() <= 1 + 1e-6  # cosines: unit-norm rows of V and of z


def test_dino_cnn_head_is_unchanged() -> None:
    """Its CNN head keeps ReLU, the batch-norm and nn.Linear's initialisation, as before the ViT head."""
    method = make("dino", backbone="smallcnn", head_width=64)
    reference = [
        ("Linear", 256, 64, False),
        ("BatchNorm1d", 64, True),
        ("ReLU",),
        ("Linear", 64, 64, False),
        ("BatchNorm1d", 64, True),
        ("ReLU",),
        ("Linear", 64, 256, True),
    ]
    assert describe(method.head) == reference
    first = method.head.layers[0][0].weight
    bound = 1 / math.sqrt(256)  # nn.Linear's uniform initialisation
    assert first.abs().max() <= bound and first.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


# ------------------------------------------------------------------------------------------ teacher entropy


def test_teacher_entropy_by_hand() -> None:
    k, tau = 16, 0.04
    zeros = torch.zeros(1, k)
    uniform = [torch.full((4, k), 0.3), torch.full((4, k), -0.2)]  # every row's softmax is uniform
    assert teacher_entropy(uniform, zeros, tau).item() == pytest.approx(math.log(k))
    one_hot = torch.zeros(4, k)
    one_hot[:, 3] = 1.0  # (1 - 0) / 0.04 = 25 nats ahead of every other logit
    assert teacher_entropy([one_hot, one_hot], zeros, tau).item() == pytest.approx(0.0, abs=1e-8)
    # Two classes with P_t = (1/4, 3/4): logits (0, ln 3) after centering and dividing by tau.
    t = torch.tensor([[0.5, 0.5 + tau * math.log(3)]])
    c = torch.tensor([[0.5, 0.5]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.5623 nats
    assert teacher_entropy([t, t], c, tau).item() == pytest.approx(expected, rel=1e-5)
    # The centre is subtracted: centring the one-hot rows away leaves the uniform distribution.
    assert teacher_entropy([one_hot], one_hot[:1], tau).item() == pytest.approx(math.log(k))
    mixed = teacher_entropy([torch.cat([one_hot[:2], uniform[0][:2]])], zeros, tau)  # mean over the rows
    assert mixed.item() == pytest.approx(math.log(k) / 2)


def test_dino_step_reports_the_teacher_entropy_of_its_targets() -> None:
    method = make("dino", head_bn=False, local_crops=0)
    method.train()
    views = [torch.randn(N, 1, SIDE, SIDE), torch.randn(N, 1, SIDE, SIDE)]
    center = method.center.clone()
    out = method(views, torch.zeros(N, dtype=torch.long), step_context(rows=N))
    entropy = out.metrics["teacher_entropy"]
    assert isinstance(entropy, torch.Tensor) and entropy.dim() == 0 and not entropy.requires_grad
    with torch.no_grad():
        h = method.teacher["backbone"](torch.cat(views))
        teacher = method._out(method.teacher["head"](h), method.teacher_prototypes)  # (2N, K)
        p = torch.softmax((teacher - center) / method.teacher_temp, dim=1)
        by_hand = -(p * p.clamp_min(1e-30).log()).sum(dim=1).mean()
    torch.testing.assert_close(entropy, by_hand)
    assert 0 <= entropy.item() <= math.log(method.config.out_dim)


def test_teacher_entropy_is_recorded_per_epoch(tmp_path) -> None:
    config = from_mapping(
        {
            "method": "dino",
            "train_subset": 256,
            "batch_size": 128,
            "epochs": 2,
            "local_crops": 0,
            "head_width": 256,
        }
    )
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    outcome = run_trial(config, store, checkpoint_dir=tmp_path)
    assert outcome.status == "done"
    rows = {m.epoch: m.value for m in store.metrics(outcome.trial_id) if m.name == "teacher_entropy"}
    assert sorted(e for e in rows if e is not None) == [1, 2]
    assert all(0 <= value <= math.log(4096) for value in rows.values())
    assert outcome.metrics["teacher_entropy"] == rows[2]  # the last epoch's is also a final metric


# ------------------------------------------------------------------------------------------ the presets

# The built-in coloured shapes (3 channels, as CIFAR-10) at 16 px: 16 patches, 200 test images, ~3 s a trial.
# The presets ask for bf16, which a CPU without native bf16 emulates many times slower than fp32: auto here.
TINY = {"dataset": "synthetic", "image_size": "16", "train_subset": "256", "batch_size": "128", "epochs": "2"}
TINY["precision"] = "auto"


def test_mocov3_preset_records_the_per_epoch_knn_and_never_prunes(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan = load_plan("mocov3-vit-stability", TINY)
    cells = [cell.config for cell in plan.cells]
    assert len(cells) == 2
    assert {(c.settings.freeze_patch_embed, c.lr) for c in cells} == {(False, 1e-2), (True, 1e-2)}
    assert all(c.backbone == "vit_micro" and c.head == 3 and c.optimizer == "adamw" for c in cells)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    result = run_study(plan, url, RunOptions(), Console(file=io.StringIO()))
    assert result.counts == {"done": 2}
    store = Store(url)
    for cell in plan.cells:
        row = store.find(cell.hash)
        assert row is not None and row.status == "done"
        metrics = store.metrics(row.id)
        for name in ("loss", "knn_val_top1"):
            values = {m.epoch: m.value for m in metrics if m.name == name and m.epoch is not None}
            assert sorted(values) == [1, 2] and all(math.isfinite(v) for v in values.values()), name


def test_dino_preset_records_entropy_and_collapse_per_epoch(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan = load_plan("dino-centering", TINY)
    configs = [cell.config for cell in plan.cells]
    assert len(configs) == 3 and all(c.backbone == "vit_micro" and not c.head_bn for c in configs)
    variants = {
        (c.settings.centering, c.settings.teacher_temp, c.settings.teacher_temp_start) for c in configs
    }
    assert variants == {
        (True, 0.04, 0.04),
        (False, 0.04, 0.04),
        (True, 0.1, 0.1),
    }  # full, no c, no sharpening
    assert all(c.settings.temperature == 0.1 for c in configs)  # the student's: no sharpening at 0.1
    url = f"sqlite:///{tmp_path / 'r.db'}"
    result = run_study(plan, url, RunOptions(), Console(file=io.StringIO()))
    assert result.counts == {"done": 3}
    store = Store(url)
    for cell in plan.cells:
        row = store.find(cell.hash)
        assert row is not None
        metrics = store.metrics(row.id)
        for name in ("teacher_entropy", "collapse_ratio"):
            values = {m.epoch: m.value for m in metrics if m.name == name and m.epoch is not None}
            assert sorted(values) == [1, 2] and all(math.isfinite(v) for v in values.values()), name
        entropy = [m.value for m in metrics if m.name == "teacher_entropy"]
        assert all(0 <= v <= math.log(cell.config.out_dim) + 1e-6 for v in entropy)


# ------------------------------------------------------------------------------------------ a real run


# Measured with this config at train_subset 1024 (8 steps), seeds 0 and 1: linear top-1 0.5625 and 0.5705
# against the random-init probe's 0.577 and 0.5895, kNN 0.309 and 0.316 against 0.3735 and 0.363; a ViT
# needs far more steps than this to beat its random features, so no margin is asserted.
def test_short_mocov3_vit_run_finishes_with_a_finite_loss(tmp_path) -> None:
    config = from_mapping(
        {
            "method": "mocov3",
            "backbone": "vit_micro",
            "head": 3,
            "optimizer": "adamw",
            "lr": 1e-3,
            "weight_decay": 0.1,
            "train_subset": 512,
            "epochs": 2,
        }
    )
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    outcome = run_trial(config, store, checkpoint_dir=tmp_path)
    assert outcome.status == "done" and outcome.collapsed is False
    losses = [m.value for m in store.metrics(outcome.trial_id) if m.name == "loss"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert losses[1] < losses[0]
