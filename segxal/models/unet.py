"""U-Net segmenter (Ronneberger et al. 2015) with BatchNorm, as SegXAL uses it.

Layers are addressable by name for Grad-CAM and PEBAL: ``encoder.<i>``, ``bottleneck``,
``upsample.<i>``, ``decoder.<i>`` (``decoder.<depth-1>`` is the last, full-resolution block) and
``head`` (the 1x1 classification conv).

Dropout (``dropout`` > 0) follows the blocks named in ``dropout_at`` (``bottleneck``, ``decoder.<i>``):
it is active in training, and at inference inside :func:`mc_dropout`, for MC-dropout uncertainty (BALD).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    num_classes: int
    in_channels: int = 3
    width: int = 32
    depth: int = 4
    dropout: float = 0.0
    dropout_at: tuple[str, ...] = ("bottleneck",)

    def __post_init__(self) -> None:
        for field in ("num_classes", "in_channels", "width", "depth"):
            if getattr(self, field) < 1:
                raise ValueError(f"UNetConfig.{field} must be >= 1, got {getattr(self, field)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        blocks = ("bottleneck", *(f"decoder.{i}" for i in range(self.depth)))
        unknown = [name for name in self.dropout_at if name not in blocks]
        if unknown:
            raise ValueError(
                f"UNetConfig.dropout_at: {unknown} are not blocks; choose from {list(blocks)}"
            )


class ConvBlock(nn.Sequential):
    """Two 3x3 conv -> BatchNorm -> ReLU layers."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Encoder-decoder with skip connections; returns logits at the input's size."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = [config.width * 2**level for level in range(config.depth + 1)]
        self.encoder = nn.ModuleList()
        in_channels = config.in_channels
        for level in range(config.depth):
            self.encoder.append(ConvBlock(in_channels, channels[level]))
            in_channels = channels[level]
        self.bottleneck = ConvBlock(channels[-2], channels[-1])
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(config.depth)):
            self.upsample.append(
                nn.ConvTranspose2d(channels[level + 1], channels[level], 2, stride=2)
            )
            self.decoder.append(ConvBlock(2 * channels[level], channels[level]))
        self.head = nn.Conv2d(channels[0], config.num_classes, 1)
        self.mc_sampling = False  # dropout active at inference (mc_dropout)

    def _dropout(self, x: torch.Tensor, block: str) -> torch.Tensor:
        if self.config.dropout == 0.0 or block not in self.config.dropout_at:
            return x
        return F.dropout2d(x, self.config.dropout, training=self.training or self.mc_sampling)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def input_multiple(self) -> int:
        """Inputs are padded (bottom/right) to a multiple of this before the encoder."""
        return 2**self.config.depth

    @property
    def last_decoder_layer(self) -> str:
        """Name of the last full-resolution feature block (the default Grad-CAM target)."""
        return f"decoder.{self.config.depth - 1}"

    def layer(self, name: str) -> nn.Module:
        """The submodule called ``name`` (e.g. ``"decoder.3"``), with an error listing valid names."""
        try:
            return self.get_submodule(name)
        except AttributeError as error:
            names = ", ".join(n for n, _ in self.named_children())
            raise KeyError(f"UNet has no layer {name!r}; top-level layers: {names}") from error

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        multiple = self.input_multiple
        pad_h = (-x.shape[-2]) % multiple
        pad_w = (-x.shape[-1]) % multiple
        if pad_h == 0 and pad_w == 0:
            return x
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        return self._dropout(self.bottleneck(x), "bottleneck"), skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x, skips = self._encode(self._padded(x))
        for index, (upsample, block, skip) in enumerate(
            zip(self.upsample, self.decoder, reversed(skips), strict=False)
        ):
            x = self._dropout(block(torch.cat([upsample(x), skip], dim=1)), f"decoder.{index}")
        return self.head(x)[..., :height, :width]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled bottleneck features, shape (B, width * 2**depth): for core-set."""
        features, _ = self._encode(self._padded(x))
        return features.mean(dim=(-2, -1))

    def to_checkpoint(self) -> dict:
        """A dict of tensors and primitives, loadable with ``torch.load(weights_only=True)``."""
        return {"unet_config": asdict(self.config), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> UNet:
        config = dict(checkpoint["unet_config"])
        config["dropout_at"] = tuple(config.get("dropout_at", ("bottleneck",)))
        model = cls(UNetConfig(**config))
        model.load_state_dict(checkpoint["state_dict"])
        return model


@contextmanager
def mc_dropout(model: UNet) -> Iterator[None]:
    """Dropout active while the rest of ``model`` (BatchNorm) stays as it is: MC-dropout sampling."""
    previous = model.mc_sampling
    model.mc_sampling = True
    try:
        yield
    finally:
        model.mc_sampling = previous
