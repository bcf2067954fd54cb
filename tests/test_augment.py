"""Tests for sslab.augment: every op's contract, op-specific semantics and view-spec parsing."""

import colorsys
from collections.abc import Callable

import pytest
import torch
import torchvision.transforms.functional as TF

from sslab.augment import describe_ops
from sslab.augment.color import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    hsv_to_rgb,
    rgb_to_hsv,
    to_gray,
)
from sslab.augment.ops import (
    OPS,
    OpInfo,
    Param,
    _apply_grouped,
    _apply_where,
    _blur_size,
    _crop_boxes,
    _gaussian_blur,
    _jitter_,
)
from sslab.augment.spec import _parse_value
from sslab.augment.view import View, parse_view
from sslab.errors import AugmentError

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]
# Ops whose only randomness is the coin: with p=1 they are deterministic, so keep p below 1 there.
COIN_ONLY = {"flip", "grayscale", "solarize"}
RGB_ONLY = {"lab"}  # colour-space conversions: a one-line error on single-channel images


def images(
    n: int = 8, c: int = 3, h: int = 16, w: int = 16, seed: int = 0, device: str = "cpu"
) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)).to(device)


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def run(name: str, x: torch.Tensor, seed: int = 0, **params: object) -> torch.Tensor:
    return OPS[name].fn(x, gen(seed, x.device.type), **{**OPS[name].defaults(), **params})


def is_random(name: str, channels: int) -> bool:
    return OPS[name].random and not (name == "grayscale" and channels == 1)


def forced(name: str) -> dict[str, float]:
    """Parameters that make an op act on every sample with per-sample random parameters."""
    if "p" not in OPS[name].params:
        return {}
    return {"p": 0.5 if name in COIN_ONLY else 1.0}


# --- contract of every op ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(OPS))
def test_op_shape_dtype_range(name: str, channels: int, device: str) -> None:
    x = images(c=channels, h=12, w=20, device=device)
    if channels == 1 and name in RGB_ONLY:
        with pytest.raises(AugmentError, match=f"^{name}: needs RGB images \\(3 channels\\), got 1 channel"):
            run(name, x)
        return
    out = run(name, x, **forced(name))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(OPS))
def test_op_seeded_determinism(name: str, channels: int, device: str) -> None:
    if channels == 1 and name in RGB_ONLY:
        pytest.skip("RGB only")
    x = images(n=64, c=channels, device=device)
    assert torch.equal(run(name, x, seed=1), run(name, x, seed=1))
    if is_random(name, channels):
        assert not torch.equal(run(name, x, seed=1), run(name, x, seed=2))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", [name for name in OPS if OPS[name].random])
def test_op_per_sample_randomness(name: str, channels: int) -> None:
    if not is_random(name, channels):
        pytest.skip("no-op for this channel count")
    x = images(n=1, c=channels).expand(16, -1, -1, -1).contiguous()
    out = run(name, x, **forced(name))
    assert any(not torch.equal(out[0], out[i]) for i in range(1, len(out)))


@pytest.mark.parametrize("name", list(OPS))
def test_op_leaves_input_untouched(name: str) -> None:
    x = images()
    before = x.clone()
    run(name, x, **forced(name))
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", list(OPS))
def test_op_inplace_gives_the_same_result(name: str) -> None:
    x = images(n=32)
    assert torch.equal(run(name, x.clone(), inplace=True, **forced(name)), run(name, x, **forced(name)))


# --- geometric ops -------------------------------------------------------------------------------------


def test_flip_always() -> None:
    x = images()
    assert torch.equal(run("flip", x, p=1.0), torch.flip(x, [-1]))
    assert torch.equal(run("flip", x, p=0.0), x)


def test_rotate_is_a_quarter_turn_and_never_identity() -> None:
    x = images(n=64)
    out = run("rotate", x)
    seen = set()
    for image, rotated in zip(x, out, strict=True):
        matches = [k for k in (0, 1, 2, 3) if torch.equal(rotated, torch.rot90(image, k, (-2, -1)))]
        assert len(matches) == 1 and matches[0] != 0
        seen.add(matches[0])
    assert seen == {1, 2, 3}


def test_rotate_keeps_non_square_size() -> None:
    x = images(n=32, h=6, w=10)
    out = run("rotate", x)
    assert out.shape == x.shape
    half_turns = [i for i in range(32) if torch.equal(out[i], torch.rot90(x[i], 2, (-2, -1)))]
    assert half_turns  # some samples got the size-preserving 180 degree turn


def test_crop_full_box_is_identity() -> None:
    x = images()
    assert torch.allclose(run("crop", x, scale=(1.0, 1.0), ratio=(1.0, 1.0)), x, atol=1e-6)
    # a box that cannot fit falls back to the whole image
    assert torch.allclose(run("crop", x, scale=(1.0, 1.0), ratio=(2.0, 2.0)), x, atol=1e-6)


def test_crop_boxes_follow_scale_and_ratio() -> None:
    x = images(n=512, h=24, w=32)
    left, top, box_w, box_h = _crop_boxes(512, 24, 32, (0.2, 0.6), (0.5, 2.0), gen(), x)
    for value in (left, top, box_w, box_h):
        assert torch.equal(value, value.round())  # whole pixels, as torchvision's RandomResizedCrop
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + box_w <= 32).all() and (top + box_h <= 24).all()
    # sides are rounded from the drawn area and aspect: within half a pixel each
    low = (box_w - 0.5) * (box_h - 0.5) / (24 * 32)
    high = (box_w + 0.5) * (box_h + 0.5) / (24 * 32)
    assert ((high > 0.2) & (low < 0.6)).all()
    assert (((box_w + 0.5) / (box_h - 0.5) > 0.5) & ((box_w - 0.5) / (box_h + 0.5) < 2.0)).all()
    assert left.unique().numel() > 10 and (left + box_w == 32).any()  # corners reach the far edge


@pytest.mark.parametrize(("size", "out"), [(0.0, (12, 20)), (7.0, (7, 7)), (30.0, (30, 30))])
def test_crop_is_torchvisions_antialiased_resized_crop_of_the_box(size: float, out: tuple[int, int]) -> None:
    x = images(n=16, h=12, w=20)
    cropped = run("crop", x, size=size)
    assert cropped.shape == (16, 3, *out)
    boxes = _crop_boxes(16, 12, 20, (0.08, 1.0), (0.75, 1.333), gen(), x)  # same draws as the op
    for i, (left, top, box_w, box_h) in enumerate(zip(*boxes, strict=True)):
        box = [int(top), int(left), int(box_h), int(box_w)]
        expected = TF.resized_crop(x[i], *box, list(out), antialias=True)
        assert torch.allclose(cropped[i], expected, atol=1e-5)


def test_cutout_zeroes_a_square_of_the_expected_area() -> None:
    x = torch.ones(16, 3, 32, 32)
    out = run("cutout", x, size=(0.25, 0.25))
    for image in out:
        hole = image[0] == 0
        assert hole.sum() == 64 and (image == 0).sum() == 3 * 64
        rows, cols = hole.any(1).nonzero(), hole.any(0).nonzero()
        assert rows.max() - rows.min() == 7 and cols.max() - cols.min() == 7  # an 8 x 8 square
    assert torch.equal(run("cutout", x, p=0.0), x)


# --- photometric ops -----------------------------------------------------------------------------------


def test_grayscale_luma() -> None:
    x = images()
    out = run("grayscale", x, p=1.0)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for channel in range(3):
        assert torch.allclose(out[:, channel], luma, atol=1e-6)


def test_color_strength_zero_is_identity() -> None:
    x = images()
    assert torch.equal(run("color", x, s=0.0, p=1.0, gray=0.0), x)
    gray = run("color", x, s=0.0, p=1.0, gray=1.0)
    assert torch.allclose(gray, to_gray(x).expand_as(x), atol=1e-6)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_adjustments_match_torchvision(ours: Callable, theirs: Callable, channels: int) -> None:
    x = images(n=16, c=channels)
    factor = torch.linspace(0.0, 2.0, 16)
    expected = torch.stack([theirs(image, float(f)) for image, f in zip(x, factor, strict=True)])
    # torchvision weighs red by 0.2989 in its luma, ours by 0.299 (ITU-R 601-2)
    atol = 2e-4 if ours is not adjust_brightness and channels == 3 else 1e-5
    assert torch.allclose(ours(x, factor), expected, atol=atol)


def test_hue_matches_torchvision() -> None:
    x = images(n=32)
    x[0] = 0.5  # grey: no hue
    x[1, 0], x[1, 1] = 1.0, 1.0  # ties between channels
    shift = torch.linspace(-0.5, 0.5, 32)
    expected = torch.stack([TF.adjust_hue(image, float(s)) for image, s in zip(x, shift, strict=True)])
    assert torch.allclose(adjust_hue(x, shift), expected, atol=1e-5)


def test_hue_round_trip() -> None:
    x = images(n=16)
    x[0] = 0.25
    x[1, :, :4] = 1.0
    assert torch.allclose(adjust_hue(x, torch.zeros(16)), x, atol=1e-5)
    hsv = rgb_to_hsv(x)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-5)
    pixel = x[5, :, 3, 3].tolist()
    assert torch.allclose(hsv[5, :, 3, 3], torch.tensor(colorsys.rgb_to_hsv(*pixel)), atol=1e-5)


def test_jitter_follows_the_order() -> None:
    x = images(n=8)
    factors = torch.tensor([1.3, 0.6, 1.5, 0.2]).expand(8, 4)
    order = [2, 0, 3, 1]
    expected = adjust_contrast(
        adjust_hue(adjust_brightness(adjust_saturation(x, factors[:, 2]), factors[:, 0]), factors[:, 3]),
        factors[:, 1],
    )
    assert torch.allclose(_jitter_(x.clone(), factors, order), expected, atol=1e-6)


def test_jitter_draws_each_images_order_as_torchvision_does() -> None:
    x = images(n=64)
    out = run("jitter", x, p=0.7)
    g = gen()  # the op's draws, in its order: coin, factors, order
    hit = torch.rand(64, generator=g) < 0.7
    lo, hi = torch.tensor([0.6, 0.6, 0.6, -0.1]), torch.tensor([1.4, 1.4, 1.4, 0.1])
    factors = torch.rand(64, 4, generator=g) * (hi - lo) + lo
    orders = torch.rand(64, 4, generator=g).argsort(1)
    assert len({tuple(o) for o in orders[hit].tolist()}) > 10  # not one order for the batch
    adjustments = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for i in range(64):
        expected = x[i : i + 1]
        for k in orders[i].tolist() if hit[i] else []:
            expected = adjustments[k](expected, factors[i : i + 1, k])
        assert torch.allclose(out[i : i + 1], expected, atol=1e-5), i


def test_the_older_pipeline_keeps_its_ops() -> None:
    """Pipeline 1 (one jitter order per batch, fractional crop boxes) computes what the releases before
    pipeline 2 did, so their trials reproduce: the values below come from the last such release."""
    x = images(n=16, h=16, w=16)
    spec = "crop(scale=0.2-1),flip,color(s=0.5),blur"
    out = parse_view(spec, pipeline=1)(x, gen(3))
    assert out.sum().item() == pytest.approx(5911.16845703125, abs=1e-2)
    assert out[5, 1, 7, 3].item() == pytest.approx(0.560166597366333, abs=1e-6)
    assert out[11, 0, 2, 9].item() == pytest.approx(0.2835621237754822, abs=1e-6)
    assert not torch.allclose(parse_view(spec)(x, gen(3)), out)


def test_jitter_brightness_factor_is_per_sample_and_in_range() -> None:
    x = images(n=64) * 0.5 + 0.2  # no clamping for factors in [0.6, 1.4]
    out = run("jitter", x, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0, p=1.0)
    ratio = (out / x).flatten(1)  # (N, C*H*W)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)
    assert (ratio[:, 0] >= 0.6 - 1e-6).all() and (ratio[:, 0] <= 1.4 + 1e-6).all()
    assert ratio[:, 0].std() > 0.1


def test_solarize() -> None:
    x = images()
    out = run("solarize", x, threshold=0.5, p=1.0)
    assert torch.equal(out, torch.where(x >= 0.5, 1 - x, x))
    assert torch.equal(run("solarize", x, p=0.0), x)


def test_noise_zero_std_is_identity() -> None:
    x = images()
    assert torch.equal(run("noise", x, std=0.0), x)


def test_blur_keeps_constant_images_constant() -> None:
    x = torch.full((8, 3, 32, 32), 0.3)
    assert torch.allclose(run("blur", x, p=1.0), x, atol=1e-6)


def test_blur_matches_torchvision() -> None:
    x = images(n=6, h=20, w=24)
    sigma = torch.linspace(0.1, 2.0, 6)
    expected = torch.stack(
        [TF.gaussian_blur(image, [5, 5], [float(s)] * 2) for image, s in zip(x, sigma, strict=True)]
    )
    assert torch.allclose(_gaussian_blur(x, sigma, 5), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("fraction", "side", "size"), [(0.1, 32, 3), (0.1, 96, 9), (0.1, 224, 23), (0.5, 3, 3)]
)
def test_blur_kernel_size(fraction: float, side: int, size: int) -> None:
    assert _blur_size(fraction, side) == size


def test_sobel() -> None:
    assert torch.equal(run("sobel", torch.full((4, 3, 16, 16), 0.7)), torch.zeros(4, 3, 16, 16))
    step = torch.zeros(2, 1, 16, 16)
    step[..., 8:] = 1.0
    out = run("sobel", step)
    assert out.amax() == 1 and (out[..., 7:9] > 0).all() and (out[..., :6] == 0).all()


# --- per-sample dispatch -------------------------------------------------------------------------------


def test_apply_where_and_grouped_match_a_loop() -> None:
    x = images(n=32)
    hit = torch.rand(32, generator=gen()) < 0.5
    expected = torch.stack([image.flip(-1) if h else image for image, h in zip(x, hit, strict=True)])
    assert torch.equal(_apply_where(x, hit, lambda part: part.flip(-1)), expected)
    group = (torch.rand(32, generator=gen(1)) * 3).long()
    fns = [lambda p: p * 0, lambda p: p.flip(-2), lambda p: 1 - p]
    expected = torch.stack([fns[g](image[None])[0] for image, g in zip(x, group, strict=True)])
    assert torch.equal(_apply_grouped(x, group, fns), expected)


# --- views and specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_simclr_view(device: str) -> None:
    view = parse_view("crop(scale=0.08-1),flip,color(s=0.5),blur")
    assert view.names == ("crop", "flip", "color", "blur")
    x = images(n=32, h=32, w=32, device=device)
    out = view(x, gen(3, device))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, view(x, gen(3, device)))


def test_view_matches_its_ops_applied_in_turn_and_keeps_its_input() -> None:
    x = images(n=32, h=32, w=32)
    before = x.clone()
    for spec in ("crop,flip,color,grayscale,blur", ",".join(OPS), "flip,sobel,jitter,rotate,cutout,solarize"):
        view = parse_view(spec)
        generator, expected = gen(7), x
        for step in view.steps:
            expected = OPS[step.op.name].fn(expected, generator, **step.params)
        assert torch.equal(view(x, gen(7)), expected)
        assert torch.equal(x, before)


def test_identity_view_returns_a_copy() -> None:
    x = images()
    for view in (parse_view(""), parse_view("  "), parse_view("identity"), View()):
        assert view.names == ("identity",) and str(view) == "identity"
        out = view(x, gen())
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_view_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="float32"):
        parse_view("flip")(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), gen())
    with pytest.raises(ValueError, match="C in"):
        parse_view("flip")(torch.zeros(2, 2, 8, 8), gen())


def test_canonical_spec() -> None:
    view = parse_view("crop,flip")
    assert str(view) == "crop(scale=0.08-1,ratio=0.75-1.333,size=0),flip(p=0.5)"
    spaced = parse_view(" crop ( scale = 0.2 - 1 ,ratio=1) ,\n FLIP( ) , sobel() ")
    assert str(spaced) == "crop(scale=0.2-1,ratio=1-1,size=0),flip(p=0.5),sobel"
    assert parse_view("blur(sigma=1.5)").steps[0].params["sigma"] == (1.5, 1.5)
    assert parse_view("noise(std=1e-3)").steps[0].params["std"] == 0.001


@pytest.mark.parametrize(
    "spec",
    [
        ",".join(OPS),
        "crop(scale=0.2-0.9,ratio=0.5-2),color(s=0.25,p=1,gray=0),blur(sigma=1e-05-3)",
        "rotate,rotate",
    ],
)
def test_spec_round_trip(spec: str) -> None:
    view = parse_view(spec)
    assert str(parse_view(str(view))) == str(view)
    assert parse_view(str(view)) == view


def test_bool_values() -> None:
    op = OpInfo("toy", lambda x, g, on: x, "toy op", {"on": Param(False, "a switch")})
    assert _parse_value(op, "on", "true") is True and _parse_value(op, "on", "FALSE") is False
    with pytest.raises(AugmentError, match="true or false"):
        _parse_value(op, "on", "1")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("crop,blurr", "unknown augmentation op 'blurr'; valid ops: crop, "),
        ("crop(side=0.5)", "crop: unknown parameter 'side'; valid parameters: scale, ratio, size"),
        ("sobel(p=1)", "sobel: unknown parameter 'p'; it takes no parameters"),
        (
            "crop(scale=1-0.5)",
            "crop: scale must be a number or a range lo-hi with lo <= hi, both > 0 and <= 1",
        ),
        ("crop(scale=0-0.5)", "crop: scale must be"),
        ("blur(sigma=a-b)", "blur: sigma must be a number or a range"),
        ("flip(p=1.5)", "flip: p must be a number >= 0 and <= 1, got '1.5'"),
        ("flip(p=0.2-0.4)", "flip: p must be a number"),
        ("flip(p=true)", "flip: p must be a number"),
        ("flip(p=-1)", "flip: p must be a number"),
        ("noise(std=1e999)", "noise: std must be a number >= 0"),
        ("flip(p)", "flip: parameter 'p' needs a value"),
        ("flip(p=0.1,p=0.2)", "flip: parameter 'p' given twice"),
        ("crop(scale=0.5", "unbalanced parentheses"),
        ("crop,,flip", "empty op between commas"),
        ("crop(scale=0.5)x", "cannot read op"),
        ("color(s=3)", "color: s must be a number >= 0 and <= 2.5"),
    ],
)
def test_parse_errors(spec: str, expected: str) -> None:
    with pytest.raises(AugmentError) as error:
        parse_view(spec)
    message = str(error.value)
    assert expected in message and "\n" not in message
    if "valid ops" in expected:
        assert all(name in message for name in OPS)


def test_describe_ops() -> None:
    lines = describe_ops().splitlines()
    assert len(lines) == len(OPS)
    assert all(line.startswith(name) for line, name in zip(lines, OPS, strict=True))
    assert "crop(scale=0.08-1, ratio=0.75-1.333, size=0)" in lines[0]


def test_base_aug_is_drawn_once_and_shared_by_both_views() -> None:
    from sslab.config import from_mapping
    from sslab.train import plan_views

    config = from_mapping({"base_aug": "crop(scale=0.2-0.3)", "aug1": "identity", "aug2": "flip(p=1)"})
    assert config.identity()["base_aug"] == "crop(scale=0.2-0.3)"
    x = torch.rand(8, 3, 16, 16)
    first, second = plan_views(config, 16)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(second, first.flip(-1))  # one crop box per image, in both views
    assert not torch.allclose(first, x)
    # without it, two crops of the same image differ
    separate = from_mapping({"aug": "crop(scale=0.2-0.3)"})
    one, two = plan_views(separate, 16)(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(one, two)


def test_base_aug_none_or_identity_is_the_default_trial() -> None:
    from sslab.config import from_mapping
    from sslab.errors import ConfigError

    default = from_mapping({}).hash()
    assert from_mapping({"base_aug": "identity"}).hash() == default
    assert from_mapping({"base_aug": "none"}).base_aug is None
    assert from_mapping({"base_aug": "crop(scale=0.08-1)"}).hash() != default
    with pytest.raises(ConfigError, match="base_aug: unknown augmentation op"):
        from_mapping({"base_aug": "blurr"})
