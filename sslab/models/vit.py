"""Vision Transformer backbones (Dosovitskiy et al. 2021): timm's VisionTransformer, randomly initialised.

Importing this module imports timm (about 0.4 s), so `build_backbone` imports it only for a ViT.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from sslab.errors import ConfigError

# name -> (embedding dim, depth, heads); the MLP is 4x wide as in every timm ViT.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    # CPU scale: 0.8M parameters; a step on 28-px images (49 tokens of 4 px) takes ~10x SmallCNN's, and 6
    # blocks would take another third longer, so 4 blocks keep 2-core studies in minutes.
    "vit_micro": (128, 4, 4),
    "vit_tiny": (192, 12, 3),  # DeiT-Ti = timm's vit_tiny_patch16_224
    "vit_small": (384, 12, 6),  # DeiT-S = timm's vit_small_patch16_224 (MoCo v3, DINO)
}
POOLS = ("cls", "mean")


def default_patch_size(image_size: int) -> int:
    """4 px up to CIFAR-sized images (64 tokens at 32 px), 8 px up to 96 px (STL-10), else 16 (ImageNet)."""
    return 4 if image_size <= 32 else 8 if image_size <= 96 else 16


class ViT(VisionTransformer):
    """timm's ViT without a classifier: images (N, C, H, W) -> the class token or mean token (N, D).

    Mean pooling drops the class token (timm's `global_pool="avg"`, norm after the pool, as in MAE), so no
    parameter goes unused. Inputs of another size than `image_size` (multi-crop's local crops) get the
    positional embedding resampled, as DINO interpolates it, and are zero-padded to whole patches.
    """

    channels_last = False  # no convolutions to speed up but the patch projection

    def __init__(
        self, size: str, in_channels: int, image_size: int, patch_size: int | None, pool: str = "cls"
    ) -> None:
        patch = default_patch_size(image_size) if patch_size is None else patch_size
        if image_size % patch:
            raise ConfigError(f"patch_size {patch} does not divide the {image_size}-px images of {size}")
        if pool not in POOLS:
            raise ConfigError(f"vit_pool must be one of {', '.join(POOLS)} (got {pool!r})")
        dim, depth, heads = VIT_SIZES[size]
        super().__init__(
            img_size=image_size,
            patch_size=patch,
            in_chans=in_channels,
            num_classes=0,  # no head: forward returns the pooled features
            global_pool="token" if pool == "cls" else "avg",
            class_token=pool == "cls",
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            dynamic_img_size=True,
            dynamic_img_pad=True,
        )
        self.feature_dim = dim

    def freeze_patch_embedding(self) -> None:
        """Keep the random patch projection fixed (MoCo v3 Sec. 4.2: it makes ViT training more stable)."""
        self.patch_embed.requires_grad_(False)
