"""Causal multi-head softmax attention for hybrid layers, with a KV cache.

    q, k, v = split(qkv(x)),  y = softmax(q k^T / sqrt(hd) + mask) v,  out = proj(y)

No positional embedding: the Hyena layers around it carry position. Runs through
torch.nn.functional.scaled_dot_product_attention, or flash-attn when it is importable, the tensors
are on CUDA in half precision and no padding mask is needed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: pip install hyena-rtf[flash]
    from flash_attn import flash_attn_func
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_func = None


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.proj.is_residual_proj = True

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None
    ):
        """x: (B, T, d). key_mask: (B, P + T) with 1 for real tokens, or None (no padding).
        kv: cached (k, v), each (B, h, P, hd), or None. Returns (B, T, d) and the new (k, v)."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # (B, T, h, hd)
        past = 0 if kv is None else kv[0].shape[2]
        use_flash = (
            flash_attn_func is not None
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
            and key_mask is None
            and past == 0
        )
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, hd)
        if kv is not None:
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        if use_flash:
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
        elif key_mask is None and past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            S = past + T
            qpos = torch.arange(past, S, device=x.device)[:, None]
            kpos = torch.arange(S, device=x.device)[None, :]
            allowed = (kpos <= qpos).unsqueeze(0)  # (1, T, S)
            if key_mask is not None:
                # A padded query would otherwise see no key at all (NaN): let it see itself.
                allowed = (allowed & key_mask[:, None, -S:].bool()) | (kpos == qpos).unsqueeze(0)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))
        return self.proj(y.transpose(1, 2).reshape(B, T, d)), (k, v)
