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


# ----------------------------------------------------------------------------------------------------------------
# T5 (SD3's text_encoder_3, FLUX's text_encoder_2): the prefix at positions 0..m-1, the window's length kept
# ----------------------------------------------------------------------------------------------------------------

T5_EOS = 1


def t5_prefixed_rows(input_ids: torch.Tensor, m: int) -> list[list[int | None]]:
    """Per row: m prefix slots (None), then the prompt shifted right, cut to the row's length; EOS kept if cut."""
    rows = []
    for row in input_ids.tolist():
        new = ([None] * m + row)[: len(row)]
        if T5_EOS not in new[m:]:
            new[-1] = T5_EOS
        rows.append(new)
    return rows


def t5_prefixed_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, m: int) -> torch.Tensor:
    """Per row: m ones for the prefix, then the mask shifted right and cut; a moved EOS attends."""
    rows = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        new = ([1] * m + mask)[: len(mask)]
        if T5_EOS not in ids[: len(ids) - m]:
            new[-1] = 1
        rows.append(new)
    return torch.tensor(rows, dtype=attention_mask.dtype)


@torch.no_grad()
def reference_t5_encode(
    plain_t5, input_ids: torch.Tensor, prefix: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """last_hidden_state ``(B, L, D)`` of a plain ``T5EncoderModel`` (no adapter) on the prefixed input built by hand:
    the prefix ``(m, D)`` concatenated before the token embeddings of the shifted prompt, the mask extended with
    ones for it, the plain T5 stack run on those embeddings (its relative position bias sees m more positions)."""
    m = prefix.shape[0]
    table = plain_t5.shared.weight
    rows = t5_prefixed_rows(input_ids, m)
    embeds = torch.stack([torch.cat([prefix, table[torch.tensor(row[m:])]]) for row in rows])
    mask = None if attention_mask is None else t5_prefixed_mask(input_ids, attention_mask, m)
    return plain_t5(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
