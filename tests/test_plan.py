"""The pipeline schedule: invariants over many shapes, the Rule, deadlock-freedom, bubbles."""

from __future__ import annotations

import copy
import random

import pytest

from mlora.pipeline.plan import (Action, DeadlockError, MicroBatchRef, Plan, StageCosts, build_plan,
                                 check_plan, max_in_flight_1f1b, simulate)


def make_streams(step_sizes: dict[str, list[int]]) -> dict[str, list[MicroBatchRef]]:
    """step_sizes[adapter] = micro-batches in each of its steps; ids numbered across adapters."""
    streams, next_id = {}, 0
    for name, sizes in step_sizes.items():
        stream = []
        for step, size in enumerate(sizes):
            for j in range(size):
                stream.append(MicroBatchRef(next_id, name, step, j == size - 1))
                next_id += 1
        streams[name] = stream
    return streams


def even(adapters: int, per_step: int, steps: int) -> dict[str, list[MicroBatchRef]]:
    return make_streams({f"a{i}": [per_step] * steps for i in range(adapters)})


def random_costs(rng: random.Random, stages: int) -> StageCosts:
    return StageCosts([rng.uniform(0.5, 1.5) for _ in range(stages)],
                      [rng.uniform(1.0, 3.0) for _ in range(stages)], rng.uniform(0.0, 0.5))


def check_all(stages, streams, costs=None, max_in_flight=None, candidate_num=None) -> Plan:
    """Builds, checks every invariant, and runs the plan under its own and under other costs."""
    plan = build_plan(stages, streams, costs, max_in_flight, candidate_num)
    check_plan(plan, streams, max_in_flight, candidate_num)
    # The stronger form the docstring proves: every stage backwards in feed order too.
    for actions in plan.stages:
        assert [a.mb for a in actions if a.op == "B"] == plan.feed_order
    simulate(plan, costs or StageCosts.uniform(stages))
    simulate(plan, StageCosts([3.0] + [0.1] * (stages - 1), [0.1] * (stages - 1) + [5.0], 1.0))
    return plan


# ---------------------------------------------------------------- invariants over many shapes

@pytest.mark.parametrize("stages", range(1, 9))
@pytest.mark.parametrize("adapters", range(1, 9))
def test_invariants_even_streams(stages, adapters):
    for per_step in range(1, 5):
        for steps in range(1, 5):
            check_all(stages, even(adapters, per_step, steps))


@pytest.mark.parametrize("seed", range(6))
def test_invariants_uneven_streams_and_random_costs(seed):
    rng = random.Random(seed)
    for _ in range(25):
        stages = rng.randint(1, 8)
        streams = make_streams({f"a{i}": [rng.randint(1, 4) for _ in range(rng.randint(0, 5))]
                                for i in range(rng.randint(1, 8))})
        costs = random_costs(rng, stages) if rng.random() < 0.7 else None
        check_all(stages, streams, costs)


@pytest.mark.parametrize("bounds", ["ones", "double", "huge"])
def test_other_in_flight_bounds(bounds):
    for stages in (1, 2, 3, 5, 8):
        limit = {"ones": [1] * stages,
                 "double": [2 * max_in_flight_1f1b(stages, s) for s in range(stages)],
                 "huge": [1000] * stages}[bounds]
        for adapters in (1, 3, 8):
            check_all(stages, even(adapters, 3, 3), max_in_flight=limit)
            check_all(stages, even(adapters, 3, 3), random_costs(random.Random(stages), stages), limit)


def test_stream_may_end_mid_step():
    streams = even(2, 3, 2)
    streams["a1"] = streams["a1"][:-1]  # its step 1 is cut short: no last_in_step
    check_all(4, streams)


def test_empty_streams():
    plan = check_all(3, {"a": [], "b": []})
    assert plan.stages == [[], [], []] and plan.feed_order == []
    assert simulate(plan, StageCosts.uniform(3)).makespan == 0.0


def test_max_in_flight_1f1b():
    assert [max_in_flight_1f1b(4, s) for s in range(4)] == [4, 3, 2, 1]
    with pytest.raises(ValueError):
        max_in_flight_1f1b(4, 4)


# ---------------------------------------------------------------- admission (train_lora_candidate_num)

@pytest.mark.parametrize("seed", range(4))
def test_admission_invariants(seed):
    rng = random.Random(100 + seed)
    for _ in range(20):
        stages = rng.randint(1, 6)
        streams = make_streams({f"a{i}": [rng.randint(1, 3) for _ in range(rng.randint(0, 4))]
                                for i in range(rng.randint(1, 6))})
        check_all(stages, streams, random_costs(rng, stages), candidate_num=rng.randint(1, 4))


def active_counts(plan, streams):
    """How many adapters are between their first and last fed micro-batch, after each feed."""
    first = {s[0].id for s in streams.values() if s}
    last = {s[-1].id for s in streams.values() if s}
    active, counts = 0, []
    for mb in plan.feed_order:
        active += mb in first
        counts.append(active)
        active -= mb in last
    return counts


def test_one_candidate_trains_adapters_one_after_another():
    streams = make_streams({"long": [2, 2, 2], "short": [1], "mid": [2, 1]})
    plan = build_plan(3, streams, candidate_num=1)
    every = [mb.id for name in ("long", "short", "mid") for mb in streams[name]]
    assert plan.feed_order == every  # dict order, each adapter wholly before the next
    assert max(active_counts(plan, streams)) == 1
    # Without the limit the adapters interleave (and "long" keeps its head start).
    free = build_plan(3, streams)
    assert max(active_counts(free, streams)) == 3


def test_admitted_adapter_leaves_when_wholly_fed():
    # Two at a time: "c" starts right after "a" (the shorter) has fed its last micro-batch.
    streams = make_streams({"a": [1], "b": [2, 2, 2], "c": [1]})
    plan = build_plan(2, streams, candidate_num=2)
    check_plan(plan, streams, candidate_num=2)
    order = [mb for mb in plan.feed_order]
    assert order.index(streams["c"][0].id) > order.index(streams["a"][-1].id)
    assert max(active_counts(plan, streams)) == 2


def test_check_plan_catches_admission():
    streams = make_streams({"a": [1, 1], "b": [1]})
    plan = build_plan(2, streams)  # interleaves a and b
    assert max(active_counts(plan, streams)) == 2
    with pytest.raises(AssertionError, match="admission"):
        check_plan(plan, streams, candidate_num=1)
    swapped = build_plan(2, {"b": streams["b"], "a": streams["a"]}, candidate_num=1)
    with pytest.raises(AssertionError, match="before its turn"):
        check_plan(swapped, streams, candidate_num=1)


# ---------------------------------------------------------------- the Rule, order, determinism

def test_one_adapter_two_steps_exact_plan():
    # Step 1 (ids 2, 3) enters stage 0 only after both backwards of step 0 are done there.
    plan = build_plan(4, even(1, 2, 2))
    assert plan.feed_order == [0, 1, 2, 3]
    stage0 = " ".join(f"{a.op}{a.mb}" for a in plan.stages[0])
    last = " ".join(f"{a.op}{a.mb}" for a in plan.stages[3])
    assert stage0 == "F0 F1 B0 B1 F2 F3 B2 B3"
    assert last == "F0 B0 F1 B1 F2 B2 F3 B3"


def test_steps_are_fed_whole_and_adapters_take_turns():
    plan = build_plan(2, even(3, 2, 2))
    refs = {mb.id: mb for s in even(3, 2, 2).values() for mb in s}
    fed = [(refs[i].adapter, refs[i].step) for i in plan.feed_order]
    assert fed == [("a0", 0)] * 2 + [("a1", 0)] * 2 + [("a2", 0)] * 2 + \
                  [("a0", 1)] * 2 + [("a1", 1)] * 2 + [("a2", 1)] * 2


def test_adapter_with_most_steps_left_goes_first():
    streams = make_streams({"short": [2], "long": [2, 2, 2]})
    plan = build_plan(4, streams)
    assert plan.feed_order[:2] == [mb.id for mb in streams["long"][:2]]


def test_deterministic():
    rng = random.Random(7)
    streams = make_streams({f"a{i}": [rng.randint(1, 4) for _ in range(4)] for i in range(5)})
    costs = random_costs(rng, 6)
    plan = build_plan(6, streams, costs)
    assert build_plan(6, copy.deepcopy(streams), copy.deepcopy(costs)) == plan
    assert build_plan(6, streams, costs) == plan


# ---------------------------------------------------------------- bubbles

@pytest.mark.parametrize("fwd,bwd", [(1.0, 2.0), (1.0, 1.0)])
def test_one_adapter_matches_1f1b_formula(fwd, bwd):
    # One adapter: the Rule flushes the pipeline at every step, so each step is a full 1F1B
    # flush of m micro-batches. Exactly: makespan = steps * (m + p - 1) * (f + b), and every
    # stage's bubble fraction = (p - 1) / (m + p - 1).
    for p in range(1, 9):
        for m in range(1, 5):
            for steps in range(1, 5):
                costs = StageCosts.uniform(p, fwd, bwd)
                result = simulate(build_plan(p, even(1, m, steps), costs), costs)
                assert result.makespan == pytest.approx(steps * (m + p - 1) * (fwd + bwd))
                for frac in result.bubble_fraction:
                    assert frac == pytest.approx((p - 1) / (m + p - 1))


def test_enough_adapters_means_no_steady_bubble():
    # With equal costs the feed never stalls once (n-1)*m >= p-1 (always true for n >= p):
    # the run is then one 1F1B pipeline over all M = n*m*steps micro-batches, with no steady
    # bubble and overall bubble exactly (p-1)/(M+p-1).
    for p in range(1, 9):
        for n in range(1, 9):
            for m in range(1, 5):
                if (n - 1) * m < p - 1:
                    continue
                for steps in (1, 4):
                    result = simulate(build_plan(p, even(n, m, steps)), StageCosts.uniform(p))
                    assert result.steady_bubble_fraction < 1e-9
                    total = n * m * steps
                    for frac in result.bubble_fraction:
                        assert frac == pytest.approx((p - 1) / (total + p - 1))


def test_adapters_at_least_stages_steady_bubble_under_5_percent():
    for p in (2, 4, 8):
        for n in (p, p + 1, 8):
            for m in (1, 2, 4):
                result = simulate(build_plan(p, even(n, m, 4)), StageCosts.uniform(p))
                assert result.steady_bubble_fraction < 0.05


def test_simulate_is_repeatable_and_counts_all_work():
    rng = random.Random(3)
    for _ in range(10):
        p = rng.randint(1, 8)
        costs = random_costs(rng, p)
        plan = build_plan(p, even(rng.randint(1, 8), rng.randint(1, 4), 3), costs)
        a, b = simulate(plan, costs), simulate(plan, costs)
        assert a == b
        work = [len(plan.feed_order) * (costs.forward[s] + costs.backward[s]) for s in range(p)]
        assert a.busy == pytest.approx(work)
        assert a.makespan >= max(work)


# ---------------------------------------------------------------- check_plan catches mistakes

def _plan_and_streams():
    streams = even(2, 2, 2)
    return build_plan(3, streams), streams


def _broken(mutate) -> tuple[Plan, dict]:
    plan, streams = _plan_and_streams()
    plan = copy.deepcopy(plan)
    mutate(plan)
    return plan, streams


def _swap(actions, i, j):
    actions[i], actions[j] = actions[j], actions[i]


def _move_first_backward_to_front(actions):
    actions.insert(0, actions.pop(actions.index(Action("B", 0))))


@pytest.mark.parametrize("mutate,message", [
    (lambda p: p.stages[1].pop(), "exactly once"),
    (lambda p: _swap(p.stages[1], 0, 1), "forward order differs"),
    (lambda p: _move_first_backward_to_front(p.stages[0]), "before its forward"),
    (lambda p: setattr(p, "stages", p.stages[:2]), "stage lists"),
])
def test_check_plan_catches_broken_structure(mutate, message):
    plan, streams = _broken(mutate)
    with pytest.raises(AssertionError, match=message):
        check_plan(plan, streams)


def test_check_plan_catches_the_rule():
    # One adapter, one stage: F0 F1 B0 B1 would start step 1 (id 1) before step 0's backward.
    streams = make_streams({"a": [1, 1]})
    plan = Plan(1, [[Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1)]], [0, 1])
    with pytest.raises(AssertionError, match="the Rule"):
        check_plan(plan, streams, max_in_flight=[2])


def test_check_plan_catches_in_flight_bound():
    streams = make_streams({"a": [2]})
    plan = Plan(1, [[Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1)]], [0, 1])
    check_plan(plan, streams, max_in_flight=[2])
    with pytest.raises(AssertionError, match="in flight"):
        check_plan(plan, streams)  # 1F1B allows one on the only (= last) stage


def test_check_plan_catches_backward_order_mismatch_and_deadlock():
    streams = make_streams({"a": [1], "b": [1]})  # ids 0 and 1, separate adapters
    f = [Action("F", 0), Action("F", 1)]
    plan = Plan(2, [f + [Action("B", 0), Action("B", 1)], [Action("F", 0), Action("B", 0),
                                                            Action("F", 1), Action("B", 1)]], [0, 1])
    check_plan(plan, streams)
    # Stage 0 backwards 1 then 0, stage 1 the other way round: gradients would mismatch.
    plan.stages[0] = f + [Action("B", 1), Action("B", 0)]
    with pytest.raises(AssertionError, match="backward order differs"):
        check_plan(plan, streams)
    # Same orders everywhere, yet a cycle: stage 0 wants B0 before F1, stage 1 runs F1 before B0.
    plan = Plan(2, [[Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)],
                    [Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1)]], [0, 1])
    with pytest.raises(AssertionError, match="deadlock"):
        check_plan(plan, streams, max_in_flight=[2, 2])
    with pytest.raises(DeadlockError):
        simulate(plan, StageCosts.uniform(2))


def test_check_plan_catches_feed_out_of_stream_order():
    streams = make_streams({"a": [2]})
    order = [Action("F", 1), Action("B", 1), Action("F", 0), Action("B", 0)]
    with pytest.raises(AssertionError, match="out of stream order"):
        check_plan(Plan(1, [order], [1, 0]), streams)


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_value_error():
    streams = even(1, 2, 1)
    with pytest.raises(ValueError):
        build_plan(0, streams)
    with pytest.raises(ValueError):
        build_plan(2, streams, max_in_flight=[1, 0])
    with pytest.raises(ValueError):
        build_plan(2, streams, max_in_flight=[1])
    with pytest.raises(ValueError, match="candidate_num"):
        build_plan(2, streams, candidate_num=0)
    with pytest.raises(ValueError):
        build_plan(2, streams, StageCosts([1.0], [1.0]))
    with pytest.raises(ValueError):
        build_plan(2, streams, StageCosts([1.0, 0.0], [1.0, 1.0]))
    with pytest.raises(ValueError, match="twice"):
        build_plan(2, {"a": [MicroBatchRef(0, "a", 0, True)], "b": [MicroBatchRef(0, "b", 0, True)]})
    with pytest.raises(ValueError, match="last_in_step"):
        build_plan(2, {"a": [MicroBatchRef(0, "a", 0, False), MicroBatchRef(1, "a", 1, True)]})
    with pytest.raises(ValueError, match="goes back"):
        build_plan(2, {"a": [MicroBatchRef(0, "a", 1, True), MicroBatchRef(1, "a", 0, True)]})
    with pytest.raises(ValueError, match="stream of"):
        build_plan(2, {"a": [MicroBatchRef(0, "b", 0, True)]})
