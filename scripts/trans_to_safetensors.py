#!/usr/bin/env python
"""Convert a Hugging Face PyTorch checkpoint (pytorch_model.bin or its shards) to safetensors.

    python scripts/trans_to_safetensors.py --model_path DIR [--output_dir DIR] [--overwrite]
                                           [--max_shard_size 5GB]

mlora reads only safetensors (model.safetensors, or shards listed in
model.safetensors.index.json), so older .bin checkpoints go through this script once.
Tensor names are kept; the layout is the one transformers writes. Each .bin file is
loaded on its own (memory-mapped where the file format allows), written, read back and
compared bit for bit before the next one is touched. Everything is written under
temporary names and renamed into place only when all of it has been verified, so a
failure never leaves a half-written checkpoint behind.

Errors are one line on stderr (`trans_to_safetensors: error: ...`) and exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:
    import torch
# torch is imported where tensors are first touched, not here: a usage error or a refusal
# (output exists, no checkpoint) is then told in a fraction of a second, not after the ~2 s
# torch takes to import.

PROG = "trans_to_safetensors"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# Copied next to the weights when --output_dir is elsewhere, so that it is a complete base model.
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
             "merges.txt", "chat_template.jinja", "chat_template.json")
# ChatGLM's and Baichuan's tokenizers are code shipped with the model (tokenization_chatglm.py,
# their config class beside it) reading their own vocabulary files; their modeling_*.py is
# copied too (mlora reads how ChatGLM applies rope_ratio from it, and PEFT users load with it).
AUX_PATTERNS = ("tokenization_*.py", "configuration_*.py", "modeling_*.py", "*.tiktoken")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # as transformers reads them


class ConvertError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '100KiB' -> 102400, '1234' -> 1234."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MB, 100KiB)")
    size = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} is less than one byte")
    return size


def first_line(e: BaseException) -> str:
    """Library errors can span many lines; the first one names the problem."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def find_checkpoint(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The .bin files to convert, in order, and the index's weight_map (None for one file)."""
    if model_dir.is_file():  # (it used to say "does not exist" of the .bin file itself)
        raise ConvertError(f"--model_path {str(model_dir)!r} is a file; give the model directory that holds it")
    if not model_dir.is_dir():
        raise ConvertError(f"model directory {str(model_dir)!r} does not exist")
    if (model_dir / BIN_SINGLE).is_file():  # transformers' own preference when both exist
        return [model_dir / BIN_SINGLE], None
    index = model_dir / BIN_INDEX
    if not index.is_file():
        raise ConvertError(f"no {BIN_SINGLE} or {BIN_INDEX} in {str(model_dir)!r}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not all(isinstance(f, str) for f in weight_map.values()):
            raise TypeError("file names must be strings")
        outside = next((f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")), None)
        if outside is not None:  # a shard is a file of the model directory, as transformers writes them
            raise TypeError(f"shard {outside!r} is not a file name inside the model directory")
        files = sorted(set(weight_map.values()))  # shard names sort in their numbered order
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConvertError(f"{index} is not a valid checkpoint index ({first_line(e)})") from None
    for name in files:
        if not (model_dir / name).is_file():
            raise ConvertError(f"shard {name} listed in {index} is missing")
    return [model_dir / name for name in files], weight_map


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """One .bin file as {name: tensor}. Zip-format files are memory-mapped, so tensors are
    paged in as they are written instead of being held in RAM all at once."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # corrupt, truncated, or not a weights-only pickle
        raise ConvertError(f"cannot read {path}: {load_error(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in state.items()):
        raise ConvertError(f"{path} is not a state dict of named tensors")
    return state


def load_error(e: BaseException) -> str:
    """What went wrong in torch.load, in one line. Its weights-only refusal begins with advice
    to load with weights_only=False (which would run code from the file; this script never
    does) and says the reason further down: a file that is no checkpoint at all, or one that
    pickles more than tensors (a whole model object)."""
    text = str(e)
    if "Weights only load failed" not in text:
        return first_line(e)
    _, _, after = text.partition("WeightsUnpickler error:")
    reason = next((line.strip() for line in after.splitlines() if line.strip()), "unknown reason")
    reason = reason.split(". ")[0].rstrip(".")  # (not torch's advice on allowing globals)
    return (f"not a checkpoint of tensors only ({reason}): no PyTorch checkpoint at all, or one that pickles "
            f"other objects (this script loads tensors only, never code from a file)")


def ties_embeddings(model_dir: Path) -> bool:
    """Whether config.json ties lm_head to the embedding (False when unknown: keeping both is safe)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    if "auto_map" in config:  # remote-code models (ChatGLM, Baichuan) keep their head; never run their code
        return False
    try:  # not written out: the model class's default decides, which only transformers knows
        from transformers import AutoConfig

        return bool(AutoConfig.from_pretrained(str(model_dir)).tie_word_embeddings)
    except Exception:
        return False


def head_is_tied_copy(files: list[Path], weight_map: dict[str, str] | None, tied: bool) -> bool:
    """True when lm_head.weight is just the tied embedding, so it is dropped as transformers does.
    Decided before converting because the two may sit in different shards, in either order."""
    if not tied or (weight_map is not None and not {HEAD, EMBED} <= set(weight_map)):
        return False
    holders = [files[0]] if weight_map is None else sorted({files[0].parent / weight_map[n] for n in (HEAD, EMBED)})
    pair = {}
    for file in holders:  # memory-mapped where possible, so this reads little beyond the pair
        state = load_bin(file)
        pair.update({n: state[n] for n in (HEAD, EMBED) if n in state})
        del state
    return len(pair) == 2 and same_bits(pair[HEAD], pair[EMBED])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: unlike torch.equal alone, NaN matches NaN and -0.0 differs from 0.0."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(raw_bytes(a), raw_bytes(b))


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8)


def prepare(state: dict[str, torch.Tensor], drop_head: bool) -> dict[str, torch.Tensor]:
    """The tensors to save from one file: contiguous, no two sharing storage (safetensors
    refuses that), and without the tied lm_head.weight when `drop_head`."""
    import torch

    out, seen = {}, set()
    for name, tensor in state.items():
        if drop_head and name == HEAD:
            continue
        # (a nested tensor's layout may be strided too; it has no single shape)
        if tensor.layout != torch.strided or tensor.is_meta or tensor.is_nested:  # safetensors holds dense values only
            kind = ("a meta tensor (no values)" if tensor.is_meta else "a nested tensor" if tensor.is_nested
                    else f"a {tensor.layout} tensor")
            raise ConvertError(f"{name!r} is {kind}; only dense tensors with values can be converted")
        if tensor.is_quantized or not storable(tensor.dtype):
            raise ConvertError(f"{name!r} is of dtype {str(tensor.dtype).removeprefix('torch.')}, which safetensors "
                               f"cannot hold{' (a quantized tensor)' if tensor.is_quantized else ''}")
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel():  # shared but saved under both names: own copy
            tensor = tensor.clone()
        seen.add(storage)
        out[name] = tensor.contiguous()
    return out


@functools.cache
def storable(dtype: torch.dtype) -> bool:
    """Whether safetensors writes tensors of `dtype`: its save_file failed on the others
    (complex128, complex32, ...) with a KeyError traceback naming only the dtype. Asked of
    safetensors itself, with an empty tensor, as it has no public list of them."""
    import torch
    from safetensors.torch import save

    try:
        save({"probe": torch.empty(0, dtype=dtype)})
    except Exception:  # (KeyError today; whatever a later version raises)
        return False
    return True


def chunks(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Names grouped in order into shards of at most `limit` bytes (a bigger tensor goes alone)."""
    groups, size = [[]], 0
    for name, tensor in tensors.items():
        if groups[-1] and size + tensor.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += tensor.nbytes
    return [g for g in groups if g]


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file (which imports torch), imported on first use."""
    from safetensors.torch import save_file as write

    write(tensors, filename, metadata=metadata)


def verify(path: Path, expected: dict[str, torch.Tensor]) -> int:
    """Reopen a written file and compare every tensor bit for bit with its source."""
    with safe_open(str(path), framework="pt") as f:
        if set(f.keys()) != set(expected):
            raise ConvertError(f"verification failed: {path.name} does not hold the expected tensors")
        for name, source in expected.items():
            if not same_bits(f.get_tensor(name), source):
                raise ConvertError(f"verification failed: {name!r} in {path.name} differs from the source")
    return len(expected)


def current_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def existing_safetensors(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir()
                  if p.name in (SAFE_SINGLE, SAFE_INDEX) or SAFE_SHARD.fullmatch(p.name))


def convert(model_dir: Path, out_dir: Path, overwrite: bool, max_shard_size: int) -> None:
    files, weight_map = find_checkpoint(model_dir)
    old = existing_safetensors(out_dir)
    if old and not overwrite:
        raise ConvertError(f"{old[0]} already exists; pass --overwrite to replace it")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Beside the targets, so the final renames stay on one filesystem.
        tmp = Path(tempfile.mkdtemp(prefix=f".{PROG}-", dir=out_dir))
    except OSError as e:
        raise ConvertError(f"output directory {str(out_dir)!r} is not writable ({first_line(e)})") from None

    try:
        written: list[tuple[Path, list[str]]] = []  # (temporary file, its tensor names)
        sizes: dict[str, int] = {}
        n_verified = 0
        mode = 0o666 & ~current_umask()
        drop_head = head_is_tied_copy(files, weight_map, ties_embeddings(model_dir))
        if drop_head:
            print(f"dropping {HEAD}: tied to {EMBED} (tie_word_embeddings is true)")
        for file in files:
            state = load_bin(file)
            if weight_map is not None:
                listed = [n for n, f in weight_map.items() if f == file.name and n not in state]
                if listed:
                    raise ConvertError(f"tensor {listed[0]!r} listed in {BIN_INDEX} is missing from {file.name}")
            tensors = prepare(state, drop_head)
            for name in tensors:
                if name in sizes:
                    raise ConvertError(f"tensor {name!r} appears in more than one checkpoint file")
                sizes[name] = tensors[name].nbytes
            print(f"read {file.name}: {len(state)} tensor(s)")
            for names in chunks(tensors, max_shard_size):
                part = tmp / f"part-{len(written):05d}.safetensors"
                save_file({n: tensors[n] for n in names}, str(part), metadata={"format": "pt"})
                part.chmod(mode)  # safetensors creates files 0600; give them the usual mode
                n_verified += verify(part, {n: state[n] for n in names})  # the loaded originals
                written.append((part, names))
            del state, tensors  # free this file before loading the next
        if not written:
            raise ConvertError(f"no tensors in the checkpoint in {str(model_dir)!r}")
        print(f"verified {n_verified} tensors")

        # Final names: one file, or the numbered shards plus an index, as transformers writes them.
        if len(written) == 1:
            targets = [SAFE_SINGLE]
        else:
            targets = [f"model-{k:05d}-of-{len(written):05d}.safetensors" for k in range(1, len(written) + 1)]
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {n: t for (_, names), t in zip(written, targets) for n in sorted(names)}}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        aux = []
        if out_dir.resolve() != model_dir.resolve():
            remote_code = sorted({p.name for pattern in AUX_PATTERNS for p in model_dir.glob(pattern)})
            for name in (*AUX_FILES, *remote_code):
                if (model_dir / name).is_file():
                    shutil.copyfile(model_dir / name, tmp / name)
                    aux.append(name)

        # Shards before the index that names them; a stale single file (which loaders prefer)
        # goes only once the new checkpoint is complete.
        for (part, _), target in zip(written, targets):
            part.replace(out_dir / target)
        for name in ([SAFE_INDEX] if len(written) > 1 else []) + aux:
            (tmp / name).replace(out_dir / name)
        keep = set(targets) | ({SAFE_INDEX} if len(written) > 1 else set())
        for stale in old:  # --overwrite: e.g. shards of an earlier, differently split conversion
            if stale.name not in keep:
                stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out_dir.iterdir()):  # a failed run leaves no empty directory either
            out_dir.rmdir()

    total = sum(sizes.values())
    print(f"wrote {len(written)} file(s), {total / 1e6:.1f} MB: "
          + (str(out_dir / SAFE_SINGLE) if len(written) == 1 else f"{out_dir / SAFE_INDEX} + {len(written)} shards"))
    if aux:
        print(f"copied {', '.join(aux)}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default is usage + message; keep errors one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description="Convert a PyTorch .bin checkpoint to safetensors.")
    parser.add_argument("--model_path", required=True, type=Path, help="directory with pytorch_model*.bin")
    parser.add_argument("--output_dir", type=Path, help="where to write (default: --model_path)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing safetensors files")
    parser.add_argument("--max_shard_size", type=parse_size, default=parse_size("5GB"),
                        help="largest output file, e.g. 5GB, 500MB (default 5GB)")
    args = parser.parse_args(argv)
    try:
        convert(args.model_path, args.output_dir or args.model_path, args.overwrite, args.max_shard_size)
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, ...: the environment, not a bug
        print(f"{PROG}: error: {first_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
