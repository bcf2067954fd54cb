"""Contrastive Multiview Coding (Tian, Krishnan & Isola 2020): L and ab of Lab as two views, one encoder each.

Each (augmented) image is converted to CIE Lab and split into its lightness L (1 channel) and colour ab (2
channels); an L-encoder and an ab-encoder, each followed by its own linear layer to 128 l2-normalised
dimensions, learn to recognise which L goes with which ab. The objective is the official code's: each
view's features are scored against the other view's memory bank [own image, K noise images] with NCE and
a normaliser Z estimated on the first batch, then both banks take the proximal update
v_i <- normalize(m v_i + (1 - m) z_i). `cmc.softmax` scores the same memory with softmax cross-entropy
(the official --softmax); `cmc.negatives = 0` contrasts against the batch's other images instead (InfoNCE,
the two-view "full graph" of eq. 4), with no memory. The paper draws one augmented image per step: only the
first view is used.

`backbone` (what evaluation probes) is `LabEncoders`: it takes normalised RGB images as every backbone
does, undoes the normalisation, converts to Lab and concatenates both encoders' features, as the paper's
linear evaluation does. Evaluation passes images only, so the normalisation is kept in the module: each
training step sets it from the step context; before the first step it holds ImageNet's statistics (the
random-init baseline is measured then, so its Lab conversion is off by the difference between the data's
statistics and ImageNet's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslab.augment.color_space import rgb_to_lab
from sslab.config import TrialConfig
from sslab.errors import ConfigError
from sslab.losses import cmc_in_batch, cmc_nce, cmc_partition, cmc_softmax
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.models import Backbone, Head, backbone_for, build_head
from sslab.settings import MethodSettings, Setting

# The official code's Lab normalisation: L in [0, 100] and a, b in their sRGB ranges mapped to [-1, 1].
_LAB_MEAN = (50.0, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
_LAB_STD = (50.0, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Score against the whole memory while it has at most this many rows per draw; beyond, gather the draws.
_MATMUL_BANK_ROWS_PER_DRAW = 32


class CMCSettings(MethodSettings):
    name = "cmc"
    paper = "Tian, Krishnan & Isola 2020, Contrastive Multiview Coding"
    own_backbone = True  # the L and ab encoders: its random-init baseline is its own
    shared_defaults = {
        "head": 1,  # each encoder's linear layer to the 128-d features (out_dim's default)
        "aug": "crop(scale=0.2-1),flip",  # the official training transform: random resized crop and flip
        "lr": 0.03,  # the official SGD learning rate
        "weight_decay": 1e-4,  # the official weight decay
    }

    temperature = Setting(0.07, "temperature T of the contrast", "CMC code (nce_t)", above=0)
    negatives = Setting(
        16384,
        "noise samples K from the memory bank per positive; 0 = the batch's other images (InfoNCE)",
        "CMC code (nce_k)",
        minimum=0,
    )
    softmax = Setting(False, "softmax cross-entropy over the memory scores instead of NCE", "CMC code")
    bank_momentum = Setting(
        0.5, "proximal update m of the memory banks", "CMC code (nce_m)", minimum=0, maximum=1
    )


def _first_conv(module: nn.Module) -> nn.Conv2d:
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ConfigError("cmc needs a backbone whose first layer is a convolution (to read its input)")
    return conv


class LabEncoders(Backbone):
    """Normalised RGB images (N, 3, H, W) -> [L-encoder features, ab-encoder features] (N, D_L + D_ab)."""

    mean: Tensor  # (1, 3, 1, 1) the RGB normalisation to undo, in [0, 1] pixel units
    std: Tensor
    lab_mean: Tensor  # (1, 3, 1, 1) the official code's Lab normalisation
    lab_std: Tensor

    def __init__(self, l_encoder: Backbone, ab_encoder: Backbone) -> None:
        super().__init__()
        self.l_encoder, self.ab_encoder = l_encoder, ab_encoder
        self.feature_dim = l_encoder.feature_dim + ab_encoder.feature_dim
        self.channels_last = bool(getattr(l_encoder, "channels_last", True))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("lab_mean", torch.tensor(_LAB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_std", torch.tensor(_LAB_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def set_normalisation(self, mean: Tensor, std: Tensor) -> None:
        """Remember the (1, 3, 1, 1) per-channel mean and std the images are normalised with."""
        self.mean.copy_(mean.reshape(1, 3, 1, 1))
        self.std.copy_(std.reshape(1, 3, 1, 1))

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised RGB (N, 3, H, W) -> Lab, normalised as officially: L (N, 1, H, W), ab (N, 2, H, W)."""
        with torch.autocast(x.device.type, enabled=False):  # the cube root needs more than bf16's digits
            lab = (rgb_to_lab(x.float() * self.std + self.mean) - self.lab_mean) / self.lab_std
        return lab[:, :1], lab[:, 1:]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Features of the L view (N, D_L) and of the ab view (N, D_ab)."""
        lum, ab = self.split(x)
        if self.channels_last:
            lum, ab = (v.contiguous(memory_format=torch.channels_last) for v in (lum, ab))
        return self.l_encoder(lum), self.ab_encoder(ab)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.encode(x), dim=1)  # (N, D_L + D_ab)


@register(CMCSettings)
class CMC(Method):
    backbone: LabEncoders
    bank_l: Tensor  # (n, D) memory of the L view's features, one entry per training image
    bank_ab: Tensor  # (n, D) memory of the ab view's features
    z: Tensor  # (2,) NCE normalisers Z_l, Z_ab; 0 until estimated
    steps: Tensor  # () steps taken, seeds the noise draws

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        conv = _first_conv(backbone)
        if conv.in_channels != 3:
            raise ConfigError(
                f"cmc needs RGB images (3 channels) to split into L and ab, but dataset {config.dataset} has "
                f"{conv.in_channels}; use a colour dataset (e.g. dataset=synthetic or cifar10)"
            )
        # Both encoders are built as the trainer built its backbone: same architecture, stem and image size.
        embed = getattr(backbone, "patch_embed", None)  # a ViT is built for one image size: its own
        size = config.image_size or (int(embed.img_size[0]) if embed is not None else 32)
        stem = config.cifar_stem
        if stem is None:  # the trainer's choice for the data's image size, read from its first layer
            stem = conv.kernel_size == (3, 3) and conv.stride == (1, 1)
        self.backbone = LabEncoders(backbone_for(config, 1, size), backbone_for(config, 2, size))
        self.head_l = self._projection(self.backbone.l_encoder.feature_dim)
        self.head_ab = self._projection(self.backbone.ab_encoder.feature_dim)
        self.head = None  # the probe's features are the concatenated encoders', without a head
        out = self.head_l.out_dim
        self.register_buffer("bank_l", torch.zeros(0, out))  # (n, D), allocated on first use
        self.register_buffer("bank_ab", torch.zeros(0, out))
        self.register_buffer("z", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None

    def _projection(self, features: int) -> Head:
        c = self.config
        return build_head(features, c.head, c.head_width, c.out_dim, c.head_bn)

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        if step.mean is not None and step.std is not None:
            self.backbone.set_normalisation(step.mean, step.std)
        h_l, h_ab = self.backbone.encode(views[0])
        z_l = F.normalize(self.head_l(h_l).float(), dim=1)  # (N, D)
        z_ab = F.normalize(self.head_ab(h_ab).float(), dim=1)  # (N, D)
        s = self.settings
        if s.negatives == 0:
            z_l_all, z_ab_all = step.gather(z_l), step.gather(z_ab)  # (M, D): the global batch
            loss = cmc_in_batch(z_l, z_ab, s.temperature, z_l_all, z_ab_all, step.gather.offset(len(z_l)))
        else:
            loss = self.memory_loss(z_l, z_ab, step)
        return StepOutput(loss=loss, embedding=z_l)

    def memory_loss(self, z_l: Tensor, z_ab: Tensor, step: StepContext) -> Tensor:
        s, index = self.settings, step.batch_indices  # (N,)
        if self.bank_l.shape[0] != step.num_images:  # the official start: uniform in +-1/sqrt(D/3)
            bound = 1 / (z_l.shape[1] / 3) ** 0.5
            shape = (step.num_images, z_l.shape[1])
            self.bank_l = torch.empty(shape, device=z_l.device).uniform_(-bound, bound)
            self.bank_ab = torch.empty(shape, device=z_l.device).uniform_(-bound, bound)
        n_data = self.bank_l.shape[0]
        generator = torch.Generator(z_l.device).manual_seed(self.config.seed * 1_000_003 + int(self.steps))
        noise = torch.randint(n_data, (len(index), s.negatives), device=z_l.device, generator=generator)
        drawn = torch.cat([index[:, None], noise], dim=1)  # (N, 1 + K): own image first, as the official code
        scores_l = self.scores(z_l, self.bank_ab, drawn)  # L features against the ab memory
        scores_ab = self.scores(z_ab, self.bank_l, drawn)  # ab features against the L memory
        self._pending = (index, z_l.detach(), z_ab.detach())
        if s.softmax:
            return cmc_softmax(scores_l, scores_ab, s.temperature)
        if self.z[0] <= 0:
            self.z.copy_(
                torch.tensor(
                    [
                        cmc_partition(scores_l, n_data, s.temperature),
                        cmc_partition(scores_ab, n_data, s.temperature),
                    ]
                )
            )
        return cmc_nce(scores_l, scores_ab, n_data, float(self.z[0]), float(self.z[1]), s.temperature)

    @staticmethod
    def scores(z: Tensor, bank: Tensor, drawn: Tensor) -> Tensor:
        """Cosines z_n . bank[drawn_nj] (N, 1 + K), the memory a constant."""
        bank = bank.detach()
        with torch.autocast(z.device.type, enabled=False):  # cosines / 0.07 need more than bf16's digits
            if bank.shape[0] <= _MATMUL_BANK_ROWS_PER_DRAW * drawn.shape[1]:
                return (z @ bank.T).gather(1, drawn)  # (N, n) -> (N, 1 + K)
            return torch.einsum("nd,nkd->nk", z, bank[drawn])

    @torch.no_grad()
    def after_step(self, step: StepContext) -> None:
        if self._pending is None:
            return
        index, z_l, z_ab = self._pending
        m = self.settings.bank_momentum
        for bank, z in ((self.bank_l, z_l), (self.bank_ab, z_ab)):
            bank[index] = F.normalize(m * bank[index] + (1 - m) * z.to(bank.dtype), dim=1)
        self.steps.add_(1)
        self._pending = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("bank_l", "bank_ab"):  # the memory is sized by the data: take the checkpoint's shape
            bank = state_dict.get(prefix + name)
            if bank is not None:
                setattr(self, name, torch.empty_like(bank, device=self.z.device))
        super()._load_from_state_dict(state_dict, prefix, *args)
