"""Rotary position embedding (optionally partial: only the first ``rotary_dim`` dims)."""
from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float = 10000.0,
                 dtype=torch.float32):
    """``positions [..., T]`` -> cos, sin ``[..., T, rotary_dim]`` (NeoX half-split layout)."""
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=positions.device,
                                       dtype=torch.float32) / rotary_dim)
    ang = positions.float().unsqueeze(-1) * inv
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x [B, T, H, D]``; cos/sin ``[B|1, T, R]``."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rot = torch.cat([-x2, x1], dim=-1)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    out = xr * c.to(x.dtype) + rot * s.to(x.dtype)
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out
