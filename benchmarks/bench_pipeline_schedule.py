"""Bubble of the pipeline schedule: the real build_plan + simulate, no GPU, runs in seconds.

For stages x adapters (each adapter: --steps optimizer steps of --micro-batches micro-batches)
it builds the plan, checks every invariant, simulates it, and prints the bubble (idle share;
overall and steady-state) next to the textbook formulas. Two cost profiles:

- equal: forward 1, backward 2 on every stage, free sends;
- realistic: the same, but the first stage costs +30% (embedding, and the rank that loads and
  fuses the batch) and the last stage +60% (final norm, LM head over the whole vocabulary and
  the cross-entropy), forward and backward alike, as when layers are split evenly.

    .venv/bin/python benchmarks/bench_pipeline_schedule.py --out bench_pipeline_schedule.json
"""

from __future__ import annotations

import argparse
import json
import time

from mlora.pipeline.plan import MicroBatchRef, StageCosts, build_plan, check_plan, simulate

FIRST_STAGE_EXTRA = 0.30
LAST_STAGE_EXTRA = 0.60


def streams(adapters: int, per_step: int, steps: int) -> dict[str, list[MicroBatchRef]]:
    out, next_id = {}, 0
    for a in range(adapters):
        out[f"a{a}"] = []
        for step in range(steps):
            for j in range(per_step):
                out[f"a{a}"].append(MicroBatchRef(next_id, f"a{a}", step, j == per_step - 1))
                next_id += 1
    return out


def costs_for(profile: str, stages: int) -> StageCosts:
    scale = [1.0] * stages
    if profile == "realistic":
        scale[0] += FIRST_STAGE_EXTRA
        scale[-1] += LAST_STAGE_EXTRA  # with one stage both apply to it
    return StageCosts([1.0 * x for x in scale], [2.0 * x for x in scale])


def row(profile: str, p: int, n: int, m: int, steps: int) -> dict:
    s = streams(n, m, steps)
    costs = costs_for(profile, p)
    plan = build_plan(p, s, costs)
    check_plan(plan, s)
    result = simulate(plan, costs)
    total = n * m * steps
    work = [total * (costs.forward[i] + costs.backward[i]) for i in range(p)]
    out = {
        "profile": profile, "stages": p, "adapters": n, "micro_batches": total,
        "makespan": result.makespan,
        "bubble": sum(result.bubble_fraction) / p,  # mean over stages
        "steady_bubble": result.steady_bubble_fraction,
        "per_stage_bubble": result.bubble_fraction,
        "formula_per_step": (p - 1) / (m + p - 1),  # 1F1B/GPipe, flushing at every step
        "formula_one_flush": (p - 1) / (total + p - 1),  # one flush over the whole run
    }
    if profile == "equal":
        # No schedule can beat: the pipeline bound (M + p - 1)(f + b), nor each adapter's chain
        # of steps, which the Rule serialises and each of which lasts >= (m + p - 1)(f + b).
        out["lower_bound"] = 1 - total / max(steps * (m + p - 1), total + p - 1)
    else:
        # Even a perfect schedule leaves the lighter stages waiting on the heaviest one.
        out["imbalance_floor"] = 1 - sum(work) / (p * max(work))
    return out


def markdown(rows: list[dict]) -> str:
    bound = "lower_bound" if "lower_bound" in rows[0] else "imbalance_floor"
    head = ["stages", "adapters", "micro-batches", "bubble", "steady bubble",
            "(p-1)/(m+p-1)", "(p-1)/(M+p-1)", bound.replace("_", " ")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["stages"], r["adapters"], r["micro_batches"]] + [
            f"{100 * r[k]:.1f}%" for k in ("bubble", "steady_bubble", "formula_per_step",
                                            "formula_one_flush", bound)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per optimizer step (m)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per adapter")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()

    started = time.perf_counter()
    tables = {}
    for profile in ("equal", "realistic"):
        tables[profile] = [row(profile, p, n, args.micro_batches, args.steps)
                           for p in args.stages for n in args.adapters]
    elapsed = time.perf_counter() - started

    print(f"m = {args.micro_batches} micro-batches per step, {args.steps} steps per adapter, "
          f"M = all micro-batches of the run; bubble = idle share, mean over stages\n")
    print("Equal stage costs (forward 1, backward 2):\n")
    print(markdown(tables["equal"]))
    print(f"\nRealistic stage costs (first stage +{FIRST_STAGE_EXTRA:.0%}, "
          f"last stage +{LAST_STAGE_EXTRA:.0%}):\n")
    print(markdown(tables["realistic"]))
    print(f"\n({elapsed:.2f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"micro_batches_per_step": args.micro_batches, "steps": args.steps,
                       "first_stage_extra": FIRST_STAGE_EXTRA, "last_stage_extra": LAST_STAGE_EXTRA,
                       "tables": tables}, f, indent=1)


if __name__ == "__main__":
    main()
