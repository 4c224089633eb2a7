"""The official Python SDK as a client of tollgate, one scenario per run.

Usage: scenarios.py SCENARIO

The SDK reads ANTHROPIC_BASE_URL (tollgate) and ANTHROPIC_API_KEY from the
environment, as an application would. The mock upstream behind tollgate is
steered with its `x-mock-*` request headers, sent through the SDK's own
`extra_headers`. The script prints exactly one JSON line on stdout describing
what the SDK saw (text, usage, stop reason, response headers, the exception it
raised, timings); tests/sdk_clients.rs compares it with tollgate's usage record.
An unexpected crash prints a traceback on stderr and exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any, Callable

import anthropic
from anthropic import Anthropic, AsyncAnthropic

MODEL = "claude-sonnet-4-6"
PROMPT = [{"role": "user", "content": "Say something short."}]
# Response headers worth reporting: tollgate's id, the upstream's id, and the
# mock's statement of the usage it emitted.
REPORTED_HEADERS = ("tollgate-request-id", "request-id", "x-mock-usage", "retry-after")

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a place.",
    "input_schema": {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    },
}


def usage_of(message: Any) -> dict[str, Any]:
    """The SDK's usage object, as plain JSON."""
    return message.usage.model_dump(mode="json")


def headers_of(headers: Any) -> dict[str, str]:
    return {name: headers[name] for name in REPORTED_HEADERS if name in headers}


def sent_headers(request: Any) -> dict[str, str]:
    """How the SDK authenticated and which API version it asked for; the key
    itself is left out."""
    out = {"anthropic-version": request.headers.get("anthropic-version", "")}
    authorization = request.headers.get("authorization")
    if authorization is not None:
        out["authorization-scheme"] = authorization.split(" ", 1)[0]
    out["x-api-key-present"] = "x-api-key" in request.headers
    return out


def message_report(message: Any) -> dict[str, Any]:
    blocks = []
    for block in message.content:
        if block.type == "text":
            blocks.append({"type": "text", "text": block.text})
        elif block.type == "tool_use":
            blocks.append({"type": "tool_use", "name": block.name, "input": block.input})
        else:
            blocks.append({"type": block.type})
    return {
        "message_id": message.id,
        "model": message.model,
        "stop_reason": message.stop_reason,
        "usage": usage_of(message),
        "content": blocks,
        # The SDK's own `_request_id`, read from the `request-id` header.
        "sdk_request_id": getattr(message, "_request_id", None),
    }


def error_report(err: BaseException) -> dict[str, Any]:
    report: dict[str, Any] = {
        "class": type(err).__name__,
        "mro": [cls.__name__ for cls in type(err).__mro__ if cls is not object],
        "message": str(err)[:500],
    }
    if isinstance(err, anthropic.APIStatusError):
        report["status_code"] = err.status_code
        report["type"] = err.type
        report["request_id"] = err.request_id
        report["headers"] = headers_of(err.response.headers)
    return report


def mock_headers(**controls: str) -> dict[str, str]:
    """`x-mock-*` headers from keyword arguments: output_tokens="8" becomes
    `x-mock-output-tokens: 8`."""
    return {"x-mock-" + name.replace("_", "-"): value for name, value in controls.items()}


def once_fault(fault: str) -> dict[str, str]:
    """A fault that hits only the first request of this run, so the SDK's retry
    succeeds."""
    return {
        "x-mock-fault": fault,
        "x-mock-fail-times": "1",
        "x-mock-fault-key": f"py-{uuid.uuid4()}",
    }


# --- scenarios ------------------------------------------------------------------


def stream() -> dict[str, Any]:
    """`messages.stream(...)`, consuming `text_stream`, then the final message."""
    client = Anthropic()
    headers = mock_headers(output_tokens="12", cache="write=7,read=30")
    with client.messages.stream(
        model=MODEL, max_tokens=64, messages=PROMPT, extra_headers=headers
    ) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
        report = message_report(final)
        report["text_stream"] = "".join(pieces)
        report["text_events"] = len(pieces)
        report["headers"] = headers_of(s.response.headers)
        report["sent"] = sent_headers(s.response.request)
    return report


async def _stream_async() -> dict[str, Any]:
    client = AsyncAnthropic()
    headers = mock_headers(output_tokens="10", cache="write=3,read=11")
    async with client.messages.stream(
        model=MODEL, max_tokens=64, messages=PROMPT, extra_headers=headers
    ) as s:
        pieces = [text async for text in s.text_stream]
        final = await s.get_final_message()
        report = message_report(final)
        report["text_stream"] = "".join(pieces)
        report["text_events"] = len(pieces)
        report["headers"] = headers_of(s.response.headers)
        report["sent"] = sent_headers(s.response.request)
    await client.close()
    return report


def stream_async() -> dict[str, Any]:
    """The same stream with `AsyncAnthropic`."""
    return asyncio.run(_stream_async())


def tool_use() -> dict[str, Any]:
    """A streamed request with `tools`: the model answers with a tool call."""
    client = Anthropic()
    with client.messages.stream(
        model=MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        extra_headers=mock_headers(output_tokens="9"),
    ) as s:
        s.until_done()
        final = s.get_final_message()
        report = message_report(final)
        report["headers"] = headers_of(s.response.headers)
    return report


def create() -> dict[str, Any]:
    """Non-streaming `messages.create`, through `with_raw_response` to see the
    response headers."""
    client = Anthropic()
    raw = client.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=64,
        messages=PROMPT,
        extra_headers=mock_headers(output_tokens="14", cache="write=5,read=9"),
    )
    message = raw.parse()
    report = message_report(message)
    report["headers"] = headers_of(raw.headers)
    report["sent"] = sent_headers(raw.http_request)
    report["retries_taken"] = raw.retries_taken
    return report


def create_x_api_key() -> dict[str, Any]:
    """`messages.create` authenticating the way 0.x/1.x clients did: the key in
    `x-api-key` with `anthropic-version: 2023-06-01`, no `Authorization`."""
    import os

    client = Anthropic(
        default_headers={
            "x-api-key": os.environ["ANTHROPIC_API_KEY"],
            "anthropic-version": "2023-06-01",
            "Authorization": anthropic.omit,
        }
    )
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=64, messages=PROMPT, extra_headers=mock_headers(output_tokens="5")
    )
    report = message_report(raw.parse())
    report["headers"] = headers_of(raw.headers)
    report["sent"] = sent_headers(raw.http_request)
    return report


def _create_with_retry(fault: str) -> dict[str, Any]:
    client = Anthropic()  # max_retries stays at the SDK's default of 2
    started = time.monotonic()
    raw = client.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=64,
        messages=PROMPT,
        extra_headers={**mock_headers(output_tokens="6"), **once_fault(fault)},
    )
    elapsed = time.monotonic() - started
    report = message_report(raw.parse())
    report["headers"] = headers_of(raw.headers)
    report["retries_taken"] = raw.retries_taken
    report["max_retries"] = client.max_retries
    report["elapsed_s"] = elapsed
    return report


def retry_429() -> dict[str, Any]:
    """A 429 with `retry-after: 1` on the first attempt only: the SDK waits
    and retries to success."""
    return _create_with_retry("status=429;retry-after=1")


def retry_529() -> dict[str, Any]:
    """A 529 on the first attempt only: the SDK backs off and retries."""
    return _create_with_retry("status=529")


def overloaded_529() -> dict[str, Any]:
    """A 529 on every attempt with retries off: the SDK raises."""
    client = Anthropic(max_retries=0)
    client.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=PROMPT,
        extra_headers={"x-mock-fault": "status=529"},
    )
    raise AssertionError("a 529 did not raise")


def bad_request() -> dict[str, Any]:
    """`max_tokens=0` passes the SDK's client-side checks and is rejected by the
    API (here the mock) with a 400."""
    client = Anthropic()
    client.messages.create(model=MODEL, max_tokens=0, messages=PROMPT)
    raise AssertionError("max_tokens=0 did not raise")


# What an error scenario saw before the SDK raised: the texts, and the input
# tokens of `message_start` (the SDK's snapshot), reported next to the error.
PARTIAL: dict[str, Any] = {}


def _stream_until_error(fault: str, event_delay_ms: str) -> dict[str, Any]:
    client = Anthropic()
    seen: list[str] = []
    headers = mock_headers(output_tokens="20", event_delay_ms=event_delay_ms, fault=fault)
    with client.messages.stream(
        model=MODEL, max_tokens=64, messages=PROMPT, extra_headers=headers
    ) as s:
        PARTIAL["headers"] = headers_of(s.response.headers)
        try:
            for text in s.text_stream:
                seen.append(text)
        finally:
            PARTIAL["text_stream"] = "".join(seen)
            PARTIAL["text_events"] = len(seen)
            try:
                PARTIAL["input_tokens_at_start"] = s.current_message_snapshot.usage.input_tokens
            except Exception:  # no message_start was read
                pass
    raise AssertionError(f"the stream ended without an error after {len(seen)} texts")


def stream_error() -> dict[str, Any]:
    """An `overloaded_error` event after a few text deltas."""
    return _stream_until_error("error-after=6", event_delay_ms="10")


def upstream_reset() -> dict[str, Any]:
    """The upstream connection breaks after a few text deltas, with no pause
    between them: the reset may arrive in the same read as the headers."""
    return _stream_until_error("reset-after=6", event_delay_ms="0")


ABANDON_AFTER_TEXTS = 4


def abandon() -> dict[str, Any]:
    """Reads a few texts of a slow stream, then leaves: closes the stream and
    the client, as an application that lost interest would."""
    client = Anthropic()
    s = client.messages.stream(
        model=MODEL,
        max_tokens=1000,
        messages=PROMPT,
        extra_headers=mock_headers(output_tokens="400", event_delay_ms="50"),
    ).__enter__()
    pieces: list[str] = []
    for text in s.text_stream:
        pieces.append(text)
        if len(pieces) >= ABANDON_AFTER_TEXTS:
            break
    snapshot = s.current_message_snapshot
    report = {
        "text_stream": "".join(pieces),
        "text_events": len(pieces),
        "input_tokens_at_start": snapshot.usage.input_tokens,
        "message_id": snapshot.id,
        "headers": headers_of(s.response.headers),
    }
    s.close()
    client.close()
    return report


def burst() -> dict[str, Any]:
    """BURST_N sequential `messages.create` calls (default 62) with the SDK's
    default retries: against a key limited to 60 requests a minute, the last
    ones are either held by tollgate (within limits.max_wait) or answered 429
    with retry-after, which the SDK waits out and retries."""
    n = int(os.environ.get("BURST_N", "62"))
    client = Anthropic()
    started = time.monotonic()
    ids = []
    for _ in range(n):
        raw = client.messages.with_raw_response.create(
            model=MODEL, max_tokens=10, messages=PROMPT,
            extra_headers=mock_headers(output_tokens="3"),
        )
        raw.parse()
        ids.append(raw.headers.get("tollgate-request-id"))
    return {"completed": len(ids), "elapsed_s": time.monotonic() - started, "request_ids": ids}


def budget_exhausted() -> dict[str, Any]:
    """Two `messages.create` calls on a key whose budget the first one spends:
    the second must raise on a 402 without the SDK retrying it."""
    client = Anthropic()
    first = client.messages.create(
        model=MODEL, max_tokens=50, messages=PROMPT,
        extra_headers=mock_headers(output_tokens="20"),
    )
    started = time.monotonic()
    try:
        client.messages.create(model=MODEL, max_tokens=50, messages=PROMPT)
    except anthropic.APIStatusError as err:
        return {
            "first_usage": usage_of(first),
            "second_error": error_report(err),
            "second_elapsed_s": time.monotonic() - started,
        }
    raise AssertionError("the second request was not refused")


def until_unauthorized() -> dict[str, Any]:
    """Calls `messages.create` every 50 ms until the key is refused (the test
    revokes it meanwhile); reports when, on the wall clock."""
    client = Anthropic(max_retries=0)
    successes = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            client.messages.create(model=MODEL, max_tokens=10, messages=PROMPT)
            successes += 1
        except anthropic.AuthenticationError as err:
            return {"successes": successes, "refused_at": time.time(), "error": error_report(err)}
        time.sleep(0.05)
    raise AssertionError("the key was never refused")


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "stream": stream,
    "stream_async": stream_async,
    "tool_use": tool_use,
    "create": create,
    "create_x_api_key": create_x_api_key,
    "retry_429": retry_429,
    "retry_529": retry_529,
    "overloaded_529": overloaded_529,
    "bad_request": bad_request,
    "stream_error": stream_error,
    "upstream_reset": upstream_reset,
    "abandon": abandon,
    "burst": burst,
    "budget_exhausted": budget_exhausted,
    "until_unauthorized": until_unauthorized,
}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in SCENARIOS:
        print(f"usage: scenarios.py {{{'|'.join(SCENARIOS)}}}", file=sys.stderr)
        return 2
    name = sys.argv[1]
    out: dict[str, Any] = {
        "scenario": name,
        "sdk": "anthropic-python",
        "sdk_version": anthropic.__version__,
    }
    started = time.monotonic()
    try:
        out["result"] = SCENARIOS[name]()
        out["outcome"] = "ok"
    except AssertionError:
        raise
    except Exception as err:
        # An exception is what an error scenario observes, not a crash; whether
        # it is one of the SDK's own classes is for the test to judge.
        out["outcome"] = "error"
        out["error"] = error_report(err)
        out["error"]["sdk_error"] = isinstance(err, anthropic.AnthropicError)
    if PARTIAL:
        out["partial"] = PARTIAL
    out["elapsed_s"] = time.monotonic() - started
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
