"""PEFT's pickled adapter_model.bin: what mlora reads of it, what it refuses in one line, and
the digest pipeline ranks compare it by. Reading through eval, generate and init_from against
PEFT: tests/test_train.py."""

from __future__ import annotations

import collections

import pytest
import torch
from safetensors.torch import save_file

from mlora.adapter import adapter_files_digest, read_peft_weights
from mlora.errors import UserError
from mlora.pickled_weights import read_pickled_weights

NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_a_state_dict_of_parameters_reads_as_its_tensors(tmp_path):
    """A state dict saved whole (an OrderedDict of Parameters; the legacy non-zip format too)
    reads as the plain tensors PEFT's get_peft_model_state_dict would have saved."""
    path = tmp_path / "adapter_model.bin"
    value = torch.arange(6.0).reshape(2, 3)
    for zipped in (True, False):
        torch.save(collections.OrderedDict({NAME: torch.nn.Parameter(value.clone())}), path,
                   _use_new_zipfile_serialization=zipped)
        read = read_pickled_weights(path)
        assert list(read) == [NAME] and type(read[NAME]) is torch.Tensor and torch.equal(read[NAME], value)


@pytest.mark.parametrize("held, fragment", [
    ([torch.ones(2)], "holds a list, not PEFT's dict"),
    ({0: torch.ones(2)}, "holds the key 0, not a tensor name"),
    ({NAME: 1.5}, f"{NAME!r} holds a float, not a tensor"),
    ({NAME: torch.eye(2).to_sparse()}, f"tensor {NAME} is a torch.sparse_coo tensor, not a dense tensor"),
    ({NAME: torch.ones(2, device="meta")}, f"tensor {NAME} is a meta tensor (no values)"),
    ({NAME: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}, f"tensor {NAME} is a nested tensor"),
    ({NAME: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)}, f"tensor {NAME} is a quantized tensor"),
])
def test_anything_but_a_flat_dict_of_tensors_is_one_line(tmp_path, held, fragment):
    path = tmp_path / "adapter_model.bin"
    torch.save(held, path)
    with pytest.raises(UserError) as err:
        read_pickled_weights(path)
    assert str(err.value).startswith(f"{path}: {fragment}") and "\n" not in str(err.value)


def test_an_empty_file_is_one_line(tmp_path):
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"adapter_model.bin: cannot read \(it ends too early\)$"):
        read_pickled_weights(path)


def test_safetensors_win_over_the_bin_in_reading_and_in_the_digest(tmp_path):
    """A directory with both files is read, and compared between pipeline ranks, by its
    safetensors; one with only a .bin by that .bin (its digest hashed a missing file's error,
    the same for any two .bin adapters)."""
    (tmp_path / "adapter_config.json").write_text("{}")
    torch.save({NAME: torch.zeros(2, 3)}, tmp_path / "adapter_model.bin")
    only_bin = adapter_files_digest(tmp_path)
    assert torch.equal(read_peft_weights(tmp_path)[NAME], torch.zeros(2, 3))
    torch.save({NAME: torch.ones(2, 3)}, tmp_path / "adapter_model.bin")
    assert adapter_files_digest(tmp_path) != only_bin
    save_file({NAME: torch.full((2, 3), 2.0)}, tmp_path / "adapter_model.safetensors")
    with_both = adapter_files_digest(tmp_path)
    assert torch.equal(read_peft_weights(tmp_path)[NAME], torch.full((2, 3), 2.0))
    torch.save({NAME: torch.zeros(2, 3)}, tmp_path / "adapter_model.bin")
    assert adapter_files_digest(tmp_path) == with_both


def test_a_directory_with_neither_file_names_both(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"no adapter_model.safetensors \(nor adapter_model.bin\)$"):
        read_peft_weights(tmp_path)
