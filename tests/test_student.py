"""Student zoo, registry, user factories and taps (checked against manual forwards)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import KdpipeError
from kdpipe.student import StudentTaps, auto_taps, check_output, create_model, list_models

# the CNNs (ViT students, whose taps share one resolution: tests/test_vit_student.py)
SMALL_FIRST = sorted(
    (n for n in list_models() if not n.startswith("vit")),
    key=lambda n: ("110" in n or "34" in n or "40" in n, n),
)


@pytest.mark.parametrize("name", SMALL_FIRST)
def test_every_model_builds_and_runs_small_inputs(name: str) -> None:
    torch.manual_seed(0)
    for shape in ((2, 3, 32, 32), (2, 1, 28, 28)):
        m = create_model(name, 10, in_chans=shape[1])
        taps = StudentTaps(m)
        with torch.no_grad():
            y = m(torch.randn(shape))
        assert y.shape == (2, 10)
        feats = taps.features
        # stage outputs: strictly decreasing resolutions, and the trace rule finds the same modules
        res = [f.shape[-1] for f in feats]
        assert res == sorted(set(res), reverse=True)
        assert auto_taps(m, shape[1:]) == taps.names == m.kd_taps


def test_cifar_resnet_taps_are_stage_outputs() -> None:
    m = create_model("resnet8", 10).eval()
    taps = StudentTaps(m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        m(x)
        h = F.relu(m.bn1(m.conv1(x)))
        expect = []
        for layer in (m.layer1, m.layer2, m.layer3):
            h = layer(h)
            expect.append(h)
    assert [tuple(f.shape[1:]) for f in taps.features] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    for got, ref in zip(taps.features, expect, strict=True):
        torch.testing.assert_close(got, ref)
        assert (got >= 0).all()  # post-ReLU


def test_wrn_tap_is_raw_residual_sum() -> None:
    m = create_model("wrn_16_2", 10).eval()
    taps = StudentTaps(m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = m(x)
        h = m.conv1(x)
        for group in (m.block1, m.block2, m.block3):
            for blk in group:
                o1 = F.relu(blk.bn1(h))
                z = blk.conv2(F.relu(blk.bn2(blk.conv1(o1))))
                h = z + (h if blk.shortcut is None else blk.shortcut(o1))
        ref_logits = m.fc(F.relu(m.bn(h)).mean((2, 3)))
    torch.testing.assert_close(taps.features[2], h)
    assert (taps.features[2] < 0).any()  # a raw sum, not post-activation
    torch.testing.assert_close(y, ref_logits)
    assert [f.shape[1] for f in taps.features] == [32, 64, 128]


def test_resnet18_stems_and_blocks_spec() -> None:
    m = create_model("resnet18", 5, in_chans=1, cifar_stem=True)
    taps = StudentTaps(m, "blocks")
    assert taps.names == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert taps.probe((1, 28, 28))[0] == (64, 28, 28)
    assert StudentTaps(create_model("resnet18", 5)).probe((3, 64, 64))[0] == (64, 16, 16)


class Plain(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.c1, self.r1, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.r2 = nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        self.features = nn.Sequential(
            nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r2(self.c2(self.pool(self.r1(self.c1(x)))))
        return self.head(self.features(x).mean((2, 3)))


def test_auto_taps_for_user_model_without_blocks() -> None:
    m = Plain(3)
    # "features" spans 8 -> 4 -> 2: not a candidate; no composite remains, so leaves count
    assert auto_taps(m, (3, 16, 16)) == ["r1", "r2", "features.2", "features.3"]
    del m.features
    m.features = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
    # a single-resolution container is block-level: only it counts
    assert auto_taps(m, (3, 16, 16)) == ["features"]


def test_user_factory_from_file(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        "import torch.nn as nn\n"
        "def make_net(num_classes, width=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(width, num_classes))\n"
        "def not_a_model(num_classes):\n"
        "    return 3\n"
    )
    (pkg / "broken.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = create_model("mypkg.models:make_net", 7, in_chans=3, width=6)
    assert m[0].out_channels == 6 and m(torch.zeros(1, 3, 9, 9)).shape == (1, 7)
    check_output(m, 7, 3, (9, 9))
    with pytest.raises(KdpipeError, match="expected"):
        check_output(m, 8, 3, (9, 9))
    m2 = create_model(f"{pkg / 'models.py'}:make_net", 2)
    assert m2(torch.zeros(1, 3, 5, 5)).shape == (1, 2)
    with pytest.raises(KdpipeError, match="unknown argument"):
        create_model("mypkg.models:make_net", 7, depth=3)
    with pytest.raises(KdpipeError, match="importing mypkg.broken failed"):
        create_model("mypkg.broken:make_net", 7)
    with pytest.raises(KdpipeError, match="did you mean make_net"):
        create_model("mypkg.models:make_nett", 7)
    with pytest.raises(KdpipeError, match="expected a torch.nn.Module"):
        create_model("mypkg.models:not_a_model", 7)


def test_error_messages_list_close_matches() -> None:
    with pytest.raises(KdpipeError, match="did you mean.*resnet20"):
        create_model("resnet2O", 10)
    with pytest.raises(KdpipeError, match="did you mean.*wrn_16_2"):
        create_model("wrn-16-2", 10)
    with pytest.raises(KdpipeError, match="unknown argument"):
        create_model("resnet8", 10, width=3)
    with pytest.raises(KdpipeError, match="did you mean layer2"):
        StudentTaps(create_model("resnet8", 10), ["layer2", "layr2"])


def test_option_a_shortcut_has_no_projection_parameters() -> None:
    a = create_model("resnet20", 10, shortcut="A")
    b = create_model("resnet20", 10)
    assert sum(p.numel() for p in a.parameters()) < sum(p.numel() for p in b.parameters())
    assert a(torch.randn(2, 3, 32, 32)).shape == (2, 10)
