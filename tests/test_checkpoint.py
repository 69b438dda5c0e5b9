"""Bad checkpoints and configs give one clear CheckpointError that says what and where; loading is lean.

What to read: `style.md` §4.6 (loud, accountable loading), `modelscope-architecture.md` §3.1
(config keys, unknown keys accepted with a note), §6 (keys and shapes).

Official implementation: none; diffusers' `ModelMixin.from_pretrained` is the permissive contrast.
The oracle here is hand-made damage to a known-good folder: each test names the file, tensor and
shapes it broke and checks the message repeats them. The loader's own guarantees (no initialisers run
under the meta build, nothing left behind by it, memory format and integer dtypes kept, peak RSS of an
fp16 load) are checked on small hand-built modules that do not depend on lvd's models.

Differences: no diffusers needed; the good folder is saved from lvd's own UNet3D at a small config
(2 levels, 32/64 channels, head dim 32) with safetensors.torch.save_file.
"""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

import weights.checkpoint as ckpt
from unet3d import UNet3D, UNet3DConfig
from weights.checkpoint import CheckpointError, config_from_json, load_module, read_header

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = UNet3DConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                     up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), attention_head_dim=32,
                     cross_attention_dim=16, layers_per_block=1)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in UNet3D(SMALL).state_dict().items()}


def write_config(folder, **changes):
    cfg = {"_class_name": "UNet3DConditionModel", **dataclasses.asdict(SMALL), **changes}
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def good(tmp_path, state):
    """A fresh copy of a valid folder (config.json + fp32 safetensors) for each test to damage."""
    write_config(tmp_path)
    save_file(state, tmp_path / WEIGHTS)
    return tmp_path


def one_line_error(fn, *args, **kwargs):
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_good_folder_loads(good, state):
    m = UNet3D.from_pretrained(str(good))
    sd = m.state_dict()
    assert set(sd) == set(state) and all(torch.equal(sd[k], state[k]) for k in state)
    assert not m.training and not any(p.requires_grad for p in m.parameters())


# -----------------------------------------------------------------------------
# damaged weight files

def test_missing_weight_file(good):
    (good / WEIGHTS).unlink()
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(good) in msg and WEIGHTS in msg
    missing = good / "nope.safetensors"
    msg = one_line_error(load_module, lambda: UNet3D(SMALL), str(missing))
    assert str(missing) in msg and "not found" in msg


def test_truncated_file(good):
    path = good / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(path) in msg and "truncated" in msg
    path.write_bytes(data[:5])  # not even the 8-byte header length
    msg = one_line_error(read_header, str(path))
    assert str(path) in msg and "truncated" in msg


def test_corrupt_header(good):
    path = good / WEIGHTS
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8:8 + n] = b"\x00not json" + b"#" * (n - 9)  # same length, garbage
    path.write_bytes(bytes(data))
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(path) in msg and "header" in msg
    data[:8] = (10 ** 12).to_bytes(8, "little")  # absurd header length
    path.write_bytes(bytes(data))
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(path) in msg and "header" in msg


def rewrite_header(path, edit):
    """Apply edit(header_dict) to a safetensors header, keeping the data bytes as they are."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def test_header_entry_inconsistent_with_its_shape(good):
    key = "conv_in.weight"

    def edit(h):
        h[key]["shape"] = [h[key]["shape"][0], 1, 1, 1]  # byte range no longer matches the shape
    rewrite_header(good / WEIGHTS, edit)
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(good / WEIGHTS) in msg and key in msg


def test_missing_key(good, state):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    save_file({k: v for k, v in state.items() if k != key}, good / WEIGHTS)
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(good / WEIGHTS) in msg and "missing 1 tensors" in msg and key in msg


def test_extra_key(good, state):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.bias"
    save_file({**state, key: torch.zeros(32)}, good / WEIGHTS)
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(good / WEIGHTS) in msg and "unexpected 1 tensors" in msg and key in msg


def test_wrong_shape(good, state):
    key = "up_blocks.1.temp_convs.0.conv2.3.weight"
    want = list(state[key].shape)  # [32, 32, 3, 1, 1]
    save_file({**state, key: torch.zeros(32, 32, 1, 1, 1)}, good / WEIGHTS)
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(good / WEIGHTS) in msg and key in msg
    assert f"expected shape {want}" in msg and "found [32, 32, 1, 1, 1]" in msg


def test_fp16_file_into_default_dtype_keeps_file_dtype(good, state):
    """Dtype conversion is explicit: without dtype the file's dtype is kept; with it, converted."""
    save_file({k: v.half() for k, v in state.items()}, good / WEIGHTS)
    assert next(UNet3D.from_pretrained(str(good)).parameters()).dtype == torch.float16
    assert next(UNet3D.from_pretrained(str(good), dtype=torch.float32).parameters()).dtype == torch.float32


# -----------------------------------------------------------------------------
# the loader itself, on a small hand-built module

class Small(nn.Module):
    """A conv built channels_last, a linear, an embedding and an int64 buffer: each kind the loader meets."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv.weight.data = self.conv.weight.data.contiguous(memory_format=torch.channels_last)
        self.proj = nn.Linear(8, 4)
        self.emb = nn.Embedding(10, 4)
        self.register_buffer("ids", torch.arange(5))


@pytest.fixture
def small(tmp_path):
    """(path, state) of a valid file for Small, with seeded random values."""
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in Small().state_dict().items()}
    path = tmp_path / "small.safetensors"
    save_file(state, path)
    return path, state


def test_load_module_keeps_values_layout_and_integer_dtypes(small):
    path, state = small
    m = load_module(Small, str(path))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    m = load_module(Small, str(path), device="cpu", dtype=torch.float16)
    sd = m.state_dict()
    assert all(torch.equal(sd[k], v.half() if v.is_floating_point() else v) for k, v in state.items())
    assert sd["ids"].dtype == torch.int64 and sd["proj.weight"].dtype == torch.float16
    assert m.conv.weight.is_contiguous(memory_format=torch.channels_last) and not m.conv.weight.is_contiguous()
    assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_loader_missing_tensor(small):
    path, state = small
    save_file({k: v for k, v in state.items() if k != "proj.bias"}, path)
    msg = one_line_error(load_module, Small, str(path))
    assert str(path) in msg and "missing 1 tensors: proj.bias" in msg


def test_loader_unexpected_tensor(small):
    path, state = small
    save_file({**state, "proj.scale": torch.ones(4)}, path)
    msg = one_line_error(load_module, Small, str(path))
    assert str(path) in msg and "unexpected 1 tensors: proj.scale" in msg


def test_loader_misshaped_tensor(small):
    path, state = small
    save_file({**state, "proj.weight": torch.zeros(4, 9)}, path)
    msg = one_line_error(load_module, Small, str(path))
    assert str(path) in msg and "tensor proj.weight: expected shape [4, 8], found [4, 9]" in msg


def test_loader_wrong_dtype_kind(small):
    path, state = small
    save_file({**state, "emb.weight": torch.zeros(10, 4, dtype=torch.int64), "ids": torch.zeros(5)}, path)
    msg = one_line_error(load_module, Small, str(path), dtype=torch.float16)
    assert str(path) in msg and "tensor emb.weight: dtype I64, expected a floating tensor" in msg
    assert "tensor ids: dtype F32, expected an integer tensor" in msg


def test_loader_truncated_file_names_the_tensor(small):
    path, _ = small
    entries, offset = read_header(str(path))
    data = path.read_bytes()
    for key in (min(entries, key=lambda k: entries[k][2][0]), max(entries, key=lambda k: entries[k][2][0])):
        begin, end = entries[key][2]
        path.write_bytes(data[:offset + (begin + end) // 2])  # cut inside `key`: it and all after it are gone
        msg = one_line_error(load_module, Small, str(path))
        assert str(path) in msg and "truncated" in msg and f"tensor {key} " in msg


def test_loader_rename_collision(small):
    path, _ = small
    msg = one_line_error(load_module, Small, str(path), rename=lambda k: "proj.bias" if k.startswith("proj.") else k)
    assert str(path) in msg and "proj.bias" in msg and "proj.weight" in msg and "both map to" in msg


def failing_read_of_proj_weight(monkeypatch, error):
    """Make safe_open's reads of proj.weight raise `error` (a read that fails part-way: the file changed on disk, an
    I/O error); every other tensor reads as it is."""
    real_open = ckpt.safe_open

    class Failing(contextlib.nullcontext):
        def __init__(self, *a, **k):
            super().__init__()
            self.inner = real_open(*a, **k)

        def __enter__(self):
            return self

        def get_tensor(self, key):
            if key == "proj.weight":
                raise error
            return self.inner.get_tensor(key)
    monkeypatch.setattr(ckpt, "safe_open", Failing)


def test_safetensors_errors_become_one_line(small, monkeypatch):
    """A file our header check accepts but safetensors rejects, and a read that fails: no traceback."""
    path, _ = small
    data = path.read_bytes()
    path.write_bytes(data + b"trailing")  # safetensors: "incomplete metadata, file not fully covered"
    read_header(str(path))  # passes our check
    msg = one_line_error(load_module, Small, str(path))
    assert str(path) in msg and "SafetensorError" in msg
    path.write_bytes(data)
    failing_read_of_proj_weight(monkeypatch, SafetensorError("Error while reading: failed to fill whole buffer\n"
                                                                "second line"))
    msg = one_line_error(load_module, Small, str(path))
    assert str(path) in msg and "tensor proj.weight" in msg and "failed to fill whole buffer" in msg


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the staged GPU load)")


@needs_cuda
@pytest.mark.parametrize("slot_bytes", [None, 256])
def test_cuda_load_equals_cpu_load(small, monkeypatch, slot_bytes):
    """The GPU load (mmap -> pinned slots -> GPU) gives the CPU load's values, dtypes and layouts; with 256-byte slots
    every tensor switches slot, so each waits for the other slot's copies."""
    path, state = small
    if slot_bytes:
        monkeypatch.setattr(ckpt, "_SLOT_BYTES", slot_bytes)
    for dtype in (None, torch.float16):
        cpu = load_module(Small, str(path), device="cpu", dtype=dtype).state_dict()
        m = load_module(Small, str(path), device="cuda", dtype=dtype)
        gpu = m.state_dict()
        assert all(gpu[k].is_cuda and gpu[k].dtype == cpu[k].dtype and torch.equal(gpu[k].cpu(), cpu[k]) for k in cpu)
        assert m.conv.weight.is_contiguous(memory_format=torch.channels_last) and gpu["ids"].dtype == torch.int64


@needs_cuda
def test_cuda_load_of_slot_sized_tensors(tmp_path, monkeypatch):
    """Eight 8 MiB tensors through two 8 MiB slots: a slot is refilled only after its copy to the GPU is done."""
    gen = torch.Generator().manual_seed(3)
    build = lambda: nn.Sequential(*[nn.Linear(2048, 1024, bias=False) for _ in range(8)])
    state = {f"{i}.weight": torch.randn(1024, 2048, generator=gen) for i in range(8)}
    save_file(state, tmp_path / "big.safetensors")
    monkeypatch.setattr(ckpt, "_SLOT_BYTES", 1024 * 2048 * 4)
    sd = load_module(build, str(tmp_path / "big.safetensors"), device="cuda").state_dict()
    assert all(torch.equal(sd[k].cpu(), v) for k, v in state.items())


@needs_cuda
def test_cuda_load_small_unet_equals_cpu_load(good):
    cpu = UNet3D.from_pretrained(str(good), "cpu", torch.float16).state_dict()
    gpu = UNet3D.from_pretrained(str(good), "cuda", torch.float16).state_dict()
    assert set(gpu) == set(cpu) and all(torch.equal(gpu[k].cpu(), cpu[k]) for k in cpu)


@needs_cuda
def test_cuda_load_read_error_is_one_line(small, monkeypatch):
    path, _ = small
    failing_read_of_proj_weight(monkeypatch, OSError("Input/output error"))
    msg = one_line_error(load_module, Small, str(path), device="cuda")
    assert str(path) in msg and "tensor proj.weight" in msg and "Input/output error" in msg


def test_meta_build_skips_initialisers_and_leaves_nothing_behind():
    torch.manual_seed(2)
    init_fns = {n: getattr(nn.init, n) for n in dir(nn.init)}
    with ckpt._meta_build():
        m = nn.Embedding(4, 3)
        assert m.weight.is_meta and nn.init.normal_(m.weight) is m.weight
        real = torch.zeros(3, device="cpu")
        real.normal_()  # real tensors are initialised as usual
        assert real.abs().sum() > 0
    assert torch._C._len_torch_function_stack() == 0
    with pytest.raises(ZeroDivisionError), ckpt._meta_build():
        1 / 0
    assert torch._C._len_torch_function_stack() == 0
    assert {n: getattr(nn.init, n) for n in dir(nn.init)} == init_fns
    t = torch.zeros(100)
    nn.init.normal_(t)
    assert not torch.empty(1).is_meta and t.std() > 0.5


# -----------------------------------------------------------------------------
# peak memory and start-up work of a real load, in a fresh process

RSS_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from torch import nn
    from weights.checkpoint import load_module

    def status(field):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

    path, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    build = lambda: nn.ModuleList([nn.Embedding(8, d), *(nn.Linear(d, d, bias=False) for _ in range(n))])
    base = status("VmRSS")
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0): the peak measured is this load's own
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    except OSError:
        reset = False  # VmHWM then includes the import's peak: can only overstate the growth
    m = load_module(build, path, dtype=torch.float16)
    for p in m.parameters():  # fault in every 4 KiB page, in case the weights are a file mapping
        p.view(-1)[::2048].sum()
    print(json.dumps({"growth": status("VmHWM") - base, "reset": reset,
                      "dynamo": "torch._dynamo" in sys.modules,
                      "dtypes": sorted({str(p.dtype) for p in m.parameters()}),
                      "check": float(m[1].weight[3, :7].float().sum())}))
""")


@pytest.fixture(scope="module")
def rss_load(tmp_path_factory):
    """Write a 264 MB fp16 file (one 8x2048 embedding, 33 2048x2048 linears), load it in a fresh process."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak RSS is read from /proc (Linux)")
    n, d = 33, 2048
    torch.manual_seed(3)
    state = {f"{i}.weight": torch.randn(8 if i == 0 else d, d).half() for i in range(n + 1)}
    path = tmp_path_factory.mktemp("rss") / "big.safetensors"
    save_file(state, path)
    check = float(state["1.weight"][3, :7].float().sum())
    del state
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(n), str(d)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "size": os.path.getsize(path), "want": check}


def test_fp16_load_peak_rss_is_one_copy(rss_load):
    r = rss_load
    assert r["dtypes"] == ["torch.float16"] and r["check"] == r["want"]
    # Bound: 1.5 x the file (the target). Measured on the 2-core dev box (torch 2.13, safetensors 0.8),
    # 10 fresh runs: growth 1.039 x the file every time (the weights once, one 8 MiB tensor in flight, a few MB
    # of allocator slack), with the pread backend and with the mmap one alike. Broken loaders measured: an extra
    # copy of each tensor kept (mmap + clone) 2.03 x, an fp32 detour 3.06 x. Noise is far below the margin.
    assert r["growth"] <= 1.5 * r["size"], f"peak RSS grew {r['growth'] / r['size']:.2f} x the file"


def test_meta_build_does_not_import_dynamo(rss_load):
    """nn.Embedding's normal_ on meta is a Python decomposition whose first call imports torch._dynamo
    (1-2 s of CLI start-up); the meta build skips initialisers, so nothing imports it."""
    assert not rss_load["dynamo"]


# -----------------------------------------------------------------------------
# bad configs

def test_config_channels_not_multiple_of_head_dim(good):
    write_config(good, attention_head_dim=64, block_out_channels=[64, 96])
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(good / "config.json") in msg and "block_out_channels" in msg and "96" in msg


def test_config_unknown_block_type(good):
    write_config(good, down_block_types=["CrossAttnDownBlock2D", "DownBlock3D"])
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(good / "config.json") in msg and "CrossAttnDownBlock2D" in msg


def test_config_missing(good):
    (good / "config.json").unlink()
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(good / "config.json") in msg and "not found" in msg


def test_config_not_json(good):
    (good / "config.json").write_text('{"block_out_channels": [32, 64],')
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(good / "config.json") in msg and "JSON" in msg


def test_config_not_an_object(good):
    (good / "config.json").write_text("[32, 64]")
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(good / "config.json") in msg


def test_config_wrong_type(good):
    write_config(good, layers_per_block="two")
    msg = one_line_error(UNet3D.from_pretrained, str(good))
    assert str(good / "config.json") in msg and "layers_per_block" in msg and "two" in msg


def test_config_unknown_keys_warn_not_fail(good, state):
    write_config(good, flip_sin_to_cos=True, mid_block_type="UNetMidBlock3DCrossAttn", _diffusers_version="0.15.0")
    with pytest.warns(UserWarning, match="flip_sin_to_cos") as rec:
        m = UNet3D.from_pretrained(str(good))
    assert "mid_block_type" in str(rec[0].message) and "_diffusers_version" not in str(rec[0].message)
    assert set(m.state_dict()) == set(state)
    cfg = config_from_json(UNet3DConfig, {**dataclasses.asdict(SMALL), "_class_name": "UNet3DConditionModel"})
    assert cfg == SMALL  # underscore keys are silent, and the fields round-trip
