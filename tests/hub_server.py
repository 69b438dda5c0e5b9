"""A loopback imitation of the Hugging Face Hub's resolve endpoint, for download tests.

What it imitates (huggingface_hub file_download.py is the client side of the same protocol):
- `GET|HEAD /{org}/{name}/resolve/{revision}/{path}`; the revision may be URL-encoded
  (`refs%2Fpr%2F46`). Every answer carries `X-Repo-Commit`.
- LFS files (by suffix: .safetensors, .bin, .pth, ...): `302` to `http://{cdn_host}:{port}/cdn/{sha256}`
  with `X-Linked-Etag: "<sha256>"` and `X-Linked-Size`. The CDN host is `localhost` while the hub is
  `127.0.0.1`, so that a client which leaks the Authorization header to the CDN is caught.
- Small files: `200` with `ETag: "<git blob sha1>"` and `Content-Length`.
- `Range: bytes=N-` -> `206` with `Content-Range`; past the end -> `416`.
- Errors with `X-Error-Code` as the hub sends them: 401 without a valid token (when `token` is
  set), 401 for an unknown repository without credentials, else 404 RepoNotFound; 404
  RevisionNotFound; 404 EntryNotFound. A renamed repository (`aliases`) answers a relative 307.

Knobs on the control object (all one-shot or counted, keyed by the file's path in the repo):
`drop[path] = n` (the next body of that file stops after n bytes and the socket is closed),
`corrupt[path] = k` (the next k bodies have one byte flipped, at len // 2), `fail[path] = [503, ...]`
(the next GETs of the resolve URL answer these statuses). `log` lists every request.
"""
import contextlib
import hashlib
import http.server
import io
import json
import re
import socket
import threading
from urllib.parse import unquote, urlsplit

import torch
from safetensors.torch import save as st_save

COMMIT = "4f1d2c3b5a6978877665544332211000ffeeddcc"
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


class HubControl:
    """Shared state of one fake hub: its files, its knobs, and the request log."""

    def __init__(self, files, token=None, aliases=None, commit=COMMIT, cdn_host="localhost"):
        self.files, self.token, self.aliases = files, token, dict(aliases or {})
        self.commit, self.cdn_host = commit, cdn_host
        self.drop, self.corrupt, self.fail = {}, {}, {}
        self.log = []  # dicts: method, kind ("resolve" or "cdn"), repo, path, range, auth
        self.lock = threading.Lock()

    def count(self, method=None, path=None, kind=None):
        """How many logged requests match (None matches anything)."""
        with self.lock:
            return sum(1 for e in self.log if (method is None or e["method"] == method)
                       and (path is None or e["path"] == path) and (kind is None or e["kind"] == kind))

    def bodies(self, path):
        """How many times the bytes of `path` were sent (200/206 answers, whatever the route)."""
        with self.lock:
            return sum(1 for e in self.log if e["path"] == path and e.get("sent"))

    def _blob(self, sha):
        for repo, files in self.files.items():
            for path, data in files.items():
                if hashlib.sha256(data).hexdigest() == sha:
                    return repo, path, data
        return None


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path):
    return path.endswith(LFS_SUFFIXES)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real hub
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    # -- routing ---------------------------------------------------------------
    def _route(self, head):
        ctl = self.server.control
        segs = urlsplit(self.path).path.split("/")
        entry = {"method": self.command, "range": self.headers.get("Range"),
                 "auth": self.headers.get("Authorization"), "host": self.headers.get("Host")}
        if len(segs) == 3 and segs[1] == "cdn":
            found = ctl._blob(segs[2])
            entry.update(kind="cdn", repo=found and found[0], path=found and found[1])
            with ctl.lock:
                ctl.log.append(entry)
            if found is None:
                return self._answer(404, {"X-Error-Code": "EntryNotFound"})
            return self._body(found[1], found[2], head, {"ETag": f'"{segs[2]}"'}, entry)
        if len(segs) < 6 or segs[3] != "resolve":
            entry.update(kind="other", repo=None, path=None)
            with ctl.lock:
                ctl.log.append(entry)
            return self._answer(404, {})
        repo, rev, path = f"{unquote(segs[1])}/{unquote(segs[2])}", unquote(segs[4]), unquote("/".join(segs[5:]))
        entry.update(kind="resolve", repo=repo, path=path)
        with ctl.lock:
            ctl.log.append(entry)
        if repo in ctl.aliases:  # a renamed repository: relative redirect, as the hub does
            return self._answer(307, {"Location": "/" + ctl.aliases[repo] + "/" + "/".join(segs[3:])})
        auth = self.headers.get("Authorization")
        if ctl.token is not None and auth != f"Bearer {ctl.token}":
            return self._answer(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        if repo not in ctl.files:
            return self._answer(401 if auth is None else 404, {"X-Error-Code": "RepoNotFound"})
        if rev not in ("main", ctl.commit):
            return self._answer(404, {"X-Error-Code": "RevisionNotFound"})
        if path not in ctl.files[repo]:
            return self._answer(404, {"X-Error-Code": "EntryNotFound"})
        if not head:
            with ctl.lock:
                queue = ctl.fail.get(path)
                status = queue.pop(0) if queue else None
            if status:
                return self._answer(status, {})
        data, extra = ctl.files[repo][path], {"X-Repo-Commit": ctl.commit}
        if is_lfs(path):
            sha = hashlib.sha256(data).hexdigest()
            port = self.server.server_address[1]
            extra.update({"Location": f"http://{ctl.cdn_host}:{port}/cdn/{sha}", "X-Linked-Etag": f'"{sha}"',
                          "X-Linked-Size": str(len(data)), "ETag": f'"{sha}"'})
            return self._answer(302, extra)
        extra["ETag"] = f'"{git_blob_sha1(data)}"'
        return self._body(path, data, head, extra, entry)

    # -- answers ---------------------------------------------------------------
    def _answer(self, status, headers, body=b""):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _body(self, path, data, head, headers, entry):
        ctl, start = self.server.control, 0
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m[1]) if m else 0
            if start >= len(data):
                return self._answer(416, {"Content-Range": f"bytes */{len(data)}"})
        self.send_response(206 if rng else 200)
        for k, v in headers.items():
            self.send_header(k, v)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if head:
            return
        body = bytearray(data[start:])
        with ctl.lock:
            entry["sent"] = True
            flip = ctl.corrupt.get(path, 0) > 0
            if flip:
                ctl.corrupt[path] -= 1
            cut = ctl.drop.pop(path, None)
        if flip and len(data) // 2 >= start:
            body[len(data) // 2 - start] ^= 0xFF
        if cut is not None:  # send part of the body, then hang up
            self.wfile.write(bytes(body[:cut]))
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(bytes(body))


@contextlib.contextmanager
def serve_hub(files, *, token=None, aliases=None, commit=COMMIT, cdn_host="localhost",
              drop=None, corrupt=None, fail=None):
    """Run a fake hub serving files = {repo: {path: bytes}} on 127.0.0.1; yield (base_url, control)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.control = ctl = HubControl(files, token, aliases, commit, cdn_host)
    ctl.drop.update(drop or {})
    ctl.corrupt.update(corrupt or {})
    ctl.fail.update({k: list(v) for k, v in (fail or {}).items()})
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", ctl
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -----------------------------------------------------------------------------
# tiny fake repositories with the published layout (§2.2, §2.3)

def _json(obj):
    return json.dumps(obj, indent=2).encode()


def _small_files():
    return {
        "model_index.json": _json({"_class_name": "TextToVideoSDPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                                   "text_encoder": ["transformers", "CLIPTextModel"],
                                   "tokenizer": ["transformers", "CLIPTokenizer"],
                                   "unet": ["diffusers", "UNet3DConditionModel"],
                                   "vae": ["diffusers", "AutoencoderKL"]}),
        "scheduler/scheduler_config.json": _json({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}),
        "text_encoder/config.json": _json({"hidden_size": 1024, "num_hidden_layers": 23}),
        "tokenizer/vocab.json": _json({"!": 0, "a</w>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}),
        "tokenizer/merges.txt": b"#version: 0.2\na </w>\n",
        "tokenizer/special_tokens_map.json": _json({"pad_token": "!"}),
        "tokenizer/tokenizer_config.json": _json({"model_max_length": 77}),
        "unet/config.json": _json({"block_out_channels": [320, 640, 1280, 1280]}),
        "vae/config.json": _json({"latent_channels": 4}),
        "README.md": b"# fake model card\n",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    }


def fake_state_dicts(seed=0, dtype=torch.float16):
    """Small state dicts per component, each with the tensor download.py checks (right shape)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "unet": {"conv_in.weight": r(320, 4, 3, 3), "conv_in.bias": r(320),
                 "time_embedding.linear_1.weight": r(160, 320), "conv_out.weight": r(4, 320, 3, 3)},
        "text_encoder": {"text_model.final_layer_norm.weight": r(1024), "text_model.final_layer_norm.bias": r(1024),
                         "text_model.embeddings.token_embedding.weight": r(40, 1024),
                         "text_model.embeddings.position_ids": torch.arange(77).reshape(1, 77)},
        "vae": {"decoder.conv_in.weight": r(512, 4, 3, 3), "encoder.conv_in.weight": r(128, 3, 3, 3),
                "post_quant_conv.weight": r(4, 4, 1, 1)},
    }


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def fake_modelscope_repo(seed=0):
    """{path: bytes}: configs, tokenizer, fp16 and fp32 safetensors, and the .bin files nobody should fetch."""
    files = _small_files()
    for dtype, tag in ((torch.float16, ".fp16"), (torch.float32, "")):
        sd = fake_state_dicts(seed, dtype)
        files[f"unet/diffusion_pytorch_model{tag}.safetensors"] = st_save(sd["unet"])
        files[f"vae/diffusion_pytorch_model{tag}.safetensors"] = st_save(sd["vae"])
        files[f"text_encoder/model{tag}.safetensors"] = st_save(sd["text_encoder"])
        files[f"unet/diffusion_pytorch_model{tag}.bin"] = torch_bytes(sd["unet"])
        files[f"text_encoder/pytorch_model{tag}.bin"] = torch_bytes(sd["text_encoder"])
    return files


def fake_zeroscope_repo(seed=1):
    """{path: bytes}: configs, tokenizer, fp16 .bin files only (as the main branch), and the .pth extras."""
    files = _small_files()
    sd = fake_state_dicts(seed, torch.float16)
    files["unet/diffusion_pytorch_model.bin"] = torch_bytes(sd["unet"])
    files["vae/diffusion_pytorch_model.bin"] = torch_bytes(sd["vae"])
    files["text_encoder/pytorch_model.bin"] = torch_bytes(sd["text_encoder"])
    files["zs2_576w/text2video_pytorch_model.pth"] = torch_bytes({"x": torch.zeros(3)})
    return files
