"""OpenAIBackend against a real local HTTP server scripted per test."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest

from stages.backends.base import BackendError, GenRequest
from stages.backends.factory import make_backend
from stages.backends.openai_http import OpenAIBackend, encode_jpeg_b64


def ok_reply(text: str, prompt_tokens: int = 7, completion_tokens: int = 3) -> tuple[int, dict, bytes]:
    body = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def error_reply(status: int, message: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
    return status, {"Content-Type": "application/json", **(headers or {})}, body


class FakeServer:
    """Records every request; `script(n, body)` answers the n-th (0-based) one."""

    def __init__(self):
        self.script = lambda n, body: ok_reply("hello")
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with fake.lock:
                    n = len(fake.requests)
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    status, headers, payload = fake.script(n, body)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeServer()
    yield fake
    fake.close()


def make_cfg(url: str, **overrides):
    cfg = dict(
        kind="openai",
        model="test-model",
        base_url=url,
        api_key_env=None,
        max_concurrency=4,
        timeout_s=5.0,
        max_retries=3,
        backoff_s=0.01,
        extra_body={},
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_success_sends_openai_body_and_records_usage(server):
    backend = make_backend(make_cfg(server.url, extra_body={"top_k": 20}))
    assert isinstance(backend, OpenAIBackend)
    [result] = backend.generate([GenRequest("k1", user("hi"), max_tokens=64, temperature=0.5, top_p=0.9, seed=3)])

    assert (result.key, result.text, result.error, result.attempts) == ("k1", "hello", None, 1)
    assert result.usage == {"prompt_tokens": 7, "completion_tokens": 3}
    assert result.latency_s > 0
    [seen] = server.requests
    assert seen["path"] == "/v1/chat/completions"
    assert seen["body"] == {
        "model": "test-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 3,
        "top_k": 20,
    }
    assert "Authorization" not in seen["headers"]


def test_results_keep_request_order(server):
    server.script = lambda n, body: ok_reply(body["messages"][0]["content"].upper())
    backend = make_backend(make_cfg(server.url, max_concurrency=3))
    results = backend.generate([GenRequest(f"k{i}", user(f"item{i}")) for i in range(7)])
    assert [r.key for r in results] == [f"k{i}" for i in range(7)]
    assert [r.text for r in results] == [f"ITEM{i}" for i in range(7)]


def test_429_twice_then_success_honours_retry_after(server):
    def script(n, body):
        if n < 2:
            return error_reply(429, "slow down", {"Retry-After": "0.2"})
        return ok_reply("finally")

    server.script = script
    backend = make_backend(make_cfg(server.url, backoff_s=0.001))
    start = time.monotonic()
    [result] = backend.generate([GenRequest("k", user("hi"))])
    elapsed = time.monotonic() - start

    assert (result.text, result.error, result.attempts) == ("finally", None, 3)
    assert len(server.requests) == 3
    # Two waits of the server's 0.2 s; the 0.001 s backoff alone would take ~0.003 s.
    assert elapsed >= 0.4


def test_500_then_success(server):
    server.script = lambda n, body: error_reply(500, "boom") if n == 0 else ok_reply("recovered")
    [result] = make_backend(make_cfg(server.url)).generate([GenRequest("k", user("hi"))])
    assert (result.text, result.error, result.attempts) == ("recovered", None, 2)


def test_5xx_exhausts_retries(server):
    server.script = lambda n, body: error_reply(503, "overloaded")
    [result] = make_backend(make_cfg(server.url, max_retries=2)).generate([GenRequest("k", user("hi"))])
    assert result.text is None
    assert result.attempts == 3
    assert result.error == "HTTP 503: overloaded (after 3 attempts)"
    assert len(server.requests) == 3


def test_400_fails_at_once_with_server_message(server):
    long_message = "bad request: " + "x" * 500
    server.script = lambda n, body: error_reply(400, long_message)
    [result] = make_backend(make_cfg(server.url)).generate([GenRequest("k", user("hi"))])
    assert result.text is None
    assert result.attempts == 1
    assert len(server.requests) == 1
    assert result.error.startswith("HTTP 400: bad request: xxx")
    assert len(result.error) <= len("HTTP 400: ") + 200
    assert "\n" not in result.error


def test_timeout_is_retried_then_reported(server):
    def script(n, body):
        time.sleep(0.5)
        return ok_reply("too late")

    server.script = script
    backend = make_backend(make_cfg(server.url, timeout_s=0.1, max_retries=1))
    start = time.monotonic()
    [result] = backend.generate([GenRequest("k", user("hi"))])
    assert result.text is None
    assert result.attempts == 2
    assert result.error == "timeout after 0.1s (after 2 attempts)"
    assert time.monotonic() - start < 0.5 * 2
    assert len(server.requests) == 2


def test_connection_refused_is_a_connection_error(server):
    url = server.url
    server.close()
    [result] = make_backend(make_cfg(url, max_retries=1)).generate([GenRequest("k", user("hi"))])
    assert result.attempts == 2
    assert result.error.startswith("connection error:")
    assert result.error.endswith("(after 2 attempts)")


def test_non_json_reply_is_an_error(server):
    server.script = lambda n, body: (200, {"Content-Type": "text/html"}, b"<html>gateway</html>")
    [result] = make_backend(make_cfg(server.url)).generate([GenRequest("k", user("hi"))])
    assert result.text is None
    assert result.attempts == 1
    assert result.error == "non-JSON reply: '<html>gateway</html>'"


def test_reply_without_choices_is_an_error(server):
    server.script = lambda n, body: (200, {}, b'{"object": "chat.completion"}')
    [result] = make_backend(make_cfg(server.url)).generate([GenRequest("k", user("hi"))])
    assert (result.text, result.error) == (None, "reply has no choices[0].message")


def test_response_format_refused_falls_back_once_for_the_run(server):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}

    def script(n, body):
        if "response_format" in body:
            return error_reply(400, "Unrecognized request argument supplied: response_format")
        return ok_reply('{"answer": "B"}')

    server.script = script
    backend = make_backend(make_cfg(server.url, max_concurrency=1))
    [first] = backend.generate([GenRequest("a", user("q"), json_schema=schema)])
    assert (first.text, first.error, first.attempts) == ('{"answer": "B"}', None, 2)
    assert server.requests[0]["body"]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "reply", "schema": schema},
    }
    assert "response_format" not in server.requests[1]["body"]

    [second] = backend.generate([GenRequest("b", user("q"), json_schema=schema)])
    assert (second.text, second.attempts) == ('{"answer": "B"}', 1)
    assert len(server.requests) == 3
    assert "response_format" not in server.requests[2]["body"]


def test_api_key_sent_but_never_shown(server, monkeypatch):
    secret = "sk-test-very-secret-123"
    monkeypatch.setenv("LVR_TEST_KEY", secret)
    server.script = lambda n, body: error_reply(401, f"invalid key {secret}")
    backend = make_backend(make_cfg(server.url, api_key_env="LVR_TEST_KEY"))
    [result] = backend.generate([GenRequest("k", user("hi"))])

    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {secret}"
    assert result.attempts == 1
    assert result.error == "HTTP 401: invalid key ***"
    assert secret not in repr(backend)
    assert secret not in str(result)


def test_missing_api_key_env_names_the_variable(monkeypatch):
    monkeypatch.delenv("LVR_TEST_MISSING_KEY", raising=False)
    with pytest.raises(BackendError) as info:
        OpenAIBackend(make_cfg("http://127.0.0.1:1/v1", api_key_env="LVR_TEST_MISSING_KEY"))
    assert str(info.value) == "backend.api_key_env: environment variable LVR_TEST_MISSING_KEY is not set"


def test_bad_url_and_unknown_kind_are_config_errors():
    with pytest.raises(BackendError, match=r"^backend.base_url: expected an http\(s\) URL"):
        OpenAIBackend(make_cfg("localhost:8000"))
    with pytest.raises(BackendError, match=r"^backend.kind: unknown backend 'tgi'"):
        make_backend(make_cfg("http://x/v1", kind="tgi"))


def test_concurrency_is_bounded(server):
    def script(n, body):
        time.sleep(0.15)
        return ok_reply(f"r{n}")

    server.script = script
    backend = make_backend(make_cfg(server.url, max_concurrency=2))
    start = time.monotonic()
    results = backend.generate([GenRequest(f"k{i}", user("hi")) for i in range(6)])
    elapsed = time.monotonic() - start

    assert [r.error for r in results] == [None] * 6
    assert len(server.requests) == 6
    assert server.max_in_flight == 2
    assert elapsed >= 3 * 0.15


def test_video_frames_become_jpeg_image_parts(server):
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8) for _ in range(3)]
    frames[0][:] = (255, 0, 0)
    content = [{"type": "video", "frames": frames, "fps": 2.0}, {"type": "text", "text": "Describe the clip."}]
    [result] = make_backend(make_cfg(server.url)).generate([GenRequest("clip", [{"role": "user", "content": content}])])
    assert result.error is None

    parts = server.requests[0]["body"]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 3 + ["text"]
    assert parts[3] == {"type": "text", "text": "Describe the clip."}
    for part in parts[:3]:
        url = part["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert (image.format, image.size, image.mode) == ("JPEG", (40, 24), "RGB")
    red = np.asarray(Image.open(io.BytesIO(base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1]))))
    assert np.abs(red.astype(int) - np.array([255, 0, 0])).max() <= 8


def test_bad_frame_fails_only_its_item(server):
    bad = [{"role": "user", "content": [{"type": "video", "frames": [np.zeros((4, 4), np.uint8)], "fps": 1.0}]}]
    results = make_backend(make_cfg(server.url)).generate([GenRequest("bad", bad), GenRequest("good", user("hi"))])
    assert results[0].text is None
    assert results[0].attempts == 0
    assert results[0].error.startswith("bad request: video frame must be an HxWx3 uint8 array")
    assert (results[1].text, results[1].error) == ("hello", None)
    assert len(server.requests) == 1


def test_jpeg_fallback_through_pyav_decodes():
    import av

    from stages.backends.openai_http import _jpeg_with_av

    frame = np.zeros((16, 32, 3), np.uint8)
    frame[:, :16] = (0, 0, 255)
    data = _jpeg_with_av(frame, 90)
    assert data[:2] == b"\xff\xd8"
    with av.open(io.BytesIO(data), format="mjpeg") as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert decoded.shape == (16, 32, 3)
    assert np.abs(decoded.astype(int) - frame.astype(int)).max() <= 24
    assert len(base64.b64decode(encode_jpeg_b64(frame))) > 100
