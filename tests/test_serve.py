"""``edgemoe serve``: the official ``openai`` client against a server on a free
local port, batching against one-at-a-time, disconnects, bad requests, auth,
and the memory budget while 8 streams run."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

import edgemoe

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

PROMPTS = [
    "def fib(n):",
    "import os\n",
    "class Stack:",
    "for i in range(10):",
    "# read the file",
    "x = [",
    "while True:",
    "print(",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model, parallel=4, queue=64, api_key=None, max_body=1 << 20):
    """The app on a free port in a thread; yields (base URL, scheduler)."""
    from edgemoe.runtime.scheduler import Scheduler
    from edgemoe.serve.app import ServeOptions, create_app

    scheduler = Scheduler(model, parallel, queue)
    app = create_app(model, scheduler, ServeOptions("fixture", api_key, max_body))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", scheduler
    finally:
        server.should_exit = True
        thread.join(10)
        scheduler.close()


def client(base: str, key: str = "none"):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def post(base: str, path: str, body: bytes, headers: dict | None = None):
    """Raw HTTP (malformed bodies the client library would not send)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(
        "POST", path, body, {"Content-Type": "application/json", **(headers or {})}
    )
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


@pytest.fixture(scope="module")
def plain(fixture_dir):
    with edgemoe.load(fixture_dir, n_ctx=1024, n_threads=2) as m:
        yield m


# -- the openai client ---------------------------------------------------------
def test_openai_client_chat_completions_and_models(plain):
    with serving(plain) as (base, _):
        c = client(base)
        assert [m.id for m in c.models.list().data] == ["fixture"]
        msgs = [{"role": "user", "content": "Write a function."}]
        r = c.chat.completions.create(
            model="fixture", messages=msgs, max_tokens=12, temperature=0
        )
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
        want = "".join(
            x.text for x in plain.generate(msgs, max_tokens=12, temperature=0)
        )
        assert text == want
        stream = c.chat.completions.create(
           model="fixture", messages=msgs, max_tokens=12, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        streamed = "".join(
            ch.choices[0].delta.content or "" for ch in chunks if ch.choices
        )
        assert streamed == text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][
            -1
        ] == "length"
        assert chunks[-1].usage.completion_tokens == 12

        r = c.completions.create(
            model="fixture", prompt="def fib(n):", max_tokens=10, temperature=0
        )
        want = "".join(
            x.text for x in plain.generate("def fib(n):", max_tokens=10, temperature=0)
        )
        assert r.choices[0].text == want
        stream = c.completions.create(
           model="fixture", prompt="def fib(n):", max_tokens=10, temperature=0,
            stream=True,
        )  # fmt: skip
        assert "".join(ch.choices[0].text for ch in stream) == want


def test_stop_strings_and_seeded_sampling(plain):
    with serving(plain) as (base, _):
        c = client(base)
        full = c.completions.create(
            model="fixture", prompt="def f(x):", max_tokens=24, temperature=0
        )
        text = full.choices[0].text
        stop = text[5:8]
        cut = c.completions.create(
            model="fixture",
            prompt="def f(x):",
            max_tokens=24,
            temperature=0,
            stop=[stop],
        )
        assert cut.choices[0].text == text[: text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
        a, b = (
            c.completions.create(
                model="fixture", prompt="x =", max_tokens=16, temperature=1.0, seed=7
            )
            .choices[0]
            .text
            for _ in range(2)
        )
        assert a == b


# -- batching --------------------------------------------------------------------------
def greedy_stream(base, prompt, quality=None, n=24):
    extra = {"quality": quality} if quality else {}
    stream = client(base).completions.create(
        model="fixture", prompt=prompt, max_tokens=n, temperature=0, stream=True,
        extra_body={"ignore_eos": True, **extra},
    )  # fmt: skip
    return "".join(ch.choices[0].text for ch in stream)


def test_eight_concurrent_streams_equal_one_at_a_time(plain):
    with serving(plain, parallel=8) as (base, scheduler):
        alone = [greedy_stream(base, p) for p in PROMPTS]
        steps = scheduler.totals.steps
        with cf.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p: greedy_stream(base, p), PROMPTS))
        batched_steps = scheduler.totals.steps - steps
    assert together == alone
    # They did share steps: 8 x 24 tokens alone took 8 x 24 steps or more.
    assert batched_steps < len(PROMPTS) * 24 * 0.6, batched_steps


def test_mixed_qualities_batch_losslessly(converted_fixture):
    qualities = ["max", "balanced", "fast", "min", None, "high", "0.5,0.9", "max"]
    with edgemoe.load(converted_fixture, n_ctx=1024, n_threads=2) as m:
        with serving(m, parallel=8) as (base, _):
            alone = [greedy_stream(base, p, q) for p, q in zip(PROMPTS, qualities)]
            with cf.ThreadPoolExecutor(8) as pool:
                together = list(
                    pool.map(
                        lambda pq: greedy_stream(base, *pq), zip(PROMPTS, qualities)
                    )
                )
    assert together == alone
    assert len(set(alone)) > 1


# -- disconnects and limits -----------------------------------------------------
def test_a_client_that_leaves_frees_its_slot(plain):
    with serving(plain, parallel=1) as (base, scheduler):
        conn = open_stream(base, 900)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        t0 = time.perf_counter()
        done = client(base).completions.create(
            model="fixture", prompt="x", max_tokens=4, temperature=0
        )
        waited = time.perf_counter() - t0
        assert done.choices[0].finish_reason == "length"
        deadline = time.monotonic() + 10
        while scheduler.totals.requests.get("cancelled", 0) < 1:
            assert time.monotonic() < deadline, scheduler.totals
            time.sleep(0.05)
    # The newcomer did not wait for the 900 tokens of the one that left.
    assert scheduler.totals.generated_tokens < 900, scheduler.totals
    assert waited < 5, waited


def open_stream(base: str, max_tokens: int) -> http.client.HTTPConnection:
    """A streamed completion whose first event has arrived (it is running)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"prompt": "def main():", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        {"Content-Type": "application/json"},
    )
    conn.getresponse().fp.readline()
    return conn


def test_a_full_queue_answers_503_with_retry_after(plain):
    with serving(plain, parallel=1, queue=0) as (base, _):
        first = open_stream(base, 900)
        status, headers, data = post(base, "/v1/completions", b'{"prompt": "x"}')
        first.close()
    assert status == 503 and headers.get("retry-after") == "1"
    assert json.loads(data)["error"]["type"] == "server_error"


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "stop": 3}).encode(), 400, "stop"),
    (json.dumps({"prompt": "x", "max_tokens": 100000}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x " * 600}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": [1, 10**9]}).encode(), 400, None),
    (json.dumps({"prompt": "x", "quality": "best"}).encode(), 400, "quality"),
    (json.dumps({"prompt": "x", "n": 3}).encode(), 400, "n"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(
    converted_fixture, body, status, param
):
    with edgemoe.load(converted_fixture, n_ctx=1024, n_threads=1) as m:
        with serving(m) as (base, _):
            got, _, data = post(base, "/v1/completions", body)
            assert got == status, data
            err = json.loads(data)["error"]
            assert err["type"] == "invalid_request_error" and err["message"]
            assert err["param"] == param, err
            assert "Traceback" not in err["message"]
            ok = client(base).completions.create(
                model="fixture", prompt="x", max_tokens=2
            )
            assert ok.choices[0].finish_reason in ("length", "stop")


def test_api_key_and_body_limit(plain):
    with serving(plain, api_key="s3cret", max_body=4096) as (base, _):
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            status, _, data = post(base, "/v1/completions", b'{"prompt": "x"}', headers)
            assert (
                status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
            )
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200  # no key needed
        conn.close()
        big = json.dumps({"prompt": "x" * 5000}).encode()
        status, _, data = post(
            base, "/v1/completions", big, {"Authorization": "Bearer s3cret"}
        )
        assert status == 413 and "4096" in json.loads(data)["error"]["message"]
        r = client(base, "s3cret").completions.create(
            model="fixture", prompt="x", max_tokens=2
        )
        assert r.usage.completion_tokens >= 1


def test_metrics(plain):
    with serving(plain) as (base, _):
        client(base).completions.create(
            model="fixture", prompt="x", max_tokens=3, temperature=0
        )
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")
    )
    assert float(lines['edgemoe_requests_total{finish="length"}']) == 1
    assert float(lines["edgemoe_generated_tokens_total"]) == 3
    assert "edgemoe_requests_queued" in lines and "edgemoe_rss_bytes" in lines


def test_the_budget_holds_while_eight_streams_run(converted_fixture):
    """RSS growth from before loading to the peak while 8 streams run stays
    within the budget + 10%."""
    import gc

    from edgemoe.runtime.metrics import rss_bytes

    with edgemoe.load(converted_fixture, n_ctx=1024, n_threads=1) as m:
        plan = m.memory
    per_expert = plan.experts // (plan.slots[0] + 1)
    budget = plan.backbone + plan.kv_cache + plan.scratch + per_expert * 9
    gc.collect()
    rss0 = rss_bytes()
    peak = rss0
    stop = threading.Event()

    def watch():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with edgemoe.load(
            converted_fixture, n_ctx=1024, n_threads=2, budget=budget
        ) as m:
            with serving(m, parallel=8) as (base, scheduler):
                with cf.ThreadPoolExecutor(8) as pool:
                    outs = list(
                        pool.map(lambda p: greedy_stream(base, p, n=32), PROMPTS)
                    )
                hits = scheduler.totals.counters
    finally:
        stop.set()
        watcher.join()
    assert all(outs)
    assert sum(hits["misses"]) > 0  # experts did stream
    assert peak - rss0 <= budget * 1.1, (peak - rss0, budget)


def test_a_shared_context_holds_more_than_one_sequence_s_positions(fixture_dir):
    """n_seq_max lets the cells exceed the training context (the server's
    slots), while one sequence's positions still stop at it."""
    from edgemoe.errors import ConfigError, ContextOverflowError

    train = 1024  # the fixture's
    with pytest.raises(ConfigError, match="x 2 sequences"):
        edgemoe.load(fixture_dir, n_ctx=3 * train, n_seq_max=2)
    for bad in (0, 257, "2", True):
        with pytest.raises(ConfigError, match="n_seq_max"):
            edgemoe.load(fixture_dir, n_seq_max=bad)
    with edgemoe.load(fixture_dir, n_ctx=2 * train, n_seq_max=2, n_threads=1) as m:
        assert (m.n_ctx, m.n_pos) == (2 * train, train)
        a, b = m.new_sequence(), m.new_sequence()
        m.decode([(a, [5] * 1000), (b, [6] * 1000)])  # 2000 cells in use
        with pytest.raises(ContextOverflowError):
            m.decode([(a, [5] * 30)])  # position 1030 of a 1024-token model


def test_a_failing_step_costs_its_requests_not_the_server(plain, monkeypatch):
    real, calls = plain.decode, []

    def decode(batch, qualities=None):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom at /secret/path")
        return real(batch, qualities)

    monkeypatch.setattr(plain, "decode", decode)
    with serving(plain) as (base, _):
        with pytest.raises(openai.InternalServerError) as info:
            client(base).completions.create(model="fixture", prompt="x", max_tokens=3)
        assert "internal error" in str(info.value) and "secret" not in str(info.value)
        ok = client(base).completions.create(model="fixture", prompt="x", max_tokens=3)
        assert ok.usage.completion_tokens == 3


def test_the_command_serves_then_stops_on_ctrl_c_and_names_a_busy_port(
    fixture_dir, tmp_path
):
    """``edgemoe serve`` as a user runs it: the steps on the main thread, HTTP
    beside them; Ctrl+C exits 130; a port in use is one error line."""
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-m", "edgemoe", "serve", str(fixture_dir), "--port",
           str(port), "-t", "1", "-np", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
                    assert json.load(r) == {"status": "ok"}
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline
                time.sleep(0.1)
        r = client(f"http://127.0.0.1:{port}").completions.create(
            model="x", prompt="def", max_tokens=3
        )
        assert r.usage.completion_tokens == 3
        busy = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert busy.returncode == 1
        assert f"could not listen on 127.0.0.1:{port}" in busy.stderr
        assert "Traceback" not in busy.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_a_conversation_resent_reuses_its_cached_prefix(plain):
    """A chat's next turn resends the conversation: the server keeps the
    finished request's sequence and evaluates only what is new, with the
    tokens a fresh evaluation gives."""
    first = [{"role": "user", "content": "Write a function."}]
    with serving(plain, parallel=2) as (base, scheduler):
        c = client(base)
        r1 = c.chat.completions.create(
            model="fixture", messages=first, max_tokens=10, temperature=0
        )
        reply = r1.choices[0].message.content
        second = [*first, {"role": "assistant", "content": reply},
                  {"role": "user", "content": "Now test it."}]  # fmt: skip
        evaluated = scheduler.totals.prompt_tokens
        r2 = c.chat.completions.create(
            model="fixture", messages=second, max_tokens=10, temperature=0
        )
        cached = r2.usage.prompt_tokens_details.cached_tokens
        assert cached >= r1.usage.prompt_tokens  # the whole first prompt at least
        assert scheduler.totals.prompt_tokens - evaluated == (
            r2.usage.prompt_tokens - cached
        )
    plain.reset()
    fresh = "".join(
        x.text for x in plain.generate(second, max_tokens=10, temperature=0)
    )
    assert r2.choices[0].message.content == fresh


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["-np", "0"], "--parallel must be in 1..256, got 0"),
        (["--port", "70000"], "--port must be in 0..65535, got 70000"),
        (["--queue", "-1"], "--queue must be >= 0"),
    ],
)
def test_bad_serve_flags_are_one_line_before_loading(capsys, flags, needle):
    from edgemoe.cli import main

    assert main(["serve", "no/such/model", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
