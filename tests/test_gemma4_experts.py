"""LoRA on Gemma 4 26B-A4B's routed experts (`experts.gate_up_proj`, `experts.down_proj`), which
run beside each layer's dense MLP (whose gate_proj, up_proj and down_proj keep those names).

Checked against PEFT on transformers' Gemma4ForCausalLM (and the image-text model), where the
experts are stacked parameters and their LoRA is PEFT's target_parameters (stacked_lora.py): the
logits and every A and B's gradient; a fused batch of an adapter on the experts and one without
against each alone; an adapter trained by `mlora train` loading in PEFT with mlora's logits.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import mlora.models.moe
from conftest import GEMMA4_MOE, make_tiny_model
from mlora.lora import AdapterRows
from test_gpt_oss import _peft_grads, peft_made_adapter
from test_moe import B, _inputs, _mlora_with_adapters, assert_grads_equal, backward_against_peft

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE = ["gate_proj", "up_proj", "down_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.mark.parametrize("family, targets, rslora, grouped", [
    ("gemma4_text", [*ATTN, *DENSE, *EXPERTS], False, True),
    ("gemma4_text", [*ATTN, *DENSE, *EXPERTS], False, False),
    ("gemma4_text", ["q_proj", "experts.gate_up_proj"], True, True),
    ("gemma4_text", ["down_proj", "experts.down_proj"], False, True),
    ("gemma4_text", EXPERTS, False, True),
    ("gemma4", ["q_proj", "v_proj", "down_proj", *EXPERTS], False, True),
], ids=["all", "all_one_expert_at_a_time", "gate_up_rslora", "down_only", "experts_only", "image_text"])
def test_expert_lora_equals_peft(tmp_path, monkeypatch, family, targets, rslora, grouped):
    """mlora's adapter, saved with the experts' LoRA stacked (target_parameters), loads in PEFT
    with mlora's logits, and every A and B gets PEFT's gradient (fp32); the experts' LoRA is one
    per expert's whole gate_up_proj; loading the directory back gives the same weights. The
    experts run as grouped GEMMs (lora_moe.GroupedExpertLoRA), or one at a time (LoraLinear)."""
    monkeypatch.setattr(mlora.models.moe, "GROUPED_EXPERTS", grouped)
    base = make_tiny_model(tmp_path / "base", family, **GEMMA4_MOE)
    r = 4
    model, layout, adapters = _mlora_with_adapters(base, {"x": (r, targets)}, use_rslora=rslora)
    adapter = adapters["x"]
    assert not any(re.search(r"experts\.\d+\.(gate|up)_proj$", path) for path in adapter.weights)
    assert any(".experts." in path for path in adapter.weights) and all(
        ".experts." in path for path in adapter.weights if ".mlp." not in path and ".self_attn." not in path)
    adapter.save(tmp_path / "x", str(base))
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    stacked = [p for p in ("gate_up_proj", "down_proj") if f"experts.{p}" in targets]
    assert config["target_parameters"] == [f"experts.{p}" for p in stacked]
    plain = [t for t in targets if t not in EXPERTS]
    assert (config["target_modules"] == plain if family == "gemma4_text"
            else "language_model" in config["target_modules"])
    peft_model = backward_against_peft(model, layout, base, tmp_path / "x")
    expected = _peft_grads(peft_model, model.args.num_experts, r, stacked, experts="experts")
    # (Gemma 4's fp32 sums in another order reach 3e-5 of a gradient's scale with LoRA on its
    # attention and dense MLP alone, its experts untouched)
    assert_grads_equal(adapter, expected, rtol=1e-4)

    _, _, fresh = _mlora_with_adapters(base, {"x": (r, targets)}, use_rslora=rslora)
    fresh["x"].load_peft(tmp_path / "x")
    for path, w in adapter.weights.items():
        assert torch.equal(fresh["x"].weights[path].lora_A, w.lora_A.detach()), path
        assert torch.equal(fresh["x"].weights[path].lora_B, w.lora_B.detach()), path


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "one_at_a_time"])
def test_fused_batch_of_an_adapter_on_the_experts_and_one_without(tmp_path, monkeypatch, grouped):
    """One batch of an adapter on the experts and the dense MLP ('e') and one on the attention
    only ('a'), a row of no adapter between them: each adapter's logits and gradients equal its
    solo run's, the experts grouped or one at a time (each with its own rows of the routed tokens)."""
    monkeypatch.setattr(mlora.models.moe, "GROUPED_EXPERTS", grouped)
    base = make_tiny_model(tmp_path / "base", "gemma4_text", **GEMMA4_MOE)
    specs = {"e": (4, [*ATTN, *DENSE, *EXPERTS]), "a": (2, ["q_proj", "v_proj"])}
    rows = {"a": (2, 4), "e": (0, 1)}  # (row 1: no adapter)
    ids, mask, probe = _inputs(1)
    probe = probe[..., :400]

    def run(names):
        model, layout, adapters = _mlora_with_adapters(base, specs)
        picked = torch.arange(B) if len(names) > 1 else torch.arange(*rows[names[0]])
        layout.rows = ([AdapterRows(n, *rows[n]) for n in names] if len(names) > 1
                       else [AdapterRows(names[0], 0, len(picked))])
        logits = model(ids[picked], mask[picked])
        (logits * probe[picked] * mask[picked][..., None]).sum().backward()
        # (an expert that got none of an adapter's tokens has no gradient: zeros)
        return logits, {n: {p: torch.cat([(torch.zeros_like(t) if t.grad is None else t.grad).flatten()
                                          for t in (w.lora_A, w.lora_B)]) for p, w in adapters[n].weights.items()}
                        for n in names}

    fused_logits, fused_grads = run(list(rows))
    assert sum(".experts." in p and g.abs().max() > 0 for p, g in fused_grads["e"].items()) >= 8
    for n, (lo, hi) in rows.items():
        solo_logits, solo_grads = run([n])
        assert (fused_logits[lo:hi] - solo_logits).abs()[mask[lo:hi].bool()].max() < 1e-5, n
        for path, g in solo_grads[n].items():
            # (Gemma 4's many norms round another batch shape up to ~1e-5 of the scale: test_moe.py)
            assert (fused_grads[n][path] - g).abs().max() <= 3e-5 * g.abs().max(), (n, path)


def test_an_adapter_peft_wrote_loads_in_mlora(tmp_path):
    """An adapter PEFT made on transformers' Gemma4ForCausalLM (target_parameters listed in the
    other order, beside the dense MLP's down_proj) loads into mlora (init_from, eval) with
    PEFT's logits."""
    assert_peft_made_adapter_loads(tmp_path, make_tiny_model(tmp_path / "base", "gemma4_text", **GEMMA4_MOE), _inputs())


def assert_peft_made_adapter_loads(tmp_path, base, inputs) -> None:
    """An adapter PEFT makes on transformers' model of `base` (LoRA on q_proj and down_proj, and
    target_parameters experts.down_proj, experts.gate_up_proj, in that order) loads into mlora
    with PEFT's logits on inputs (ids, mask, _), and its experts' LoRA alone moves them."""
    peft_model = peft_made_adapter(base, ["q_proj", "down_proj"], ["experts.down_proj", "experts.gate_up_proj"],
                                   tmp_path / "x")
    model, layout, adapters = _mlora_with_adapters(base, {"x": (4, ["q_proj", "down_proj", *EXPERTS])})
    adapters["x"].load_peft(tmp_path / "x")
    ids, mask, _ = inputs
    layout.rows = [AdapterRows("x", 0, B)]
    model.eval()
    with torch.no_grad():
        ours = model(ids, mask)
        diff = (ours - peft_model.eval()(input_ids=ids, attention_mask=mask).logits).abs()[mask.bool()]
        with peft_model.disable_adapter():
            bare = peft_model(input_ids=ids, attention_mask=mask).logits
        for name, p in peft_model.named_parameters():  # (the other modules' LoRA taken off)
            if "lora_B" in name and ".experts." not in name:
                p.zero_()
        experts_only = peft_model(input_ids=ids, attention_mask=mask).logits
    assert diff.max() < 1e-4 and (experts_only - bare).abs()[mask.bool()].max() > 1e-3


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "one_at_a_time"])
def test_recompute_equals_plain_with_lora_on_the_experts(tmp_path, monkeypatch, grouped):
    """Under activation checkpointing the layer's routing hook runs again in the recomputation:
    the experts' LoRA gets the gradients of a plain run."""
    monkeypatch.setattr(mlora.models.moe, "GROUPED_EXPERTS", grouped)
    base = make_tiny_model(tmp_path / "base", "gemma4_text", **GEMMA4_MOE)
    specs = {"e": (4, ["q_proj", "down_proj", *EXPERTS]), "a": (2, ["q_proj", "v_proj"])}
    ids, mask, probe = _inputs(1)

    def grads(recompute):
        model, layout, adapters = _mlora_with_adapters(base, specs)
        model.recompute = recompute
        layout.rows = [AdapterRows("a", 2, 4), AdapterRows("e", 0, 2)]
        (model(ids, mask) * probe[..., :400] * mask[..., None]).sum().backward()
        return {p: (w.lora_A.grad, w.lora_B.grad) for p, w in adapters["e"].weights.items()}

    plain, again = grads(False), grads(True)
    assert any(".experts." in p and g[0] is not None for p, g in plain.items())
    for path, (a, b) in plain.items():
        assert (a is None) == (again[path][0] is None), path
        if a is not None:
            assert torch.allclose(a, again[path][0], atol=1e-6) and torch.allclose(b, again[path][1], atol=1e-6), path
