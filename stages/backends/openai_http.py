"""OpenAI-compatible chat completions over plain HTTP (stdlib only).

Works against OpenAI itself and the servers that speak its protocol (vLLM, SGLang,
llama.cpp, TGI). Video parts are sent as one `image_url` JPEG frame each, the form every
such server accepts; `fps` is not part of that protocol and is dropped.

Failure policy, per request: 429, 5xx, connection errors and timeouts are retried with
exponential backoff and jitter (a server's `Retry-After` wins); any other 4xx fails at
once with the server's message; a reply that is not JSON fails at once. The API key is
only ever put in the `Authorization` header: never in logs, errors or `repr`.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

import numpy as np

from stages.backends.base import BackendError, GenRequest, GenResult, map_video_parts, one_line

# A server asking us to wait longer than this is treated as asking for this long.
MAX_RETRY_AFTER_S = 120.0
JPEG_QUALITY = 90


def encode_jpeg_b64(frame: np.ndarray, quality: int = JPEG_QUALITY) -> str:
    """Base64 of `frame` (HxWx3 uint8 RGB) encoded as a baseline JPEG."""
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"video frame must be an HxWx3 uint8 array, got shape {arr.shape} dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    try:
        from PIL import Image
    except ImportError:  # PyAV is a hard dependency; Pillow only comes with matplotlib
        return base64.b64encode(_jpeg_with_av(arr, quality)).decode("ascii")
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _jpeg_with_av(arr: np.ndarray, quality: int) -> bytes:
    import av

    height, width = arr.shape[:2]
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height = width, height
    codec.pix_fmt = "yuvj444p"
    codec.time_base = Fraction(1, 1)
    # ffmpeg's mjpeg quality scale: 2 (best) .. 31 (worst)
    codec.options = {"qmin": "2", "qmax": "2" if quality >= 90 else "5"}
    frame = av.VideoFrame.from_ndarray(arr, format="rgb24").reformat(format="yuvj444p")
    packets = list(codec.encode(frame)) + list(codec.encode(None))
    return b"".join(bytes(p) for p in packets)


def to_openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with each video part expanded into `image_url` JPEG data-URL parts."""
    return map_video_parts(messages, lambda part: [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + encode_jpeg_b64(frame)}}
        for frame in part.get("frames") or []])


class _Retryable(Exception):
    """A failure worth another attempt; `retry_after_s` is the server's wish, if any."""

    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class _Fatal(Exception):
    """A failure that another attempt would not fix."""


class _ResponseFormatRefused(Exception):
    """The server answered 400 about `response_format`."""


class OpenAIBackend:
    """Chat completions against `{cfg.base_url}/chat/completions`, `cfg.max_concurrency` at a time."""

    def __init__(self, cfg: Any):
        base_url = (cfg.base_url or "").rstrip("/")
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise BackendError(f"backend.base_url: expected an http(s) URL such as http://localhost:8000/v1, got {base_url!r}")
        if not cfg.model:
            raise BackendError("backend.model: the model name to send to the server is required")
        self.url = base_url + "/chat/completions"
        self.model: str = cfg.model
        # the section's own values: its schema (BackendSection) holds the defaults and bounds
        self.max_concurrency = cfg.max_concurrency
        self.timeout_s = cfg.timeout_s
        self.max_retries = cfg.max_retries
        self.backoff_s = cfg.backoff_s
        self.extra_body = dict(cfg.extra_body)

        api_key_env = cfg.api_key_env
        self.__api_key: str | None = None
        if api_key_env:
            value = os.environ.get(api_key_env)
            if not value:
                raise BackendError(f"backend.api_key_env: environment variable {api_key_env} is not set")
            self.__api_key = value

        # Flipped once when the server refuses `response_format`; shared by all threads.
        self._response_format_ok = True
        self._lock = threading.Lock()
        self._opener = urllib.request.build_opener()

    def __repr__(self) -> str:
        auth = "set" if self.__api_key else "none"
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r}, api_key={auth})"

    def close(self) -> None:
        pass

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if not requests:
            return []
        workers = min(self.max_concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lvr-openai") as pool:
            return list(pool.map(self._generate_one, requests))

    def _generate_one(self, req: GenRequest) -> GenResult:
        start = time.monotonic()
        attempts = 0
        try:
            messages = to_openai_messages(req.messages)
        except Exception as exc:  # a malformed frame fails this item only
            return GenResult(req.key, None, f"bad request: {self._clean(exc)}", time.monotonic() - start, 0)

        retries_left = self.max_retries
        while True:
            attempts += 1
            body = self._body(req, messages)
            try:
                reply = self._post(body)
                text, usage = self._read_reply(reply)
                return GenResult(req.key, text, None, time.monotonic() - start, attempts, usage)
            except _ResponseFormatRefused:
                # Structured output is a nicety: drop it for the rest of the run and go again.
                with self._lock:
                    self._response_format_ok = False
                continue
            except _Fatal as exc:
                return self._failed(req, str(exc), start, attempts)
            except _Retryable as exc:
                if retries_left <= 0:
                    suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
                    return self._failed(req, exc.reason + suffix, start, attempts)
                retries_left -= 1
                time.sleep(self._delay(attempts, exc.retry_after_s))
            except Exception as exc:  # anything unexpected stays with this item
                return self._failed(req, f"{type(exc).__name__}: {self._clean(exc)}", start, attempts)

    def _failed(self, req: GenRequest, reason: str, start: float, attempts: int) -> GenResult:
        return GenResult(req.key, None, one_line(self._clean(reason), 300), time.monotonic() - start, attempts)

    def _clean(self, text: Any) -> str:
        """`text` with the API key masked, should a server ever echo it back."""
        text = str(text)
        if self.__api_key:
            text = text.replace(self.__api_key, "***")
        return text

    def _body(self, req: GenRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if req.json_schema is not None and self._response_format_ok:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": req.json_schema},
            }
        body.update(self.extra_body)
        return body

    def _delay(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), MAX_RETRY_AFTER_S)
        return self.backoff_s * (2 ** (attempt - 1)) * (1.0 + 0.25 * random.random())

    def _post(self, body: dict[str, Any]) -> bytes:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                raw = exc.read()
            except Exception:
                raw = b""
            message = _server_message(raw) or (exc.reason or "")
            if status == 429 or status >= 500:
                raise _Retryable(f"HTTP {status}: {one_line(message)}", _retry_after(exc.headers)) from None
            if status == 400 and "response_format" in body and "response_format" in message:
                raise _ResponseFormatRefused() from None
            raise _Fatal(f"HTTP {status}: {one_line(message)}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"timeout after {self.timeout_s:g}s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timeout after {self.timeout_s:g}s") from None
            raise _Retryable(f"connection error: {exc.reason}") from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Retryable(f"connection error: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _read_reply(raw: bytes) -> tuple[str, dict[str, int]]:
        try:
            reply = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            preview = raw[:80].decode("utf-8", "replace")
            raise _Fatal(f"non-JSON reply: {one_line(preview, 80)!r}") from None
        try:
            message = reply["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise _Fatal("reply has no choices[0].message") from None
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            finish = reply["choices"][0].get("finish_reason")
            raise _Fatal(f"reply has no text content (finish_reason={finish})")
        usage = {}
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = (reply.get("usage") or {}).get(name)
            if isinstance(value, int):
                usage[name] = value
        return text, usage


def _server_message(raw: bytes) -> str:
    """The error message in an OpenAI-style error body, else the body as text."""
    text = raw.decode("utf-8", "replace")
    try:
        payload = json.loads(text)
    except ValueError:
        return text
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("message", payload.get("detail")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if isinstance(error, str):
            return error
        if error is not None:
            return json.dumps(error)
    return text


def _retry_after(headers: Any) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or HTTP date), else None."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())
