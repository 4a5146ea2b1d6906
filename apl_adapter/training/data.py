"""APL training data on disk: an image folder plus ``metadata.jsonl``, the same for the world and real models.

Layout::

    my-apl-data/
      metadata.jsonl
      images/000000.png
      images/000001.png
      ...

``metadata.jsonl`` holds one JSON object per line::

    {"file_name": "images/000000.png", "kind": "identity", "c1": "a photo of Ann Lee",
     "c2": "a photo of a woman, short brown hair", "identity": "Ann Lee"}
    {"file_name": "images/000001.png", "kind": "preservation", "c1": "a red cube on a table",
     "c2": "a red cube on a table"}

- ``kind="identity"``: an image of the person (the authors sample it from the base model with the
  name prompt), ``c1`` the prompt naming the person (the prefix is added to it during training),
  ``c2`` the anonymous attribute description the prefixed prompt is pulled toward. ``identity`` is
  the name (used for reports only).
  Optionally ``c2_contrasts``, ``{"<attribute>": ["<c2 with that attribute changed>", ...], ...}``: the
  description with one stated attribute changed at a time, e.g. ``{"hair": ["a photo of a woman, short blond
  hair"]}``; ``apl-train --attribute-hold`` measures each attribute's pull from them (``apl-world data`` writes them).
- ``kind="preservation"``: an image without a person and its caption; ``c1`` and ``c2`` are the
  caption (the prefix must be a no-op here). ``c2`` may be left out and defaults to ``c1``.

``file_name`` is relative to the folder. All images must have one size (or pass ``resolution``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..errors import APLAdapterError

METADATA_NAME = "metadata.jsonl"
KINDS = ("identity", "preservation")
C2Mode = Literal["attribute", "empty"]


class DataFormatError(APLAdapterError):
    """The training data folder does not follow the format in :mod:`apl_adapter.training.data`."""


@dataclass(frozen=True)
class Example:
    """One row of ``metadata.jsonl`` (paths resolved)."""

    image_path: Path
    kind: str
    c1: str
    c2: str
    identity: str | None = None
    #: identity rows: attribute -> the description with that attribute changed (one prompt per other value)
    c2_contrasts: dict[str, tuple[str, ...]] | None = None


def name_and_description(c1: str, c2: str) -> str:
    """The name prompt ``c1`` with the description of ``c2`` stated after the name (the words the two differ in).

    What ``push_from="name_and_description"`` pushes away from: the same template, the same name, and the
    attributes the target keeps, so the push direction carries what the name adds beyond its description.

    >>> name_and_description("a photo of Ann Lee", "a photo of a female person, red hair")
    'a photo of Ann Lee, a female person, red hair'
    >>> name_and_description("Ann Lee, oil painting", "a female person, red hair, oil painting")
    'Ann Lee, a female person, red hair, oil painting'
    """
    words1, words2 = c1.split(), c2.split()
    head = 0
    while head < min(len(words1), len(words2)) and words1[head] == words2[head]:
        head += 1
    tail = 0
    while tail < min(len(words1), len(words2)) - head and words1[-1 - tail] == words2[-1 - tail]:
        tail += 1
    name = " ".join(words1[head : len(words1) - tail]).rstrip(",")
    description = " ".join(words2[head : len(words2) - tail])
    if not name or not description:
        raise DataFormatError(f"c1 {c1!r} and c2 {c2!r} do not differ in a name and a description")
    return " ".join([*words1[:head], f"{name}, {description}", *words1[len(words1) - tail :]])


def read_metadata(folder: str | os.PathLike, c2_mode: C2Mode = "attribute") -> list[Example]:
    """Read and check ``folder/metadata.jsonl``.

    Args:
        folder: the data folder.
        c2_mode: ``"attribute"`` keeps each identity row's ``c2`` (the paper's figure);
            ``"empty"`` replaces it by ``""`` (the authors' released code). Preservation rows keep
            their caption either way.

    Raises:
        DataFormatError: naming the file, line and fix, for a missing folder or metadata file, an
            empty file, bad JSON, a missing field, an unknown ``kind`` or a missing image.
    """
    if c2_mode not in ("attribute", "empty"):
        raise DataFormatError(f"c2 mode must be 'attribute' or 'empty', got {c2_mode!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(
            f"Training data folder {folder} does not exist. Create it with `apl-world data --out {folder}` "
            f"or `apl-train generate-identity-data --out {folder}`."
        )
    metadata = folder / METADATA_NAME
    if not metadata.is_file():
        raise DataFormatError(
            f"{metadata} is missing. A data folder needs a {METADATA_NAME} with one JSON object per image "
            "(see `apl-train --help`, section 'data format')."
        )
    examples = []
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        line_no = metadata.read_bytes()[: err.start].count(b"\n") + 1
        raise DataFormatError(
            f"{metadata}, line {line_no} is not UTF-8 ({err.reason} at byte {err.start}); JSON Lines files are UTF-8: "
            f"re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from err
    for line_no, line in enumerate(lines, start=1):
        if line.strip():
            examples.append(_parse_row(line, line_no, folder, metadata, c2_mode))
    if not examples:
        raise DataFormatError(f"{metadata} is empty: add one JSON line per image (identity and preservation rows).")
    return examples


def _parse_row(line: str, line_no: int, folder: Path, metadata: Path, c2_mode: C2Mode) -> Example:
    where = f"{metadata}, line {line_no}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{where} is not valid JSON ({err.msg}); fix or delete that line.") from err
    if not isinstance(row, dict):
        raise DataFormatError(f"{where} must be a JSON object, got {type(row).__name__}.")
    missing = [key for key in ("file_name", "kind", "c1") if not isinstance(row.get(key), str)]
    if missing:
        raise DataFormatError(f"{where} lacks the text field(s) {missing}; every row needs file_name, kind and c1.")
    kind = row["kind"]
    if kind not in KINDS:
        raise DataFormatError(f"{where}: kind {kind!r} is unknown; use 'identity' or 'preservation'.")
    c2 = row.get("c2", row["c1"] if kind == "preservation" else None)
    if not isinstance(c2, str):
        raise DataFormatError(f"{where}: identity rows need c2, the anonymous attribute description (may be '').")
    if kind == "identity" and c2_mode == "empty":
        c2 = ""
    image_path = folder / row["file_name"]
    if not image_path.resolve().is_relative_to(folder.resolve()):
        raise DataFormatError(
            f"{where}: file_name {row['file_name']!r} points outside the data folder {folder}; a data folder is "
            "self-contained: copy the image into it and give its path relative to the folder."
        )
    if not image_path.is_file():
        raise DataFormatError(f"{where}: image {image_path} does not exist; copy it there or remove the row.")
    return Example(image_path, kind, row["c1"], c2, row.get("identity"), _contrasts(row, kind, where))


def _contrasts(row: dict, kind: str, where: str) -> dict[str, tuple[str, ...]] | None:
    contrasts = row.get("c2_contrasts")
    if contrasts is None:
        return None
    well_formed = isinstance(contrasts, dict) and all(
        isinstance(key, str) and isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)
        for key, texts in contrasts.items()
    )
    if kind != "identity" or not well_formed or not contrasts:
        raise DataFormatError(
            f"{where}: c2_contrasts belongs to identity rows and maps each attribute to a non-empty list of "
            'descriptions with that attribute changed, e.g. {"hair": ["a photo of a woman, red hair"]}.'
        )
    return {key: tuple(texts) for key, texts in contrasts.items()}


def load_images(
    examples: list[Example], resolution: int | None = None, expected_size: int | None = None
) -> torch.Tensor:
    """Load the images as a ``(N, 3, H, W)`` float tensor in ``[-1, 1]`` (the VAE's input range).

    Args:
        resolution: when set, each image is center-cropped to a square and resized to this size.
        expected_size: the model's native image size; without ``resolution`` every image must have it.

    Raises:
        DataFormatError: unreadable image, or sizes that differ from each other / from ``expected_size``.
    """
    arrays = []
    first_size = None
    for example in examples:
        try:
            with Image.open(example.image_path) as img:
                img = img.convert("RGB")
                if resolution is not None:
                    img = _center_square(img).resize((resolution, resolution), Image.BICUBIC)
        except (OSError, Image.DecompressionBombError) as err:
            raise DataFormatError(f"Cannot read image {example.image_path} ({err}); replace or remove it.") from err
        first_size = first_size or img.size
        if img.size != first_size:
            raise DataFormatError(
                f"Image {example.image_path} is {img.size[0]}x{img.size[1]} but earlier images are "
                f"{first_size[0]}x{first_size[1]}; pass --resolution N to resize all images to N x N."
            )
        arrays.append(np.asarray(img, dtype=np.float32))
    if resolution is None and expected_size is not None and first_size != (expected_size, expected_size):
        raise DataFormatError(
            f"Images are {first_size[0]}x{first_size[1]} but the base model makes {expected_size}x{expected_size} "
            f"images; pass --resolution {expected_size} (or another multiple of 8) to resize them."
        )
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch / 127.5 - 1.0


def _center_square(img: Image.Image) -> Image.Image:
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return img.crop((left, top, left + side, top + side))


def write_data_folder(out: str | os.PathLike, rows: list[tuple[Image.Image, dict]]) -> Path:
    """Write ``(image, {"kind", "c1", "c2", "identity"?})`` rows as a data folder (temporary folder, then rename).

    Example:

    ```python
    >>> from PIL import Image
    >>> from apl_adapter.training.data import write_data_folder, read_metadata
    >>> import tempfile
    >>> folder = write_data_folder(tempfile.mkdtemp() + "/apl-data", [
    ...     (Image.new("RGB", (16, 16)), {"kind": "preservation", "c1": "a red cube", "c2": "a red cube"})])
    >>> read_metadata(folder)[0].kind
    'preservation'

    ```
    """
    from ..atomic import atomic_folder

    out = Path(out)
    if out.exists():
        raise DataFormatError(f"{out} already exists; choose a new folder or delete it first.")
    with atomic_folder(out) as staging:
        (staging / "images").mkdir()
        with (staging / METADATA_NAME).open("w", encoding="utf-8") as metadata:
            for index, (image, fields) in enumerate(rows):
                if fields.get("kind") not in KINDS:
                    raise DataFormatError(f"row {index}: kind must be one of {KINDS}, got {fields.get('kind')!r}")
                file_name = f"images/{index:06d}.png"
                image.save(staging / file_name)
                metadata.write(json.dumps({"file_name": file_name, **fields}) + "\n")
    return out
