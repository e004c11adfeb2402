"""GPT-OSS: attention sinks, its router and clamped GLU experts, a checkpoint that stacks the
experts (and stores them in MXFP4), and LoRA on the stacked experts in PEFT's format.

The fp32 logits are checked with the other families in test_model.py (CASES "gpt_oss*"); here:
bf16 against transformers' fp32 (DeepSeek-V3's too: the same kind of check), MXFP4 checkpoints against
transformers' own dequantization, and every LoRA gradient against PEFT's target_parameters on transformers' model.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model
from mlora.loader import load_model
from mlora.lora import AdapterRows
from mlora.models import mxfp4
from test_moe import B, _inputs, _mlora_with_adapters, assert_grads_equal, backward_against_peft

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL6 = [*ATTN, "gate_up_proj", "down_proj"]


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "deepseek_v2"])
def test_bf16_is_as_close_to_fp32_as_transformers_bf16(tmp_path, family):
    """transformers' GPT-OSS attention takes its softmax in bf16 (eager, with the sinks), and its
    DeepSeek-V3 one runs SDPA's plain-math path (values narrower than keys); mlora's runs SDPA's
    kernels, which accumulate in fp32. So mlora's bf16 logits cannot equal transformers' bf16
    ones; they stay about as close to the fp32 model as transformers' (within 25%: bf16 noise
    and the routers' near-ties)."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path, family, hidden_size=72, num_hidden_layers=3)
    ours = load_model(path, "cpu", torch.bfloat16)
    ref16 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    ref32 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.randint(3, 400, (B, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, 16, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, :4] = 0
    with torch.no_grad():
        exact = ref32(input_ids=ids, attention_mask=mask).logits
        ours_err = (ours(ids, mask).float() - exact).abs()[mask.bool()]
        hf_err = (ref16(input_ids=ids, attention_mask=mask).logits.float() - exact).abs()[mask.bool()]
    # (each within bf16's noise of the fp32 model: the larger errors are near-ties of the routers)
    assert ours_err.max() <= 1.25 * hf_err.max() and ours_err.mean() <= 1.25 * hf_err.mean()


def test_mxfp4_dequantization_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), generator=gen, dtype=torch.uint8)  # [E, out, in/32, 16]
    scales = torch.randint(110, 135, (3, 8, 2), generator=gen, dtype=torch.uint8)
    ours = mxfp4.dequantize(blocks, scales, torch.bfloat16)  # [E, out, in]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, in, out]
    assert torch.equal(ours, theirs.transpose(1, 2))
    # mxfp4_quantize writes what dequantize() reads: values on the grid come back exactly
    assert torch.equal(mxfp4.dequantize(*mxfp4_quantize(ours.float()), torch.bfloat16), ours)
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(blocks, scales[..., :1], torch.float32)


def mxfp4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., n * 32] -> (blocks, scales) in MXFP4, rounding each value to the nearest E2M1
    value times its block's power of two (the block's largest magnitude scaled to at most 6): a
    checkpoint in the released models' format from any weights."""
    w = weight.float().unflatten(-1, (-1, mxfp4.BLOCK))  # [..., G, 32]
    peak = w.abs().amax(dim=-1).clamp_min(2.0 ** -126)  # [..., G]
    exponent = torch.ceil(torch.log2(peak / 6.0)).clamp(-mxfp4.SCALE_BIAS, 127)  # 6 * 2^e >= peak
    scaled = w / torch.exp2(exponent)[..., None]  # [..., G, 32] within [-6, 6]
    lut = torch.tensor(mxfp4.E2M1_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(dim=-1).to(torch.uint8)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., G, 16]
    return blocks.contiguous(), (exponent + mxfp4.SCALE_BIAS).to(torch.uint8)


def _as_mxfp4_checkpoint(path, out):
    """The tiny model's checkpoint with its stacked expert weights in MXFP4, as the released
    gpt-oss checkpoints store them (biases stay as they are); returns the weights transformers
    dequantizes them to, in its stacked [E, in, out] layout."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = load_file(path / "model.safetensors")
    dequantized = {}
    for name in [n for n in tensors if re.fullmatch(r".*\.experts\.(gate_up_proj|down_proj)", n)]:
        blocks, scales = mxfp4_quantize(tensors.pop(name).transpose(1, 2))  # stored [E, out, in]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        dequantized[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((path / "config.json").read_text())
    return dequantized


def test_an_mxfp4_checkpoint_loads_as_transformers_dequantizes_it(tmp_path, capsys):
    """The released checkpoints' format: mlora's logits equal transformers' GptOssForCausalLM
    holding the experts transformers' own MXFP4 code dequantizes, and no tensor is unused."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / "full", "gpt_oss", intermediate_size=64)  # (blocks of 32 inputs)
    dequantized = _as_mxfp4_checkpoint(path, tmp_path / "mxfp4")
    ours = load_model(tmp_path / "mxfp4", "cpu", torch.float32)
    assert "unused" not in capsys.readouterr().err
    assert any(name.endswith("gate_up_proj_blocks") for name in ours.loaded_tensor_names)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in dequantized.items():
            ref.get_parameter(name).copy_(weight)
    ids, mask, _ = _inputs()
    with torch.no_grad():
        diff = (ours(ids, mask) - ref(input_ids=ids, attention_mask=mask).logits).abs()[mask.bool()]
    assert diff.max() < 1e-4
    # a pipeline stage reads its own layers' blocks and scales only
    stage = load_model(tmp_path / "mxfp4", "cpu", torch.float32, parts=["layer.1", "norm", "head"])
    assert {re.search(r"layers\.(\d+)", n)[1] for n in stage.loaded_tensor_names if "layers." in n} == {"1"}


def _peft_grads(peft_model, E: int, r: int, stacked: list[str], experts: str = "mlp.experts",
                naming=None, swapped: bool = False) -> dict[str, torch.Tensor]:
    """PEFT's LoRA gradients under mlora's module paths. A stacked LoRA (ParamWrapper:
    peft.tuners.lora.layer.get_delta_factors) keeps expert e's A as rows e*r..(e+1)*r of its
    A [E r, in] and its B as columns j*E + e of its B [out, r E]; with both parameters
    targeted, gate_up_proj's wrapper is the inner one (`experts.base_layer`). experts: where a
    layer holds them (Gemma 4 26B-A4B: beside its dense MLP, as `experts`). naming: the family's
    (its other modules' paths translated to mlora's: Llama 4's feed_forward); swapped: PEFT's
    A of an expert is mlora's B transposed and its B mlora's A transposed (Llama 4's:
    stacked_lora.SWAPPED)."""
    out = {}
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        layer = re.search(r"layers\.(\d+)\.", name)[1]
        kind = re.search(r"(lora_[AB])\.", name)[1]
        if ".experts." not in name:
            if naming is not None:
                out[f"{naming.from_module(re.search(r'base_model[.]model[.](.+)[.]lora_', name)[1])}.{kind}"] = p.grad
                continue
            module = re.search(r"((self_attn|mlp)\.\w+)\.lora_", name)[1]
            out[f"model.layers.{layer}.{module}.{kind}"] = p.grad
            continue
        proj = stacked[0] if len(stacked) == 1 else "gate_up_proj" if ".experts.base_layer." in name else "down_proj"
        for e in range(E):
            g = p.grad.view(E, r, -1)[e] if kind == "lora_A" else p.grad.view(p.shape[0], r, E)[:, :, e]
            if swapped:
                out[f"model.layers.{layer}.{experts}.{e}.{proj}.{'lora_B' if kind == 'lora_A' else 'lora_A'}"] = g.t()
            else:
                out[f"model.layers.{layer}.{experts}.{e}.{proj}.{kind}"] = g
    return out


def peft_made_adapter(base, target_modules: list[str], target_parameters: list[str], out):
    """PEFT's LoRA (r 4, alpha 8) on transformers' model of `base`, its weights random (not
    PEFT's zero B), saved to `out` (as adapter "default", under the plain keys): the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(
        r=4, lora_alpha=8, target_modules=target_modules, target_parameters=target_parameters))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(out)
    return peft_model


@pytest.mark.parametrize("targets", [ALL6, [*ATTN, "down_proj"], ["q_proj", "gate_up_proj"],
                                     ["gate_up_proj", "down_proj"]],
                         ids=["all", "down_only", "gate_up_only", "experts_only"])
def test_expert_lora_gradients_equal_peft(tmp_path, targets):
    """mlora's adapter, saved with the experts' LoRA stacked (target_parameters), loads in PEFT
    on transformers' GptOssForCausalLM with mlora's logits, and every A and B gets PEFT's
    gradient; loading it back into mlora gives the same weights."""
    base = make_tiny_model(tmp_path / "base", "gpt_oss")
    r = 4
    model, layout, adapters = _mlora_with_adapters(base, {"x": (r, targets)})
    adapter = adapters["x"]
    adapter.save(tmp_path / "x", str(base))
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    stacked = [p for p in ("gate_up_proj", "down_proj") if p in targets]
    assert config.get("target_parameters", []) == [f"mlp.experts.{p}" for p in stacked]
    assert config["target_modules"] == [t for t in targets if t in ATTN]
    peft_model = backward_against_peft(model, layout, base, tmp_path / "x")
    expected = _peft_grads(peft_model, model.args.num_experts, r, stacked)
    assert_grads_equal(adapter, expected)

    # and back: a fresh adapter loading the directory holds the same weights
    _, _, fresh = _mlora_with_adapters(base, {"x": (r, targets)})
    fresh["x"].load_peft(tmp_path / "x")
    for path, w in adapter.weights.items():
        assert torch.equal(fresh["x"].weights[path].lora_A, w.lora_A.detach()), path
        assert torch.equal(fresh["x"].weights[path].lora_B, w.lora_B.detach()), path


def test_a_damaged_mxfp4_checkpoint_is_one_line(tmp_path, capsys):
    from mlora.errors import UserError

    path = make_tiny_model(tmp_path / "full", "gpt_oss", intermediate_size=64)
    _as_mxfp4_checkpoint(path, tmp_path / "mxfp4")
    tensors = load_file(tmp_path / "mxfp4" / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name][..., :1].contiguous()  # a scale for every other block only
    save_file(tensors, tmp_path / "mxfp4" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"down_proj_blocks: MXFP4 blocks .* do not match scales"):
        load_model(tmp_path / "mxfp4", "cpu", torch.float32)
    del tensors[name]  # blocks without scales: the scales are missing (and nothing is "unused")
    save_file(tensors, tmp_path / "mxfp4" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="tensor 'model.layers.1.mlp.experts.down_proj_scales' is missing"):
        load_model(tmp_path / "mxfp4", "cpu", torch.float32)
    assert "unused" not in capsys.readouterr().err


def test_gpt_oss_20b_weights_are_its_published_parameter_count():
    """gpt-oss-20b's config.json, read as mlora reads it: 20.9 B parameters (OpenAI's model card:
    21 B; 3.6 B active), so the memory model's weights are its bf16 bytes."""
    from mlora.memory import weight_bytes
    from mlora.models import llama

    args = llama.args_from_hf_config(dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088,
        sliding_window=128))
    assert args.sliding_window[:2] == [128, None] and args.rope.type == "yarn" and args.rope.factor == 32
    assert args.rope.theta == 150_000 and not args.rope.truncate and args.norm_weight_fp32
    params = weight_bytes(args, torch.bfloat16) / 2
    assert 20.85e9 < params < 20.95e9
    # the released config.json is in transformers 4's form: its rope_scaling and rope_theta count
    old_form = llama.args_from_hf_config(dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_local_experts=32, vocab_size=201088, rope_theta=5e4,
        rope_scaling=dict(rope_type="yarn", factor=8.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                          original_max_position_embeddings=4096)))
    assert (old_form.rope.theta, old_form.rope.factor) == (5e4, 8.0)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_experts_keep_their_biases(tmp_path, bits):
    """A 4-bit or 8-bit GPT-OSS base (from its MXFP4 form): each expert's projections become
    bitsandbytes layers that keep their biases, and the logits stay near the full-precision ones."""
    pytest.importorskip("bitsandbytes")
    from mlora.quant import QuantConfig

    path = make_tiny_model(tmp_path / "full", "gpt_oss", intermediate_size=64)
    _as_mxfp4_checkpoint(path, tmp_path / "mxfp4")
    ids, mask, _ = _inputs()
    with torch.no_grad():
        plain = load_model(tmp_path / "mxfp4", "cpu", torch.float32)
        full = plain(ids, mask)
        model = load_model(tmp_path / "mxfp4", "cpu", torch.float32, quant=QuantConfig(bits))
        expert = model.model.layers["1"].mlp.experts[3].gate_up_proj
        assert type(expert).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
        assert torch.equal(expert.bias, plain.model.layers["1"].mlp.experts[3].gate_up_proj.bias)
        diff = (model(ids, mask) - full).abs()[mask.bool()]
    # (tiny random 64-wide weights: NF4 is coarse on them; int8 close)
    assert diff.mean() < (0.5 if bits == 4 else 0.1) * full.abs()[mask.bool()].mean()


def test_an_adapter_peft_wrote_loads_in_mlora(tmp_path):
    """An adapter PEFT trained on transformers' GptOssForCausalLM (target_parameters, listed in
    the other order) loads into mlora (init_from, eval) and gives PEFT's logits."""
    base = make_tiny_model(tmp_path / "base", "gpt_oss")
    peft_model = peft_made_adapter(base, ["q_proj", "v_proj"], ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
                                   tmp_path / "x")
    model, layout, adapters = _mlora_with_adapters(base, {"x": (4, ["q_proj", "v_proj", "gate_up_proj", "down_proj"])})
    adapters["x"].load_peft(tmp_path / "x")
    ids, mask, _ = _inputs()
    layout.rows = [AdapterRows("x", 0, B)]
    model.eval()
    with torch.no_grad():
        diff = (model(ids, mask) - peft_model.eval()(input_ids=ids, attention_mask=mask).logits).abs()[mask.bool()]
    assert diff.max() < 1e-4
