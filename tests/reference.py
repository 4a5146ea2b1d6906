"""An independent, hand-built reference of the prefixed CLIP text encoder.

Written from the paper's description only, row by row and layer by layer with plain tensor
math, so it shares no code with ``apl_adapter.tuners.apl`` or transformers' CLIP forward.
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


def _attention(layer, x: torch.Tensor, deep: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    attn = layer.self_attn
    batch, seq, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads

    def split(t):
        return t.view(batch, seq, heads, head_dim).transpose(1, 2)

    q = split(x @ attn.q_proj.weight.T + attn.q_proj.bias) * head_dim**-0.5
    k_proj = getattr(attn.k_proj, "base_layer", attn.k_proj)
    v_proj = getattr(attn.v_proj, "base_layer", attn.v_proj)
    k_rows = x @ k_proj.weight.T + k_proj.bias
    v_rows = x @ v_proj.weight.T + v_proj.bias
    if deep is not None:  # a deep prefix owns this layer's keys and values at positions 1..m
        k_rows, v_rows = k_rows.clone(), v_rows.clone()
        for i in range(deep[0].shape[0]):
            k_rows[:, 1 + i] = deep[0][i]
            v_rows[:, 1 + i] = deep[1][i]
    k = split(k_rows)
    v = split(v_rows)
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
def reference_encode(
    text_model,
    input_ids: torch.Tensor,
    prefix: torch.Tensor | None,
    deep_keys: torch.Tensor | None = None,
    deep_values: torch.Tensor | None = None,
):
    """(last_hidden_state (B, L', D), pooled (B, D), per-layer hidden states) of a CLIPTextModel.

    ``deep_keys`` / ``deep_values`` ``(num_layers, m, D)``: a deep prefix, whose rows replace every layer's keys
    and values at positions ``1..m``."""
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
    for index, layer in enumerate(text_model.encoder.layers):
        deep = None if deep_keys is None else (deep_keys[index], deep_values[index])
        x = x + _attention(layer, _ln(layer.layer_norm1, x), deep)
        x = x + _mlp(layer, _ln(layer.layer_norm2, x))
        hidden.append(x)
    x = _ln(text_model.final_layer_norm, x)
    pooled = torch.stack([x[b, row.index(EOS, 1 + m)] for b, row in enumerate(rows)])
    return x, pooled, hidden
