"""LoRA on Llama 4's routed experts (`experts.gate_up_proj`, `experts.down_proj`), in its sparse
layers, whose shared expert and the dense layers' MLPs keep gate_proj, up_proj and down_proj.

Checked against PEFT on transformers' Llama4ForCausalLM, where the experts are stacked
parameters [E, in, out] and their LoRA is PEFT's target_parameters with A and B traded
(stacked_lora.SWAPPED), and where the router's weights scale each expert's input before the
LoRA: the logits and every A and B's gradient; an adapter PEFT made loading into mlora. The
fused batch under every kernel is test_moe.py's, the CLI-trained adapter in PEFT test_train.py's
(text and image-text), the memory model test_memory.py's.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import mlora.models.moe
from conftest import make_tiny_model
from mlora.config import AdapterConfig, TrainConfig
from mlora.errors import UserError
from mlora.models.llama import args_from_hf_config
from mlora.models.naming import naming_for
from mlora.session import note_partial_targets, resolve_targets
from test_gemma4_experts import assert_peft_made_adapter_loads
from test_gpt_oss import _peft_grads
from test_moe import _inputs, _mlora_with_adapters, assert_grads_equal, backward_against_peft

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]  # (the shared expert's and the dense layers' MLPs')
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _unpadded_left():
    """test_moe's inputs without the left-padded row: transformers counts a row's attention
    chunks from column 0, mlora from its first real token, as transformers' generate does."""
    ids, mask, probe = _inputs()
    mask[2] = 1
    return ids, mask, probe


@pytest.mark.parametrize("targets, rslora, grouped", [
    ([*ATTN, *MLP, *EXPERTS], False, True),
    ([*ATTN, *MLP, *EXPERTS], False, False),
    (["q_proj", "experts.gate_up_proj"], True, True),
    (["down_proj", "experts.down_proj"], False, True),
    (EXPERTS, False, True),
], ids=["all", "all_one_expert_at_a_time", "gate_up_rslora", "down_only", "experts_only"])
def test_expert_lora_equals_peft(tmp_path, monkeypatch, targets, rslora, grouped):
    """mlora's adapter, saved with the experts' LoRA stacked (target_parameters
    feed_forward.experts.*), loads in PEFT with mlora's logits, and every A and B gets PEFT's
    gradient (fp32); the experts' LoRA is one per expert's whole gate_up_proj, in the sparse
    layers only; loading the directory back gives the same weights. The experts run as grouped
    GEMMs (lora_moe.GroupedExpertLoRA), or one at a time (LoraLinear)."""
    monkeypatch.setattr(mlora.models.moe, "GROUPED_EXPERTS", grouped)
    base = make_tiny_model(tmp_path / "base", "llama4_text")
    r = 4
    model, layout, adapters = _mlora_with_adapters(base, {"x": (r, targets)}, use_rslora=rslora)
    adapter = adapters["x"]
    on_experts = {path for path in adapter.weights if ".experts." in path}
    stacked = [p for p in ("gate_up_proj", "down_proj") if f"experts.{p}" in targets]
    # (layers 1 and 3 are sparse, 0 and 2 dense)
    assert {re.sub(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.", "", p) for p in on_experts} == set(stacked)
    assert {int(re.search(r"layers\.(\d+)", p)[1]) for p in on_experts} == {1, 3}
    assert len(on_experts) == 2 * 4 * len(stacked)
    adapter.save(tmp_path / "x", str(base))
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"feed_forward.experts.{p}" for p in stacked]
    assert config["target_modules"] == [t for t in targets if t not in EXPERTS]
    peft_model = backward_against_peft(model, layout, base, tmp_path / "x", _unpadded_left())
    expected = _peft_grads(peft_model, model.args.num_experts, r, stacked, naming=naming_for("llama4_text"),
                           swapped=True)
    assert_grads_equal(adapter, expected)

    _, _, fresh = _mlora_with_adapters(base, {"x": (r, targets)}, use_rslora=rslora)
    fresh["x"].load_peft(tmp_path / "x")
    for path, w in adapter.weights.items():
        assert torch.equal(fresh["x"].weights[path].lora_A, w.lora_A.detach()), path
        assert torch.equal(fresh["x"].weights[path].lora_B, w.lora_B.detach()), path


def test_an_adapter_peft_wrote_loads_in_mlora(tmp_path):
    """An adapter PEFT made on transformers' Llama4ForCausalLM (target_parameters listed in the
    other order and without feed_forward, beside the shared expert's and dense MLPs' down_proj)
    loads into mlora with PEFT's logits."""
    assert_peft_made_adapter_loads(tmp_path, make_tiny_model(tmp_path / "base", "llama4_text"), _unpadded_left())


def test_expert_targets_refuse_dropout_and_note_the_dense_layers(tmp_path, capsys):
    """Dropout on the experts is refused in one line (PEFT's ParamWrapper cannot apply it), as on
    Gemma 4 26B-A4B, and gate_up_proj is no Llama 4 target (one line naming the experts'); an
    adapter on the experts alone is told it reaches the sparse layers only."""
    base = make_tiny_model(tmp_path / "base", "llama4_text")
    args = args_from_hf_config(json.loads((base / "config.json").read_text()))
    with pytest.raises(UserError, match=r"^adapter 'x': dropout must be 0 when target_modules include "
                                        r"experts.gate_up_proj on this llama4_text model \(PEFT cannot load "
                                        r"dropout on experts\)$"):
        resolve_targets(TrainConfig(lora=[AdapterConfig(name="x", data="", dropout=0.1,
                                                        target_modules=["q_proj", "experts.gate_up_proj"])]), args)
    with pytest.raises(UserError, match=r"^adapter 'x': target_modules gate_up_proj not in this llama4_text model "
                                        r"\(its projections: .*\); gate_proj, up_proj, down_proj are its dense MLPs' "
                                        r"and shared expert's, experts.gate_up_proj, experts.down_proj its experts'$"):
        resolve_targets(TrainConfig(lora=[AdapterConfig(name="x", data="", target_modules=["gate_up_proj"])]), args)
    cfg = resolve_targets(TrainConfig(lora=[AdapterConfig(name="x", data="", dropout=0.0, target_modules=EXPERTS),
                                            AdapterConfig(name="y", data="", target_modules=["q_proj", "gate_proj"])]),
                          args)
    assert cfg.lora[0].target_modules == EXPERTS
    capsys.readouterr()
    note_partial_targets(cfg, args)
    assert capsys.readouterr().err == (
        "mlora: note: adapter 'x': its target_modules are in 2 of this llama4_text model's 4 layers only; LoRA goes "
        "there (the other layers' LoRA targets: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)\n")
