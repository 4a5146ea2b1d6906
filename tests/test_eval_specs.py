"""apl-eval input files: identities (JSON or folders) and prompts, with clear errors for bad ones."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from apl_adapter.evaluation import EvalInputError, load_identities, load_prompts


def test_prompts_split_into_templates_and_prompts_without_people(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# identity templates\na photo of {name}\n\n{name} on a beach  # trailing comment\na red cube\n")
    prompts = load_prompts(path)
    assert prompts.templates == ["a photo of {name}", "{name} on a beach"]
    assert prompts.neutral == ["a red cube"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("# nothing\n\n", "has no prompts"), ("a photo of {name} in {city}\n", "placeholder other than {name}")],
)
def test_bad_prompts_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    with pytest.raises(EvalInputError, match=message):
        load_prompts(path)
    with pytest.raises(EvalInputError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")


def _photo(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)
    return path


def test_identities_from_json_resolve_paths_relative_to_the_file(tmp_path):
    _photo(tmp_path / "refs" / "ann" / "1.png")
    _photo(tmp_path / "refs" / "ann" / "2.jpg")
    (tmp_path / "refs" / "ann" / "notes.txt").write_text("not an image")
    bo = _photo(tmp_path / "elsewhere" / "bo.png")
    (tmp_path / "refs" / "empty").mkdir()
    spec = {
        "identities": [
            {"name": "Ann Lee", "references": "refs/ann", "attributes": "a woman with black hair"},
            {"name": "Bo Chen", "references": [str(bo), "refs/missing.png"]},
            {"name": "Cy Ode", "references": "refs/empty"},
            {"name": "Di No"},
        ]
    }
    (tmp_path / "ids.json").write_text(json.dumps(spec))
    ann, bo_id, cy, di = load_identities(tmp_path / "ids.json")
    assert [p.name for p in ann.references] == ["1.png", "2.jpg"] and ann.attributes == "a woman with black hair"
    assert not ann.problems
    assert bo_id.references == [bo] and "refs/missing.png does not exist" in bo_id.problems[0]
    assert not cy.references and "holds no image files" in cy.problems[0] and "identity skipped" in cy.problems[-1]
    assert not di.references and "no 'references' given" in di.problems[0]


def test_identities_from_a_folder_of_folders(tmp_path):
    _photo(tmp_path / "Ann_Lee" / "a.png")
    _photo(tmp_path / "Bo_Chen" / "b.png")
    assert [(i.name, len(i.references)) for i in load_identities(tmp_path)] == [("Ann Lee", 1), ("Bo Chen", 1)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"identities": []}', "lists no identities"),
        ('[{"references": "x"}]', "needs a non-empty string 'name'"),
        ('[{"name": "A", "references": []}, {"name": "A", "references": []}]', "listed twice"),
    ],
)
def test_bad_identities_files_name_the_problem(tmp_path, content, message):
    (tmp_path / "ids.json").write_text(content)
    with pytest.raises(EvalInputError, match=message):
        load_identities(tmp_path / "ids.json")


def test_an_identities_folder_without_subfolders_is_an_error(tmp_path):
    with pytest.raises(EvalInputError, match="no sub-folders"):
        load_identities(tmp_path)
