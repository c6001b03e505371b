"""The load generator (kernl.serving.loadgen) against a stand-in HTTP server: failures are
counted apart from the answered requests, and a client that fails early stops the run at once
instead of leaving the others at the start line for 10 minutes. No Ray, no model."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kernl.serving.loadgen import LoadError, main, run_load

DEADLINE_S = 30  # the run must end well before this (it hung for 600 s)


class _Answers(BaseHTTPRequestHandler):
    """Answers 200 `answer`, except every `fail_every`-th request: 422."""

    answer = {"generated_ids": [1, 2]}
    fail_every = 0
    fail_after = 0  # > 0: every request after this many fails
    count = 0
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            type(self).last_body = body
            type(self).count += 1
            fail = (self.fail_every and self.count % self.fail_every == 0) or (
                self.fail_after and self.count > self.fail_after
            )
        body = json.dumps({"error": "no"} if fail else self.answer).encode()
        self.send_response(422 if fail else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("Answers", (_Answers,), {"count": 0, "fail_every": 0})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def url_of(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}/"


def finishing(fn, *args, **kwargs):
    """fn's result or exception, failing the test (not hanging it) past DEADLINE_S."""
    outcome = {}

    def run():
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), f"still running after {DEADLINE_S} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_failed_requests_are_counted_apart(server):
    server.RequestHandlerClass.fail_every = 2  # every other request: 422
    result = finishing(run_load, url_of(server), 1, 6, 4, warmup=0, max_new_tokens=2)
    assert result.requests == 6 and result.errors == 3, result
    assert result.first_error.startswith("HTTP 422"), result
    # rates count the 3 answered requests, not the 3 refused
    assert result.sequences_per_s == pytest.approx(3 / result.seconds)
    assert result.tokens_per_s == pytest.approx(3 * 2 / result.seconds)


def test_a_run_whose_timed_requests_all_failed_prints_json(server, capsys):
    """Its percentiles were NaN, printed as `NaN`, which is no JSON (jq refuses the line)."""
    server.RequestHandlerClass.fail_after = 2  # the two warm-ups are answered, then 422s
    assert finishing(main, [url_of(server), "--requests", "3", "--seq", "4"]) == 1
    out = capsys.readouterr().out
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is no JSON: {out}"))
    assert (result["errors"], result["p50_ms"], result["p99_ms"]) == (3, None, None)


def test_an_unreachable_server_ends_the_run_at_once():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LoadError, match="failed before the timed requests"):
        finishing(run_load, f"http://127.0.0.1:{port}/", 3, 2, 4, timeout=5)


def test_a_refused_warm_up_ends_the_run_at_once(server):
    server.RequestHandlerClass.fail_every = 1
    with pytest.raises(LoadError, match="HTTP 422"):
        finishing(run_load, url_of(server), 4, 2, 4)


@pytest.mark.parametrize("vocab", [5, 1, 0])
def test_a_vocab_of_5_or_less_is_refused(server, vocab, capsys):
    with pytest.raises(ValueError, match="vocab must be above 5"):
        finishing(run_load, url_of(server), 2, 2, 4, vocab=vocab)
    with pytest.raises(SystemExit) as exit:
        finishing(main, [url_of(server), "--vocab", str(vocab)])
    assert exit.value.code == 2 and "vocab must be above 5" in capsys.readouterr().err


def test_main_exits_2_when_the_server_is_unreachable(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert finishing(main, [f"http://127.0.0.1:{port}/", "--clients", "2"]) == 2
    assert "failed before the timed requests" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url, message",
    [
        ("localhost:8000", "expected an http:// URL with a host"),  # no scheme
        ("127.0.0.1:8000", "expected an http:// URL with a host"),
        ("http:///predict", "expected an http:// URL with a host"),
        ("ftp://127.0.0.1/", "expected an http:// URL with a host"),
        ("http://127.0.0.1:99999/", r"the port must be an integer in \[1, 65535\]"),
        ("http://127.0.0.1:80x/", r"the port must be an integer in \[1, 65535\]"),
        ("http://127.0.0.1:0/", r"the port must be an integer in \[1, 65535\]"),
        ("https://127.0.0.1:8443/", "https is not supported"),
    ],
)
def test_a_url_that_cannot_be_used_is_a_usage_error(url, message, capsys):
    """A URL without a scheme, or with a bad port, failed inside each client thread before
    it could release the others: the run waited at its start line forever."""
    with pytest.raises(ValueError, match=message):
        finishing(run_load, url, 2, 1, 4)
    with pytest.raises(SystemExit) as exit:
        finishing(main, [url, "--requests", "1"])
    assert exit.value.code == 2 and "http" in capsys.readouterr().err


def test_a_url_keeps_its_path_and_query():
    from kernl.serving.loadgen import parse_url

    assert parse_url("http://h:81/predict?x=1") == ("h", 81, "/predict?x=1")
    assert parse_url("http://h") == ("h", 80, "/")


def test_a_client_that_fails_unexpectedly_before_the_start_releases_the_others(server, monkeypatch):
    """Anything a client raises before the start line (here, making its connection) stops
    the run, rather than leaving the other clients and the caller waiting there."""
    import http.client

    real = http.client.HTTPConnection
    made = []

    def connection(*args, **kwargs):
        made.append(1)
        if len(made) == 2:
            raise TypeError("no connection for you")
        return real(*args, **kwargs)

    monkeypatch.setattr(http.client, "HTTPConnection", connection)
    with pytest.raises(LoadError, match="TypeError: no connection for you"):
        finishing(run_load, url_of(server), 3, 2, 4, warmup=0)


def test_an_answer_without_generated_ids_counts_as_an_error(server):
    """A 200 without `generated_ids` (not a generation server) killed the client thread: its
    requests vanished from the result (0 requests, 0 errors)."""
    server.RequestHandlerClass.answer = {"last_hidden_state": [[0.0]]}
    result = finishing(run_load, url_of(server), 2, 3, 4, warmup=0, max_new_tokens=2)
    assert result.requests == 6 and result.errors == 6, result
    assert result.first_error == "KeyError: 'generated_ids'", result
    assert result.tokens_per_s == 0


def test_ctrl_c_stops_the_run_at_once():
    """The clients are daemon threads: Ctrl-C ended the process only once every request in
    flight had answered or timed out (120 s by default)."""
    import signal
    import subprocess
    import sys
    import time

    with socket.socket() as listener:  # accepts, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        run = subprocess.Popen(
            [sys.executable, "-m", "kernl.serving.loadgen", url, "--timeout", "60"],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            listener.settimeout(DEADLINE_S)
            conn, _ = listener.accept()  # the client's warm-up request is in flight
            with conn:
                run.send_signal(signal.SIGINT)
                start = time.monotonic()
                rc = run.wait(DEADLINE_S)
                took = time.monotonic() - start
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert took < 5, took
    assert rc == 130 and "interrupted" in run.stderr.read()


def test_an_encoders_requests_carry_an_attention_mask(server):
    """An artifact that requires attention_mask (DPR's encoders) refused every request of the
    load generator; a generation request takes none (an unknown field there)."""
    run_load(url_of(server), clients=1, requests_per_client=1, seq=6, vocab=50, warmup=0)
    assert server.RequestHandlerClass.last_body["attention_mask"] == [1] * 6
    run_load(
        url_of(server),
        clients=1,
        requests_per_client=1,
        seq=6,
        vocab=50,
        warmup=0,
        max_new_tokens=3,
    )
    assert "attention_mask" not in server.RequestHandlerClass.last_body
