"""Segmentation and depth models."""

from segxal.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
