"""Every shipped config trains (briefly) on a tiny model, not just parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlora.cli import main
from mlora.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "config").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_trains_two_steps(path, tmp_path, tiny_llama):
    cfg = json.loads(path.read_text())
    base_dir = path.parent
    for adapter in cfg["lora"]:
        adapter["max_steps"] = 2
        for key in ("data", "test_data", "prompt"):  # keep the config's relative paths working
            if key in adapter and not Path(adapter[key]).is_absolute() and (base_dir / adapter[key]).exists():
                adapter[key] = str(base_dir / adapter[key])
    short = tmp_path / path.name
    short.write_text(json.dumps(cfg))
    load_config(short)
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(short),
                 "--output_dir", str(tmp_path / "out"), "--no_progress"]) == 0
    for adapter in cfg["lora"]:
        name = adapter["name"]
        assert (tmp_path / "out" / name / "adapter_model.safetensors").is_file()
        assert json.loads((tmp_path / "out" / name / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
@pytest.mark.parametrize("cwd", ["root", "config"])
def test_shipped_config_loads_as_the_readme_runs_it(path, cwd, monkeypatch):
    """The README runs them as they are, from the repository's root (`--config config/example.json`)
    and from config/ (`cd config && ... --config example.json`): their relative paths resolve
    from both, to the files beside them."""
    monkeypatch.chdir(path.parent.parent if cwd == "root" else path.parent)
    cfg = load_config(path.relative_to(Path.cwd()))
    for adapter in cfg.lora:
        for file in (adapter.data, adapter.test_data, adapter.prompt):
            if file is not None and file != "alpaca":
                assert Path(file).is_file() and Path(file).is_relative_to(path.parent), file
