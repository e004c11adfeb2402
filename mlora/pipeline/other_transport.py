"""A rank that finds rank 0 running the other transport (ranks started with different
--transport): each transport's rendezvous speaks its own protocol, so the two never meet, and
both ranks waited out --connect_timeout to say only that the other did not join (a torch rank
printing the retries of torch's store client meanwhile, C++ stacks included).

A ZeroMQ socket greets every connection at once with ZMTP's signature; torch's store says
nothing until asked. So a rank looks at what rank 0's port says before joining: a torch rank
that is greeted with ZMTP, and a zmq rank that is not but finds torch's store there, tells
rank 0 (in rank 0's own protocol) and fails, and every rank gives the same line at once."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import msgpack

# How long a ZeroMQ socket may take to greet a new connection: its I/O thread answers at once.
GREETING_WAIT = 0.3


def mismatch(rank: int, mine: str, theirs: str, where: str) -> str:
    return (f"rank {rank} runs --transport {mine}, but rank 0 at {where} runs --transport {theirs}: start every rank "
            f"with the same --transport")


def first_bytes(addr: str, port: int, wait: float = GREETING_WAIT) -> bytes:
    """What listens at addr:port sends on its own within `wait` s of a connection (b"": nothing)."""
    got = b""
    try:
        with socket.create_connection((addr, port), timeout=1.0) as conn:
            end = time.monotonic() + wait
            while len(got) < 10 and (left := end - time.monotonic()) > 0:
                conn.settimeout(left)
                chunk = conn.recv(10 - len(got))
                if not chunk:
                    break
                got += chunk
    except OSError:  # (a timeout too)
        pass
    return got


def is_zeromq(greeting: bytes) -> bool:
    """Whether `greeting` (first_bytes) is ZMTP's signature: 0xFF, 8 bytes, 0x7F."""
    return len(greeting) == 10 and greeting[0] == 0xFF and greeting[9] == 0x7F


def tell_zmq_rank_0(addr: str, port: int, rank: int, world_size: int, err: str) -> None:
    """Hand rank 0's ZeroMQ rendezvous this rank's refusal (see zmq_transport._admit_all), when
    pyzmq is here to speak to it; without it rank 0 waits out its --connect_timeout."""
    try:
        import zmq
    except ImportError:
        return
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://{addr}:{port}")
        dealer.send(msgpack.packb({"rank": rank, "world_size": world_size, "refused": err}))
        dealer.close(linger=1000)  # (delivered before the context ends)
    finally:
        ctx.term()


def tell_torch_rank_0(addr: str, port: int, rank: int, world_size: int, where: str) -> str | None:
    """If torch's store listens at addr:port (a rank 0 of the torch transport), leave it this
    rank's refusal as the roll call's verdict (transport._roll_call) and return the refusal;
    None when what listens there is not torch's store (another program)."""
    import torch.distributed as dist

    from mlora.pipeline.transport import _STORE_HANDSHAKE, _within

    try:
        store = _within(lambda: dist.TCPStore(addr, port, world_size, is_master=False,
                                              timeout=timedelta(seconds=_STORE_HANDSHAKE),
                                              wait_for_workers=False), _STORE_HANDSHAKE)
    except RuntimeError:
        return None
    if store is None:
        return None
    err = mismatch(rank, "zmq", "torch", where)
    try:
        store.compare_set("verdict", "", err)
    except RuntimeError:
        pass
    return err
