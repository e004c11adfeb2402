"""Messages between pipeline ranks: a small header dict plus tensors, in order per (source, destination).

Two implementations behind one interface (`connect` picks):

- "torch": torch.distributed point-to-point (gloo; NCCL for the tensors when the device is CUDA).
  Rank 0 hosts a TCPStore that also carries the start-up roll call and the heartbeats.
- "zmq": ZeroMQ sockets, msgpack headers and raw tensor bytes; ranks exchange addresses through
  rank 0. Works between hosts that have no NCCL. It lives in zmq_transport.py, imported only when
  asked for: only it needs pyzmq.

Both receive eagerly on background threads into one inbox per (source, kind), so `recv(src)`
takes the next message from `src` while messages from others wait for their own `recv`.

A rank can vanish at any time (even kill -9) and neither library says so reliably: gloo waits
cannot be interrupted, ZeroMQ silently reconnects. So every rank sends heartbeats, and every
blocking call re-checks its peers while it waits: a lost rank becomes a PipelineError that names
it within about `peer_timeout` seconds instead of a hang. A rank that gives up says goodbye
naming the rank it lost, so the others name the same culprit at once.
"""

from __future__ import annotations

import atexit
import math
import socket
import threading
import time
from collections import defaultdict, deque
from datetime import timedelta
from queue import SimpleQueue
from typing import Any, Callable, Iterable, Sequence

import msgpack
import torch
import torch.distributed as dist

from mlora.errors import PipelineError, UserError
from mlora.pipeline import other_transport
from mlora.pipeline.messages import describe, not_joined, other_world, pack_meta, tensor_dtype, unpack

__all__ = ["PipelineError", "Transport", "connect"]

_POLL = 0.05  # how often (s) a blocked call re-checks its peers' liveness
# gloo applies its timeout to every wait, and a timed-out wait tears the connection down; a stage
# may legitimately wait for minutes (a long eval upstream), so liveness is our job, not gloo's.
_FOREVER = timedelta(days=365)
# How long (s) closing waits for the threads whose waits on lost peers fail (`_close`); they
# take microseconds once the group is aborted.
_LOST_WAITS_END = 2.0


def connect(kind: str, rank: int, world_size: int, master_addr: str, master_port: int,
            device: torch.device, peer_timeout: float = 30.0, connect_timeout: float = 60.0,
            backend: str | None = None) -> Transport:
    """Join the pipeline as `rank` of `world_size`; returns once every rank has joined.

    kind: "torch" or "zmq". backend (torch only): None -> "nccl" on CUDA, else "gloo".
    Raises PipelineError when a rank does not join within `connect_timeout`, when the master
    port is taken, or when two processes claim the same rank; UserError for "zmq" where pyzmq
    is not installed."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
    device = torch.device(device)
    if kind == "torch":
        return _TorchTransport(rank, world_size, master_addr, master_port, device,
                               peer_timeout, connect_timeout, backend)
    if kind == "zmq":
        return _zmq_transport()(rank, world_size, master_addr, master_port, device,
                                peer_timeout, connect_timeout)
    raise ValueError(f"unknown transport {kind!r} (use 'torch' or 'zmq')")


def _zmq_transport() -> type[Transport]:
    """The ZeroMQ transport's class, imported only now: pyzmq is needed for it alone."""
    try:
        from mlora.pipeline.zmq_transport import ZmqTransport
    except ModuleNotFoundError as err:
        if err.name != "zmq":  # a missing module of ours is a bug: its traceback stays
            raise
        raise UserError("--transport zmq needs pyzmq, which is not installed (pip install pyzmq); "
                        "or use --transport torch") from None
    return ZmqTransport


# ---------------------------------------------------------------------------------------------
# What both implementations share: inbox, liveness, the public methods (and messages.py: the
# messages' metadata and the roll call's verdict).


class _Inbox:
    """Arrived messages, kept per (source, kind) in arrival order until someone asks for them."""

    def __init__(self):
        self._queues: dict[tuple[int, str], deque] = defaultdict(deque)
        self._ready = threading.Condition()

    def put(self, key: tuple[int, str], item: Any) -> None:
        with self._ready:
            self._queues[key].append(item)
            self._ready.notify_all()

    def get(self, key: tuple[int, str], check: Callable[[], None]) -> Any:
        """The oldest item under `key`; while there is none, call check() (which raises to give up)."""
        with self._ready:
            while not self._queues[key]:
                check()
                self._ready.wait(_POLL)
            return self._queues[key].popleft()


class _Peers:
    """This rank's view of the others: when each was last heard from, who said goodbye, who is
    known to be gone. Written by the transport's threads, read by every blocking call."""

    def __init__(self, rank: int, world_size: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.others = [p for p in range(world_size) if p != rank]
        self._heard = {p: time.monotonic() for p in self.others}
        self._closed: set[int] = set()
        self._lost: dict[int, str] = {}
        self._lock = threading.Lock()

    def restart_clock(self) -> None:
        """Everyone just checked in (start-up took its time): count silence from now."""
        for peer in self.others:
            self.heard_from(peer)

    def heard_from(self, peer: int) -> None:
        with self._lock:
            self._heard[peer] = time.monotonic()

    def said_goodbye(self, peer: int, saw_lost: Sequence | None = None) -> None:
        """`peer` closed; if it closed because it had lost a rank, that rank is lost here too, so
        every survivor names the rank that actually died, not the neighbour that gave up."""
        with self._lock:
            self._closed.add(peer)
        if saw_lost:
            lost, why = saw_lost
            second_hand = why.startswith("rank ")  # "rank 3 saw: ...": keep the first witness
            self.lost(lost, why if second_hand else f"rank {peer} saw: {why}")

    def lost(self, peer: int, why: str) -> None:
        with self._lock:
            self._lost.setdefault(peer, why)  # the first reason is the real one

    def first_loss(self) -> tuple[int, str] | None:
        with self._lock:
            return next(iter(self._lost.items()), None)

    def is_closed(self, peer: int) -> bool:
        with self._lock:
            return peer in self._closed

    def is_lost(self, peer: int) -> bool:
        with self._lock:
            return peer in self._lost

    def error(self, waiting_for: Iterable[int] = ()) -> PipelineError | None:
        """Why this rank cannot go on, or None: any peer gone or silent for too long (one lost
        stage dooms the pipeline, and waiting for a neighbour that itself waits for the lost
        rank would cost another timeout per hop), or a peer we wait for has closed."""
        now = time.monotonic()
        with self._lock:
            for peer, heard in self._heard.items():
                if peer not in self._closed and peer not in self._lost and now - heard > self.timeout:
                    self._lost[peer] = f"no heartbeat for {now - heard:.1f} s"
            for peer, why in self._lost.items():  # the first one recorded
                return PipelineError(f"rank {peer} was lost ({why})")
            for peer in waiting_for:
                if peer in self._closed:
                    return PipelineError(f"rank {peer} closed its connection while rank {self.rank} "
                                         "was waiting for it")
        return None

    def check(self, waiting_for: Iterable[int] = ()) -> None:
        err = self.error(waiting_for)
        if err is not None:
            raise err

    def settled(self) -> bool:
        """Whether every peer has said goodbye or is lost."""
        self.error()  # files silent peers as lost
        with self._lock:
            return all(p in self._closed or p in self._lost for p in self.others)

    def wait_until_settled(self) -> None:
        """Block while some peer is alive and has not said goodbye; bounded when peers die: a
        gone peer stops counting within the timeout."""
        while not self.settled():
            time.sleep(_POLL)


class Transport:
    """One rank's end of the pipeline's links. Not for use from several threads at once."""

    def __init__(self, rank: int, world_size: int, device: torch.device, peer_timeout: float):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.peer_timeout = peer_timeout
        # heartbeats come often enough that a few late ones never look like a lost rank
        self.heartbeat_interval = min(1.0, peer_timeout / 10)
        self._peers = _Peers(rank, world_size, peer_timeout)
        self._inbox = _Inbox()  # filled by the implementation's receiving thread(s)
        self._closed = False

    def send(self, dst: int, header: dict, tensors: Sequence[torch.Tensor] = ()) -> None:
        """Queue a message for `dst` and return; the tensors are copied, so the caller may reuse them."""
        self._check_usable(dst)
        self._post(dst, "msg", header, list(tensors))

    def recv(self, src: int) -> tuple[dict, list[torch.Tensor]]:
        """The next message from `src` (header, tensors on this rank's device); blocks until it comes."""
        self._check_usable(src)
        meta, payload = self._inbox.get((src, "msg"), lambda: self._peers.check([src]))
        return meta["h"], self._tensors(src, meta["t"], payload)

    def exchange(self, value: Any) -> list[Any]:
        """Every rank's `value` (small, msgpack-able), in rank order; a collective: all ranks call it."""
        self._check_usable()
        # this rank's own value takes the same msgpack round trip as the others' (tuples -> lists)
        mine = unpack(msgpack.packb(value, use_bin_type=True))
        for peer in self._peers.others:
            self._post(peer, "exchange", mine, [])
        everyone = []
        for r in range(self.world_size):
            # (a rank that has sent its value may close before we get to it: wait on r alone)
            everyone.append(mine if r == self.rank else
                            self._inbox.get((r, "exchange"), lambda: self._peers.check([r]))[0]["h"])
        return everyone

    def close(self) -> None:
        """Deliver what was sent, say goodbye, stop the threads. Idempotent. Returns once every
        other rank has closed too (so nothing still needed is dropped) or is lost; a gone rank
        stops counting within `peer_timeout`, so this is bounded when ranks die."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._close()

    def _started(self) -> None:
        # a process that dies of an exception still says goodbye and releases its threads
        atexit.register(self.close)

    def _check_usable(self, peer: int | None = None) -> None:
        if self._closed:
            raise PipelineError(f"rank {self.rank}: the transport is already closed")
        if peer is not None and (peer == self.rank or not 0 <= peer < self.world_size):
            raise ValueError(f"rank {self.rank} has no peer {peer} (world_size {self.world_size})")
        self._peers.check()  # a lost rank fails every call, not only those that wait on it

    # each implementation provides these
    def _post(self, dst: int, kind: str, header: Any, tensors: list[torch.Tensor]) -> None:
        """Queue a message of `kind` ("msg", "exchange"; "bye" for torch) for `dst`."""
        raise NotImplementedError

    def _tensors(self, src: int, descs: list, payload: Any) -> list[torch.Tensor]:
        """The tensors of a message from its inbox payload, on this rank's device."""
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# torch.distributed


_TAG = 0  # one tag for everything: per-pair FIFO order is what keeps a message's parts together


def _layout(start: int, descs: Sequence[tuple[str, list[int]]]) -> tuple[list[tuple[int, int]], int]:
    """Byte spans of tensors packed one after another from `start`, and where the last ends.
    Each starts 16-byte aligned, so that a byte buffer can be viewed as any dtype."""
    spans, end = [], start
    for dtype, shape in descs:
        begin = -(-end // 16) * 16
        end = begin + math.prod(shape) * tensor_dtype(dtype).itemsize
        spans.append((begin, end))
    return spans, end


def _short(err: BaseException) -> str:
    """The gist of a library error: first line, without gloo's '[file.cc:123]' prefix and advice."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0]


class _TorchTransport(Transport):
    """gloo point-to-point (NCCL for the tensors of CUDA ranks, headers still over gloo), and
    rank 0's TCPStore for the roll call and heartbeats.

    A message is two gloo sends, a head (the blob's length, then the meta's) and a blob: the
    msgpack meta, then with gloo the tensors' bytes; one transfer however many tensors, as each
    gloo message costs a round of handshakes. With NCCL the tensors follow one by one.

    Heartbeats: each rank's heartbeat thread rewrites its `hb/<rank>` key with a counter and
    reads the others'; a counter that moved means alive. If rank 0 dies, its store goes with
    it and store calls fail: that is how rank 0's loss is seen. Goodbyes travel as messages."""

    def __init__(self, rank, world_size, master_addr, master_port, device, peer_timeout,
                 connect_timeout, backend):
        super().__init__(rank, world_size, device, peer_timeout)
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"unknown torch backend {backend!r} (use 'gloo' or 'nccl')")
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"backend 'nccl' needs a CUDA device, not {device}")
        # gloo cannot send CUDA tensors: they travel through CPU memory
        self._inline = backend == "gloo"
        self._where = f"{master_addr}:{master_port}"
        deadline = time.monotonic() + connect_timeout
        self._store = _open_store(master_addr, master_port, rank, world_size, connect_timeout, deadline)
        try:
            _roll_call(self._store, rank, world_size, deadline, connect_timeout, self._where)
            beat_store = dist.TCPStore(master_addr, master_port, is_master=False,
                                       timeout=timedelta(seconds=max(1.0, peer_timeout / 2)))
        except RuntimeError as err:
            raise PipelineError(f"rank 0 was lost (its store at {self._where} failed: {_short(err)})") from None
        self._peers.restart_clock()
        self._stop = threading.Event()
        self._beater = self._thread(self._beat, "heartbeat", beat_store)
        # creating the group blocks until every rank takes part: watch the heartbeats meanwhile
        self._ctrl = self._while_peers_live(
            lambda: dist.ProcessGroupGloo(dist.PrefixStore("gloo", self._store), rank, world_size, _FOREVER))
        self._data = self._ctrl if self._inline else _nccl_group(self._store, rank, world_size)
        self._receivers = {peer: self._thread(self._receive_from, f"recv-{peer}", peer)
                           for peer in self._peers.others}
        # sends complete asynchronously; this thread waits for them in order, then drops the buffers
        self._outbox: SimpleQueue = SimpleQueue()
        self._settler = self._thread(self._settle_sends, "sends")
        self._started()

    def _thread(self, target, name, *args) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"mlora-{name}-{self.rank}")
        thread.start()
        return thread

    def _post(self, dst, kind, header, tensors):
        meta = pack_meta(kind, header, tensors)
        spans, size = _layout(len(meta), describe(tensors)) if self._inline else ([], len(meta))
        blob = torch.empty(size, dtype=torch.uint8)
        blob[:len(meta)] = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
        for t, (begin, end) in zip(tensors, spans):  # the copy that lets the caller reuse `t`
            blob[begin:end].view(t.dtype).view(t.shape).copy_(t.detach())
        # NCCL: a private contiguous copy; its works finish on the GPU stream, and
        # ProcessGroupNCCL keeps their tensors alive until then
        wire = [] if self._inline else [t.detach().to(self.device, memory_format=torch.contiguous_format,
                                                      copy=True) for t in tensors]
        head = torch.tensor([blob.numel(), len(meta)], dtype=torch.int64)
        try:
            works = [self._ctrl.send([head], dst, _TAG), self._ctrl.send([blob], dst, _TAG)]
            for t in wire:
                if t.numel():
                    self._data.send([t], dst, _TAG)
        except RuntimeError as err:  # gloo refuses at once when the link is already down
            raise self._link_error(dst, err) from None
        self._outbox.put((dst, works, [head, blob]))

    def _receive_from(self, src: int) -> None:
        """Take every message `src` sends as soon as it comes; ends with its goodbye, or when
        the link breaks."""
        while True:
            try:
                head = torch.empty(2, dtype=torch.int64)
                self._ctrl.recv([head], src, _TAG).wait()
                size, meta_len = head.tolist()
                blob = torch.empty(size, dtype=torch.uint8)
                self._ctrl.recv([blob], src, _TAG).wait()
                meta = unpack(blob[:meta_len].numpy().tobytes())
            except RuntimeError as err:
                if not self._closed:
                    self._link_error(src, err)
                return
            except Exception as err:  # a bad message must not look like a hang
                self._peers.lost(src, f"it sent an unreadable message: {err!r}")
                return
            self._peers.heard_from(src)
            if meta["kind"] == "bye":
                self._peers.said_goodbye(src, meta["h"])
                return
            self._inbox.put((src, meta["kind"]), (meta, (blob, meta_len)))

    def _tensors(self, src, descs, payload):
        blob, meta_len = payload
        if self._inline:
            # each tensor its own copy on the device: views of one byte buffer as several dtypes
            # would trip up torch.save and safetensors
            spans, _ = _layout(meta_len, descs)
            return [blob[begin:end].view(tensor_dtype(dtype)).view(shape).to(self.device, copy=True)
                    for (dtype, shape), (begin, end) in zip(descs, spans)]
        # NCCL: post and wait on the caller's thread so that its CUDA stream is the one ordered
        # after the transfer (this wait does not block the CPU)
        tensors = [torch.empty(shape, dtype=tensor_dtype(dtype), device=self.device) for dtype, shape in descs]
        for work in [self._data.recv([t], src, _TAG) for t in tensors if t.numel()]:
            work.wait()
        return tensors

    def _while_peers_live(self, fn: Callable[[], Any]) -> Any:
        """fn() on a helper thread while this one watches the peers: a gloo call can be neither
        polled nor interrupted. (A helper left stuck after an error stays blocked until exit.)"""
        box: dict[str, Any] = {}
        done = threading.Event()

        def run():
            try:
                box["value"] = fn()
            except BaseException as err:  # handed over to the caller's thread
                box["error"] = err
            finally:
                done.set()

        self._thread(run, "wait")
        while not done.wait(_POLL):
            self._peers.check()
        if isinstance(box.get("error"), RuntimeError):
            raise PipelineError(f"cannot connect to the other ranks: {_short(box['error'])}") from None
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _beat(self, store) -> None:
        beats, seen = 0, {}
        while not self._stop.is_set():
            try:
                beats += 1
                store.set(f"hb/{self.rank}", str(beats))
                for peer in self._peers.others:
                    value = store.get(f"hb/{peer}")
                    if value != seen.get(peer):
                        seen[peer] = value
                        self._peers.heard_from(peer)
            except RuntimeError as err:  # the store lives in rank 0: it is gone or hung
                if not self._stop.is_set() and self.rank != 0:
                    self._peers.lost(0, f"its store at {self._where} stopped answering: {_short(err)}")
                return
            self._stop.wait(self.heartbeat_interval)

    def _link_error(self, peer: int, err: BaseException) -> PipelineError:
        """A broken gloo link to `peer` as a PipelineError (a peer that closed said goodbye first)."""
        if not self._peers.is_closed(peer):
            self._peers.lost(peer, _short(err))
        return self._peers.error([peer])

    def _settle_sends(self) -> None:
        while (item := self._outbox.get()) is not None:
            dst, works, _buffers = item
            try:
                for work in works:
                    work.wait()
            except RuntimeError as err:  # the receiver is gone
                self._link_error(dst, err)

    def _still_busy(self) -> bool:
        """Whether some send is not taken yet (and nothing is lost), or some live peer has not
        said goodbye yet (so our thread receiving from it still runs)."""
        something_lost = self._peers.error() is not None  # (this also files silent peers as lost)
        if self._settler.is_alive() and not something_lost:
            return True
        return any(t.is_alive() and not self._peers.is_lost(p) for p, t in self._receivers.items())

    def _close(self):
        # Goodbye to every live peer, after all we sent before: it ends that peer's thread
        # receiving from us, and carries the rank we lost, if any.
        for peer in self._peers.others:
            if not self._peers.is_lost(peer):
                try:
                    self._post(peer, "bye", self._peers.first_loss(), [])
                except PipelineError:
                    pass
        self._outbox.put(None)
        # No thread may be left to return from a gloo wait while the interpreter shuts down:
        # Python would end it in the middle of C++ code, and the process would abort.
        while self._still_busy():
            time.sleep(_POLL)
        self._stop.set()
        self._beater.join(self.peer_timeout)
        # Abort, not shut down: a thread still waiting on a lost peer stays blocked rather than
        # failing during the interpreter's shutdown.
        for group in {id(self._ctrl): self._ctrl, id(self._data): self._data}.values():
            try:
                group.abort()
            except RuntimeError:
                pass
        # A wait on a lost peer's broken link (a send still pending to it, above all) fails a
        # moment later: its thread must end now, not return into an interpreter shutting down (the
        # process then aborts, "terminate called without an active exception", after its own
        # line). A wait on a peer that hangs with its link open never returns: that one's thread
        # is left blocked, as the abort above leaves it.
        deadline = time.monotonic() + _LOST_WAITS_END
        for thread in (self._settler, *self._receivers.values()):
            thread.join(max(0.0, deadline - time.monotonic()))


def _open_store(addr: str, port: int, rank: int, world_size: int, timeout: float, deadline: float):
    if rank != 0 and not _listening(addr, port, deadline):
        # (TCPStore's own wait for its server can run to twice its timeout)
        raise PipelineError(f"rank 0 did not join within {timeout:g} s (nothing answered at {addr}:{port})")
    if rank != 0 and other_transport.is_zeromq(other_transport.first_bytes(addr, port)):
        err = other_transport.mismatch(rank, "torch", "zmq", f"{addr}:{port}")
        other_transport.tell_zmq_rank_0(addr, port, rank, world_size, err)
        raise PipelineError(err)

    def make():
        return dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout),
                             wait_for_workers=False)

    try:
        if rank == 0:
            return make()
        store = _within(make, max(_STORE_HANDSHAKE, deadline - time.monotonic()))
        if store is None:
            raise PipelineError(f"rank 0 did not join within {timeout:g} s (what answers at {addr}:{port} is not "
                                f"rank 0's store: is another program using this port?)")
        return store
    except RuntimeError as err:
        if rank == 0:
            raise PipelineError(f"rank 0 cannot listen on {addr}:{port} ({_short(err)}); "
                                "is another run using this port?") from None
        raise PipelineError(f"rank 0 was lost (its store at {addr}:{port} failed: {_short(err)})") from None


# What a client's handshake with rank 0's store may take even when the deadline has passed:
# rank 0 may have started listening only just before it.
_STORE_HANDSHAKE = 5.0


def _within(make: Callable[[], Any], seconds: float) -> Any:
    """make()'s result, or None if it has not returned within `seconds`. TCPStore's client waits
    for its handshake without end when what listens at the port is not a TCPStore (another
    program's socket accepts and never answers), whatever its timeout; the thread left waiting
    is a daemon, and the process that gives up exits with it."""
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["result"] = make()
        except BaseException as err:  # (raised in the caller's thread)
            done["error"] = err

    thread = threading.Thread(target=run, daemon=True, name="mlora-store-handshake")
    thread.start()
    thread.join(seconds)
    if "error" in done:
        raise done["error"]
    return done.get("result")


def _listening(addr: str, port: int, deadline: float) -> bool:
    """Whether something accepts connections at addr:port before the deadline."""
    while True:
        try:
            with socket.create_connection((addr, port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL)


def _roll_call(store, rank: int, world_size: int, deadline: float, timeout: float, where: str) -> None:
    """Each rank ticks `join/<rank>` and waits until every rank has; a second tick means two
    processes claim one rank. If rank 0 gives up, it leaves its verdict in the store for the
    others: their own deadlines may be a little later, and the store dies with rank 0. A rank
    of another world size (ranks started with different --balance or --world_size) can never
    join: it leaves its verdict too, so that every rank fails at once naming it, rather than
    wait out the timeout to say only that some rank did not join."""
    if store.compare_set("world_size", "", str(world_size)) != str(world_size).encode():
        err = other_world(rank, world_size, int(store.get("world_size")), where)
        store.compare_set("verdict", "", err)  # (the first culprit's, if several)
        raise PipelineError(err)
    if store.add(f"join/{rank}", 1) > 1:
        raise PipelineError(f"rank {rank} is claimed by two processes")
    store.set(f"hb/{rank}", "0")
    keys = [f"join/{r}" for r in range(world_size)]
    while not store.check(keys):
        err = None
        if store.check(["verdict"]):
            err = store.get("verdict").decode()
        elif time.monotonic() > deadline:
            present = [r for r, key in enumerate(keys) if store.check([key])]
            err = not_joined(world_size, present, timeout)
        if err is None:
            time.sleep(_POLL / 5)
        elif rank != 0:
            store.add("gave up", 1)
            raise PipelineError(err)
        else:
            store.compare_set("verdict", "", err)
            present = [r for r, key in enumerate(keys) if store.check([key])]
            wait_until = time.monotonic() + 2.0
            while store.add("gave up", 0) < len(present) - 1 and time.monotonic() < wait_until:
                time.sleep(_POLL / 5)
            raise PipelineError(err)


def _nccl_group(store, rank: int, world_size: int):
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = _FOREVER  # NCCL's watchdog would abort a stage that waits long on purpose
    return dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, world_size, options)
