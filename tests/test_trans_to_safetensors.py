"""scripts/trans_to_safetensors.py: .bin checkpoints (single, sharded, tied, untied) become
safetensors that transformers and mlora load with unchanged logits; refusals and errors are
one line and exit code 2, and a failed run leaves nothing half-written."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_model
from mlora.loader import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "trans_to_safetensors.py"
_spec = importlib.util.spec_from_file_location("trans_to_safetensors", SCRIPT)
conv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conv)

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
IDS = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(0))


def save_bin(src: Path, path: Path, shard_bytes: int | None = None, legacy: bool = False,
             edit=None) -> Path:
    """Write the model in `src` as transformers 4 did with safe_serialization=False:
    pytorch_model.bin, or pytorch_model-0000k-of-0000N.bin plus pytorch_model.bin.index.json.
    (transformers 5 writes only safetensors.) Tied weights share storage within a file."""
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True)
    for f in src.iterdir():  # config, generation config, tokenizer
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, path / f.name)
    state = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).state_dict()
    if edit:
        edit(state)
    if shard_bytes is None:
        torch.save(state, path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return path
    shards, size = [{}], 0
    for name, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        name = f"pytorch_model-{k:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, path / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """{'tied' | 'untied': safetensors source dir} and their .bin copies (read-only for tests)."""
    root = tmp_path_factory.mktemp("bins")
    out = {}
    for tied in (True, False):
        kind = "tied" if tied else "untied"
        src = make_tiny_model(root / f"{kind}-src", "llama", tokenizer_dir, seed=int(tied),
                              tie_word_embeddings=tied)
        out[kind] = src
        out[f"{kind}-bin"] = save_bin(src, root / f"{kind}-bin")
        out[f"{kind}-shards"] = save_bin(src, root / f"{kind}-shards", shard_bytes=120_000)
    # The fixtures exercise what they are meant to: storage sharing in one file, and the
    # tied pair in different shards (so no shared storage there).
    state = torch.load(out["tied-bin"] / "pytorch_model.bin", weights_only=True)
    assert state[HEAD].untyped_storage().data_ptr() == state[EMBED].untyped_storage().data_ptr()
    weight_map = json.loads((out["tied-shards"] / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert weight_map[HEAD] != weight_map[EMBED] and len(set(weight_map.values())) > 2
    return out


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = conv.main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_error(code, err, *fragments):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("trans_to_safetensors: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def hf_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()(IDS).logits


def check_loads(out: Path, reference: Path):
    """transformers gives the reference's logits; mlora agrees with transformers."""
    expected = hf_logits(reference)
    assert torch.equal(hf_logits(out), expected)
    with torch.no_grad():
        ours = load_model(out, torch.device("cpu"), torch.float32)(IDS)
    assert (ours - expected).abs().max().item() < 1e-5


def tensors_in(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        return {name: f.get_tensor(name) for name in f.keys()}


def check_index(out: Path) -> dict[str, str]:
    """The index names every shard's tensors exactly once, with transformers' file names and total size."""
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    n = len(files)
    assert n > 1 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(out.glob("model-*.safetensors")) == [out / f for f in files]
    total = 0
    for file in files:
        tensors = tensors_in(out / file)
        assert sorted(tensors) == sorted(name for name, f in weight_map.items() if f == file)
        total += sum(t.nbytes for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    return weight_map


def snapshot(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_single_file(models, kind, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--model_path", models[f"{kind}-bin"], "--output_dir", out)
    assert code == 0, err
    tensors = tensors_in(out / "model.safetensors")
    assert not (out / "model.safetensors.index.json").exists()
    # Tied: only the embedding is kept, as transformers saves it; untied: both.
    assert (HEAD in tensors) == (kind == "untied")
    assert f"verified {len(tensors)} tensors" in stdout
    source = torch.load(models[f"{kind}-bin"] / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(t, source[name]) for name, t in tensors.items())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (models[f"{kind}-bin"] / name).read_bytes()
    assert not list(out.glob(".*")), "temporary files left behind"
    check_loads(out, models[kind])


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_sharded_input(models, kind, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--model_path", models[f"{kind}-shards"], "--output_dir", out)
    assert code == 0, err
    weight_map = check_index(out)
    # One output shard per input shard (all are under 5GB) that still holds something: the
    # tied head is dropped even from another shard, which may leave that one empty.
    bin_map = json.loads((models[f"{kind}-shards"] / "pytorch_model.bin.index.json").read_text())["weight_map"]
    kept = {n: f for n, f in bin_map.items() if not (kind == "tied" and n == HEAD)}
    assert sorted(weight_map) == sorted(kept)
    assert len(set(weight_map.values())) == len(set(kept.values()))
    assert f"verified {len(weight_map)} tensors" in stdout
    check_loads(out, models[kind])


def test_single_file_split_by_max_shard_size(models, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "--model_path", models["untied-bin"], "--output_dir", out, "--max_shard_size", "100KB")
    assert code == 0, err
    weight_map = check_index(out)
    for file in set(weight_map.values()):
        tensors = tensors_in(out / file)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 100_000
    check_loads(out, models["untied"])


def test_in_place_and_legacy_format(models, tmp_path, capsys):
    """No --output_dir: safetensors land beside the .bin, which stays. The old (non-zip)
    torch.save format cannot be memory-mapped and is read the ordinary way."""
    src = save_bin(models["tied"], tmp_path / "legacy", legacy=True)
    code, _, err = run(capsys, "--model_path", src)
    assert code == 0, err
    assert (src / "pytorch_model.bin").is_file() and (src / "model.safetensors").is_file()
    check_loads(src, models["tied"])


def test_shared_storage_without_tying_is_cloned(models, tmp_path, capsys):
    """config.json does not tie, yet lm_head shares the embedding's storage: both names are
    saved (safetensors refuses shared storage, so one is a copy)."""
    def share(state):
        state[HEAD] = state[EMBED]

    src = save_bin(models["untied"], tmp_path / "bin", edit=share)
    out = tmp_path / "out"
    code, _, err = run(capsys, "--model_path", src, "--output_dir", out)
    assert code == 0, err
    tensors = tensors_in(out / "model.safetensors")
    assert torch.equal(tensors[HEAD], tensors[EMBED])
    expected = hf_logits(out)
    with torch.no_grad():
        ours = load_model(out, torch.device("cpu"), torch.float32)(IDS)
    assert (ours - expected).abs().max().item() < 1e-5


def test_refuses_to_overwrite_unless_asked(models, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "--model_path", models["untied-bin"], "--output_dir", out)[0] == 0
    before = snapshot(out)
    code, _, err = run(capsys, "--model_path", models["untied-bin"], "--output_dir", out)
    check_error(code, err, "model.safetensors", "--overwrite")
    assert snapshot(out) == before
    # A sharded conversion over a single file is refused the same way.
    code, _, err = run(capsys, "--model_path", models["untied-shards"], "--output_dir", out)
    check_error(code, err, "--overwrite")
    assert snapshot(out) == before

    # --overwrite switches layouts and removes what the new layout does not use: a stale
    # model.safetensors would otherwise win over the new index, stale shards would linger.
    code, _, err = run(capsys, "--model_path", models["untied-shards"], "--output_dir", out, "--overwrite")
    assert code == 0, err
    check_index(out)
    check_loads(out, models["untied"])
    code, _, err = run(capsys, "--model_path", models["untied-bin"], "--output_dir", out, "--overwrite")
    assert code == 0, err
    assert snapshot(out) == before


def test_failure_leaves_nothing_half_written(models, tmp_path, capsys, monkeypatch):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_save(tensors, path, metadata=metadata)

    real_save = conv.save_file
    monkeypatch.setattr(conv, "save_file", failing_save)
    out = tmp_path / "new"
    code, _, err = run(capsys, "--model_path", models["untied-shards"], "--output_dir", out)
    check_error(code, err, "No space left on device")
    assert not out.exists()  # created by the run, so removed again

    # Over an existing checkpoint with --overwrite: the old one stays as it was.
    existing = tmp_path / "existing"
    monkeypatch.setattr(conv, "save_file", real_save)
    assert run(capsys, "--model_path", models["untied-bin"], "--output_dir", existing)[0] == 0
    before = snapshot(existing)
    calls.clear()
    monkeypatch.setattr(conv, "save_file", failing_save)
    code, _, err = run(capsys, "--model_path", models["untied-shards"], "--output_dir", existing, "--overwrite")
    check_error(code, err, "No space left on device")
    assert snapshot(existing) == before


def test_verification_catches_a_bad_write(models, tmp_path, capsys, monkeypatch):
    real_save = conv.save_file

    def flipping_save(tensors, path, metadata=None):  # a one-ulp change in one weight
        tensors = dict(tensors)
        name = sorted(tensors)[0]
        bad = tensors[name].clone()
        bad.view(torch.int32).view(-1)[0] ^= 1
        tensors[name] = bad
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(conv, "save_file", flipping_save)
    out = tmp_path / "out"
    code, _, err = run(capsys, "--model_path", models["tied-bin"], "--output_dir", out)
    check_error(code, err, "verification failed", "differs from the source")
    assert not out.exists()


def test_same_bits_is_bitwise():
    assert conv.same_bits(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    assert not conv.same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not conv.same_bits(torch.ones(2), torch.ones(2, dtype=torch.float16))


def _corrupt(path: Path, name: str, data=None):
    target = next(path.glob(name))
    target.write_bytes(data if data is not None else target.read_bytes()[: target.stat().st_size // 2])


def _add_to_index(path: Path):
    index_file = path / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["extra.weight"] = sorted(index["weight_map"].values())[0]
    index_file.write_text(json.dumps(index))


def _point_index(path: Path, shard: str):
    index_file = path / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    index_file.write_text(json.dumps(index))


ERRORS = {
    "missing model dir": (lambda d: shutil.rmtree(d), (), "does not exist"),
    "no checkpoint": (lambda d: [f.unlink() for f in d.glob("pytorch_model*")], (), "no pytorch_model.bin"),
    "missing shard": (lambda d: next(d.glob("pytorch_model-00002-*.bin")).unlink(), (),
                      "shard pytorch_model-00002-of-"),
    # (not torch's first line, which advises weights_only=False: this script never runs a file's code)
    "garbage file": (lambda d: _corrupt(d, "pytorch_model.bin", b"not a checkpoint" * 64), (),
                     "cannot read", "not a checkpoint of tensors only (Unsupported operand"),
    "a pickled module": (lambda d: torch.save({"lm_head": torch.nn.Linear(2, 2)}, d / "pytorch_model.bin"), (),
                         "(Unsupported global: GLOBAL torch.nn.modules.linear.Linear was not an allowed global by "
                         "default): no PyTorch checkpoint at all, or one that pickles other objects"),
    "truncated file": (lambda d: _corrupt(d, "pytorch_model.bin"), (), "cannot read"),
    "truncated shard": (lambda d: _corrupt(d, "pytorch_model-00003-*.bin"), (), "cannot read"),
    "tensor missing from shard": (_add_to_index, (), "'extra.weight' listed in pytorch_model.bin.index.json"),
    "bad index": (lambda d: (d / "pytorch_model.bin.index.json").write_text("{"), (), "not a valid checkpoint index"),
    "shard outside the directory": (lambda d: _point_index(d, "../elsewhere.bin"), (),
                                    "shard '../elsewhere.bin' is not a file name inside"),
    "not a state dict": (lambda d: torch.save([1, 2], d / "pytorch_model.bin"), (), "not a state dict"),
    "bad shard size": (lambda d: None, ("--max_shard_size", "5 parsecs"), "invalid size"),
    "shard size under a byte": (lambda d: None, ("--max_shard_size", "0.5B"), "less than one byte"),
    "sparse tensor": (lambda d: _add_tensor(d, torch.eye(3).to_sparse()), (), "'extra.weight' is a torch.sparse_coo"),
    "meta tensor": (lambda d: _add_tensor(d, torch.empty(3, device="meta")), (), "'extra.weight' is a meta tensor"),
    # (safetensors' save_file failed on these with a KeyError traceback naming only the dtype)
    "complex128 tensor": (lambda d: _add_tensor(d, torch.zeros(3, dtype=torch.complex128)), (),
                          "'extra.weight' is of dtype complex128, which safetensors cannot hold"),
    "quantized tensor": (lambda d: _add_tensor(d, torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)), (),
                         "'extra.weight' is of dtype qint8, which safetensors cannot hold (a quantized tensor)"),
    "nested tensor": (lambda d: _add_tensor(d, torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])), (),
                      "'extra.weight' is a nested tensor"),
}


def _add_tensor(path: Path, tensor: torch.Tensor):
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["extra.weight"] = tensor
    torch.save(state, path / "pytorch_model.bin")


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_are_one_line(models, case, tmp_path, capsys):
    mutate, extra, *fragments = ERRORS[case]
    sharded = "shard" in case or "index" in case
    src = tmp_path / "src"
    shutil.copytree(models["untied-shards" if sharded else "untied-bin"], src)
    mutate(src)
    out = tmp_path / "out"
    code, _, err = run(capsys, "--model_path", src, "--output_dir", out, *extra)
    check_error(code, err, *fragments)
    assert "weights_only" not in err
    assert not out.exists()


def test_model_path_that_is_the_bin_file(models, tmp_path, capsys):
    """--model_path pointing at pytorch_model.bin itself used to be told it "does not exist"."""
    code, _, err = run(capsys, "--model_path", models["untied-bin"] / "pytorch_model.bin", "--output_dir", tmp_path)
    check_error(code, err, "pytorch_model.bin' is a file; give the model directory that holds it")


def test_unwritable_output_dir(models, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run(capsys, "--model_path", models["untied-bin"], "--output_dir", blocker / "out")
    check_error(code, err, "not writable")


def test_read_only_output_dir(models, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, _, err = run(capsys, "--model_path", models["untied-bin"], "--output_dir", out)
    finally:
        out.chmod(0o700)
    check_error(code, err, "not writable")
    assert not any(out.iterdir())


def test_runs_as_a_script_from_any_directory(models, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--model_path", str(models["tied-shards"]), "--output_dir", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout and (out / "model.safetensors.index.json").is_file()

    failed = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)  # exists now
    assert failed.returncode == 2
    assert failed.stderr.startswith("trans_to_safetensors: error: ") and len(failed.stderr.splitlines()) == 1

    usage = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True)
    assert usage.returncode == 2 and len(usage.stderr.splitlines()) == 1 and "--model_path" in usage.stderr


def test_a_chatglm_bin_checkpoint_with_its_tokenizer_code(tmp_path, capsys, tokenizer_dir):
    """ChatGLM2/3 and Baichuan 2 ship .bin weights under their own names and a tokenizer that is
    code (tokenization_*.py beside its vocabulary): the converted directory has both, and the
    model code (which tells how rope_ratio applies), and mlora loads it as it loads the
    safetensors original. The converter never runs the model's code (auto_map)."""
    from safetensors.torch import load_file

    src = make_tiny_model(tmp_path / "src", "chatglm", tokenizer_dir)
    bins = tmp_path / "bins"
    bins.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, bins / f.name)
    (bins / "tokenization_chatglm.py").write_text("# the model's tokenizer code\n")
    (bins / "configuration_chatglm.py").write_text("# its config class\n")
    (bins / "modeling_chatglm.py").write_text("seq_idx = torch.arange(seq_len) / self.rope_ratio\n")
    raw = json.loads((bins / "config.json").read_text())
    raw.pop("tie_word_embeddings", None)  # unknown: asking transformers would prompt to run the model's code
    auto_map = {"AutoConfig": "configuration_chatglm.ChatGLMConfig"}
    (bins / "config.json").write_text(json.dumps(dict(raw, auto_map=auto_map, rope_ratio=1)))
    torch.save(load_file(src / "model.safetensors"), bins / "pytorch_model.bin")
    out = tmp_path / "out"
    code, _, err = run(capsys, "--model_path", bins, "--output_dir", out)
    assert code == 0, err
    for name in ("tokenization_chatglm.py", "configuration_chatglm.py", "modeling_chatglm.py"):
        assert (out / name).read_bytes() == (bins / name).read_bytes()
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(load_model(out, "cpu", torch.float32)(ids), load_model(src, "cpu", torch.float32)(ids))
