"""`kernl serve`'s entry point (kernl/serving/cli.py) refusing what would fail inside Ray: a
port another process listens on is refused in a second, before Ray starts (it took Ray's
half-minute start and then a long traceback). No Ray is started here."""

import socket

import pytest

pytest.importorskip("ray", reason="kernl serve needs Ray Serve (kernl[serve])")

import ray  # noqa: E402

from kernl.serving.cli import build_parser, check_port_free, serve_main  # noqa: E402


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_port_in_use_is_refused_before_ray_starts(tiny_artifact, busy_port, no_ray, capsys):
    argv = [str(tiny_artifact), "--port", str(busy_port), "--ingress", "python"]
    assert serve_main(argv) == 2
    assert f"port {busy_port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_port_0_is_refused_before_ray_starts(tiny_artifact, no_ray, capsys):
    """Port 0 ("any free port") passed, then HAProxy refused to bind it after Ray's start
    (a traceback, exit 1), and the Python proxy printed :0 for the port it listened on."""
    for ingress in ("haproxy", "python"):
        assert serve_main([str(tiny_artifact), "--port", "0", "--ingress", ingress]) == 2
        assert "port must lie in [1, 65535], got 0" in capsys.readouterr().err


def test_port_check(busy_port):
    with pytest.raises(ValueError, match=f"port {busy_port} on 0.0.0.0 is in use"):
        check_port_free("0.0.0.0", busy_port)  # all addresses include 127.0.0.1
    with pytest.raises(ValueError, match="cannot resolve"):
        check_port_free("no-such-host.invalid", 8000)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    check_port_free("127.0.0.1", free)


def test_drain_option_is_documented_and_checked(tmp_path, capsys):
    assert "--drain-s" in build_parser().format_help()
    assert serve_main([str(tmp_path / "x.kernl"), "--drain-s", "nan"]) == 2
    assert "drain_s must be a finite number >= 0" in capsys.readouterr().err


def test_an_artifact_this_machine_cannot_load_is_refused_before_ray_starts(
    tiny_artifact, tmp_path, no_ray, capsys
):
    """An artifact of another torch major version: `kernl verify` said INCOMPATIBLE, but
    serve started Ray, every replica failed its load in Ray's logs, and the start ended 10 s
    later in a traceback that never named the reason."""
    import shutil

    import msgpack

    from kernl.artifacts import pack_manifest

    root = tmp_path / "old-torch.kernl"
    shutil.copytree(tiny_artifact, root)
    manifest = msgpack.unpackb((root / "manifest.msgpack").read_bytes(), strict_map_key=False)
    manifest["torch_version"] = "1.13.1+cu117"
    (root / "manifest.msgpack").write_bytes(pack_manifest(manifest))
    assert serve_main([str(root), "--device", "cpu", "--ingress", "python"]) == 2
    assert "1.13.1" in capsys.readouterr().err


def test_a_gpu_share_for_cpu_replicas_is_refused_before_ray_starts(tiny_artifact, no_ray, capsys):
    """--gpus-per-replica 1 with --device cpu (or no GPU): Ray waited for a GPU for good."""
    argv = [str(tiny_artifact), "--device", "cpu", "--gpus-per-replica", "1", "--ingress", "python"]
    assert serve_main(argv) == 2
    assert "--gpus-per-replica 1" in capsys.readouterr().err


def test_a_ray_address_nobody_answers_is_refused(tiny_artifact, no_ray, capsys):
    """--ray-address host:port with no cluster there: Ray retried for good."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    argv = [str(tiny_artifact), "--device", "cpu", "--ingress", "python"]
    assert serve_main([*argv, "--ray-address", f"127.0.0.1:{free}"]) == 2
    assert f"nothing answers at 127.0.0.1:{free}" in capsys.readouterr().err


def test_a_ray_that_cannot_start_or_be_reached_is_one_message(tiny_artifact, monkeypatch, capsys):
    """--ray-address auto with no cluster running: Ray's ConnectionError traceback."""

    def no_cluster(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(ray, "init", no_cluster)
    argv = [str(tiny_artifact), "--device", "cpu", "--ingress", "python", "--ray-address", "auto"]
    assert serve_main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot start or reach the Ray cluster at auto" in err and "Traceback" not in err


def test_a_ray_that_cannot_write_its_home_is_one_message(tiny_artifact, monkeypatch, capsys):
    """An arbitrary-UID container (docker run --user 12345) has no writable HOME: Ray's
    mkdir ~/.ray raised PermissionError through ray.init, a traceback (review 2026-12-07)."""

    def no_home(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/.ray")

    monkeypatch.setattr(ray, "init", no_home)
    assert serve_main([str(tiny_artifact), "--device", "cpu", "--ingress", "python"]) == 2
    err = capsys.readouterr().err
    assert "cannot start or reach a local Ray" in err and "point HOME at a writable" in err


def test_a_cluster_whose_serve_already_runs_is_refused(tiny_artifact, monkeypatch, capsys):
    """A second `kernl serve --ray-address auto` took over the first one's application (same
    name), served nothing on its own --port (Serve's HTTP options are set once), and its Ctrl-C
    shut Serve down for the whole cluster (review 2026-12-07)."""
    import types

    from ray import serve

    stopped = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append(True))
    status = types.SimpleNamespace(applications={"kernl": object()}, proxies={"node": object()})
    monkeypatch.setattr(serve, "status", lambda: status)

    def no_start(*args, **kwargs):
        raise AssertionError("Serve was started")

    monkeypatch.setattr(serve, "start", no_start)
    monkeypatch.setattr(serve, "run", no_start)
    argv = [str(tiny_artifact), "--device", "cpu", "--ingress", "python", "--ray-address", "auto"]
    assert serve_main(argv) == 2
    err = capsys.readouterr().err
    assert "Ray Serve already runs on the cluster at auto (application(s): kernl)" in err
    assert stopped  # this process's Ray connection only
    # without --ray-address, ray.init joins RAY_ADDRESS's cluster or `ray start`'s
    assert serve_main(argv[:-2]) == 2
    assert "on the cluster at this machine (RAY_ADDRESS" in capsys.readouterr().err
