"""Config dataclasses: YAML + overrides, type coercion, every error path, save/load round trip."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest

from tether.runs.config import (
    ConfigError,
    RunConfig,
    check_config_class,
    describe_config,
    load_config,
    option,
    save_config,
)


@dataclass
class OptimConfig:
    learning_rate: float = option(1e-5, help="AdamW learning rate.")
    betas: tuple[float, float] = option((0.9, 0.999), help="AdamW betas.")
    warmup_steps: int = option(0, help="Linear warm-up steps.")


@dataclass
class PeftConfig:
    r: int = option(8, help="LoRA rank.")
    targets: list[str] = option(["q_proj", "v_proj"], help="Module names to adapt.")


@dataclass
class ToyConfig(RunConfig):
    learning_rate: float = option(1e-6, help="Top-level learning rate.")
    beta: float = option(0.1, help="KL coefficient.")
    beta_max: float = option(math.inf, help="Upper bound on beta.")
    loss: Literal["sigmoid", "ipo", "hinge"] = option("sigmoid", help="Loss variant.")
    use_cache: bool = option(True, help="Use the KV cache.")
    model: str = option("tiny", help="Model id or path.")
    revision: Optional[str] = option(None, help="Model revision.")  # noqa: UP045 (typing form)
    data_path: Path | None = option(None, help="Data file.")
    optim: OptimConfig = option(OptimConfig(learning_rate=3e-4), help="Optimizer settings.")
    peft: PeftConfig | None = option(None, help="LoRA settings (null: full fine-tuning).")
    tags: list[str] = option([], help="Free-form tags.")
    weights: dict[str, float] = option({"a": 1.0}, help="Reward weights.")
    n_ctx: int | float = option(8, help="Context (int or float) to test unions.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta > self.beta_max:
            raise ValueError(f"beta ({self.beta}) must be ≤ beta_max ({self.beta_max})")


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Loading and coercion
# --------------------------------------------------------------------------------------------


def test_defaults_without_file():
    cfg = load_config(ToyConfig)
    assert cfg == ToyConfig()
    assert cfg.optim.learning_rate == 3e-4  # the parent's default instance, not the class default
    assert cfg.peft is None and cfg.tags == [] and cfg.output_dir == "runs/default"


def test_mutable_defaults_are_not_shared():
    a, b = ToyConfig(), ToyConfig()
    a.tags.append("x")
    a.optim.learning_rate = 1.0
    assert b.tags == [] and b.optim.learning_rate == 3e-4


def test_yaml_and_overrides_with_coercion(tmp_path):
    path = write(
        tmp_path,
        """
learning_rate: 1e-5        # YAML 1.1 reads this as the string "1e-5"
max_steps: 1e3             # a string too; an integral value is a fine int
beta: 1                    # int → float
use_cache: false
optim:
  betas: [0.8, 0.95]       # list → tuple; learning_rate keeps the parent's default 3e-4
peft:
  r: 4
data_path: data/prefs.jsonl
""",
    )
    cfg = load_config(
        ToyConfig,
        path,
        [
            "optim.warmup_steps=10",
            "peft.targets=[a,b]",
            "tags=[x, y]",
            "revision=null",
            "model=123",  # a str field takes the override's text, not the int YAML makes of it
            "loss=ipo",
            "weights={a: 2, b: 0.5}",
            "beta=2.5",  # later wins over the file
        ],
    )
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    assert cfg.beta == 2.5 and cfg.use_cache is False
    assert cfg.optim == OptimConfig(learning_rate=3e-4, betas=(0.8, 0.95), warmup_steps=10)
    assert cfg.peft == PeftConfig(r=4, targets=["a", "b"])
    assert cfg.tags == ["x", "y"] and cfg.revision is None and cfg.model == "123"
    assert cfg.loss == "ipo" and cfg.weights == {"a": 2.0, "b": 0.5}
    assert cfg.data_path == Path("data/prefs.jsonl")


def test_override_reaches_into_optional_nested_config():
    cfg = load_config(ToyConfig, None, ["peft.r=16"])
    assert cfg.peft == PeftConfig(r=16)
    assert load_config(ToyConfig, None, ["peft.r=16", "peft=null"]).peft is None


def test_override_yaml_retyping_is_undone_for_string_fields():
    cfg = load_config(ToyConfig, None, ["model=no", "revision=1.10", "mixed_precision=no"])
    assert cfg.model == "no" and cfg.revision == "1.10" and cfg.mixed_precision == "no"


def test_union_keeps_exact_type():
    assert load_config(ToyConfig, None, ["n_ctx=3"]).n_ctx == 3
    assert isinstance(load_config(ToyConfig, None, ["n_ctx=3"]).n_ctx, int)
    assert load_config(ToyConfig, None, ["n_ctx=2.5"]).n_ctx == 2.5


def test_empty_file_is_defaults(tmp_path):
    assert load_config(ToyConfig, write(tmp_path, "# nothing\n")) == ToyConfig()


# --------------------------------------------------------------------------------------------
# Errors: each names the key, where it came from, and what was expected
# --------------------------------------------------------------------------------------------


def test_unknown_key_in_file_suggests_close_match(tmp_path):
    path = write(tmp_path, "learnig_rate: 1e-5\n")
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, path)
    assert f"unknown key 'learnig_rate' in {path}; did you mean 'learning_rate'?" in str(err.value)


def test_unknown_nested_key_in_file(tmp_path):
    path = write(tmp_path, "optim:\n  warmup_step: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.warmup_step' in .*r\.yaml"):
        load_config(ToyConfig, path)
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.warmup_steps'"):
        load_config(ToyConfig, path)


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, write(tmp_path, "zzzz: 1\n"))
    assert "unknown key 'zzzz'" in str(err.value) and "valid keys: output_dir, seed" in str(
        err.value
    )


def test_unknown_key_in_override():
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, None, ["optim.learnig_rate=1e-5"])
    message = str(err.value)
    assert "unknown key 'optim.learnig_rate' in override 'optim.learnig_rate=1e-5'" in message
    assert "did you mean 'optim.learning_rate'?" in message


def test_bad_literal_lists_allowed_values(tmp_path):
    path = write(tmp_path, "loss: sigmod\n")
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, path)
    message = str(err.value)
    assert f"invalid value for 'loss' in {path}" in message
    assert "expected one of 'sigmoid', 'ipo', 'hinge', got str 'sigmod'" in message
    assert "did you mean 'sigmoid'?" in message


def test_yaml_boolean_for_a_literal_gets_a_quoting_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"got bool False .*quote it"):
        load_config(ToyConfig, write(tmp_path, "mixed_precision: no\n"))


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("max_steps: ten\n", "invalid value for 'max_steps' in {path}: expected an int, got str"),
        ("max_steps: 1.5\n", "expected an int, got float 1.5"),
        ("max_steps: true\n", "expected an int, got bool True"),
        ("beta: fast\n", "invalid value for 'beta' in {path}: expected a float, got str 'fast'"),
        ("use_cache: 1\n", "'use_cache' in {path}: expected a bool (true/false), got int 1"),
        ("model: [a]\n", "'model' in {path}: expected a string, got list"),
        ("tags: x\n", "'tags' in {path}: expected a list (list[str]), got str 'x'"),
        ("tags: [a, [b]]\n", "invalid value for 'tags[1]' in {path}: expected a string"),
        ("optim: {betas: [0.9]}\n", "'optim.betas' in {path}: expected a list of 2 items"),
        ("optim: 3\n", "'optim' in {path}: expected a mapping of OptimConfig fields, got int 3"),
        ("weights: {a: x}\n", "invalid value for \"weights['a']\" in {path}: expected a float"),
        ("peft: {r: x}\n", "invalid value for 'peft.r' in {path}: expected an int"),
        ("n_ctx: abc\n", "'n_ctx' in {path}: expected int | float, got str 'abc'"),
        ("output_dir: null\n", "'output_dir' in {path}: expected a string, got NoneType None"),
    ],
)
def test_bad_types(tmp_path, yaml_text, expected):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, path)
    assert expected.format(path=path) in str(err.value)


def test_bad_override_value_names_the_override():
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, None, ["beta=fast"])
    assert "invalid value for 'beta' in override 'beta=fast': expected a float" in str(err.value)
    with pytest.raises(ConfigError, match=r"invalid ToyConfig in overrides beta=2 beta_max=1"):
        load_config(ToyConfig, None, ["beta=2", "beta_max=1"])


def test_post_init_error_surfaces_with_file_name(tmp_path):
    path = write(tmp_path, "beta: 5\nbeta_max: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, path)
    assert f"invalid ToyConfig in {path}" in str(err.value)
    assert "beta (5.0) must be ≤ beta_max (1.0)" in str(err.value)
    expected = r"with overrides beta=0\.5 max_steps=0: max_steps must be ≥ 1"
    with pytest.raises(ConfigError, match=expected):
        load_config(ToyConfig, path, ["beta=0.5", "max_steps=0"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("beta", "invalid override 'beta': expected key=value"),
        ("=3", "invalid override '=3': expected key=value"),
        ("optim..x=1", "empty segment in key 'optim..x'"),
        ("beta.x=1", "cannot set 'beta.x' in override 'beta.x=1': 'beta' is a float"),
        ("weights.a=1", "'weights' is a dict[str, float], not a nested config"),
        ("tags=[a", "cannot parse override 'tags=[a' as YAML"),
    ],
)
def test_malformed_overrides(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, None, [override])
    assert expected in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*missing\.yaml' not found"):
        load_config(ToyConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"(?s)cannot parse config file .*bad\.yaml.*line 2"):
        load_config(ToyConfig, write(tmp_path, "beta: 1\n  - x: [\n", "bad.yaml"))
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping .* got list"):
        load_config(ToyConfig, write(tmp_path, "- 1\n- 2\n", "list.yaml"))


# --------------------------------------------------------------------------------------------
# Config classes
# --------------------------------------------------------------------------------------------


@dataclass
class NoHelp:
    x: int = 1


@dataclass
class NoDefault:
    x: int = dataclasses.field(metadata={"help": "x"})


@dataclass
class NestedNoHelp:
    inner: NoHelp = option(NoHelp(), help="inner")


def test_config_class_checks():
    with pytest.raises(ConfigError, match=r"NoHelp\.x has no help text; declare it with option"):
        check_config_class(NoHelp)
    with pytest.raises(ConfigError, match=r"NoDefault\.x has no default"):
        load_config(NoDefault)
    with pytest.raises(ConfigError, match=r"NoHelp\.x has no help text"):
        check_config_class(NestedNoHelp)
    with pytest.raises(ConfigError, match="must be a dataclass type"):
        check_config_class(dict)
    with pytest.raises(ConfigError, match="needs a non-empty help text"):
        option(1, help=" ")
    with pytest.raises(ConfigError, match="needs a default"):
        option(help="x")


def test_unresolvable_annotation_is_explained():
    class Local:
        pass

    @dataclass
    class Bad:
        x: Local | None = option(None, help="x")

    with pytest.raises(ConfigError, match="define config dataclasses .* at module level"):
        load_config(Bad)


def test_describe_lists_every_field_with_default_and_help():
    text = describe_config(ToyConfig)
    assert "  beta: float = 0.1\n      KL coefficient." in text
    assert "  loss: Literal['sigmoid', 'ipo', 'hinge'] = sigmoid" in text
    assert "  optim.learning_rate: float = 0.0003\n      AdamW learning rate." in text
    assert "  peft: PeftConfig | None = null" in text and "  peft.r: int = 8" in text
    assert "  output_dir: str = runs/default" in text  # RunConfig's fields too
    assert "  keep_last: int | None = 2" in text


# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        ToyConfig,
        None,
        [
            "peft.r=2",
            "tags=[a, 'no', '1']",
            "data_path=x/y.jsonl",
            "revision=main",
            "model=yes",
            "optim.betas=[0.5, 0.25]",
            "learning_rate=1e-7",
        ],
    )
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert path.read_text().startswith(f"# {__name__}.ToyConfig\n")
    again = load_config(ToyConfig, path)
    assert again == cfg
    assert math.isinf(again.beta_max) and isinstance(again.optim.betas, tuple)
    assert not list(path.parent.glob(".*.tmp"))
