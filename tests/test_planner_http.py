"""planner.chat and planner.plan against a scripted loopback HTTP server (http.server in a thread).

Failure modes: 429 with Retry-After, 500 then success, read timeout, truncated body, HTML error
pages, 401/403/404, JSON without choices, connection refused; then plan()'s repair loop and its
saved raw replies. Every call runs with small timeouts/backoffs and is checked not to hang.
"""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import planner

GOOD = """Reasoning: A dog runs right.
Frame 1: [{'id': 0, 'name': 'dog', 'box': [0, 300, 100, 80]}]
Frame 2: [{'id': 0, 'name': 'dog', 'box': [80, 300, 100, 80]}]
Frame 3: [{'id': 0, 'name': 'dog', 'box': [160, 300, 100, 80]}]
Frame 4: [{'id': 0, 'name': 'dog', 'box': [240, 300, 100, 80]}]
Frame 5: [{'id': 0, 'name': 'dog', 'box': [320, 300, 100, 80]}]
Frame 6: [{'id': 0, 'name': 'dog', 'box': [400, 300, 100, 80]}]
Background keyword: park"""
FAST = dict(timeout=(1.0, 1.0), retries=2, backoff=0.01, max_wait=3.0)


def ok(content):
    return {"status": 200, "body": {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                    "content": content}}]}}


class Script:
    """Responses served in order (the last one repeats); every request is recorded."""

    def __init__(self, responses):
        self.responses, self.requests = list(responses), []

    def next(self):
        return self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]


def _handler(script):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            script.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(raw)})
            r = script.next()
            r = r(script.requests[-1]["json"]) if callable(r) else r
            time.sleep(r.get("delay", 0))
            body = r.get("body", "")
            body = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(r["status"])
            for k, v in r.get("headers", {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) + (100 if r.get("truncate") else 0)))
            self.end_headers()
            try:
                self.wfile.write(body)
                self.wfile.flush()
            except OSError:
                pass
            if r.get("truncate"):
                self.close_connection = True
    return Handler


@pytest.fixture
def serve():
    servers = []

    def start(*responses):
        script = Script(responses)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", script
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def timed(fn, *a, **kw):
    t = time.monotonic()
    try:
        return fn(*a, **kw), time.monotonic() - t
    except Exception as e:           # noqa: BLE001  (returned for the assertions)
        return e, time.monotonic() - t


MSGS = [{"role": "user", "content": "Caption: a dog"}]


# -----------------------------------------------------------------------------
# chat

def test_success_sends_the_documented_request(serve):
    url, script = serve(ok("hello"))
    assert planner.chat(MSGS, url + "/", "my-model", "sk-123", **FAST) == "hello"
    (req,) = script.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-123"
    assert req["json"] == {"model": "my-model", "messages": MSGS, "temperature": 0.25, "max_tokens": 900}


def test_no_key_sends_no_authorization_header(serve, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    url, script = serve(ok("hi"))
    assert planner.chat(MSGS, url, "m", **FAST) == "hi"
    assert "Authorization" not in script.requests[0]["headers"]


def test_429_honours_retry_after(serve):
    url, script = serve({"status": 429, "headers": {"Retry-After": "1"}, "body": {"error": "slow down"}}, ok("done"))
    result, elapsed = timed(planner.chat, MSGS, url, "m", "k", **FAST)
    assert result == "done" and len(script.requests) == 2
    # measured 1.009 s: 9 ms over the enforced 1 s wait; 3.0 leaves 2 s (200x)
    assert 0.9 <= elapsed < 3.0          # waited the server's 1 s, not the 0.01 s backoff


def test_429_with_a_retry_after_beyond_max_wait_raises_at_once(serve):
    url, script = serve({"status": 429, "headers": {"Retry-After": "3600"}, "body": "{}"}, ok("never"))
    result, elapsed = timed(planner.chat, MSGS, url, "m", "k", **FAST)
    assert isinstance(result, planner.LLMError) and "3600" in str(result)
    assert len(script.requests) == 1 and elapsed < 1.0  # measured 0.004 s; 1 s = 260x


def test_500_then_success(serve):
    url, script = serve({"status": 500, "body": {"error": "boom"}}, ok("recovered"))
    assert planner.chat(MSGS, url, "m", "k", **FAST) == "recovered"
    assert len(script.requests) == 2


def test_persistent_5xx_html_page_gives_up_after_the_retries(serve):
    html = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
    url, script = serve({"status": 502, "headers": {"Content-Type": "text/html"}, "body": html})
    result, elapsed = timed(planner.chat, MSGS, url, "m", "k", **FAST)
    assert type(result) is planner.LLMError
    assert "HTTP 502 after 3 attempts" in str(result) and "Bad Gateway" in str(result)
    assert len(script.requests) == 3 and elapsed < 2.0  # measured 0.045 s; 2 s = 45x


def test_html_page_with_status_200_is_a_bad_response(serve):
    url, script = serve({"status": 200, "headers": {"Content-Type": "text/html"},
                         "body": "<!DOCTYPE html><html><body>Login required</body></html>"})
    result, _ = timed(planner.chat, MSGS, url, "m", "k", **FAST)
    assert isinstance(result, planner.LLMBadResponse) and "Login required" in str(result)
    assert len(script.requests) == 1


@pytest.mark.parametrize("body", [{"object": "list"}, {"choices": []}, {"choices": [{"message": {}}]},
                                  {"choices": [{"message": {"content": None}}]}, "[1, 2", ""])
def test_json_without_choices_is_a_bad_response(serve, body):
    url, _ = serve({"status": 200, "body": body})
    result, _ = timed(planner.chat, MSGS, url, "m", "k", **FAST)
    assert isinstance(result, planner.LLMBadResponse) and "choices[0].message.content" in str(result)


def test_read_timeout_is_not_retried_and_does_not_hang(serve):
    url, script = serve({**ok("too late"), "delay": 3.0})
    result, elapsed = timed(planner.chat, MSGS, url, "m", "k", **{**FAST, "timeout": (1.0, 0.5)})
    assert type(result) is planner.LLMError and "read timeout of 0.5 s" in str(result)
    # measured 0.502 s: the 0.5 s timeout + 2 ms; 1 s left (500x), and a hang (the 3 s delay) fails
    assert elapsed < 1.5 and len(script.requests) == 1


def test_truncated_body_is_retried_then_fails_clearly(serve):
    url, script = serve({**ok("cut"), "truncate": True})
    result, elapsed = timed(planner.chat, MSGS, url, "m", "k", **FAST)
    assert type(result) is planner.LLMError and "after 3 attempts" in str(result)
    assert len(script.requests) == 3 and elapsed < 3.0  # measured 0.04 s; 3 s = 75x


def test_truncated_body_then_success(serve):
    url, script = serve({**ok("cut"), "truncate": True}, ok("whole"))
    assert planner.chat(MSGS, url, "m", "k", **FAST) == "whole"


@pytest.mark.parametrize("status, cls, words", [
    (401, planner.LLMAuthError, "API key"), (403, planner.LLMAuthError, "API key"),
    (404, planner.LLMNotFound, "model 'm' or the URL"), (400, planner.LLMError, "HTTP 400"),
])
def test_client_errors_are_distinct_and_not_retried(serve, status, cls, words):
    url, script = serve({"status": status, "body": {"error": {"message": "nope"}}})
    result, _ = timed(planner.chat, MSGS, url, "m", "k", **FAST)
    assert type(result) is cls and words in str(result) and f"HTTP {status}" in str(result) and "nope" in str(result)
    assert len(script.requests) == 1


def test_connection_refused_retries_with_backoff_then_fails():
    with socket.socket() as s:        # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result, elapsed = timed(planner.chat, MSGS, f"http://127.0.0.1:{port}/v1", "m", "k", **FAST)
    assert type(result) is planner.LLMError and "ConnectionError after 3 attempts" in str(result)
    assert elapsed < 3.0  # measured 0.036 s; 3 s = 80x


def test_environment_supplies_base_url_and_key(serve, monkeypatch):
    url, script = serve(ok("env"))
    monkeypatch.setenv("LVD_LLM_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("LVD_LLM_MODEL", "env-model")
    assert planner.chat(MSGS, **FAST) == "env"
    assert script.requests[0]["headers"]["Authorization"] == "Bearer sk-env"
    assert script.requests[0]["json"]["model"] == "env-model"


# -----------------------------------------------------------------------------
# plan: the repair loop, the cache, the saved replies

def test_plan_repairs_a_bad_reply_and_records_it(serve, tmp_path):
    bad = GOOD.replace("[0, 300, 100, 80]", "[0, 300, 100]")
    url, script = serve(ok(bad), ok(GOOD))
    cache = planner.LayoutCache(tmp_path / "cache.json")
    layout = planner.plan("A dog runs.", url, "tiny", None, cache=cache, run_dir=tmp_path, examples=None, **FAST)
    assert layout.background == "park" and layout.prompt == "A dog runs"
    assert len(script.requests) == 2
    second = script.requests[1]["json"]["messages"]
    assert second[-2] == {"role": "assistant", "content": bad}
    assert "Frame 1: box is four finite numbers" in second[-1]["content"]
    assert second[:-2] == planner.build_messages("A dog runs")
    assert planner.LayoutCache(tmp_path / "cache.json").get("A dog runs", 0, "tiny", planner.TEMPLATE_VERSION) == GOOD
    # the next call is served by the cache: no request
    assert planner.plan("A dog runs", url, "tiny", None, cache=cache, examples=None, **FAST) == layout
    assert len(script.requests) == 2


def test_plan_gives_up_after_the_repairs_and_saves_the_raw_replies(serve, tmp_path):
    url, script = serve(ok("I am a small model and I like dogs."))
    e, elapsed = timed(planner.plan, "A dog runs", url, "tiny", None, max_repairs=2, run_dir=tmp_path,
                       examples=None, **FAST)
    assert type(e) is planner.PlannerError and len(script.requests) == 3
    base = planner.build_messages("A dog runs")      # each repair carries only the latest bad reply
    assert [len(r["json"]["messages"]) for r in script.requests] == [len(base), len(base) + 2, len(base) + 2]
    assert "did not parse after 3 attempt(s)" in str(e) and "raw replies saved to" in str(e)
    assert e.replies == ["I am a small model and I like dogs."] * 3
    saved = json.loads(e.saved_to.read_text())
    assert saved["replies"] == e.replies and saved["model"] == "tiny" and len(saved["parse_errors"]) == 3


def test_plan_llm_error_keeps_the_replies_so_far(serve, tmp_path):
    url, script = serve(ok("garbage"), {"status": 401, "body": "bad key"})
    e, _ = timed(planner.plan, "A dog runs", url, "tiny", "k", run_dir=tmp_path, examples=None, **FAST)
    assert type(e) is planner.LLMAuthError and e.replies == ["garbage"] and e.saved_to.exists()


def test_plan_prefers_shipped_examples_unless_disabled(serve, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    url, script = serve(ok(GOOD))
    demo = "A bear walks from the left to the right"
    with pytest.warns(planner.LayoutWarning):
        assert planner.plan(demo, url, "tiny", **FAST).background == "forest"
    assert script.requests == []
    assert planner.plan(demo, url, "tiny", examples=None, **FAST).background == "park"
    assert len(script.requests) == 1


# -----------------------------------------------------------------------------
# the CLI plans through the server

def test_cli_plans_with_llm_flags_and_prints_the_summary_first(serve, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import os

    import lvd
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    url, script = serve(ok(GOOD))
    cache = tmp_path / "cache.json"
    argv = ["--prompt", "A dog runs to the right", "--llm-base-url", url, "--llm-model", "tiny-llm",
            "--llm-cache", str(cache), "--model-dir", tiny_model_dir, "--frames", "2", "--height", "32",
            "--width", "32", "--steps", "2", "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert lvd.main(argv) == 0
    err = capsys.readouterr().err
    assert len(script.requests) == 1 and script.requests[0]["json"]["model"] == "tiny-llm"
    assert script.requests[0]["path"] == "/v1/chat/completions"
    assert "layout for 'A dog runs to the right'" in err and "'dog'" in err
    assert err.index("layout for") < err.index("denoising")  # printed before sampling
    (run,) = os.listdir(tmp_path / "out")
    saved = planner.Layout.load(tmp_path / "out" / run / "layout.json")
    assert saved == planner.parse_layout(GOOD, "A dog runs to the right")
    assert planner.LayoutCache(cache).get("A dog runs to the right", 0, "tiny-llm", planner.TEMPLATE_VERSION) == GOOD
    assert lvd.main(argv) == 0 and len(script.requests) == 1  # the second run reads the cache
