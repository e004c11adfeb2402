"""The "zmq" pipeline transport: ZeroMQ sockets, msgpack headers and raw tensor bytes; ranks
exchange addresses through rank 0. Works between hosts that have no NCCL.

A module of its own so that only this transport needs pyzmq: `transport.connect` imports it
when "zmq" is asked for (the "torch" transport, the default, runs where pyzmq is not installed).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import msgpack
import torch
import zmq

from mlora.errors import PipelineError
from mlora.pipeline.messages import not_joined, other_world, pack_meta, tensor_dtype, unpack
from mlora.pipeline import other_transport
from mlora.pipeline.transport import Transport, _listening


class ZmqTransport(Transport):
    """Each rank binds one PULL socket and PUSHes to each peer's. One I/O thread owns every
    socket (ZeroMQ sockets are not thread-safe): it forwards what the caller queues through an
    in-process socket, files arrivals into the inbox, and sends heartbeats.

    A message is multipart: the msgpack meta (with the sender's rank), then one frame per tensor."""

    def __init__(self, rank, world_size, master_addr, master_port, device, peer_timeout, connect_timeout):
        super().__init__(rank, world_size, device, peer_timeout)
        self._ctx = zmq.Context()
        try:
            loopback = _is_loopback(master_addr)
            host = "127.0.0.1" if loopback else _local_ip_towards(master_addr, master_port)
            self._pull = self._socket(zmq.PULL)
            port = self._pull.bind_to_random_port("tcp://127.0.0.1" if loopback else "tcp://*")
            me = f"tcp://{host}:{port}"
            self._door = None  # rank 0's rendezvous socket, kept open to turn latecomers away
            if rank == 0:
                self._door = self._socket(zmq.ROUTER)
                try:
                    self._door.bind(f"tcp://{'127.0.0.1' if loopback else '*'}:{master_port}")
                except zmq.ZMQError as err:
                    raise PipelineError(f"rank 0 cannot listen on {master_addr}:{master_port} "
                                        f"({err.strerror}); is another run using this port?") from None
                table = _admit_all(self._door, me, world_size, connect_timeout, f"{master_addr}:{master_port}")
            else:
                table = _register(self._socket(zmq.DEALER), master_addr, master_port, rank, world_size, me,
                                  connect_timeout)
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self._pushes = {}
        for peer, addr in enumerate(table):
            if peer != rank:
                self._pushes[peer] = self._socket(zmq.PUSH)
                self._pushes[peer].sndhwm = 0  # never block the I/O thread; a gone peer is caught by heartbeats
                self._pushes[peer].connect(addr)
        self._peers.restart_clock()
        self._cmd_in = self._socket(zmq.PULL)
        self._cmd_in.bind(f"inproc://mlora-transport-{id(self)}")
        self._cmd = self._socket(zmq.PUSH)
        self._cmd.sndhwm = 0
        self._cmd.connect(f"inproc://mlora-transport-{id(self)}")
        self._io = threading.Thread(target=self._io_loop, daemon=True, name=f"mlora-zmq-{rank}")
        self._io.start()
        self._started()

    def _socket(self, kind):
        sock = self._ctx.socket(kind)
        sock.linger = 0
        return sock

    def _post(self, dst, kind, header, tensors):
        wire = [t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for t in tensors]
        meta = pack_meta(kind, header, wire, src=self.rank)
        # the bytes of each tensor as a numpy array: ZeroMQ sends it without another copy
        frames = [meta, *(t.reshape(-1).view(torch.uint8).numpy() for t in wire)]
        self._cmd.send_multipart([b"%d" % dst, *frames], copy=False)

    def _tensors(self, src, descs, frames):
        tensors = []
        for (dtype, shape), frame in zip(descs, frames):
            raw = torch.frombuffer(bytearray(frame.buffer), dtype=torch.uint8) if len(frame.buffer) \
                else torch.empty(0, dtype=torch.uint8)  # (frombuffer refuses empty buffers)
            tensors.append(raw.view(tensor_dtype(dtype)).view(shape).to(self.device))
        return tensors

    def _io_loop(self) -> None:
        try:
            self._pump()
            # Every peer has said goodbye (so it received all we sent before ours) or is lost:
            # linger only towards the live ones, in case our own goodbye is still in flight.
            for peer, push in self._pushes.items():
                push.linger = 0 if self._peers.is_lost(peer) else int(self.peer_timeout * 1000)
        except Exception as err:  # a bug here must not look like a hang
            self._peers.lost(self.rank, f"its ZeroMQ thread failed: {type(err).__name__}: {err}")
        finally:
            for sock in (self._pull, self._cmd_in, self._door, *self._pushes.values()):
                if sock is not None:
                    sock.close()

    def _pump(self) -> None:
        """Until close(): heartbeats out, arrivals in, queued sends on, latecomers away."""
        poller = zmq.Poller()
        for sock in (self._pull, self._cmd_in, self._door):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        beat = msgpack.packb({"kind": "hb", "src": self.rank})
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if now >= next_beat:
                for push in self._pushes.values():
                    push.send(beat, zmq.NOBLOCK)
                next_beat = now + self.heartbeat_interval
            ready = dict(poller.poll(max(1, int((next_beat - now) * 1000))))
            if self._pull in ready:
                self._take_arrivals()
            if self._door is not None and self._door in ready:
                _turn_away(self._door)
            if self._cmd_in in ready and not self._forward():
                return

    def _take_arrivals(self) -> None:
        while True:
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            meta = unpack(frames[0].bytes)
            src, kind = meta["src"], meta["kind"]
            self._peers.heard_from(src)  # any arrival is a sign of life, not only heartbeats
            if kind == "bye":
                self._peers.said_goodbye(src, meta["saw_lost"])
            elif kind != "hb":
                self._inbox.put((src, kind), (meta, frames[1:]))

    def _forward(self) -> bool:
        """Pass queued messages on to their peers; False once close() asked to stop."""
        while True:
            try:
                frames = self._cmd_in.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            if frames[0].bytes == b"stop":
                return False
            if frames[0].bytes == b"bye":  # after everything queued before it, to every peer
                bye = msgpack.packb({"kind": "bye", "src": self.rank, "saw_lost": self._peers.first_loss()})
                for push in self._pushes.values():
                    push.send(bye, zmq.NOBLOCK)
            else:
                self._pushes[int(frames[0].bytes)].send_multipart(frames[1:], copy=False)

    def _close(self):
        # Say goodbye, then wait for every peer's goodbye (or loss), heartbeats still going. A
        # peer says goodbye only once it needs nothing more from us, so after this no message
        # of ours is still needed, and a peer that is gone cannot hold our sockets open.
        self._cmd.send(b"bye")
        self._peers.wait_until_settled()
        self._cmd.send(b"stop")
        self._io.join()  # it never blocks: forwards what is queued, then closes its sockets
        self._cmd.close(linger=0)
        self._ctx.term()  # returns once what is queued for live peers is delivered


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        raise PipelineError(f"cannot resolve the master address {host!r}") from None


def _local_ip_towards(host: str, port: int) -> str:
    """This host's address on the route to `host` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]


def _admit_all(door, rank0_addr: str, world_size: int, timeout: float, where: str) -> list[str]:
    """Rank 0's side of the rendezvous: collect every rank's address, then send all of them the
    table. Each arrival is told who is here so far, so a rank that gives up can name the missing.
    A rank of another world size (ranks started with different --balance or --world_size) can
    never join: every rank fails at once naming it, rather than wait out the timeout to say
    only that some rank did not join."""
    table, callers = {0: rank0_addr}, {}
    deadline = time.monotonic() + timeout

    def tell(who, **reply):
        door.send_multipart([who, msgpack.packb(reply)])

    def give_up(err: str, *also):
        for who in (*callers.values(), *also):
            tell(who, error=err)
        door.close(linger=1000)  # let the verdict reach the waiting ranks
        raise PipelineError(err)

    while len(table) < world_size:
        left = deadline - time.monotonic()
        if left <= 0:
            give_up(not_joined(world_size, table, timeout))
        if not door.poll(int(left * 1000) + 1):
            continue
        who, body = door.recv_multipart()
        ask = unpack(body)
        if "refused" in ask:  # a rank that cannot join (other_transport): it waits for no answer
            give_up(ask["refused"])
        if ask["world_size"] != world_size or not 0 <= ask["rank"] < world_size:
            give_up(other_world(ask["rank"], ask["world_size"], world_size, where), who)
        elif ask["rank"] in table:
            tell(who, error=f"rank {ask['rank']} is claimed by two processes")
        else:
            table[ask["rank"]] = ask["addr"]
            callers[ask["rank"]] = who
            for caller in callers.values():
                tell(caller, joined=sorted(table))
    for caller in callers.values():
        tell(caller, table=[table[r] for r in range(world_size)])
    return [table[r] for r in range(world_size)]


def _turn_away(door) -> None:
    """After start-up, any registration is a second process claiming a taken rank."""
    while True:
        try:
            who, body = door.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        rank = unpack(body).get("rank")
        door.send_multipart([who, msgpack.packb(
            {"error": f"rank {rank} is claimed by two processes (the pipeline already started)"})])


def _register(dealer, master_addr: str, master_port: int, rank: int, world_size: int, me: str,
              timeout: float) -> list[str]:
    """A non-zero rank's side of the rendezvous: announce our address, wait for the table.
    Where what answers is a rank 0 of the torch transport (other_transport), refused at once."""
    deadline = time.monotonic() + timeout
    where = f"{master_addr}:{master_port}"
    if not _listening(master_addr, master_port, deadline):
        dealer.close(linger=0)
        raise PipelineError(f"rank 0 did not join within {timeout:g} s (nothing answered at {where})")
    greeting = other_transport.first_bytes(master_addr, master_port, wait=1.0)  # (its cost: only where silent)
    if not greeting:  # (silent, as torch's store is: ZeroMQ's greeting would have come at once)
        err = other_transport.tell_torch_rank_0(master_addr, master_port, rank, world_size, where)
        if err is not None:
            dealer.close(linger=0)
            raise PipelineError(err)
    dealer.connect(f"tcp://{master_addr}:{master_port}")
    dealer.send(msgpack.packb({"rank": rank, "world_size": world_size, "addr": me}))
    joined = None
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not dealer.poll(int(left * 1000) + 1):
                continue
            reply = unpack(dealer.recv())
            if "error" in reply:
                raise PipelineError(reply["error"])
            if "table" in reply:
                return reply["table"]
            joined = reply["joined"]
    finally:
        dealer.close(linger=0)
    if joined is not None:
        raise PipelineError(not_joined(world_size, joined, timeout))
    if _accepts(master_addr, master_port):  # rank 0 answers at once: this is some other program
        raise PipelineError(f"rank 0 did not join within {timeout:g} s (what answers at {where} is not rank 0: "
                            "is another program using this port?)")
    raise PipelineError(f"rank 0 did not join within {timeout:g} s (nothing answered at {where})")


def _accepts(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port now."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False
