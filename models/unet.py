"""The 3-D U-Net of the conditional deep image prior (docs/DESIGN.md "The method").

Levels of ``base·2^i`` channels (16/32/64/128 for the paper's base 16, depth 4) and a
``base·2^depth`` bottleneck (256). Each block is [Conv3d 3³ → norm → LeakyReLU]×2; a stride-2
conv goes down, a transposed conv (or trilinear interpolation + conv) goes up and is resized
to the skip's exact size, so volumes whose sides are not multiples of 2^depth (136 = 8·17,
odd sizes) work. Output: 1×1×1 conv + ReLU (PET activity is non-negative).

Layer factories are injectable (as in nnU-Net's PlainConvUNet) but default to the paper's.
This module picks no device and reads no files.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[int], nn.Module]
NonlinFactory = Callable[[], nn.Module]
Upsample = Literal["transpose", "trilinear"]


class UNetShapeError(ValueError):
    """A volume too small for the network's depth, or an input of the wrong rank/channels."""


def _leaky_relu() -> nn.Module:
    # inplace=False: the pre-activation is kept by BatchNorm's backward anyway; in-place buys
    # little and makes the graph harder to reason about.
    return nn.LeakyReLU(negative_slope=0.01)


def level_shapes(shape: tuple[int, ...], depth: int) -> list[tuple[int, int, int]]:
    """Spatial shape at each level 0..depth (depth = bottleneck) for an input of ``shape``.

    A 3³ stride-2 conv with padding 1 maps n to ceil(n / 2).
    """
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise UNetShapeError(f"shape: expected 3 positive sizes, got {tuple(shape)!r}")
    shapes = [tuple(int(n) for n in shape)]
    for _ in range(depth):
        shapes.append(tuple((n + 1) // 2 for n in shapes[-1]))
    return shapes  # type: ignore[return-value]


class ConvBlock(nn.Sequential):
    """[Conv3d 3³ pad 1 → norm → nonlin] × 2."""

    def __init__(self, c_in: int, c_out: int, norm: NormFactory, nonlin: NonlinFactory) -> None:
        super().__init__(
            nn.Conv3d(c_in, c_out, 3, padding=1), norm(c_out), nonlin(),
            nn.Conv3d(c_out, c_out, 3, padding=1), norm(c_out), nonlin(),
        )


class Down(nn.Sequential):
    """Stride-2 conv (halves each side, rounding up) → norm → nonlin, then a ConvBlock."""

    def __init__(self, c_in: int, c_out: int, norm: NormFactory, nonlin: NonlinFactory) -> None:
        super().__init__(
            nn.Conv3d(c_in, c_out, 3, stride=2, padding=1), norm(c_out), nonlin(),
            ConvBlock(c_out, c_out, norm, nonlin),
        )


def _fit_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad or crop the trailing three axes of ``x`` to ``size`` (at the high end).

    A transposed conv doubles n; the skip has n_skip with ceil(n_skip / 2) = n, so the
    difference is 0 or 1 voxel and padding/cropping at the far end keeps voxels aligned.
    """
    pad: list[int] = []
    for have, want in zip(reversed(x.shape[-3:]), reversed(size)):
        pad += [0, want - have]  # F.pad takes (last-axis low, high, ...); negative crops
    return F.pad(x, pad) if any(pad) else x


class Up(nn.Module):
    """Upsample to the skip's exact size, concatenate the skip, ConvBlock."""

    def __init__(self, c_in: int, c_out: int, mode: Upsample,
                 norm: NormFactory, nonlin: NonlinFactory) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose3d(c_in, c_out, kernel_size=2, stride=2)
        else:
            # Trilinear interpolation has no channel change; a 3³ conv reduces c_in -> c_out.
            self.up = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.block = ConvBlock(2 * c_out, c_out, norm, nonlin)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        size = tuple(skip.shape[-3:])
        if self.mode == "transpose":
            x = _fit_to(self.up(x), size)
        else:
            x = self.up(F.interpolate(x, size=size, mode="trilinear", align_corners=False))
        return self.block(torch.cat([skip, x], dim=1))


class UNet3d(nn.Module):
    """3-D U-Net mapping (N, in_channels, D, H, W) to (N, out_channels, D, H, W) for any size.

    With BatchNorm in train() mode and a batch of one, every level must hold more than one
    voxel (BatchNorm needs more than one value per channel); ``forward`` checks this and
    names the smallest usable size instead of failing inside BatchNorm.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        upsample: Upsample = "transpose",
        norm: NormFactory = nn.BatchNorm3d,
        nonlin: NonlinFactory = _leaky_relu,
    ) -> None:
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("base_channels", base_channels, 1), ("depth", depth, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"UNet3d.{name}: expected an integer >= {low}, got {value!r}")
        if upsample not in ("transpose", "trilinear"):
            raise ValueError(f"UNet3d.upsample: expected 'transpose' or 'trilinear', got {upsample!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_channels, self.depth, self.upsample = base_channels, depth, upsample
        widths = [base_channels * 2**i for i in range(depth + 1)]  # last = bottleneck
        self.stem = ConvBlock(in_channels, widths[0], norm, nonlin)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], norm, nonlin) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], upsample, norm, nonlin)
                                 for i in reversed(range(depth)))
        self.head = nn.Sequential(nn.Conv3d(widths[0], out_channels, 1), nn.ReLU())

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_channels * 2**i for i in range(self.depth + 1))

    def check_input(self, shape: tuple[int, ...]) -> None:
        """Raise UNetShapeError unless a tensor of ``shape`` (N, C, D, H, W) can pass."""
        if len(shape) != 5 or shape[1] != self.in_channels:
            raise UNetShapeError(
                f"input: expected shape (N, {self.in_channels}, D, H, W), got {tuple(shape)}")
        bottom = level_shapes(tuple(shape[2:]), self.depth)[-1]
        if shape[0] * bottom[0] * bottom[1] * bottom[2] < 2:
            raise UNetShapeError(
                f"input: spatial size {tuple(shape[2:])} shrinks to one voxel after {self.depth} "
                f"halvings; BatchNorm in train mode needs more than one value per channel. "
                f"Expected at least one side > {2 ** self.depth} voxels (or a smaller depth)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(tuple(x.shape))
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)


def parameter_count(net: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def activation_bytes(shape: tuple[int, int, int], base_channels: int = 16, depth: int = 4,
                     bytes_per_value: int = 4) -> int:
    """Rough size of the activations one forward keeps for backward (batch of one).

    Counts, per level, the tensors autograd saves: each conv output, its norm output and
    nonlinearity output (3 per conv), for the encoder's 2 (+1 strided) convs and the decoder's
    upsample, concatenation and 2 convs. An estimate in the spirit of nnU-Net's
    compute_conv_feature_map_size, good to a factor of ~1.5, for choosing a device.
    """
    shapes = level_shapes(shape, depth)
    total = 0
    for level, s in enumerate(shapes):
        vox = s[0] * s[1] * s[2]
        c = base_channels * 2**level
        enc = 3 * 2 + (3 if level > 0 else 0)  # ConvBlock (+ strided conv below level 0)
        dec = 0 if level == depth else 1 + 2 + 3 * 2  # upsample, concat (2c), ConvBlock
        total += vox * c * (enc + dec)
    return total * bytes_per_value
