"""planner.py: template, parser (on the 1,000 released replies and on random text), Layout, cache, plan().

Oracles: the released GPT-4 / GPT-3.5 replies (../shared), re-parsed by an independent minimal
parser that follows lvd-method.md §2.5 literally; the boxes and presence tables printed in
lvd-method.md §2.3 and §3.3; hand-computed values. HTTP is covered in test_planner_http.py.
"""
import ast
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import planner
from planner import Layout, LayoutCache, LayoutError, LayoutWarning, parse_layout

SHARED = Path(__file__).resolve().parents[2] / "shared"
CACHE_DIR = SHARED / "data" / "lvd-llm-cache"
DEMO = "A bear walks from the left to the right"

BASE = """Reasoning: Two cats; one stays, one walks right.

Frame 1: [{'id': 0, 'name': 'cat', 'box': [0, 300, 100, 80]}, {'id': 1, 'name': 'red cat', 'box': [400, 300, 100, 80]}]
Frame 2: [{'id': 0, 'name': 'cat', 'box': [60, 300, 100, 80]}, {'id': 1, 'name': 'red cat', 'box': [400, 300, 100, 80]}]
Frame 3: [{'id': 0, 'name': 'cat', 'box': [120, 300, 100, 80]}]
Frame 4: []
Frame 5: [{'id': 0, 'name': 'cat', 'box': [240, 300, 100, 80]}, {'id': 1, 'name': 'red cat', 'box': [400, 300, 100, 80]}]
Frame 6: [{'id': 0, 'name': 'cat', 'box': [300, 300, 100, 80]}]
Background keyword: garden"""


def shared_caches():
    if not CACHE_DIR.exists():
        pytest.skip("../shared not present (user clone): released LLM caches unavailable")
    return {f: json.loads((CACHE_DIR / f).read_text()) for f in
            ("benchmark_gpt-4-1106-preview.json", "benchmark_gpt-3.5-turbo.json", "demo_gpt-4-1106-preview.json")}


def quiet_parse(text, prompt="", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayoutWarning)
        return parse_layout(text, prompt, **kw)


def official_parse(text):
    """lvd-method.md §2.5 followed literally (markers, strip, cut at ' - ', leading '-', literal)."""
    markers = [f"Frame {i}:" for i in range(1, 7)] + ["Background keyword:"]
    frames = []
    for i in range(6):
        seg = text[text.index(markers[i]) + len(markers[i]):text.index(markers[i + 1])]
        seg = seg.strip(" \t\n`").split(" - ")[0].lstrip("-")
        frames.append(ast.literal_eval(seg.strip()))     # '# ...' comments are Python comments
    background = text[text.index(markers[6]) + len(markers[6]):].strip(" \t\n`")
    return frames, background


# -----------------------------------------------------------------------------
# template

def test_build_messages_structure_and_normalisation():
    m = planner.build_messages("  A bear walks from the left to the right.  ")
    assert [x["role"] for x in m] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert m[-1]["content"] == f"Caption: {DEMO}"
    sysmsg = m[0]["content"]
    for needle in ("six frames", "two frames per second", "512x512", "[0, 0]", "[512, 512]",
                   "[top-left x, top-left y, width, height]", "same id", "Background keyword", "'id'"):
        assert needle in sysmsg, needle
    assert planner.TEMPLATE_VERSION != planner.OFFICIAL_TEMPLATE_VERSION
    with pytest.raises(ValueError, match="empty"):
        planner.build_messages("  . ")


def test_in_context_examples_follow_the_spec_table():
    m = planner.build_messages(DEMO)
    captions = [x["content"] for x in m[1:7:2]]
    assert captions == ["Caption: A woman walking from the left to the right and a man jumping on the right in a room",
                        "Caption: A red ball is thrown from the left to the right in a garden",
                        "Caption: The camera is moving away from a painting"]
    layouts = [parse_layout(x["content"]) for x in m[2:8:2]]       # the examples must parse cleanly
    assert [lay.background for lay in layouts] == ["room", "garden", "room"]
    tracks = {(n, name): [o["box"] for f in lay.frames for o in f if o["id"] == i]
              for n, lay in enumerate(layouts) for i, name in lay.objects()}
    # lvd-method.md §2.3, typed from the table
    assert tracks[(0, "walking woman")] == [[x, 270, 120, 200] for x in (0, 50, 100, 150, 200, 250)]
    assert tracks[(0, "jumping man")] == [[380, 290, 120, 180], [380, 205, 120, 200], [380, 175, 120, 200],
                                          [380, 175, 120, 200], [380, 205, 120, 200], [380, 290, 120, 180]]
    assert tracks[(1, "red ball")] == [[0, 206, 50, 50], [80, 246, 50, 50], [160, 326, 50, 50],
                                       [240, 446, 50, 50], [320, 366, 50, 50], [400, 446, 50, 50]]
    assert tracks[(2, "painting")] == [[156, 181, 200, 150], [166, 189, 180, 135], [176, 196, 160, 120],
                                       [186, 204, 140, 105], [196, 211, 120, 90], [206, 219, 100, 75]]
    assert all(x["content"].startswith("Reasoning: ") for x in m[2:8:2])


# -----------------------------------------------------------------------------
# the released replies

def test_all_released_replies_parse_and_match_the_official_reading():
    n = 0
    for name, cache in shared_caches().items():
        for prompt, replies in cache.items():
            for reply in replies:
                layout = quiet_parse(reply, prompt=prompt, clip=False)
                frames, background = official_parse(reply)
                assert layout.background == background, (prompt, background)
                for ours, theirs in zip(layout.frames, frames):
                    assert [(o["id"], o["name"], o["box"]) for o in ours] == \
                           [(o["id"], o.get("name", o.get("keyword")), list(o["box"])) for o in theirs]
                assert layout.reasoning and not layout.reasoning.startswith("Reasoning")
                n += 1
    assert n == 1001    # 500 + 500 + the demo


def test_released_out_of_canvas_boxes_are_clipped_with_one_warning():
    reply = shared_caches()["demo_gpt-4-1106-preview.json"][DEMO][0]
    with pytest.warns(LayoutWarning, match=r"Frame 6 id 0 \[425, 256, 100, 100\] -> \[425, 256, 87, 100\]"):
        layout = parse_layout(reply, DEMO)
    assert layout.frames[5][0]["box"] == [425, 256, 87, 100]
    assert layout.background == "forest"


# -----------------------------------------------------------------------------
# tolerance and validation

def _variants():
    json_base = BASE.replace("'", '"')
    return {
        "fences": "```\n" + BASE + "\n```",
        "python fence": "Sure! Here it is:\n```python\n" + BASE + "\n```\nHope this helps.",
        "crlf": BASE.replace("\n", "\r\n"),
        "keyword key": BASE.replace("'name'", "'keyword'"),
        "hash comments": BASE.replace("80]}]\n", "80]}]  # a comment, with [brackets]\n"),
        "dash comments": BASE.replace("80]}]\n", "80]}] - the cat moves\n"),
        "json": json_base,
        "bold markers": re.sub(r"(Frame \d:|Background keyword:)", r"**\1**", BASE),
        "bullets": BASE.replace("Frame ", "- Frame "),
        "lower case": BASE.replace("Frame ", "frame ").replace("Background keyword", "background keyword"),
        "prose mention": BASE.replace("Reasoning: ", "Reasoning: In Frame 1: the cats sit. "),
        "blank lines": BASE.replace("\n", "\n\n"),
        "tuple boxes": BASE.replace("[0, 300, 100, 80]", "(0, 300, 100, 80)"),
        "quoted background": BASE.replace("garden", "'garden'."),
        "multi-line frame": BASE.replace("}, {", "},\n    {"),
        "background in prose": BASE.replace("Reasoning: ", "Reasoning: The background: unclear. "),
        "repeated answer": BASE + "\n\n" + BASE.replace("garden", "beach").replace("[0, 300", "[7, 300"),
    }


@pytest.mark.parametrize("kind", list(_variants()))
def test_parser_tolerates_real_output_quirks(kind):
    expected = parse_layout(BASE)
    got = parse_layout(_variants()[kind])
    assert got.frames == expected.frames
    assert got.background == "garden"


def test_parser_accepts_a_bare_dict_per_frame():
    text = BASE.replace("Frame 6: [{'id': 0, 'name': 'cat', 'box': [300, 300, 100, 80]}]",
                        "Frame 6: {'id': 0, 'name': 'cat', 'box': [300, 300, 100, 80]}")
    assert parse_layout(text).frames[5] == [{"id": 0, "name": "cat", "box": [300, 300, 100, 80]}]


@pytest.mark.parametrize("mutate, rule, where", [
    (lambda t: t.replace("Frame 6:", "Frame six:"), "six frames", "reply"),
    (lambda t: t.replace("Background keyword: garden", "Frame 7: []\nBackground keyword: garden"), "six frames", "Frame 7"),
    (lambda t: t.replace("Frame 3: [{'id'", "Frame 3: [{'id' 0, 'x'"), "not a Python or JSON literal", "Frame 3"),
    (lambda t: t.replace("Frame 2: [{'id': 0, ", "Frame 2: [{"), "integer id", "Frame 2"),
    (lambda t: t.replace("Frame 5: [{'id': 0, 'name': 'cat'", "Frame 5: [{'id': 0, 'name': 'dog'"),
     "an id keeps one name", "Frame 5"),
    (lambda t: t.replace("[240, 300, 100, 80]", "[240, 300, 100]"), "box is four finite numbers [x, y, w, h]", "Frame 5"),
    (lambda t: t.replace("[240, 300, 100, 80]", "[240, 300, '100', 80]"), "box is four finite numbers [x, y, w, h]", "Frame 5"),
    (lambda t: t.replace("[240, 300, 100, 80]", "[240, 300, 1e999, 80]"), "box is four finite numbers [x, y, w, h]", "Frame 5"),
    (lambda t: t.replace("[240, 300, 100, 80]", "[240, 300, -10, 80]"), "positive box size", "Frame 5"),
    (lambda t: t.replace("Background keyword: garden", ""), "background keyword", "reply"),
    (lambda t: t.replace("Frame 6: [{'id': 0, 'name': 'cat', 'box': [300, 300, 100, 80]}]",
                         "Frame 6: [{'id': 0, 'name': 'cat', 'box': [300, 300,"), "balanced brackets", "Frame 6"),
    (lambda t: t.replace("Frame 3: [{'id': 0, 'name': 'cat', 'box': [120, 300, 100, 80]}]",
                         "Frame 3: [{'id': 0, 'name': 'cat', 'box': [1, 1, 1, 1]}, {'id': 0, 'name': 'cat', "
                         "'box': [9, 9, 9, 9]}]"), "one box per id per frame", "Frame 3"),
    (lambda t: t.replace("'name': 'red cat', 'box': [400, 300, 100, 80]}]\nFrame 2",
                         "'name': '  ', 'box': [400, 300, 100, 80]}]\nFrame 2"), "name (or keyword) is a non-empty string", "Frame 1"),
    (lambda t: t.replace("Frame 4: []", "Frame 4: [1, 2]"), "a frame is a list of dicts", "Frame 4"),
])
def test_parser_errors_name_the_rule_and_the_place(mutate, rule, where):
    with pytest.raises(LayoutError) as info:
        quiet_parse(mutate(BASE))
    assert (info.value.rule, info.value.where) == (rule, where)
    assert str(info.value).startswith(f"{where}: {rule}")


def test_clipping_and_zero_size_boxes():
    text = BASE.replace("[300, 300, 100, 80]", "[450, -20, 100, 80]").replace("[240, 300, 100, 80]", "[512, 231, 0, 0]")
    with pytest.warns(LayoutWarning, match="2 box"):
        layout = parse_layout(text)
    assert layout.frames[5][0]["box"] == [450, 0, 62, 60]      # x1 = min(550, 512), y0 = 0, y1 = 60
    assert layout.frames[4][0]["box"] == [512, 231, 0, 0]      # zero size: kept as present
    raw = quiet_parse(text, clip=False)
    assert raw.frames[5][0]["box"] == [450, -20, 100, 80]


def test_non_text_input():
    with pytest.raises(LayoutError, match="reply is text"):
        parse_layout(None)


# -----------------------------------------------------------------------------
# Layout: interpolation (§3.3), boxes, summary, files

def _one_object(present, box=lambda i: [100 * i, 0, 50, 64]):
    frames = [[{"id": 0, "name": "dog", "box": box(i)}] if i in present else [] for i in range(6)]
    return Layout("p", "park", frames)


@pytest.mark.parametrize("n, bins", [
    (16, [(0, 2), (3, 5), (6, 7), (8, 10), (11, 12), (13, 15)]),     # lvd-method.md §3.3 table
    (24, [(0, 3), (4, 7), (8, 11), (12, 15), (16, 19), (20, 23)]),
])
def test_presence_bins_match_the_spec_table(n, bins):
    for i, (a, b) in enumerate(bins):
        (track,) = _one_object({i}).interpolate(n)
        present = np.flatnonzero(track.boxes.any(axis=1)).tolist()
        assert present == list(range(a, b + 1)), (i, present)


def test_positions_keyframes_hold_and_absent_frames():
    (track,) = _one_object(set(range(6))).interpolate(16)
    for i in range(6):     # keyframe i lands on video frame 3i, to within 1e-5 of the time axis
        # measured 9.8e-6 (the 1e-5 of the time axis, deterministic); atol 1e-4 = 10x
        np.testing.assert_allclose(track.boxes[3 * i], np.array([100 * i, 0, 100 * i + 50, 64]) / 512, atol=1e-4)
    # measured 6.5e-7; atol 1e-4 = 150x
    np.testing.assert_allclose(track.boxes[1], [100 / 3 / 512, 0, (100 / 3 + 50) / 512, 0.125], atol=1e-4)
    (late,) = _one_object({3, 4, 5}).interpolate(16)                 # §3.3 example: frames 8–15
    assert np.flatnonzero(late.boxes.any(axis=1)).tolist() == list(range(8, 16))
    assert not late.boxes[:8].any()
    np.testing.assert_allclose(late.boxes[8], np.array([300, 0, 350, 64]) / 512)  # measured 0; held before keyframe 3
    (one,) = _one_object({0}).interpolate(1)
    np.testing.assert_allclose(one.boxes, [[0, 0, 50 / 512, 0.125]])  # measured 0


def test_nearest_presence_option_and_bad_arguments():
    (track,) = _one_object({3, 4, 5}).interpolate(16, presence="nearest")
    # round(5 q_k) >= 3  <=>  q_k >= 0.5  <=>  k >= 7.5
    assert np.flatnonzero(track.boxes.any(axis=1)).tolist() == list(range(8, 16))
    (track,) = _one_object({0, 1}).interpolate(16, presence="nearest")
    assert np.flatnonzero(track.boxes.any(axis=1)).tolist() == list(range(0, 5))   # q_k < 0.3 <=> k <= 4
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            _one_object({0}).interpolate(bad)
    with pytest.raises(ValueError):
        _one_object({0}).interpolate(16, presence="linear")


def test_object_boxes_ids_names_from_first_occurrence():
    layout = parse_layout(BASE)
    tracks = layout.object_boxes(6)
    assert [(t.id, t.name) for t in tracks] == [(0, "cat"), (1, "red cat")]
    tid, name, boxes = tracks[1]
    assert boxes.shape == (6, 4) and boxes.dtype == np.float64
    np.testing.assert_allclose(boxes[0], [400 / 512, 300 / 512, 500 / 512, 380 / 512])  # measured 0
    assert not boxes[2].any() and not boxes[3].any()    # absent in frames 3 and 4 (1-based)
    assert layout.objects() == [(0, "cat"), (1, "red cat")]


def test_summary_and_text_round_trip():
    layout = parse_layout(BASE, "two cats")
    s = layout.summary()
    assert "two cats" in s and "garden" in s and "'red cat'" in s and "frames 1,2,5" in s
    assert parse_layout(layout.to_text(), "two cats") == layout


def test_layout_save_load_round_trip_and_errors(tmp_path):
    layout = parse_layout(BASE, "two cats")
    path = tmp_path / "sub" / "layout.json"
    layout.save(path)
    assert Layout.load(path) == layout
    assert json.loads(path.read_text())["schema"] == "lvd-layout/1"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LayoutError, match="bad.json"):
        Layout.load(bad)
    bad.write_text('{"frames": []}')
    with pytest.raises(LayoutError, match="lvd-layout/1"):
        Layout.load(bad)
    d = json.loads(path.read_text())
    d["frames"][2][0]["box"] = [1, 2, 3]
    bad.write_text(json.dumps(d))
    with pytest.raises(LayoutError, match=r"bad.json: Frame 3: box is four"):
        Layout.load(bad)
    with pytest.raises(LayoutError, match="bad.json"):
        Layout.load(tmp_path / "missing" / "bad.json")


# -----------------------------------------------------------------------------
# cache

def test_cache_keys_round_trip_and_read_only(tmp_path):
    path = tmp_path / "cache.json"
    cache = LayoutCache(path)
    cache.put("A dog.", 0, "m1", "reply-a")
    cache.put("A dog", 1, "m1", "reply-b")
    cache.put("A dog", 0, "m2", "reply-c", template="t0")
    again = LayoutCache(path)
    assert len(again) == 3
    assert again.get("A dog", 0, "m1", planner.TEMPLATE_VERSION) == "reply-a"
    assert again.get("A dog", 1, "m1", planner.TEMPLATE_VERSION) == "reply-b"
    assert again.get("A dog", 0, "m2", planner.TEMPLATE_VERSION) is None
    assert again.get("A dog", 0, "m2") == "reply-c"
    assert again.get("A dog", 2) is None and again.get("A cat") is None
    assert len(again) == 3                                           # a miss inserts nothing
    other = LayoutCache(path)                                        # two writers: put merges the file
    cache.put("A cat", 0, "m1", "reply-d")
    other.put("A cow", 0, "m1", "reply-e")
    assert {k[2] for k in LayoutCache(path).entries} == {"A dog", "A cat", "A cow"}
    with pytest.raises(planner.CacheError, match="read-only"):
        LayoutCache(path, read_only=True).put("x", 0, "m", "r")
    path.write_text("[1, 2")
    with pytest.raises(planner.CacheError, match="cache.json"):
        LayoutCache(path)


def test_import_official_format():
    shared_caches()
    cache = LayoutCache()
    assert cache.import_official(CACHE_DIR / "benchmark_gpt-4-1106-preview.json") == 500
    assert len({k[2] for k in cache.entries}) == 184
    assert {(k[0], k[1]) for k in cache.entries} == {("v0.1", "gpt-4-1106-preview")}
    p = "A realistic lively video of a scene with one moving car"
    assert cache.get(p, 4, "gpt-4-1106-preview", "v0.1") is not None and cache.get(p, 5) is None
    with pytest.raises(planner.CacheError, match="official"):
        cache.import_official(Path(__file__))


@pytest.mark.parametrize("fail_at", ["dump", "replace"])
def test_interrupted_write_leaves_the_cache_valid(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "cache.json"
    cache = LayoutCache(path)
    cache.put("A dog", 0, "m", "first")
    before = path.read_bytes()
    if fail_at == "dump":
        def dump(obj, f, **kw):                       # write half the file, then "crash"
            text = json.dumps(obj, **kw)
            f.write(text[:len(text) // 2])
            raise KeyboardInterrupt("interrupted mid-write")
        monkeypatch.setattr(planner.json, "dump", dump)
    else:
        def replace(*a):
            raise OSError("disk full")
        monkeypatch.setattr(planner.os, "replace", replace)
    with pytest.raises((KeyboardInterrupt, OSError)):
        cache.put("A cat", 0, "m", "second")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert LayoutCache(path).get("A dog") == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]     # no temp file left behind


# -----------------------------------------------------------------------------
# plan(): caches and the no-LLM path (the HTTP path is in test_planner_http.py)

@pytest.fixture
def no_llm_env(monkeypatch):
    for var in ("OPENAI_API_KEY", "LVD_LLM_BASE_URL", "LVD_LLM_MODEL"):
        monkeypatch.delenv(var, raising=False)


def test_shipped_examples_hold_the_demo_and_released_replies(no_llm_env):
    examples = LayoutCache(planner.EXAMPLES_PATH, read_only=True)
    assert 6 <= len(examples) <= 10
    with pytest.warns(LayoutWarning, match="Frame 6"):      # the released demo box crosses the canvas edge
        layout = planner.plan(DEMO + ".")
    assert layout.background == "forest" and layout.objects() == [(0, "bear")]
    if CACHE_DIR.exists():     # every shipped reply is a released GPT-4 reply, byte for byte
        released = LayoutCache()
        released.import_official(CACHE_DIR / "benchmark_gpt-4-1106-preview.json")
        released.import_official(CACHE_DIR / "demo_gpt-4-1106-preview.json")
        assert all(released.entries[k] == r for k, r in examples.entries.items())
    for (_, _, prompt, i) in examples.entries:
        assert isinstance(quiet_parse(examples.get(prompt, i)), Layout)


def test_unknown_prompt_without_llm_says_how_to_configure(no_llm_env, tmp_path):
    with pytest.raises(planner.LLMNotConfigured) as info:
        planner.plan("A cow jumps over the moon", cache=LayoutCache(tmp_path / "c.json"))
    msg = str(info.value)
    for needle in ("A cow jumps over the moon", "OPENAI_API_KEY", "LVD_LLM_BASE_URL", "--layout", "c.json"):
        assert needle in msg
    assert isinstance(info.value, planner.PlannerError)
    with pytest.raises(planner.LLMNotConfigured):        # sample 1 of the demo is not shipped
        planner.plan(DEMO, sample_index=1)


def test_user_cache_is_read_first_and_needs_no_network(no_llm_env, monkeypatch):
    cache = LayoutCache()
    cache.put("A cat", 0, "some-model", BASE)
    assert planner.plan("A cat", cache=cache).background == "garden"          # replay: any model
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    # configured: the exact (template, model) entry is used, without touching the (closed) server
    layout = planner.plan("A cat", base_url="http://127.0.0.1:9/v1", model="some-model", cache=cache)
    assert layout.objects() == [(0, "cat"), (1, "red cat")]


# -----------------------------------------------------------------------------
# property tests

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400) | st.text(alphabet="Frame123456:[]{}()'\"#-`*,. \n\r0x{idnamebox}", max_size=400))
def test_parse_arbitrary_text_returns_a_layout_or_raises_layout_error(text):
    try:
        layout = quiet_parse(text)
    except LayoutError:
        return
    assert isinstance(layout, Layout) and len(layout.frames) == 6


def _real_reply():
    if CACHE_DIR.exists():
        cache = json.loads((CACHE_DIR / "benchmark_gpt-3.5-turbo.json").read_text())
        return [r for rs in cache.values() for r in rs][::25]
    return [BASE]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_mutated_real_replies_returns_a_layout_or_raises_layout_error(data):
    replies = _real_reply()
    text = data.draw(st.sampled_from(replies))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["delete", "insert", "replace", "cut"]))
        piece = data.draw(st.sampled_from(["[", "]", "{", "}", "'", '"', ",", "-", "#", "0", "-5", "1e999",
                                           "Frame 3:", "Frame 9:", "\n", "nan", "None", "True", "'box'", "x"]))
        text = {"delete": text[:i] + text[i + 3:], "insert": text[:i] + piece + text[i:],
                "replace": text[:i] + piece + text[i + len(piece):], "cut": text[:i]}[op]
    try:
        layout = quiet_parse(text)
    except LayoutError:
        return
    assert len(layout.frames) == 6
    for frame in layout.frames:
        for o in frame:
            x, y, w, h = o["box"]
            assert 0 <= x <= 512 and 0 <= y <= 512 and 0 <= w and 0 <= h and x + w <= 512 and y + h <= 512


_boxes = st.lists(st.integers(-100, 700), min_size=4, max_size=4).map(lambda b: [b[0], b[1], abs(b[2]), abs(b[3])])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 3), _boxes), max_size=3), min_size=6, max_size=6),
       st.sampled_from(["forest", "city street", "ocean"]))
def test_generated_layouts_round_trip_through_text(frames, background):
    frames = [[{"id": i, "name": f"thing {i}", "box": b} for i, b in dict(f).items()] for f in frames]
    layout = Layout("p", background, quiet_parse(Layout("p", background, frames).to_text()).frames, "r")
    assert quiet_parse(layout.to_text(), "p") == layout
    for track in layout.interpolate(16):
        assert track.boxes.shape == (16, 4) and np.all((track.boxes >= 0) & (track.boxes <= 1))
