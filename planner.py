"""LLM planner: caption -> dynamic scene layout (DSL). A versioned template, a raw-HTTP chat call, the
repair loop and a record/replay cache; the DSL parser and the Layout type live in layout.py (re-exported here).

What to read: `lvd-method.md` §2 (DSL, template, transport, parsing, cache), §3.2–§3.3 (objects,
boxes, interpolation), §10.1–§10.6 and §10.8 (official defects not copied).

Official implementation: prompt.py (template v0.1), utils/llm.py (`get_layout`,
`get_parsed_layout_text_resp`), utils/cache.py, utils/parse.py (`parsed_layout_to_condition`,
`interpolate_box`) in TonyLianLong/LLM-groundedVideoDiffusion @22d90d2.

Differences:
- Our own template wording (TEMPLATE_VERSION); imported official replies keep the version "v0.1".
- Any OpenAI-compatible `/chat/completions` server, with timeouts, bounded retries (exponential
  backoff, Retry-After) and typed errors (`LLMError` and subclasses); never `exit()` (§10.1–§10.2).
- The parser finds each frame's list by bracket matching, so fences, `**Frame 1:**`, CRLF, JSON or
  Python literals, `keyword` for `name`, a bare dict, trailing comments and prose are accepted; then
  everything is validated, and a LayoutError names the rule and the frame. Boxes are clipped to the
  canvas (one `LayoutWarning` per layout). A zero width or height is kept as present, with the
  warning, as the official pipeline does (16 released GPT-4 boxes are like that); negative is an error.
- `Layout.interpolate` keeps the official presence bins (§3.3, §10.8) by default, documented; the
  option presence="nearest" is the consistent alternative.
- The cache is an object passed in, keyed by (template, model, prompt, sample index), written
  atomically, storing the raw reply (§10.3, §10.6). `plan` re-asks with the parse error (repair loop).

Layout JSON schema (`Layout.save` / `Layout.load`):
    {"schema": "lvd-layout/1", "prompt": str, "background": str, "reasoning": str,
     "frames": [6 lists of {"id": int, "name": str, "box": [x, y, w, h]}]}
  Boxes are [top-left x, top-left y, width, height] on the 512 × 512 canvas; frames[i] is the
  official "Frame i+1". An id keeps one name in every frame.
Cache JSON schema (`LayoutCache`):
    {"schema": "lvd-layout-cache/1", "entries": [{"template": str, "model": str, "prompt": str,
     "sample_index": int, "reply": str (the raw LLM reply)}, ...]}

Glossary: N (video frames), k (video frame), i (layout frame, 0…5), q_k (query time of video
frame k), t_i = i/5 (keyframe time), xyxy (normalised corners x0, y0, x1, y1).
"""
import hashlib
import json
import logging
import os
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

from layout import (CANVAS, NUM_LAYOUT_FRAMES, Layout, LayoutError, LayoutWarning, Track,  # noqa: F401 (re-exported)
                    atomic_write_json as _atomic_write_json, parse_layout)

log = logging.getLogger(__name__)

TEMPLATE_VERSION = "lvd-planner-1"   # bump on any change of SYSTEM_MESSAGE or EXAMPLES
OFFICIAL_TEMPLATE_VERSION = "v0.1"    # the official prompt.py template (imported caches)
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o"              # the released layouts came from gpt-4-1106-preview (§2.4)
EXAMPLES_PATH = Path(__file__).resolve().parent / "data" / "layouts" / "examples.json"
class PlannerError(RuntimeError):
    """Planning failed. `replies`: the raw LLM replies; `saved_to`: the file they were written to."""
    def __init__(self, message, replies=(), saved_to=None):
        super().__init__(message)
        self.replies, self.saved_to = list(replies), saved_to


class CacheError(ValueError): """A cache file that is not JSON in the documented schema."""
class LLMNotConfigured(PlannerError): """No layout in any cache, and no LLM to ask."""
class LLMError(PlannerError): """The server is unreachable, timed out, or kept answering 429/5xx."""
class LLMAuthError(LLMError): """HTTP 401/403: the API key is missing or rejected."""
class LLMNotFound(LLMError): """HTTP 404: the model name or the base URL is wrong."""
class LLMBadResponse(LLMError): """HTTP 200, but not JSON with choices[0].message.content."""


# -----------------------------------------------------------------------------
# 1. the versioned template (§2.2, §2.3), in our own words

SYSTEM_MESSAGE = """You plan bounding boxes for videos. You do not make the video, only the boxes.
Each caption describes a video of six frames, taken at two frames per second.
For every frame, give realistic boxes for the objects that the caption mentions, and finish with one background keyword.
Each frame is 512x512 pixels: [0, 0] is the top-left corner and [512, 512] the bottom-right corner.
Boxes must not overlap each other and must stay inside the frame.
Write each frame as a list of dicts {'id': integer object id counting up from 0, 'name': object name, 'box': [top-left x, top-left y, width, height]}.
Each box holds exactly one object.
Together the six frames must cover everything that happens in the caption.
Objects move and interact according to real-world physics, gravity and elasticity included.
The camera follows perspective geometry.
An object keeps the same id in every frame, even if it leaves the frame and comes back.
Where the caption leaves something open, make a sensible guess.
Before the frames, give your reasoning in a few sentences at most.
Answer exactly in the format of the examples: a 'Reasoning:' line, the lines 'Frame 1:' to 'Frame 6:', then a 'Background keyword:' line. No markdown or other formats, no line that starts with '-', no comments."""

# (caption, reasoning, {(id, name): six [x, y, w, h] boxes}, background); the boxes of §2.3
EXAMPLES = (
    ("A woman walking from the left to the right and a man jumping on the right in a room",
     "The woman walks to the right, so her x grows while her y stays the same. The man is on the right, "
     "so his x is large; as he jumps his y first gets smaller (he goes up) and then larger again (gravity).",
     {(0, "walking woman"): [[0, 270, 120, 200], [50, 270, 120, 200], [100, 270, 120, 200],
                             [150, 270, 120, 200], [200, 270, 120, 200], [250, 270, 120, 200]],
      (1, "jumping man"): [[380, 290, 120, 180], [380, 205, 120, 200], [380, 175, 120, 200],
                           [380, 175, 120, 200], [380, 205, 120, 200], [380, 290, 120, 180]]}, "room"),
    ("A red ball is thrown from the left to the right in a garden",
     "The ball flies to the right, so its x grows. Gravity makes its y grow faster and faster until it "
     "hits the ground, and elasticity makes it bounce back up.",
     {(0, "red ball"): [[0, 206, 50, 50], [80, 246, 50, 50], [160, 326, 50, 50],
                        [240, 446, 50, 50], [320, 366, 50, 50], [400, 446, 50, 50]]}, "garden"),
    ("The camera is moving away from a painting",
     "By perspective geometry the painting looks smaller as the camera moves away; it shrinks about "
     "its own centre.",
     {(0, "painting"): [[156, 181, 200, 150], [166, 189, 180, 135], [176, 196, 160, 120],
                        [186, 204, 140, 105], [196, 211, 120, 90], [206, 219, 100, 75]]}, "room"),
)


def normalise_prompt(prompt):
    """Strip surrounding whitespace and one trailing '.' (§2.2); cache keys are these."""
    p = str(prompt).strip()
    p = p[:-1].rstrip() if p.endswith(".") else p
    if not p:
        raise ValueError("the prompt is empty")
    return p


def build_messages(prompt):
    """The chat for `prompt`: the system message, three (user, assistant) examples, the query."""
    messages = [{"role": "system", "content": SYSTEM_MESSAGE}]
    for caption, reasoning, tracks, background in EXAMPLES:
        frames = [[{"id": i, "name": n, "box": b[f]} for (i, n), b in tracks.items()] for f in range(6)]
        messages += [{"role": "user", "content": f"Caption: {caption}"},
                     {"role": "assistant", "content": Layout(caption, background, frames, reasoning).to_text()}]
    return messages + [{"role": "user", "content": f"Caption: {normalise_prompt(prompt)}"}]


# -----------------------------------------------------------------------------
# 2. the chat call (§2.4, §10.1–§10.2, §10.4)

def resolve_llm(base_url=None, model=None, api_key=None):
    """-> (base_url, model, api_key, configured). Flags win over LVD_LLM_BASE_URL, LVD_LLM_MODEL,
    OPENAI_API_KEY; `configured` is True when a base URL or a key was given."""
    base, key = base_url or os.environ.get("LVD_LLM_BASE_URL"), api_key or os.environ.get("OPENAI_API_KEY")
    model = model or os.environ.get("LVD_LLM_MODEL") or DEFAULT_MODEL
    return (base or DEFAULT_BASE_URL).rstrip("/"), model, key, bool(base or key)


def _retry_after(resp):
    """Retry-After in seconds (delta-seconds or HTTP-date), or None."""
    value = resp.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def chat(messages, base_url=None, model=None, api_key=None, *, temperature=0.25, max_tokens=900,
         timeout=(10.0, 120.0), retries=4, backoff=2.0, max_wait=60.0):
    """POST {base_url}/chat/completions; return choices[0].message.content.

    Connection errors (refused, reset, connect timeout, truncated body), 429 and 5xx are retried
    `retries` times after backoff·2^attempt s or the server's Retry-After, each wait at most
    `max_wait` s (a longer Retry-After raises at once). A read timeout is not retried. Errors:
    401/403 LLMAuthError, 404 LLMNotFound, a 200 without usable JSON LLMBadResponse, else LLMError.
    """
    import requests  # here, not at the top: only a run that calls the LLM needs it (0.05-0.15 s of a start)
    base_url, model, api_key, _ = resolve_llm(base_url, model, api_key)
    url = f"{base_url}/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    payload = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
    for attempt in range(retries + 1):
        wait = min(backoff * 2 ** attempt, max_wait)
        try:
            resp = requests.post(url, json=payload, headers=headers, timeout=timeout)
        except requests.exceptions.ReadTimeout:
            raise LLMError(f"{url}: no reply within the read timeout of {timeout[1]} s") from None
        except requests.RequestException as e:                 # retried
            what, detail = type(e).__name__, str(e)
        else:
            status, detail = resp.status_code, " ".join(resp.text.split())[:200]
            if status in (401, 403):
                raise LLMAuthError(f"{url}: HTTP {status}: the API key is missing or rejected (set "
                                   f"OPENAI_API_KEY or pass the key): {detail}")
            if status == 404:
                raise LLMNotFound(f"{url}: HTTP 404: model {model!r} or the URL is wrong (the base URL "
                                  f"usually ends in /v1): {detail}")
            if status == 200:
                try:
                    content = resp.json()["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    content = None
                if isinstance(content, str):
                    return content
                raise LLMBadResponse(f"{url}: HTTP 200, but the body is not JSON with a text "
                                     f"choices[0].message.content: {detail!r}")
            if status != 429 and status < 500:
                raise LLMError(f"{url}: HTTP {status}: {detail}")
            what, ra = f"HTTP {status}", _retry_after(resp) if status == 429 else None   # retried
            if ra is not None and ra > max_wait:
                raise LLMError(f"{url}: HTTP 429: the server asks to wait {ra:.0f} s (> {max_wait} s)")
            wait = wait if ra is None else ra
        if attempt == retries:
            raise LLMError(f"{url}: {what} after {retries + 1} attempts: {detail}")
        log.warning("%s: %s; retrying in %.1f s", url, what, wait)
        time.sleep(wait)


# -----------------------------------------------------------------------------
# 5. the cache (§2.7, §10.3)

class LayoutCache:
    """Raw LLM replies keyed by (template, model, prompt, sample_index), stored as JSON at `path`.

    path=None keeps it in memory. Each put re-reads the file, merges, and writes atomically, so an
    interrupted run leaves the last valid file. read_only=True refuses puts.
    """

    def __init__(self, path=None, read_only=False):
        self.path, self.read_only = (Path(path) if path else None), read_only
        self.entries = self._read() if self.path and self.path.exists() else {}

    def _read(self):
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
            if d.get("schema") != "lvd-layout-cache/1":
                raise ValueError("no 'schema': 'lvd-layout-cache/1' (an official cache? import_official)")
            return {(e["template"], e["model"], e["prompt"], int(e["sample_index"])): str(e["reply"])
                    for e in d["entries"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CacheError(f"{self.path}: not a layout cache: {e}") from None

    def __len__(self):
        return len(self.entries)

    def get(self, prompt, sample_index=0, model=None, template=None):
        """The raw reply or None; model/template None match any (the first in sorted key order)."""
        p = normalise_prompt(prompt)
        hits = [k for k in self.entries if k[2] == p and k[3] == sample_index
                and model in (None, k[1]) and template in (None, k[0])]
        return self.entries[min(hits)] if hits else None

    def put(self, prompt, sample_index, model, reply, template=TEMPLATE_VERSION):
        if self.read_only:
            raise CacheError(f"{self.path}: this cache is read-only")
        if self.path and self.path.exists():
            self.entries = {**self._read(), **self.entries}
        self.entries[(template, model, normalise_prompt(prompt), int(sample_index))] = reply
        self.save()

    def save(self):
        if self.path is not None:
            rows = [{"template": t, "model": m, "prompt": p, "sample_index": i, "reply": r}
                    for (t, m, p, i), r in sorted(self.entries.items())]
            _atomic_write_json(self.path, {"schema": "lvd-layout-cache/1", "entries": rows})

    def import_official(self, path, model=None, template=OFFICIAL_TEMPLATE_VERSION):
        """Add an official cache {prompt: [reply, ...]} (list position = sample index); returns
        the count. The model defaults to the file name's last '_' field (cache_lvd_v0.1_<model>)."""
        path = Path(path)
        model = model or path.stem.rsplit("_", 1)[-1]
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            items = [(normalise_prompt(p), i, str(r)) for p, rs in d.items() for i, r in enumerate(rs)]
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise CacheError(f"{path}: not an official cache {{prompt: [reply, ...]}}: {e}") from None
        self.entries.update({(template, model, p, i): r for p, i, r in items})
        self.save()
        return len(items)


# -----------------------------------------------------------------------------
# 6. the planner: caches first, then the LLM with a repair loop

def plan(prompt, base_url=None, model=None, api_key=None, cache=None, sample_index=0, max_repairs=2,
         run_dir=None, examples=EXAMPLES_PATH, **chat_options):
    """The Layout for `prompt`: from `cache`, else the shipped examples, else the LLM.

    With an LLM configured the cache must match (TEMPLATE_VERSION, model) exactly; without one any
    template and model is replayed. The examples (read-only; examples=None skips them) match any
    model. A reply that does not parse is sent back with the error, at most `max_repairs` times, then
    PlannerError; the raw replies go on the exception and, if run_dir is given, to a JSON file there.
    Errors: LLMNotConfigured, LLMError (and subclasses), PlannerError; all subclass PlannerError.
    """
    p = normalise_prompt(prompt)
    base_url, model_, api_key, configured = resolve_llm(base_url, model, api_key)
    sources = [(cache, model_ if configured else model, TEMPLATE_VERSION if configured else None)]
    if examples is not None and Path(examples).exists():
        sources.append((LayoutCache(examples, read_only=True), None, None))
    for src, m, t in sources:
        reply = src.get(p, sample_index, m, t) if src is not None else None
        if reply is not None:
            try:
                return parse_layout(reply, p)
            except LayoutError as e:
                log.warning("cached reply for %r in %s does not parse (%s); ignored", p, src.path, e)
    if not configured:
        where = ", ".join(str(s.path or "in memory") for s, _, _ in sources if s is not None) or "none given"
        raise LLMNotConfigured(
            f"no layout for {p!r} (sample {sample_index}) in the caches ({where}), and no LLM is "
            f"configured: set OPENAI_API_KEY (OpenAI's API), or LVD_LLM_BASE_URL or --llm-base-url (any "
            f"OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1); or pass --layout FILE")
    messages = base = build_messages(p)
    replies, errors = [], []
    try:
        for _ in range(max_repairs + 1):
            replies.append(chat(messages, base_url, model_, api_key, **chat_options))
            try:
                layout = parse_layout(replies[-1], p)
            except LayoutError as e:          # only the latest bad reply goes back: a bounded context
                errors.append(str(e))
                messages = base + [
                    {"role": "assistant", "content": replies[-1][:3000]},
                    {"role": "user", "content": f"That answer cannot be used ({e}). Answer again in exactly "
                     "the format of the examples: a 'Reasoning:' line, 'Frame 1:' to 'Frame 6:' lines, "
                     "then a 'Background keyword:' line."}]
                continue
            if cache is not None:
                cache.put(p, sample_index, model_, replies[-1])
            return layout
        raise PlannerError(f"the LLM's replies for {p!r} did not parse after {len(replies)} attempt(s); "
                           f"last error: {errors[-1]}")
    except PlannerError as e:
        saved = None
        if run_dir is not None and replies:
            tag = hashlib.sha1(p.encode()).hexdigest()[:8]
            saved = Path(run_dir) / f"llm_replies_{tag}_{sample_index}.json"
            _atomic_write_json(saved, {"prompt": p, "model": model_, "template": TEMPLATE_VERSION,
                                       "replies": replies, "parse_errors": errors, "error": str(e)})
        raise type(e)(f"{e}" + (f"; raw replies saved to {saved}" if saved else ""), replies, saved) from None
