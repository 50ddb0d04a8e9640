"""The zoo's ViT student (``vit_tiny``): its taps are the blocks' patch tokens as (B, C, h, w) maps,
any patch size and input size, and it exports to ONNX with the Softmax a teacher cache reads."""

from __future__ import annotations

import pytest
import torch

from kdpipe.student import StudentTaps, create_model, list_models

SMALL = {"depth": 5, "dim": 16, "heads": 2}


def _manual_blocks(m: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's patch tokens as (B, C, h, w), computed by hand from the model's parts."""
    t = m.patch(x)
    b, c, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([m.cls.expand(b, -1, -1), t], dim=1) + m.position((h, w))
    out = []
    for blk in m.blocks:
        t = t + blk.attn(blk.ln1(t))
        t = t + blk.mlp(blk.ln2(t))
        out.append(t[:, 1:].transpose(1, 2).reshape(b, c, h, w))
    return out


@pytest.mark.parametrize(
    ("patch", "shape", "grid"), [(4, (2, 3, 32, 32), 8), (2, (2, 1, 16, 16), 8), (4, (2, 1, 28, 28), 7)]
)
def test_taps_are_the_block_tokens_on_the_grid(patch, shape, grid):
    assert "vit_tiny" in list_models()
    torch.manual_seed(0)
    m = create_model(
        "vit_tiny", 10, in_chans=shape[1], patch_size=patch, img_size=32 if patch == 4 else 16, **SMALL
    )
    m.eval()
    assert m.kd_blocks == [f"grids.{i}" for i in range(5)] and m.kd_taps == ["grids.1", "grids.2", "grids.4"]
    x = torch.randn(shape)
    with StudentTaps(m, "blocks") as taps, torch.no_grad():
        y = m(x)
        ref = _manual_blocks(m, x)
        assert y.shape == (2, 10)
        for f, r in zip(taps.features, ref, strict=True):
            assert f.shape == (2, 16, grid, grid)  # 28 px on a grid made for 32: position embeddings resized
            torch.testing.assert_close(f, r)
    with StudentTaps(m) as taps:
        m(x).sum().backward()  # the tap views carry gradient
        assert len(taps.features) == 3 and all(f.requires_grad for f in taps.features)


def test_default_sizes_are_vit_tiny():
    m = create_model("vit_tiny", 100)
    assert (m.patch.out_channels, len(m.blocks), m.blocks[0].attn.heads, m.patch_size) == (192, 12, 3, 4)
    assert m.kd_taps == ["grids.3", "grids.7", "grids.11"]
    assert 5.3e6 < sum(p.numel() for p in m.parameters()) < 5.6e6  # ViT-Ti: 5.4-5.7 M with its head
