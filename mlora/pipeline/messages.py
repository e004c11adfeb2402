"""What pipeline ranks say to each other, whichever transport carries it (transport.py's torch,
zmq_transport.py's ZeroMQ): a message's metadata as msgpack (its kind, header, and each tensor's
dtype and shape, so that a receiver needs no prior knowledge), and the start-up roll call's
verdict on ranks that never came or cannot join, worded alike by both."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import msgpack
import torch

from mlora.errors import PipelineError


def describe(tensors: Sequence[torch.Tensor]) -> list[tuple[str, list[int]]]:
    """Each tensor's dtype name and shape, as a message's metadata lists them."""
    return [(str(t.dtype).removeprefix("torch."), list(t.shape)) for t in tensors]


def pack_meta(kind: str, header: Any, tensors: Sequence[torch.Tensor], **extra) -> bytes:
    """The message's kind and header plus each tensor's dtype and shape (`describe`); extra:
    more fields (the zmq transport's sender rank)."""
    return msgpack.packb({"kind": kind, "h": header, "t": describe(tensors), **extra}, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """What `pack_meta` (or msgpack.packb) packed."""
    return msgpack.unpackb(data, raw=False)


def tensor_dtype(name: str) -> torch.dtype:
    """The dtype a message's metadata names (`describe`)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PipelineError(f"a peer sent a tensor of unknown dtype {name!r} (different torch versions?)")
    return dtype


def not_joined(world_size: int, present: Iterable[int], timeout: float) -> str:
    """The verdict on the ranks of `world_size` not `present` when the roll call gives up:
    "ranks 2, 3 did not join within 60 s"."""
    missing = sorted(set(range(world_size)) - set(present))
    ranks = f"rank {missing[0]}" if len(missing) == 1 else "ranks " + ", ".join(map(str, missing))
    return f"{ranks} did not join within {timeout:g} s"


def other_world(rank: int, world_size: int, rank0_world: int, where: str) -> str:
    """The roll call's verdict on a rank whose world size is not rank 0's (every rank gets it)."""
    return (f"rank {rank} has world_size {world_size}, but rank 0 at {where} has {rank0_world}: start every rank "
            f"with the same --balance (or --world_size)")
