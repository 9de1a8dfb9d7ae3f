"""What ``layerskip-serve`` says when ``--model`` is wrong (one line, no traceback, non-zero),
and the warning for a checkpoint that names no exit layer."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from engine.config import EngineConfig
from engine.loop import EngineCore
from models.loader import CheckpointError

HUB_ID = "facebook/layerskip-llama3.2-1B"


def test_a_hub_id_says_download_it_first_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server", "--model", HUB_ID], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines == [f"layerskip-serve: {HUB_ID} is not a local folder: download it first (for "
                     f"example `hf download {HUB_ID} --local-dir DIR`) and pass DIR"], proc.stderr


def test_a_weights_file_instead_of_its_folder_names_the_folder(bundled_model):
    with pytest.raises(CheckpointError, match=r"model.safetensors is a file, not a checkpoint "
                                              r"folder .*pass the folder that holds it, ") as exc:
        EngineCore(EngineConfig(model=f"{bundled_model}/model.safetensors"))
    assert str(exc.value).endswith(bundled_model)


def test_no_assistant_early_exit_warns_of_the_quarter_fallback(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="engine.loop"):
        core = EngineCore(EngineConfig(model=tiny_model, max_num_seqs=1))
    assert core.exit_layer == 1
    (record,) = [r for r in caplog.records if "assistant_early_exit" in r.getMessage()]
    assert "falls back to L/4 = 1 of 4 layers" in record.getMessage()
    assert "--exit-layer" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.loop"):
        EngineCore(EngineConfig(model=tiny_model, max_num_seqs=1, exit_layer=2))
    assert not [r for r in caplog.records if "assistant_early_exit" in r.getMessage()]
