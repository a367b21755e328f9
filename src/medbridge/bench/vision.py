"""The AI-benchmark's 17 vision tests as PyTorch models: MONAI's networks where it has them, compact ones here.

Each :class:`Test` carries the original's batch and input size (ai-benchmark 0.1.2,
``config.py``), where its model comes from, and what (if anything) differs from the
original; ``docs/benchmarks.md`` prints the table.  No torchvision and no timm: their
wheels do not run beside the CPU build of torch these machines use.  The models here are
written from the papers (layer counts, widths and kernel sizes as published); the
classifiers take any input size (adaptive pooling), so the quick profile can shrink images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, k: int | tuple[int, int], s: int = 1,
        p: int | tuple[int, int] | None = None) -> nn.Sequential:  # fmt: skip
    """conv (no bias) - batch norm - ReLU; ``p=None`` keeps the size ('same' padding), ``p=0`` is 'valid'."""
    kk = (k, k) if isinstance(k, int) else k
    pad = (kk[0] // 2, kk[1] // 2) if p is None else p
    return nn.Sequential(nn.Conv2d(cin, cout, kk, s, pad, bias=False), nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU(True))


def chain(cin: int, *specs: tuple[Any, ...]) -> nn.Sequential:
    """conv-bn-relu layers from ``(cout, k[, s[, p]])`` specs, each taking the previous one's output."""
    layers = []
    for spec in specs:
        layers.append(cbr(cin, *spec))
        cin = spec[0]
    return nn.Sequential(*layers)


class Mixed(nn.Module):
    """Inception block: the branches side by side, their outputs concatenated along channels."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.cat([b(x) for b in self.branches], 1)
        return out


class Split(nn.Module):
    """A branch that forks at its end (Inception-V3's E, Inception-V4's C): 1x3 and 3x1 side by side."""

    def __init__(self, stem: nn.Module, cin: int, cout: int):
        super().__init__()
        self.stem, self.a, self.b = stem, cbr(cin, cout, (1, 3)), cbr(cin, cout, (3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return torch.cat([self.a(s), self.b(s)], 1)


def pool_branch(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), cbr(cin, cout, 1))


def max_branch() -> nn.MaxPool2d:
    return nn.MaxPool2d(3, 2)


class Residual(nn.Module):
    """Inception-ResNet block: x + scale * conv1x1(mixed(x)), then ReLU (not after the very last block)."""

    def __init__(self, mixed: Mixed, width: int, cout: int, scale: float, relu: bool = True):
        super().__init__()
        self.mixed, self.up, self.scale, self.relu = mixed, nn.Conv2d(width, cout, 1), scale, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.scale * self.up(self.mixed(x))
        return F.relu(y) if self.relu else y


def classifier(trunk: nn.Module, width: int, classes: int = 1000, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, classes))


# -- 1 MobileNet-V2 (Sandler et al. 2018) ----------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]  # fmt: skip
        self.body, self.residual = nn.Sequential(*layers), stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.body(x)
        return x + y if self.residual else y


def mobilenet_v2() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(True)]
    cin = 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)):  # fmt: skip
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += [nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(True)]
    return classifier(nn.Sequential(*layers), 1280, dropout=0.2)


# -- 2 Inception-V3 (Szegedy et al. 2016) ----------------------------------------------------------


def _v3_a(cin: int, pool: int) -> Mixed:
    return Mixed(cbr(cin, 64, 1), chain(cin, (48, 1), (64, 5)), chain(cin, (64, 1), (96, 3), (96, 3)),
                 pool_branch(cin, pool))  # fmt: skip


def _v3_c(c7: int) -> Mixed:
    return Mixed(cbr(768, 192, 1), chain(768, (c7, 1), (c7, (1, 7)), (192, (7, 1))),
                 chain(768, (c7, 1), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7))),
                 pool_branch(768, 192))  # fmt: skip


def _v3_e(cin: int) -> Mixed:
    return Mixed(cbr(cin, 320, 1), Split(cbr(cin, 384, 1), 384, 384), Split(chain(cin, (448, 1), (384, 3)), 384, 384),
                 pool_branch(cin, 192))  # fmt: skip


def inception_v3() -> nn.Module:
    stem = chain(3, (32, 3, 2, 0), (32, 3, 1, 0), (64, 3))
    trunk = nn.Sequential(
        stem, nn.MaxPool2d(3, 2), chain(64, (80, 1), (192, 3, 1, 0)), nn.MaxPool2d(3, 2),
        _v3_a(192, 32), _v3_a(256, 64), _v3_a(288, 64),
        Mixed(cbr(288, 384, 3, 2, 0), chain(288, (64, 1), (96, 3), (96, 3, 2, 0)), max_branch()),
        _v3_c(128), _v3_c(160), _v3_c(160), _v3_c(192),
        Mixed(chain(768, (192, 1), (320, 3, 2, 0)),
              chain(768, (192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3, 2, 0)), max_branch()),
        _v3_e(1280), _v3_e(2048),
    )  # fmt: skip
    return classifier(trunk, 2048, dropout=0.5)


# -- 3 Inception-V4 and 4 Inception-ResNet-V2 (Szegedy et al. 2017) ---------------------------------


def _v4_stem() -> nn.Sequential:
    return nn.Sequential(
        chain(3, (32, 3, 2, 0), (32, 3, 1, 0), (64, 3)),
        Mixed(max_branch(), cbr(64, 96, 3, 2, 0)),
        Mixed(chain(160, (64, 1), (96, 3, 1, 0)), chain(160, (64, 1), (64, (1, 7)), (64, (7, 1)), (96, 3, 1, 0))),
        Mixed(cbr(192, 192, 3, 2, 0), max_branch()),
    )


def inception_v4() -> nn.Module:
    a = [Mixed(cbr(384, 96, 1), chain(384, (64, 1), (96, 3)), chain(384, (64, 1), (96, 3), (96, 3)),
               pool_branch(384, 96)) for _ in range(4)]  # fmt: skip
    b = [Mixed(cbr(1024, 384, 1), chain(1024, (192, 1), (224, (1, 7)), (256, (7, 1))),
               chain(1024, (192, 1), (192, (7, 1)), (224, (1, 7)), (224, (7, 1)), (256, (1, 7))),
               pool_branch(1024, 128)) for _ in range(7)]  # fmt: skip
    c = [Mixed(cbr(1536, 256, 1), Split(cbr(1536, 384, 1), 384, 256),
               Split(chain(1536, (384, 1), (448, (3, 1)), (512, (1, 3))), 512, 256),
               pool_branch(1536, 256)) for _ in range(3)]  # fmt: skip
    trunk = nn.Sequential(
        _v4_stem(), *a,
        Mixed(cbr(384, 384, 3, 2, 0), chain(384, (192, 1), (224, 3), (256, 3, 2, 0)), max_branch()),
        *b,
        Mixed(chain(1024, (192, 1), (192, 3, 2, 0)),
              chain(1024, (256, 1), (256, (1, 7)), (320, (7, 1)), (320, 3, 2, 0)), max_branch()),
        *c,
    )  # fmt: skip
    return classifier(trunk, 1536, dropout=0.2)


def inception_resnet_v2() -> nn.Module:
    def b35() -> Residual:
        return Residual(Mixed(cbr(320, 32, 1), chain(320, (32, 1), (32, 3)), chain(320, (32, 1), (48, 3), (64, 3))),
                        128, 320, 0.17)  # fmt: skip

    def b17() -> Residual:
        return Residual(Mixed(cbr(1088, 192, 1), chain(1088, (128, 1), (160, (1, 7)), (192, (7, 1)))), 384, 1088, 0.1)

    def b8(relu: bool = True) -> Residual:
        mixed = Mixed(cbr(2080, 192, 1), chain(2080, (192, 1), (224, (1, 3)), (256, (3, 1))))
        return Residual(mixed, 448, 2080, 0.2 if relu else 1.0, relu)

    trunk = nn.Sequential(
        chain(3, (32, 3, 2, 0), (32, 3, 1, 0), (64, 3)), nn.MaxPool2d(3, 2),
        chain(64, (80, 1), (192, 3, 1, 0)), nn.MaxPool2d(3, 2),
        Mixed(cbr(192, 96, 1), chain(192, (48, 1), (64, 5)), chain(192, (64, 1), (96, 3), (96, 3)),
              pool_branch(192, 64)),
        *[b35() for _ in range(10)],
        Mixed(cbr(320, 384, 3, 2, 0), chain(320, (256, 1), (256, 3), (384, 3, 2, 0)), max_branch()),
        *[b17() for _ in range(20)],
        Mixed(chain(1088, (256, 1), (384, 3, 2, 0)), chain(1088, (256, 1), (288, 3, 2, 0)),
              chain(1088, (256, 1), (288, 3), (320, 3, 2, 0)), max_branch()),
        *[b8() for _ in range(9)], b8(relu=False),
        cbr(2080, 1536, 1),
    )  # fmt: skip
    return classifier(trunk, 1536, dropout=0.2)


# -- 5, 6 ResNet-V2 (He et al. 2016, pre-activation) -------------------------------------------------


class PreActBottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(True))
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, cout, 1, bias=False),
        )  # fmt: skip
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pre(x)
        out: torch.Tensor = self.body(p) + (self.short(p) if self.short is not None else x)
        return out


def resnet_v2(blocks: Sequence[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
        for i in range(n):
            layers.append(PreActBottleneck(cin, width, 2 if i == 0 and stage > 0 else 1))
            cin = 4 * width
    layers += [nn.BatchNorm2d(cin), nn.ReLU(True)]
    return classifier(nn.Sequential(*layers), cin)


# -- 7 VGG-16 (Simonyan & Zisserman 2015) -------------------------------------------------------------


def vgg16() -> nn.Module:
    layers: list[nn.Module] = []
    cin = 3
    for v in (64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0):
        if v == 0:
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, 1, 1), nn.ReLU(True)]
            cin = v
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000),
    )  # fmt: skip


# -- 8 SRCNN 9-5-5 (Dong et al. 2016) and 9 the VGG-19-style super-resolution net (VDSR, Kim et al. 2016) ---


def srcnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 9, padding=4), nn.ReLU(True), nn.Conv2d(64, 32, 5, padding=2), nn.ReLU(True),
                         nn.Conv2d(32, 3, 5, padding=2))  # fmt: skip


class VDSR(nn.Module):
    """19 3x3 convolutions of 64 channels with ReLU, a last one to RGB, and the input added back."""

    def __init__(self, depth: int = 19):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(True)]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(True)]
        self.body = nn.Sequential(*layers, nn.Conv2d(64, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x)
        return out


# -- 10 ResNet-SRGAN (Ledig et al. 2017) and 11 ResNet-DPED (Ignatov et al. 2017) --------------------------


class ResBlock(nn.Module):
    def __init__(self, c: int, act: Callable[[], nn.Module], norm: Callable[[int], nn.Module]):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), norm(c), act(), nn.Conv2d(c, c, 3, padding=1), norm(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x)
        return out


class SRGAN(nn.Module):
    """SRResNet generator: 16 residual blocks, two x2 sub-pixel upsamplings (x4 output)."""

    def __init__(self, blocks: int = 16):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 64, 9, padding=4), nn.PReLU())
        self.blocks = nn.Sequential(*[ResBlock(64, nn.PReLU, nn.BatchNorm2d) for _ in range(blocks)],
                                    nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64))  # fmt: skip
        up = [m for _ in range(2) for m in (nn.Conv2d(64, 256, 3, padding=1), nn.PixelShuffle(2), nn.PReLU())]
        self.tail = nn.Sequential(*up, nn.Conv2d(64, 3, 9, padding=4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return torch.tanh(self.tail(h + self.blocks(h)))


def dped() -> nn.Module:
    norm = lambda c: nn.InstanceNorm2d(c, affine=True)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(3, 64, 9, padding=4), nn.ReLU(True),
        *[nn.Sequential(ResBlock(64, lambda: nn.ReLU(True), norm), nn.ReLU(True)) for _ in range(4)],
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(True), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(True),
        nn.Conv2d(64, 3, 9, padding=4), nn.Tanh(),
    )  # fmt: skip


# -- 12 U-Net, 13 SPADE: MONAI ------------------------------------------------------------------------------


def unet() -> nn.Module:
    from monai.networks.nets.basic_unet import BasicUNet

    net: nn.Module = BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, features=(64, 128, 256, 512, 1024, 64))
    return net


SPADE_LABELS = 12


class Spade(nn.Module):
    """MONAI's SPADE network without its encoder (the generator of Park et al. 2019): a label map in, an image out."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        from monai.networks.nets.spade_network import SPADENet

        self.net = SPADENet(spatial_dims=2, in_channels=3, out_channels=3, label_nc=SPADE_LABELS, input_shape=size,
                            channels=[128, 256, 512, 1024], z_dim=256, is_vae=False)  # fmt: skip

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(seg)[0]
        return out


# -- 14 ICNet, 15 PSPNet, 16 DeepLab: MONAI's ResNet-50 as the trunk -------------------------------------


def _resnet50_trunk(dilate_from: int) -> nn.Sequential:
    """MONAI's 2-D ResNet-50 without its head; stages from ``dilate_from`` (3 or 4) dilated instead of strided."""
    from monai.networks.nets.resnet import resnet50

    net = resnet50(spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, num_classes=1)
    rate = 1
    for stage in (3, 4):
        if stage < dilate_from:
            continue
        rate *= 2
        for block in getattr(net, f"layer{stage}"):
            for m in block.modules():
                if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                    m.stride = (1, 1)
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                    m.dilation, m.padding = (rate, rate), (rate, rate)
    return nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


class PyramidPooling(nn.Module):
    def __init__(self, cin: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), cbr(cin, cin // 4, 1)) for b in bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        return torch.cat([x, *(F.interpolate(s(x), size, mode="bilinear", align_corners=False)
                               for s in self.stages)], 1)  # fmt: skip


class PSPNet(nn.Module):
    def __init__(self, classes: int = 21):
        super().__init__()
        self.trunk = _resnet50_trunk(dilate_from=3)  # output stride 8, as published
        self.head = nn.Sequential(PyramidPooling(2048), cbr(4096, 512, 3), nn.Dropout(0.1), nn.Conv2d(512, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(self.trunk(x)), x.shape[2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int = 256, rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        convs = [cbr(cin, cout, 1)] + [
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=r, dilation=r, bias=False), nn.BatchNorm2d(cout),
                          nn.ReLU(True)) for r in rates
        ]  # fmt: skip
        self.convs = nn.ModuleList(convs)
        self.image = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(True))
        self.project = cbr(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.image(x), x.shape[2:], mode="bilinear", align_corners=False)
        out: torch.Tensor = self.project(torch.cat([*(c(x) for c in self.convs), pooled], 1))
        return out


class DeepLabV3(nn.Module):
    def __init__(self, classes: int = 21):
        super().__init__()
        self.trunk = _resnet50_trunk(dilate_from=4)  # output stride 16
        self.head = nn.Sequential(ASPP(2048), cbr(256, 256, 3), nn.Conv2d(256, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(self.trunk(x)), x.shape[2:], mode="bilinear", align_corners=False)


class CascadeFusion(nn.Module):
    """ICNet's cascade feature fusion: the coarser map upsampled x2 and dilated, plus the finer map projected."""

    def __init__(self, c_low: int, c_high: int, cout: int):
        super().__init__()
        self.low = nn.Sequential(nn.Conv2d(c_low, cout, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(cout))
        self.high = nn.Sequential(nn.Conv2d(c_high, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(low, high.shape[2:], mode="bilinear", align_corners=False)
        return F.relu(self.low(up) + self.high(high))


class ICNet(nn.Module):
    """Three resolutions (Zhao et al. 2018): the full image through three light convolutions, half of it through
    the trunk's first stages, a quarter through all of it with pyramid pooling; fused coarse to fine."""

    def __init__(self, classes: int = 19):
        super().__init__()
        trunk = _resnet50_trunk(dilate_from=3)
        self.shared, self.deep = trunk[:6], trunk[6:]  # to layer2 (1/8 of its input), then layer3-4
        self.ppm = nn.Sequential(PyramidPooling(2048), cbr(4096, 256, 1))
        self.light = chain(3, (32, 3, 2), (32, 3, 2), (64, 3, 2))
        self.cff_mid, self.cff_high = CascadeFusion(256, 512, 128), CascadeFusion(128, 64, 128)
        self.out = nn.Conv2d(128, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        mid = self.shared(half)
        low = self.ppm(self.deep(F.interpolate(mid, scale_factor=0.5, mode="bilinear", align_corners=False)))
        fused = self.cff_high(self.cff_mid(low, mid), self.light(x))
        return F.interpolate(self.out(fused), x.shape[2:], mode="bilinear", align_corners=False)


# -- 17 Pixel-RNN (van den Oord et al. 2016, Row LSTM) ---------------------------------------------------------


class MaskedConv(nn.Conv2d):
    """A convolution that sees only pixels above and to the left (type A) or also the pixel itself (type B)."""

    def __init__(self, cin: int, cout: int, k: int | tuple[int, int], kind: str):
        kk = (k, k) if isinstance(k, int) else k
        super().__init__(cin, cout, kk, padding=(kk[0] // 2, kk[1] // 2))
        mask = torch.ones_like(self.weight)
        cy, cx = kk[0] // 2, kk[1] // 2
        mask[:, :, cy, cx + (kind == "B") :] = 0
        mask[:, :, cy + 1 :] = 0
        self.mask: torch.Tensor
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


class RowLSTM(nn.Module):
    """One Row LSTM layer: the state of a whole row computed from the row above with a 1-D convolution."""

    def __init__(self, h: int):
        super().__init__()
        self.input = MaskedConv(h, 4 * h, (1, 3), "B")
        self.state = nn.Conv1d(h, 4 * h, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, rows, cols = x.shape
        gates_in = self.input(x)
        c = x.new_zeros(n, h, cols)
        s = x.new_zeros(n, h, cols)
        out = []
        for r in range(rows):
            g = gates_in[:, :, r] + self.state(s)
            i, f, o, u = torch.sigmoid(g[:, :h]), torch.sigmoid(g[:, h : 2 * h]), torch.sigmoid(g[:, 2 * h : 3 * h]), \
                torch.tanh(g[:, 3 * h :])  # fmt: skip
            c = f * c + i * u
            s = o * torch.tanh(c)
            out.append(s)
        return x + torch.stack(out, 2)


def pixel_rnn(h: int = 64, layers: int = 7) -> nn.Module:
    return nn.Sequential(
        MaskedConv(3, h, 7, "A"), *[RowLSTM(h) for _ in range(layers)],
        nn.ReLU(), MaskedConv(h, h, 1, "B"), nn.ReLU(), MaskedConv(h, 3 * 256, 1, "B"),
    )  # fmt: skip


# -- the table -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Test:
    """One of the 17: the original's batch and input size, where the model comes from, what differs."""

    number: int
    name: str
    task: str
    batch: int
    size: tuple[int, int]  # height, width
    source: str
    build: Callable[[tuple[int, int]], nn.Module]
    note: str = ""  # how it differs from the original (a smaller stand-in says so here)
    min_size: int = 32  # the smallest input it takes (the quick profile shrinks images to this or 48)
    labels: bool = False  # takes a one-hot label map (SPADE) instead of an RGB image


PLAIN = "plain torch, this module"
TESTS: tuple[Test, ...] = (
    Test(1, "MobileNet-V2", "classification", 50, (224, 224), PLAIN, lambda s: mobilenet_v2()),
    Test(2, "Inception-V3", "classification", 20, (346, 346), PLAIN, lambda s: inception_v3(), min_size=96),
    Test(3, "Inception-V4", "classification", 10, (346, 346), PLAIN, lambda s: inception_v4(), min_size=96),
    Test(
        4, "Inception-ResNet-V2", "classification", 10, (346, 346), PLAIN, lambda s: inception_resnet_v2(), min_size=96
    ),
    Test(5, "ResNet-V2-50", "classification", 10, (346, 346), PLAIN, lambda s: resnet_v2((3, 4, 6, 3))),
    Test(6, "ResNet-V2-152", "classification", 10, (256, 256), PLAIN, lambda s: resnet_v2((3, 8, 36, 3))),
    Test(7, "VGG-16", "classification", 20, (224, 224), PLAIN, lambda s: vgg16()),
    Test(8, "SRCNN 9-5-5", "super-resolution", 10, (512, 512), PLAIN, lambda s: srcnn()),
    Test(
        9,
        "VGG-19 Super-Res",
        "super-resolution",
        10,
        (256, 256),
        PLAIN,
        lambda s: VDSR(),
        note="VDSR's 19-layer VGG-style body with a global residual",
    ),
    Test(
        10,
        "ResNet-SRGAN",
        "super-resolution",
        10,
        (512, 512),
        PLAIN,
        lambda s: SRGAN(),
        note="SRResNet generator, x4 output",
    ),
    Test(11, "ResNet-DPED", "image enhancement", 10, (256, 256), PLAIN, lambda s: dped()),
    Test(12, "U-Net", "segmentation", 4, (512, 512), "MONAI BasicUNet (2-D, features 64-1024)", lambda s: unet()),
    Test(
        13,
        "Nvidia-SPADE",
        "image synthesis",
        5,
        (128, 128),
        "MONAI SPADENet (generator only, is_vae=False)",
        Spade,
        note=f"{SPADE_LABELS}-class label maps",
        labels=True,
    ),
    Test(
        14,
        "ICNet",
        "segmentation",
        5,
        (1024, 1536),
        "plain torch on MONAI's ResNet-50 trunk",
        lambda s: ICNet(),
        note="keeps all of its ResNet-50 trunk's kernels (the original prunes them): heavier, not lighter",
    ),
    Test(
        15,
        "PSPNet",
        "segmentation",
        5,
        (720, 720),
        "plain torch on MONAI's ResNet-50 trunk (dilated)",
        lambda s: PSPNet(),
    ),
    Test(
        16,
        "DeepLab",
        "segmentation",
        2,
        (512, 512),
        "plain torch (DeepLab-V3, ASPP) on MONAI's ResNet-50 trunk",
        lambda s: DeepLabV3(),
    ),
    Test(
        17,
        "Pixel-RNN",
        "inpainting",
        50,
        (64, 64),
        PLAIN,
        lambda s: pixel_rnn(),
        note="Row LSTM, 7 layers of 64; no per-colour channel masks",
    ),
)


def by_name(names: Sequence[str]) -> list[Test]:
    """The tests named (by number or name, any case); all of them for an empty list."""
    from medbridge.errors import InvalidInput

    if not names:
        return list(TESTS)
    out = []
    for name in names:
        found = [t for t in TESTS if name.strip().lower() in (str(t.number), t.name.lower())]
        if not found:
            known = ", ".join(t.name for t in TESTS)
            raise InvalidInput(f"no vision test {name!r}: use a number 1-17 or one of {known}")
        out += found
    return out


def scaled(test: Test, quick: bool) -> tuple[int, tuple[int, int]]:
    """Batch and input size for a profile: the original's, or (quick) one image of 48² or the model's smallest
    input (SPADE needs a multiple of 16)."""
    if not quick:
        return test.batch, test.size
    side = max(48, test.min_size)
    return 1, (side, side)
