"""weights/download.py against a loopback fake hub (tests/hub_server.py): the exact file list,
resume after a dropped connection, checksum failures, auth and not-found errors, re-runs that
download nothing, the Zeroscope .bin -> safetensors conversion, and the disk-space check.

The oracles are independent of download.py: the bytes the fake hub serves (and hashlib over
them), the file list written out by hand from the issue, safetensors' own reader, and the state
dicts the fake .bin files were made from.
"""
import fractions
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from safetensors import safe_open

from hub_server import fake_modelscope_repo, fake_state_dicts, fake_zeroscope_repo, serve_hub, torch_bytes
from weights import download as dl
from weights.checkpoint import pick_weights_file, read_header

MS, ZS = "ali-vilab/text-to-video-ms-1.7b", "cerspense/zeroscope_v2_576w"
UNET16 = "unet/diffusion_pytorch_model.fp16.safetensors"
SMALL = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
         "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
         "tokenizer/tokenizer_config.json", "unet/config.json", "vae/config.json"]
MS_FP16 = SMALL + ["text_encoder/model.fp16.safetensors", UNET16, "vae/diffusion_pytorch_model.fp16.safetensors"]
MS_FP32 = SMALL + ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
                   "vae/diffusion_pytorch_model.fp16.safetensors"]
ZS_FILES = SMALL + ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                    "vae/diffusion_pytorch_model.safetensors"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("HF_TOKEN", "HF_ENDPOINT", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def ms_files():
    return fake_modelscope_repo()


@pytest.fixture(scope="module")
def zs_files():
    return fake_zeroscope_repo()


def fetch(url, dest, model="modelscope", variant="fp16", **kw):
    kw.setdefault("progress", False)
    return dl.download(model, variant, str(dest), endpoint=url, retries=kw.pop("retries", 3), backoff=0.0, **kw)


def local_files(dest):
    return sorted(os.path.relpath(os.path.join(r, f), dest) for r, _, fs in os.walk(dest) for f in fs)


def assert_same_bytes(dest, files, rels):
    for rel in rels:
        with open(os.path.join(dest, rel), "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == hashlib.sha256(files[rel]).hexdigest(), rel


# -----------------------------------------------------------------------------
# the manifest

def test_manifest_is_the_issue_list():
    assert sorted(dl.expected_files("modelscope", "fp16")) == sorted(MS_FP16)
    assert sorted(dl.expected_files("modelscope", "fp32")) == sorted(MS_FP32)
    assert sorted(dl.expected_files("zeroscope", "fp16")) == sorted(ZS_FILES)
    assert dl.expected_files("zeroscope", "fp32") == dl.expected_files("zeroscope", "fp16")
    with pytest.raises(dl.DownloadError, match="unknown model 'sdxl'"):
        dl.expected_files("sdxl")
    with pytest.raises(dl.DownloadError, match="unknown variant 'bf16'"):
        dl.expected_files("modelscope", "bf16")


def test_missing_files_and_command(tmp_path):
    assert dl.missing_files(tmp_path, "modelscope", "fp16") == dl.expected_files("modelscope", "fp16")
    cmd = dl.download_command("zeroscope", "fp16", tmp_path / "my dir")
    assert cmd.startswith("python weights/download.py --model zeroscope --variant fp16 --dest ")
    assert "'" in cmd  # the path with a space is quoted


# -----------------------------------------------------------------------------
# a normal download

def test_fetches_exactly_the_manifest(tmp_path, ms_files, capsys):
    dest = tmp_path / "ms"
    with serve_hub({MS: ms_files}, token="hf_secret") as (url, hub):
        assert fetch(url, dest, token="hf_secret", progress=True) == str(dest)
        gets = {e["path"] for e in hub.log if e["method"] == "GET"}
        cdn_auth = [e for e in hub.log if e["kind"] == "cdn" and e["auth"]]
        cdn_gets = hub.count("GET", kind="cdn")
    assert local_files(dest) == sorted(MS_FP16 + [dl.STATE_FILE])
    assert_same_bytes(dest, ms_files, MS_FP16)
    assert gets == set(MS_FP16)  # no README, no .bin, no fp32 file was even requested
    assert cdn_gets == 3 and cdn_auth == []  # LFS bodies came from the CDN, without the token
    err = capsys.readouterr().err
    assert "MB/s" in err and "ETA" in err and "\r" in err and "ready in" in err
    # the loaders find the files, for both dtypes
    assert pick_weights_file(str(dest / "unet"), "diffusion_pytorch_model", torch.float16).endswith(UNET16)
    assert dl.missing_files(dest, "modelscope", "fp16") == []
    assert dl.missing_files(dest, "modelscope", "fp32") == ["unet/diffusion_pytorch_model.safetensors"]


def test_fp32_variant_and_hf_env(tmp_path, ms_files, monkeypatch):
    with serve_hub({MS: ms_files}, token="tok") as (url, hub):
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", "tok")
        dl.download("modelscope", "fp32", str(tmp_path), progress=False, backoff=0.0)
        gets = {e["path"] for e in hub.log if e["method"] == "GET"}
    assert gets == set(MS_FP32)
    assert_same_bytes(tmp_path, ms_files, MS_FP32)
    assert pick_weights_file(str(tmp_path / "unet"), "diffusion_pytorch_model", torch.float32).endswith(
        "unet/diffusion_pytorch_model.safetensors")


def test_renamed_repository_and_transient_errors(tmp_path, ms_files):
    # the files live under a new name; the old one answers a relative 307 (damo-vilab -> ali-vilab)
    with serve_hub({"new-org/t2v": ms_files}, aliases={MS: "new-org/t2v"},
                   fail={"model_index.json": [503, 502], UNET16: [500]}) as (url, hub):
        fetch(url, tmp_path)
        assert hub.count("GET", "model_index.json", "resolve") >= 3  # two 5xx answers, then a real one
    assert_same_bytes(tmp_path, ms_files, MS_FP16)


# -----------------------------------------------------------------------------
# interruptions and corruption

def test_dropped_connection_resumes_with_range(tmp_path, ms_files):
    size = len(ms_files[UNET16])
    with serve_hub({MS: ms_files}, drop={UNET16: 100_000, "tokenizer/vocab.json": 10}) as (url, hub):
        fetch(url, tmp_path)
        ranges = [e["range"] for e in hub.log if e["path"] == UNET16 and e["kind"] == "cdn"]
        vocab_bodies = hub.bodies("tokenizer/vocab.json")
    assert size > 130_000
    # resumed from what had reached the disk (download.py writes 64 KiB chunks; the one in flight is lost)
    assert len(ranges) == 2 and ranges[0] is None
    assert ranges[1].startswith("bytes=") and 0 < int(ranges[1][6:-1]) <= 100_000
    assert vocab_bodies == 2
    assert_same_bytes(tmp_path, ms_files, MS_FP16)
    assert not [f for f in local_files(tmp_path) if f.endswith(".part")]


def test_resume_a_part_left_by_an_earlier_run(tmp_path, ms_files):
    part = tmp_path / (UNET16 + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(ms_files[UNET16][:5000])  # e.g. Ctrl-C
    with serve_hub({MS: ms_files}) as (url, hub):
        fetch(url, tmp_path)
        ranges = [e["range"] for e in hub.log if e["path"] == UNET16 and e["kind"] == "cdn"]
    assert ranges == ["bytes=5000-"]
    assert_same_bytes(tmp_path, ms_files, [UNET16])


def test_stale_part_fails_the_checksum_and_is_refetched(tmp_path, ms_files):
    part = tmp_path / (UNET16 + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 5000)  # a part of some other file version
    with serve_hub({MS: ms_files}) as (url, hub):
        fetch(url, tmp_path)
        ranges = [e["range"] for e in hub.log if e["path"] == UNET16 and e["kind"] == "cdn"]
    assert ranges == ["bytes=5000-", None]  # resumed, failed the sha256, fetched whole
    assert_same_bytes(tmp_path, ms_files, [UNET16])


def test_corrupted_byte_is_detected_and_refetched(tmp_path, ms_files, capsys):
    with serve_hub({MS: ms_files}, corrupt={UNET16: 1, "unet/config.json": 1}) as (url, hub):
        fetch(url, tmp_path, progress=True)
        assert hub.bodies(UNET16) == 2
        assert hub.bodies("unet/config.json") == 2  # caught by the git blob sha1 of the small file
    assert_same_bytes(tmp_path, ms_files, MS_FP16)
    assert "checksum mismatch" in capsys.readouterr().err


def test_persistent_corruption_is_an_error(tmp_path, ms_files):
    with serve_hub({MS: ms_files}, corrupt={UNET16: 5}) as (url, hub):
        with pytest.raises(dl.DownloadError) as e:
            fetch(url, tmp_path)
        assert hub.bodies(UNET16) == 2  # deleted and retried once, then the error
    msg = str(e.value)
    assert "checksum mismatch" in msg and UNET16 in msg and "\n" not in msg
    assert not (tmp_path / UNET16).exists() and not (tmp_path / (UNET16 + ".part")).exists()


# -----------------------------------------------------------------------------
# errors

def test_401_says_to_set_hf_token(tmp_path, ms_files):
    with serve_hub({MS: ms_files}, token="right") as (url, _):
        with pytest.raises(dl.DownloadError) as no_token:
            fetch(url, tmp_path)
        with pytest.raises(dl.DownloadError) as bad_token:
            fetch(url, tmp_path, token="wrong")
    assert "HTTP 401" in str(no_token.value) and "set HF_TOKEN" in str(no_token.value) and MS in str(no_token.value)
    assert "HF_TOKEN was not accepted" in str(bad_token.value)
    assert "license" in str(no_token.value)


def test_404_names_the_file_the_revision_or_the_repository(tmp_path, ms_files):
    files = dict(ms_files)
    del files["tokenizer/merges.txt"]
    with serve_hub({MS: files}) as (url, _):
        with pytest.raises(dl.DownloadError) as entry:
            fetch(url, tmp_path)
        with pytest.raises(dl.DownloadError) as rev:
            fetch(url, tmp_path, revision="refs/pr/46")
    with serve_hub({"someone/else": files}) as (url, _):
        with pytest.raises(dl.DownloadError) as repo:
            fetch(url, tmp_path, token="any")
    assert str(entry.value) == f"file tokenizer/merges.txt not found in {MS} at revision main (HTTP 404)"
    assert str(rev.value) == f"revision 'refs/pr/46' not found in {MS} (HTTP 404)"
    assert str(repo.value) == f"repository {MS} not found on {url} (HTTP 404)"


def test_no_network(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(dl.DownloadError) as e:
        fetch(f"http://127.0.0.1:{port}", tmp_path, retries=2)
    assert f"no answer from 127.0.0.1:{port} after 3 attempts" in str(e.value) and "\n" not in str(e.value)


def test_disk_space_check(tmp_path, ms_files, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with serve_hub({MS: ms_files}) as (url, hub):
        with pytest.raises(dl.DownloadError, match=r"not enough disk space in .*: 0\.00 GB needed, 0\.00 GB free"):
            fetch(url, tmp_path)
        assert hub.count("GET") == 0  # checked before any body


# -----------------------------------------------------------------------------
# re-runs

def test_rerun_downloads_nothing(tmp_path, ms_files):
    with serve_hub({MS: ms_files}) as (url, hub):
        fetch(url, tmp_path)
        n = len(hub.log)
        fetch(url, tmp_path)  # trusts .verified.json: HEADs only
        assert hub.count("GET") == len(MS_FP16) + 3 and all(e["method"] == "HEAD" for e in hub.log[n:])
        os.remove(tmp_path / dl.STATE_FILE)  # no record: files are hashed, still nothing fetched
        fetch(url, tmp_path)
        fetch(url, tmp_path, rehash=True)
        assert hub.count("GET") == len(MS_FP16) + 3
        # a flipped byte in a local file (same size, same mtime) is caught by --rehash only
        path = tmp_path / UNET16
        st = os.stat(path)
        data = bytearray(path.read_bytes())
        data[100] ^= 1
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        fetch(url, tmp_path)
        assert hub.bodies(UNET16) == 1
        fetch(url, tmp_path, rehash=True)
        assert hub.bodies(UNET16) == 2 and hub.count("GET") == len(MS_FP16) + 3 + 2
    assert_same_bytes(tmp_path, ms_files, MS_FP16)


# -----------------------------------------------------------------------------
# Zeroscope: .bin -> safetensors

def test_zeroscope_conversion(tmp_path, zs_files):
    with serve_hub({ZS: zs_files}) as (url, hub):
        fetch(url, tmp_path, "zeroscope")
        gets = {e["path"] for e in hub.log if e["method"] == "GET"}
        n_get = hub.count("GET")
        fetch(url, tmp_path, "zeroscope")  # the .bin files are gone; the record keeps the re-run quiet
        assert hub.count("GET") == n_get
        fetch(url, tmp_path, "zeroscope", rehash=True)
        assert hub.count("GET") == n_get
        unet = tmp_path / "unet/diffusion_pytorch_model.safetensors"
        os.utime(unet, ns=(0, 10**18))  # a copied folder: new mtime, same bytes -> hashed, kept
        fetch(url, tmp_path, "zeroscope")
        assert hub.count("GET") == n_get
        unet.write_bytes(unet.read_bytes()[:-1] + b"?")  # damaged: fetched and converted again
        fetch(url, tmp_path, "zeroscope")
        assert hub.bodies("unet/diffusion_pytorch_model.bin") == 2 and hub.count("GET") == n_get + 2
    assert gets == set(SMALL) | {"unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin",
                                 "text_encoder/pytorch_model.bin"}
    assert local_files(tmp_path) == sorted(ZS_FILES + [dl.STATE_FILE])  # .bin deleted, no .tmp/.part
    want = fake_state_dicts(seed=1)  # what the fake .bin files were made from
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        for dtype in (torch.float16, torch.float32):
            assert pick_weights_file(str(tmp_path / comp), stem, dtype) == str(tmp_path / comp / f"{stem}.safetensors")
        path = tmp_path / comp / f"{stem}.safetensors"
        entries, _ = read_header(str(path))  # the project's own header parser accepts it
        assert set(entries) == set(want[comp])
        with safe_open(str(path), framework="pt") as f:
            assert set(f.keys()) == set(want[comp])
            for k, t in want[comp].items():
                got = f.get_tensor(k)
                assert got.dtype == t.dtype and torch.equal(got, t), k


def test_zeroscope_bin_of_the_wrong_component_is_rejected(tmp_path, zs_files):
    files = dict(zs_files)
    files["unet/diffusion_pytorch_model.bin"] = files["vae/diffusion_pytorch_model.bin"]
    with serve_hub({ZS: files}) as (url, _):
        with pytest.raises(dl.DownloadError) as e:
            fetch(url, tmp_path, "zeroscope")
    assert "unet/diffusion_pytorch_model.bin: expected tensor conv_in.weight of shape [320, 4, 3, 3]" in str(e.value)
    assert not (tmp_path / "unet/diffusion_pytorch_model.safetensors").exists()
    assert not (tmp_path / "unet/diffusion_pytorch_model.safetensors.tmp").exists()


def test_zeroscope_pickle_with_code_is_refused(tmp_path, zs_files):
    files = dict(zs_files)
    files["vae/diffusion_pytorch_model.bin"] = torch_bytes({"decoder.conv_in.weight": fractions.Fraction(1, 3)})
    with serve_hub({ZS: files}) as (url, _):
        with pytest.raises(dl.DownloadError, match="cannot load as a weights-only checkpoint"):
            fetch(url, tmp_path, "zeroscope")


# -----------------------------------------------------------------------------
# the command line

def test_cli(tmp_path, ms_files, monkeypatch, capsys):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with serve_hub({MS: ms_files}, token="tok") as (url, _):
        env = dict(os.environ, HF_ENDPOINT=url)
        env.pop("HF_TOKEN", None)
        p = subprocess.run([sys.executable, "weights/download.py", "--dest", str(tmp_path / "a"), "--quiet"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 1, p.stderr
        assert p.stderr.strip().startswith("download.py: error: ") and "HF_TOKEN" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", "tok")
        assert dl.main(["--dest", str(tmp_path / "b"), "--quiet"]) == 0
    assert_same_bytes(tmp_path / "b", ms_files, MS_FP16)
    state = json.loads((tmp_path / "b" / dl.STATE_FILE).read_text())
    assert state["files"][UNET16]["sha256"] == hashlib.sha256(ms_files[UNET16]).hexdigest()
