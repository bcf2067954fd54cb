"""ViT backbones (timm): sizes, pooling, weight-decay groups, a frozen patch projection; ResNet widths."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torchvision
from steps import step_context
from torch import nn

from sslab.config import from_mapping
from sslab.errors import ConfigError
from sslab.methods.base import build_method
from sslab.models import build_backbone
from sslab.optim import build_optimizer
from sslab.runner import run_trial
from sslab.store import Store

N = 8


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("side", "patch"), [(28, 4), (32, 4), (96, 8)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_features_for_any_size_and_channel_count(side: int, patch: int, channels: int, pool: str) -> None:
    backbone = build_backbone("vit_micro", channels, side, vit_pool=pool)
    assert backbone.patch_embed.patch_size == (patch, patch)  # the default patch for the image size
    assert backbone.feature_dim == 128 and backbone.channels_last is False
    x = torch.randn(2, channels, side, side)
    h = backbone(x)
    assert h.shape == (2, 128) and torch.isfinite(h).all()
    tokens = backbone.forward_features(x)  # (2, T, D), the final norm applied for cls pooling
    if pool == "cls":
        assert tokens.shape[1] == (side // patch) ** 2 + 1
        torch.testing.assert_close(h, tokens[:, 0])
    else:  # no class token: the mean of the patch tokens, normalised after pooling
        assert backbone.cls_token is None and tokens.shape[1] == (side // patch) ** 2
        torch.testing.assert_close(h, backbone.fc_norm(tokens.mean(1)))


def test_vit_takes_smaller_crops_than_its_image_size() -> None:
    """Multi-crop's local crops (3/7 of the side: 12 px of 28, 14 of 32) need no whole number of patches."""
    backbone = build_backbone("vit_micro", 3, 32)
    for side in (12, 14, 32):
        assert backbone(torch.randn(2, 3, side, side)).shape == (2, 128)


@pytest.mark.parametrize(
    ("name", "timm_name", "side", "patch"),
    [
        ("vit_tiny", "vit_tiny_patch16_224", 32, 4),
        ("vit_tiny", "vit_tiny_patch16_224", 224, 16),
        ("vit_small", "vit_small_patch16_224", 32, 4),
    ],
)
def test_vit_sizes_are_timms_named_models(name: str, timm_name: str, side: int, patch: int) -> None:
    ours = build_backbone(name, 3, side, patch_size=patch)
    reference = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=side, patch_size=patch)
    assert count(ours) == count(reference)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert ours.feature_dim == reference.num_features


def test_vit_micro_size() -> None:
    # 4 blocks of 12 D^2 + 13 D parameters (qkv, proj, 4x MLP, two norms), at D = 128, plus the embeddings.
    backbone = build_backbone("vit_micro", 1, 28)
    d, tokens = 128, 7 * 7 + 1
    blocks = 4 * (12 * d * d + 13 * d)
    embedding = (4 * 4 * 1 + 1) * d + tokens * d + d  # patch projection, positions, class token
    assert count(backbone) == blocks + embedding + 2 * d  # + the final norm
    assert len(backbone.blocks) == 4 and backbone.blocks[0].attn.num_heads == 4


def test_a_patch_size_that_does_not_divide_the_image_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError) as error:
        build_backbone("vit_micro", 1, 28, patch_size=8)
    assert "patch_size 8 does not divide the 28-px images" in str(error.value)
    assert "\n" not in str(error.value)
    assert build_backbone("vit_micro", 1, 28, patch_size=7).patch_embed.grid_size == (4, 4)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"backbone": "vit_micro", "patch_size": 0}, "patch_size must be > 0"),
        ({"backbone": "vit_micro", "vit_pool": "max"}, "vit_pool must be one of cls, mean"),
        ({"patch_size": 4}, "patch_size and vit_pool apply to ViT backbones, not smallcnn"),
        ({"backbone": "resnet18", "vit_pool": "mean"}, "apply to ViT backbones, not resnet18"),
        (
            {"backbone": "vit_tiny", "resnet_width": 2},
            "resnet_width applies to ResNet backbones, not vit_tiny",
        ),
        ({"backbone": "resnet18", "resnet_width": 0}, "resnet_width must be > 0"),
    ],
)
def test_backbone_options_are_checked_by_the_config(values: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping(values)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_backbone_options_at_their_defaults_leave_the_identity_alone() -> None:
    plain = from_mapping({"backbone": "vit_tiny"})
    spelled = from_mapping({"backbone": "vit_tiny", "patch_size": None, "vit_pool": "cls"})
    assert plain.hash() == spelled.hash() and "patch_size" not in plain.identity()
    assert from_mapping({"backbone": "vit_tiny", "patch_size": 8}).hash() != plain.hash()
    resnet = from_mapping({"backbone": "resnet18"})
    assert from_mapping({"backbone": "resnet18", "resnet_width": 1}).hash() == resnet.hash()


def test_vit_weight_decay_skips_positions_class_token_norms_and_biases() -> None:
    config = from_mapping({"method": "simclr", "backbone": "vit_micro", "optimizer": "adamw"})
    method = build_method(config, build_backbone("vit_micro", 3, 32), num_classes=10)
    optimizer = build_optimizer(config, method)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): name for name, p in method.named_parameters()}
    groups = [(g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]
    decayed = set().union(*(group for decay, group in groups if decay > 0))
    undecayed = set().union(*(group for decay, group in groups if decay == 0))
    assert decayed | undecayed == set(names.values()) and not decayed & undecayed
    backbone = {name.removeprefix("backbone.") for name in undecayed if name.startswith("backbone.")}
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "patch_embed.proj.bias"} <= backbone
    assert {
        "blocks.0.norm1.weight",
        "blocks.0.norm1.bias",
        "blocks.3.norm2.weight",
        "blocks.3.mlp.fc2.bias",
    } <= (backbone)
    assert {
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.blocks.0.attn.proj.weight",
        "backbone.blocks.0.mlp.fc1.weight",
        "backbone.blocks.3.mlp.fc2.weight",
        "head.layers.0.0.weight",
    } <= decayed
    # Exactly the linear and convolution weights decay: no bias, norm, position or token does.
    matrices = {name for name, p in method.named_parameters() if p.ndim >= 2}
    assert decayed == matrices - {"backbone.pos_embed", "backbone.cls_token"}


def test_frozen_patch_projection_stays_fixed_while_the_rest_trains() -> None:
    config = from_mapping(
        {
            "method": "mocov3",
            "backbone": "vit_micro",
            "optimizer": "adamw",
            "lr": 1e-3,
            "freeze_patch_embed": True,
        }
    )
    torch.manual_seed(0)
    method = build_method(config, build_backbone("vit_micro", 1, 28), num_classes=10)
    optimizer = build_optimizer(config, method, method.fixed_lr_parameters())
    before = {name: p.detach().clone() for name, p in method.backbone.named_parameters()}
    method.train()
    views = [torch.randn(N, 1, 28, 28), torch.randn(N, 1, 28, 28)]
    loss = method(views, torch.zeros(N, dtype=torch.long), step_context(rows=N)).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = dict(method.backbone.named_parameters())
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert not after[name].requires_grad and torch.equal(after[name], before[name]), name
    for name in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "pos_embed", "cls_token"):
        assert not torch.equal(after[name], before[name]), name
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(after["patch_embed.proj.weight"]) not in in_optimizer


def test_patch_projection_is_trained_by_default() -> None:
    config = from_mapping({"method": "mocov3", "backbone": "vit_micro"})
    method = build_method(config, build_backbone("vit_micro", 1, 28), num_classes=10)
    assert method.backbone.patch_embed.proj.weight.requires_grad


def test_freezing_the_patch_projection_of_a_cnn_is_a_one_line_error() -> None:
    config = from_mapping({"method": "mocov3", "freeze_patch_embed": True})
    with pytest.raises(ConfigError) as error:
        build_method(config, build_backbone("smallcnn", 1, 28), num_classes=10)
    assert "freeze_patch_embed needs a ViT backbone (got smallcnn)" in str(error.value)
    assert "\n" not in str(error.value)


def _resnet_before_widths(factory, in_channels: int, cifar_stem: bool) -> nn.Module:  # type: ignore[no-untyped-def]
    """The ResNet backbone as it was built before the width option: torchvision's, stem replaced."""
    model = factory(weights=None)
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    model.fc = nn.Identity()
    return model


@pytest.mark.parametrize(
    ("name", "factory", "channels", "side"),
    [
        ("resnet18", torchvision.models.resnet18, 3, 32),
        ("resnet18", torchvision.models.resnet18, 1, 96),
        ("resnet18", torchvision.models.resnet18, 3, 96),
        ("resnet50", torchvision.models.resnet50, 1, 28),
    ],
)
def test_resnets_at_width_1_are_the_models_of_before(name: str, factory, channels: int, side: int) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    old = _resnet_before_widths(factory, channels, side <= 64)
    old_state, old_rng = old.state_dict(), torch.get_rng_state()
    torch.manual_seed(3)
    new = build_backbone(name, channels, side)
    new_state = new.state_dict()
    assert list(new_state) == list(old_state)
    for key, value in old_state.items():
        assert torch.equal(new_state[key], value), key
    assert torch.equal(torch.get_rng_state(), old_rng)  # what is drawn next (head, method) is unchanged too
    assert new.feature_dim == (512 if name == "resnet18" else 2048) and new.channels_last


@pytest.mark.parametrize(("name", "expansion"), [("resnet18", 1), ("resnet50", 4)])
@pytest.mark.parametrize("width", [0.5, 2.0])
def test_resnet_width_scales_every_stage(name: str, expansion: int, width: float) -> None:
    backbone = build_backbone(name, 1, 28, resnet_width=width)
    base = int(64 * width)
    assert backbone.conv1.out_channels == base and backbone.bn1.num_features == base
    for index, layer in enumerate((backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)):
        planes = base * 2**index
        last = layer[-1]
        assert last.conv1.out_channels == planes, (index, last)  # a bottleneck's inner width scales too
        assert (last.conv3 if expansion == 4 else last.conv2).out_channels == planes * expansion
    assert backbone.feature_dim == 8 * base * expansion
    assert backbone(torch.randn(2, 1, 28, 28)).shape == (2, backbone.feature_dim)


def test_a_vit_trains_through_the_runner(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # 7-px patches (16 tokens) keep the run short on a CPU: one epoch of 1000 images, 3 AdamW steps. Measured
    # linear_top1 over baseline_linear_top1: +0.024 (seed 0: 0.634 vs 0.610), +0.026 (seed 1), +0.031 (seed
    # 2); asserted for half the smallest. kNN top-1 falls in those 3 steps (-0.06 to -0.10): not asserted.
    values = {"method": "simclr", "backbone": "vit_micro", "patch_size": 7, "train_subset": 1000, "epochs": 1}
    config = from_mapping({**values, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "seed": 0})
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    outcome = run_trial(config, store, checkpoint_dir=tmp_path)
    assert outcome.status == "done" and outcome.collapsed is False, outcome
    assert math.isfinite(outcome.metrics["final_loss"]) and outcome.metrics["final_loss"] > 0
    assert outcome.metrics["linear_top1"] - outcome.metrics["baseline_linear_top1"] > 0.012, outcome.metrics
