"""Backbones and heads."""

from sslab.models.backbones import BACKBONES, Backbone, SmallCNN, build_backbone
from sslab.models.heads import Head, build_head

__all__ = ["BACKBONES", "Backbone", "Head", "SmallCNN", "build_backbone", "build_head"]
