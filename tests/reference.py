"""An independent, hand-built reference of the prefixed CLIP text encoder.

Written from the paper's description only, row by row and layer by layer with plain tensor
math, so it shares no code with ``apl_adapter.model`` or transformers' CLIP forward.
"""

from __future__ import annotations

import torch

EOS = 49407


def prefixed_rows(input_ids: torch.Tensor, m: int, length: int = 77) -> list[list[int | None]]:
    """Per row: BOS, m prefix slots (None), then the prompt shifted right; EOS kept if cut."""
    rows = []
    for row in input_ids.tolist():
        new = [row[0]] + [None] * m + row[1:]
        new = new[:length]
        if EOS not in new[1 + m :]:
            new[-1] = EOS
        rows.append(new)
    return rows


def _attention(layer, x: torch.Tensor) -> torch.Tensor:
    attn = layer.self_attn
    batch, seq, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads

    def split(t):
        return t.view(batch, seq, heads, head_dim).transpose(1, 2)

    q = split(x @ attn.q_proj.weight.T + attn.q_proj.bias) * head_dim**-0.5
    k = split(x @ attn.k_proj.weight.T + attn.k_proj.bias)
    v = split(x @ attn.v_proj.weight.T + attn.v_proj.bias)
    scores = q @ k.transpose(-1, -2)
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, width)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def _mlp(layer, x: torch.Tensor) -> torch.Tensor:
    h = x @ layer.mlp.fc1.weight.T + layer.mlp.fc1.bias
    h = h * torch.sigmoid(1.702 * h)  # quick_gelu
    return h @ layer.mlp.fc2.weight.T + layer.mlp.fc2.bias


def _ln(module, x):
    return torch.nn.functional.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


@torch.no_grad()
def reference_encode(text_model, input_ids: torch.Tensor, prefix: torch.Tensor | None):
    """(last_hidden_state (B, L', D), pooled (B, D), per-layer hidden states) of a CLIPTextModel."""
    m = 0 if prefix is None else prefix.shape[0]
    embeddings = getattr(text_model.embeddings, "base_layer", text_model.embeddings)
    table = embeddings.token_embedding.weight
    positions = embeddings.position_embedding.weight
    rows = prefixed_rows(input_ids, m)
    embeds = []
    for row in rows:
        vecs = [prefix[i - 1] if tok is None else table[tok] for i, tok in enumerate(row)]
        embeds.append(torch.stack(vecs))
    x = torch.stack(embeds) + positions[: len(rows[0])]
    hidden = [x]
    for layer in text_model.encoder.layers:
        x = x + _attention(layer, _ln(layer.layer_norm1, x))
        x = x + _mlp(layer, _ln(layer.layer_norm2, x))
        hidden.append(x)
    x = _ln(text_model.final_layer_norm, x)
    pooled = torch.stack([x[b, row.index(EOS, 1 + m)] for b, row in enumerate(rows)])
    return x, pooled, hidden
