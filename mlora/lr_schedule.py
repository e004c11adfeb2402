"""The LR schedules: what an adapter's lr is multiplied by at each optimizer step.

Each is a pure function of the step (so a resumed run, a pipeline stage and the logged "lr" all
get it from the step count alone), written operation for operation as transformers' lr lambdas
in transformers.optimization (get_scheduler's schedules), so that the factors are equal to its
bit for bit. A LambdaLR multiplies every param group's initial lr by the factor; the schedules
that name an lr (polynomial's lr_end, min_lr) turn it into a ratio of the optimizer's default
lr, which is the adapter's `lr`, also under LoRA+ (PEFT's create_loraplus_optimizer makes lora_B's
group at lr * ratio but the optimizer's default at lr: lora_B's lr ends at lr_end * ratio).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

# transformers' SchedulerType names. mlora's "constant" warms up over warmup_steps (it did before
# transformers' names were taken), so it is transformers' constant_with_warmup, which config.py
# reads as "constant"; transformers' own "constant" ignores the warmup (the same at warmup 0).
SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt",
             "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
SAME_AS = {"constant_with_warmup": "constant"}
# transformers' schedules that are not a function of the step, and why (config.py refuses them).
NOT_A_FUNCTION_OF_THE_STEP = {
    "reduce_lr_on_plateau": "it lowers the lr when a metric stops improving",
    "greedy": "it moves the lr by the training loss",
}


POLYNOMIAL_LR_END = 1e-7  # transformers' default lr_end (config.py checks it is below lr)


def warmup_steps(given_steps: int, ratio: float | None, total_steps: int) -> int:
    """The warmup in steps: `given_steps`, or under a ratio (warmup_ratio) transformers'
    TrainingArguments.get_warmup_steps: ceil(total_steps * ratio)."""
    return given_steps if ratio is None else math.ceil(total_steps * ratio)


def lr_factor(kind: str, step: int, warmup_steps: int, total_steps: int,
              lr: float = 1.0, kwargs: Mapping[str, Any] | None = None) -> float:
    """LR multiplier at optimizer step `step` (0-based) of schedule `kind` with its
    lr_scheduler_kwargs `kwargs` (validated by config.py; absent ones take transformers'
    defaults); `lr`: the adapter's lr, which lr_end and min_lr are ratios of."""
    return _FACTORS[kind](step, warmup_steps, total_steps, lr, **(kwargs or {}))


def _warmup(step: int, warmup: int) -> float:
    """transformers' linear warmup from 0 (every schedule's but two)."""
    return float(step) / float(max(1, warmup))


def _constant(step: int, warmup: int, total: int, lr: float) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return 1.0


def _linear(step: int, warmup: int, total: int, lr: float) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine(step: int, warmup: int, total: int, lr: float, num_cycles: float = 0.5) -> float:
    # (transformers' cosine runs the lambda of its cosine_with_min_lr at a min_lr_rate of 0)
    return _cosine_to_rate(step, warmup, total, num_cycles, 0.0)


def _cosine_with_min_lr(step: int, warmup: int, total: int, lr: float, num_cycles: float = 0.5,
                        min_lr: float | None = None, min_lr_rate: float | None = None) -> float:
    return _cosine_to_rate(step, warmup, total, num_cycles, _min_lr_rate(lr, min_lr, min_lr_rate))


def _cosine_to_rate(step: int, warmup: int, total: int, num_cycles: float, min_lr_rate: float) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return float(max(0, factor))


def _min_lr_rate(lr: float, min_lr: float | None, min_lr_rate: float | None) -> float:
    """The min_lr schedules' floor as a ratio of lr (config.py makes sure one is given)."""
    return min_lr / lr if min_lr is not None else min_lr_rate


def _cosine_with_restarts(step: int, warmup: int, total: int, lr: float, num_cycles: int = 1) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _polynomial(step: int, warmup: int, total: int, lr: float, lr_end: float = POLYNOMIAL_LR_END,
                power: float = 1.0) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    # (step == total == warmup: transformers divides by the zero decay steps; the lr of past the end)
    if step > total or total == warmup:
        return lr_end / lr
    lr_range = lr - lr_end
    decay_steps = total - warmup
    pct_remaining = 1 - (step - warmup) / decay_steps
    decay = lr_range * pct_remaining**power + lr_end
    return decay / lr


def _inverse_sqrt(step: int, warmup: int, total: int, lr: float, timescale: int | None = None) -> float:
    if timescale is None:
        timescale = warmup or 10_000
    if step < warmup:
        return _warmup(step, warmup)
    shift = timescale - warmup
    return 1.0 / math.sqrt((step + shift) / timescale)


def _cosine_warmup_with_min_lr(step: int, warmup: int, total: int, lr: float, num_cycles: float = 0.5,
                               min_lr: float | None = None, min_lr_rate: float | None = None,
                               warmup_lr_rate: float | None = None) -> float:
    # Its own warmup: from 1 / warmup at step 0 (or warmup_lr_rate), reaching 1 at the last warmup
    # step; and its cosine a step ahead of cosine_with_min_lr's.
    rate = _min_lr_rate(lr, min_lr, min_lr_rate)
    current, warmup_f, total_f = float(step), float(warmup), float(total)
    if current < warmup_f:
        if warmup_lr_rate is None:
            return (current + 1.0) / max(1.0, warmup_f)
        return warmup_lr_rate + (1.0 - warmup_lr_rate) * current / max(1, warmup_f - 1)
    progress = (current - warmup_f + 1.0) / max(1.0, total_f - warmup_f)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    factor = factor * (1 - rate) + rate
    return float(max(0, factor))


def _warmup_stable_decay(step: int, warmup: int, total: int, lr: float, num_decay_steps: int = 0,
                         num_stable_steps: int | None = None, warmup_type: str = "linear",
                         decay_type: str = "cosine", min_lr_ratio: float = 0.0, num_cycles: float = 0.5) -> float:
    # (num_decay_steps has no default in transformers: config.py requires it)
    if num_stable_steps is None:
        num_stable_steps = total - warmup - num_decay_steps
    if step < warmup:
        progress = float(step) / float(max(1, warmup))
        factor = _WSD_WARMUPS[warmup_type](progress)
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < warmup + num_stable_steps:
        return 1.0
    if step < warmup + num_stable_steps + num_decay_steps:
        progress = float(step - warmup - num_stable_steps) / float(max(1, num_decay_steps))
        factor = _wsd_decay(decay_type, progress, num_cycles)
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


_WSD_WARMUPS: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: progress,
    "cosine": lambda progress: 0.5 * (1.0 - math.cos(math.pi * progress)),
    "1-sqrt": lambda progress: 1.0 - math.sqrt(1.0 - progress),
}
WSD_SHAPES = tuple(_WSD_WARMUPS)  # warmup_stable_decay's warmup_type and decay_type


def _wsd_decay(decay_type: str, progress: float, num_cycles: float) -> float:
    if decay_type == "linear":
        return 1.0 - progress
    if decay_type == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    return 1.0 - math.sqrt(progress)  # "1-sqrt"


_FACTORS: dict[str, Callable[..., float]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "inverse_sqrt": _inverse_sqrt,
    "cosine_with_min_lr": _cosine_with_min_lr,
    "cosine_warmup_with_min_lr": _cosine_warmup_with_min_lr,
    "warmup_stable_decay": _warmup_stable_decay,
}
assert tuple(_FACTORS) == SCHEDULES
