"""``pool_index``: the one rule for where CLIP pools, checked against transformers' CLIPTextModel itself.

CLIP configs older than transformers PR #24773 say ``eos_token_id=2`` and pool at the highest id; newer ones pool at
the first EOS. The two differ when the highest id is not EOS (tokens added to the vocabulary) or EOS is missing.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel

from apl_adapter.testing import tiny_clip_text_config
from apl_adapter.tuners.apl.prefix import insert_prefix_ids, pool_index

BOS, EOS = 49406, 49407


def clip(eos_token_id: int = EOS, vocab_size: int | None = None) -> CLIPTextModel:
    config = tiny_clip_text_config()
    config.eos_token_id = eos_token_id
    if vocab_size is not None:
        config.vocab_size = vocab_size
    torch.manual_seed(0)
    return CLIPTextModel(config).eval()


def row(tokens: list[int], pad: int = EOS, eos: bool = True, length: int = 77) -> list[int]:
    body = [BOS, *tokens, *([EOS] if eos else [])]
    return body + [pad] * (length - len(body))


def transformers_pool_index(model: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    """Where the real model pooled: the row of ``last_hidden_state`` equal to ``pooler_output``."""
    with torch.no_grad():
        out = model(input_ids=ids)
    same = (out.last_hidden_state == out.pooler_output[:, None]).all(dim=-1)
    assert (same.sum(dim=-1) >= 1).all()
    return same.int().argmax(dim=-1)


def test_first_eos_at_any_position_eos_or_bang_padding():
    model = clip()
    ids = torch.tensor([row([]), row([320]), row([320, 1125, 539]), row([320] * 75), row([320, 1125], pad=0)])
    assert pool_index(ids, model.config).tolist() == [1, 2, 4, 76, 3]
    assert torch.equal(pool_index(ids, model.config), transformers_pool_index(model, ids))


@pytest.mark.parametrize("m", [1, 4, 10])
def test_prefixed_ids_pool_at_eos_shifted_by_m_or_at_the_end_when_cut(m):
    model = clip()
    ids = torch.tensor([row([320, 1125]), row([539] * 60), row([539] * 75)])
    shifted = insert_prefix_ids(ids, m, EOS)
    want = [3 + m, min(61 + m, 76), 76]
    assert pool_index(shifted, model.config).tolist() == want
    assert torch.equal(pool_index(shifted, model.config), transformers_pool_index(model, shifted))


def test_an_added_token_above_eos_is_not_pooled_with_a_current_config():
    """Textual-inversion style: id 49408 is past EOS, so the argmax of the ids is not EOS."""
    model = clip(vocab_size=EOS + 2)
    ids = torch.tensor([row([49408, 320]), row([320, 49408, 49408])])
    assert ids.argmax(dim=-1).tolist() == [1, 2]
    assert pool_index(ids, model.config).tolist() == [3, 4]
    assert torch.equal(pool_index(ids, model.config), transformers_pool_index(model, ids))


def test_a_legacy_config_pools_at_the_highest_id_as_transformers_does():
    """Even where that is not EOS: no EOS (BOS is then the highest id), or a token added past EOS."""
    model = clip(eos_token_id=2, vocab_size=EOS + 3)
    ids = torch.tensor([row([320, 1125]), row([320, 1125], pad=0, eos=False), row([320, 49408, 539])])
    assert pool_index(ids, model.config).tolist() == [3, 0, 2]
    assert torch.equal(pool_index(ids, model.config), transformers_pool_index(model, ids))


def test_the_exported_graph_pools_where_the_model_does_with_a_legacy_config():
    from apl_export.modules import CLIPTextEncoderGraph

    model = clip(eos_token_id=2, vocab_size=EOS + 3)
    ids = torch.tensor([row([320, 1125]), row([320, 49408, 539])])
    with torch.no_grad():
        _, pooled = CLIPTextEncoderGraph(model)(ids.to(torch.int32))
        want = model(input_ids=ids).pooler_output
    torch.testing.assert_close(pooled, want, atol=1e-5, rtol=0)
