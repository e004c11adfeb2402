"""LoRA+ (`loraplus_lr_ratio`): every lora_B steps at lr * ratio, every lora_A at lr. An adapter's
steps equal PEFT's create_loraplus_optimizer on transformers' model; through `mlora train` an
adapter with it, fused with one without, equals each alone, a resumed run equals the
uninterrupted one, and a pipeline equals one process."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F

from mlora.adapter import Adapter
from mlora.config import AdapterConfig
from mlora.loader import load_model
from mlora.lora import AdapterRows, BatchLayout, inject_lora
from mlora.models.naming import naming_for

LLAMA7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RATIO = 16


def _batch(step: int, vocab: int):
    """Step `step`'s rows: ids [3, 12], a right-padded and a left-padded row, and next-token
    labels (-100 where a pad is predicted or predicts)."""
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(3, vocab, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, :3] = 0
    labels = torch.where(mask[:, 1:].bool() & mask[:, :-1].bool(), ids[:, 1:], -100)
    return ids, mask, labels


def _loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("optim, scheduler", [("adamw", "cosine"), ("sgd", "linear")])
def test_steps_equal_peft_create_loraplus_optimizer(tmp_path, tiny_llama, optim, scheduler):
    """fp32, dropout 0, A and B random (B is zero at first otherwise): five steps of mlora's
    adapter (fused AdamW stepped on the device; SGD with momentum on the host's word), clipped
    at some steps, give the weights PEFT gives on transformers' LlamaForCausalLM with
    create_loraplus_optimizer (both groups with the adapter's weight_decay), transformers'
    schedule over it and clip_grad_norm_ over the adapter, on the same rows and loss."""
    import transformers
    from peft import PeftModel, get_peft_model_state_dict
    from peft.optimizers import create_loraplus_optimizer

    steps = 5
    # (B at 1.6e-2 under AdamW already makes this tiny model's steps amplify rounding: PEFT's
    # gradients, summed in another order, were 1e-3 apart after five steps at AdamW's lr 1e-2)
    lr, decay = (1e-3, 0.5) if optim == "adamw" else (1e-2, 0.1)
    cfg = AdapterConfig(name="x", data="", r=4, alpha=8, dropout=0.0, target_modules=LLAMA7, optim=optim, lr=lr,
                        momentum=0.9 if optim == "sgd" else 0.0, weight_decay=decay, lr_scheduler=scheduler,
                        warmup_steps=2, max_grad_norm=3.0, loraplus_lr_ratio=RATIO)
    model = load_model(tiny_llama, "cpu", torch.float32)
    layout = BatchLayout()
    adapter = Adapter(cfg, inject_lora(model, layout), 0, torch.device("cpu"), total_steps=steps,
                      naming=naming_for(model.args.model_type))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    adapter.save(tmp_path / "x", str(tiny_llama))
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.float32), tmp_path / "x", is_trainable=True)
    extra = {"momentum": 0.9} if optim == "sgd" else {}
    optimizer = create_loraplus_optimizer(peft_model, {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optim],
                                          lr=lr, loraplus_lr_ratio=RATIO, weight_decay=decay,
                                          loraplus_weight_decay=decay, **extra)
    schedule = transformers.get_scheduler(scheduler, optimizer, num_warmup_steps=2, num_training_steps=steps)
    lora = [p for name, p in peft_model.named_parameters() if "lora_" in name]

    model.train()
    peft_model.train()
    layout.rows = [AdapterRows("x", 0, 3)]
    norms = []
    for step in range(steps):
        ids, mask, labels = _batch(step, model.args.vocab_size)
        _loss(model(ids, mask), labels).backward()
        if optim == "adamw":
            _, sq = adapter.step_on_device()
            norm = sq.sqrt().item()
        else:
            _, norm = adapter.step()
        _loss(peft_model(input_ids=ids, attention_mask=mask).logits, labels).backward()
        peft_norm = torch.nn.utils.clip_grad_norm_(lora, cfg.max_grad_norm).item()
        assert norm == pytest.approx(peft_norm, rel=1e-5)
        norms.append(norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    assert min(norms) < cfg.max_grad_norm < max(norms)  # clipped at some steps only

    expected = get_peft_model_state_dict(peft_model)
    got = adapter.peft_state_dict()
    assert got.keys() == expected.keys()
    for key, value in got.items():  # (measured: 1.4e-6 under AdamW, 2.5e-7 under SGD)
        assert (value - expected[key]).abs().max() <= 1e-5 * expected[key].abs().max(), key


def test_a_ratio_of_1_steps_as_plain_lora_and_a_non_finite_step_moves_neither_group():
    """The two groups are the one buffer's two parts: at a ratio of 1 the steps (fused AdamW on
    the device, clipped or not) give plain LoRA's weights and moments bit for bit. A
    non-finite gradient skips the step in both groups (fused AdamW's found_inf): weights and
    both groups' state stay as they were."""
    from test_adapter_step import _adapter, _set_grads

    plain, split = _adapter(), _adapter(loraplus_lr_ratio=1.0)
    assert len(plain.optimizer.param_groups) == 1 and len(split.optimizer.param_groups) == 2
    for step, scale in enumerate([0.001, 0.3, 0.01, 0.002]):
        for adapter in (plain, split):
            _set_grads(adapter, step, scale)
        if step == 2:  # a NaN in a B (the second group's part)
            before = [p.detach().clone() for p in split.parameters()]
            moments = [{k: v.clone() for k, v in state.items()} for state in split.optimizer.state.values()]
            split.weights["model.layers.1.mlp.up_proj"].lora_B.grad[0, 0] = float("nan")
            _, sq = split.step_on_device()
            assert not torch.isfinite(sq)
            assert all(torch.equal(p, q) for p, q in zip(split.parameters(), before))
            for state, saved in zip(split.optimizer.state.values(), moments, strict=True):
                assert all(torch.equal(state[k], v) for k, v in saved.items())
            plain.skip_step()
            continue
        plain.step_on_device()
        split.step_on_device()
    for p, q in zip(plain.parameters(), split.parameters()):
        assert torch.equal(p, q)
    n_a = sum(w.lora_A.numel() for w in plain.weights.values())
    (whole,) = plain.optimizer.state.values()
    a_part, b_part = split.optimizer.state.values()
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(torch.cat([a_part[key], b_part[key]]), whole[key])
        assert a_part[key].numel() == n_a


def test_a_one_module_adapter_resumes_both_groups():
    """An adapter of one module (an A and a B: as many weights as LoRA+'s two groups have
    tensors) resumes its optimizer state as saved, not read as an older mlora's one state per
    weight (FlatParameters.flat_optimizer_state): the next step is the uninterrupted one's."""
    from test_flat_params import _grads, _model

    def adapter():
        cfg = AdapterConfig(name="a", data="<test>", r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], lr=0.05,
                            weight_decay=0.01, loraplus_lr_ratio=RATIO)
        return Adapter(cfg, inject_lora(_model(layers=1), BatchLayout()), seed=1, device=torch.device("cpu"))

    whole, resumed = adapter(), adapter()
    assert len(whole.parameters()) == 2
    for step in range(3):
        if step == 2:  # (through bytes, as a checkpoint: a state_dict holds the optimizer's own tensors)
            buffer = io.BytesIO()
            torch.save(whole.state_for_checkpoint(), buffer)
            buffer.seek(0)
            resumed.restore_from_checkpoint(torch.load(buffer, weights_only=True))
        for a in (whole, resumed) if step == 2 else (whole,):
            for p, g in zip(a.parameters(), _grads(a.parameters(), step)):
                p.grad = g
            a.step_on_device()
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))


# ------------------------------------------------------------------ through `mlora train`
# test_train's adapters a (AdamW, cosine with warmup, micro-batches of half a step), b (SGD with
# momentum, three micro-batches a step) and c (AdamW with weight decay): a and b with LoRA+.
WITH_RATIO = {"a": RATIO, "b": 2}


def _config(tmp, names, out, **global_overrides):
    from test_train import make_config

    path = make_config(tmp, names, out, **global_overrides)
    cfg = json.loads(path.read_text())
    for adapter in cfg["lora"]:
        if adapter["name"] in WITH_RATIO:
            adapter["loraplus_lr_ratio"] = WITH_RATIO[adapter["name"]]
    path.write_text(json.dumps(cfg))
    return path


def _train(base, cfg, *extra) -> int:
    from mlora.cli import main

    return main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress", *extra])


def _losses(out, name):
    from mlora.metrics import read_metrics

    return [(m["step"], m["loss"]) for m in read_metrics(out / "metrics.jsonl") if m.get("adapter") == name
            and "loss" in m]


@pytest.fixture(scope="module")
def fused(tmp_path_factory, tiny_llama):
    """a, b and c trained fused, a checkpoint every 2 steps: (folder, config, output dir)."""
    tmp = tmp_path_factory.mktemp("loraplus_fused")
    cfg = _config(tmp, ["a", "b", "c"], tmp / "out", save_step=2)
    assert _train(tiny_llama, cfg) == 0
    return tmp, cfg, tmp / "out"


def test_fused_with_an_adapter_without_it_equals_each_alone(fused, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from test_train import rel_diff

    _, _, fused_out = fused
    for name in ("a", "b", "c"):
        solo = tmp_path / f"solo_{name}"
        assert _train(tiny_llama, _config(tmp_path, [name], solo)) == 0
        weights = load_file(solo / name / "adapter_model.safetensors")
        assert all(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)
        assert rel_diff(load_file(fused_out / name / "adapter_model.safetensors"), weights) <= 1e-5, name
        mine, alone = _losses(fused_out, name), _losses(solo, name)
        assert [s for s, _ in mine] == [s for s, _ in alone] and len(mine) == 6
        assert [v for _, v in mine] == pytest.approx([v for _, v in alone], rel=1e-5)


def test_resume_equals_the_uninterrupted_run(fused, tiny_llama, tmp_path, capsys):
    """Resumed from a checkpoint mid-run (a half-finished step of a's: its gradients so far;
    a's and b's optimizer state of both LoRA+ groups), the run ends where the uninterrupted one
    did, bit for bit. A checkpoint's adapters resume only with the loraplus_lr_ratio they ran
    with: adding or dropping it is one line naming the adapter and the key."""
    import shutil

    from safetensors.torch import load_file

    from mlora.checkpoint import FINISHED, list_checkpoints

    tmp, cfg, done = fused
    out = tmp_path / "out"
    shutil.copytree(done, out)
    (out / "checkpoints" / FINISHED).unlink()
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) >= 4
    for _, later in checkpoints[3:]:  # back to the third: as if killed after writing it
        shutil.rmtree(later)
    state = torch.load(checkpoints[2][1] / "state.pt", weights_only=True)["adapters"]
    assert state["a"]["grads"] and 0 < state["a"]["steps_done"] < 6  # a mid-step
    for name in ("a", "b"):  # (SGD's state: each group's momentum)
        assert len(state[name]["optimizer"]["param_groups"]) == len(state[name]["optimizer"]["state"]) == 2

    for changed, culprit in (({"c": 4.0}, "adapter 'c': 'loraplus_lr_ratio' was None, now 4.0"),
                             ({"a": None}, f"adapter 'a': 'loraplus_lr_ratio' was {float(RATIO)}, now None")):
        other = json.loads(cfg.read_text())
        for adapter in other["lora"]:
            if adapter["name"] in changed:
                adapter["loraplus_lr_ratio"] = changed[adapter["name"]]
        (tmp_path / "changed.json").write_text(json.dumps(other))
        capsys.readouterr()
        assert _train(tiny_llama, tmp_path / "changed.json", "--output_dir", str(out), "--resume") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and culprit in err, err

    # a checkpoint of an mlora before LoRA+ has no loraplus_lr_ratio in its fingerprint: c's resumes
    manifest = checkpoints[2][1] / "manifest.json"
    saved = json.loads(manifest.read_text())
    del saved["fingerprint"]["adapters"]["c"]["loraplus_lr_ratio"]
    manifest.write_text(json.dumps(saved))
    assert _train(tiny_llama, cfg, "--output_dir", str(out), "--resume") == 0
    for name in ("a", "b", "c"):
        resumed, whole = (load_file(d / name / "adapter_model.safetensors") for d in (out, done))
        assert all(torch.equal(resumed[k], whole[k]) for k in whole), name
        assert _losses(out, name) == _losses(done, name)


def test_pipeline_equals_one_process(tmp_path, pipe_model):
    """A 3-rank pipeline ([3, 2, 2]: rank 0 holds the embedding and layers 0-1, rank 1 layers
    2-3, rank 2 no LoRA weight) of test_pipeline's two adapters, p0 (AdamW) and p1 (SGD with
    momentum) with LoRA+: each stage steps its layers' A's and B's in their two groups, clipped
    by the adapter's whole norm, as one process steps them all."""
    from test_pipeline import assert_same_as_single, write_config
    from test_pipeline_inprocess import run_threads

    path = write_config(tmp_path, 2, tmp_path / "single")
    cfg = json.loads(path.read_text())
    for adapter, ratio in zip(cfg["lora"], (RATIO, 2)):
        adapter["loraplus_lr_ratio"] = ratio
    path.write_text(json.dumps(cfg))
    assert _train(pipe_model, path) == 0
    run_threads(pipe_model, path, tmp_path / "pipe", 3, [3, 2, 2])
    assert_same_as_single(tmp_path / "single", tmp_path / "pipe", 2)
