"""`kernl serve`'s settings refused before Ray starts: ServeConfig, the batchers' own
policies, and the CLI's exit status 2 with the reason. No Ray, no model."""

import math

import pytest

from kernl.serving.cli import serve_main
from kernl.serving.config import ServeConfig, config_from_args
from kernl.serving.gather import BatchGatherer
from kernl.serving.generation_batcher import BatchPolicy

NOT_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", [*NOT_FINITE, -1.0])
@pytest.mark.parametrize("field", ["batch_wait_ms", "gpus_per_replica", "cpus_per_replica"])
def test_config_refuses_numbers_that_are_not_finite_or_negative(field, value):
    # NaN passed `< 0`: every generation request then waited for a deadline that never came;
    # a negative or NaN GPU share crashed inside Ray half a minute later.
    with pytest.raises(ValueError, match=f"{field} must be a finite number >= 0"):
        ServeConfig(artifact="x", **{field: value})


def test_config_takes_finite_values():
    config = ServeConfig(artifact="x", batch_wait_ms=0.0, gpus_per_replica=0.5)
    assert config.wait_s(generation=True) == 0.0 and config.gpus_per_replica == 0.5


@pytest.mark.parametrize("window_s", NOT_FINITE)
def test_generation_batch_policy_refuses_a_window_that_is_not_finite(window_s):
    with pytest.raises(ValueError, match="window_s must be a finite number"):
        BatchPolicy(4, window_s)


@pytest.mark.parametrize("wait_s", NOT_FINITE)
def test_encoder_gatherer_refuses_a_wait_that_is_not_finite(wait_s):
    with pytest.raises(ValueError, match="wait_s must be a finite number"):
        BatchGatherer(lambda items: items, None, 4, wait_s=wait_s)


@pytest.mark.parametrize(
    "option, value, field",
    [
        ("--batch-wait-ms", "nan", "batch_wait_ms"),
        ("--batch-wait-ms", "inf", "batch_wait_ms"),
        ("--gpus-per-replica", "-1", "gpus_per_replica"),
        ("--gpus-per-replica", "nan", "gpus_per_replica"),
    ],
)
def test_cli_refuses_them_with_exit_2_before_ray(tmp_path, capsys, option, value, field):
    # the artifact is checked after the settings: a missing one would exit 2 too, for
    # another reason, so the message is what tells
    assert serve_main([str(tmp_path / "none.kernl"), option, value]) == 2
    assert f"{field} must be a finite number >= 0" in capsys.readouterr().err


def test_builder_arguments_are_parsed_as_their_field_types():
    """`serve run kernl.serving.deployment:build join=false port=8001`: strings (the string
    "false" was true, and port stayed a string, a TypeError later)."""
    config = config_from_args(
        {
            "artifact": "a.kernl",
            "join": "false",
            "port": "8001",
            "replicas": "2",
            "batch_wait_ms": "2.5",
            "max_batch_size": "4",
            "device": "cpu",
        }
    )
    assert config.join is False and config.port == 8001 and config.replicas == 2
    assert config.batch_wait_ms == 2.5 and config.max_batch_size == 4 and config.device == "cpu"
    for text, value in [("true", True), ("TRUE", True), ("1", True), ("0", False)]:
        assert config_from_args({"artifact": "a", "join": text}).join is value
    # a Serve config file's YAML values
    config = config_from_args({"artifact": "a", "join": False, "port": 8001, "batch_wait_ms": 3})
    assert config.join is False and config.port == 8001 and config.batch_wait_ms == 3.0


@pytest.mark.parametrize(
    "args, message",
    [
        ({"join": "no"}, "join='no': expected true or false"),
        ({"join": "yes"}, "join='yes': expected true or false"),
        ({"join": 2}, "join=2: expected true or false"),
        ({"port": "80x"}, "port='80x': expected an integer"),
        ({"replicas": "1.5"}, "replicas='1.5': expected an integer"),
        ({"replicas": 2.0}, "replicas=2.0: expected an integer"),
        ({"batch_wait_ms": "soon"}, "batch_wait_ms='soon': expected a number"),
        ({"batch_wait_ms": "nan"}, "batch_wait_ms must be a finite number"),
        ({"replica": "2"}, r"unknown argument\(s\) \['replica'\]"),
    ],
)
def test_builder_refuses_bad_arguments_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        config_from_args({"artifact": "a.kernl", **args})


def test_builder_needs_an_artifact():
    with pytest.raises(ValueError, match="missing argument artifact=PATH"):
        config_from_args({"replicas": "2"})


def test_an_explicit_null_is_the_default_of_a_field_that_defaults_to_none():
    """A Serve config file's `max_batch_size: null` or `device: null` (YAML null: None) was
    refused ("expected an integer"), although None is those fields' default."""
    optional = [
        "max_batch_size",
        "batch_wait_ms",
        "device",
        "gpus_per_replica",
        "plan_by",
        "replay_cost_tokens",
    ]
    config = config_from_args({"artifact": "a.kernl", **dict.fromkeys(optional)})
    assert config == ServeConfig(artifact="a.kernl")


@pytest.mark.parametrize(
    "name, message",
    [
        ("replicas", "replicas=None: expected an integer"),
        ("join", "join=None: expected true or false"),
        ("drain_s", "drain_s=None: expected a number"),
        ("artifact", "artifact=None: expected a string"),
    ],
)
def test_a_null_for_a_field_with_another_default_is_still_refused(name, message):
    with pytest.raises(ValueError, match=message):
        config_from_args({"artifact": "a.kernl", name: None})


def test_usage_names_the_command_as_typed(capsys):
    for prog in ("kernl serve", "python -m kernl.serving"):
        with pytest.raises(SystemExit) as done:
            serve_main(["--help"], prog=prog)
        assert done.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: {prog} ")
