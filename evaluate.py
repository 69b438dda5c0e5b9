"""Stage-one benchmark: the 500 prompts, the rule-based predicates, and layout accuracy per category.

What to read: `lvd-method.md` §7.1 (prompts), §7.2 (predicates), §7.3 (stage-1 scoring), §8.1 (the
numbers: GPT-4 100/100/100/100/88, overall 97.6; GPT-3.5 100/100/100/73/15, overall 77.6).

Official implementation: utils/eval/lvd.py (prompt generation), utils/eval/utils.py (predicates,
`get_box`), scripts/eval_stage_one.py in TonyLianLong/LLM-groundedVideoDiffusion @22d90d2.

Differences:
- No `inflect`: `article`, `number_word` and `plural` are small rules, tested on the released set.
- The seeded draws use a local legacy `np.random.RandomState(seed)` (same stream as `np.random.seed`,
  no global state).
- Quirks kept for comparable numbers (§7.2, §10.17): a box is "valid" iff its x_max and y_max are
  both non-zero; numeracy counts the valid boxes of all objects whatever their names; visibility
  ignores frames 2–3; layouts are converted 6 -> 6 frames with the official interpolation and
  presence rule, and with boxes as written (parse_layout(clip=False): the official scorer does not
  clip, and clipping can move a box centre across a comparison).
- A live run re-asks the LLM on a parse failure (planner.plan's repair loop); a reply that never
  parses, or an LLM error for that prompt, counts as a failure and is listed.

Glossary: n (number of objects), c (colour), o (class), l1/l2 (directions), L1–L3 (quadrants),
xc/yc (normalised box centre), "valid" (x_max ≠ 0 and y_max ≠ 0).

CLI:  python evaluate.py --cache FILE [--llm-model M]                   (score a cache, no network)
      python evaluate.py --llm-base-url URL --llm-model M [--limit N] [--cache FILE] [--run-dir DIR]
"""
import argparse
import json
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import planner

CATEGORIES = ("numeracy", "attribution", "visibility", "dynamics", "sequential")
PREFIX = "A realistic lively video of a scene"
PREFIX_TOP_DOWN = "A realistic lively video of a top-down viewed scene"
CLASSES = (("moving car", "car"), ("lively cat", "cat"), ("flying bird", "bird"),
           ("moving ball", "ball"), ("walking dog", "dog"))      # (attributed, plain), in order
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")
SEQUENCES = (("lower left", "lower right", "upper right"), ("lower left", "upper left", "upper right"),
             ("lower right", "lower left", "upper left"), ("lower right", "upper right", "upper left"))


# -----------------------------------------------------------------------------
# English without inflect (§10.18)

def article(word):
    """'a' or 'an' for `word`, by its first letter (enough for the benchmark's words: 'an orange')."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def number_word(n):
    """0 -> 'zero' … 10 -> 'ten'."""
    return ("zero one two three four five six seven eight nine ten".split())[n]


def plural(phrase):
    """Plural of the last word of `phrase`: 'moving car' -> 'moving cars', 'box' -> 'boxes',
    'fly' -> 'flies', 'day' -> 'days'."""
    head, _, word = phrase.rpartition(" ")
    if word.endswith(("s", "x", "z", "ch", "sh")):
        word += "es"
    elif word.endswith("y") and word[-2:-1] not in tuple("aeiou"):
        word = word[:-1] + "ies"
    else:
        word += "s"
    return f"{head} {word}" if head else word


def with_article(word):
    return f"{article(word)} {word}"


# -----------------------------------------------------------------------------
# the 500 prompts (§7.1)

@dataclass(frozen=True)
class Instance:
    index: int           # 0…499, also the generation seed (§5)
    category: str
    prompt: str          # as stored in the caches: trailing '.' stripped
    spec: dict = field(hash=False, compare=False)   # what the predicate checks


def benchmark_instances():
    """The 500 benchmark instances in official order (184 distinct prompts)."""
    rows = []
    for n in range(1, 5):                                                     # numeracy, 0–99
        for attributed, plain in CLASSES:
            name = attributed if n == 1 else plural(attributed)
            rows += [("numeracy", f"{PREFIX} with {number_word(n)} {name}", {"n": n})] * 5
    plain_classes = [p for _, p in CLASSES]
    for s in range(100):                                                      # attribution, 100–199
        rng = np.random.RandomState(s)
        c1, c2 = rng.choice(COLOURS, 2, replace=False)
        o1, o2 = rng.choice(plain_classes, 2, replace=False)
        rows.append(("attribution", f"{PREFIX} with {with_article(f'{c1} {o1}')} and "
                     f"{with_article(f'{c2} {o2}')}", {"names": [f"{c1} {o1}", f"{c2} {o2}"]}))
    for attributed, plain in CLASSES:                                         # visibility, 200–299
        for half in ("second", "first"):
            rows += [("visibility", f"{PREFIX} in which {with_article(attributed)} appears only in the "
                      f"{half} half of the video", {"name": plain, "half": half})] * 10
    for _, plain in CLASSES:                                                  # dynamics 1 object, 300–349
        for l1, l2 in (("left", "right"), ("right", "left")):
            rows += [("dynamics", f"{PREFIX} with {with_article(plain)} moving from the {l1} to the {l2}",
                      {"names": [plain], "left_to_right": l1 == "left"})] * 5
    for s in range(25):                                                       # dynamics 2 objects, 350–399
        rng = np.random.RandomState(s)
        for l1, l2 in (("left", "right"), ("right", "left")):
            o1, o2 = rng.choice(plain_classes, 2, replace=False)
            rows.append(("dynamics", f"{PREFIX} with {with_article(o1)} moving from the {l1} of "
                         f"{with_article(o2)} to its {l2}", {"names": [o1, o2], "left_to_right": l1 == "left"}))
    for _, plain in CLASSES:                                                  # sequential, 400–499
        for L1, L2, L3 in SEQUENCES:
            prompt = (f"{PREFIX_TOP_DOWN} in which {with_article(plain)} initially on the {L1} of the scene. "
                      f"It first moves to the {L2} of the scene and then moves to the {L3} of the scene.")
            rows += [("sequential", planner.normalise_prompt(prompt), {"name": plain, "where": [L1, L2, L3]})] * 5
    return [Instance(i, c, p, s) for i, (c, p, s) in enumerate(rows)]


# -----------------------------------------------------------------------------
# the predicates (§7.2), on per-object normalised xyxy boxes for 6 frames

def _valid(box):
    return box[2] != 0 and box[3] != 0        # official: "w, h" are x_max, y_max (a quirk)


def _xc(box):
    return (box[0] + box[2]) / 2


def _find(tracks, name):
    """The first track whose phrase (digits and spaces stripped from its ends) matches `name`."""
    for t in tracks:
        phrase = t.name.strip("0123456789 ")
        if name + " " in phrase or phrase.endswith(name):
            return t.boxes
    return None


def check(inst, layout):
    """True iff the layout satisfies the instance's predicate (§7.2)."""
    return bool(_check(inst, layout))


def _check(inst, layout):
    tracks, s = layout.interpolate(6), inst.spec          # 6 -> 6 frames, official presence rule
    if inst.category == "numeracy":                        # names are not filtered (official)
        counts = [sum(_valid(t.boxes[f]) for t in tracks) for f in range(6)]
        return int(np.bincount(counts).argmax()) == s["n"]   # the mode; ties -> the smaller count
    if inst.category == "attribution":
        boxes = [_find(tracks, n) for n in s["names"]]
        return all(b is not None and sum(_valid(x) for x in b) >= 3 for b in boxes)   # >= 50 % of 6
    if inst.category == "visibility":
        b = _find(tracks, s["name"])
        if b is None:
            return False
        seen_first, seen_second = _valid(b[0]) or _valid(b[1]), _valid(b[4]) or _valid(b[5])
        return (not seen_first and seen_second) if s["half"] == "second" else (seen_first and not seen_second)
    if inst.category == "dynamics":
        boxes = [_find(tracks, n) for n in s["names"]]
        if any(b is None or not (_valid(b[0]) and _valid(b[5])) for b in boxes):
            return False

        def verify(a, b):                                  # a is on the l1 side of b
            return _xc(a) < _xc(b) if s["left_to_right"] else _xc(a) > _xc(b)
        if len(boxes) == 1:
            return verify(boxes[0][0], boxes[0][5])
        o1, o2 = boxes
        return verify(o1[0], o2[0]) and verify(o2[5], o1[5])
    if inst.category == "sequential":
        b = _find(tracks, s["name"])
        if b is None:
            return False
        for f, where in zip((0, 3, 5), s["where"]):        # frames 0, 6 // 2, 5
            vert, horiz = where.split()
            xc, yc = _xc(b[f]), (b[f][1] + b[f][3]) / 2
            ok_y = yc > 0.5 if vert == "lower" else yc < 0.5   # strict: a centre on 0.5 is in no quadrant
            ok_x = xc < 0.5 if horiz == "left" else xc > 0.5
            if not (_valid(b[f]) and ok_y and ok_x):
                return False
        return True
    raise ValueError(f"unknown category {inst.category!r}")


# -----------------------------------------------------------------------------
# scoring

def score(instances, replies):
    """replies: per instance a raw reply or an error string prefixed 'ERROR: '. -> (table, failures)."""
    table = {c: [0, 0] for c in CATEGORIES}
    failures = []
    for inst, reply in zip(instances, replies):
        table[inst.category][1] += 1
        if reply is None or reply.startswith("ERROR: "):
            failures.append((inst.index, reply or "missing from the cache"))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", planner.LayoutWarning)
                ok = check(inst, planner.parse_layout(reply, inst.prompt, clip=False))
        except planner.LayoutError as e:
            ok = False
            failures.append((inst.index, f"does not parse: {e}"))
        table[inst.category][0] += ok
    return table, failures


def format_table(table):
    lines = [f"{'category':<12} {'correct':>7} {'total':>5} {'accuracy':>8}"]
    for c, (ok, n) in table.items():
        lines.append(f"{c:<12} {ok:>7} {n:>5} {100 * ok / max(n, 1):>7.1f}%")
    ok, n = sum(v[0] for v in table.values()), sum(v[1] for v in table.values())
    lines.append(f"{'overall':<12} {ok:>7} {n:>5} {100 * ok / max(n, 1):>7.1f}%")
    rates = "/".join(f"{100 * v[0] / v[1]:g}" for v in table.values() if v[1])
    return "\n".join(lines + [f"{'/'.join(c for c, v in table.items() if v[1])}: {rates}, "
                              f"overall {100 * ok / max(n, 1):.1f}"])


def open_cache(path, model=None):
    """A LayoutCache from our format or an official {prompt: [reply, ...]} file, and the
    (template, model) to score: the only pair in the file, or the one whose model is `model`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and "schema" not in data:
        cache = planner.LayoutCache()
        cache.import_official(path, model=model)
    else:
        cache = planner.LayoutCache(path)
    pairs = sorted({(t, m) for t, m, _, _ in cache.entries if model in (None, m)})
    if len(pairs) != 1:
        raise planner.CacheError(f"{path}: holds (template, model) pairs {pairs or 'none matching'}; "
                                 f"choose one with --llm-model")
    return cache, pairs[0]


def sample_indices():
    """Per instance of the 500, its sample index: the k-th occurrence of a prompt reads the k-th reply (§2.7)."""
    seen, out = Counter(), []
    for inst in benchmark_instances():
        out.append(seen[inst.prompt])
        seen[inst.prompt] += 1
    return out


def select(instances, limit):
    """`limit` instances spread evenly over the 500 (every 500/limit-th), all of them if None."""
    if limit is None or limit >= len(instances):
        return instances
    return [instances[round(i * len(instances) / limit)] for i in range(limit)]


def run(args):
    instances = select(benchmark_instances(), args.limit)
    samples = sample_indices()
    keys = [(inst, samples[inst.index]) for inst in instances]
    if args.llm_base_url is None:
        cache, (template, model) = open_cache(args.cache, args.llm_model)
        replies = [cache.get(i.prompt, k, model, template) for i, k in keys]
        source = f"{args.cache} ({model}, template {template})"
    else:
        cache = planner.LayoutCache(args.cache) if args.cache else planner.LayoutCache()
        replies = []
        for n, (inst, k) in enumerate(keys):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", planner.LayoutWarning)
                    planner.plan(inst.prompt, args.llm_base_url, args.llm_model, args.llm_api_key, cache=cache,
                                 sample_index=k, max_repairs=args.max_repairs, run_dir=args.run_dir,
                                 examples=None, timeout=(10.0, args.timeout))
                replies.append(cache.get(inst.prompt, k, args.llm_model, planner.TEMPLATE_VERSION))
            except (planner.LLMAuthError, planner.LLMNotFound):
                raise
            except planner.PlannerError as e:
                replies.append(f"ERROR: {e}")
            print(f"[{n + 1}/{len(keys)}] {inst.category}: {'ok' if not replies[-1].startswith('ERROR') else 'failed'}",
                  file=sys.stderr)
        source = f"{args.llm_base_url} ({args.llm_model}, template {planner.TEMPLATE_VERSION})"
    table, failures = score(instances, replies)
    print(f"stage-one layout accuracy, {len(instances)} instances, {source}")
    print(format_table(table))
    for index, why in failures:
        print(f"  instance {index}: {why[:200]}")
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cache", help="layout cache to score (ours or the official format); with "
                    "--llm-base-url, a read-through cache that records the replies")
    ap.add_argument("--llm-base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--llm-model", help="model name (with --cache: which model's replies to score)")
    ap.add_argument("--llm-api-key", help="API key (default: $OPENAI_API_KEY)")
    ap.add_argument("--limit", type=int, help="score only N instances, spread evenly over the 500")
    ap.add_argument("--max-repairs", type=int, default=2, help="re-asks after a reply that does not parse")
    ap.add_argument("--timeout", type=float, default=120.0, help="read timeout per LLM call, seconds")
    ap.add_argument("--run-dir", help="folder for the raw replies of prompts that failed to plan")
    args = ap.parse_args(argv)
    if args.llm_base_url is None and args.cache is None:
        ap.error("give --cache FILE, or --llm-base-url URL --llm-model M")
    if args.llm_base_url is not None and args.llm_model is None:
        ap.error("--llm-base-url needs --llm-model")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    try:
        run(args)
    except (planner.PlannerError, planner.CacheError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
