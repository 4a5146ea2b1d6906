from apl_adapter.tokenizer import CLIP_VOCAB_SIZE, load_clip_tokenizer, write_clip_tokenizer_files


def test_real_clip_ids(tokenizer):
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    # Ids of OpenAI CLIP's tokenizer; "alz" is the APL authors' placeholder word (one token, 41128).
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("alz").input_ids == [49406, 41128, 49407]


def test_names_split_into_subword_tokens(tokenizer):
    ids = tokenizer("Zorblax Quentaro", add_special_tokens=False).input_ids
    assert len(ids) >= 4


def test_files_round_trip_through_from_pretrained(tmp_path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded("a photo of a cat").input_ids == load_clip_tokenizer()("a photo of a cat").input_ids


def test_pad_token_variants():
    assert load_clip_tokenizer(pad_token="!").pad_token_id == 0
    assert load_clip_tokenizer().pad_token_id == 49407
