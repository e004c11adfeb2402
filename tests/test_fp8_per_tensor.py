"""Per-tensor FP8 checkpoints (Mistral Small 4's and Ministral 3's releases: quantization_config
quant_method fp8, weight_block_size null): one fp32 scale per weight (`W_scale_inv`, shape ()),
per expert and half for stacked experts (`gate_up_proj_scale_inv` [E, 2, 1], `down_proj_scale_inv`
[E, 1, 1]), and with activation_scheme "static" activation scales that only FP8 matmuls use. mlora
dequantizes them at load (weight.float() * scale, as transformers' finegrained_fp8 does) to exactly
the model of the dequantized full-precision checkpoint."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import GEMMA4_MOE, make_tiny_model
from mlora.errors import UserError
from mlora.loader import load_model
from test_moe import _inputs, _stacked_checkpoint

E4M3_MAX = 448.0
_DENSE = re.compile(r".*_proj(_with_mqa)?\.weight$")  # (Mistral 4's kv_a_proj_with_mqa too)
_STACKED = re.compile(r".*\.experts\.(gate_up_proj|down_proj)$")  # (Gemma 4's: `layers.{i}.experts`, no `mlp.`)


def _quantize(tensors: dict[str, torch.Tensor], static: bool):
    """(the FP8 checkpoint's tensors, the dequantized full-precision checkpoint's): every projection
    weight in float8_e4m3fn with per-tensor scales (scale = amax / 448), stacked experts per expert
    (and gate_up_proj per half)."""
    fp8, full = dict(tensors), dict(tensors)
    for name, w in tensors.items():
        w = w.float()
        if _STACKED.match(name) and w.dim() == 3:
            E = w.shape[0]
            halves = 2 if name.endswith("gate_up_proj") else 1
            grouped = w.unflatten(1, (halves, -1))  # [E, halves, rows, cols]
            scale = (grouped.abs().amax(dim=(2, 3)) / E4M3_MAX).unsqueeze(-1)  # [E, halves, 1]
            q = (grouped / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
            fp8[name] = q.flatten(1, 2)
            fp8[name + "_scale_inv"] = scale
            full[name] = (q.float() * scale.unsqueeze(-1)).flatten(1, 2)
            if static:
                fp8[name + "_activation_scale"] = torch.ones(E)
        elif _DENSE.match(name) and w.dim() == 2:
            scale = w.abs().amax() / E4M3_MAX  # shape (), as transformers' FP8Linear holds it
            fp8[name] = (w / scale).to(torch.float8_e4m3fn)
            fp8[name + "_scale_inv"] = scale
            full[name] = fp8[name].float() * scale
            if static:
                fp8[name.removesuffix("weight") + "activation_scale"] = torch.tensor(0.05)
    assert any(t.dtype == torch.float8_e4m3fn for t in fp8.values())
    # the semantics are transformers' own: its dequantize=True op gives the same weights
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    for name, t in fp8.items():
        if t.dtype == torch.float8_e4m3fn:
            theirs = Fp8Dequantize(None)._dequantize_one(t, fp8[name + "_scale_inv"], output_dtype=torch.float32)
            assert torch.equal(theirs, full[name]), name
    return fp8, full


def _save(tensors, config: dict, out):
    from safetensors.torch import save_file

    out.mkdir()
    save_file({n: t.contiguous() for n, t in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def _fp8_pair(tmp_path, family: str, static: bool = True, block_key: bool = True):
    """(a per-tensor FP8 checkpoint of a tiny `family` model, its dequantized fp32 checkpoint).
    block_key=False: its quantization_config leaves weight_block_size out (transformers' default,
    128 x 128, which the one-element scales overrule there: it reads blocks from their shapes)."""
    from safetensors.torch import load_file

    # (mistral3_mistral4: Mistral Small 4's image-text release, model.language_model.*)
    text = dict(text_family="mistral4") if family == "mistral3_mistral4" else {}
    if family == "gemma4_moe":  # (26B-A4B's experts beside the dense MLP, which read gate_up_proj whole)
        text = dict(GEMMA4_MOE)
    base = make_tiny_model(tmp_path / "base", "mistral3" if family == "mistral3_mistral4" else
                           "gemma4_text" if family == "gemma4_moe" else family, **text)
    if family in ("mistral4", "mistral3_mistral4"):  # the experts stacked as Mistral Small 4's release stores them
        base = _stacked_checkpoint(base, tmp_path / "stacked")
    fp8, full = _quantize(load_file(base / "model.safetensors"), static)
    config = json.loads((base / "config.json").read_text())
    full_dir = _save(full, config, tmp_path / "full")
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": None,
                                     "activation_scheme": "static" if static else "dynamic",
                                     "modules_to_not_convert": ["lm_head"]}
    if not block_key:
        del config["quantization_config"]["weight_block_size"]
    return _save(fp8, config, tmp_path / "fp8"), full_dir


@pytest.mark.parametrize("family,static,block_key", [("mistral4", True, True), ("ministral3", True, True),
                                                     ("mistral", False, True), ("mistral3", True, True),
                                                     ("mistral4", False, False), ("mistral3_mistral4", True, True),
                                                     ("gemma4_moe", True, True)])
def test_a_per_tensor_fp8_checkpoint_loads_to_its_dequantized_weights(tmp_path, capsys, family, static, block_key):
    fp8_dir, full_dir = _fp8_pair(tmp_path, family, static, block_key)
    capsys.readouterr()
    ours = load_model(fp8_dir, "cpu", torch.float32)
    assert "unused" not in capsys.readouterr().err  # (the activation scales are not reported)
    ref = load_model(full_dir, "cpu", torch.float32)
    scales = [n for n in ours.loaded_tensor_names if n.endswith("_scale_inv")]
    assert scales and not any("activation_scale" in n for n in ours.loaded_tensor_names)
    if family in ("mistral4", "mistral3_mistral4", "gemma4_moe"):
        assert any(n.endswith("experts.gate_up_proj_scale_inv") for n in scales)
    state = ref.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    ids, mask, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(ours(ids, mask), ref(ids, mask))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_from_per_tensor_fp8_starts_from_the_dequantized_weights(tmp_path, bits):
    """--load_4bit / --load_8bit quantize the dequantized weights: the layers the full-precision
    checkpoint gives, stacked experts included."""
    pytest.importorskip("bitsandbytes")
    from mlora.quant import QuantConfig

    fp8_dir, full_dir = _fp8_pair(tmp_path, "mistral4")
    ids, mask, _ = _inputs()
    with torch.no_grad():
        model = load_model(fp8_dir, "cpu", torch.float32, quant=QuantConfig(bits))
        assert type(model.model.layers["1"].mlp.experts[3].up_proj).__name__ in ("Linear4bit", "Linear8bitLt")
        full = load_model(full_dir, "cpu", torch.float32, quant=QuantConfig(bits))
        assert torch.equal(model(ids, mask), full(ids, mask))


def test_a_per_tensor_fp8_scale_missing_or_of_the_wrong_shape_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    fp8_dir, _ = _fp8_pair(tmp_path, "mistral4")
    file = fp8_dir / "model.safetensors"
    tensors = load_file(file)
    dense = next(n for n in tensors if n.endswith("self_attn.o_proj.weight"))
    gate_up = next(n for n in tensors if n.endswith("mlp.experts.gate_up_proj"))
    down = next(n for n in tensors if n.endswith("mlp.experts.down_proj"))
    E = tensors[gate_up].shape[0]
    f = re.escape(str(file))
    for name, scale, message in [
            (dense, None,
             f"tensor '{re.escape(dense)}' in {f} is float8 but '{re.escape(dense)}_scale_inv' is missing"),
            (dense, torch.ones(2), f"{f}: {re.escape(dense)}_scale_inv: scale of shape \\(2,\\) is not one per-tensor"),
            (gate_up, None, f"tensor '{re.escape(gate_up)}' in {f} is float8 but '{re.escape(gate_up)}_scale_inv' "
                            "is missing"),
            (gate_up, torch.ones(E, 1, 1), f"tensor '{re.escape(gate_up)}_scale_inv' in {f} has shape "
                                           f"\\({E}, 1, 1\\) but per-tensor FP8 scales of .* are \\({E}, 2, 1\\)"),
            (down, torch.ones(E), f"tensor '{re.escape(down)}_scale_inv' in {f} has shape \\({E},\\)")]:
        changed = {n: t for n, t in tensors.items() if n != name + "_scale_inv"}
        if scale is not None:
            changed[name + "_scale_inv"] = scale
        save_file(changed, file, metadata={"format": "pt"})
        with pytest.raises(UserError, match=message) as e:
            load_model(fp8_dir, "cpu", torch.float32)
        assert "\n" not in str(e.value)
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [128]
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError,
                       match=r"weight_block_size must be two positive integers \(block-scaled FP8\) or null"):
        load_model(fp8_dir, "cpu", torch.float32)
    # One scale per tensor is read as such whatever block size the config names (transformers
    # reads the blocks from the scales' shapes): [16, 16] here loads as per-tensor
    config["quantization_config"]["weight_block_size"] = [16, 16]
    (fp8_dir / "config.json").write_text(json.dumps(config))
    load_model(fp8_dir, "cpu", torch.float32)
