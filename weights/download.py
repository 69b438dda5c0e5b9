"""Fetch the ModelScope 1.7B or Zeroscope v2 576w weights from the Hugging Face Hub: exactly the
files the loaders need, resumable and verified.

What to read: `modelscope-architecture.md` §2 (repositories, files and sizes; §2.3 Zeroscope's
`.bin`-only main branch) and §11 (Zeroscope differences).

Official implementation: huggingface_hub `hf_hub_download` and `get_hf_file_metadata`
(src/huggingface_hub/file_download.py). A HEAD on `{endpoint}/{repo}/resolve/{revision}/{path}`
that does not follow the CDN redirect (but does follow a same-site one: a renamed repository)
gives X-Repo-Commit, X-Linked-Etag (the sha256 of an LFS file) and X-Linked-Size; the body
comes from a GET, resumed with `Range`.

Differences:
- `requests` only and no cache tree: files land in `dest/` in the diffusers folder layout, which
  is what weights/checkpoint.py reads. Only the files listed by `expected_files` are fetched: no
  README, no `.bin` (ModelScope), no fp32 text encoder or VAE (even for `--variant fp32` the
  loaders upcast the fp16 ones; only the UNet comes in fp32).
- The VAE file also holds the encoder half (`encoder.*`, `quant_conv.*`). The hub has no
  decoder-only file, so it is downloaded and the loader drops those tensors.
- Checks: an LFS file against the hub's sha256; a small (non-LFS) file against its git blob
  sha1 when the ETag is 40 hex digits (huggingface_hub's local-dir check compares the same
  thing), else by size. On a mismatch the file is
  deleted and fetched once more, then it is an error.
- Verified files are recorded in `dest/.verified.json` (size, mtime_ns, sha256, hub hash). A re-run
  trusts a record whose size and mtime match and whose hub hash is unchanged, so a 2.8 GB file is
  hashed once, when it is downloaded; a changed mtime (a copied folder) or `--rehash` hashes it
  again. A file without a record is hashed against the hub. Re-runs still send one HEAD per file.
- Zeroscope: its main branch holds only fp16 pickles (§2.3). Each `.bin` is loaded once with
  `torch.load(weights_only=True)`, checked (flat str -> tensor dict, one known tensor shape per
  component), written as safetensors under the plain name (`unet/diffusion_pytorch_model.
  safetensors`, `text_encoder/model.safetensors`; they hold fp16 tensors, and `pick_weights_file`
  falls back to the plain name for either dtype), read back with safetensors' own reader and
  compared byte for byte, renamed into place and the `.bin` deleted. The safetensors of the bot
  PR refs/pr/46 are not used (their names and dtypes are not verified). `--variant` is ignored.
- The Authorization header goes only to the endpoint's host, never to the CDN.

Glossary: rel (a path relative to dest and to the repository root); remote, local (the rel
fetched and the rel left for the loaders: they differ only for a converted .bin); etag (the hub's
hash of a file: sha256 hex for LFS files, git blob sha1 for small ones); lfs (the hub answered
with X-Linked-Etag); part (`path + ".part"`, the partial download); have (bytes already in part).
"""
import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import time
import types

if __package__ in (None, ""):  # run as `python weights/download.py`: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from weights.convert import convert as _convert
from weights.hub import DownloadError, Hub as _Hub, short as _short  # noqa: F401 (DownloadError: the public error)

DEFAULT_ENDPOINT = "https://huggingface.co"
STATE_FILE = ".verified.json"
MODELS = types.MappingProxyType({
    # renamed from damo-vilab/text-to-video-ms-1.7b; the old name redirects (relative 307)
    "modelscope": ("ali-vilab/text-to-video-ms-1.7b", "main"),
    "zeroscope": ("cerspense/zeroscope_v2_576w", "main"),
})
_SMALL = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
          "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
          "tokenizer/tokenizer_config.json", "unet/config.json", "vae/config.json")
# -----------------------------------------------------------------------------
# the manifest

def _plan(model, variant):
    """[(remote rel, local rel)]; they differ where a .bin is converted to safetensors."""
    if model not in MODELS:
        raise DownloadError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    if variant not in ("fp16", "fp32"):
        raise DownloadError(f"unknown variant {variant!r}: choose fp16 or fp32")
    if model == "zeroscope":  # main branch: fp16 pickles only (§2.3)
        weights = [("text_encoder/pytorch_model.bin", "text_encoder/model.safetensors"),
                   ("unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors"),
                   ("vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.safetensors")]
    else:
        unet = "unet/diffusion_pytorch_model" + (".fp16" if variant == "fp16" else "") + ".safetensors"
        weights = [(p, p) for p in ("text_encoder/model.fp16.safetensors", unet,
                                    "vae/diffusion_pytorch_model.fp16.safetensors")]
    return [(p, p) for p in _SMALL] + weights


def expected_files(model="modelscope", variant="fp16"):
    """The files (relative to dest) that a complete download leaves for the loaders."""
    return [local for _, local in _plan(model, variant)]


def missing_files(dest, model="modelscope", variant="fp16"):
    """The expected files absent from dest (a cheap existence check, no hashing)."""
    return [rel for rel in expected_files(model, variant) if not os.path.isfile(os.path.join(dest, rel))]


def default_dest(model="modelscope"):
    """models/<model> in the repository root."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", model)


def download_command(model="modelscope", variant="fp16", dest=None):
    """The command line that fetches what `missing_files` reports."""
    cmd = f"python weights/download.py --model {model} --variant {variant}"
    return cmd + (f" --dest {shlex.quote(str(dest))}" if dest else "")


def _size(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


# -----------------------------------------------------------------------------
# hashing, the record of verified files, the progress bar

def _sha256(path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h


def _check(path, size, etag, lfs, sha=None):
    """(None or what is wrong, sha256 hex) of a file against the hub's size and hash."""
    got = os.path.getsize(path)
    if got != size:
        return f"size {got} bytes, the hub reports {size}", None
    sha = sha or _sha256(path).hexdigest()
    if lfs and re.fullmatch(r"[0-9a-f]{64}", etag) and sha != etag:
        return f"sha256 {sha[:12]}..., the hub reports {etag[:12]}...", sha
    if not lfs and re.fullmatch(r"[0-9a-f]{40}", etag):  # git blob sha1 of a small file
        git = _sha256(path, hashlib.sha1(b"blob %d\0" % size)).hexdigest()
        if git != etag:
            return f"git sha1 {git[:12]}..., the hub reports {etag[:12]}...", sha
    return None, sha  # (without a usable hash, the size is all there is to check)


class _Verified:
    """dest/.verified.json: {rel: {size, mtime_ns, sha256, etag}} of files checked before."""

    def __init__(self, dest):
        self.dest, self.path = dest, os.path.join(dest, STATE_FILE)
        try:
            with open(self.path, encoding="utf-8") as fh:
                self.files = dict(json.load(fh)["files"])
        except (OSError, ValueError, KeyError, TypeError):
            self.files = {}

    def trusted(self, rel, etag, rehash=False):
        """rel was checked against etag and is unchanged: same size and mtime, else (or with rehash) same sha256."""
        rec, path = self.files.get(rel), os.path.join(self.dest, rel)
        if not rec or rec.get("etag") != etag or not os.path.isfile(path):
            return False
        st = os.stat(path)
        if rec.get("size") != st.st_size:
            return False
        if rec.get("mtime_ns") == st.st_mtime_ns and not rehash:
            return True
        if _sha256(path).hexdigest() != rec.get("sha256"):  # touched (e.g. copied) or --rehash: hash it
            return False
        self.put(rel, etag, rec["sha256"])
        return True

    def put(self, rel, etag, sha256):
        st = os.stat(os.path.join(self.dest, rel))
        self.files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256, "etag": etag}
        self._save()

    def drop(self, rel):
        if self.files.pop(rel, None) is not None:
            self._save()

    def _save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"version": 1, "files": self.files}, fh, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


class _Bar:
    """One plain-text progress line on stderr, redrawn with \\r at most 5 times a second."""

    def __init__(self, label, total, done, enabled):
        self.label, self.total, self.done, self.enabled = label, total, done, enabled
        self.begin(done)

    def begin(self, done):
        self.t0, self.start, self.done, self.drawn = time.monotonic(), done, done, 0.0

    def update(self, n):
        self.done += n
        if self.enabled and time.monotonic() - self.drawn > 0.2:
            self.draw()

    def draw(self, end=""):
        self.drawn, dt = time.monotonic(), max(time.monotonic() - self.t0, 1e-6)
        rate = (self.done - self.start) / dt  # bytes/s over this session
        eta = (self.total - self.done) / rate if rate > 0 else 0
        line = (f"\r{self.label}  {_size(self.done)} / {_size(self.total)}  {100 * self.done / max(self.total, 1):5.1f}%"
                f"  {rate / 1e6:6.1f} MB/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        print(line.ljust(100), end=end, file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            self.draw(end="\n")


# -----------------------------------------------------------------------------
# one file: resumable GET into rel.part, checked, renamed into place

def _fetch(hub, rel, part, size, bar):
    """Download into part, resuming with Range; return the sha256 (hex) of the whole part."""
    import requests  # here, not at the top: lvd.py imports this module on every start
    h, hashed, fails = hashlib.sha256(), 0, 0
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if have > size:  # a stale part of some other version of the file
            os.remove(part)
            have = 0
        if hashed != have:  # a part left by an earlier run, or a write that failed half-way
            h, hashed = (_sha256(part) if have else hashlib.sha256()), have
        if have == size:
            return h.hexdigest()
        url, why, dropped = hub.url(rel), None, False
        try:
            with hub.session.get(url, headers=hub.headers(url, {"Range": f"bytes={have}-"} if have else None),
                                 stream=True, timeout=(10, 60)) as r:
                if r.status_code == 416:  # the server's file is shorter than the size it reported
                    os.remove(part)
                    why = "HTTP 416"
                elif r.status_code == 429 or r.status_code >= 500:
                    why = f"HTTP {r.status_code}"
                else:
                    hub.check(r, rel)
                    if r.status_code != 206 and have:  # Range ignored: start again
                        h, hashed, have = hashlib.sha256(), 0, 0
                    elif r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                        raise DownloadError(f"{hub.repo}/{rel}: the server answered Range bytes={have}- with "
                                            f"Content-Range {r.headers.get('Content-Range')!r}")
                    bar.begin(have)
                    with open(part, "ab" if have else "wb") as fh:
                        for chunk in r.iter_content(1 << 16):  # a drop loses the chunk in flight
                            fh.write(chunk)
                            h.update(chunk)
                            hashed += len(chunk)
                            bar.update(len(chunk))
                    if hashed != size:
                        why = f"the server sent {hashed - have} bytes from offset {have}, the file has {size}"
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            why, dropped = e, True
        except requests.RequestException as e:
            raise DownloadError(f"{hub.repo}/{rel}: {_short(e)}") from None
        except OSError as e:
            raise DownloadError(f"{part}: cannot write ({e.strerror or e})") from None
        if why is None:
            continue
        progressed = os.path.exists(part) and os.path.getsize(part) > have
        fails = 1 if dropped and progressed else fails + 1  # a drop after progress starts the count again
        if fails > hub.retries:
            raise hub.unreachable(rel, why)
        bar.close()
        hub.say(f"{rel}: {_short(why)}; attempt {fails + 1} of {hub.retries + 1}, resuming at {_size(max(hashed, 0))}")
        hub.pause(fails)


def _get(hub, dest, rel, size, etag, lfs, bar, say):
    """Fetch rel into dest (atomically, checked); a mismatch deletes it and fetches once more."""
    path = os.path.join(dest, rel)
    part = path + ".part"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for attempt in (1, 2):
        try:
            sha = _fetch(hub, rel, part, size, bar)
        finally:
            bar.close()  # ends the \r line, also before an error message
        problem, sha = _check(part, size, etag, lfs, sha)
        if problem is None:
            os.replace(part, path)
            return sha
        os.remove(part)
        if attempt == 1:
            say(f"{rel}: checksum mismatch ({problem}); deleted, fetching it again")
    raise DownloadError(f"{hub.repo}/{rel}: checksum mismatch after a fresh download ({problem}); "
                        "the file was deleted, try again later or another HF_ENDPOINT")


# -----------------------------------------------------------------------------
# the whole download

def download(model="modelscope", variant="fp16", dest=None, endpoint=None, token=None, progress=True, *,
             revision=None, retries=5, backoff=1.0, rehash=False):
    """Fetch (and for Zeroscope convert) the weights into dest; return dest.

    endpoint defaults to $HF_ENDPOINT or https://huggingface.co, token to $HF_TOKEN. retries bounds
    the consecutive failed attempts per request (waits of backoff * 2^k s, at most 30 s each).
    """
    plan = _plan(model, variant)
    dest = os.path.abspath(dest or default_dest(model))
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    repo, default_rev = MODELS[model]
    say = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    hub = _Hub(endpoint, token or os.environ.get("HF_TOKEN") or None, repo, revision or default_rev, retries, backoff,
               say)
    try:
        os.makedirs(dest, exist_ok=True)
        state = _Verified(dest)
        jobs, todo = [], []
        for remote, local in plan:  # metadata first (HEAD only), so the disk check knows the sizes
            jobs.append((remote, local) + hub.head(remote))
        for remote, local, size, etag, lfs in jobs:
            if state.trusted(local, etag, rehash):
                say(f"{local}: verified")
                continue
            path = os.path.join(dest, remote)
            present = remote != local and state.trusted(remote, etag, rehash)
            if not present and os.path.isfile(path):  # no record (or a stale one): hash it once
                problem, sha = _check(path, size, etag, lfs)
                present = problem is None
                if present:
                    state.put(remote, etag, sha)
                else:
                    say(f"{remote}: {problem}; fetching it again")
            if present and remote == local:
                say(f"{local}: verified")
                continue
            part = path + ".part"
            left = 0 if present else size - (min(os.path.getsize(part), size) if os.path.exists(part) else 0)
            todo.append((remote, local, size, etag, lfs, present, left))
        # converting writes one extra copy of the largest .bin before that .bin is deleted
        need = sum(j[6] for j in todo) + max([j[2] for j in todo if j[0] != j[1]], default=0)
        free = shutil.disk_usage(dest).free
        if need > free:
            raise DownloadError(f"not enough disk space in {dest}: {need / 1e9:.2f} GB needed, "
                                f"{free / 1e9:.2f} GB free")
        for i, (remote, local, size, etag, lfs, present, _) in enumerate(todo, 1):
            if not present:
                bar = _Bar(f"[{i}/{len(todo)}] {remote}", size, 0, progress)
                state.put(remote, etag, _get(hub, dest, remote, size, etag, lfs, bar, say))
            if remote != local:
                say(f"converting {remote} -> {local}")
                sha = _convert(os.path.join(dest, remote), os.path.join(dest, local))
                state.put(local, etag, sha)  # keyed by the .bin's hub hash, so a re-run skips it
                os.remove(os.path.join(dest, remote))
                state.drop(remote)
    except OSError as e:
        import requests
        if isinstance(e, requests.RequestException):
            raise
        raise DownloadError(f"{e.filename or dest}: {e.strerror or e}") from None
    say(f"{model} weights ({variant}) ready in {dest}")
    return dest


def main(argv=None):
    p = argparse.ArgumentParser(description="Download the ModelScope / Zeroscope weights lvd needs from the "
                                "Hugging Face Hub (honours HF_ENDPOINT and HF_TOKEN).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="modelscope")
    p.add_argument("--variant", choices=("fp16", "fp32"), default="fp16",
                   help="UNet precision (text encoder and VAE are always fp16; Zeroscope has fp16 only)")
    p.add_argument("--dest", default=None, help="target folder (default: models/<model> in the repository)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--rehash", action="store_true", help="hash every file again instead of trusting .verified.json")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    a = p.parse_args(argv)
    try:
        download(a.model, a.variant, a.dest, progress=not a.quiet, revision=a.revision, rehash=a.rehash)
    except DownloadError as e:
        print(f"download.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("download.py: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
