"""A small causal transformer for the demo (teacher and students).

Pre-norm blocks, learned positions, tied input/output embeddings. Besides
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

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


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

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        shape = (b, n, self.heads, d // self.heads)
        return (t.view(shape).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(x)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm2(x))

    def decode(self, x: torch.Tensor, cache: list[torch.Tensor], pos: int) -> torch.Tensor:
        """x: (B, 1, d). ``cache`` = [keys, values] of shape (B, H, max_len, d_h)."""
        q, k, v = self._split(x)
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
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) @ self.embed.weight.T  # tied output embedding

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        # Right padding only: causal attention never lets a real token see a pad.
        n = input_ids.shape[1]
        if n > self.cfg.max_len:
            raise ValueError(f"sequence of {n} tokens exceeds max_len {self.cfg.max_len}")
        x = self.embed(input_ids) + self.pos(torch.arange(n, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
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
        x = self.embed(tokens[:, None]) + self.pos.weight[pos]
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x = block.decode(x, layer_cache, pos)
        return self._logits(x)[:, 0]
