"""Phrase -> CLIP token positions (`lvd-method.md` §3.1, §3.4): refine rules, plural fallback, suffixes,
whole-token matching, and the 184 benchmark prompts with their released GPT-4 layouts.

Oracle for the benchmark: the official algorithm as §3.4 describes it (regex refine with `inflect`-style
plurals, then a character search in the space-joined token strings), re-implemented here on transformers'
CLIPTokenizer (a test-only reference), compared with attention.resolve_tokens on our tokenizer.
"""
import json
import re
from pathlib import Path

import pytest
from transformers import CLIPTokenizer as HFTokenizer

import attention as A
from text_encoder import CLIPTokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOK_DIR = ROOT / "data" / "clip-tokenizer"


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_pretrained(str(TOK_DIR))


@pytest.fixture(scope="module")
def hf():
    return HFTokenizer(str(TOK_DIR / "vocab.json"), str(TOK_DIR / "merges.txt"))


def test_plural_rules():
    want = {"car": "cars", "cat": "cats", "bird": "birds", "ball": "balls", "dog": "dogs",  # the benchmark classes
            "bus": "buses", "box": "boxes", "fox": "foxes", "church": "churches", "dish": "dishes",
            "puppy": "puppies", "toy": "toys", "man": "men", "woman": "women", "person": "people",
            "child": "children", "mouse": "mice", "fish": "fish", "sheep": "sheep", "leaf": "leaves",
            "Man": "Men", "potato": "potatoes", "horse": "horses", "apple": "apples"}
    assert {w: A.plural(w) for w in want} == want


def test_refine_phrase_rules():
    p = "A realistic lively video of a scene with three moving cars"
    assert A.refine_phrase(p, "moving cars") == "moving cars"  # whole phrase
    assert A.refine_phrase(p, "moving car") == "cars"  # 'car' is not a whole word here; its plural is
    assert A.refine_phrase("two cars and a dog", "car 2") == "cars"  # digits stripped, then plural
    assert A.refine_phrase("a car and a dog", "car 2") == "car"
    assert A.refine_phrase("a dog runs", "walking dog") == "dog"  # last word
    assert A.refine_phrase("a dog runs", "Dog") is None  # case-sensitive, as the official
    assert A.refine_phrase("a hotdog", "dog") is None  # \b: not inside a word


def test_resolve_tokens_suffixes_and_positions(tok):
    p = "A realistic lively video of a scene with three moving cars"
    final, pos, suffixes = A.resolve_tokens(tok, p, "street", ["moving car", "car 1", "car 2"])
    assert final == p + ", street background" and suffixes == [", street background"]
    cars = tok.tokens(final).index("cars</w>") + 1  # index 0 is the start token
    assert pos == [[cars], [cars], [cars]] and cars == 11  # same name -> same positions
    # the official §3.1 example: 'tree' is absent -> '| tree' appended, no space before the bar
    final, pos, suffixes = A.resolve_tokens(tok, "A bear walks from the left to the right", "forest", ["bear", "tree", "tree"])
    assert final == "A bear walks from the left to the right, forest background| tree"
    assert suffixes == [", forest background", "| tree"]  # the second 'tree' finds the first suffix
    assert pos == [[2], [14], [14]]
    assert tok(final)[0, 14].item() == tok.encode("tree")[0]  # position 14 of the 77 ids is 'tree'
    final, pos, suffixes = A.resolve_tokens(tok, "a red ball", "", ["red ball", "ball"])
    assert (final, pos, suffixes) == ("a red ball", [[2, 3], [3]], [])
    final, pos, _ = A.resolve_tokens(tok, "a cat, another cat", "", ["cat"])
    assert pos == [[2]]  # the first occurrence only


def _official_positions(hf, prompt, phrase):
    """The official character-level search (§3.4): join token strings with spaces, find the phrase string."""
    toks, sub = hf.tokenize(prompt), hf.tokenize(phrase)
    s, k = " ".join(toks), " ".join(toks).find(" ".join(sub))
    start = s[:k].count(" ")  # index of the token that contains character k
    return [1 + start + j for j in range(len(sub))]


def test_whole_token_match_does_not_hit_inside_football(tok, hf):
    prompt = "A football and a red ball"
    assert tok.tokens(prompt) == ["a</w>", "football</w>", "and</w>", "a</w>", "red</w>", "ball</w>"]  # one token
    final, pos, _ = A.resolve_tokens(tok, prompt, "", ["ball"])
    assert pos == [[6]]  # the real 'ball'
    assert _official_positions(hf, prompt, "ball") == [2]  # the official search lands on 'football' (§10.7)


def test_prompt_too_long_is_a_clear_error(tok):
    long = " ".join(["word"] * 80) + " dog"
    with pytest.raises(ValueError, match="no tokens within the first 75"):
        A.resolve_tokens(tok, long, "", ["dog"])


# -----------------------------------------------------------------------------
# the 184 benchmark prompts and their released GPT-4 layouts

PLURALS = {"car": "cars", "cat": "cats", "bird": "birds", "ball": "balls", "dog": "dogs"}  # inflect's answers


def _names_and_background(reply):
    """The object names (first occurrence per id, in order) and background keyword of a cached reply."""
    names = {}
    for line in re.findall(r"Frame \d+:\s*(\[.*?\])\s*$", reply, flags=re.M):
        for obj in re.finditer(r"'id':\s*(\d+),\s*'name':\s*'([^']*)'", line):
            names.setdefault(int(obj.group(1)), obj.group(2))
    bg = re.search(r"Background keyword:\s*(.*)", reply).group(1).strip()
    return list(names.values()), bg


def _official_refine(prompt, phrase):
    stripped = phrase.strip("0123456789 ")
    last = stripped.split()[-1]
    assert last in PLURALS, f"oracle plural table lacks {last!r}"
    for cand in (phrase, stripped, last, PLURALS[last]):
        if re.search(r"\b" + re.escape(cand) + r"\b", prompt):
            return cand
    return None


def test_benchmark_prompts_resolve_like_the_official_without_fallback(tok, hf):
    path = SHARED / "data" / "lvd-llm-cache" / "benchmark_gpt-4-1106-preview.json"
    if not SHARED.is_dir():
        pytest.skip("../shared not present (user clone): benchmark layouts unavailable")
    cache = json.loads(path.read_text())
    assert len(cache) == 184
    n_objects = n_replies = 0
    for prompt, replies in cache.items():
        for reply in replies:
            names, bg = _names_and_background(reply)
            final, positions, suffixes = A.resolve_tokens(tok, prompt, bg, names)
            assert final == f"{prompt}, {bg} background" and suffixes == [f", {bg} background"], (prompt, names)
            for name, pos in zip(names, positions):
                refined = _official_refine(final, name)
                assert refined is not None, (prompt, name)  # every benchmark name is in the prompt
                assert pos and pos == _official_positions(hf, final, refined), (prompt, name, pos)
                ids = hf(final)["input_ids"]
                assert hf.convert_ids_to_tokens([ids[p] for p in pos]) == hf.tokenize(refined)
                n_objects += 1
            n_replies += 1
    assert n_replies == 500 and n_objects > 500
