"""The world's people, names and prompts: deterministic, well split, tokenized by the real CLIP tokenizer."""

from __future__ import annotations

import random

import numpy as np
import pytest

from apl_adapter.tokenizer import load_clip_tokenizer
from apl_adapter.world import WorldSpec, render_face, render_scene
from apl_adapter.world.spec import FINE_FEATURE_VALUES


@pytest.fixture(scope="module")
def world() -> WorldSpec:
    return WorldSpec.from_seed(0)


def test_world_is_a_function_of_its_seed(world):
    again = WorldSpec.from_seed(0)
    other = WorldSpec.from_seed(1)
    assert again.to_json() == world.to_json()
    assert other.names != world.names


def test_splits_are_disjoint_and_sized(world):
    seen, unseen, late = ({p.name for p in getattr(world, s)} for s in ("seen", "unseen", "late"))
    assert (len(seen), len(unseen), len(late)) == (20, 12, 8)
    assert not (seen & unseen or seen & late or unseen & late)
    assert len(set(world.names)) == len(world.names) == 40


def test_people_differ_in_fine_features(world):
    fines = [tuple(p.fine[k] for k in FINE_FEATURE_VALUES) for p in world.identities]
    for i, a in enumerate(fines):
        for b in fines[i + 1 :]:
            assert sum(x != y for x, y in zip(a, b)) >= 2


def test_names_are_several_subword_tokens_and_prompts_fit_with_a_prefix(world):
    tok = load_clip_tokenizer()
    for person in world.identities:
        name_ids = tok(person.name).input_ids[1:-1]
        assert len(name_ids) >= 3, person.name
        for k in range(len(world.person_templates)):
            # 10 prefix vectors must fit in CLIP's 77 positions without cutting the prompt
            assert len(tok(world.identity_prompt(person.name, k)).input_ids) + 10 <= 77
            assert len(tok(world.attribute_prompt(person.name, k)).input_ids) + 10 <= 77
    for scene in world.scenes[:8]:
        for k in range(len(world.scene_templates)):
            assert len(tok(scene.caption(k)).input_ids) + 10 <= 77


def test_attribute_prompt_names_attributes_not_the_person(world):
    person = world.seen[0]
    prompt = world.attribute_prompt(person.name, 0)
    assert person.name not in prompt
    for value in person.attributes.values():
        assert value in prompt


def test_renderer_is_deterministic_per_seed(world):
    person = world.seen[3]
    a = np.asarray(render_face(person.attributes, person.fine, random.Random(7)))
    b = np.asarray(render_face(person.attributes, person.fine, random.Random(7)))
    c = np.asarray(render_face(person.attributes, person.fine, random.Random(8)))
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    s1 = np.asarray(render_scene(world.scenes[5], random.Random(3)))
    s2 = np.asarray(render_scene(world.scenes[5], random.Random(3)))
    assert np.array_equal(s1, s2)


def test_sibling_style_changes_the_image(world):
    person = world.seen[0]
    base = np.asarray(render_face(person.attributes, person.fine, random.Random(1)), dtype=np.float32)
    sib = np.asarray(render_face(person.attributes, person.fine, random.Random(1), style="sibling"), dtype=np.float32)
    assert np.abs(base - sib).mean() > 10
    with pytest.raises(ValueError, match="unknown style"):
        render_face(person.attributes, person.fine, random.Random(1), style="noir")
