"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4.5, DeepSeek-V2/V3, Qwen3.5-MoE, and
GPT-OSS, whose own checks are in test_gpt_oss.py): LoRA on the routed experts, DeepSeek-V3's
latent attention and FP8 checkpoints.

The logits of the frozen models are checked with the other families in test_model.py; here:
the experts' LoRA gradients against PEFT's on transformers' own model (which stacks each
layer's experts into 3D parameters and loads mlora's per-expert adapter by converting it), a
fused batch of several adapters against each adapter alone under every LoRA kernel, checkpoints
that stack the experts as transformers 5 holds them, and what the configuration refuses.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import replace

import pytest
import torch

import mlora.lora
import mlora.models.moe
from conftest import GEMMA4_MOE, make_tiny_model
from mlora.adapter import Adapter
from mlora.config import AdapterConfig, TrainConfig
from mlora.errors import UserError
from mlora.loader import load_model
from mlora.lora import AdapterRows, BatchLayout, inject_lora
from mlora.models import llama
from mlora.models.naming import GATE_UP_STACKED, naming_for
from mlora.session import resolve_targets

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# DeepSeek-V3's latent attention's projections, and the MLP's
MLA_ALL = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Qwen3.5's: its softmax and linear attention's projections, the MLP's
QWEN3_5_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
               "out_proj", "gate_proj", "up_proj", "down_proj"]
# Qwen3-Next's: the same with the linear attention's two fused input projections
QWEN3_NEXT_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj", "gate_proj",
                  "up_proj", "down_proj"]
B, S = 4, 10


def _mlora_with_adapters(base, specs, use_rslora=False):
    """The model of `base` (a checkpoint's directory, or a model: a copy of it) with adapters
    {name: (r, targets)}, every B and A drawn at random (B starts at zero otherwise, and its
    gradient alone would be checked)."""
    model = copy.deepcopy(base) if isinstance(base, torch.nn.Module) else load_model(base, "cpu", torch.float32)
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    adapters = {}
    for i, (name, (r, targets)) in enumerate(specs.items()):
        cfg = AdapterConfig(name=name, data="", r=r, alpha=2.0 * r, dropout=0.0, target_modules=targets,
                            use_rslora=use_rslora)
        adapters[name] = Adapter(cfg, wrappers, i, torch.device("cpu"), naming=naming_for(model.args.model_type))
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for w in adapters[name].weights.values():
                w.lora_A.copy_(torch.randn(w.lora_A.shape, generator=gen) * 0.2)
                w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=gen) * 0.2)
    model.train()
    return model, layout, adapters


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    probe = torch.randn(B, S, 400, generator=gen)  # loss = sum(logits * probe) over real tokens
    return ids, mask, probe


def _expert_grads_from_peft(name: str, grad: torch.Tensor, E: int, r: int, H: int) -> dict[str, torch.Tensor]:
    """PEFT's gradient of one stacked-experts LoRA weight, per expert and projection, in mlora's
    shapes. PEFT's layout (peft.utils.transformers_weight_conversion): gate_up_proj's A is
    [E * 2r, H], each expert's gate rows then up rows; its B is [2I, 2r * E] (column k * E + e),
    block-diagonal (gate: first I rows and r columns); down_proj's A [E * r, I], B [H, r * E]."""
    kind = name.split(".")[-3]  # lora_A / lora_B
    out = {}
    if kind == "lora_A" and grad.shape[1] == H:  # gate_up_proj
        g = grad.view(E, 2 * r, H)
        for e in range(E):
            out[f"{e}.gate_proj.lora_A"], out[f"{e}.up_proj.lora_A"] = g[e, :r], g[e, r:]
    elif kind == "lora_A":  # down_proj
        g = grad.view(E, r, -1)
        for e in range(E):
            out[f"{e}.down_proj.lora_A"] = g[e]
    elif grad.shape[0] == H:  # down_proj's B
        g = grad.view(H, r, E)
        for e in range(E):
            out[f"{e}.down_proj.lora_B"] = g[:, :, e]
    else:  # gate_up_proj's B
        I2 = grad.shape[0]
        g = grad.view(I2, 2 * r, E)
        for e in range(E):
            out[f"{e}.gate_proj.lora_B"] = g[:I2 // 2, :r, e]
            out[f"{e}.up_proj.lora_B"] = g[I2 // 2:, r:, e]
    return out


def backward_against_peft(model, layout, base, adapter_dir, inputs=None):
    """Run mlora's model (its adapter 'x' on every row) and PEFT's with the adapter saved in
    `adapter_dir` on the same inputs (ids, mask, probe; by default _inputs()), check their
    logits are equal and back-propagate the same probe through both; returns PEFT's model,
    whose LoRA weights hold its gradients."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids, mask, probe = inputs or _inputs()
    probe = probe[..., :model.args.vocab_size]  # (a model of a smaller vocabulary than the probe's)
    layout.rows = [AdapterRows("x", 0, B)]
    ours = model(ids, mask)
    (ours * probe * mask[..., None]).sum().backward()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           adapter_dir, is_trainable=True)
    ref = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (ours - ref).abs()[mask.bool()].max().item() < 1e-4
    (ref * probe * mask[..., None]).sum().backward()
    return peft_model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "glm4_moe", "deepseek_v2", "deepseek_v3"])
def test_expert_lora_gradients_equal_peft(tmp_path, family):
    """mlora's LoRA on every projection, experts included, gives PEFT's logits and PEFT's
    gradients (on transformers' stacked experts) for every A and B."""
    base = make_tiny_model(tmp_path / family, family)
    r = 4
    model, layout, adapters = _mlora_with_adapters(base, {"x": (r, MLA_ALL if family.startswith("deepseek")
                                                                else ALL7)})
    adapter = adapters["x"]
    adapter.save(tmp_path / "x", str(base))
    peft_model = backward_against_peft(model, layout, base, tmp_path / "x")

    args = model.args
    E, H = args.num_experts, args.hidden_size
    expected = {}  # mlora module path + '.lora_A' / '.lora_B' -> PEFT's gradient
    experts_seen = 0
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        layer = re.search(r"layers\.(\d+)\.", name)[1]
        if ".experts." in name:
            experts_seen += 1
            for key, g in _expert_grads_from_peft(name, p.grad, E, r, H).items():
                expert, proj, kind = key.split(".")
                expected[f"model.layers.{layer}.mlp.experts.{expert}.{proj}.{kind}"] = g
        else:
            module = re.search(r"(self_attn\.\w+)\.(lora_[AB])\.", name)
            expected[f"model.layers.{layer}.{module[1]}.{module[2]}"] = p.grad
    assert experts_seen == 4 * sum(args.moe_layers)  # PEFT did put LoRA on the experts: A and B, two per sparse layer
    assert_grads_equal(adapter, expected)


def assert_grads_equal(adapter, expected: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    """Every LoRA weight of `adapter` has a gradient equal to expected['<module path>.lora_A' /
    '.lora_B'] (fp32 sums in another order: within rtol of the gradient's scale, up to ~100 here),
    nonzero but for a few experts' (one that got only pad tokens has a zero gradient, one that got
    none no gradient)."""
    got = {f"{path}.{kind}": getattr(w, kind).grad for path, w in adapter.weights.items()
           for kind in ("lora_A", "lora_B")}
    assert got.keys() == expected.keys()
    for key, g in got.items():
        if g is None and ".experts." in key:  # an expert that got no token: PEFT's stacked one gets zeros
            g = got[key] = torch.zeros_like(expected[key])
        assert g is not None and (g.abs().max() > 0 or ".experts." in key), key
        assert (g - expected[key]).abs().max() <= rtol * expected[key].abs().max(), key
    experts = [g.abs().max() > 0 for key, g in got.items() if ".experts." in key]
    assert sum(experts) >= 0.75 * len(experts)


# GPT-OSS: experts with biases, a fused gate_up_proj of interleaved columns and a clamped GLU
@pytest.mark.parametrize("family, kernel", [*(("mixtral", k) for k in ("auto", "fused", "dense", "loop", "grouped",
                                                                       "triton")),
                                            *(("gpt_oss", k) for k in ("auto", "fused", "dense", "loop", "grouped",
                                                                       "triton")),
                                            *((family, k) for family in ("glm4_moe", "deepseek_v3", "qwen3_5_moe_text",
                                                                         "qwen3_next")
                                              for k in ("auto", "fused", "dense", "loop", "grouped", "triton")),
                                            # (DeepSeek-V2 differs from V3 by its router only; Mistral Small 4
                                            # by its router and query scale)
                                            *(("deepseek_v2", k) for k in ("auto", "grouped")),
                                            ("mistral4", "auto"),
                                            # (Gemma 4 26B-A4B: LoRA on the experts and on the dense MLP
                                            # beside them)
                                            *(("gemma4_moe", k) for k in ("auto", "grouped", "loop")),
                                            # (Llama 4: the router's weights on the experts' input, NoPE
                                            # layers' query scale, chunks; LoRA on the experts, the shared
                                            # expert and the dense MLPs)
                                            *(("llama4_text", k) for k in ("auto", "grouped", "loop"))])
def test_fused_batch_equals_each_adapter_alone(tmp_path, monkeypatch, family, kernel):
    """Three adapters in one batch (two on the experts with different ranks, one on attention
    only), a row of no adapter between them and the layout's rows out of order: each adapter's
    logits and gradients equal its solo run's, whatever the tokens of each adapter the router
    sends to each expert."""
    from mlora import lora_triton

    if kernel == "triton" and lora_triton.unavailable(torch.device("cpu")):
        pytest.skip(lora_triton.unavailable(torch.device("cpu")))
    monkeypatch.setattr(mlora.lora, "kernel", kernel)
    base = (make_tiny_model(tmp_path / family, "gemma4_text", **GEMMA4_MOE) if family == "gemma4_moe"
            else make_tiny_model(tmp_path / family, family))
    every = {"gpt_oss": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
             "deepseek_v2": MLA_ALL, "deepseek_v3": MLA_ALL, "mistral4": MLA_ALL, "qwen3_5_moe_text": QWEN3_5_ALL,
             "qwen3_next": QWEN3_NEXT_ALL, "gemma4_moe": [*ALL7, "experts.gate_up_proj", "experts.down_proj"],
             "llama4_text": [*ALL7, "experts.gate_up_proj", "experts.down_proj"]}.get(family, ALL7)
    attention = (["q_b_proj", "kv_b_proj"] if family.startswith("deepseek") or family == "mistral4"
                 else ["in_proj_qkv", "in_proj_b", "out_proj"] if family.startswith("qwen3_5")
                 else ["in_proj_qkvz", "in_proj_ba", "out_proj"] if family == "qwen3_next" else ["q_proj", "v_proj"])
    specs = {"e1": (4, every), "a": (2, attention), "e2": (8 if kernel != "grouped" else 4, every)}
    rows = {"e2": (3, 4), "a": (2, 3), "e1": (0, 1)}  # (row 1: no adapter)
    ids, mask, probe = _inputs(1)

    def run(names):
        model, layout, adapters = _mlora_with_adapters(base, specs)
        if len(names) > 1:  # the whole batch, rows as placed
            picked = torch.arange(B)
            layout.rows = [AdapterRows(n, *rows[n]) for n in names]
        else:
            picked = torch.arange(*rows[names[0]])
            layout.rows = [AdapterRows(names[0], 0, len(picked))]
        logits = model(ids[picked], mask[picked])
        (logits * probe[picked] * mask[picked][..., None]).sum().backward()
        # (an expert that got none of an adapter's tokens has no gradient: zeros)
        grads = {n: {p: torch.cat([(torch.zeros_like(t) if t.grad is None else t.grad).flatten()
                                   for t in (w.lora_A, w.lora_B)])
                     for p, w in adapters[n].weights.items()} for n in names}
        for moe in (m for layer in model.model.layers.values() for m in (layer.mlp, layer)  # (Gemma 4's: the layer's)
                    if getattr(m, "routing_hook", None) is not None):
            # an expert's LoRA keeps no plan
            assert all(w.group._plan is None and w.group._casts is None for w in moe.routing_hook.wrappers)
        return logits, grads

    fused_logits, fused_grads = run(list(rows))
    real = mask.bool()
    for n, (lo, hi) in rows.items():
        solo_logits, solo_grads = run([n])
        diff = (fused_logits[lo:hi] - solo_logits).abs()[real[lo:hi]].max().item()
        # (Qwen3-Next's gated delta rule amplifies fp32 rounding: 1.2e-5 seen with its experts
        # grouped, whose GEMMs round another batch shape differently than one expert at a time)
        assert diff < (2e-5 if family == "qwen3_next" else 1e-5), (n, diff)
        for path, g in solo_grads[n].items():
            # (Qwen3.5's chunked delta rule - exponentials of cumulative decays, triangular
            # solves - rounds another batch shape up to a few times more in fp32: 1.1e-5 seen)
            # (Gemma 4's many norms do too: its dense model's gradients here 0.9e-5 apart, with the experts 1.05e-5;
            # Llama 4's weightless q/k norms: 1.4e-5 seen, 1e-12 in fp64)
            tol = (5e-5 if family.startswith(("qwen3_5", "qwen3_next", "llama4"))
                   else 3e-5 if family == "gemma4_moe" else 1e-5)
            assert (fused_grads[n][path] - g).abs().max() <= tol * g.abs().max(), (n, path)
    for n in ("e1", "e2"):  # the experts' LoRA took part (B and A both nonzero, so gradients flow)
        if family in ("gemma4_moe", "llama4_text"):  # (their experts.* target the experts, gate_proj ... the dense
            # MLPs: Gemma 4's beside them, Llama 4's and its shared expert)
            assert any(".mlp.down_proj" in path and g.abs().max() > 0 for path, g in fused_grads[n].items())
            assert not any(re.search(r"experts\.\d+\.(gate|up)_proj", path) for path in fused_grads[n])
        if family == "llama4_text":
            assert any(".shared_expert." in path and g.abs().max() > 0 for path, g in fused_grads[n].items())
        assert any(".experts." in path and g.abs().max() > 0 for path, g in fused_grads[n].items())


def _cfg(**adapter):
    return TrainConfig(lora=[AdapterConfig(name="x", data="", **adapter)])


def test_targets_on_moe_models():
    """Expert targets that PEFT could not load are refused with one line naming the adapter;
    the MLP targets of an MoE model are its routed experts."""
    base = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    mixtral = llama.args_from_hf_config(dict(base, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2))
    assert mixtral.is_moe and mixtral.moe_intermediate_size == 96 and mixtral.norm_topk_prob
    # (resolve_targets turns m-LoRA's and Mixtral's w1, w3, w2 into these names)
    ok = resolve_targets(_cfg(dropout=0.0, target_modules=["up_proj", "gate_proj", "down_proj", "q_proj"]), mixtral)
    assert ok.lora[0].target_modules == ["q_proj", "gate_proj", "up_proj", "down_proj"]
    resolve_targets(_cfg(dropout=0.1, target_modules=["q_proj", "v_proj"]), mixtral)  # attention: dropout is fine
    with pytest.raises(UserError, match=r"adapter 'x': on this mixtral model target w1 \(gate_proj\) and w3"):
        resolve_targets(_cfg(dropout=0.0, target_modules=["gate_proj", "down_proj"]), mixtral)
    with pytest.raises(UserError, match="adapter 'x': dropout must be 0 when target_modules include the experts'"):
        resolve_targets(_cfg(dropout=0.05, target_modules=["down_proj"]), mixtral)
    with pytest.raises(UserError, match="use_rslora does not go with the experts' w1"):
        resolve_targets(_cfg(dropout=0.0, use_rslora=True, target_modules=["gate_proj", "up_proj"]), mixtral)
    resolve_targets(_cfg(dropout=0.0, use_rslora=True, target_modules=["down_proj"]), mixtral)  # PEFT loads it as is
    # m-LoRA's names, as the user wrote them (not gate_proj)
    with pytest.raises(UserError, match=r"mixtral model target w1_proj and w3 \(up_proj\) together or neither"):
        resolve_targets(_cfg(dropout=0.0, target_modules=["q_proj", "w1_proj"]), mixtral)
    with pytest.raises(UserError, match="include the experts' w1_proj, w3, w2_proj on this mixtral model"):
        resolve_targets(_cfg(dropout=0.05, target_modules=["w1_proj", "w3", "w2_proj"]), mixtral)
    ok = resolve_targets(_cfg(dropout=0.0, target_modules=["w1_proj", "w3", "w2_proj"]), mixtral)
    assert ok.lora[0].target_modules == ["gate_proj", "up_proj", "down_proj"]
    qwen2 = llama.args_from_hf_config(dict(base, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                           mlp_only_layers=[1]))
    assert qwen2.moe_layers == [True, False] and not qwen2.norm_topk_prob and qwen2.attention_bias
    with pytest.raises(UserError, match="qwen2_moe model target the attention projections only"):
        resolve_targets(_cfg(dropout=0.0, target_modules=["up_proj", "gate_proj"]), qwen2)
    with pytest.raises(UserError, match=r"attention projections only \(not w1_proj\)"):
        resolve_targets(_cfg(dropout=0.0, target_modules=["q_proj", "w1_proj"]), qwen2)
    resolve_targets(_cfg(dropout=0.1, target_modules=["q_proj", "o_proj"]), qwen2)
    # Qwen3-Next: transformers converts its experts as Qwen2-MoE's, which PEFT does not load LoRA on
    qwen3_next = llama.args_from_hf_config(dict(base, model_type="qwen3_next", num_hidden_layers=4, num_experts=4,
                                                num_experts_per_tok=2,
                                                linear_num_key_heads=2, linear_num_value_heads=4,
                                                linear_key_head_dim=16, linear_value_head_dim=16))
    with pytest.raises(UserError, match="qwen3_next model target the attention projections only"):
        resolve_targets(_cfg(dropout=0.0, target_modules=["in_proj_qkvz", "down_proj"]), qwen3_next)
    ok = resolve_targets(_cfg(dropout=0.1, target_modules=["out_proj", "in_proj_ba", "in_proj_qkvz", "q_proj"]),
                         qwen3_next)
    assert ok.lora[0].target_modules == ["q_proj", "in_proj_qkvz", "in_proj_ba", "out_proj"]
    # Mistral Small 4: transformers has no conversion of per-expert tensors for it, nor PEFT of LoRAs
    mistral4 = llama.args_from_hf_config(dict(base, model_type="mistral4", num_key_value_heads=4, n_routed_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=32, kv_lora_rank=16,
                                              q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))
    with pytest.raises(UserError, match="mistral4 model target the attention projections only"):
        resolve_targets(_cfg(dropout=0.0, target_modules=["q_proj", "down_proj"]), mistral4)
    resolve_targets(_cfg(dropout=0.1, target_modules=["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
                    mistral4)
    # Llama 4: its experts are stacked parameters, which PEFT's target_modules do not reach
    # (but its dense MLPs and shared expert are: the MLP targets are those, any subset, with dropout)
    llama4 = llama.args_from_hf_config(dict(base, model_type="llama4_text", num_local_experts=4, num_experts_per_tok=1,
                                            intermediate_size_mlp=96, head_dim=16))
    resolve_targets(_cfg(dropout=0.1, use_rslora=True, target_modules=["q_proj", "gate_proj", "down_proj"]), llama4)
    # GPT-OSS: gate_up_proj is one LoRA per expert (PEFT's target_parameters), so rsLoRA is fine
    gpt_oss = llama.args_from_hf_config(dict(base, model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2))
    assert gpt_oss.fused_gate_up and gpt_oss.gate_up_interleaved and gpt_oss.sliding_window == [128, None]
    resolve_targets(_cfg(dropout=0.0, use_rslora=True, target_modules=["gate_up_proj", "down_proj"]), gpt_oss)
    with pytest.raises(UserError, match="adapter 'x': dropout must be 0 when target_modules include the experts'"):
        resolve_targets(_cfg(dropout=0.05, target_modules=["q_proj", "gate_up_proj"]), gpt_oss)
    # the dense layer's MLP and the shared expert get no LoRA (PEFT on transformers 5 gives them none)
    model = llama.CausalLM(replace(qwen2, model_type="qwen3_moe", shared_expert_intermediate_size=0))
    wrappers = inject_lora(model, BatchLayout())
    assert not any(".mlp." in p and ".experts." not in p for p in wrappers)
    assert sum(".experts." in p for p in wrappers) == 4 * 3


def test_targets_on_gemma4_moe():
    """Gemma 4 26B-A4B: the MLP targets are the dense MLP's (as PEFT matches them on transformers' model,
    whose experts are parameters), experts.gate_up_proj and experts.down_proj its experts' (PEFT's
    target_parameters), which take no dropout (PEFT refuses it on parameters) but rsLoRA (one LoRA on
    the whole gate_up_proj); a plain gate_up_proj is one line naming both; other models have no
    experts.* targets."""
    gemma4 = dict(model_type="gemma4_text", vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                  hidden_size_per_layer_input=0, sliding_window=4)
    args = llama.args_from_hf_config(dict(gemma4, **GEMMA4_MOE))
    assert resolve_targets(_cfg(target_modules=ALL7, dropout=0.1), args).lora[0].target_modules == ALL7
    every = [*ALL7, "experts.gate_up_proj", "experts.down_proj"]
    assert resolve_targets(_cfg(target_modules=every[::-1], dropout=0.0, use_rslora=True),
                           args).lora[0].target_modules == every
    with pytest.raises(UserError, match="target_modules gate_up_proj not in this gemma4_text model .*; gate_proj, "
                                        "up_proj, down_proj are its dense MLP's, experts.gate_up_proj, "
                                        "experts.down_proj its experts'"):
        resolve_targets(_cfg(target_modules=["q_proj", "gate_up_proj"]), args)
    with pytest.raises(UserError, match="adapter 'x': dropout must be 0 when target_modules include "
                                        "experts.down_proj on this gemma4_text model"):
        resolve_targets(_cfg(target_modules=["q_proj", "experts.down_proj"], dropout=0.05), args)
    dense = llama.args_from_hf_config(gemma4)
    with pytest.raises(UserError, match="target_modules experts.gate_up_proj not in this gemma4_text model"):
        resolve_targets(_cfg(target_modules=["experts.gate_up_proj"], dropout=0.0), dense)


def test_eval_and_generate_take_an_adapter_with_dropout_on_the_experts(tmp_path, tokenizer_dir, capsys):
    """Training refuses dropout on Mixtral's experts (above: PEFT could not load what it would
    save), but eval and generate never drop out: an adapter on the experts whose config keeps a
    rate (the default 0.05, or one PEFT trained on per-expert modules) evaluates and completes
    as the same adapter with dropout 0 does; training still refuses it."""
    from mlora.cli import main

    base = make_tiny_model(tmp_path / "mixtral", "mixtral", tokenizer_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": f"{w} {w}"}) + "\n"
                            for w in ("hi", "bye", "one", "two")))

    def config(dropout: float) -> str:
        path = tmp_path / f"config_{dropout}.json"
        path.write_text(json.dumps({"cutoff_len": 128, "seed": 0, "output_dir": str(tmp_path / "out"), "lora": [
            {"name": "x", "data": str(data), "r": 4, "alpha": 8, "dropout": dropout, "target_modules": ["q_proj", "w2"],
             "lr": 0.5, "batch_size": 2, "max_steps": 1}]}))
        return str(path)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*argv, "--base_model", str(base), "--device", "cpu", "--no_progress"])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    trained = run("train", "--config", config(0.0))
    assert trained[0] == 0, trained[2]
    code, _, err = run("train", "--config", config(0.1))
    assert code == 2 and "dropout must be 0 when target_modules include the experts' w2" in err
    results = {}
    for dropout in (0.0, 0.1):
        evaluated = run("eval", "--config", config(dropout))
        generated = run("generate", "--config", config(dropout), "--prompt", "say hi", "--prompt", "count",
                        "--max_new_tokens", "6", "--base")
        assert evaluated[0] == generated[0] == 0, evaluated[2] + generated[2]
        results[dropout] = evaluated[1], [json.loads(line) for line in generated[1].splitlines()]
    assert results[0.1] == results[0.0]
    assert any(line["output"] != line["base_output"] for line in results[0.0][1])  # (the adapter is applied)


def test_moe_config_errors():
    base = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    glm = dict(base, model_type="glm4_moe", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    args = llama.args_from_hf_config(dict(glm, n_group=4, topk_group=2, n_shared_experts=2, first_k_dense_replace=1))
    assert (args.router, args.router_groups, args.router_topk_groups, args.shared_expert_intermediate_size,
            args.shared_expert_gated, args.moe_layers, args.rotary_dim) == \
        ("sigmoid", 4, 2, 64, False, [False, True], 8)
    with pytest.raises(UserError, match=r"n_group \(3\) and topk_group \(1\) do not fit 8 experts"):
        llama.args_from_hf_config(dict(glm, n_group=3, topk_group=1))
    with pytest.raises(UserError, match=r"num_experts_per_tok \(6\) exceeds the experts of topk_group groups"):
        llama.args_from_hf_config(dict(glm, n_group=4, topk_group=2, num_experts_per_tok=6))
    with pytest.raises(UserError, match="first_k_dense_replace must be a non-negative integer"):
        llama.args_from_hf_config(dict(glm, first_k_dense_replace=-1))
    with pytest.raises(UserError, match="router_jitter_noise"):
        llama.args_from_hf_config(dict(base, model_type="mixtral", router_jitter_noise=0.1))
    with pytest.raises(UserError, match="clip_qkv"):
        llama.args_from_hf_config(dict(base, model_type="olmoe", clip_qkv=8.0))
    with pytest.raises(UserError, match="use_sliding_window"):
        llama.args_from_hf_config(dict(base, model_type="qwen3_moe", use_sliding_window=True))
    with pytest.raises(UserError, match=r"num_experts_per_tok \(8\) exceeds the number of experts \(4\)"):
        llama.args_from_hf_config(dict(base, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=8))
    with pytest.raises(UserError, match="num_experts must be a positive integer"):
        llama.args_from_hf_config(dict(base, model_type="olmoe", num_experts=0))


def test_mixtral_checkpoint_names():
    naming = naming_for("mixtral")
    assert naming.to_checkpoint("model.layers.3.mlp.experts.12.up_proj.weight") == \
        "model.layers.3.block_sparse_moe.experts.12.w3.weight"
    assert naming.to_checkpoint("model.layers.3.mlp.gate.weight") == "model.layers.3.block_sparse_moe.gate.weight"
    assert (naming.from_module("model.layers.0.block_sparse_moe.experts.1.w2")
            == "model.layers.0.mlp.experts.1.down_proj")
    assert naming.to_checkpoint("model.layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert naming.peft_target_modules(["q_proj", "gate_proj", "up_proj", "down_proj"]) == ["q_proj", "w1", "w3", "w2"]
    assert json.dumps(naming_for("qwen3_moe").peft_target_modules(["gate_proj"])) == '["gate_proj"]'


def test_recompute_and_a_quantized_base_with_expert_lora(tmp_path):
    """Activation checkpointing reruns each layer's routing in the backward and gives the same
    gradients; a 4-bit base quantizes every expert (the router stays in the dtype) and its
    experts' LoRA trains."""
    from mlora.quant import QuantConfig

    base = make_tiny_model(tmp_path / "qwen3_moe", "qwen3_moe")
    specs = {"e1": (4, ALL7), "e2": (2, ["q_proj", "gate_proj", "up_proj"])}
    ids, mask, probe = _inputs(2)

    def grads(recompute: bool):
        model, layout, adapters = _mlora_with_adapters(base, specs)
        model.recompute = recompute
        layout.rows = [AdapterRows("e1", 0, 2), AdapterRows("e2", 2, B)]
        (model(ids, mask) * probe * mask[..., None]).sum().backward()
        return {(n, p): w.lora_B.grad for n, a in adapters.items() for p, w in a.weights.items()
                if w.lora_B.grad is not None}

    plain, again = grads(False), grads(True)
    assert plain.keys() == again.keys() and any(".experts." in p for _, p in plain)
    for key, g in plain.items():
        assert (again[key] - g).abs().max() <= 1e-5 * g.abs().max(), key

    pytest.importorskip("bitsandbytes")  # (the 4-bit half; the recompute half above runs without it)
    model = load_model(base, "cpu", torch.float32, quant=QuantConfig(4))
    moe = model.model.layers["0"].mlp
    assert type(moe.experts[3].down_proj) is not torch.nn.Linear and type(moe.gate) is torch.nn.Linear
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    adapter = Adapter(AdapterConfig(name="q", data="", r=4, dropout=0.0, target_modules=ALL7), wrappers, 0,
                      torch.device("cpu"))
    with torch.no_grad():
        for w in adapter.weights.values():
            w.lora_B.normal_(0.0, 0.1)
    layout.rows = [AdapterRows("q", 0, B)]
    model.train()
    (model(ids, mask) * probe * mask[..., None]).sum().backward()
    expert_grads = [w.lora_A.grad for p, w in adapter.weights.items() if ".experts." in p and w.lora_A.grad is not None]
    assert expert_grads and all(torch.isfinite(g).all() for g in expert_grads)
    assert any(g.abs().max() > 0 for g in expert_grads)


def test_pipeline_split_weighs_sparse_layers(tmp_path):
    """Without --balance, the ranks split by cost: a sparse layer costs its k experts' (and a
    shared expert's) widths, not the dense intermediate_size: with two dense layers 10x as
    costly as the four sparse ones, the first rank takes one dense layer and the second the rest
    (counted as dense, the six layers would split three and three)."""
    from mlora.pipeline.run import plan_stages

    base = make_tiny_model(tmp_path / "qwen3_moe", "qwen3_moe", num_hidden_layers=6, intermediate_size=960,
                           mlp_only_layers=[0, 1])  # dense layers 10x the width of 2 experts of 48
    stages = plan_stages(str(base), 2, None)
    assert stages == [["embed", "layer.0"], [f"layer.{i}" for i in range(1, 6)] + ["norm", "head"]]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "glm4_moe",
                                        "deepseek_v2", "deepseek_v3", "mistral4"])
def test_a_config_json_without_the_class_defaults(model_type):
    """A config.json that leaves out what its config class defaults (Mixtral's RoPE base 1e6
    and 8 K/V heads, the Qwen MoE models' K/V heads, the expert counts and widths) reads as the
    config object does."""
    import transformers

    v2 = model_type == "deepseek_v2"  # (DeepseekV2Config has no default top k: one given and kept)
    config = transformers.AutoConfig.for_model(model_type, **({"num_experts_per_tok": 6} if v2 else {}))
    dropped = ("num_key_value_heads", "rope_parameters", "rope_theta", "max_position_embeddings", "num_experts",
               "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
               "rms_norm_eps", "head_dim", "sliding_window", "attention_bias", "layer_types", "n_routed_experts",
               "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group", "norm_topk_prob",
               "num_nextn_predict_layers", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
               "v_head_dim", "routed_scaling_factor", "topk_method")
    plain = {k: v for k, v in config.to_dict().items() if k not in dropped or (v2 and k == "num_experts_per_tok")}
    assert llama.args_from_hf_config(dict(plain, model_type=model_type)) == llama.args_from_hf_config(config)


def test_router_balancing_loss_is_reported_as_not_applied(capsys):
    import transformers

    from mlora.session import warn_unapplied_dropout

    warn_unapplied_dropout(transformers.MixtralConfig(output_router_logits=True))
    assert ("output_router_logits is set, but mlora trains on the language modelling loss only"
            in capsys.readouterr().err)
    warn_unapplied_dropout(transformers.MixtralConfig())
    assert capsys.readouterr().err == ""


def test_a_stage_refuses_an_init_from_tensor_of_no_decoder_layer(tmp_path):
    """A pipeline stage skips another stage's layers in an init_from adapter, but a tensor of no
    decoder layer (an lm_head LoRA mlora never trains) is the one-line error, as in one process."""
    from safetensors.torch import load_file, save_file

    base = make_tiny_model(tmp_path / "mixtral", "mixtral")
    model, layout, adapters = _mlora_with_adapters(base, {"x": (4, ALL7)})
    adapters["x"].save(tmp_path / "x", str(base))
    tensors = load_file(tmp_path / "x" / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, tmp_path / "x" / "adapter_model.safetensors")
    cfg = AdapterConfig(name="x", data="", r=4, alpha=8.0, dropout=0.0, target_modules=ALL7)
    wrappers = inject_lora(load_model(base, "cpu", torch.float32, parts=["embed", "layer.0"]), BatchLayout())
    stage = Adapter(cfg, wrappers, 0, torch.device("cpu"), stage_layers={"model.layers.0"},
                    naming=naming_for("mixtral"))
    with pytest.raises(UserError, match="unexpected tensor base_model.model.lm_head.lora_A.weight"):
        stage.load_peft(tmp_path / "x")
    del tensors["base_model.model.lm_head.lora_A.weight"]
    save_file(tensors, tmp_path / "x" / "adapter_model.safetensors")
    stage.load_peft(tmp_path / "x")  # layer 1's tensors: the other stage's


def test_pair_gather_has_the_gradient_of_plain_indexing():
    """The dispatch's gather (each token once per slot, ordered by expert) and its un-sort
    (a permutation) give what plain indexing gives, forward and backward."""
    from mlora.models.moe import _PairGather

    gen = torch.Generator().manual_seed(0)
    N, k, H = 7, 3, 5
    order = torch.randperm(N * k, generator=gen)
    back = torch.empty_like(order)
    back[order] = torch.arange(N * k)
    x = torch.randn(N, H, generator=gen, requires_grad=True)
    probe = torch.randn(N * k, H, generator=gen)
    ours = _PairGather.apply(x, order // k, back, k)
    plain = x[order // k]
    assert torch.equal(ours, plain)
    (gx,) = torch.autograd.grad((ours * probe).sum(), x)
    (ref,) = torch.autograd.grad((plain * probe).sum(), x)
    torch.testing.assert_close(gx, ref)
    y = torch.randn(N * k, H, generator=gen, requires_grad=True)
    ours, plain = _PairGather.apply(y, back, order, 1), y[back]
    assert torch.equal(ours, plain)
    torch.testing.assert_close(torch.autograd.grad((ours * probe).sum(), y)[0],
                               torch.autograd.grad((plain * probe).sum(), y)[0])


# (seeds whose routing has the premise: an expert gets some of p1's tokens in the fused run of a
# step and none alone; the test checks it happens)
@pytest.mark.parametrize("family, seed, grouped", [("gpt_oss", 2, False), ("olmoe", 0, False), ("olmoe", 0, True)])
def test_fused_training_equals_solo_when_only_pad_tokens_reach_an_expert(tmp_path, tokenizer_dir, monkeypatch,
                                                                         family, seed, grouped):
    """Pad tokens are routed too. In a fused batch an adapter's rows are padded to the batch's
    longest row, so an expert may get some of its (pad) tokens there and none alone: a zero
    gradient against none. Every LoRA weight of a stepping adapter gets a gradient (zero if
    none came), so SGD's momentum and AdamW's moments move it alike and the fused run equals
    the solo one. (Without the zero gradients, such an expert's B differed by up to 15%.)
    Grouped experts (models/moe.grouped_experts; GPT-OSS's never are) give every expert's LoRA
    a gradient, zero where no token came."""
    from safetensors.torch import load_file

    from mlora.cli import main
    from test_pipeline import rel_diff, write_config

    missing = []  # (adapter, LoRA weights without a gradient) at each optimizer step
    step = Adapter._optimizer_step

    def spy(self, grad):
        missing.append((self.name, sum(p.grad is None for p in self.parameters())))
        step(self, grad)

    monkeypatch.setattr(Adapter, "_optimizer_step", spy)
    monkeypatch.setattr(mlora.models.moe, "GROUPED_EXPERTS", grouped)
    base = make_tiny_model(tmp_path / family, family, tokenizer_dir, num_hidden_layers=4, seed=seed)
    cfg = write_config(tmp_path, 2, tmp_path / "fused")  # p0: q/v, AdamW; p1: SGD with momentum
    raw = json.loads(cfg.read_text())
    raw["lora"][1]["target_modules"] = ["q_proj", "o_proj", "down_proj",
                                        *(["gate_up_proj"] if family == "gpt_oss" else ["gate_proj", "up_proj"])]
    cfg.write_text(json.dumps(raw))
    assert main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress"]) == 0
    fused = [n for name, n in missing if name == "p1"]
    missing.clear()
    raw["lora"] = raw["lora"][1:]
    cfg.write_text(json.dumps(raw))
    assert main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress",
                 "--output_dir", str(tmp_path / "solo")]) == 0
    solo = [n for name, n in missing if name == "p1"]
    if grouped:
        assert len(fused) == len(solo) and not any(fused + solo), (fused, solo)
    else:
        assert len(fused) == len(solo) and any(s > f for f, s in zip(fused, solo)), (fused, solo)  # the premise
    assert rel_diff(load_file(tmp_path / "fused" / "p1" / "adapter_model.safetensors"),
                    load_file(tmp_path / "solo" / "p1" / "adapter_model.safetensors")) <= 1e-5


def test_multi_token_prediction_layers_are_left_unused_quietly(tmp_path, capsys):
    """GLM-4.5's checkpoints hold num_nextn_predict_layers more layers than num_hidden_layers
    (multi-token prediction, which transformers ignores too): no warning for those, as there is
    for any other tensor the config leaves unused. The router stays in fp32 in a bf16 model."""
    from safetensors.torch import load_file, save_file

    base = make_tiny_model(tmp_path / "glm", "glm4_moe")  # 2 layers, num_nextn_predict_layers 1
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(base / "model.safetensors").items()}  # router too
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)  # the MTP layer's
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    model = load_model(base, "cpu", torch.bfloat16)
    assert "unused" not in capsys.readouterr().err
    gate = model.model.layers["1"].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers["1"].self_attn.q_proj.weight.dtype == torch.bfloat16
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)  # past them: reported
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    load_model(base, "cpu", torch.float32)
    assert "leaves tensor 'model.layers.3.eh_proj.weight'" in capsys.readouterr().err


def test_no_shared_experts_leave_no_tensor_unused(tmp_path, capsys):
    """transformers builds DeepSeek's shared experts even with n_shared_experts 0, as MLPs of width
    0, and saves their [0, H] and [H, 0] weights, which mlora (rightly: they add nothing) does not
    build: no "unused" warning for those, and the logits equal transformers'. A shared expert
    that holds weights under n_shared_experts 0 is still warned of."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(tmp_path / "ds", "deepseek_v3", n_shared_experts=0)
    tensors = load_file(base / "model.safetensors")
    empty = sorted(name for name, t in tensors.items() if t.numel() == 0)
    assert empty and all(".mlp.shared_experts." in name for name in empty)  # (the premise)
    capsys.readouterr()
    ours = load_model(base, "cpu", torch.float32)
    assert "unused" not in capsys.readouterr().err
    ref = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    ids, mask, _ = _inputs()
    with torch.no_grad():
        diff = (ours(ids, mask) - ref(input_ids=ids, attention_mask=mask).logits).abs()[mask.bool()]
    assert diff.max() < 1e-4
    tensors[empty[0]] = torch.ones(8, *[n for n in tensors[empty[0]].shape if n])  # weights the config leaves out
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    load_model(base, "cpu", torch.float32)
    assert f"leaves tensor {empty[0]!r} of the checkpoint unused" in capsys.readouterr().err


def test_a_block_fp8_checkpoint_loads_as_transformers_dequantizes_it(tmp_path, capsys):
    """DeepSeek-V3's released checkpoints store their projections in FP8 with a scale per block
    (quantization_config quant_method fp8, weight_block_size): mlora's logits equal transformers'
    DeepseekV3ForCausalLM holding the weights transformers' own FP8 code dequantizes, every scale
    is read, and any other stored quantization is refused with one line."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    # (a private helper of transformers' FP8 code, added after 5.17: older releases skip this reference)
    _dequantize_fp8_weight = getattr(pytest.importorskip("transformers.integrations.finegrained_fp8"),
                                     "_dequantize_fp8_weight", None)
    if _dequantize_fp8_weight is None:
        pytest.skip("this transformers has no finegrained_fp8._dequantize_fp8_weight to compare against")

    base = make_tiny_model(tmp_path / "full", "deepseek_v3")
    tensors = load_file(base / "model.safetensors")
    block = (16, 16)  # (the releases: 128 x 128); 24 x 64 weights leave partial blocks
    dequantized = {}
    for name in [n for n, t in tensors.items() if n.endswith("_proj.weight") and t.dim() == 2]:
        w = tensors[name]
        rows, cols = w.shape
        peak = torch.nn.functional.pad(w.abs(), (0, -cols % 16, 0, -rows % 16)).unflatten(0, (-1, 16)).unflatten(
            -1, (-1, 16)).amax(dim=(1, 3))  # [row blocks, col blocks]
        scale = (peak / 448.0).clamp_min(1e-8)  # e4m3's largest value
        full = scale.repeat_interleave(16, 0)[:rows].repeat_interleave(16, 1)[:, :cols]
        tensors[name] = (w / full).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale
        dequantized[name] = _dequantize_fp8_weight(tensors[name], scale, list(block), torch.float32)
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block), "fmt": "e4m3"}
    (out / "config.json").write_text(json.dumps(config))
    ours = load_model(out, "cpu", torch.float32)
    assert "unused" not in capsys.readouterr().err
    assert sum(n.endswith("_scale_inv") for n in ours.loaded_tensor_names) == len(dequantized)
    ref = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in dequantized.items():
            expert = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
            if expert is None:
                ref.get_parameter(name).copy_(weight)
                continue
            # transformers 5 stacks the experts: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]
            stacked = ref.get_parameter(f"{expert[1]}.{'down_proj' if expert[3] == 'down' else 'gate_up_proj'}")
            rows = {"gate": slice(0, weight.shape[0]), "up": slice(weight.shape[0], None), "down": slice(None)}
            stacked[int(expert[2])][rows[expert[3]]].copy_(weight)
        ids, mask, _ = _inputs()
        diff = (ours(ids, mask) - ref(input_ids=ids, attention_mask=mask).logits).abs()[mask.bool()]
    assert diff.max() < 1e-4
    for qc, message in [({"quant_method": "awq", "bits": 4}, "quantization_config quant_method 'awq' is not supported"),
                        ({"quant_method": "fp8", "weight_block_size": [16]}, "weight_block_size must be two positive"),
                        # (absent: transformers' 128 x 128, which the 16 x 16 blocks' scales do not fit)
                        ({"quant_method": "fp8"},
                         r"scales \(2, 4\) do not fit a 24 x 64 weight in blocks of 128 x 128"),
                        ("fp8", "quantization_config must be an object")]:
        config["quantization_config"] = qc
        (out / "config.json").write_text(json.dumps(config))
        with pytest.raises(UserError, match=message):
            load_model(out, "cpu", torch.float32)


def test_deepseek_v3_config_checks():
    base = dict(model_type="deepseek_v3", vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)
    args = llama.args_from_hf_config(base)
    assert args.mla and args.q_lora_rank == 0 and args.rope.interleaved and args.head_dim == 8
    assert not llama.args_from_hf_config(dict(base, rope_interleave=None)).rope.interleaved  # as transformers
    with pytest.raises(UserError, match="deepseek_v3 config qk_rope_head_dim must be a positive integer"):
        llama.args_from_hf_config(dict(base, qk_rope_head_dim=0))
    with pytest.raises(UserError, match="deepseek_v3 config num_nextn_predict_layers must be a non-negative"):
        llama.args_from_hf_config(dict(base, num_nextn_predict_layers=-1))


def test_deepseek_v2_config_checks():
    """DeepSeek-V2's router: groups only under group_limited_greedy (its released V2-Lite says
    greedy beside n_group 1); the keys its original code reads and transformers' does not are
    refused where they would change the model; a bad value is named in one line."""
    base = dict(model_type="deepseek_v2", vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                n_shared_experts=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                v_head_dim=12, topk_method="greedy", n_group=4, topk_group=1, scoring_func="softmax",
                moe_layer_freq=1, norm_topk_prob=False, aux_loss_alpha=0.001, seq_aux=True)
    args = llama.args_from_hf_config(base)
    assert args.mla and args.rope.interleaved and args.router == "grouped_softmax" and args.routing_weights_fp32
    assert (args.router_groups, args.router_topk_groups, args.num_kv_heads) == (1, 1, 4)
    assert args.shared_expert_intermediate_size == 64 and not args.shared_expert_gated
    grouped = llama.args_from_hf_config(dict(base, topk_method="group_limited_greedy"))
    assert (grouped.router_groups, grouped.router_topk_groups) == (4, 1)
    for change, message in [(dict(topk_method="noaux_tc"), "deepseek_v2 config topk_method 'noaux_tc'"),
                            (dict(scoring_func="sigmoid"), "deepseek_v2 config scoring_func 'sigmoid'"),
                            (dict(norm_topk_prob=True), "deepseek_v2 config norm_topk_prob is true"),
                            (dict(moe_layer_freq=2), "deepseek_v2 config moe_layer_freq 2"),
                            (dict(mlp_bias=True), "deepseek_v2 config mlp_bias is true"),
                            (dict(topk_method="group_limited_greedy", n_group=3), r"deepseek_v2 config n_group \(3\)"),
                            (dict(kv_lora_rank=0), "deepseek_v2 config kv_lora_rank must be a positive integer")]:
        with pytest.raises(UserError, match=message):
            llama.args_from_hf_config(dict(base, **change))


def _stacked_checkpoint(base, out):
    """base's checkpoint with the experts stacked as transformers 5 holds them in memory (and reads
    them from a file: Qwen3.5-MoE's releases): the state_dict of the model it was saved from,
    `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I] per sparse layer
    (Mixtral's sparse MLP is then `mlp`, router and all)."""
    import transformers
    from safetensors.torch import save_file

    arch = json.loads((base / "config.json").read_text())["architectures"][0]
    tensors = getattr(transformers, arch).from_pretrained(str(base), dtype=torch.float32).state_dict()
    assert any(n.endswith(".mlp.experts.gate_up_proj") for n in tensors)
    assert not any(".experts.0." in n for n in tensors)
    out.mkdir()
    save_file({n: t.contiguous() for n, t in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_bytes((base / "config.json").read_bytes())
    return out


# (mistral3's stacked experts, Mistral Small 4's release: test_model.py's test_mistral_small_4_release_layout_loads;
# Gemma 4's, which transformers always saves stacked (`layers.{i}.experts`), and Llama 4's, whose checkpoints are
# always stacked: test_model.py's logits tests)
@pytest.mark.parametrize("family", [f for f in GATE_UP_STACKED if f not in ("mistral3", "gemma4_text", "gemma4",
                                                                          "llama4_text", "llama4")])
def test_a_checkpoint_that_stacks_the_experts_loads(tmp_path, capsys, family):
    """A checkpoint whose experts are stacked as transformers 5 stacks them loads to exactly the
    model of the per-expert checkpoint, gives the logits of transformers' model read from it, and
    leaves no tensor unused; a pipeline stage reads its own layers' stacked tensors only."""
    from conftest import load_reference

    base = make_tiny_model(tmp_path / "per_expert", family)
    stacked = _stacked_checkpoint(base, tmp_path / "stacked")
    ours = load_model(stacked, "cpu", torch.float32)
    assert "unused" not in capsys.readouterr().err
    assert any(n.endswith(".mlp.experts.gate_up_proj") for n in ours.loaded_tensor_names)
    per_expert = load_model(base, "cpu", torch.float32).state_dict()
    assert ours.state_dict().keys() == per_expert.keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, per_expert[name]), name
    ids, mask, _ = _inputs()
    # (Mistral Small 4's query scale counts a left-padded row's positions from its first real
    # token, as transformers' generate does; its plain forward does not)
    extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if ours.args.query_scale_beta else {}
    with torch.no_grad():
        ref = load_reference(stacked)(input_ids=ids, attention_mask=mask, **extra).logits
        diff = (ours(ids, mask) - ref).abs()[mask.bool()]
    assert diff.max() < 1e-4
    # (Qwen3-Next's tiny layer 1 is dense)
    i = next(i for i in range(1, ours.args.num_layers) if ours.args.moe_layers[i])
    stage = load_model(stacked, "cpu", torch.float32, parts=[f"layer.{i}"])
    assert {re.search(r"layers\.(\d+)", n)[1] for n in stage.loaded_tensor_names} == {str(i)}
    assert torch.equal(stage.model.layers[str(i)].mlp.experts[2].up_proj.weight,
                       per_expert[f"model.layers.{i}.mlp.experts.2.up_proj.weight"])


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_from_stacked_experts_equals_one_from_per_expert_tensors(tmp_path, bits):
    """With --load_4bit / --load_8bit each expert's slice of a stacked tensor is quantized on its own,
    to the very layers the per-expert checkpoint gives."""
    pytest.importorskip("bitsandbytes")
    from mlora.quant import QuantConfig

    base = make_tiny_model(tmp_path / "per_expert", "qwen3_5_moe_text")
    stacked = _stacked_checkpoint(base, tmp_path / "stacked")
    ids, mask, _ = _inputs()
    with torch.no_grad():
        model = load_model(stacked, "cpu", torch.float32, quant=QuantConfig(bits))
        expert = model.model.layers["1"].mlp.experts[3].up_proj
        assert type(expert).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
        assert torch.equal(model(ids, mask), load_model(base, "cpu", torch.float32, quant=QuantConfig(bits))(ids, mask))


def test_a_stacked_expert_tensor_of_the_wrong_shape_is_one_line(tmp_path):
    """A stacked tensor is checked whole before any expert's slice of it is read (a wrong width would
    split the gate rows from the up rows elsewhere): one line naming the tensor and its file. So is
    one in FP8 in a checkpoint whose config.json declares no FP8 quantization."""
    from safetensors.torch import load_file, save_file

    stacked = _stacked_checkpoint(make_tiny_model(tmp_path / "per_expert", "qwen3_moe"), tmp_path / "stacked")
    file = stacked / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.mlp.experts.gate_up_proj"  # [4, 96, 64]
    for wrong, message in [(torch.zeros(4, 98, 64), r"has shape \(4, 98, 64\) but config.json implies \(4, 96, 64\)"),
                           (torch.zeros(3, 96, 64), "stacks 3 experts but config.json implies 4"),
                           (torch.zeros(4, 96, 64, dtype=torch.float8_e4m3fn),
                            "is float8 but config.json has no FP8 quantization_config")]:
        scale = {name + "_scale_inv": torch.ones(4, 1, 1)} if wrong.dtype == torch.float8_e4m3fn else {}
        save_file({**tensors, name: wrong, **scale}, file, metadata={"format": "pt"})
        with pytest.raises(UserError, match=f"tensor '{re.escape(name)}' in {re.escape(str(file))} {message}") as e:
            load_model(stacked, "cpu", torch.float32)
        assert "\n" not in str(e.value)


def test_mistral4_config_checks():
    """Mistral Small 4's config: DeepSeek-V3's latent attention keys, its router (model dtype,
    renormalized by default), Ministral 3's query scale from rope_parameters; what transformers
    would fail on or mlora would get wrong is one line naming the key."""
    base = dict(model_type="mistral4", vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, n_group=2, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=64,
                                     mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1,
                                     partial_rotary_factor=0.5))
    args = llama.args_from_hf_config(base)
    assert args.mla and args.rope.interleaved and args.head_dim == 8 and args.rotary_dim is None
    assert (args.router, args.router_params_fp32, args.routing_weights_fp32, args.norm_topk_prob) == (
        "grouped_softmax_top2", False, False, True)
    assert (args.router_groups, args.router_topk_groups, args.extra_layers) == (2, 1, 0)
    assert (args.query_scale_beta, args.query_scale_period) == (0.1, 64)
    assert args.shared_expert_intermediate_size == 32 and args.moe_layers == [True, True]
    assert args.attn_scale == pytest.approx(16 ** -0.5 * (0.1 * math.log(4.0) + 1) ** 2)
    assert not llama.args_from_hf_config(dict(base, rope_interleave=None)).rope.interleaved  # as transformers
    no_partial = dict(base["rope_parameters"])
    del no_partial["partial_rotary_factor"]  # (Mistral4Config sets the default: rope / (nope + rope))
    assert llama.args_from_hf_config(dict(base, rope_parameters=no_partial)) == args
    for change, message in [
            (dict(rope_parameters=dict(base["rope_parameters"], partial_rotary_factor=1.0)),
             r"mistral4 config rope_parameters partial_rotary_factor \(1.0\) must be qk_rope_head_dim"),
            (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4)),
             "mistral4 config rope_parameters needs llama_4_scaling_beta"),
            (dict(n_group=3), r"mistral4 config n_group \(3\)"),
            (dict(n_routed_experts=1, num_experts_per_tok=1, n_group=1), r"mistral4 config n_group \(1\)"),
            (dict(qk_nope_head_dim=0), "mistral4 config qk_nope_head_dim must be a positive integer")]:
        with pytest.raises(UserError, match=message) as e:
            llama.args_from_hf_config(dict(base, **change))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups, topk_groups, norm", [(4, 2, True), (1, 1, False), (2, 1, True)])
def test_mistral4_router_equals_transformers(dtype, groups, topk_groups, norm):
    """Mistral Small 4's router on the same inputs picks transformers' Mistral4TopkRouter's experts with
    its weights exactly, in fp32 and in bf16 (its logits and softmax in the model's dtype)."""
    import transformers
    from transformers.models.mistral4.modeling_mistral4 import Mistral4TopkRouter

    from mlora.models.moe import SparseMoE

    config = transformers.Mistral4Config(hidden_size=64, n_routed_experts=16, num_experts_per_tok=4, n_group=groups,
                                         topk_group=topk_groups, norm_topk_prob=norm, routed_scaling_factor=2.5,
                                         moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=4)
    args = llama.args_from_hf_config(config)
    moe = SparseMoE(args, lambda size: torch.nn.Linear(1, 1)).to(dtype)
    theirs = Mistral4TopkRouter(config).to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(16, 64, generator=gen) * 0.5)
        moe.gate.weight.copy_(theirs.weight)
        x = torch.randn(200, 64, generator=gen).to(dtype)
        weights, chosen = moe.route(x)
        _, their_weights, their_chosen = theirs(x)
    assert weights.dtype == their_weights.dtype == dtype
    order, their_order = chosen.argsort(dim=-1), their_chosen.argsort(dim=-1)
    assert torch.equal(chosen.gather(1, order), their_chosen.gather(1, their_order))
    assert torch.equal(weights.gather(1, order), their_weights.gather(1, their_order))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma4_router_equals_transformers(dtype):
    """Gemma 4 26B-A4B's router on the same inputs picks transformers' Gemma4TextRouter's experts
    with its weights exactly, in fp32 and in bf16 (its norm and scales in the model's dtype, the
    softmax and the weights in fp32)."""
    import transformers
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    from mlora.models.moe import Gemma4Router

    config = transformers.Gemma4TextConfig(hidden_size=64, num_experts=16, top_k_experts=4, enable_moe_block=True,
                                           moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=4, hidden_size_per_layer_input=0)
    ours = Gemma4Router(llama.args_from_hf_config(config)).to(dtype)
    theirs = Gemma4TextRouter(config).to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs.proj.weight.copy_(torch.randn(16, 64, generator=gen) * 0.5)
        theirs.scale.copy_(torch.rand(64, generator=gen) + 0.5)
        theirs.per_expert_scale.copy_(torch.rand(16, generator=gen) + 0.5)
        ours.load_state_dict(theirs.state_dict())
        x = (torch.randn(200, 64, generator=gen) * 3).to(dtype)
        weights, chosen = ours(x)
        _, their_weights, their_chosen = theirs(x)
    assert weights.dtype == their_weights.dtype == torch.float32
    assert torch.equal(chosen, their_chosen) and torch.equal(weights, their_weights)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "llama4_text", "gpt_oss"])
def test_grouped_experts_equal_one_expert_at_a_time(tmp_path, monkeypatch, family):
    """The experts as three grouped GEMMs (models/moe.grouped_experts, with their LoRA as
    lora_moe.GroupedExpertLoRA) give the logits and every LoRA gradient of running each expert
    on its own: two adapters on the experts with different ranks (one only on gate/up), one on
    attention only, and a row of no adapter. Where an adapter is missing from one expert's
    projection the experts run one at a time again. The experts' weights become views of one
    stack (no second copy), made again after they are replaced. GPT-OSS: a fused gate_up of
    interleaved columns, biases, its clamped GLU."""
    import mlora.models.moe as moe

    base = make_tiny_model(tmp_path / family, family)
    # (Llama 4's experts by their own names: gate_proj, up_proj, down_proj are its shared expert's)
    mlp = {"llama4_text": ["experts.gate_up_proj", "experts.down_proj"],
           "gpt_oss": ["gate_up_proj", "down_proj"]}.get(family, ["gate_proj", "up_proj", "down_proj"])
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    specs = {"e1": (4, attention + mlp), "a": (2, ["q_proj", "v_proj"]), "e2": (8, ["q_proj", *mlp[:-1]])}
    layout_rows = [AdapterRows("e2", 3, 4), AdapterRows("a", 2, 3), AdapterRows("e1", 0, 1)]
    ids, mask, probe = _inputs(2)
    calls = []
    real_grouped = moe.grouped_experts
    monkeypatch.setattr(moe, "grouped_experts", lambda *a: calls.append(a[-1]) or real_grouped(*a))

    def run(grouped, damage=False):
        monkeypatch.setattr(moe, "GROUPED_EXPERTS", grouped)
        model, layout, adapters = _mlora_with_adapters(base, specs)
        layout.rows = layout_rows
        sparse = [layer.mlp for layer in model.model.layers.values() if hasattr(layer.mlp, "experts")]
        if damage:  # e1 missing from one expert's down_proj: cannot be grouped
            del sparse[0].experts[1].down_proj.adapters["e1"]
        calls.clear()
        logits = model(ids, mask)
        (logits * probe * mask[..., None]).sum().backward()
        grads = {(n, p, k): getattr(w, k).grad for n in adapters for p, w in adapters[n].weights.items()
                 for k in ("lora_A", "lora_B")}
        return model, sparse, logits, grads, list(calls)

    _, _, loop_logits, loop_grads, loop_calls = run(False)
    model, sparse, logits, grads, grouped_calls = run(True)
    assert not loop_calls and len(grouped_calls) == len(sparse) > 0
    # LoRA on the experts went the grouped way
    assert all(lora is not None for lora in grouped_calls)
    assert (logits - loop_logits).abs().max() <= 1e-5 * loop_logits.abs().max()
    assert grads.keys() == loop_grads.keys()
    for key, g in grads.items():
        ref = loop_grads[key]
        if ref is None:  # an expert no token reached: one at a time it has no gradient, grouped a zero one
            assert g is None or not g.any(), key
            continue
        assert (g - ref).abs().max() <= 1e-5 * ref.abs().max().clamp_min(1e-12), key
    assert any(".experts." in p and g is not None and g.abs().max() > 0 for (n, p, k), g in grads.items() if n == "e2")
    # one stack per projection: every expert's weight a view into one storage
    for proj in moe.expert_projections(sparse[0].experts[0]):
        linears = [getattr(e.get_submodule(proj), "base", e.get_submodule(proj)) for e in sparse[0].experts]
        for kind in ("weight", "bias"):
            storages = {getattr(lin, kind).untyped_storage().data_ptr() for lin in linears
                        if getattr(lin, kind) is not None}
            assert len(storages) == (kind == "weight" or family == "gpt_oss"), (proj, kind)
    checked = []  # a later forward takes the stacks' views without a pass over every expert
    real_check = moe._frozen_linear
    monkeypatch.setattr(moe, "_frozen_linear", lambda m: checked.append(m) or real_check(m))
    assert torch.equal(model(ids, mask), logits.detach()) and not checked
    with torch.no_grad():  # replaced weights (as .to() would) are stacked again
        for p in model.parameters():
            p.data = p.data.clone()
    assert torch.equal(model(ids, mask), logits.detach()) and checked

    _, _, damaged_loop, _, _ = run(False, damage=True)
    _, _, damaged, _, damaged_calls = run(True, damage=True)
    assert len(damaged_calls) == len(sparse) - 1  # the damaged layer ran one expert at a time
    assert (damaged - damaged_loop).abs().max() <= 1e-5 * damaged_loop.abs().max()
    assert (damaged - loop_logits).abs().max() > 1e-4  # (the damage shows)


def test_grouped_experts_see_a_middle_expert_replaced_after_the_first_forward(tmp_path, monkeypatch):
    """After a first forward stacked the experts' weights, a later one still runs what the
    modules hold when one expert between the first and the last changed: its weight's .data, a
    new Parameter (load_state_dict(assign=True)), its LoRA wrapper's base swapped for
    another nn.Linear or quantized (quant.quantize_model): grouped == one expert at a time, and no
    reference to a replaced weight is kept."""
    import copy
    import gc
    import weakref

    import mlora.models.moe as moe

    base = make_tiny_model(tmp_path / "mixtral", "mixtral")
    ids, mask, _ = _inputs(5)
    mlp = ["gate_proj", "up_proj", "down_proj"]

    def change(model, how):
        sparse = [layer.mlp for layer in model.model.layers.values() if hasattr(layer.mlp, "experts")]
        wrapper = sparse[0].experts[1].up_proj  # (a LoraLinear: its base is the nn.Linear)
        old = weakref.ref(wrapper.base.weight)
        if how == "data":
            wrapper.base.weight.data = torch.randn_like(wrapper.base.weight)
        elif how == "parameter":
            state = {k: torch.randn_like(v) for k, v in model.state_dict().items() if ".experts.1." in k}
            model.load_state_dict(state, strict=False, assign=True)
        elif how == "module":
            linear = copy.deepcopy(wrapper.base)
            with torch.no_grad():
                linear.weight.mul_(-2.0)
            wrapper.base = linear
        else:
            pytest.importorskip("bitsandbytes")
            from mlora.quant import QuantConfig, quantize_model

            quantize_model(model, QuantConfig(4), "cpu")
        return old

    for how in ("data", "parameter", "module", "quantized"):
        monkeypatch.setattr(moe, "GROUPED_EXPERTS", True)
        model, layout, _ = _mlora_with_adapters(base, {"e": (4, ["q_proj", *mlp])})
        layout.rows = [AdapterRows("e", 0, B)]
        with torch.no_grad():
            before = model(ids, mask)
            old = change(model, how)
            grouped = model(ids, mask)
            monkeypatch.setattr(moe, "GROUPED_EXPERTS", False)
            loop = model(ids, mask)
        assert (grouped - before).abs().max() > 1e-3, how  # (the change shows)
        assert (grouped - loop).abs().max() <= 1e-5 * loop.abs().max(), how
        gc.collect()
        assert how == "data" or old() is None, how


def test_grouped_experts_stack_normal_tensors_under_inference_mode(tmp_path):
    """A first forward under torch.inference_mode stacks the experts' weights as normal tensors:
    inference tensors as the model's weights would refuse any later in-place change or use that
    autograd records outside inference mode."""
    base = make_tiny_model(tmp_path / "mixtral", "mixtral")
    model = load_model(base, "cpu", torch.float32)
    ids, mask, _ = _inputs(6)
    with torch.inference_mode():
        model(ids, mask)
    experts = next(layer.mlp for layer in model.model.layers.values() if hasattr(layer.mlp, "experts")).experts
    weights = [expert.gate_proj.weight for expert in experts]
    assert weights[1].data_ptr() == weights[0].data_ptr() + weights[0].nbytes  # (stacked)
    assert not any(w.is_inference() for w in weights)
    with torch.no_grad():
        weights[1].mul_(1.0)


def test_grouped_expert_lora_rounds_as_one_expert_at_a_time_in_bf16():
    """GroupedExpertLoRA in bf16 gives what LoraLinear computes one expert at a time: the scale
    goes into B in fp32 before B's cast (in bf16 a scale like rsLoRA's 16 / sqrt(8) rounds by
    1e-4, 1/48 by 2e-3), and B's gradient is the dtype's times the scale in fp32. Two adapters
    of different scales, an expert no token reaches (zero gradients), a token of no adapter."""
    from mlora.lora import LoraWeights
    from mlora.lora_moe import GroupedExpertLoRA, _ExpertLoRAPlan

    E, H, O, bf = 4, 32, 24, torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    specs = [(8, 16.0, True), (16, 1.0 / 3, False)]  # scales 5.657 and 0.0208: neither a bf16
    weights = []
    for g, (r, alpha, rs) in enumerate(specs):
        ws = [LoraWeights(H, O, r, alpha, 0.0, rs, seed=g * E + e) for e in range(E)]
        with torch.no_grad():
            for w in ws:
                w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=gen) * 0.2)
        weights.append(ws)
    counts = [5, 0, 7, 4]  # expert 1 gets no token
    M = sum(counts)
    token_adapter = torch.tensor([0, 1, 2, 0, 1] + [1, 1, 0, 2, 0, 0, 1] + [0, 1, 1, 0], dtype=torch.int32)
    x = torch.randn(M, H, generator=gen).to(bf)
    d = torch.randn(M, O, generator=gen).to(bf)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)

    lora = GroupedExpertLoRA({"p": _ExpertLoRAPlan([0, 1], weights)}, token_adapter, 2)
    xg = x.clone().requires_grad_()
    y = lora("p", xg, ends)
    y.backward(d)
    grads = [(w.lora_A.grad, w.lora_B.grad) for ws in weights for w in ws]
    for ws in weights:
        for w in ws:
            w.lora_A.grad = w.lora_B.grad = None

    # one expert at a time, each adapter on its own tokens (LoraLinear._forward_loop's arithmetic)
    xl = x.clone().requires_grad_()
    ref = torch.zeros(M, O, dtype=bf)
    first = 0
    for e, n in enumerate(counts):
        for g, ws in enumerate(weights):
            rows = [first + i for i in range(n) if token_adapter[first + i] == g]
            if rows:
                w = ws[e]
                h = torch.nn.functional.linear(xl[rows], w.lora_A.to(bf))
                ref = ref.index_put((torch.tensor(rows),), torch.nn.functional.linear(h, (w.lora_B * w.scale).to(bf)))
        first += n
    ref.backward(d)
    assert torch.equal(y, ref)
    assert torch.equal(xg.grad, xl.grad)
    for (ga, gb), w in zip(grads, [w for ws in weights for w in ws]):
        if w.lora_A.grad is None:  # expert 1: no token, a zero gradient
            assert not ga.any() and not gb.any()
            continue
        assert torch.equal(ga, w.lora_A.grad) and torch.equal(gb, w.lora_B.grad)


def test_grouped_expert_lora_zeroes_the_gradient_of_an_expert_without_tokens(monkeypatch):
    """An expert no token reaches gets zero LoRA gradients whatever the grouped GEMM leaves in
    its group (torch's sm100 kernel was reported to leave such groups unwritten, pytorch#172439;
    here a stand-in that writes NaN there)."""
    import mlora.lora_moe as lora_moe
    from mlora.lora import LoraWeights
    from mlora.lora_moe import GroupedExpertLoRA, _ExpertLoRAPlan

    real = torch._grouped_mm

    def garbage_in_empty_groups(a, b, offs=None, **kw):
        out = real(a, b, offs=offs, **kw)
        if a.dim() == 2 and b.dim() == 2:  # [E, ., .]: one per group of the token dimension
            starts = torch.cat([offs.new_zeros(1), offs[:-1]])
            out[offs == starts] = float("nan")
        return out

    monkeypatch.setattr(lora_moe, "_GROUPED_MM", garbage_in_empty_groups)
    E, H, O = 4, 32, 24
    ws = [LoraWeights(H, O, 4, 8.0, 0.0, False, seed=e) for e in range(E)]
    counts = [3, 0, 5, 0]
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), H, requires_grad=True)
    lora = GroupedExpertLoRA({"p": _ExpertLoRAPlan([0], [ws])}, torch.zeros(sum(counts), dtype=torch.int32), 1)
    lora("p", x, ends).sum().backward()
    for e, w in enumerate(ws):
        assert torch.isfinite(w.lora_A.grad).all() and torch.isfinite(w.lora_B.grad).all(), e
        if not counts[e]:
            assert not w.lora_A.grad.any() and not w.lora_B.grad.any(), e


def test_grouped_expert_lora_pads_unaligned_ranks(tmp_path, monkeypatch):
    """An adapter of rank 3 alone (12 bytes a row of h in fp32, not the 16 torch._grouped_mm
    wants) still runs grouped, its columns padded with zeros, and equals one expert at a time
    (logits, every LoRA gradient)."""
    import mlora.models.moe as moe

    base = make_tiny_model(tmp_path / "mixtral", "mixtral")
    ids, mask, probe = _inputs(4)
    loras = []
    real = moe.grouped_experts
    monkeypatch.setattr(moe, "grouped_experts", lambda *a: loras.append(a[-1]) or real(*a))

    def run(grouped):
        monkeypatch.setattr(moe, "GROUPED_EXPERTS", grouped)
        model, layout, adapters = _mlora_with_adapters(base, {"odd": (3, ALL7)})
        layout.rows = [AdapterRows("odd", 0, B)]
        logits = model(ids, mask)
        (logits * probe * mask[..., None]).sum().backward()
        return logits, {p: (w.lora_A.grad, w.lora_B.grad) for p, w in adapters["odd"].weights.items()}

    ref_logits, ref_grads = run(False)
    assert not loras
    logits, grads = run(True)
    assert loras and all(lora is not None and lora is not False for lora in loras)
    assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
    for path, pair in grads.items():
        for g, ref in zip(pair, ref_grads[path]):
            if ref is None:  # (an expert no token reached)
                assert g is None or not g.any(), path
            else:
                assert (g - ref).abs().max() <= 1e-5 * ref.abs().max().clamp_min(1e-12), path


def test_grouped_expert_lora_plans_are_kept_until_the_layout_or_the_adapters_change(monkeypatch):
    """The plans of grouped expert LoRA (lora_moe.ExpertRouting) and their column tables are
    made by the first forward and kept by the next, whatever the routing; after the batch's
    adapters change places or one is detached or attached, a forward equals a fresh model's."""
    import mlora.lora_moe as lora_moe
    import mlora.models.moe as moe

    monkeypatch.setattr(moe, "GROUPED_EXPERTS", True)
    torch.manual_seed(0)
    base = llama.CausalLM(llama.args_from_hf_config(dict(
        model_type="mixtral", vocab_size=400, hidden_size=64, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2))).requires_grad_(False)
    mlp = ["gate_proj", "up_proj", "down_proj"]
    specs = {"e1": (4, ["q_proj", *mlp]), "e2": (8, mlp)}
    both = [AdapterRows("e1", 0, 2), AdapterRows("e2", 2, B)]
    ids, mask, _ = _inputs(7)
    other_ids = _inputs(8)[0]  # (another routing)

    def fresh(specs, rows, ids=ids):
        model, layout, _ = _mlora_with_adapters(base, specs)
        layout.rows = rows
        return model(ids, mask)

    made = []  # a plan (ExpertRouting) or a table (operands: columns): what must not be made again
    plan_init, columns = lora_moe._ExpertLoRAPlan.__init__, lora_moe._ExpertLoRAPlan.columns
    monkeypatch.setattr(lora_moe._ExpertLoRAPlan, "__init__", lambda p, *a: made.append(p) or plan_init(p, *a))
    monkeypatch.setattr(lora_moe._ExpertLoRAPlan, "columns", lambda p, dtype: made.append(p) or columns(p, dtype))
    model, layout, adapters = _mlora_with_adapters(base, specs)
    wrappers = inject_lora(model, layout)  # (the wrappers in place)
    layout.rows = both
    with torch.no_grad():
        first = model(ids, mask)
        assert made
        made.clear()
        assert torch.equal(model(ids, mask), first)
        rerouted = model(other_ids, mask)
        assert not made
        assert torch.equal(rerouted, fresh(specs, both, other_ids))
        adapters["e2"].detach_from(wrappers)  # (after a forward of the same layout: the same names)
        detached = model(ids, mask)
        assert torch.equal(detached, fresh({"e1": specs["e1"]}, both)) and not torch.equal(detached, first)
        again = Adapter(adapters["e2"].cfg, wrappers, 1, torch.device("cpu"), naming=naming_for("mixtral"))
        for path, w in again.weights.items():
            w.lora_A.copy_(adapters["e2"].weights[path].lora_A)
            w.lora_B.copy_(adapters["e2"].weights[path].lora_B)
        assert torch.equal(model(ids, mask), first)
        # e2 out of the batch; then the adapters in the other order (their indices in the plans swap)
        for rows in ([AdapterRows("e1", 0, B)], [AdapterRows("e2", 0, 1), AdapterRows("e1", 1, 3)]):
            layout.rows = rows
            assert torch.equal(model(ids, mask), fresh(specs, rows)), rows
