"""Attention-based feature distillation (Ji et al., AAAI 2021), on cached teacher targets.

Teacher side per guide layer t (from the cache): pooled vector g_t = mean_hw(F_t) (C_t) and normalised
map v_t = l2n(mean_c(F_t**2)) (H_t*W_t). Student side per layer s: features F_s (B,C_s,H_s,W_s).

  query_t  = BN(Linear_{C_t->d}(g_t))                      (no ReLU)
  key_s    = ReLU(BN(Linear_{C_s->d}(mean_hw F_s)))
  key_{s,t}= chunk t of BN(Linear_{d->d*T}(key_s))        (one shared layer; BN over all B*S keys)
  logit[b,t,s] = (query_t . key_{s,t} + p_t . p_s) / sqrt(d);  att = softmax over s
  diff[b,t,s]  = mean_hw (l2n(pool_{H_t,W_t} mean_c(F_s**2)) - v_t)**2
  L_AFD = sum_t mean_b sum_s att[b,t,s] * diff[b,t,s]

Linear layers have biases and PyTorch's default init; p_t, p_s are Xavier-normal. The attention is not
detached: the student's features get gradient through both the keys and the maps (as in released code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kdpipe.errors import KdpipeError
from kdpipe.losses.common import as_float, channel_energy, l2n


class AFD(nn.Module):
    """AFD meta-network and loss. ``forward(student_feats, teacher_pooled, teacher_maps) -> scalar``.

    teacher_channels C_t (T layers), student_channels C_s (S layers), d = query/key size (128).
    BatchNorm needs a batch of at least 2 in training mode.
    """

    def __init__(
        self, teacher_channels: Sequence[int], student_channels: Sequence[int], d: int = 128
    ) -> None:
        super().__init__()
        if not teacher_channels or not student_channels:
            raise KdpipeError("AFD needs at least one teacher tap and one student tap")
        self.d, self.n_t, self.n_s = d, len(teacher_channels), len(student_channels)
        self.query = nn.ModuleList(
            nn.Sequential(nn.Linear(c, d), nn.BatchNorm1d(d)) for c in teacher_channels
        )
        self.key = nn.ModuleList(
            nn.Sequential(nn.Linear(c, d), nn.BatchNorm1d(d), nn.ReLU()) for c in student_channels
        )
        self.bilinear = nn.Sequential(nn.Linear(d, d * self.n_t), nn.BatchNorm1d(d * self.n_t))
        self.p_t = nn.Parameter(torch.empty(self.n_t, d))
        self.p_s = nn.Parameter(torch.empty(self.n_s, d))
        nn.init.xavier_normal_(self.p_t)
        nn.init.xavier_normal_(self.p_s)
        self.last_attention: torch.Tensor | None = None

    def attention(
        self, student_feats: Sequence[torch.Tensor], teacher_pooled: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """att (B,T,S), softmax over the student layers."""
        b = student_feats[0].shape[0]
        q = torch.stack([m(as_float(g).detach()) for m, g in zip(self.query, teacher_pooled, strict=True)], 1)
        k = torch.stack(
            [m(as_float(f).mean(dim=(2, 3))) for m, f in zip(self.key, student_feats, strict=True)], 1
        )
        bk = self.bilinear(k.reshape(b * self.n_s, self.d)).reshape(b, self.n_s, self.n_t, self.d)
        logit = torch.einsum("bstq,btq->bts", bk, q) + self.p_t @ self.p_s.T
        return torch.softmax(logit / math.sqrt(self.d), dim=2)

    def forward(
        self,
        student_feats: Sequence[torch.Tensor],
        teacher_pooled: Sequence[torch.Tensor],
        teacher_maps: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """student_feats S x (B,C_s,H_s,W_s); teacher_pooled T x (B,C_t); teacher_maps T x (B,H_t,W_t)."""
        if len(student_feats) != self.n_s or len(teacher_pooled) != self.n_t or len(teacher_maps) != self.n_t:
            raise KdpipeError(
                f"AFD was built for {self.n_t} teacher and {self.n_s} student taps, got "
                f"{len(teacher_maps)} teacher and {len(student_feats)} student taps"
            )
        att = self.attention(student_feats, teacher_pooled)
        self.last_attention = att.detach()
        total = None
        for t, vt in enumerate(teacher_maps):
            size = (int(vt.shape[-2]), int(vt.shape[-1]))
            v = vt.reshape(vt.shape[0], -1).detach()
            s_maps = torch.stack(
                [l2n(channel_energy(f, size).reshape(f.shape[0], -1)) for f in student_feats], 1
            )  # (B,S,HW)
            diff = (s_maps - v.to(s_maps.dtype).unsqueeze(1)).pow(2).mean(dim=2)  # (B,S)
            term = (att[:, t].to(diff.dtype) * diff).sum(dim=1).mean()
            total = term if total is None else total + term
        assert total is not None
        return total
