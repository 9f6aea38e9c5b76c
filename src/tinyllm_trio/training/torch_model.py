"""The TinyLLM transformer in PyTorch, for training only.

It mirrors the numpy `Transformer` exactly (pre-LayerNorm blocks, sinusoidal absolute positions
added to the token embedding, exact-erf GELU, LayerNorm eps 1e-5, no biases in Linear layers, an
untied LM head, the attention scale chosen by `ModelConfig.attention_scale`), and its
`state_dict()` uses the original release's tensor names, so a trained model exports to the numpy
server with a plain name-for-name copy. tests/model/test_training.py checks that both give the same
logits on the same weights.

The per-head key/query/value Linear modules exist only so the parameter names stay the
original's; the forward pass concatenates them and runs all heads in one
`scaled_dot_product_attention` call (with the explicit scale), which is several times faster.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinyllm_trio.model.transformer import ModelConfig


def sinusoidal_positions(n_pos: int, dim: int) -> torch.Tensor:
    """pe[p, 2i] = sin(p / 10000^(2i/dim)), pe[p, 2i+1] = cos(p / 10000^(2i/dim))."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n_pos, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe.float()


class Head(nn.Module):
    """Holds one head's projections (names: key, query, value); the math lives in the parent."""

    def __init__(self, n_embd: int, head_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)


class MultiHeadAttention(nn.Module):
    def __init__(self, config: ModelConfig, dropout: float) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.scale = config.scale
        self.heads = nn.ModuleList(
            Head(config.n_embd, config.head_size) for _ in range(config.n_head)
        )
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        w = torch.cat(
            [
                torch.cat([h.query.weight for h in self.heads]),
                torch.cat([h.key.weight for h in self.heads]),
                torch.cat([h.value.weight for h in self.heads]),
            ]
        )  # [3C, C], rows grouped head by head within each of q, k, v
        q, k, v = (x @ w.T).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, self.head_size).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            dropout_p=self.attn_dropout if self.training else 0.0,
            scale=self.scale,
        )
        y = y.transpose(1, 2).reshape(b, t, c)  # heads concatenated in order, as the original
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=False),
            nn.GELU(),  # exact erf form
            nn.Linear(4 * n_embd, n_embd, bias=False),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, dropout: float) -> None:
        super().__init__()
        self.sa = MultiHeadAttention(config, dropout)
        self.ffwd = FeedForward(config.n_embd, dropout)
        self.ln1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.ln2 = nn.LayerNorm(config.n_embd, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class TorchTransformer(nn.Module):
    """Training twin of `tinyllm_trio.model.transformer.Transformer` (same names, same math)."""

    def __init__(self, config: ModelConfig, dropout: float = 0.1) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.register_buffer(
            "positions", sinusoidal_positions(config.max_context, config.n_embd), persistent=False
        )
        self.blocks = nn.ModuleList(Block(config, dropout) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, V]."""
        t = idx.shape[1]
        if t > self.config.max_context:
            raise ValueError(
                f"sequence of {t} tokens exceeds max_context {self.config.max_context}"
            )
        x = self.token_embedding(idx) + self.positions[:t]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def numpy_weights(self) -> dict[str, np.ndarray]:
        """The state dict as float32 numpy arrays, named as the numpy Transformer expects."""
        return {k: v.detach().cpu().float().numpy().copy() for k, v in self.state_dict().items()}

    def load_numpy_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.load_state_dict(
            {k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}
        )
