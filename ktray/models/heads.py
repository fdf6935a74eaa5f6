"""Heads on top of a trunk: the Jigsaw ennead, the CC student's classifier, projection MLPs.

One rule picks the embedding a head reads from a trunk (:func:`embedding`): fc7 where the trunk
has it (AlexNet and VGG16 built with ``fc=True``: the paper's student keeps fc6-fc7), else
conv5 average-pooled (ResNets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ktray.models.trunks import Trunk, _fc_bn, build_trunk, init_weights


class Student(nn.Module):
    """The trunk plus a linear classifier over the k clusters (the paper: the whole AlexNet, fc6-fc8).

    AlexNet and VGG16 keep their fc6/fc7 layers (``ktray.models`` builds them with ``fc=True``) and
    fc8 is the new linear layer; ResNets average-pool conv5 into the linear layer.
    """

    def __init__(self, arch: str, width: float, num_classes: int) -> None:
        super().__init__()

        self.trunk = build_trunk(arch, width, fc=arch in FC_ARCHS)
        self.fc = nn.Linear(embedding_dim(self.trunk), num_classes)
        init_weights(self.fc)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, S, S) -> logits (B, k)
        return self.fc(embedding(self.trunk, x))


def build_student(arch: str, width: float, num_classes: int) -> Student:
    return Student(arch, width, num_classes)


def mlp(din: int, hidden: int, dout: int) -> nn.Sequential:
    """The projection / prediction MLP of MoCo v2, BYOL and ISD: fc-bn-relu-fc."""

    head = nn.Sequential(nn.Linear(din, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dout))
    init_weights(head)
    return head


FC_ARCHS = ("alexnet", "vgg16")  # the architectures whose student keeps its fc6-fc7 layers


def embedding(trunk: Trunk, x: Tensor) -> Tensor:
    """fc7 where the trunk has it (AlexNet / VGG built with fc), else conv5 average-pooled: (B, C)."""
    if trunk.has_fc:
        return trunk.taps(x, ["fc7"])["fc7"]
    return F.adaptive_avg_pool2d(trunk(x), 1).flatten(1)


def embedding_dim(trunk: Trunk) -> int:
    return trunk.out_channels("fc7") if trunk.has_fc else trunk.out_channels("conv5")


class Projected(nn.Module):
    """A trunk and its projection head: images (B, 3, S, S) -> embeddings (B, d), not normalised."""

    def __init__(self, trunk: Trunk, hidden: int, dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = mlp(embedding_dim(trunk), hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(embedding(self.trunk, x))


class JigsawNet(nn.Module):
    """The context-free network of Noroozi & Favaro (2016, Sec. 3.1): a siamese "ennead".

    The same trunk runs on each of the 9 tiles; each tile's conv5 is pooled to a small grid and
    mapped by a shared fc (the paper's per-tile fc6, 512 units) to ``tile_dim`` features; the 9
    are concatenated in puzzle order and an MLP (fc7, 4096 units in the paper) maps them to one
    logit per permutation. Only the trunk is kept afterwards (``teacher.pt``).
    """

    def __init__(
        self, trunk: Trunk, num_classes: int, *, tile_dim: int = 512, hidden: int = 4096, pool: int = 2
    ) -> None:
        super().__init__()
        self.trunk = trunk
        c5 = trunk.out_channels("conv5")
        self.tile_fc = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(), _fc_bn(c5 * pool * pool, tile_dim))
        self.head = nn.Sequential(_fc_bn(9 * tile_dim, hidden), nn.Dropout(0.5), nn.Linear(hidden, num_classes))
        init_weights(self.tile_fc)
        init_weights(self.head)

    def forward(self, tiles: Tensor) -> Tensor:  # (B, 9, 3, t, t) -> logits (B, N)
        b = tiles.shape[0]
        x = tiles.flatten(0, 1)  # (B*9, 3, t, t)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        f = self.tile_fc(self.trunk(x))  # (B*9, tile_dim)
        return self.head(f.reshape(b, -1))  # (B, 9*tile_dim) -> (B, N)


def build_jigsaw(arch: str, width: float, num_classes: int, *, tile_dim: int = 512, hidden: int = 4096) -> JigsawNet:
    """Trunk + Jigsaw head; ``num_classes`` is ``len(permutations)`` (derived, never typed)."""
    return JigsawNet(build_trunk(arch, width), num_classes, tile_dim=tile_dim, hidden=hidden)
