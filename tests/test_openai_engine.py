"""OpenAIChatEngine against faults a real vLLM server cannot be made to produce on demand.

The real-server tests live in tests/test_describe.py (a vLLM CPU server). Rate limits with ``Retry-After``, a 5xx
that heals, a 400, a 200 whose body is not a chat completion and a server that never answers need a stand-in:
:class:`FakeChatServer` below is a FAKE, for fault injection only. It speaks just enough HTTP to answer
``POST /v1/chat/completions`` with scripted replies and records every attempt it sees; nothing about model
behaviour is tested against it. What is under test is the engine's contract on top of the ``openai`` client:
which faults are retried and how often, and that every failure comes back as ``Completion.error`` naming the
cause and the endpoint instead of an exception.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grain.annotate.engines import OpenAIChatEngine
from grain.config import DescribeConfig


@dataclass
class Reply:
    """One scripted answer of the fake: status, body, extra headers, and an optional delay before answering."""

    status: int = 200
    body: str | None = None  # None: a valid chat completion echoing the last user text
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    content_type: str = "application/json"


def chat_completion(text: str) -> str:
    return json.dumps({
        "id": "fake", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    })


class FakeChatServer:
    """FAKE OpenAI-compatible endpoint for fault injection only (stdlib ``http.server`` on 127.0.0.1, in a thread).

    ``script(n)`` gives the :class:`Reply` to the n-th request (0-based, counted over all requests). Every request
    is recorded in ``requests`` (parsed JSON body, headers with lower-case names); ``max_in_flight`` is the most requests it held at
    once. ``close()`` releases handlers still delaying, so a "never answers" fake does not hang the test run.
    """

    def __init__(self, script: Callable[[int], Reply]):
        self.script = script
        self.requests: list[dict] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                with fake._lock:
                    n = len(fake.requests)
                    fake.requests.append({"path": self.path, "body": body, "headers": {k.lower(): v for k, v in self.headers.items()}})
                    fake._in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake._in_flight)
                try:
                    reply = fake.script(n)
                    if reply.delay_s and fake._closing.wait(reply.delay_s):
                        return  # shutting down: drop the connection unanswered
                    if reply.body is None:
                        content = body["messages"][-1]["content"]
                        text = content if isinstance(content, str) else content[-1]["text"]
                        payload = chat_completion(f"echo: {text}").encode()
                    else:
                        payload = reply.body.encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): fine
                    pass
                finally:
                    with fake._lock:
                        fake._in_flight -= 1

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def attempts(self) -> int:
        return len(self.requests)

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[int], Reply]], FakeChatServer]]:
    servers: list[FakeChatServer] = []

    def start(script: Callable[[int], Reply]) -> FakeChatServer:
        servers.append(FakeChatServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def engine_for(base_url: str, **openai_kw) -> OpenAIChatEngine:
    openai = {"base_url": base_url, "concurrency": 2, "timeout_s": 10, "max_retries": 2, **openai_kw}
    return OpenAIChatEngine(DescribeConfig(engine="openai", model="fake-model", openai=openai))


def ask(engine: OpenAIChatEngine, *texts: str):
    try:
        return engine.chat([[{"role": "user", "content": t}] for t in texts], max_tokens=8, temperature=0.0)
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------------ success


def test_replies_come_back_in_order_with_usage_and_bounded_concurrency(fake, monkeypatch):
    monkeypatch.setenv("GRAIN_TEST_KEY", "sk-test")
    server = fake(lambda n: Reply(delay_s=0.15))
    texts = [f"q{i}" for i in range(6)]
    out = ask(engine_for(server.base_url, concurrency=2, api_key_env="GRAIN_TEST_KEY"), *texts)
    assert [c.text for c in out] == [f"echo: {t}" for t in texts]
    assert all(c.error is None and c.prompt_tokens == 7 and c.completion_tokens == 3 for c in out)
    assert server.attempts == 6 and server.max_in_flight == 2
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "fake-model" and req["body"]["max_tokens"] == 8 and req["body"]["temperature"] == 0.0
    assert req["headers"]["authorization"] == "Bearer sk-test"


def test_an_unset_key_variable_sends_a_placeholder(fake, monkeypatch):
    monkeypatch.delenv("GRAIN_TEST_KEY", raising=False)
    server = fake(lambda n: Reply())
    [c] = ask(engine_for(server.base_url, api_key_env="GRAIN_TEST_KEY"), "hi")
    assert c.text == "echo: hi" and server.requests[0]["headers"]["authorization"] == "Bearer EMPTY"


# ------------------------------------------------------------------------------------------------ retried faults


def test_429_waits_for_retry_after_then_succeeds(fake):
    server = fake(lambda n: Reply(429, '{"error": "slow down"}', {"Retry-After": "1"}) if n == 0 else Reply())
    t0 = time.perf_counter()
    [c] = ask(engine_for(server.base_url), "hi")
    assert c.error is None and c.text == "echo: hi" and server.attempts == 2
    # the client's own backoff for a first retry is under 0.5 s: waiting ~1 s means Retry-After was honoured
    assert time.perf_counter() - t0 >= 0.95


def test_500_then_success_is_retried(fake):
    server = fake(lambda n: Reply(500, '{"error": "boom"}') if n == 0 else Reply())
    [c] = ask(engine_for(server.base_url), "hi")
    assert c.error is None and c.text == "echo: hi" and server.attempts == 2
    assert [r["headers"]["x-stainless-retry-count"] for r in server.requests] == ["0", "1"]


def test_exhausted_retries_name_the_status_and_the_attempts(fake):
    server = fake(lambda n: Reply(503, '{"error": "overloaded"}'))
    [c] = ask(engine_for(server.base_url, max_retries=2), "hi")
    assert c.text is None and server.attempts == 3
    assert c.error.startswith(f"HTTP 503 from {server.base_url}") and "overloaded" in c.error
    assert c.error.endswith("(gave up after 3 attempts)")


# ------------------------------------------------------------------------------------------------ not retried


def test_400_is_not_retried_and_keeps_the_body(fake):
    server = fake(lambda n: Reply(400, '{"error": "max_tokens is too large"}'))
    [c] = ask(engine_for(server.base_url, max_retries=3), "hi")
    assert server.attempts == 1
    assert c.text is None and c.error.startswith(f"HTTP 400 from {server.base_url}: ")
    assert "max_tokens is too large" in c.error and "gave up" not in c.error


@pytest.mark.parametrize("body, content_type", [
    ('{"object": "list", "data": []}', "application/json"),  # JSON, but not a chat completion
    ('{"choices": []}', "application/json"),  # no choice at all
    ("<html>proxy error page</html>", "text/html"),  # not JSON
    ("{not json", "application/json"),  # claims JSON, is not
])
def test_a_200_that_is_not_a_chat_completion_is_an_error(fake, body, content_type):
    server = fake(lambda n: Reply(200, body, content_type=content_type))
    [c] = ask(engine_for(server.base_url), "hi")
    assert server.attempts == 1
    assert c.text is None and c.error.startswith(f"malformed response from {server.base_url}: ")
    assert body[:20] in c.error


def test_a_server_that_never_answers_times_out(fake):
    server = fake(lambda n: Reply(delay_s=60))
    t0 = time.perf_counter()
    [c] = ask(engine_for(server.base_url, timeout_s=0.5, max_retries=1), "hi")
    assert time.perf_counter() - t0 < 10
    assert c.text is None and c.error.startswith(f"timeout after 0.5s at {server.base_url}")
    assert c.error.endswith("(gave up after 2 attempts)") and server.attempts == 2


def test_an_unreachable_server_names_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    [c] = ask(engine_for(url, max_retries=0), "hi")
    assert c.text is None and c.error.startswith(f"cannot reach {url}: ") and "gave up after 1 attempt" in c.error
