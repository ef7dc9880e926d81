"""The CLIP text transformer that conditions Stable Diffusion (SD 1.x: OpenAI CLIP ViT-L/14; SD 2.x: OpenCLIP ViT-H;
SDXL: both ViT-L and OpenCLIP ViT-bigG, the latter with its projected pooled output).

Parameter names are transformers' ``CLIPTextModel`` keys without the ``text_model.`` prefix (the loader strips it),
so a diffusers ``text_encoder/`` folder loads with no renames. Reference: transformers/models/clip/modeling_clip.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn



@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    act: str = "quick_gelu"  # OpenAI CLIP (SD 1.x); OpenCLIP (SD 2.x) uses "gelu"
    eps: float = 1e-5
    projection_dim: int | None = None  # set when the checkpoint has a text_projection (pooled output is projected)
    # transformers' legacy configs say eos_token_id=2; then the pooled token is the highest id (<|endoftext|> is the
    # last entry of the vocabulary), otherwise the first occurrence of eos_token_id.
    eos_token_id: int = 2

    @classmethod
    def from_transformers(cls, cfg: dict, has_projection: bool = False) -> "CLIPTextConfig":
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"text encoder hidden_act={act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
        return cls(
            vocab_size=cfg.get("vocab_size", 49408),
            hidden_size=cfg.get("hidden_size", 768),
            intermediate_size=cfg.get("intermediate_size", 3072),
            num_layers=cfg.get("num_hidden_layers", 12),
            num_heads=cfg.get("num_attention_heads", 12),
            max_positions=cfg.get("max_position_embeddings", 77),
            act=act,
            eps=cfg.get("layer_norm_eps", 1e-5),
            projection_dim=cfg.get("projection_dim") if has_projection else None,
            eos_token_id=cfg.get("eos_token_id", 2),
        )


    def num_parameters(self) -> int:
        """The number of weights ``CLIPTextModel(self)`` holds, by arithmetic alone (no module is built)."""
        h, inner = self.hidden_size, self.intermediate_size
        layer = 2 * 2 * h + 4 * (h * h + h) + (h * inner + inner) + (inner * h + h)  # norms, attention, MLP
        projection = h * self.projection_dim if self.projection_dim is not None else 0
        return (self.vocab_size + self.max_positions) * h + self.num_layers * layer + 2 * h + projection

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class SelfAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q, k, v = (p(x).view(b, n, self.heads, d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, N, D)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))


class CLIPTextModel(nn.Module):
    """Token ids (B, 77) -> (hidden states (B, 77, C), pooled end-of-text embedding (B, C or projection_dim))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1, final_norm: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``clip_skip`` counts like the webui slider: 1 = last layer, 2 = penultimate, ...; the hidden state it picks
        goes through the final LayerNorm, as SD 1.x pipelines with CLIP skip do, unless ``final_norm`` is False
        (SDXL conditions on a raw hidden state). The pooled output always comes from the last layer."""
        if not 1 <= clip_skip <= self.config.num_layers:
            raise ValueError(f"clip_skip={clip_skip} is out of range: this text encoder has "
                             f"{self.config.num_layers} layers, so use 1..{self.config.num_layers}")
        x = self.embeddings(input_ids)  # (B, N, C)
        skip_at = self.config.num_layers - clip_skip
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x)
            if i == skip_at:
                hidden = x
        last = self.final_layer_norm(x)
        if final_norm:
            hidden = last if clip_skip == 1 else self.final_layer_norm(hidden)
        return hidden, self.pool(input_ids, last)

    def all_layers(self, input_ids: torch.Tensor, final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's hidden state through the final LayerNorm (raw with ``final_norm`` False, as SDXL reads
        them), stacked (B, L, N, C), and the pooled output: what any ``clip_skip`` picks from
        (``[:, L - clip_skip]``), in one call. The exported text-encoder graphs are this."""
        x = self.embeddings(input_ids)  # (B, N, C)
        states = []
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(self.final_layer_norm(x) if final_norm else x)
        last = states[-1] if final_norm else self.final_layer_norm(x)  # the pooled token is always normalised
        return torch.stack(states, dim=1), self.pool(input_ids, last)  # (B, L, N, C), (B, P)

    def pool(self, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The end-of-text token's row of the last (normalised) hidden state (B, C), projected when there is a
        text_projection."""
        if self.config.eos_token_id == 2:
            eos = input_ids.argmax(dim=-1)
        else:
            eos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]  # (B, C)
        if self.config.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return pooled
