"""LR schedules (mlora.lr_schedule): each of transformers' get_scheduler schedules that is a
function of the step, with its lr_scheduler_kwargs and a warmup given as a ratio, gives
transformers' lr at every step: through warmup, decay and past the end; per LoRA+ group; and as
logged in metrics.jsonl by a real run."""

from __future__ import annotations

import math

import pytest
import torch

from mlora.lr_schedule import lr_factor, warmup_steps

LR = 3e-4  # not 1: polynomial's lr_end and the min_lr schedules' min_lr are ratios of it

# (schedule, its lr_scheduler_kwargs): defaults and a few of each schedule's kwargs
CASES = [
    ("constant", {}),
    ("linear", {}),
    ("cosine", {}),
    ("cosine", {"num_cycles": 1.5}),
    ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}),
    ("polynomial", {"lr_end": 1e-5, "power": 2.0}),
    ("polynomial", {"lr_end": 0.0, "power": 0.5}),
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 4}),
    ("cosine_with_min_lr", {"min_lr": 3e-5}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.2, "num_cycles": 1.0}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr": 1e-5, "warmup_lr_rate": 0.25, "num_cycles": 0.75}),
    ("warmup_stable_decay", {"num_decay_steps": 4}),
    ("warmup_stable_decay", {"num_decay_steps": 3, "num_stable_steps": 2, "warmup_type": "cosine",
                             "decay_type": "1-sqrt", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 5, "warmup_type": "1-sqrt", "decay_type": "linear"}),
    ("warmup_stable_decay", {"num_decay_steps": 4, "decay_type": "cosine", "num_cycles": 1.0, "min_lr_ratio": 0.5}),
]
# (warmup steps, total steps): none, some, and longer than the run
LENGTHS = [(0, 12), (3, 12), (8, 5)]


def _transformers_schedule(kind, optimizer, warmup, total, kwargs):
    import transformers

    # mlora's constant warms up: transformers' constant_with_warmup (its constant ignores the warmup)
    name = "constant_with_warmup" if kind == "constant" else kind
    return transformers.get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                      scheduler_specific_kwargs=dict(kwargs))


@pytest.mark.parametrize("kind, kwargs", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_every_step_equals_transformers_get_scheduler(kind, kwargs):
    """lr x the factor is transformers' lr to the last bit at every step, warmup and 5 steps past
    the end included."""
    for warmup, total in LENGTHS:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        schedule = _transformers_schedule(kind, optimizer, warmup, total, kwargs)
        for step in range(total + 5):
            expected = optimizer.param_groups[0]["lr"]
            assert LR * lr_factor(kind, step, warmup, total, LR, kwargs) == expected, (warmup, total, step)
            optimizer.step()
            schedule.step()


def test_polynomial_at_its_end_without_decay_steps_takes_lr_end():
    """warmup == total steps: at the step after the last, transformers divides by zero decay
    steps; mlora gives the lr of every later step, lr_end."""
    import transformers

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedule = transformers.get_scheduler("polynomial", optimizer, num_warmup_steps=4, num_training_steps=4,
                                          scheduler_specific_kwargs={"lr_end": 1e-5})
    for _ in range(3):
        optimizer.step()
        schedule.step()
    optimizer.step()
    with pytest.raises(ZeroDivisionError):  # (the lr of step 4)
        schedule.step()
    assert LR * lr_factor("polynomial", 4, 4, 4, LR, {"lr_end": 1e-5}) == \
        LR * lr_factor("polynomial", 5, 4, 4, LR, {"lr_end": 1e-5}) == pytest.approx(1e-5)


@pytest.mark.parametrize("ratio, total", [(0.1, 12), (0.25, 12), (0.3, 7), (0.0, 9), (0.999, 3)])
def test_a_warmup_ratio_is_transformers_get_warmup_steps(ratio, total):
    from transformers import TrainingArguments

    args = TrainingArguments(warmup_steps=ratio, report_to=[], use_cpu=True)
    assert warmup_steps(0, ratio, total) == args.get_warmup_steps(total)
    assert warmup_steps(5, None, total) == 5


@pytest.mark.parametrize("kind, kwargs", [("polynomial", {"lr_end": 1e-5, "power": 2.0}),
                                          ("cosine_with_min_lr", {"min_lr": 2e-3})])
def test_loraplus_groups_take_transformers_lr_over_pefts_optimizer(kind, kwargs):
    """Under LoRA+, each of the adapter's two groups steps at the lr transformers' schedule gives
    the groups of PEFT's create_loraplus_optimizer (lora_A at lr, lora_B at lr x ratio, the
    optimizer's default lr at lr: what lr_end and min_lr are ratios of); the warmup a ratio."""
    from transformers import LlamaConfig

    from mlora.adapter import Adapter
    from mlora.config import AdapterConfig
    from mlora.lora import BatchLayout, inject_lora
    from mlora.models.llama import CausalLM, args_from_hf_config
    from test_adapter_step import _set_grads

    ratio, total, lr = 4.0, 6, 0.05
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    cfg = AdapterConfig(name="a", data="<test>", r=4, lr=lr, loraplus_lr_ratio=ratio, lr_scheduler=kind,
                        lr_scheduler_kwargs=kwargs, warmup_ratio=0.25)
    wrappers = inject_lora(CausalLM(args_from_hf_config(config)).requires_grad_(False), BatchLayout())
    adapter = Adapter(cfg, wrappers, seed=1, device=torch.device("cpu"), total_steps=total)
    # create_loraplus_optimizer's groups (lora_A, lora_B) and defaults, on stand-ins for the weights
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    reference = torch.optim.AdamW([{"params": [params[0]], "lr": lr}, {"params": [params[1]], "lr": lr * ratio}],
                                  lr=lr)
    schedule = _transformers_schedule(kind, reference, math.ceil(total * 0.25), total, kwargs)
    for step in range(total):
        _set_grads(adapter, step, 0.01)
        stepped_lr, _ = adapter.step()
        assert stepped_lr == reference.param_groups[0]["lr"]
        assert [g["lr"] for g in adapter.optimizer.param_groups] == [g["lr"] for g in reference.param_groups]
        reference.step()
        schedule.step()
    assert reference.param_groups[1]["lr"] < reference.param_groups[1]["initial_lr"]  # (it decayed)


def test_a_real_run_logs_transformers_lr_at_every_step(tmp_path, tiny_llama):
    """`mlora train` with cosine_warmup_with_min_lr (its warmup starts above 0, its cosine a step
    ahead) and a warmup ratio: the "lr" of every step in metrics.jsonl is transformers'."""
    import json

    from mlora.cli import main
    from mlora.metrics import read_metrics
    from test_train import make_config

    out = tmp_path / "out"
    path = make_config(tmp_path, ["c"], out)  # 6 rows, batch_size 2, 2 epochs: 6 steps
    cfg = json.loads(path.read_text())
    kwargs = {"min_lr": 2e-3, "num_cycles": 0.6}
    cfg["lora"][0].update(lr_scheduler="cosine_warmup_with_min_lr", lr_scheduler_kwargs=kwargs, warmup_ratio=0.4)
    path.write_text(json.dumps(cfg))
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(path), "--no_progress"]) == 0
    logged = [m["lr"] for m in read_metrics(out / "metrics.jsonl") if m.get("adapter") == "c" and "loss" in m]

    lr, total = cfg["lora"][0]["lr"], 6
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = _transformers_schedule("cosine_warmup_with_min_lr", optimizer, math.ceil(total * 0.4), total, kwargs)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert logged == expected
    assert len(set(logged)) == total  # (every step's lr differs)


# ------------------------------------------------------------------ the config's keys
def _adapter(**keys):
    from mlora.config import parse_config

    return parse_config({"lora": [{"name": "a", "data": "train.json", **keys}]}, "cfg.json").lora[0]


def _error(**keys) -> str:
    from mlora.errors import UserError

    with pytest.raises(UserError) as info:
        _adapter(**keys)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cfg.json: lora[0] (name 'a'): ")
    return message.removeprefix("cfg.json: lora[0] (name 'a'): ")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "train.json").write_text('[{"instruction": "hi", "output": "hello"}]')
    monkeypatch.chdir(tmp_path)


def test_config_reads_transformers_names_kwargs_and_ratios(workdir):
    a = _adapter(lr_scheduler="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-5, "num_cycles": 1})
    assert (a.lr_scheduler, a.lr_scheduler_kwargs) == ("cosine_with_min_lr", {"min_lr": 1e-5, "num_cycles": 1.0})
    # transformers' name of mlora's constant (which warms up) is read as it: one schedule, one fingerprint
    assert _adapter(lr_scheduler="constant_with_warmup").lr_scheduler == "constant"
    # no kwargs, or none given: None (a checkpoint written before the key existed still matches)
    assert _adapter(lr_scheduler="cosine").lr_scheduler_kwargs is None
    assert _adapter(lr_scheduler="cosine", lr_scheduler_kwargs={}).lr_scheduler_kwargs is None
    assert _adapter(lr_scheduler_kwargs=None).lr_scheduler_kwargs is None
    # a ratio: transformers 4's warmup_ratio, or transformers 5's warmup_steps below 1
    assert (_adapter(warmup_ratio=0.1).warmup_ratio, _adapter(warmup_ratio=0.1).warmup_steps) == (0.1, 0)
    assert (_adapter(warmup_steps=0.05).warmup_ratio, _adapter(warmup_steps=0.05).warmup_steps) == (0.05, 0)
    assert (_adapter(warmup_steps=7).warmup_ratio, _adapter(warmup_steps=7).warmup_steps) == (None, 7)
    assert _adapter(warmup_ratio=1).warmup_ratio == 1.0
    wsd = _adapter(lr_scheduler="warmup_stable_decay", lr_scheduler_kwargs={
        "num_decay_steps": 10, "num_stable_steps": None, "warmup_type": "1-sqrt", "min_lr_ratio": 0})
    assert wsd.lr_scheduler_kwargs == {"num_decay_steps": 10, "num_stable_steps": None, "warmup_type": "1-sqrt",
                                       "min_lr_ratio": 0.0}


@pytest.mark.parametrize("keys, expected", [
    ({"lr_scheduler": "reduce_lr_on_plateau"},
     "'lr_scheduler' 'reduce_lr_on_plateau' is not supported: it lowers the lr when a metric stops improving, "
     "and mlora's schedules are functions of the step (choose from constant, linear, cosine, "),
    ({"lr_scheduler": "greedy"}, "'lr_scheduler' 'greedy' is not supported: it moves the lr by the training loss"),
    ({"lr_scheduler": "cosine_with_restart"}, "did you mean 'cosine_with_restarts'?"),
    ({"lr_scheduler": "cosine", "lr_scheduler_kwargs": {"num_cycle": 2}},
     "'lr_scheduler_kwargs': lr_scheduler 'cosine' takes no 'num_cycle'; did you mean 'num_cycles'? "
     "(it takes num_cycles)"),
    ({"lr_scheduler_kwargs": {"num_cycles": 2}},
     "'lr_scheduler_kwargs': lr_scheduler 'constant' takes no 'num_cycles' (it takes none)"),
    ({"lr_scheduler": "linear", "lr_scheduler_kwargs": [1]},
     "'lr_scheduler_kwargs' must be an object of the schedule's arguments, got list [1]"),
    ({"lr_scheduler": "cosine", "lr_scheduler_kwargs": {"num_cycles": 0}},
     "'lr_scheduler_kwargs': 'num_cycles' must be > 0, got 0"),
    ({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": 1.5}},
     "'lr_scheduler_kwargs': 'num_cycles' must be an integer, got float 1.5"),
    ({"lr_scheduler": "polynomial", "lr_scheduler_kwargs": {"power": "2"}},
     "'lr_scheduler_kwargs': 'power' must be a number, got str '2'"),
    ({"lr_scheduler": "polynomial", "lr": 1e-4, "lr_scheduler_kwargs": {"lr_end": 1e-4}},
     "'lr_scheduler_kwargs': 'lr_end' (0.0001) must be below 'lr' (0.0001): polynomial decays from lr to lr_end"),
    ({"lr_scheduler": "polynomial", "lr": 1e-8},
     "'lr_scheduler_kwargs': 'lr_end' (1e-07, the default) must be below 'lr' (1e-08)"),
    ({"lr_scheduler": "inverse_sqrt", "lr_scheduler_kwargs": {"timescale": 0}},
     "'lr_scheduler_kwargs': 'timescale' must be > 0, got 0"),
    ({"lr_scheduler": "cosine_with_min_lr"},
     "'lr_scheduler_kwargs': lr_scheduler 'cosine_with_min_lr' needs one of 'min_lr' (the lr it decays to) and "
     "'min_lr_rate' (that lr over 'lr'), got neither"),
    ({"lr_scheduler": "cosine_warmup_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-5, "min_lr_rate": 0.1}},
     "got 'min_lr' and 'min_lr_rate'"),
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-3}},
     "'lr_scheduler_kwargs': 'min_lr' (0.001) must be at most 'lr' (0.0003)"),
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 1.5}},
     "'lr_scheduler_kwargs': 'min_lr_rate' must be in [0, 1], got 1.5"),
    ({"lr_scheduler": "cosine_warmup_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0, "warmup_lr_rate": -1}},
     "'lr_scheduler_kwargs': 'warmup_lr_rate' must be in [0, 1], got -1"),
    ({"lr_scheduler": "warmup_stable_decay"},
     "lr_scheduler 'warmup_stable_decay' needs 'num_decay_steps' (how many steps its decay takes)"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_scheduler_kwargs": {"num_decay_steps": 2, "decay_type": "exp"}},
     "'lr_scheduler_kwargs': 'decay_type' must be one of linear, cosine, 1-sqrt, got 'exp'"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_scheduler_kwargs": {"num_decay_steps": -2}},
     "'lr_scheduler_kwargs': 'num_decay_steps' must be >= 0, got -2"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_scheduler_kwargs": {"num_decay_steps": 2, "num_training_steps": 9}},
     "takes no 'num_training_steps'"),
    ({"warmup_steps": 10, "warmup_ratio": 0.1}, "'warmup_steps' and 'warmup_ratio' are both given; keep one"),
    ({"warmup_ratio": 1.5}, "'warmup_ratio' must be in [0, 1], got 1.5"),
    ({"warmup_steps": 2.5}, "'warmup_steps' must be an integer, or a fraction in [0, 1) of the total steps, "
                            "got float 2.5"),
    ({"warmup_steps": -0.5}, "'warmup_steps' must be an integer, or a fraction in [0, 1) of the total steps"),
])
def test_config_errors_name_the_key_and_what_is_allowed(workdir, keys, expected):
    assert expected in _error(**keys)


def test_a_resume_refuses_changed_kwargs_and_takes_checkpoints_from_before_them(workdir, tmp_path):
    """The checkpoint's fingerprint holds the schedule's kwargs and the warmup ratio; a checkpoint
    written before those keys existed (none in its fingerprint) matches a config without them."""
    from types import SimpleNamespace

    from mlora.checkpoint import describe_difference, run_fingerprint
    from mlora.config import parse_config

    (tmp_path / "config.json").write_text("{}")

    def fingerprint(**keys):
        cfg = parse_config({"lora": [{"name": "a", "data": "train.json", "lr_scheduler": "cosine", **keys}]})
        return run_fingerprint(SimpleNamespace(cfg=cfg, base_dir=tmp_path, data={}, dtype="fp32", quant=None))

    saved = fingerprint(lr_scheduler_kwargs={"num_cycles": 1})
    assert describe_difference(saved, fingerprint(lr_scheduler_kwargs={"num_cycles": 1})) is None
    assert describe_difference(saved, fingerprint(lr_scheduler_kwargs={"num_cycles": 2})) == \
        "adapter 'a': 'lr_scheduler_kwargs' was {'num_cycles': 1.0}, now {'num_cycles': 2.0}"
    assert "'warmup_ratio' was None, now 0.1" in describe_difference(fingerprint(), fingerprint(warmup_ratio=0.1))
    before = fingerprint()
    for key in ("lr_scheduler_kwargs", "warmup_ratio"):
        del before["adapters"]["a"][key]
    assert describe_difference(before, fingerprint()) is None
