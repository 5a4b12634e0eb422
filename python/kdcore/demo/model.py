"""A small causal transformer for the demo (teacher and students).

Pre-norm blocks, tied input/output embeddings, and positions either learned
(one embedding per position: the shipped teacher) or rotary (queries and keys
rotated by their position, so attending to "the token k back" is the same
at every position: the students, which must learn to copy numbers). Besides
the ordinary ``forward`` (full sequences, used for training) it has
``decode_step``: one token per sequence against a key/value cache, which
makes the agent roll-outs cheap on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import VOCAB_SIZE


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = VOCAB_SIZE  # the demo tokenizer's
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_len: int = 192
    positions: str = "learned"  # "learned" or "rotary"

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def _rotary_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (max_len, head_dim / 2) of the rotary position encoding."""
    half = cfg.d_model // cfg.n_heads // 2
    freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    angle = torch.arange(cfg.max_len, dtype=torch.float64)[:, None] * freq
    return angle.cos().float(), angle.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) rotated pairwise (first half, second half) by position."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
        )

    def _split(self, x: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        shape = (b, n, self.heads, d // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        return q, k, v

    def forward(self, x: torch.Tensor, rotary=None) -> torch.Tensor:
        q, k, v = self._split(x, rotary)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm2(x))

    def decode(self, x: torch.Tensor, cache: list[torch.Tensor], pos: int, rotary=None):
        """x: (B, 1, d). ``cache`` = [keys, values] of shape (B, H, max_len, d_h)."""
        q, k, v = self._split(x, rotary)
        cache[0][:, :, pos : pos + 1] = k
        cache[1][:, :, pos : pos + 1] = v
        keys, values = cache[0][:, :, : pos + 1], cache[1][:, :, : pos + 1]
        att = F.scaled_dot_product_attention(q, keys, values)
        x = x + self.proj(att.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Decoder-only language model: ``model(input_ids) -> logits (B, L, V)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not a multiple of n_heads {cfg.n_heads}")
        if cfg.positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary'; got {cfg.positions!r}")
        if cfg.positions == "rotary" and (cfg.d_model // cfg.n_heads) % 2:
            raise ValueError("rotary positions need an even head size (d_model / n_heads)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=0.02)
        else:
            cos, sin = _rotary_tables(cfg)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) @ self.embed.weight.T  # tied output embedding

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        # Right padding only: causal attention never lets a real token see a pad.
        n = input_ids.shape[1]
        if n > self.cfg.max_len:
            raise ValueError(f"sequence of {n} tokens exceeds max_len {self.cfg.max_len}")
        x = self.embed(input_ids)
        rotary = None
        if self.pos is not None:
            x = x + self.pos(torch.arange(n, device=input_ids.device))
        else:
            rotary = (self.rotary_cos[:n], self.rotary_sin[:n])
        for block in self.blocks:
            x = block(x, rotary)
        return self._logits(x)

    def new_cache(self, batch: int) -> list[list[torch.Tensor]]:
        cfg, p = self.cfg, self.embed.weight
        shape = (batch, cfg.n_heads, cfg.max_len, cfg.d_model // cfg.n_heads)
        return [[p.new_zeros(shape), p.new_zeros(shape)] for _ in range(cfg.n_layers)]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: list, pos: int) -> torch.Tensor:
        """Logits (B, V) for the next token after feeding ``tokens`` (B,) at ``pos``."""
        if pos >= self.cfg.max_len:
            raise ValueError(f"position {pos} exceeds max_len {self.cfg.max_len}")
        x = self.embed(tokens[:, None])
        rotary = None
        if self.pos is not None:
            x = x + self.pos.weight[pos]
        else:
            rotary = (self.rotary_cos[pos : pos + 1], self.rotary_sin[pos : pos + 1])
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x = block.decode(x, layer_cache, pos, rotary)
        return self._logits(x)[:, 0]
