"""Stage-two evaluation on the toy model: video layout accuracy, unguided against LVD-guided, with 95% intervals.

Usage: python scripts/eval_toy.py [--model-dir models/toy] [--n 100] [--device cpu] [--out results/toy_eval.md]

What to read: `lvd-method.md` §7.4 (video-level accuracy: the share of videos that satisfy their layout) and
§4–§6 (the guidance and its parameters); toyworld.py (the world, the colour detector, `score`).

Official counterpart: scripts/eval_owl_vit.py scores real videos with OWL-ViT on the 500-prompt benchmark;
here the world is synthetic and the detector exact, and the predicate is stricter: every object's detected
centre lies in its own box in ≥ 75% of the frames (`toyworld.score`).

The held-out layouts: `toyworld.sample_scene` with their own seed (the training stream uses --seed 0 of
train_toy.py), 1 or 2 objects. A caption names only shapes, colours and a direction, never where: positions,
sizes and path lengths are continuous and free, so the caption alone does not fix the boxes; a model that
ignores the layout lands in them by chance. Each layout runs twice from the same initial noise (seed = its
index): plain sampling (guidance off) and LVD's guidance, both through `lvd.generate` as the CLI runs them.
The interval of each rate is Wilson's; the ratio's is a paired bootstrap over layouts (10,000 resamples).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import attention  # noqa: E402
import lvd  # noqa: E402
import toyworld  # noqa: E402
from outputs import code_commit, write_report  # noqa: E402


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k/n -> (low, high)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)


def ratio_interval(a, b, seed=0, resamples=10000):
    """Paired bootstrap 95% interval of mean(b) / mean(a) over layouts (a, b: 0/1 arrays)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (resamples, len(a)))
    num, den = b[idx].mean(1), a[idx].mean(1)
    r = np.where(den > 0, num / np.maximum(den, 1e-12), np.inf)  # a resample without an unguided success: ∞
    return float(np.quantile(r, 0.025, method="lower")), float(np.quantile(r, 0.975, method="higher"))


def held_out_scenes(n, seed, frames):
    rng = np.random.default_rng(seed)
    return [toyworld.sample_scene(rng, frames, n_objects=int(rng.integers(1, 3))) for _ in range(n)]


def attention_in_out(guide):
    """Where the maps fail: per guided layer, the object tokens' mean attention inside their boxes over their mean
    attention outside (heads, frames and objects pooled), from the last guidance pass. 1.0: no localisation."""
    out = {}
    if guide.last_maps is None:
        return out
    for path, a in guide.last_maps.items():                                 # (f, n, q, 77)
        m = guide.masks[path].flatten(2).to(a.device)                       # (O, f, h, w) -> (O, f, q)
        ins, outs = 0.0, 0.0
        for o, pos in enumerate(guide.token_positions):
            att = a[..., pos].float().mean((1, -1))                         # (f, n, q, |P|) -> (f, q)
            ins += float((att * m[o]).sum() / m[o].sum().clamp(min=1))
            outs += float((att * (1 - m[o])).sum() / (1 - m[o]).sum().clamp(min=1))
        out[path] = ins / max(outs, 1e-12)
    return out


def evaluate(pipe, scenes, params, preset, on_video=None):
    """-> list of per-layout dicts {'prompt', 'objects', 'unguided', 'guided', 'energy'}."""
    rows = []
    for i, scene in enumerate(scenes):
        layout = toyworld.to_layout(scene)
        row = {"prompt": layout.prompt, "objects": len(scene.objects)}
        for name, guidance in (("unguided", None), ("guided", params)):
            info = {}
            frames = lvd.generate(pipe, layout.prompt, layout, guidance=guidance, seed=i, info=info, fast=False,
                                  **preset)
            row[name] = bool(toyworld.score(frames, scene)["passed"])
            if guidance is not None:
                hist = info["guidance_history"]
                row["energy"] = (hist[0][3], hist[-1][3]) if hist else None
                row["in_out"] = attention_in_out(info["guidance"])
        rows.append(row)
        if on_video:
            on_video(i, row)
    return rows


def table(rows):
    lines = ["| layouts | unguided | guided | ratio (guided / unguided) |", "| --- | --- | --- | --- |"]

    def cell(x):
        lo, hi = wilson(int(x.sum()), len(x))
        return f"{x.mean():.1%} [{lo:.1%}, {hi:.1%}]"
    groups = [(str(len(rows)), rows, True)]  # all layouts (with the ratio's interval), then by object count
    groups += [(f"{sum(r['objects'] == k for r in rows)} with {k} object{'s' * (k > 1)}",
                [r for r in rows if r["objects"] == k], False) for k in (1, 2)]
    for label, sel, interval in groups:
        if not sel:
            continue
        a = np.array([r["unguided"] for r in sel], float)
        b = np.array([r["guided"] for r in sel], float)
        if not a.mean():
            ratio = "undefined (unguided 0)" if interval else "undefined"
        elif interval:
            lo, hi = ratio_interval(a, b)
            ratio = f"{b.mean() / a.mean():.2f}× [{lo:.2f}, {hi:.2f}]".replace("inf", "∞")
        else:
            ratio = f"{b.mean() / a.mean():.2f}×"
        lines.append(f"| {label} | {cell(a)} | {cell(b)} | {ratio} |")
    layers = [r["in_out"] for r in rows if r.get("in_out")]
    if layers:
        lines += ["", "Object-token attention inside the boxes over outside, median over the guided videos (last pass; "
                  "1.0 = the map does not localise; the median, as a map with almost nothing outside its box has a "
                  "ratio in the billions):", "", "| guided layer | in / out |", "| --- | --- |"]
        lines += [f"| `{path.replace('.transformer_blocks.0.attn2', '')}` | {np.median([d[path] for d in layers]):.1f} |"
                  for path in layers[0]]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model-dir", default=os.path.join(ROOT, "models", "toy"))
    ap.add_argument("--n", type=int, default=100, help="held-out layouts")
    ap.add_argument("--seed", type=int, default=2026, help="seed of the held-out layouts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="benchmark", help="guidance preset (attention.PRESETS, toy values)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override GuidanceParams fields")
    ap.add_argument("--out", help="write the table here (markdown), e.g. results/toy_eval.md")
    ap.add_argument("--json", help="write the per-layout rows here")
    args = ap.parse_args(argv)

    preset = dict(lvd.MODELS["toy"])
    params = attention.preset(args.preset, "toy")
    over = {k: type(getattr(params, k))(v) for k, v in (s.split("=", 1) for s in args.set)}
    params = attention.GuidanceParams(**{**params.__dict__, **over})
    pipe = lvd.load_pipeline(args.model_dir, args.device, torch.float32, "toy")
    scenes = held_out_scenes(args.n, args.seed, preset["frames"])
    t0 = time.perf_counter()

    def on_video(i, row):
        print(f"[{i + 1}/{args.n}] {row['prompt']!r}: unguided {row['unguided']}, guided {row['guided']}, "
              f"energy {row.get('energy')}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = evaluate(pipe, scenes, params, preset, on_video=on_video)
    seconds = time.perf_counter() - t0
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    meta = (f"{time.strftime('%Y-%m-%d')}, {device}, commit {code_commit()}, {seconds:.0f} s for "
            f"{2 * len(rows)} videos; guidance {params}; sampling {preset}")
    text = table(rows)
    print(text + "\n\n" + meta)
    if args.out:
        write_report(args.out, "# Toy model: video layout accuracy, unguided vs LVD guidance\n\n"
                     f"`python scripts/eval_toy.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                     f"{text}\n\n{meta}\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
