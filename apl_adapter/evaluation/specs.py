"""What ``apl-eval`` measures: the identities (name + reference photos) and the prompts.

Identities, either

- a JSON file (paths relative to the file)::

      {"identities": [
          {"name": "Ann Lee", "references": "refs/ann_lee", "attributes": "a woman with short black hair"},
          {"name": "Bo Chen", "references": ["refs/bo_1.jpg", "refs/bo_2.jpg"]}
      ]}

  (a bare list of such objects works too); ``references`` is a folder or a list of image files;
  ``attributes`` is optional: the anonymous description the prefix should still follow;
- or a folder with one sub-folder of photos per identity (``refs/Ann_Lee/*.jpg``; ``_`` reads as a space).

Prompts: a text file, one prompt per line, ``#`` starts a comment. Lines with ``{name}`` are
identity templates (filled with every identity's name); the others are prompts without a person,
which the prefix must leave unchanged::

    a photo of {name}
    a close-up portrait of {name}, studio light
    a red bicycle leaning on a brick wall
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import APLAdapterError
from ..metrics.faces import list_images


class EvalInputError(APLAdapterError):
    """Bad input to ``apl-eval``; the message names the problem and the fix."""


@dataclass
class Identity:
    """One person to test.

    Attributes:
        name: the name that fills ``{name}`` in the templates.
        references: reference photo files (may still include unreadable ones: they are reported then).
        attributes: anonymous description, e.g. ``"a woman with short black hair"`` (optional).
        problems: what was wrong with this entry while loading it (shown in the report).
    """

    name: str
    references: list[Path]
    attributes: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class PromptSet:
    """Identity templates (with ``{name}``) and prompts without a person."""

    templates: list[str]
    neutral: list[str]


def load_prompts(path: str | os.PathLike) -> PromptSet:
    """Read a prompts file (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"prompts file {path} does not exist. Fix: pass a text file with one prompt per line.")
    templates, neutral = [], []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "{name}" in line:
            try:
                line.format(name="x")
            except (KeyError, IndexError, ValueError) as error:
                raise EvalInputError(
                    f"{path}:{number}: template {line!r} has a placeholder other than {{name}} ({error}). "
                    "Fix: use only {name}; write other braces as {{ and }}."
                ) from error
            templates.append(line)
        else:
            neutral.append(line)
    if not templates and not neutral:
        raise EvalInputError(f"prompts file {path} has no prompts. Fix: one prompt per line; use {{name}} for people.")
    return PromptSet(templates, neutral)


def load_identities(path: str | os.PathLike) -> list[Identity]:
    """Read identities from a JSON file or a folder of per-identity folders (see module docstring).

    Entries whose references are missing or hold no image are kept with a note in
    :attr:`Identity.problems` (and no references): the run reports and skips them.
    """
    path = Path(path)
    if path.is_dir():
        folders = sorted(p for p in path.iterdir() if p.is_dir())
        if not folders:
            raise EvalInputError(
                f"identities folder {path} has no sub-folders. Fix: one sub-folder of photos per identity, "
                "named after the person (e.g. Ann_Lee/), or a JSON identities file."
            )
        entries = [{"name": f.name.replace("_", " "), "references": f.name} for f in folders]  # relative to base
        base = path
    elif path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise EvalInputError(f"identities file {path} is not valid JSON: {error}") from error
        entries = data.get("identities") if isinstance(data, dict) else data
        if not isinstance(entries, list) or not entries:
            raise EvalInputError(
                f"identities file {path} lists no identities. Fix: "
                '{"identities": [{"name": "Ann Lee", "references": "refs/ann_lee"}]}'
            )
        base = path.parent
    else:
        raise EvalInputError(f"identities {path} does not exist. Fix: pass a JSON file or a folder of photo folders.")
    identities, seen = [], set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise EvalInputError(f"identities entry {index} ({entry!r}) needs a non-empty string 'name'")
        name = entry["name"].strip()
        if name in seen:
            raise EvalInputError(f"identity {name!r} is listed twice; merge its references into one entry")
        seen.add(name)
        identities.append(_identity(name, entry.get("references"), entry.get("attributes"), base))
    return identities


def _identity(name: str, references, attributes, base: Path) -> Identity:
    identity = Identity(name=name, references=[], attributes=attributes)
    if references is None:
        identity.problems.append(f"identity {name!r}: no 'references' given; identity skipped")
        return identity
    for item in [references] if isinstance(references, str) else list(references):
        ref = Path(item) if Path(item).is_absolute() else base / item
        if ref.is_dir():
            images = list_images(ref)
            if not images:
                identity.problems.append(f"identity {name!r}: reference folder {ref} holds no image files")
            identity.references.extend(images)
        elif ref.is_file():
            identity.references.append(ref)
        else:
            identity.problems.append(f"identity {name!r}: reference {ref} does not exist")
    if not identity.references:
        identity.problems.append(f"identity {name!r}: no reference photo; identity skipped (add photos of the person)")
    return identity
