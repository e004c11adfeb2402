"""mlora.config: defaults, m-LoRA compatibility, one-line errors, path resolution, seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlora.config import AdapterConfig, TrainConfig, adapter_seed, load_config, parse_config
from mlora.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory holding train.json, so adapters can say "data": "train.json"."""
    (tmp_path / "train.json").write_text('[{"instruction": "hi", "output": "hello"}]')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def adapter(**overrides) -> dict:
    return {"name": "a", "data": "train.json", **overrides}


def parse(**overrides) -> TrainConfig:
    """A one-adapter config; keyword `lora` replaces the list, anything else is a global key."""
    obj = {"lora": [adapter()], **overrides}
    return parse_config(obj, "cfg.json")


def error(obj) -> str:
    """The message of the UserError that `obj` raises; checks it is one line."""
    with pytest.raises(UserError) as info:
        parse_config(obj, "cfg.json")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cfg.json: ")
    return message


def adapter_error(**keys) -> str:
    return error({"lora": [adapter(**keys)]})


# --- defaults and aliases --------------------------------------------------------------------


def test_defaults_filled(workdir):
    config = parse()
    assert config.cutoff_len == 256
    assert config.save_step == 0
    assert config.seed == 42
    assert config.output_dir == "output"
    assert config.group_by_length is False
    assert config.eval_step == 0
    assert config.train_lora_candidate_num == 1
    assert config.train_lora_simultaneously_num == 1
    assert config.train_strategy == "trivial"

    a = config.lora[0]
    assert isinstance(a, AdapterConfig)
    assert a.name == "a"
    assert a.data == str(workdir / "train.json")
    assert (a.r, a.alpha, a.dropout, a.use_rslora) == (8, 16.0, 0.05, False)
    assert a.target_modules == ["q_proj", "v_proj"]
    assert (a.batch_size, a.micro_batch_size, a.test_batch_size) == (16, 16, 16)
    assert (a.num_epochs, a.max_steps) == (1, None)
    assert (a.test_data, a.prompt, a.init_from) == (None, "alpaca", None)
    assert (a.group_by_length, a.expand_side, a.train_on_inputs) == (False, "right", False)
    assert (a.optim, a.lr, a.momentum, a.weight_decay) == ("adamw", 3e-4, 0.0, 0.0)
    assert (a.lr_scheduler, a.warmup_steps, a.max_grad_norm, a.eval_step) == ("constant", 0, 1.0, 0)


def test_globals_fill_adapter_nones_but_not_explicit_values(workdir):
    (workdir / "test.json").write_text("[]")
    config = parse(
        group_by_length=True,
        eval_step=5,
        lora=[adapter(test_data="test.json"), adapter(name="b", group_by_length=False, eval_step=0)],
    )
    assert config.lora[0].group_by_length is True
    assert config.lora[0].eval_step == 5
    assert config.lora[1].group_by_length is False
    assert config.lora[1].eval_step == 0
    assert config.train_lora_candidate_num == 2
    assert config.train_lora_simultaneously_num == 2


def test_mlora_aliases(workdir):
    config = parse(
        early_stop_test_step=7,
        train_strategy="optim",
        lora=[adapter(lora_alpha=32, lora_dropout=0.1)],
    )
    assert config.eval_step == 7
    assert config.train_strategy == "optimal-fit"
    assert config.lora[0].alpha == 32.0 and isinstance(config.lora[0].alpha, float)
    assert config.lora[0].dropout == 0.1
    assert parse(train_strategy="none").train_strategy == "trivial"
    assert parse(train_strategy="fast-fit").train_strategy == "fast-fit"


def test_int_accepted_where_float_expected(workdir):
    a = parse(lora=[adapter(lr=1, alpha=8, momentum=0, weight_decay=0)]).lora[0]
    assert (a.lr, a.alpha) == (1.0, 8.0)
    assert all(isinstance(v, float) for v in (a.lr, a.alpha, a.momentum, a.weight_decay))


def test_max_grad_norm_null_or_zero_disables(workdir):
    assert parse(lora=[adapter(max_grad_norm=None)]).lora[0].max_grad_norm is None
    assert parse(lora=[adapter(max_grad_norm=0)]).lora[0].max_grad_norm is None
    assert parse(lora=[adapter(max_grad_norm=0.5)]).lora[0].max_grad_norm == 0.5
    assert "'max_grad_norm' must be >= 0" in adapter_error(max_grad_norm=-1)


def test_explicit_train_lora_nums_kept(workdir):
    config = parse(train_lora_candidate_num=4, train_lora_simultaneously_num=1)
    assert (config.train_lora_candidate_num, config.train_lora_simultaneously_num) == (4, 1)
    assert "'train_lora_simultaneously_num' must be > 0" in error(
        {"lora": [adapter()], "train_lora_simultaneously_num": 0}
    )


def test_simultaneously_num_defaults_to_and_may_not_exceed_candidate_num(workdir):
    three = [adapter(name=n) for n in "abc"]
    config = parse(lora=three, train_lora_candidate_num=2)
    assert (config.train_lora_candidate_num, config.train_lora_simultaneously_num) == (2, 2)
    config = parse(lora=three, train_lora_candidate_num=5)  # more than the adapters: all of them
    assert config.train_lora_simultaneously_num == 3
    message = error({"lora": three, "train_lora_candidate_num": 1, "train_lora_simultaneously_num": 2})
    assert "train_lora_simultaneously_num (2) is more than train_lora_candidate_num (1)" in message
    # Without a candidate_num, a simultaneously_num above the adapter count is a harmless cap.
    assert parse(lora=three, train_lora_simultaneously_num=8).train_lora_simultaneously_num == 3
    assert parse(train_lora_simultaneously_num=4).train_lora_simultaneously_num == 1


def test_parse_does_not_modify_its_input(workdir):
    obj = {"lora": [adapter(lora_alpha=4)], "early_stop_test_step": 3}
    snapshot = json.loads(json.dumps(obj))
    parse_config(obj)
    assert obj == snapshot


# --- target_modules ----------------------------------------------------------------------------


def test_target_modules_list_is_deduplicated_and_ordered(workdir):
    a = parse(lora=[adapter(target_modules=["down_proj", "q_proj", "v_proj", "q_proj"])]).lora[0]
    assert a.target_modules == ["q_proj", "v_proj", "down_proj"]


def test_target_modules_mlora_dict_keeps_true_ones(workdir):
    modules = {"q_proj": True, "k_proj": False, "v_proj": True, "o_proj": False,
               "w1_proj": True, "w2_proj": False, "w3_proj": True}
    a = parse(lora=[adapter(target_modules=modules)]).lora[0]
    assert a.target_modules == ["q_proj", "v_proj", "w1_proj", "w3_proj"]


@pytest.mark.parametrize(
    "names, written, expected",
    [
        (["w1_proj", "w2_proj", "w3_proj"], ["w1_proj", "w3_proj", "w2_proj"], ["gate_proj", "up_proj", "down_proj"]),
        (["w1"], ["w1"], ["gate_proj"]),
        (["w2"], ["w2"], ["down_proj"]),
        (["w3"], ["w3"], ["up_proj"]),
        (["gate_proj", "w1"], ["gate_proj", "w1"], ["gate_proj"]),
    ],
)
def test_w123_names_map_to_llama_names(workdir, names, written, expected):
    """Kept as written (in LLaMA's order) until the base model is known, so that errors about
    them name them as the user did; then mlora's names."""
    from mlora.models.llama import args_from_hf_config
    from mlora.session import resolve_targets

    cfg = parse(lora=[adapter(target_modules=names)])
    assert cfg.lora[0].target_modules == written
    llama = args_from_hf_config(dict(model_type="llama", vocab_size=400, hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    assert resolve_targets(cfg, llama).lora[0].target_modules == expected


def test_target_modules_errors(workdir):
    message = adapter_error(target_modules=["q_proj", "q_prj"])
    assert "lora[0] (name 'a')" in message
    assert "'q_prj'" in message and "target_modules" in message
    assert "did you mean 'q_proj'?" in message

    # A typo is caught even when the m-LoRA dict switches that entry off.
    assert "did you mean 'o_proj'" in adapter_error(target_modules={"q_proj": True, "o_prj": False})

    assert "selects no modules" in adapter_error(target_modules=[])
    assert "selects no modules" in adapter_error(target_modules={"q_proj": False})
    assert "must be true or false" in adapter_error(target_modules={"q_proj": 1})
    assert "'target_modules' must be a list" in adapter_error(target_modules="q_proj")


# --- error messages ------------------------------------------------------------------------------


def test_unknown_adapter_key_names_adapter_and_suggests(workdir):
    message = error({"lora": [adapter(), adapter(name="b", lrr=0.1)]})
    assert message == "cfg.json: lora[1] (name 'b'): unknown key 'lrr'; did you mean 'lr'?"


def test_unknown_global_key_suggests(workdir):
    message = error({"lora": [adapter()], "cutof_len": 128})
    assert message == "cfg.json: unknown key 'cutof_len'; did you mean 'cutoff_len'?"


def test_unknown_key_without_close_match_has_no_hint(workdir):
    message = adapter_error(zzzzzz=1)
    assert "unknown key 'zzzzzz'" in message
    assert "did you mean" not in message


def test_misspelled_alias_suggests_the_alias(workdir):
    assert "did you mean 'lora_alpha'?" in adapter_error(lora_alpah=16)


def test_wrong_types(workdir):
    assert adapter_error(r="8") == "cfg.json: lora[0] (name 'a'): 'r' must be an integer, got str '8'"
    assert "'r' must be an integer, got bool True" in adapter_error(r=True)
    assert "'r' must be an integer, got float 8.0" in adapter_error(r=8.0)
    assert "'r' must be an integer, got null" in adapter_error(r=None)
    assert "'lr' must be a number, got str '3e-4'" in adapter_error(lr="3e-4")
    assert "'lr' must be a number, got bool False" in adapter_error(lr=False)
    assert "'use_rslora' must be true or false, got int 1" in adapter_error(use_rslora=1)
    assert "'use_rslora' must be true or false, got str 'true'" in adapter_error(use_rslora="true")
    assert "'group_by_length' must be true or false" in error({"lora": [adapter()], "group_by_length": 0})
    assert "'cutoff_len' must be an integer" in error({"lora": [adapter()], "cutoff_len": "256"})


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("dropout", 1.0, "'dropout' must be in [0, 1), got 1.0"),
        ("dropout", -0.1, "'dropout' must be in [0, 1), got -0.1"),
        ("momentum", 1, "'momentum' must be in [0, 1), got 1"),
        ("r", 0, "'r' must be > 0, got 0"),
        ("alpha", -1, "'alpha' must be > 0, got -1"),
        ("lr", 0, "'lr' must be > 0, got 0"),
        ("batch_size", 0, "'batch_size' must be > 0, got 0"),
        ("micro_batch_size", 0, "'micro_batch_size' must be > 0, got 0"),
        ("test_batch_size", -2, "'test_batch_size' must be > 0, got -2"),
        ("num_epochs", 0, "'num_epochs' must be > 0, got 0"),
        ("max_steps", 0, "'max_steps' must be > 0, got 0"),
        ("weight_decay", -0.5, "'weight_decay' must be >= 0, got -0.5"),
        ("warmup_steps", -1, "'warmup_steps' must be >= 0, got -1"),
        ("eval_step", -1, "'eval_step' must be >= 0, got -1"),
    ],
)
def test_adapter_out_of_range(workdir, key, value, expected):
    message = adapter_error(**{key: value})
    assert message == f"cfg.json: lora[0] (name 'a'): {expected}"


def test_momentum_is_for_sgd_only(workdir):
    """AdamW has no momentum setting: a momentum beside it would be silently ignored."""
    assert "momentum applies to 'sgd' only" in adapter_error(optim="adamw", momentum=0.9)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("cutoff_len", 0, "'cutoff_len' must be > 0, got 0"),
        ("save_step", -1, "'save_step' must be >= 0, got -1"),
        ("eval_step", -3, "'eval_step' must be >= 0, got -3"),
        ("early_stop_test_step", -3, "'eval_step' must be >= 0, got -3"),
        ("train_lora_candidate_num", 0, "'train_lora_candidate_num' must be > 0, got 0"),
    ],
)
def test_global_out_of_range(workdir, key, value, expected):
    assert error({"lora": [adapter()], key: value}) == f"cfg.json: {expected}"


def test_memory_fraction(workdir):
    assert parse().memory_fraction == 0.9
    assert parse(memory_fraction=1).memory_fraction == 1.0  # an int is a number; 1 is allowed
    assert parse(memory_fraction=0.5).memory_fraction == 0.5
    for value in (0, -0.1, 1.01):
        assert error({"lora": [adapter()], "memory_fraction": value}) == \
            f"cfg.json: 'memory_fraction' must be in (0, 1], got {value!r}"
    for value, shown in (("0.9", "str '0.9'"), (True, "bool True"), (None, "null")):
        assert error({"lora": [adapter()], "memory_fraction": value}) == \
            f"cfg.json: 'memory_fraction' must be a number, got {shown}"
    assert "did you mean 'memory_fraction'?" in error({"lora": [adapter()], "memory_fracton": 0.8})


def test_nan_is_not_a_number(workdir):
    assert "'lr' must be a number" in adapter_error(lr=float("nan"))


def test_batch_size_must_be_multiple_of_micro_batch_size(workdir):
    message = adapter_error(batch_size=16, micro_batch_size=5)
    assert "lora[0] (name 'a')" in message
    assert "'batch_size' (16)" in message and "'micro_batch_size' (5)" in message
    assert parse(lora=[adapter(batch_size=16, micro_batch_size=4)]).lora[0].micro_batch_size == 4


@pytest.mark.parametrize(
    "key, value, valid, suggestion",
    [
        ("optim", "adam", "adamw, sgd", "adamw"),
        ("optim", "SGD", "adamw, sgd", "sgd"),
        ("lr_scheduler", "cosin", "constant, linear, cosine", "cosine"),
        ("expand_side", "rigth", "right, left", "right"),
    ],
)
def test_adapter_enums_list_values_and_suggest(workdir, key, value, valid, suggestion):
    message = adapter_error(**{key: value})
    assert f"'{key}' must be one of {valid}" in message
    assert f"got {value!r}" in message
    assert f"did you mean {suggestion!r}?" in message


def test_train_strategy_enum(workdir):
    message = error({"lora": [adapter()], "train_strategy": "optimal_fit"})
    assert "'train_strategy' must be one of trivial, fast-fit, optimal-fit" in message
    assert "did you mean 'optimal-fit'?" in message


def test_top_level_and_lora_shapes(workdir):
    assert "top level must be a JSON object" in error([adapter()])
    assert "'lora' must be a list of objects" in error({"lora": adapter()})
    assert "'lora' must be a list of objects" in error({"lora": [adapter(), "b"]})
    assert "'lora' must list at least one adapter" in error({"lora": []})
    assert "missing required key 'lora'" in error({"cutoff_len": 8})


def test_alias_given_twice(workdir):
    message = adapter_error(alpha=16, lora_alpha=16)
    assert "lora[0] (name 'a')" in message
    assert "'alpha'" in message and "'lora_alpha'" in message
    message = error({"lora": [adapter()], "eval_step": 1, "early_stop_test_step": 1})
    assert "'eval_step'" in message and "'early_stop_test_step'" in message


def test_duplicate_adapter_names(workdir):
    message = error({"lora": [adapter(), adapter(name="b"), adapter()]})
    assert "duplicate adapter name 'a'" in message
    assert "lora[0]" in message and "lora[2]" in message


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a\\b", "new\nline", " ", "a ", " a", "a\u3000",
                                  "a,b"])
def test_bad_adapter_names(workdir, name):
    message = adapter_error(name=name)
    assert "'name' must be usable as a directory name" in message
    assert "lora[0]" in message


def test_missing_or_non_string_name(workdir):
    assert error({"lora": [{"data": "train.json"}]}) == "cfg.json: lora[0]: missing required key 'name'"
    assert "'name' must be a string, got int 3" in adapter_error(name=3)
    # A misspelt name key is reported as such, not as a missing name.
    assert "unknown key 'nmae'; did you mean 'name'?" in error({"lora": [{"nmae": "a", "data": "x"}]})


def test_missing_data(workdir):
    assert error({"lora": [{"name": "a"}]}) == "cfg.json: lora[0] (name 'a'): missing required key 'data'"


@pytest.mark.parametrize("value", [True, 16, 0, 0.5])
def test_unsupported_mlora_features(workdir, value):
    assert adapter_error(use_dora=value) == "cfg.json: lora[0] (name 'a'): use_dora is not supported by mlora"


def test_unsupported_features_switched_off_are_ignored(workdir):
    a = parse(lora=[adapter(use_dora=False)]).lora[0]
    assert not hasattr(a, "use_dora")


def test_loraplus_lr_ratio(workdir):
    """A positive finite number (an int reads as one); null or absent: plain LoRA. Anything
    else is one line naming the key, as is a B rate lr * ratio whose weight decay flips the
    weights' sign (each step scales every lora_B by 1 - lr * ratio * weight_decay)."""
    assert parse().lora[0].loraplus_lr_ratio is None
    assert parse(lora=[adapter(loraplus_lr_ratio=None)]).lora[0].loraplus_lr_ratio is None
    assert parse(lora=[adapter(loraplus_lr_ratio=16)]).lora[0].loraplus_lr_ratio == 16.0
    assert parse(lora=[adapter(loraplus_lr_ratio=0.5)]).lora[0].loraplus_lr_ratio == 0.5
    where = "cfg.json: lora[0] (name 'a'): "
    for value, shown in ((0, "> 0, got 0"), (-2.5, "> 0, got -2.5"), (True, "a number, got bool True"),
                         ("16", "a number, got str '16'"), (float("inf"), "a number, got float inf"),
                         (float("nan"), "a number, got float nan"), ([16], "a number, got list [16]")):
        assert adapter_error(loraplus_lr_ratio=value) == f"{where}'loraplus_lr_ratio' must be {shown}"
    assert adapter_error(lr=0.01, weight_decay=5, loraplus_lr_ratio=20) == (
        f"{where}'weight_decay' (5) times 'lr' (0.01) times 'loraplus_lr_ratio' (20) must be below 1: each step "
        f"scales every lora_B by 1 - lr * loraplus_lr_ratio * weight_decay")
    # (below 1 with the ratio; a ratio below 1 leaves lr * weight_decay the larger)
    assert parse(lora=[adapter(lr=0.01, weight_decay=5, loraplus_lr_ratio=19.9)]).lora[0].weight_decay == 5
    assert "times 'lr' (0.5) must be below 1" in adapter_error(lr=0.5, weight_decay=2, loraplus_lr_ratio=0.5)


def test_eval_step_without_test_data(workdir):
    message = adapter_error(eval_step=3)
    assert "'eval_step'" in message and "'test_data'" in message
    # A global eval_step just skips adapters without test data.
    assert parse(eval_step=3).lora[0].eval_step == 0
    assert parse(eval_step=3, lora=[adapter(test_data="train.json")]).lora[0].eval_step == 3


# --- paths -------------------------------------------------------------------------------------


def write_config(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def test_relative_paths_fall_back_to_config_dir(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "cfg"
    (cfg_dir / "data").mkdir(parents=True)
    (cfg_dir / "data" / "train.json").write_text("[]")
    (cfg_dir / "data" / "test.json").write_text("[]")
    (cfg_dir / "tpl.json").write_text("{}")
    (cfg_dir / "init").mkdir()
    (cfg_dir / "init" / "adapter_config.json").write_text("{}")
    path = write_config(cfg_dir / "run.json", {"lora": [{
        "name": "a", "data": "data/train.json", "test_data": "data/test.json",
        "prompt": "tpl.json", "init_from": "init",
    }]})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    a = load_config(path).lora[0]
    assert a.data == str(cfg_dir / "data" / "train.json")
    assert a.test_data == str(cfg_dir / "data" / "test.json")
    assert a.prompt == str(cfg_dir / "tpl.json")
    assert a.init_from == str(cfg_dir / "init")
    assert all(Path(p).is_absolute() for p in (a.data, a.test_data, a.prompt, a.init_from))


def test_relative_paths_prefer_working_directory(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "cfg"
    (cfg_dir / "data").mkdir(parents=True)
    (cfg_dir / "data" / "train.json").write_text("[]")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    path = write_config(cfg_dir / "run.json", {"lora": [{"name": "a", "data": "data/train.json"}]})
    monkeypatch.chdir(tmp_path)
    assert load_config(path).lora[0].data == str(tmp_path / "data" / "train.json")


def test_parse_config_base_dir(tmp_path, monkeypatch):
    (tmp_path / "train.json").write_text("[]")
    monkeypatch.chdir(tmp_path.parent)
    config = parse_config({"lora": [adapter()]}, base_dir=tmp_path)
    assert config.lora[0].data == str(tmp_path / "train.json")


def test_a_missing_file_names_each_place_looked_in_once(tmp_path, monkeypatch):
    """Run from the config's own directory, the two places are one: named once."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        parse_config({"lora": [adapter(data="nope.json")]}, base_dir=tmp_path)
    assert f"(looked in {tmp_path})" in str(info.value)
    with pytest.raises(UserError) as info:
        parse_config({"lora": [adapter(data="nope.json")]}, base_dir=tmp_path / "configs")
    assert f"(looked in {tmp_path} and {tmp_path / 'configs'})" in str(info.value)


def test_absolute_paths_kept(tmp_path, monkeypatch):
    (tmp_path / "train.json").write_text("[]")
    monkeypatch.chdir(tmp_path.parent)
    config = parse_config({"lora": [adapter(data=str(tmp_path / "train.json"))]})
    assert config.lora[0].data == str(tmp_path / "train.json")


def test_missing_paths_name_key_adapter_and_path(workdir):
    message = adapter_error(data="nope.json")
    assert "lora[0] (name 'a')" in message
    assert "'data'" in message and "'nope.json'" in message and "not found" in message

    message = adapter_error(test_data="missing_test.json")
    assert "'test_data'" in message and "'missing_test.json'" in message

    message = adapter_error(prompt="my_template.json")
    assert "'prompt'" in message and "'my_template.json'" in message and "alpaca" in message

    message = adapter_error(init_from="no_such_adapter")
    assert "'init_from'" in message and "'no_such_adapter'" in message


def test_chat_template_is_a_jinja_file_checked_before_anything_loads(tmp_path, monkeypatch):
    """chat_template: a path resolved as the other files' (from the working directory, then the
    config's), stored absolute; a file that is missing, not UTF-8, empty or not Jinja (transformers'
    `generation` tag is Jinja here) is one line naming the adapter, the key and the file."""
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "train.json").write_text("[]")
    (cfg_dir / "chat.jinja").write_text("{% for m in messages %}{% generation %}{{ m['content'] }}"
                                        "{% endgeneration %}{% endfor %}")
    monkeypatch.chdir(tmp_path)
    path = write_config(cfg_dir / "run.json", {"lora": [adapter(data="train.json", chat_template="chat.jinja")]})
    assert load_config(path).lora[0].chat_template == str(cfg_dir / "chat.jinja")
    for reads in ("eval", "generate"):
        assert load_config(path, reads=reads).lora[0].chat_template == str(cfg_dir / "chat.jinja")
    assert AdapterConfig("a", "d").chat_template is None  # the tokenizer's own
    monkeypatch.chdir(cfg_dir)
    message = adapter_error(chat_template="nope.jinja")
    assert message.startswith("cfg.json: lora[0] (name 'a'): 'chat_template': chat template file 'nope.jinja' not "
                              "found"), message
    broken = cfg_dir / "broken.jinja"
    for text, said in (("{% for m in messages %}\n{{ m.content }\n", f"{broken}:2: Jinja syntax error ("),
                       ("{% generation %}{{ x }}", f"{broken}:1: Jinja syntax error (Unexpected end of template"),
                       (" \n", f"{broken}: the chat template is empty"), (b"\xff", f"{broken}: not UTF-8 text")):
        if isinstance(text, bytes):
            broken.write_bytes(text)
        else:
            broken.write_text(text)
        message = adapter_error(chat_template="broken.jinja")
        assert message.startswith(f"cfg.json: lora[0] (name 'a'): 'chat_template': {said}"), message


def test_chat_template_may_hold_the_jinja_itself(tmp_path, monkeypatch):
    """chat_template holding {{ or {% is the template's text, as tokenizer_config.json holds it:
    kept as given (not made a path), checked as a file's is (a syntax error names its line); a
    value that is neither a file nor Jinja is one line naming the adapter; a file whose name
    holds {{ or {% is refused rather than read as Jinja without a word."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.json").write_text("[]")
    text = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert parse(lora=[adapter(chat_template=text)]).lora[0].chat_template == text
    assert adapter_error(chat_template="{% for m in messages %}\n{{ m.content }\n").startswith(
        "cfg.json: lora[0] (name 'a'): 'chat_template': line 2 of its Jinja text: Jinja syntax error (")
    assert adapter_error(chat_template="{{ }}\n ").startswith(
        "cfg.json: lora[0] (name 'a'): 'chat_template': line 1 of its Jinja text: Jinja syntax error (")
    message = adapter_error(chat_template="<|im_start|>user")
    assert message == ("cfg.json: lora[0] (name 'a'): 'chat_template': chat template file '<|im_start|>user' not "
                       f"found (looked in {tmp_path}); nor is it the Jinja text of a template, which holds {{{{ or "
                       "{%"), message
    (tmp_path / "{{odd}}.jinja").write_text(text)
    assert adapter_error(chat_template="{{odd}}.jinja") == (
        f"cfg.json: lora[0] (name 'a'): 'chat_template': '{{{{odd}}}}.jinja' is the name of the file "
        f"{tmp_path / '{{odd}}.jinja'} but holds Jinja's {{{{ or {{%, which make it the template's text; rename "
        "the file")


@pytest.mark.parametrize("change", ["renamed", "other_arguments", "refuses_jinja2"])
def test_chat_template_check_outlives_transformers_private_compiler(tmp_path, monkeypatch, change):
    """read_chat_template compiles through transformers' private _compile_jinja_template: where a
    release renames it, changes its arguments or raises ImportError in it (a jinja2 it refuses),
    the check falls back to a sandboxed Jinja environment that knows the generation tag: the same
    one-line messages as transformers' own compiler gives, never a traceback."""
    import transformers.utils.chat_template_utils as utils

    from mlora.chat_template import read_chat_template

    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}{%- generation -%}{{ m['content'] }}{% endgeneration %}"
                    "{% if loop.last %}{% break %}{% endif %}{% endfor %}")
    broken = {tmp_path / "unclosed.jinja": "{% for m in messages %}\n{{ m.content }\n",
              tmp_path / "tag.jinja": "{% generation %}{{ x }}"}
    for path, text in broken.items():
        path.write_text(text)

    def said(path) -> str:
        with pytest.raises(UserError) as err:
            read_chat_template(path)
        return str(err.value)

    expected = {path: said(path) for path in broken}  # (through transformers' compiler)
    if change == "renamed":
        monkeypatch.delattr(utils, "_compile_jinja_template")
    else:
        def changed(template, *required):
            raise (TypeError("missing argument") if change == "other_arguments" else ImportError("jinja2 too old"))

        monkeypatch.setattr(utils, "_compile_jinja_template", changed)
    assert read_chat_template(good) == good.read_text()
    for path in broken:
        assert said(path) == expected[path]
        assert said(path).startswith(f"{path}:"), said(path)


def test_path_kinds_checked(workdir):
    (workdir / "adir").mkdir()
    assert "is not a file" in adapter_error(data="adir")
    assert "no adapter_config.json" in adapter_error(init_from="adir")
    assert "is not a directory" in adapter_error(init_from="train.json")
    assert "'data' must be a non-empty string" in adapter_error(data="")
    assert "'data' must be a non-empty string" in adapter_error(data=None)


def test_builtin_prompt_is_not_a_path(workdir):
    assert parse(lora=[adapter(prompt="alpaca")]).lora[0].prompt == "alpaca"


# --- load_config -------------------------------------------------------------------------------


def test_malformed_json_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "cutoff_len": 256,\n  "lora": [\n    {"name": "a",}\n  ]\n}\n')
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert "line 4" in message and "column" in message


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found") as info:
        load_config(tmp_path / "absent.json")
    assert str(tmp_path / "absent.json") in str(info.value)


def test_config_path_is_a_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        load_config(tmp_path)


def test_duplicate_json_keys_rejected(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"cutoff_len": 1, "cutoff_len": 2, "lora": []}')
    with pytest.raises(UserError, match="'cutoff_len' appears twice"):
        load_config(path)


def test_load_config_messages_start_with_the_file(workdir):
    path = write_config(workdir / "run.json", {"lora": [adapter(r=0)]})
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: lora[0] (name 'a'): 'r' must be > 0")


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_load(path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(path.relative_to(REPO))
    assert config.lora
    for a in config.lora:
        assert Path(a.data).is_file()


def test_shipped_configs_cover_the_documented_features(monkeypatch):
    monkeypatch.chdir(REPO)
    from mlora.data import load_rows, row_shape

    example = load_config("config/example.json")
    assert len(example.lora) == 5
    # every row shape the README lists has a sample
    assert {row_shape(row) for a in example.lora for row in load_rows(a.data)} == {
        "alpaca", "chat", "sharegpt", "prompt/completion", "text"}
    assert {a.optim for a in example.lora} == {"adamw", "sgd"}
    assert {a.lr_scheduler for a in example.lora} == {"constant", "linear", "cosine"}
    assert any(a.test_data and a.eval_step for a in example.lora)
    assert any(a.prompt.endswith(".json") for a in example.lora)

    compat = load_config("config/mlora_compat.json")
    assert compat.train_strategy == "optimal-fit"
    assert compat.eval_step > 0
    assert any("w1_proj" in a.target_modules for a in compat.lora)


# --- adapter_seed ------------------------------------------------------------------------------


def test_adapter_seed_is_stable_and_depends_only_on_seed_and_name():
    s = adapter_seed(42, "a")
    assert s == adapter_seed(42, "a")
    assert 0 <= s < 2**63
    assert adapter_seed(42, "b") != s
    assert adapter_seed(43, "a") != s
    # Pinned value: a change here changes every user's initialisation and data order.
    assert s == 4872681401071020893


def test_adapter_seed_independent_of_other_adapters(workdir):
    alone = parse(lora=[adapter(name="a")])
    crowd = parse(lora=[adapter(name="z"), adapter(name="a"), adapter(name="m")])
    seed_alone = adapter_seed(alone.seed, alone.lora[0].name)
    seed_crowd = adapter_seed(crowd.seed, crowd.lora[1].name)
    assert seed_alone == seed_crowd


def test_files_a_command_does_not_read_may_be_gone(workdir):
    """Training reads every file it names; eval the test_data, else the data; generate none (a
    trained adapter's data may have moved away). A missing one is kept absolute as given."""
    gone = {"data": "moved.json", "test_data": "moved_test.json"}
    assert "'data'" in error({"lora": [adapter(data="moved.json")]})
    config = parse_config({"lora": [adapter(**gone)]}, "cfg.json", reads="generate")
    assert config.lora[0].data == str(workdir / "moved.json")
    assert "'test_data'" in str(pytest.raises(UserError, parse_config, {"lora": [adapter(**gone)]}, "cfg.json",
                                              reads="eval").value)
    assert parse_config({"lora": [adapter(data="moved.json", test_data="train.json")]}, "cfg.json",
                        reads="eval").lora[0].test_data == str(workdir / "train.json")
    assert "'data'" in str(pytest.raises(UserError, parse_config, {"lora": [adapter(data="moved.json")]},
                                         "cfg.json", reads="eval").value)


def test_save_best_needs_eval_step_and_test_data(workdir):
    """save_best keeps the weights of the lowest eval loss: without evals it would keep nothing."""
    tail = "is given (the best weights are those of the lowest eval loss)"
    where = "cfg.json: lora[0] (name 'a'): 'save_best' is true but no"
    assert adapter_error(save_best=True) == f"{where} 'test_data' {tail}"
    assert adapter_error(save_best=True, test_data="train.json") == f"{where} 'eval_step' {tail}"
    # the adapter's own eval_step 0 overrides a global one
    own_zero = adapter(save_best=True, test_data="train.json", eval_step=0)
    assert error({"lora": [own_zero], "eval_step": 2}) == f"{where} 'eval_step' {tail}"
    assert error({"lora": [adapter(), adapter(name="b", save_best=True)], "eval_step": 2}).startswith(
        "cfg.json: lora[1] (name 'b'): 'save_best' is true but no 'test_data'")
    assert parse(eval_step=2, lora=[adapter(save_best=True, test_data="train.json")]).lora[0].save_best
    assert not parse().lora[0].save_best
    assert "'save_best' must be true or false" in adapter_error(save_best="yes")
