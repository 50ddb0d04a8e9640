"""A small Vision Transformer student (``vit_tiny``: ViT-Ti/DeiT-Ti sizes, any patch size).

Patch embedding (a ``patch_size`` x ``patch_size`` stride-``patch_size`` Conv), a class token, learned
position embeddings (made for ``img_size``; bicubically resized to another grid at run time), ``depth``
pre-norm blocks ``x + attn(ln1(x)); x + mlp(ln2(x))`` (explicit softmax attention, so an ONNX export has
the Softmax that ``--targets attn`` reads), final LayerNorm, linear head on the class token.

Taps: after every block, ``grids.{i}`` (a :class:`TokenGrid`) returns that block's patch tokens as a
(B, C, h, w) view (no copy), so the CNN losses (AT, DCT, AFD) read a ViT student like a CNN one.
``kd_blocks`` = every ``grids.{i}``; ``kd_taps`` = 3 of them, evenly spaced and ending at the last
(blocks 4, 8, 12 of 12).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.pairing import evenly_spaced
from kdpipe.student.registry import register_model


class TokenGrid(nn.Module):
    """(B, 1 + h*w, C) tokens -> the patch tokens as a (B, C, h, w) view (the class token dropped)."""

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        return x[:, 1:].transpose(1, 2).reshape(b, c, *grid)


class Attention(nn.Module):
    """Multi-head self-attention on (B, T, C): qkv Linear, softmax(q k^T / sqrt(d)) v, output Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)  # a module, so a hook can read the attention (B, heads, T, T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = self.softmax((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block; returns the residual stream (B, T, C)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """See the module docstring. Input (B, in_chans, H, W) with H, W multiples of ``patch_size``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if dim % heads or img_size % patch_size or depth < 1:
            raise ValueError(
                f"vit: dim {dim} must divide by heads {heads}, img_size by patch_size, depth >= 1"
            )
        self.patch_size, self.grid = patch_size, (img_size // patch_size, img_size // patch_size)
        self.patch = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.grids = nn.ModuleList(TokenGrid() for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.kd_transformer = True  # pairs with teacher taps by even spacing (kdpipe.pairing)
        self.kd_blocks = [f"grids.{i}" for i in range(depth)]
        self.kd_taps = [self.kd_blocks[i] for i in sorted(set(evenly_spaced(depth, min(3, depth))))]

    def position(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings (1, 1 + h*w, C) for a patch grid, resized bicubically when it differs."""
        if grid == self.grid:
            return self.pos
        c = self.pos.shape[-1]
        p = self.pos[:, 1:].reshape(1, *self.grid, c).permute(0, 3, 1, 2)
        p = F.interpolate(p, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([self.pos[:, :1], p.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)
        grid = (int(x.shape[2]), int(x.shape[3]))
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position(grid)
        for block, tap in zip(self.blocks, self.grids, strict=True):
            x = block(x)
            tap(x, grid)  # the hooked (B, C, h, w) view of this block's patch tokens
        return self.head(self.norm(x)[:, 0])


@register_model
def vit_tiny(num_classes: int = 10, in_chans: int = 3, **kw: object) -> ViT:
    """ViT-Ti sizes (width 192, 12 blocks, 3 heads, MLP 4x), patch 4 on 32 px by default; every size
    is a keyword (``patch_size``, ``img_size``, ``dim``, ``depth``, ``heads``, ``mlp_ratio``)."""
    return ViT(num_classes, in_chans, **kw)  # type: ignore[arg-type]
