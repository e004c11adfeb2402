"""The pipeline schedule: which stage runs which forward and backward, in what order.

Every rank calls `build_plan` with the same inputs and gets the same `Plan` (it is a pure
function of them), then runs `plan.stages[rank]` in order. Messages between neighbouring
stages are matched first-in first-out per channel, so the plan is built to make that matching
right by construction:

- Stage 0 forwards in `feed_order`; a stage s > 0 only ever forwards the oldest activation it
  has received, which arrive in stage s-1's forward order. By induction every stage forwards
  in `feed_order`.
- The last stage runs a micro-batch's backward as soon as its forward ends (backward first,
  and its own gradient is ready at once), so its backward order is its forward order. A stage
  s < P-1 only ever runs the backward of the oldest gradient it has received, which arrive in
  stage s+1's backward order. So every stage backwards in `feed_order` too.
- The plan is the trace of a simulated run in which every action started after the actions it
  waits on had finished. Its dependency graph is therefore acyclic, and executing it with any
  real timings cannot deadlock (async sends, blocking receives).

The one real decision is stage 0's: which micro-batch to feed next (see `_Feeder`). The Rule
it obeys: a micro-batch of adapter a's step k+1 enters only after every micro-batch of a's
step k has finished its backward on stage 0, so no stage ever runs on stale weights. Because
backwards follow each adapter's stream order, the backward of a step's `last_in_step`
micro-batch is the last of that step on every stage: a stage may apply its slice of the
optimizer step right after it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

FORWARD = "F"
BACKWARD = "B"
_INF = math.inf


@dataclass(frozen=True)
class MicroBatchRef:
    id: int  # unique across all adapters
    adapter: str
    step: int  # the adapter's optimizer step, 0-based
    last_in_step: bool


@dataclass(frozen=True)
class Action:
    op: str  # FORWARD or BACKWARD
    mb: int  # MicroBatchRef.id


@dataclass
class Plan:
    num_stages: int
    stages: list[list[Action]]  # stages[s]: the actions of stage s, in execution order
    feed_order: list[int]  # micro-batch ids in the order stage 0 forwards them


@dataclass
class StageCosts:
    """Time of one micro-batch's forward / backward on each stage, and of one hop between stages.

    build_plan schedules with these, so every rank must pass the same values (constants, or
    figures broadcast from one rank), never its own measurements.
    """

    forward: list[float]
    backward: list[float]
    send: float = 0.0

    @classmethod
    def uniform(cls, num_stages: int, forward: float = 1.0, backward: float = 2.0,
                send: float = 0.0) -> StageCosts:
        return cls([forward] * num_stages, [backward] * num_stages, send)


@dataclass
class SimResult:
    makespan: float
    busy: list[float]  # per stage
    bubble_fraction: list[float]  # per stage: idle share of the makespan
    # Idle share over every stage's steady window, from the start of its first backward to the
    # end of its last forward: that leaves out the fill (warm-up forwards, waiting for the first
    # gradient) and the drain (the backwards left after the last forward).
    steady_bubble_fraction: float


class DeadlockError(RuntimeError):
    """Executing the plan would block for ever: some stage waits on an action that never comes."""


def max_in_flight_1f1b(num_stages: int, stage: int) -> int:
    """Classic 1F1B: stage s holds at most P - s micro-batches forwarded but not yet backwarded."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not in 0..{num_stages - 1}")
    return num_stages - stage


def build_plan(num_stages: int, streams: dict[str, list[MicroBatchRef]],
               costs: StageCosts | None = None, max_in_flight: list[int] | None = None,
               candidate_num: int | None = None) -> Plan:
    """A greedy 1F1B list schedule, simulated with `costs` (default: forward 1, backward 2).

    `streams` holds each adapter's micro-batches in order; dict order breaks ties between
    adapters. Each stage, whenever it is free, runs a ready backward first, else a ready forward
    if it holds fewer than max_in_flight[s] (default: 1F1B's P - s) micro-batches.
    `candidate_num` (None: no limit) is the config's train_lora_candidate_num: stage 0 feeds
    from at most that many adapters at a time, admitted in dict order; an adapter leaves once
    its stream is wholly fed, and the next one in dict order takes its place.
    Cost: about 10 us per action here (32,000 micro-batches on 8 stages build in about 5 s).
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}")
    if candidate_num is not None and candidate_num < 1:
        raise ValueError(f"candidate_num must be at least 1, got {candidate_num}")
    _index_streams(streams)
    costs = costs if costs is not None else StageCosts.uniform(num_stages)
    _check_costs(costs, num_stages)
    return _Builder(num_stages, streams, costs, _bounds(num_stages, max_in_flight), candidate_num).run()


class _Feeder:
    """Stage 0's choice of the next micro-batch to forward.

    Policy, to keep the pipeline full:
    1. An adapter's step, once started, is fed to its end before any other adapter's. A step
       fed contiguously finishes (and frees its adapter for the next step) as early as
       possible, and leaves the longest run of other adapters' work between two steps of the
       same adapter: with n adapters and m micro-batches per step that run is (n-1)*m, against
       n-1 when adapters alternate per micro-batch. 1F1B never stalls the feed as long as it is
       at least P-1 (stage 0 gets a micro-batch's gradient back P-1 feeds later).
    2. Otherwise, among adapters whose next micro-batch the Rule admits: the one with the most
       steps still to feed (the longest chain of serialised steps is the critical path: starting
       it early leaves the short adapters to fill its gaps at the end, rather than the other way
       round), then the least recently fed (round-robin, which staggers equal adapters), then
       dict order.
    Only admitted adapters are fed: at most `candidate_num` at a time, in dict order, each
    until its stream is wholly fed (the single-process trainer's admission, applied to the
    streams of one plan: a run cut into segments admits anew in each).
    """

    def __init__(self, streams: dict[str, list[MicroBatchRef]], candidate_num: int | None = None):
        self.streams = [list(s) for s in streams.values()]
        n = len(self.streams)
        self.limit = n if candidate_num is None else candidate_num
        self.queued = deque(a for a in range(n) if self.streams[a])  # not admitted yet
        self.admitted: list[int] = []  # admitted and not wholly fed
        self.adapter_of = {mb.id: a for a, s in enumerate(self.streams) for mb in s}
        self.pos = [0] * n  # next micro-batch to feed, per adapter
        self.unfinished = [0] * n  # fed, but backward on stage 0 not done yet
        self.last_fed = [-1] * n  # feed number of the adapter's latest micro-batch
        self.steps_left = [_count_steps(s) for s in self.streams]  # steps not yet wholly fed
        self.open: int | None = None  # adapter whose current step is partly fed
        self.fed = 0

    def _admissible(self, a: int) -> bool:
        stream, pos = self.streams[a], self.pos[a]
        if pos == len(stream):
            return False
        same_step = pos > 0 and stream[pos].step == stream[pos - 1].step
        return same_step or self.unfinished[a] == 0  # the Rule

    def choose(self) -> int | None:
        if self.open is not None:
            return self.open
        while self.queued and len(self.admitted) < self.limit:
            self.admitted.append(self.queued.popleft())
        ready = [a for a in self.admitted if self._admissible(a)]
        if not ready:
            return None
        return min(ready, key=lambda a: (-self.steps_left[a], self.last_fed[a], a))

    def feed(self, a: int) -> int:
        stream = self.streams[a]
        mb = stream[self.pos[a]]
        self.pos[a] += 1
        self.unfinished[a] += 1
        self.last_fed[a] = self.fed
        self.fed += 1
        step_fed = self.pos[a] == len(stream) or stream[self.pos[a]].step != mb.step
        if step_fed:
            self.steps_left[a] -= 1
        if self.pos[a] == len(stream):
            self.admitted.remove(a)
        self.open = None if step_fed else a
        return mb.id

    def backward_done(self, mb: int) -> None:
        self.unfinished[self.adapter_of[mb]] -= 1


class _Builder:
    """Event-driven list scheduling. Actions are committed in order of start time across all
    stages; since every cost is positive, whatever a committed action sends arrives strictly
    after its start, so a stage deciding at time t already knows every arrival up to t."""

    def __init__(self, num_stages: int, streams: dict[str, list[MicroBatchRef]],
                 costs: StageCosts, bound: list[int], candidate_num: int | None = None):
        self.P, self.costs, self.bound = num_stages, costs, bound
        self.feeder = _Feeder(streams, candidate_num)
        self.total = sum(len(s) for s in streams.values())
        self.free_at = [0.0] * num_stages
        self.in_flight = [0] * num_stages
        # (arrival time, mb) in arrival order. Stage 0 feeds itself, so fwd_in[0] stays empty;
        # the last stage's bwd_in holds its own finished forwards (the loss is computed there).
        self.fwd_in: list[deque] = [deque() for _ in range(num_stages)]
        self.bwd_in: list[deque] = [deque() for _ in range(num_stages)]
        self.stages: list[list[Action]] = [[] for _ in range(num_stages)]
        self.feed_order: list[int] = []

    def next_action(self, s: int) -> tuple[float, str] | None:
        """When stage s can start its next action, and which kind, given what it knows now."""
        start_b = max(self.free_at[s], self.bwd_in[s][0][0]) if self.bwd_in[s] else _INF
        start_f = _INF
        if self.in_flight[s] < self.bound[s]:
            if s == 0:
                # Stage 0's own state only changes through its own actions, so if nothing is
                # admissible now it waits for a backward (start_b) and decides again then.
                if self.feeder.choose() is not None:
                    start_f = self.free_at[0]
            elif self.fwd_in[s]:
                start_f = max(self.free_at[s], self.fwd_in[s][0][0])
        if start_b == start_f == _INF:
            return None
        return (start_b, BACKWARD) if start_b <= start_f else (start_f, FORWARD)  # ties: backward

    def commit(self, s: int, start: float, op: str) -> list[int]:
        """Runs op on stage s at start; returns the stages whose next action may have changed."""
        send, last = self.costs.send, self.P - 1
        if op == FORWARD:
            if s == 0:
                mb = self.feeder.feed(self.feeder.choose())
                self.feed_order.append(mb)
            else:
                mb = self.fwd_in[s].popleft()[1]
            end = start + self.costs.forward[s]
            self.in_flight[s] += 1
            if s == last:
                self.bwd_in[s].append((end, mb))
                touched = [s]
            else:
                self.fwd_in[s + 1].append((end + send, mb))
                touched = [s, s + 1]
        else:
            mb = self.bwd_in[s].popleft()[1]
            end = start + self.costs.backward[s]
            self.in_flight[s] -= 1
            if s == 0:
                self.feeder.backward_done(mb)
                touched = [s]
            else:
                self.bwd_in[s - 1].append((end + send, mb))
                touched = [s, s - 1]
        self.free_at[s] = end
        self.stages[s].append(Action(op, mb))
        return touched

    def run(self) -> Plan:
        candidates = [self.next_action(s) for s in range(self.P)]
        for _ in range(2 * self.P * self.total):
            live = [(c[0], s) for s, c in enumerate(candidates) if c is not None]
            if not live:  # cannot happen with every bound >= 1; kept as a guard
                raise DeadlockError("build_plan: no stage can make progress")
            start, s = min(live)  # ties: the lowest stage, so the result is deterministic
            for t in self.commit(s, start, candidates[s][1]):
                candidates[t] = self.next_action(t)
        return Plan(self.P, self.stages, self.feed_order)


def simulate(plan: Plan, costs: StageCosts) -> SimResult:
    """Executes the plan's per-stage orders with the given costs and returns the timings.

    Each action starts once its stage is free and its inputs are there: F on s after F on s-1
    (+ send); B on s after F on s and, below the last stage, B on s+1 (+ send). Raises
    DeadlockError when some stage would wait for ever.
    """
    P = plan.num_stages
    _check_costs(costs, P)
    f_end: list[dict[int, float]] = [{} for _ in range(P)]
    b_end: list[dict[int, float]] = [{} for _ in range(P)]
    spans: list[list[tuple[str, float, float]]] = [[] for _ in range(P)]  # (op, start, end)
    free = [0.0] * P
    pos = [0] * P

    def ready_at(s: int, action: Action) -> float | None:
        """When the action's inputs are there, or None if they are not known yet."""
        if action.op == FORWARD:
            if s == 0:
                return 0.0
            t = f_end[s - 1].get(action.mb)
            return None if t is None else t + costs.send
        own = f_end[s].get(action.mb)
        if own is None:
            return None
        if s == P - 1:
            return own
        t = b_end[s + 1].get(action.mb)
        return None if t is None else t + costs.send

    progress = True
    while progress:
        progress = False
        for s in range(P):
            while pos[s] < len(plan.stages[s]):
                action = plan.stages[s][pos[s]]
                t = ready_at(s, action)
                if t is None:
                    break
                start = max(free[s], t)
                cost = costs.forward[s] if action.op == FORWARD else costs.backward[s]
                free[s] = start + cost
                (f_end if action.op == FORWARD else b_end)[s][action.mb] = free[s]
                spans[s].append((action.op, start, free[s]))
                pos[s] += 1
                progress = True
    stuck = [f"stage {s} at {plan.stages[s][pos[s]]}" for s in range(P) if pos[s] < len(plan.stages[s])]
    if stuck:
        raise DeadlockError("plan deadlocks: " + "; ".join(stuck))
    return _timings(spans)


def _timings(spans: list[list[tuple[str, float, float]]]) -> SimResult:
    makespan = max((sp[-1][2] for sp in spans if sp), default=0.0)
    busy = [sum(end - start for _, start, end in sp) for sp in spans]
    bubble = [1.0 - b / makespan if makespan > 0 else 0.0 for b in busy]
    window = idle = 0.0
    for sp in spans:
        first_b = next((i for i, x in enumerate(sp) if x[0] == BACKWARD), None)
        last_f = max((i for i, x in enumerate(sp) if x[0] == FORWARD), default=None)
        if first_b is None or last_f is None or last_f < first_b:
            continue  # no steady phase on this stage
        inside = sp[first_b:last_f + 1]  # actions run one at a time, so the window holds these
        length = inside[-1][2] - inside[0][1]
        window += length
        idle += length - sum(end - start for _, start, end in inside)
    return SimResult(makespan, busy, bubble, idle / window if window > 0 else 0.0)


def check_plan(plan: Plan, streams: dict[str, list[MicroBatchRef]],
               max_in_flight: list[int] | None = None, candidate_num: int | None = None) -> None:
    """Raises AssertionError naming the first invariant the plan breaks."""
    refs = _index_streams(streams)
    if candidate_num is not None:
        _check_admission(plan.feed_order, streams, candidate_num)
    P = plan.num_stages
    assert P >= 1, f"plan has {P} stages"
    assert len(plan.stages) == P, f"plan has {len(plan.stages)} stage lists for {P} stages"
    bound = _bounds(P, max_in_flight)
    every = sorted(refs)
    # Step sizes and each step's predecessor in its adapter's stream, for the Rule.
    step_size: dict[tuple[str, int], int] = {}
    prev_step: dict[tuple[str, int], int] = {}
    for name, stream in streams.items():
        for i, mb in enumerate(stream):
            step_size[(name, mb.step)] = step_size.get((name, mb.step), 0) + 1
            if i > 0 and stream[i - 1].step != mb.step:
                prev_step[(name, mb.step)] = stream[i - 1].step

    b_orders = []
    for s, actions in enumerate(plan.stages):
        assert all(a.op in (FORWARD, BACKWARD) for a in actions), f"stage {s}: unknown op"
        f_order = [a.mb for a in actions if a.op == FORWARD]
        b_order = [a.mb for a in actions if a.op == BACKWARD]
        assert sorted(f_order) == every, f"stage {s}: not every micro-batch forwarded exactly once"
        assert sorted(b_order) == every, f"stage {s}: not every micro-batch backwarded exactly once"
        assert f_order == plan.feed_order, f"stage {s}: forward order differs from feed_order"
        b_orders.append(b_order)
        live: set[int] = set()
        backwarded: dict[tuple[str, int], int] = {}
        for a in actions:
            mb = refs[a.mb]
            if a.op == FORWARD:
                live.add(a.mb)
                assert len(live) <= bound[s], f"stage {s}: more than {bound[s]} micro-batches in flight"
                prev = prev_step.get((mb.adapter, mb.step))
                done = prev is None or backwarded.get((mb.adapter, prev), 0) == step_size[(mb.adapter, prev)]
                assert done, (
                    f"stage {s}: the Rule: micro-batch {a.mb} of {mb.adapter} step {mb.step} forwarded "
                    f"before every backward of step {prev}")
            else:
                assert a.mb in live, f"stage {s}: backward of micro-batch {a.mb} before its forward"
                live.remove(a.mb)
                key = (mb.adapter, mb.step)
                backwarded[key] = backwarded.get(key, 0) + 1
    for s in range(1, P):
        assert b_orders[s] == b_orders[0], f"stage {s}: backward order differs from stage 0's"
    for name, stream in streams.items():
        ids = [mb.id for mb in stream]
        assert [m for m in plan.feed_order if refs[m].adapter == name] == ids, (
            f"adapter {name}: micro-batches fed out of stream order")
        assert [m for m in b_orders[0] if refs[m].adapter == name] == ids, (
            f"adapter {name}: micro-batches backwarded out of stream order "
            "(last_in_step would not close its step)")
    try:
        simulate(plan, StageCosts.uniform(P))
    except DeadlockError as e:
        raise AssertionError(str(e)) from None


def _check_admission(feed_order: list[int], streams: dict[str, list[MicroBatchRef]], limit: int) -> None:
    """At most `limit` adapters between their first and last fed micro-batch at any time, and
    admission in dict order: the i-th adapter (0-based, among those with micro-batches) starts
    only once all but limit - 1 of the adapters before it are wholly fed."""
    order = {name: i for i, name in enumerate(name for name, s in streams.items() if s)}
    first = {s[0].id: name for name, s in streams.items() if s}
    last = {s[-1].id: name for name, s in streams.items() if s}
    active: set[str] = set()
    done: set[str] = set()
    for mb in feed_order:
        if mb in first:
            name = first[mb]
            before_done = sum(order[d] < order[name] for d in done)
            assert before_done >= order[name] + 1 - limit, (
                f"admission: {name} started before its turn (limit {limit}, dict order)")
            active.add(name)
            assert len(active) <= limit, f"admission: {sorted(active)} active at once, limit {limit}"
        if mb in last:
            active.discard(last[mb])
            done.add(last[mb])


def _index_streams(streams: dict[str, list[MicroBatchRef]]) -> dict[int, MicroBatchRef]:
    """Checks the streams' shape (ValueError) and maps id -> micro-batch."""
    refs: dict[int, MicroBatchRef] = {}
    for name, stream in streams.items():
        for i, mb in enumerate(stream):
            if mb.adapter != name:
                raise ValueError(f"micro-batch {mb.id} of adapter {mb.adapter!r} is in the stream of "
                                 f"{name!r}")
            if mb.id in refs:
                raise ValueError(f"micro-batch id {mb.id} appears twice")
            refs[mb.id] = mb
            if i == 0:
                continue
            prev = stream[i - 1]
            if mb.step < prev.step:
                raise ValueError(f"adapter {name!r}: step goes back from {prev.step} to {mb.step}")
            # The step may only change right after a last_in_step micro-batch. A stream may end
            # mid-step (a plan covering part of a run): that step's update then comes later.
            if (mb.step != prev.step) != prev.last_in_step:
                raise ValueError(f"adapter {name!r}: micro-batch {prev.id} has last_in_step="
                                 f"{prev.last_in_step} but the next one is step {mb.step}")
    return refs


def _count_steps(stream: list[MicroBatchRef]) -> int:
    return sum(1 for i, mb in enumerate(stream) if i == 0 or mb.step != stream[i - 1].step)


def _bounds(num_stages: int, max_in_flight: list[int] | None) -> list[int]:
    if max_in_flight is None:
        return [max_in_flight_1f1b(num_stages, s) for s in range(num_stages)]
    if len(max_in_flight) != num_stages or any(b < 1 for b in max_in_flight):
        raise ValueError(f"max_in_flight needs {num_stages} values, each at least 1: {max_in_flight}")
    return list(max_in_flight)


def _check_costs(costs: StageCosts, num_stages: int) -> None:
    if len(costs.forward) != num_stages or len(costs.backward) != num_stages:
        raise ValueError(f"costs need {num_stages} forward and backward values")
    # Positive action costs keep "what an action sends arrives after it starts", which the
    # builder's event order relies on.
    if any(c <= 0 for c in costs.forward + costs.backward) or costs.send < 0:
        raise ValueError("forward and backward costs must be positive and send non-negative")


def most_in_flight(actions: list[Action]) -> int:
    """The most micro-batches a stage's actions hold forwarded but not yet backwarded at once."""
    live = most = 0
    for action in actions:
        live += 1 if action.op == FORWARD else -1
        most = max(most, live)
    return most
