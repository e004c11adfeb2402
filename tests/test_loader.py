"""Checkpoint loading: shards, per-stage reads, frozen params, and one-line UserErrors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import make_tiny_model
from mlora.device import resolve_device, resolve_dtype
from mlora.errors import UserError
from mlora.loader import load_model, read_model_config, weight_index
from mlora.models import llama


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tied"), "llama", tie_word_embeddings=True)


@pytest.fixture
def read_spy(monkeypatch):
    """Records every tensor name the loader actually pulls out of a safetensors file."""
    import safetensors

    real_open, read = safetensors.safe_open, []

    class Spy:
        def __init__(self, *a, **kw):
            self._f = real_open(*a, **kw)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, name):
            read.append(name)
            return self._f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    return read


def test_sharded_checkpoint_loads(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny_llama)).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    index = weight_index(sharded)
    assert len(set(index.values())) > 1
    ids = torch.randint(3, 400, (2, 7))
    with torch.no_grad():
        a = load_model(sharded, "cpu", torch.float32)(ids)
        b = load_model(tiny_llama, "cpu", torch.float32)(ids)
    assert torch.equal(a, b)


def test_unused_tensors_whose_shape_cannot_be_read_are_warned_of(tiny_llama, tmp_path, capsys):
    """The check that spares tensors of no elements the "unused" warning reads their shapes from
    the shards' headers: an index that lists a tensor its shard lacks, or an unused shard whose
    header is damaged, is warned of as before that check (the load reads neither), not a
    traceback from safetensors."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny_llama)).save_pretrained(sharded, max_shard_size="100KB")
    source = sharded / "model.safetensors.index.json"
    index = json.loads(source.read_text())
    shard = index["weight_map"]["model.embed_tokens.weight"]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard  # (not in that shard)
    (sharded / "unused.safetensors").write_bytes(b"\xff" * 64)  # a header no reader takes
    index["weight_map"]["model.layers.9.mlp.down_proj.weight"] = "unused.safetensors"
    source.write_text(json.dumps(index))
    capsys.readouterr()
    load_model(sharded, "cpu", torch.float32)
    assert ("config.json leaves tensor 'model.layers.9.mlp.down_proj.weight' and 1 more of the checkpoint unused"
            in capsys.readouterr().err)


@pytest.mark.parametrize("parts", [None, ["embed", "layer.0"], ["layer.1"], ["layer.1", "norm", "head"]])
def test_stage_reads_exactly_its_tensors(tiny_llama, read_spy, parts):
    model = load_model(tiny_llama, "cpu", torch.float32, parts=parts)
    _, args = read_model_config(tiny_llama)
    expected = sorted(llama.tensor_names(args, parts))
    assert model.loaded_tensor_names == expected
    assert sorted(read_spy) == expected  # each read once, nothing else touched
    assert sorted(model.state_dict()) == expected
    if parts == ["layer.1"]:
        assert list(model.model.layers) == ["1"]
        assert not hasattr(model.model, "embed_tokens") and not hasattr(model, "lm_head")


def test_head_only_stage_of_tied_model(tied_llama, read_spy):
    from safetensors import safe_open

    with safe_open(str(tied_llama / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # transformers drops the tied copy
        embed = f.get_tensor("model.embed_tokens.weight")
    read_spy.clear()
    head = load_model(tied_llama, "cpu", torch.float32, parts=["head"])
    assert head.loaded_tensor_names == ["model.embed_tokens.weight"] == read_spy
    assert list(head.state_dict()) == ["lm_head.weight"]
    assert torch.equal(head.lm_head.weight, embed)
    whole = load_model(tied_llama, "cpu", torch.float32)
    assert whole.lm_head.weight is whole.model.embed_tokens.weight  # shared, read once
    assert whole.loaded_tensor_names.count("model.embed_tokens.weight") == 1


def test_params_frozen_on_requested_device_and_dtype(tiny_llama):
    model = load_model(tiny_llama, resolve_device("cpu"), torch.bfloat16)
    params = list(model.named_parameters())
    assert params
    for name, p in params:
        assert not p.requires_grad, name
        assert p.dtype == torch.bfloat16 and p.device == torch.device("cpu"), name
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert not model.training


def _copy_config(src, dst, **edits):
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(edits)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_config_transformers_rejects_is_one_line(tmp_path):
    """transformers' validation errors span two lines (the validator, then the cause)."""
    from conftest import make_tiny_model

    d = make_tiny_model(tmp_path / "g", "gemma3_text")
    cfg = json.loads((d / "config.json").read_text())
    cfg["layer_types"] = ["full_attention"]  # 2 layers
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as info:
        read_model_config(d)
    assert "\n" not in str(info.value) and "layer_types" in str(info.value)


def test_missing_dir(tmp_path):
    with pytest.raises(UserError, match="nope"):
        load_model(tmp_path / "nope", "cpu", torch.float32)


def test_missing_config(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_model(tmp_path, "cpu", torch.float32)


def test_no_weights(tiny_llama, tmp_path):
    d = _copy_config(tiny_llama, tmp_path / "m")
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(d, "cpu", torch.float32)


def test_bin_only_points_to_converter(tiny_llama, tmp_path):
    d = _copy_config(tiny_llama, tmp_path / "m")
    (d / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(UserError, match="scripts/trans_to_safetensors.py"):
        load_model(d, "cpu", torch.float32)


@pytest.mark.parametrize("model_type", ["gpt2", "no_such_arch"])
def test_unsupported_model_type(tiny_llama, tmp_path, model_type):
    d = _copy_config(tiny_llama, tmp_path / "m", model_type=model_type)
    shutil.copy(tiny_llama / "model.safetensors", d)
    with pytest.raises(UserError, match=model_type):
        load_model(d, "cpu", torch.float32)


def test_missing_tensor_named(tiny_llama, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = _copy_config(tiny_llama, tmp_path / "m")
    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors"):
        load_model(d, "cpu", torch.float32)
    # a stage that does not need it loads fine
    assert load_model(d, "cpu", torch.float32, parts=["embed", "layer.0"]).loaded_tensor_names


def test_missing_shard_named(tiny_llama, tmp_path):
    d = _copy_config(tiny_llama, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="model-00001-of-00002.safetensors"):
        load_model(d, "cpu", torch.float32)


@pytest.mark.parametrize("shard,message", [("../elsewhere.safetensors", "not a file name inside"),
                                           ("/abs/model.safetensors", "not a file name inside"),
                                           (3, "must map names to files")])
def test_index_shards_must_be_files_of_the_model_directory(tiny_llama, tmp_path, shard, message):
    d = _copy_config(tiny_llama, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}))
    with pytest.raises(UserError, match=message):
        load_model(d, "cpu", torch.float32)


@pytest.mark.parametrize("spec", ["cuda:99", "nonsense", "meta"])
def test_bad_device(spec):
    with pytest.raises(UserError, match=f"device '{spec}' is not available"):
        resolve_device(spec)


def test_mps_unavailable():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(UserError, match="'mps' is not available"):
        resolve_device("mps")


def test_cuda_unavailable():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="'cuda' is not available"):
        resolve_device("cuda")


def fake_gpu(monkeypatch, major: int, minor: int = 0, name: str = "a GPU", arch: str | None = None) -> None:
    """torch.cuda answers as a GPU of compute capability major.minor (no GPU needed); with
    `arch`, as a ROCm GPU of that gcnArchName."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "hip", None if arch is None else "6.4")
    props = SimpleNamespace(major=major, minor=minor, gcnArchName=arch)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_device_and_dtype_defaults(monkeypatch):
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(None) == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(torch.device("cpu"), None) == torch.float32
    fake_gpu(monkeypatch, 8)  # Ampere on: bf16
    assert resolve_dtype(torch.device("cuda", 0), None) == torch.bfloat16
    fake_gpu(monkeypatch, 7, 5)  # a T4: fp16 (its loss scaled), not bf16 torch would emulate
    assert resolve_dtype(torch.device("cuda", 1), None) == torch.float16
    for name, dtype in [("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
                        ("bfloat16", torch.bfloat16), ("fp16", torch.float16), ("float16", torch.float16)]:
        assert resolve_dtype(torch.device("cpu"), name) == dtype


@pytest.mark.parametrize("name", ["int8", "fp8", "double"])
def test_bad_dtype(name):
    with pytest.raises(UserError, match=name):
        resolve_dtype(torch.device("cpu"), name)


def test_checkpoint_tensors_the_config_leaves_unused_are_reported(tmp_path, capsys):
    """A ChatGLM config without add_qkv_bias (ChatGLMConfig's default: none) beside weights that
    have the biases, or a config with fewer layers than the file: the run would train another
    model than the checkpoint's, so a warning names a tensor left unused; known extras (a saved
    RoPE table, Gemma 3's vision tower) are not reported."""
    import json

    from conftest import make_tiny_model

    glm = make_tiny_model(tmp_path / "glm", "chatglm")
    capsys.readouterr()
    load_model(glm, "cpu", torch.float32)  # its transformer.rotary_pos_emb.inv_freq is expected
    assert capsys.readouterr().err == ""
    raw = json.loads((glm / "config.json").read_text())
    (glm / "config.json").write_text(json.dumps(dict(raw, add_qkv_bias=False)))
    load_model(glm, "cpu", torch.float32)
    err = capsys.readouterr().err
    assert "warning" in err and "'transformer.encoder.layers.0.self_attention.query_key_value.bias' and 1 more" in err
    gemma3 = make_tiny_model(tmp_path / "gemma3", "gemma3")
    capsys.readouterr()
    load_model(gemma3, "cpu", torch.float32, parts=["embed", "layer.0"])
    assert capsys.readouterr().err == ""


def test_how_chatglm_applies_rope_ratio_is_read_from_its_code(tmp_path):
    """ChatGLM2 divides the positions by rope_ratio, ChatGLM3 / GLM-4 multiply the base: the
    model's own modeling_chatglm.py says which (read as text); code with both, or neither, is
    not guessed from."""
    from mlora.loader import _chatglm_rope_ratio_scales

    code = tmp_path / "modeling_chatglm.py"
    assert _chatglm_rope_ratio_scales(tmp_path) is None
    for text, expected in (("seq_idx = torch.arange(seq_len) / self.rope_ratio", "positions"),
                           ("base = base * self.rope_ratio", "base"), ("base = self.rope_ratio * base", "base"),
                           ("x = seq / self.rope_ratio\nbase = base * self.rope_ratio", None), ("pass", None)):
        code.write_text(text)
        assert _chatglm_rope_ratio_scales(tmp_path) == expected, text


def test_a_value_transformers_lets_through_but_mlora_cannot_use_is_one_error(tmp_path):
    """transformers only warns about a YaRN factor that is not a number; reading it into mlora's
    arguments fails, as a UserError naming config.json (was a traceback)."""
    import json

    from conftest import make_tiny_model
    from mlora.errors import UserError
    from mlora.loader import read_model_config

    base = make_tiny_model(tmp_path / "olmo2", "olmo2")
    raw = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(raw, rope_parameters=dict(rope_type="yarn", factor="x",
                                                                                 rope_theta=1e4))))
    with pytest.raises(UserError, match=r"cannot read .*config.json: ValueError: could not convert string to float"):
        read_model_config(base)


def test_slow_dtypes_are_noted(monkeypatch):
    """fp16 on the CPU and bf16 on a GPU without bf16 matrix math get a one-line note; the
    defaults and fast choices none."""
    from mlora.device import dtype_note

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert "fp16 on the CPU is slow" in dtype_note(cpu, torch.float16)
    assert dtype_note(cpu, torch.float32) is None and dtype_note(cpu, torch.bfloat16) is None
    fake_gpu(monkeypatch, 7, 0, "Tesla V100-SXM2-32GB")
    assert dtype_note(gpu, torch.bfloat16).startswith("Tesla V100-SXM2-32GB (compute capability 7.0) has no bf16")
    assert dtype_note(gpu, torch.float16) is None and dtype_note(gpu, torch.float32) is None
    fake_gpu(monkeypatch, 9)
    assert dtype_note(gpu, torch.bfloat16) is None


@pytest.mark.parametrize("arch, native", [("gfx906:sramecc+:xnack-", False), ("gfx1030", False),
                                          ("gfx908:sramecc+:xnack-", True), ("gfx90a:sramecc+:xnack-", True),
                                          ("gfx942:sramecc+:xnack-", True), ("gfx1100", True), ("", True)])
def test_rocm_gpus_without_bf16_matrix_math_default_to_fp16(monkeypatch, arch, native):
    """ROCm GPUs before MI100 (MI50/MI60: gfx906) and RDNA 2 emulate bf16, as a V100 does
    (torch.cuda.is_bf16_supported says yes to every ROCm GPU); an architecture torch does not
    name counts as recent."""
    from mlora.device import dtype_note

    fake_gpu(monkeypatch, 9, 0, "AMD Instinct MI60", arch=arch)
    gpu = torch.device("cuda", 0)
    assert resolve_dtype(gpu, None) == (torch.bfloat16 if native else torch.float16)
    note = dtype_note(gpu, torch.bfloat16, flag="--compute_dtype")
    assert note is None if native else note.startswith(f"AMD Instinct MI60 ({arch.split(':')[0]}) has no bf16")
    assert native or "--compute_dtype fp16" in note
