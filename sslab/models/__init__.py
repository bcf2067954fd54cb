"""Backbones and heads."""

from sslab.models.backbones import BACKBONES, Backbone, SmallCNN, backbone_for, build_backbone
from sslab.models.heads import Head, build_head

__all__ = ["BACKBONES", "Backbone", "Head", "SmallCNN", "backbone_for", "build_backbone", "build_head"]
