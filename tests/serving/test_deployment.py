"""The Ray Serve application builder (`serve run kernl.serving.deployment:build ...`): typed
arguments, unknown ones refused, batch size defaulting to the largest bucket batch."""

import pytest

from kernl.serving.config import ServeConfig
from kernl.serving.deployment import build


def test_builder_types_arguments_and_defaults_batch_size(tiny_artifact):
    app = build({"artifact": str(tiny_artifact), "replicas": "2", "batch_wait_ms": "3.5",
                 "device": "cpu"})  # fmt: skip
    deployment = app._bound_deployment
    config = app._bound_deployment.init_args[0]
    assert deployment.num_replicas == 2
    assert config.batch_wait_ms == 3.5 and config.max_batch_size == 8
    assert deployment.ray_actor_options["num_gpus"] == 0
    assert deployment.max_ongoing_requests == 16


def test_builder_refuses_unknown_arguments(tiny_artifact):
    with pytest.raises(ValueError, match="unknown argument"):
        build({"artifact": str(tiny_artifact), "replica": "2"})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"replicas": 0},
        {"max_batch_size": 0},
        {"batch_wait_ms": -1},
        {"device": "tpu"},
        {"plan_by": "guess"},
    ],  # fmt: skip
)
def test_config_refuses_bad_values(kwargs):
    with pytest.raises(ValueError):
        ServeConfig(artifact="x", **kwargs)
