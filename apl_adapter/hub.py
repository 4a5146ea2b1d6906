"""The Hugging Face Hub: what counts as a repo id, and ``apl-train --push-to-hub`` (upload a finished adapter folder).

The adapter is always saved locally first, so an upload that fails (no network, no token, no rights) loses
nothing: the error names the folder and the command that uploads it later. Offline mode is refused before
training starts, not after it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import APLAdapterError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(text: str) -> bool:
    """``owner/name`` as the Hub spells a repo.

    >>> looks_like_repo_id("my-org/apl-sd15"), looks_like_repo_id("runs/apl/adapter"), looks_like_repo_id("adapter")
    (True, False, False)
    """
    return bool(_REPO_ID.match(text))


def check_hub_upload(repo_id: str | None) -> None:
    """Refuse, before any training, an upload that cannot happen: a malformed repo id, or Hub offline mode."""
    if repo_id is None:
        return
    if not looks_like_repo_id(repo_id):
        raise APLAdapterError(f"--push-to-hub wants a Hub repo id such as 'my-org/apl-sd15', got {repo_id!r}.")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise APLAdapterError(
            "--push-to-hub needs the network, but HF_HUB_OFFLINE is set. Unset it, or train without --push-to-hub "
            f"and upload later where the network allows: huggingface-cli upload {repo_id} <out>/adapter ."
        )


def push_adapter(adapter_dir: str | os.PathLike, repo_id: str, steps: int) -> str:
    """Create ``repo_id`` if needed and upload ``adapter_dir`` (weights, config, model card); returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(adapter_dir), commit_message=f"APL adapter ({steps} steps)")
    except Exception as err:  # no network, no token, no rights: all mean "upload it later"
        raise APLAdapterError(
            f"The adapter is saved in {Path(adapter_dir)}, but uploading it to {repo_id} failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'}). Upload it where the network allows: "
            f"huggingface-cli upload {repo_id} {Path(adapter_dir)} ."
        ) from err
    return str(url)
