"""A PEFT LoRA adapter mlora did not write (init_from, eval and generate on <output_dir>/<name>):
every field of PEFT's LoraConfig that changes what the adapter computes on the base is either
honoured (mlora's logits equal PEFT's) or refused with one line naming the file and the field;
none is read as plain LoRA where PEFT runs something else. (r, lora_alpha, use_rslora, DoRA,
the init_lora_weights that change the base, rank_pattern and alpha_pattern: test_train.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from mlora.errors import UserError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INPUT_IDS = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))  # [batch, seq]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 2-layer LLaMA with a bias on every projection: what PEFT's bias="all" / "lora_only" train."""
    return make_tiny_model(tmp_path_factory.mktemp("biased_llama"), "llama", attention_bias=True, mlp_bias=True)


def peft_adapter(base: Path, directory: Path, written: dict | None = None, **fields) -> Path:
    """Save a PEFT adapter of `fields` on `base` (r=4, alpha=8 on TARGETS unless given), every
    trainable tensor of it random (a bias, an embedding's rows, a copied module: not as the base's).
    written: fields put into its adapter_config.json afterwards (ones PEFT does not save as given)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fields = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **fields}
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**fields))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    if written:
        saved = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**saved, **written}))
    return directory


def mlora_logits(base: Path, directory: Path, targets=TARGETS) -> torch.Tensor:
    """The logits [batch, seq, vocab] of `base` with the adapter in `directory` loaded as eval loads it."""
    from mlora.adapter import Adapter
    from mlora.config import AdapterConfig
    from mlora.loader import load_model
    from mlora.lora import AdapterRows, BatchLayout, inject_lora

    model = load_model(base, torch.device("cpu"), torch.float32)
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    Adapter(AdapterConfig(name="x", data="", r=4, alpha=8, target_modules=targets), wrappers, 0,
            torch.device("cpu")).load_peft(directory, label="adapter")
    layout.rows = [AdapterRows("x", 0, INPUT_IDS.shape[0])]
    model.eval()
    with torch.no_grad():
        return model(INPUT_IDS)


# fan_in_fan_out: PEFT resets it on nn.Linear (and saves false: written into the file, as an adapter
# of GPT-2's Conv1D layers or a hand-written config has it); lora_dropout: off at inference; use_qalora: on GPTQ
# layers only; ensure_weight_tying: ties nothing an adapter mlora loads can hold; target_parameters
# on a Linear's weight: the same LoRA as on the module, under the same names
@pytest.mark.parametrize("fields", [
    dict(lora_dropout=0.3, use_qalora=True, ensure_weight_tying=True, written={"fan_in_fan_out": True}),
    dict(target_modules=TARGETS[1:], target_parameters=["self_attn.q_proj.weight"])], ids=["plain", "parameter"])
def test_fields_peft_runs_as_plain_lora_give_peft_logits(base, tmp_path, fields):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    directory = peft_adapter(base, tmp_path / "a", **fields)
    saved = json.loads((directory / "adapter_config.json").read_text())
    assert all(saved[key] == value for key, value in {**fields, **fields.get("written", {})}.items()
               if key not in ("written", "target_modules"))  # (the file holds the fields; a set of targets)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           directory).eval()
    with torch.no_grad():
        expected = peft_model(INPUT_IDS).logits
        with peft_model.disable_adapter():
            bare = peft_model(INPUT_IDS).logits
    assert (mlora_logits(base, directory) - expected).abs().max().item() < 1e-4
    assert (bare - expected).abs().max().item() > 1e-2  # (the adapter matters)


def _refused_cases():
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig

    config, weights = "adapter_config.json: ", "adapter_model.safetensors: "
    return {  # id: (PEFT's fields, what the one line says)
        "bias_all": (dict(bias="all", target_modules=["q_proj"]), weights + "tensor base_model.model.model.layers.0."
                     "mlp.down_proj.bias is a trained bias of the base model (its bias is 'all')"),
        "bias_lora_only": (dict(bias="lora_only"), "down_proj.base_layer.bias is a trained bias of the base model "
                           "(its bias is 'lora_only')"),
        "lora_bias": (dict(lora_bias=True), config + "lora_bias is set"),
        "modules_to_save": (dict(modules_to_save=["lm_head"]), config + "modules_to_save is set"),
        "trainable_tokens": (dict(trainable_token_indices=[5, 7]), config + "trainable_token_indices is set"),
        "layers_to_transform": (dict(layers_to_transform=[1]), "layers.0.mlp.down_proj.lora_A.weight is missing "
                                "(its layers_to_transform left it out"),
        "exclude_modules": (dict(exclude_modules=["q_proj"]), "layers.0.self_attn.q_proj.lora_A.weight is missing "
                            "(its exclude_modules left it out"),
        # (the same tensors as a plain adapter's: read silently before)
        "layer_replication": (dict(layer_replication=[[1, 2], [0, 1]]), config + "layer_replication is set"),
        "alora": (dict(alora_invocation_tokens=[5, 6]), config + "alora_invocation_tokens is set"),
        "bdlora": (dict(use_bdlora=BdLoraConfig(target_modules_bd_a=["q_proj"], nblocks=2, match_strict=False)),
                   config + "use_bdlora is set"),
        "kasa": (dict(kasa_config=KasaConfig()), config + "kasa_config is set"),
        "velora": (dict(velora_config=VeloraConfig()), config + "velora_config is set"),
        "monteclora": (dict(monteclora_config=MontecloraConfig()), config + "monteclora_config is set"),
        # (Arrow's router is made from several adapters, not by get_peft_model: its field on a plain one)
        "arrow": (dict(written={"arrow_config": {"top_k": 2}}), config + "arrow_config is set"),
    }


@pytest.mark.parametrize("case", list(_refused_cases()))
def test_fields_peft_runs_otherwise_are_refused_in_one_line(base, tmp_path, case):
    fields, fragment = _refused_cases()[case]
    directory = peft_adapter(base, tmp_path / "a", **fields)
    with pytest.raises(UserError) as err:
        mlora_logits(base, directory)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and fragment in message, message
    if fragment.startswith("adapter_"):
        assert message.startswith(f"{directory}/{fragment}"), message


@pytest.mark.parametrize("case", ["extra", "missing", "shape"])
def test_tensors_no_field_explains_are_refused_in_one_line(base, tmp_path, case):
    """A tensor of a module mlora's adapter does not target, one it targets and the file lacks,
    and one of another shape (an adapter of another base) are each one line naming it."""
    from safetensors.torch import load_file, save_file

    directory = peft_adapter(base, tmp_path / "a", target_modules=TARGETS[1:])
    SAVED = "down_proj, gate_proj, k_proj, o_proj, up_proj, v_proj"  # TARGETS[1:], sorted  # noqa: N806
    targets, fragment = {
        # (both sides' target_modules named: an adapter trained under a config changed since)
        "extra": (TARGETS[1:-1], "unexpected tensor base_model.model.model.layers.0.mlp.down_proj.lora_A.weight "
                                 f"(the adapter's target_modules must match: its adapter_config.json has {SAVED}, "
                                 "adapter 'x' has gate_proj, k_proj, o_proj, up_proj, v_proj in the config)"),
        "missing": (TARGETS, "tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight is missing "
                             f"(the adapter's target_modules must match: its adapter_config.json has {SAVED}, "
                             "adapter 'x' has down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj in the "
                             "config)"),
        "shape": (TARGETS[1:], "tensor base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight has shape "
                               "(4, 32), expected (4, 64)")}[case]
    if case == "shape":
        tensors = load_file(directory / "adapter_model.safetensors")
        name = "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"
        tensors[name] = tensors[name][:, :32].contiguous()  # [r, in]: as on a base half as wide
        save_file(tensors, directory / "adapter_model.safetensors")
    with pytest.raises(UserError) as err:
        mlora_logits(base, directory, targets)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"adapter {directory}:") and fragment in message
