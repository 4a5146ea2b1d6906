import json
import subprocess
import sys

from peft import get_peft_model

from apl_adapter import APLConfig
from apl_adapter.testing import tiny_clip_text_model


def _run(*args):
    return subprocess.run([sys.executable, "-m", "apl_adapter.cli", *args], capture_output=True, text=True)


def test_inspect_prints_the_prefix(tmp_path):
    get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=4)).save_pretrained(tmp_path / "a")
    result = _run("inspect", str(tmp_path / "a"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["peft_type"] == "APL" and info["num_virtual_tokens"] == 4 and info["token_dim"] == 32
    (tensor,) = info["tensors"].values()
    assert tensor["shape"] == [4, 32] and len(tensor["row_norms"]) == 4


def test_inspect_bad_folder_exits_non_zero_with_the_reason(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_model.bin").write_bytes(b"pickle")
    result = _run("inspect", str(tmp_path / "b"))
    assert result.returncode == 2
    assert "safetensors only" in result.stderr and "Traceback" not in result.stderr
