"""The pipeline transport between real processes on 127.0.0.1, for both kinds ("torch", "zmq").

A scenario is one function run by every rank, each in its own process; the test collects what
each returned (or the PipelineError it raised). Every wait has a deadline and leftover processes
are killed, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch

from mlora.pipeline.transport import PipelineError, connect

from conftest import free_port

KINDS = ["torch", "zmq"]
CPU = torch.device("cpu")

# forkserver: children fork from a clean server that has already imported torch, which saves
# seconds per process on a small machine (and nothing is forked from pytest's threads)
_MP = multiprocessing.get_context("forkserver")
_MP.set_forkserver_preload(["torch", "torch.distributed", "zmq", "msgpack", "mlora.pipeline.transport",
                            "mlora.pipeline.zmq_transport",
                            __name__])


_REPORTS = None  # in a child: the queue its results go to, for scenarios that report progress


def report(rank: int, status: str) -> None:
    _REPORTS.put((rank, status, None, time.time()))


def _child(scenario, kind, rank, world, port, results, options):
    global _REPORTS
    _REPORTS = results
    try:
        # as torch.save bytes: a pickled tensor would travel as shared memory that dies with the child
        value = io.BytesIO()
        torch.save(scenario(kind, rank, world, port, **options), value)
        results.put((rank, "ok", value.getvalue(), time.time()))
    except PipelineError as err:
        results.put((rank, "PipelineError", str(err), time.time()))
    except BaseException:  # reported to the test, which fails on it
        results.put((rank, "crash", traceback.format_exc(), time.time()))


class Ranks:
    """Processes running `scenario(kind, rank, world, port, **options)`, one per entry of `ranks`
    (default: every rank of the world)."""

    def __init__(self, scenario, kind, world, ranks=None, **options):
        self.port, self.results = free_port(), _MP.Queue()
        self.procs = [(r, _MP.Process(target=_child, daemon=True,
                                      args=(scenario, kind, r, world, self.port, self.results, options)))
                      for r in (range(world) if ranks is None else ranks)]
        for _, proc in self.procs:
            proc.start()

    def proc(self, rank: int):
        return next(proc for r, proc in self.procs if r == rank)

    def next(self, deadline: float) -> tuple:
        """The next report: (rank, status, value, time)."""
        try:
            rank, status, value, when = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail("a rank hung (no result in time)")
        assert status != "crash", f"rank {rank} crashed:\n{value}"
        if status == "ok":
            value = torch.load(io.BytesIO(value), weights_only=False)
        return rank, status, value, when

    def collect(self, n=None, timeout=30.0) -> dict[int, tuple]:
        """{rank: (status, value, time)} for the next `n` (default: all) reports."""
        deadline = time.monotonic() + timeout
        reports = [self.next(deadline) for _ in range(len(self.procs) if n is None else n)]
        return {rank: rest for rank, *rest in reports}

    def values(self, timeout=30.0) -> dict[int, object]:
        results = self.collect(timeout=timeout)
        for rank, (status, value, _) in results.items():
            assert status == "ok", f"rank {rank}: {status}: {value}"
        return {rank: value for rank, (_, value, _) in results.items()}

    def stop(self, timeout=10.0) -> dict[int, int]:
        """Wait for the processes to exit (killing stragglers); {rank: exit code}."""
        deadline = time.monotonic() + timeout
        for _, proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for _, proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        return {r: proc.exitcode for r, proc in self.procs}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop(timeout=0 if exc[0] else 10.0)


def join(kind, rank, world, port, **kw):
    # Scenarios that do not test loss detection get a generous heartbeat timeout: on a loaded
    # 2-core machine a rank's heartbeat thread can stall for seconds (a 3 s timeout once
    # failed the 4-rank ring in CI). The loss tests pass their own, short, peer_timeout.
    kw.setdefault("peer_timeout", 30.0)
    kw.setdefault("connect_timeout", 10.0)
    return connect(kind, rank, world, "127.0.0.1", port, CPU, **kw)


# --- payloads ---------------------------------------------------------------------------------

HEADER = {"kind": "F", "mb": 3, "loss": 1.25, "name": "añ", "flag": True, "none": None,
          "norm": [2, 0.5], "nested": {"rows": [1, 2, 3]}, "blob": b"\x00\xff"}


def sample_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 5, generator=g)
    return [
        wide,
        wide.t(),                                            # not contiguous
        torch.randn(2, 3, 4, generator=g).to(torch.bfloat16),
        torch.randn(4, generator=g).to(torch.float16),
        torch.randn(2, 2, generator=g, dtype=torch.float64),
        torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        torch.tensor([-3, 0, 7], dtype=torch.int8),
        torch.tensor([True, False, True]),
        torch.tensor(2.5),                                   # 0-d
        torch.tensor(7, dtype=torch.int32),                  # 0-d
        torch.zeros(0, 3),                                   # empty
        torch.arange(12, dtype=torch.float32)[::3],          # a strided view of a larger tensor
    ]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.device == CPU
        assert torch.equal(g, w)


# --- scenarios (module level: the child processes import them by name) ------------------------

def echo_scenario(kind, rank, world, port):
    """Rank 0 sends a rich message and an empty one; rank 1 sends each back as received."""
    t = join(kind, rank, world, port)
    try:
        if rank == 0:
            sent = sample_tensors()
            t.send(1, HEADER, sent)
            for x in sent:  # the transport copied them: changing them now must not matter
                x.zero_()
            t.send(1, {"empty": []})
            return [t.recv(1), t.recv(1)]
        for _ in range(2):
            header, tensors = t.recv(0)
            t.send(0, header, tensors)
        return None
    finally:
        t.close()


def order_scenario(kind, rank, world, port, n=25):
    t = join(kind, rank, world, port)
    try:
        if rank == 0:
            for i in range(n):
                t.send(1, {"i": i}, [torch.full((i % 4 + 1,), float(i))])
            return None
        got = [t.recv(0) for _ in range(n)]
        return [(h["i"], x[0].tolist()) for h, x in got]
    finally:
        t.close()


def interleave_scenario(kind, rank, world, port):
    """Ranks 1 and 2 each send three messages to rank 0, which asks for them in its own order."""
    t = join(kind, rank, world, port)
    try:
        if rank == 0:
            t.exchange("sent")  # by now every message is on its way (or has arrived)
            order = [2, 2, 1, 2, 1, 1]
            return [(src, t.recv(src)[0]["n"]) for src in order]
        for n in range(3):
            t.send(0, {"n": f"{rank}.{n}"}, [torch.tensor([rank, n])])
        t.exchange("sent")
        return None
    finally:
        t.close()


def ring_scenario(kind, rank, world, port, laps=3):
    """A token goes round the ring `laps` times, each rank adding its rank to it."""
    t = join(kind, rank, world, port)
    try:
        nxt, prev = (rank + 1) % world, (rank - 1) % world
        seen = []
        if rank == 0:
            t.send(nxt, {"lap": 0}, [torch.zeros(2)])
        for lap in range(laps):
            header, (token,) = t.recv(prev)
            seen.append((header["lap"], token.tolist()))
            if rank == 0:
                header = {"lap": lap + 1}
            if rank != 0 or lap + 1 < laps:
                t.send(nxt, header, [token + rank])
        return seen
    finally:
        t.close()


def exchange_scenario(kind, rank, world, port):
    t = join(kind, rank, world, port)
    try:
        first = t.exchange({"rank": rank, "balance": (2, 3), "name": f"r{rank}"})
        second = t.exchange(rank * 10)
        return first, second
    finally:
        t.close()


def victim_scenario(kind, rank, world, port, victim, peer_timeout):
    """Everyone joins; the victim then idles until the test kills (or freezes) it; the others
    block in recv and return what they raised, when, and how long close() took after it."""
    t = join(kind, rank, world, port, peer_timeout=peer_timeout)
    t.exchange("ready")
    report(rank, "ready")
    try:
        if rank == victim:
            time.sleep(60)
        # rank 0 waits for the last rank, everyone else for rank 0: some wait on the victim
        # itself, some on a live rank that will never send
        t.recv(world - 1 if rank == 0 else 0)
        return "received?!"
    except PipelineError as err:
        raised = time.time()
        t.close()
        return str(err), raised, time.time() - raised
    finally:
        t.close()


def early_close_scenario(kind, rank, world, port):
    """Rank 1 closes without sending anything; rank 0 is waiting for it."""
    t = join(kind, rank, world, port)
    try:
        if rank == 1:
            return None
        started = time.monotonic()
        try:
            t.recv(1)
        except PipelineError as err:
            return str(err), time.monotonic() - started
        return "received?!", None
    finally:
        t.close()


def no_show_scenario(kind, rank, world, port, connect_timeout):
    """connect() while some rank never comes: what it raised and after how long."""
    started = time.monotonic()
    try:
        join(kind, rank, world, port, connect_timeout=connect_timeout).close()
    except PipelineError as err:
        return str(err), time.monotonic() - started
    return "joined?!", None


def join_scenario(kind, rank, world, port, connect_timeout, hold=None):
    t = join(kind, rank, world, port, connect_timeout=connect_timeout)
    try:
        everyone = t.exchange(rank)
        if hold is not None and rank == 0:
            hold.wait(20)
        return everyone
    finally:
        t.close()


# --- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_of_header_and_tensors(kind):
    with Ranks(echo_scenario, kind, 2) as ranks:
        (h1, t1), (h2, t2) = ranks.values()[0]
    assert h1 == HEADER
    assert_same(t1, sample_tensors())
    assert h2 == {"empty": []} and t2 == []


@pytest.mark.parametrize("kind", KINDS)
def test_messages_on_one_channel_arrive_in_order(kind):
    with Ranks(order_scenario, kind, 2) as ranks:
        got = ranks.values()[1]
    assert got == [(i, [float(i)] * (i % 4 + 1)) for i in range(25)]


@pytest.mark.parametrize("kind", KINDS)
def test_messages_from_two_sources_are_received_in_the_chosen_order(kind):
    with Ranks(interleave_scenario, kind, 3) as ranks:
        got = ranks.values()[0]
    assert got == [(2, "2.0"), (2, "2.1"), (1, "1.0"), (2, "2.2"), (1, "1.1"), (1, "1.2")]


@pytest.mark.parametrize("kind", KINDS)
def test_four_rank_ring(kind):
    with Ranks(ring_scenario, kind, 4) as ranks:
        seen = ranks.values()
    # a full lap adds 0+1+2+3 = 6; rank r > 0 sees the token after ranks 0..r-1 added theirs,
    # rank 0 at the end of each lap
    for rank in range(4):
        before = sum(range(rank))
        assert seen[rank] == [(lap, [6.0 * lap + before + 6.0 * (rank == 0)] * 2)
                              for lap in range(3)], rank


@pytest.mark.parametrize("kind", KINDS)
def test_exchange_gathers_every_ranks_value_in_rank_order(kind):
    with Ranks(exchange_scenario, kind, 3) as ranks:
        got = ranks.values()
    want = ([{"rank": r, "balance": [2, 3], "name": f"r{r}"} for r in range(3)], [0, 10, 20])
    assert all(got[r] == want for r in range(3))


# Rank 0 waits on the last rank, the others on rank 0. Killing rank 2: rank 0 waits on it, rank 1
# does not. Killing rank 0: the torch store goes with it. Freezing rank 1 (SIGSTOP): its sockets
# stay open, so for torch only the missing heartbeats can tell (for zmq they are all it ever has,
# so freezing would add nothing there to killing).
LOSSES = [(kind, victim, sig) for kind in KINDS for victim, sig in [(2, signal.SIGKILL), (0, signal.SIGKILL)]]
LOSSES.append(("torch", 1, signal.SIGSTOP))


@pytest.mark.parametrize("kind,victim,sig", LOSSES, ids=[f"{k}-{s.name}-rank{v}" for k, v, s in LOSSES])
def test_lost_rank_is_reported_by_every_survivor_within_peer_timeout(kind, victim, sig):
    world, peer_timeout = 3, 3.0
    survivors = [r for r in range(world) if r != victim]
    with Ranks(victim_scenario, kind, world, victim=victim, peer_timeout=peer_timeout) as ranks:
        assert all(status == "ready" for status, _, _ in ranks.collect().values())
        time.sleep(0.5)  # let the survivors block in recv
        killed_at = time.time()
        os.kill(ranks.proc(victim).pid, sig)
        results = ranks.collect(n=len(survivors), timeout=peer_timeout + 10)
        if sig == signal.SIGSTOP:  # killed only once the survivors are gone
            for rank in survivors:
                ranks.proc(rank).join(peer_timeout + 5)
            os.kill(ranks.proc(victim).pid, signal.SIGKILL)
        codes = ranks.stop(timeout=peer_timeout + 5)
    for rank in survivors:
        status, outcome, _ = results[rank]
        assert status == "ok" and len(outcome) == 3, (rank, status, outcome)
        message, raised, closing = outcome
        print(f"{kind}: rank {rank} raised {raised - killed_at:.2f} s after rank {victim} got {sig.name}, "
              f"closed in {closing:.2f} s: {message}")
        assert f"rank {victim} was lost" in message, (rank, message)
        assert raised - killed_at < peer_timeout + 1.0, (rank, raised - killed_at)
    assert codes == {r: (-signal.SIGKILL if r == victim else 0) for r in range(world)}


@pytest.mark.parametrize("kind", KINDS)
def test_a_peer_that_closes_fails_a_recv_waiting_for_it_at_once(kind):
    with Ranks(early_close_scenario, kind, 2) as ranks:
        message, elapsed = ranks.values()[0]
    assert message == "rank 1 closed its connection while rank 0 was waiting for it"
    assert elapsed < 2.0  # its goodbye says so: no heartbeat timeout involved


@pytest.mark.parametrize("kind", KINDS)
def test_a_rank_that_never_joins_fails_the_others_within_connect_timeout(kind):
    world, timeout = 3, 3.0
    # rank 2 missing and rank 0 missing (different code paths), side by side to share the wait
    worlds = {missing: Ranks(no_show_scenario, kind, world, ranks=[r for r in range(world) if r != missing],
                             connect_timeout=timeout) for missing in (2, 0)}
    try:
        results = {missing: ranks.values(timeout=timeout + 15) for missing, ranks in worlds.items()}
    finally:
        for ranks in worlds.values():
            ranks.stop()
    for missing, by_rank in results.items():
        for rank, (message, elapsed) in by_rank.items():
            print(f"{kind}: rank {rank} gave up after {elapsed:.2f} s: {message}")
            assert f"rank {missing} did not join within 3 s" in message
            # (2 s of slack: four processes on two cores once took 4.005 s, over a 1 s slack; a
            # wait that doubles, or never ends, still fails)
            assert timeout - 0.5 < elapsed < timeout + 2.0


@pytest.mark.parametrize("kind", KINDS)
def test_master_port_in_use_is_a_pipeline_error_naming_it(kind):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(PipelineError, match=f"127.0.0.1:{port}"):
            connect(kind, 0, 2, "127.0.0.1", port, CPU, connect_timeout=2.0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_port_another_program_holds_fails_the_other_ranks_within_connect_timeout(kind):
    """Rank 0 cannot listen there (above); another rank finds a socket that accepts and never
    answers. TCPStore's client waited on it for ever, whatever its timeout; the zmq rank said
    only that nothing answered. Both name the port and what holds it."""
    import threading

    outcome = {}

    def join() -> None:
        start = time.monotonic()
        try:
            connect(kind, 1, 2, "127.0.0.1", port, CPU, connect_timeout=2.0).close()
            outcome["said"] = "connected"
        except PipelineError as err:
            outcome["said"] = str(err)
        outcome["elapsed"] = time.monotonic() - start

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        thread = threading.Thread(target=join, daemon=True)
        thread.start()
        thread.join(30)
    assert outcome.get("said", "hangs").startswith("rank 0 did not join within 2 s (what answers at "
                                                   f"127.0.0.1:{port} is not rank 0"), outcome
    assert outcome["said"].endswith(": is another program using this port?)"), outcome
    assert outcome["elapsed"] < 2.0 + 5.0 + 2.0  # connect_timeout, the store's handshake, slack


def _free_port_from(port: int, results) -> None:
    """In another process: the port free_port() gives when its search starts at `port`."""
    import conftest

    conftest._next_port[0] = conftest._PORTS.index(port)
    results.put(conftest.free_port())


def test_a_free_port_belongs_to_one_test_process():
    """A port from free_port() stays this process's: another test process (a suite running at
    the same time) searching from that very port gets another one; and it lies below the
    ephemeral range, where the kernel hands out ports by itself. (A port 0 bound and closed
    was free only until the next bind anywhere, and rank 0 then found it taken.)"""
    import conftest

    port = free_port()
    assert port in conftest._PORTS  # (below the ephemeral range)
    results = _MP.Queue()
    other = _MP.Process(target=_free_port_from, args=(port, results), daemon=True)
    other.start()
    try:
        theirs = results.get(timeout=60)
    finally:
        other.join(10)
    assert theirs != port and theirs in conftest._PORTS
    with socket.socket() as s:  # and it is free: rank 0 can listen there
        s.bind(("127.0.0.1", port))


def test_a_span_of_free_ports_belongs_to_one_test_process():
    """free_port(span=2): the port after it is claimed too (torchrun's ranks meet there, beside
    its rendezvous): another test process searching from it gets another; and this process
    does not hand it out again."""
    import conftest

    port = free_port(span=2)
    results = _MP.Queue()
    other = _MP.Process(target=_free_port_from, args=(port + 1, results), daemon=True)
    other.start()
    try:
        theirs = results.get(timeout=60)
    finally:
        other.join(10)
    assert theirs not in (port, port + 1) and theirs in conftest._PORTS
    assert free_port() not in (port, port + 1)


@pytest.mark.parametrize("setting,ports", [("32768\t60999\n", range(20768, 32768)),
                                           ("1024\t40000\n", range(40001, 52001)),
                                           ("1024\t65535\n", range(1024, 65536)),
                                           ("unreadable", range(20768, 32768))])
def test_free_ports_lie_outside_any_ephemeral_range(tmp_path, setting, ports):
    """Ports below the kernel's ephemeral range, above it where too few lie below, and any where
    it spans all of them: a host tuned to "1024 65535" left none below it, and conftest's import
    (modulo the range's length) failed every test of every suite."""
    import conftest

    path = tmp_path / "ip_local_port_range"
    path.write_text(setting)
    assert conftest._port_range(str(path)) == ports


@pytest.mark.parametrize("kind", KINDS)
def test_rank_outside_the_world_is_refused(kind):
    with pytest.raises(PipelineError, match="rank 2 is outside 0..1"):
        connect(kind, 2, 2, "127.0.0.1", free_port(), CPU)


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_claiming_one_rank(kind):
    """One of the two claimants of rank 1 is refused; the other and rank 0 carry on."""
    refused = _MP.Event()  # rank 0 stays up until then: a refusal needs rank 0 to answer
    with Ranks(join_scenario, kind, 2, ranks=[0, 1, 1], connect_timeout=10.0, hold=refused) as ranks:
        deadline, outcomes = time.monotonic() + 30, []
        for _ in range(3):
            outcomes.append(ranks.next(deadline)[:3])
            if outcomes[-1][1] == "PipelineError":
                refused.set()
    outcomes.sort(key=lambda o: (o[0], o[1]))
    assert [o[:2] for o in outcomes] == [(0, "ok"), (1, "PipelineError"), (1, "ok")], outcomes
    assert outcomes[0][2] == outcomes[2][2] == [0, 1]
    assert "rank 1 is claimed by two processes" in outcomes[1][2]


def other_world_scenario(kind, rank, world, port, connect_timeout, worlds):
    """join_scenario with each rank's own world size (worlds: {rank: world_size})."""
    return join_scenario(kind, rank, worlds.get(rank, world), port, connect_timeout)


@pytest.mark.parametrize("kind", KINDS)
def test_a_rank_of_another_world_size_fails_every_rank_at_once(kind):
    """Ranks started with different --balance: rank 1 was refused at once, but rank 0 waited out
    connect_timeout (300 s by default) to say only that rank 1 did not join."""
    start = time.monotonic()
    with Ranks(other_world_scenario, kind, 2, connect_timeout=30.0, worlds={1: 3}) as ranks:
        outcomes = ranks.collect(timeout=40)
    assert time.monotonic() - start < 20  # (not connect_timeout)
    for rank, (status, said, _) in outcomes.items():
        assert status == "PipelineError", (rank, said)
        assert said.startswith(f"rank 1 has world_size 3, but rank 0 at 127.0.0.1:{ranks.port} has 2: "), said


def other_kind_scenario(kind, rank, world, port, connect_timeout, kinds):
    """join_scenario with each rank's own transport (kinds: {rank: kind})."""
    return join_scenario(kinds.get(rank, kind), rank, world, port, connect_timeout)


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_of_different_transports_fail_every_rank_at_once(kind):
    """Rank 0 on `kind`, rank 1 on the other: the two rendezvous never met, both waited out
    connect_timeout to say the other did not join (the torch rank printing torch's store client
    retrying, C++ stacks and all, against ZeroMQ's socket)."""
    other = "zmq" if kind == "torch" else "torch"
    start = time.monotonic()
    with Ranks(other_kind_scenario, kind, 2, connect_timeout=30.0, kinds={1: other}) as ranks:
        outcomes = ranks.collect(timeout=40)
    assert time.monotonic() - start < 20  # (not connect_timeout)
    want = (f"rank 1 runs --transport {other}, but rank 0 at 127.0.0.1:{ranks.port} runs --transport {kind}: "
            "start every rank with the same --transport")
    assert {rank: tuple(said[:2]) for rank, said in outcomes.items()} == {0: ("PipelineError", want),
                                                                          1: ("PipelineError", want)}


# A rank that sends without pause to rank 0 (each send waited on by its thread "sends"), until
# rank 0 is killed: it sees the loss, closes and exits through the interpreter's shutdown.
_SENDING_WHEN_RANK_0_DIES = """
import sys
import torch
from mlora.pipeline.transport import PipelineError, connect
rank, port = int(sys.argv[1]), int(sys.argv[2])
transport = connect("torch", rank, 2, "127.0.0.1", port, torch.device("cpu"), peer_timeout=5, connect_timeout=30)
transport.exchange(None)
print("joined", flush=True)
try:
    while True:
        transport.recv(1) if rank == 0 else transport.send(0, {}, [torch.zeros(64, 64)])
except PipelineError as err:
    print(err, file=sys.stderr)
finally:
    transport.close()
sys.exit(3)
"""


def test_a_rank_that_loses_rank_0_mid_send_exits_with_its_line_not_an_abort():
    """Its thread waiting on a send to the lost rank 0 returned only once the interpreter was
    shutting down, and the process aborted ("terminate called without an active exception",
    exit -6) after its one line, nearly every time. (multiprocessing's children, as in the tests
    above, leave by os._exit and never showed it.)"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(2):
        port = free_port()
        ranks = [subprocess.Popen([sys.executable, "-c", _SENDING_WHEN_RANK_0_DIES, str(rank), str(port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for rank in (0, 1)]
        try:
            for rank in ranks:
                assert rank.stdout.readline() == "joined\n", rank.communicate(timeout=30)
            ranks[0].kill()
            _, stderr = ranks[1].communicate(timeout=60)
        finally:
            for rank in ranks:
                rank.kill()
                rank.wait()
        assert ranks[1].returncode == 3, stderr[-2000:]
        assert "rank 0 was lost" in stderr and "terminate" not in stderr, stderr[-2000:]


# In a fresh interpreter where `import zmq` fails, as where pyzmq is not installed: every module
# of the pipeline imports, the torch transport connects, and nothing imported ZeroMQ.
_WITHOUT_PYZMQ = """
import sys
sys.modules["zmq"] = None
import torch
import mlora.pipeline.dry_run, mlora.pipeline.run, mlora.pipeline.worker
from mlora.pipeline.transport import connect
transport = connect("torch", 0, 1, "127.0.0.1", int(sys.argv[1]), torch.device("cpu"), connect_timeout=20)
print(transport.exchange("ok"), sorted(m for m, module in sys.modules.items() if module and "zmq" in m))
transport.close()
"""


def test_the_torch_transport_needs_no_pyzmq():
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_PYZMQ, str(free_port())], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['ok'] []", proc.stdout
