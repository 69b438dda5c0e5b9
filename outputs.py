"""What a run leaves on disk: the run folder (video.gif, frames/*.png, run.json, layout.json, layout.gif), the
layout's boxes drawn over the frames, and the attention-map grids.

What to read: `lvd-method.md` §4.3-§4.4 (the maps and boxes the grids show); README "Usage" (the run folder).

Official implementation: generation/lvd.py in TonyLianLong/LLM-groundedVideoDiffusion @22d90d2 saves the frames
and a GIF per run (`save_frames`, imageio).

Differences:
- A run folder is written to a temporary folder and renamed into place, so a crash leaves no half-written run.
- Box drawing and attention grids use Pillow only.
"""
import json
import os
import platform
import re
import shutil
import tempfile
import time

import numpy as np
import torch


def draw_boxes(frames, layout):
    """Draw the layout's boxes and names over uint8 frames (f, H, W, 3); returns PIL images."""
    from PIL import Image, ImageDraw
    f, H, W, _ = frames.shape
    colors = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220)]
    images = []
    objects = layout.object_boxes(f)  # [(id, name, (f, 4) normalised xyxy, zeros where absent)]
    for k in range(f):
        im = Image.fromarray(frames[k]).convert("RGB")
        d = ImageDraw.Draw(im)
        for n, (_, name, boxes) in enumerate(objects):
            x0, y0, x1, y1 = (float(v) for v in boxes[k])
            if x1 <= x0 or y1 <= y0:
                continue
            c = colors[n % len(colors)]
            px0, py0 = min(max(x0 * W, 0), W - 1), min(max(y0 * H, 0), H - 1)  # a box clipped to < 1 px
            d.rectangle([px0, py0, max(px0, min(x1 * W, W) - 1), max(py0, min(y1 * H, H) - 1)], outline=c, width=2)
            d.text((x0 * W + 3, y0 * H + 2), name, fill=c)
        images.append(im)
    return images


def save_gif(images, path, fps=8):
    """An animated GIF of PIL images. Each frame gets its own 256-colour palette by Pillow's fast octree
    quantiser (dithered): ~0.1 s for 24 frames of 576×320, where the default median cut takes seconds."""
    from PIL import Image
    frames = [im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE) for im in images]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


def save_run(out_root, name, frames, settings, layout=None, extra=None, workers=None):
    """Write video.gif, frames/NNNN.png, run.json (+ layout.json, layout.gif) atomically; return the folder.

    The images are encoded in a pool of `workers` threads (Pillow's encoders release the GIL); the first error
    of any of them stops the run folder: the temporary folder is removed and the error raised.
    extra: optional callable(folder) that writes more files into the run folder before it is renamed into place."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image
    os.makedirs(out_root, exist_ok=True)
    final = os.path.join(out_root, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=out_root)
    try:
        images = [Image.fromarray(fr) for fr in frames]
        os.makedirs(os.path.join(tmp, "frames"))
        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            jobs = [pool.submit(save_gif, images, os.path.join(tmp, "video.gif"))]
            jobs += [pool.submit(im.save, os.path.join(tmp, "frames", f"{k:04d}.png")) for k, im in enumerate(images)]
            if layout is not None:
                jobs.append(pool.submit(lambda: save_gif(draw_boxes(frames, layout), os.path.join(tmp, "layout.gif"))))
            for job in jobs:
                job.result()  # the first failure raises here (the pool waits for the rest before the cleanup)
        if layout is not None:
            layout.save(os.path.join(tmp, "layout.json"))
        with open(os.path.join(tmp, "run.json"), "w") as fh:
            json.dump(settings, fh, indent=2, default=str)
        if extra is not None:
            extra(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_report(path, text):
    """A results file (a benchmark's or a parity script's table), written atomically; -> path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def code_commit():
    """The short commit of the code that runs, for a result to name: LVD_COMMIT where set (a copy without .git,
    as on a GPU machine), else git's HEAD, else 'unknown'."""
    if os.environ.get("LVD_COMMIT"):
        return os.environ["LVD_COMMIT"]
    import subprocess
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip() or "unknown"


def run_name(prompt, seed):
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "video"
    return f"{time.strftime('%Y%m%d-%H%M%S')}_{slug}_s{seed}"


def versions():
    import safetensors
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def save_attention_grid(maps, masks, token_positions, names, path_prefix, cell=64):
    """One PNG per object, `{path_prefix}_{o}_{name}.png`: rows = layers, columns = frames; each cell is the
    map averaged over heads and the object's tokens (scaled by the row's maximum, upsampled nearest) with
    the mask's box outlined in red. maps/masks as for `energy`. Returns the written paths."""
    from PIL import Image, ImageDraw
    paths = list(maps)
    h_max = max(masks[p].shape[-2] for p in paths)
    w_max = max(masks[p].shape[-1] for p in paths)
    s = max(1, round(cell / h_max))
    ch, cw, margin = h_max * s, w_max * s, 56
    written = []
    for o, (pos, name) in enumerate(zip(token_positions, names)):
        f = masks[paths[0]].shape[1]
        img = Image.new("RGB", (margin + f * (cw + 2), len(paths) * (ch + 2)), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for r, path in enumerate(paths):
            h, w = masks[path].shape[-2:]
            avg = maps[path][..., pos].float().mean((1, 3)).reshape(f, h, w).detach().cpu()  # f n (h w) p -> f h w
            avg = avg / avg.max().clamp(min=1e-12)
            short = path.replace("_blocks.", "").replace(".attentions.", ".").split(".transformer")[0]
            draw.text((2, r * (ch + 2) + ch // 2 - 5), short, fill=(0, 0, 0))
            for k in range(f):
                tile = Image.fromarray((avg[k].numpy() * 255).astype(np.uint8)).resize((cw, ch), Image.NEAREST)
                x0, y0 = margin + k * (cw + 2), r * (ch + 2)
                img.paste(tile.convert("RGB"), (x0, y0))
                ys, xs = torch.nonzero(masks[path][o, k] > 0, as_tuple=True)
                if len(ys):
                    sy, sx = ch / h, cw / w
                    draw.rectangle([x0 + int(xs.min()) * sx, y0 + int(ys.min()) * sy,
                                    x0 + (int(xs.max()) + 1) * sx - 1, y0 + (int(ys.max()) + 1) * sy - 1],
                                   outline=(255, 0, 0))
        out = f"{path_prefix}_{o}_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-') or 'object'}.png"
        tmp = out + ".tmp.png"
        img.save(tmp)
        os.replace(tmp, out)  # atomic
        written.append(out)
    return written
