"""The README's quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written(tmp_path, monkeypatch):
    text = README.read_text()
    match = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its quickstart block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(match.group(1), "README quickstart", "exec"), namespace)
    assert (tmp_path / "apl-prefix" / "adapter_model.safetensors").is_file()
    assert namespace["image"].size == (16, 16)
    assert "encode_prompt" not in namespace["pipe"].__dict__  # remove_apl restored the pipeline
