"""The dynamic scene layout: the DSL parser (LLM reply -> frames of boxes) and the `Layout` type with its
keyframe interpolation to video frames.

What to read: `lvd-method.md` §2.1, §2.5–§2.6 (the DSL and its parsing), §3.2–§3.3 (objects, boxes,
interpolation), §10.8 (the official presence bins).

Official implementation: utils/parse.py (`parsed_layout_to_condition`, `interpolate_box`) in
TonyLianLong/LLM-groundedVideoDiffusion @22d90d2.

Differences: see planner.py's docstring (the parser's tolerance and validation, clipping, the presence bins);
the schema of a layout file is there too.

Glossary: N (video frames), k (video frame), i (layout frame, 0…5), q_k (query time of video frame k),
t_i = i/5 (keyframe time), xyxy (normalised corners x0, y0, x1, y1).
"""
import ast
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

CANVAS = 512                          # layout canvas side in pixels (§2.1)
NUM_LAYOUT_FRAMES = 6


class LayoutError(ValueError):
    """A reply or layout file that breaks a DSL rule; `rule` names the rule, `where` the place."""
    def __init__(self, rule, where, detail):
        super().__init__(f"{where}: {rule}: {detail}")
        self.rule, self.where, self.detail = rule, where, detail


class LayoutWarning(UserWarning): """Boxes were clipped to the canvas, or have zero size."""


def atomic_write_json(path, obj):
    """Write a temp file in the same folder, fsync, then os.replace: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)   # mkstemp gives 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -----------------------------------------------------------------------------
# 3. the parser (§2.1, §2.5, §2.6)

_FRAME = re.compile(r"\bframe[ \t]*(\d+)[ \t]*[*_]*[ \t]*:[ \t\n`-]*", re.I)   # the marker and what may follow
_BACKGROUND = re.compile(r"background(?:[ \t]*keyword)?[ \t]*[*_]*[ \t]*:[ \t]*([^\n]*)", re.I)


def _balanced(text, start):
    """The bracketed literal opening at text[start] (quotes respected), or None if it never closes."""
    depth, quote, i = 0, None, start
    while i < len(text):
        c = text[i]
        if quote:
            i += c == "\\"                       # skip the escaped character
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{(" or c in "]})":
            depth += 1 if c in "[{(" else -1
            if depth == 0:
                return text[start:i + 1]
        i += 1
    return None


def _literal(src, where):
    """A Python literal (ast.literal_eval, never eval) or JSON (true/false/null)."""
    if len(src) > 20000:
        raise LayoutError("frame list too long", where, f"{len(src)} characters")
    try:
        return ast.literal_eval(src)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(src)
    except (ValueError, RecursionError):
        raise LayoutError("not a Python or JSON literal", where, src[:80]) from None


def _finite(v):
    return not isinstance(v, bool) and isinstance(v, (int, float)) and abs(v) < 1e9   # also rejects nan, inf


def _check_frames(frames, clip=True):
    """Validate six frames of {'id', 'name' | 'keyword', 'box'} dicts; return clean copies."""
    if not isinstance(frames, (list, tuple)) or len(frames) != NUM_LAYOUT_FRAMES:
        got = len(frames) if isinstance(frames, (list, tuple)) else type(frames).__name__
        raise LayoutError("six frames", "layout", f"expected 6 frames, got {got}")
    names, out, fixed = {}, [], []
    for f, objs in enumerate(frames):
        where, clean = f"Frame {f + 1}", []
        objs = [objs] if isinstance(objs, dict) else objs
        if not isinstance(objs, (list, tuple)) or not all(isinstance(o, dict) for o in objs):
            raise LayoutError("a frame is a list of dicts", where, repr(objs)[:80])
        for o in objs:
            oid, name, box = o.get("id"), o.get("name", o.get("keyword")), o.get("box")
            if isinstance(oid, bool) or not isinstance(oid, int):
                raise LayoutError("integer id", where, repr(o)[:80])
            if not isinstance(name, str) or not name.strip():
                raise LayoutError("name (or keyword) is a non-empty string", where, f"id {oid}")
            if any(c["id"] == oid for c in clean):
                raise LayoutError("one box per id per frame", where, f"id {oid} appears twice")
            if names.setdefault(oid, name.strip()) != name.strip():
                raise LayoutError("an id keeps one name", where, f"id {oid} is {name.strip()!r} here "
                                  f"but {names[oid]!r} earlier")
            if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_finite(v) for v in box):
                raise LayoutError("box is four finite numbers [x, y, w, h]", where, f"id {oid}: {box!r}")
            x, y, w, h = box
            if w < 0 or h < 0:
                raise LayoutError("positive box size", where, f"id {oid}: {list(box)}")
            new = list(box)
            if clip:
                x0, y0 = min(max(x, 0), CANVAS), min(max(y, 0), CANVAS)
                new = [x0, y0, max(min(x + w, CANVAS) - x0, 0), max(min(y + h, CANVAS) - y0, 0)]
            if new != list(box) or 0 in new[2:]:
                fixed.append(f"{where} id {oid} {list(box)} -> {new}")
            clean.append({"id": oid, "name": names[oid], "box": new})
        out.append(clean)
    if fixed:
        warnings.warn(f"{len(fixed)} box(es) clipped to the {CANVAS}x{CANVAS} canvas or of zero size "
                      f"(kept as present): " + "; ".join(fixed), LayoutWarning, stacklevel=3)
    return out


def parse_layout(text, prompt="", *, clip=True):
    """Parse an LLM reply in the DSL of §2.1 into a validated Layout, or raise LayoutError.

    clip=False keeps boxes as written (the official scorer does not clip; evaluate.py uses it).
    """
    if not isinstance(text, str):
        raise LayoutError("reply is text", "reply", type(text).__name__)
    text = re.sub(r"```[\w-]*", "\n", text.replace("\r\n", "\n").replace("\r", "\n")).replace("**", "")
    found = {}
    for m in _FRAME.finditer(text):
        start = m.end()
        if start >= len(text) or text[start] not in "[{(":
            continue                                         # prose, e.g. "in Frame 1: the bear"
        n, where = int(m.group(1)), f"Frame {m.group(1)}"
        if not 1 <= n <= NUM_LAYOUT_FRAMES:
            raise LayoutError("six frames", where, "frames are numbered 1 to 6")
        if n not in found:
            src = _balanced(text, start)
            if src is None:
                raise LayoutError("balanced brackets", where, "the list never closes (truncated reply?)")
            found[n] = (m.start(), start + len(src), _literal(src, where))
    missing = [n for n in range(1, 7) if n not in found]
    if missing:
        raise LayoutError("six frames", "reply", f"no 'Frame {missing[0]}: [...]' (found {len(found)} of 6)")
    bg = _BACKGROUND.search(text, found[6][1]) or _BACKGROUND.search(text)   # after Frame 6 if there
    if bg is None:
        raise LayoutError("background keyword", "reply", "no 'Background keyword:' line")
    reasoning = text[:min(v[0] for v in found.values())].strip()
    reasoning = re.sub(r"^\W*reasoning\W*:", "", reasoning, flags=re.I).strip()
    frames = _check_frames([found[n][2] for n in range(1, 7)], clip=clip)
    return Layout(prompt, bg.group(1).strip(" \t`'\"*."), frames, reasoning)


# -----------------------------------------------------------------------------
# 4. the Layout (§3.2–§3.3)

class Track(NamedTuple):
    id: int
    name: str
    boxes: np.ndarray   # (N, 4) normalised xyxy per video frame, zeros where absent


@dataclass
class Layout:
    """A planned scene: the prompt, the background keyword, six frames of objects, the reasoning."""
    prompt: str
    background: str
    frames: list = field(default_factory=lambda: [[] for _ in range(NUM_LAYOUT_FRAMES)])
    reasoning: str = ""

    def objects(self):
        """[(id, name)] in order of first appearance; the name is the first occurrence's (§3.2)."""
        seen = {}
        for objs in self.frames:
            for o in objs:
                seen.setdefault(o["id"], o["name"])
        return list(seen.items())

    def _keys(self, oid):
        return [(i, o["box"]) for i, objs in enumerate(self.frames) for o in objs if o["id"] == oid]

    def interpolate(self, num_frames, presence="bins"):
        """Per object, a Track(id, name, boxes (N, 4) normalised xyxy) for N video frames.

        Positions (§3.3): layout frame i sits at time t_i = i/5; video frame k is queried at
        q_k = k·(1 − 1e-5)/(N − 1); each normalised corner is linearly interpolated over the
        object's existing keyframes and held at the nearest one outside them (numpy `interp`).
        Presence, presence="bins" (official, kept for parity): frame k is present iff floor(6·q_k)
        is a layout frame that holds the object: six equal time bins, which do NOT match the i/5
        keyframe times (§10.8). presence="nearest": the nearest keyframe round(5·q_k) decides,
        consistent with the positions. Absent frames get [0, 0, 0, 0].
        """
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if presence not in ("bins", "nearest"):
            raise ValueError(f"presence must be 'bins' or 'nearest', got {presence!r}")
        q = np.linspace(0.0, 1.0 - 1e-5, num_frames)                       # q_k
        slot = np.floor(6 * q) if presence == "bins" else np.rint(5 * q)   # layout frame deciding presence
        tracks = []
        for oid, name in self.objects():
            keys = self._keys(oid)
            t = np.array([i / 5 for i, _ in keys])                          # t_i = i/5
            xyxy = np.array([[x, y, x + w, y + h] for _, (x, y, w, h) in keys], float) / CANVAS
            boxes = np.stack([np.interp(q, t, xyxy[:, c]) for c in range(4)], axis=1)  # 4 × (N,) -> (N, 4)
            boxes[~np.isin(slot, [i for i, _ in keys])] = 0.0
            tracks.append(Track(oid, name, boxes))
        return tracks

    object_boxes = interpolate   # the name the guidance code uses

    def to_text(self):
        """The DSL text of §2.1, as an LLM should answer; parse_layout(to_text()) gives self back."""
        lines = [f"Reasoning: {self.reasoning}", ""] if self.reasoning else []
        lines += [f"Frame {i + 1}: {objs!r}" for i, objs in enumerate(self.frames)]
        return "\n".join(lines + [f"Background keyword: {self.background}"])

    def summary(self):
        """A few lines for the console before sampling."""
        objs = self.objects()
        lines = [f"layout for {self.prompt!r}: background {self.background!r}, {len(objs)} object(s)"]
        for oid, name in objs:
            keys = self._keys(oid)
            lines.append(f"  id {oid} {name!r}: frames {','.join(str(i + 1) for i, _ in keys)}; "
                         f"box {keys[0][1]} -> {keys[-1][1]}")
        if self.reasoning:
            r = " ".join(self.reasoning.split())
            lines.append(f"  reasoning: {r[:150]}{'...' if len(r) > 150 else ''}")
        return "\n".join(lines)

    def save(self, path):
        atomic_write_json(Path(path), {"schema": "lvd-layout/1", "prompt": self.prompt,
                                        "background": self.background, "reasoning": self.reasoning,
                                        "frames": self.frames})

    @classmethod
    def load(cls, path):
        """Read and validate a layout file (schema above); LayoutError names the file and rule."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(d, dict) or d.get("schema") != "lvd-layout/1":
                raise ValueError("no 'schema': 'lvd-layout/1' (see the planner.py docstring)")
        except (OSError, ValueError) as e:
            raise LayoutError("a layout JSON file", str(path), str(e)) from None
        try:
            frames = _check_frames(d.get("frames"))
        except LayoutError as e:
            raise LayoutError(e.rule, f"{path}: {e.where}", e.detail) from None
        return cls(*(str(d.get(k, "")) for k in ("prompt", "background")), frames, str(d.get("reasoning", "")))
