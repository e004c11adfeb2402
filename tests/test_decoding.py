"""`mlora generate` at the edges: choosing the next token when the scores are not ordinary
numbers (a model that overflowed: NaN or inf logits; a repetition penalty far below 1), against
transformers' processors and a CLI run on a base that overflows in fp16; and lines that run past
the model's positions."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlora.cli import main
from mlora.generate import Decoding, NonFiniteScores, Sampling, penalize_repetition

V = 12  # vocabulary of the hand-made logits


def decoding(sampling=None, penalty=1.0) -> Decoding:
    """Three rows: the bare base's, adapter x's, adapter y's (Decoding orders them so)."""
    return Decoding([("x", [3, 4]), (None, [5]), ("y", [6, 7, 8])], pad_id=0, stop={1}, sampling=sampling,
                    repetition_penalty=penalty)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all -inf"])
@pytest.mark.parametrize("sampled", [False, True])
def test_non_finite_scores_of_a_live_row_are_one_line(bad, sampled):
    """Greedy argmax would pick the first NaN's token (printed as if the adapter had said it);
    sampling could not draw (torch.multinomial raises). Either is a UserError naming the row."""
    state = decoding(Sampling(temperature=1.0) if sampled else None)
    logits = torch.randn(3, V)  # [B, V]
    if bad == "all -inf":
        logits[2] = float("-inf")
    else:
        logits[2, 5] = bad
    with pytest.raises(NonFiniteScores) as err:
        state.pick(logits)
    assert (err.value.name, err.value.request_id, err.value.token) == ("y", 2, 1)
    assert "adapter 'y'" in str(err.value) and "request 3" in str(err.value) and "\n" not in str(err.value)


def test_non_finite_scores_of_a_finished_row_are_ignored():
    """A row that stopped is fed pads; what its scores are no longer matters."""
    state = decoding()
    state.record([9, 1, 9])  # row 1 (adapter x's) stops
    logits = torch.randn(3, V)
    logits[1] = float("nan")
    logits[0, 4] = float("-inf")  # (a -inf beside finite scores is an ordinary "never")
    assert len(state.pick(logits)) == 3


def test_an_adapters_own_stop_tokens_end_its_rows_only():
    """adapter_stop: a token that ends adapter x's rows (its chat template's end of turn) is an
    ordinary token for the bare base's and y's; the shared stop token ends every row."""
    state = Decoding([("x", [3, 4]), (None, [5]), ("y", [6, 7, 8])], pad_id=0, stop={1}, adapter_stop={"x": {9}})
    state.record([9, 9, 9])  # (rows in Decoding's order: the bare base's, x's, y's)
    assert state.done == [False, True, False]
    state.record([2, 5, 1])
    assert state.done == [False, True, True]
    assert state.result() == [[], [9, 2], [9]]


def test_a_tiny_repetition_penalty_samples_a_seen_token():
    """A penalty far below 1 divides a positive logit of a seen token into inf (in fp32, as
    transformers' processor does): the seen tokens are then certain. Greedy picks what
    transformers' argmax picks; sampling draws one of them instead of failing on NaN."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(3, V).abs() + 0.5  # [B, V] positive: every seen token overflows
    seen_ids = torch.tensor([[5, 5, 5], [3, 4, 4], [6, 7, 8]])  # each row's prompt (pads as repeats)
    want = RepetitionPenaltyLogitsProcessor(1e-40)(seen_ids, logits.clone()).argmax(-1).tolist()
    assert torch.isinf(RepetitionPenaltyLogitsProcessor(1e-40)(seen_ids, logits.clone())).any()
    assert decoding(penalty=1e-40).pick(logits) == want
    for seed in range(5):
        picked = decoding(Sampling(temperature=1.0, seed=seed), penalty=1e-40).pick(logits)
        assert [token in row for token, row in zip(picked, seen_ids.tolist())] == [True] * 3, picked
    seen = torch.zeros(3, V, dtype=torch.bool).scatter_(1, seen_ids, True)
    assert torch.isfinite(penalize_repetition(logits, seen, 1e-40)).all()


def config_of_a_peft_adapter(tmp_path, base):
    """A config of one adapter "a", saved by PEFT (as initialized) on `base`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "out" / "a")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "lora": [
        {"name": "a", "data": str(tmp_path / "gone.jsonl"), "r": 4, "alpha": 8,
         "target_modules": ["q_proj", "v_proj"]}]}))
    return config


def test_generate_notes_lines_past_the_models_positions(tmp_path, tiny_llama, tokenizer, capsys):
    """A prompt that, with --max_new_tokens, runs past max_position_embeddings (256 here) runs
    on, as in transformers' generate (which warns), with one note on stderr naming the longest;
    none when every line fits."""
    from mlora.cli import note_past_positions

    config = config_of_a_peft_adapter(tmp_path, tiny_llama)
    long_prompt = "one two three " * 100
    assert len(tokenizer(long_prompt).input_ids) > 256
    capsys.readouterr()  # (transformers' loading bar)
    argv = ["generate", "--base_model", str(tiny_llama), "--config", str(config), "--format", "text",
            "--max_new_tokens", "2", "--no_progress", "--prompt", "say hi"]
    assert main([*argv, "--prompt", long_prompt]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    notes = captured.err.splitlines()
    assert len(notes) == 1 and notes[0].startswith("mlora: note: 1 of 2 lines may run past the model's "
                                                   "max_position_embeddings (256)") and "output line 2" in notes[0]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    # the new tokens count: a prompt of 250 tokens fits alone, not with 7 more
    note_past_positions([("a", "p", [1] * 250, None)], 6, 256)
    assert capsys.readouterr().err == ""
    note_past_positions([("a", "p", [1] * 250, None)], 7, 256)
    assert "1 of 1 line may run past" in capsys.readouterr().err


def test_generate_on_a_base_that_overflows_is_one_line(tmp_path, tiny_llama, tokenizer, capsys):
    """`mlora generate --dtype fp16` on a base whose MLP outputs overflow fp16: one line naming
    the output line, its prompt and the fix, exit 2 (it printed "" as the completion, greedy,
    and a traceback sampled); fp32 generates."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    weights = load_file(base / "model.safetensors")
    save_file({k: v * 60 if ".mlp." in k else v for k, v in weights.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    config = config_of_a_peft_adapter(tmp_path, base)
    argv = ["generate", "--base_model", str(base), "--config", str(config), "--format", "text",
            "--prompt", "say hi", "--prompt", "count to three", "--max_new_tokens", "3", "--no_progress"]
    assert main(argv) == 0  # fp32: finite
    assert len(capsys.readouterr().out.splitlines()) == 2
    for extra in ([], ["--temperature", "1.0"]):
        assert main([*argv, "--dtype", "fp16", *extra]) == 2
        captured = capsys.readouterr()
        err = [line for line in captured.err.splitlines() if "note:" not in line]
        assert captured.out == "" and len(err) == 1, err
        assert err[0].startswith("mlora: error: the model's next-token scores are not finite") and \
            "adapter 'a' on output line 1 (prompt 'say hi')" in err[0] and "--dtype fp16" in err[0], err


class HostReads(torch.Tensor):
    """Logits that count how often their values (or any result's) are read on the host: on a
    GPU each read waits for everything queued there."""

    reads = 0
    READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.cpu, torch.Tensor.numpy}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.READS:
            HostReads.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_a_greedy_pick_reads_the_device_once(penalty):
    """The check for non-finite scores rides on the copy of the picked tokens: one read of the
    device per token, as before the check (it had added a second, and a copy to the device)."""
    state = decoding(penalty=penalty)
    logits = torch.randn(3, V)
    want = decoding(penalty=penalty).pick(logits.clone())
    HostReads.reads = 0
    assert state.pick(logits.as_subclass(HostReads)) == want
    assert HostReads.reads == 1
