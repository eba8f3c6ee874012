"""Causal multi-head softmax attention for hybrid layers, with a KV cache.

    q, k, v = split(qkv(x)),  y = softmax(q k^T / sqrt(hd) + mask) v,  out = proj(y)

No positional embedding: the Hyena layers around it carry position. Runs through
torch.nn.functional.scaled_dot_product_attention, or flash-attn when it is importable, the tensors
are on CUDA in half precision and no padding mask is needed.

Two KV caches: `forward(x, kv=(k, v))` appends to a growing (k, v) pair (the eager cache,
HyenaRTFCache), and `step(x, kv, pos)` writes one token into a `StaticKV` of fixed length (the
static decode step, models/static_decode.py), with the same projections and the same masking rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: pip install hyena-rtf[flash]
    from flash_attn import flash_attn_func
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_func = None

FLASH_DEVICES = ("cuda",)  # flash-attn's kernels are CUDA kernels


@dataclass
class StaticKV:
    """Fixed-size KV cache of one attention layer, written in place.

    k, v:  (B, h, L, hd) keys and values of positions 0 .. L-1 (zeros where nothing is written);
    valid: (B, L) bool, True at the positions a query may attend to: written, and not padding.
    Positions at and after the write position are not valid yet, so attending over all L keys
    with `valid` as the mask is the same attention as over the keys written so far.
    """

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def empty(cls, like: torch.Tensor, max_length: int) -> StaticKV:
        """Zero buffers shaped like the prefill's keys `like` (B, h, P, hd), with room for max_length."""
        B, h, _, hd = like.shape
        k = like.new_zeros(B, h, max_length, hd)
        return cls(k, torch.zeros_like(k), torch.zeros(B, max_length, dtype=torch.bool, device=like.device))

    def load_(self, kv: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None) -> None:
        """Copy a prefill's (k, v) (B, h, P, hd) in, in place. key_mask: (B, P) 1 for real tokens, or None."""
        P = kv[0].shape[2]
        for buf, src in zip((self.k, self.v), kv):
            buf.zero_()
            buf[:, :, :P].copy_(src)
        self.valid.zero_()
        self.valid[:, :P] = True if key_mask is None else key_mask.bool()

    def reorder_(self, idx: torch.Tensor) -> None:
        """Keep rows `idx` (beam search), in place."""
        for t in (self.k, self.v, self.valid):
            t.copy_(t.index_select(0, idx))

    def grown(self, max_length: int) -> StaticKV:
        """A copy with room for max_length >= L positions: new buffers (B, h, max_length, hd) and
        (B, max_length), the first L positions copied, the rest zero and not valid."""
        L = self.k.shape[2]
        k = self.k.new_zeros(*self.k.shape[:2], max_length, self.k.shape[3])
        bigger = StaticKV(k, torch.zeros_like(k), self.valid.new_zeros(self.valid.shape[0], max_length))
        bigger.k[:, :, :L].copy_(self.k)
        bigger.v[:, :, :L].copy_(self.v)
        bigger.valid[:, :L].copy_(self.valid)
        return bigger


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
            and q.device.type in FLASH_DEVICES
            # q's dtype, not x's: under bf16 autocast x is the float32 LayerNorm output and q the
            # bf16 output of the projection, which is what flash-attn is given.
            and q.dtype in (torch.float16, torch.bfloat16)
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

    def step(self, x: torch.Tensor, kv: StaticKV, pos: torch.Tensor) -> torch.Tensor:
        """One token of every row at position `pos` ((1,) int64 on the device: no host scalar, so a
        CUDA graph can replay it). x: (B, d) -> (B, d). Writes the token's key and value at `pos`,
        marks it valid, attends over the valid keys; the new token is never padding."""
        B, d = x.shape
        q, k, v = self.qkv(x).view(B, 3, self.n_head, 1, self.head_dim).unbind(1)  # (B, h, 1, hd)
        kv.k.index_copy_(2, pos, k)
        kv.v.index_copy_(2, pos, v)
        kv.valid.index_fill_(1, pos, True)
        y = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=kv.valid[:, None, None, :])
        return self.proj(y.reshape(B, d))
