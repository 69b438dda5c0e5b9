"""Bad checkpoints and configs give one clear CheckpointError that says what and where.

What to read: `style.md` §4.6 (loud, accountable loading), `modelscope-architecture.md` §3.1
(config keys, unknown keys accepted with a note), §6 (keys and shapes).

Official implementation: none; diffusers' `ModelMixin.from_pretrained` is the permissive contrast.
The oracle here is hand-made damage to a known-good folder: each test names the file, tensor and
shapes it broke and checks the message repeats them.

Differences: no diffusers needed; the good folder is saved from lvd's own UNet3D at a small config
(2 levels, 32/64 channels, head dim 32) with safetensors.torch.save_file.
"""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from unet3d import UNet3D, UNet3DConfig
from weights.checkpoint import CheckpointError, config_from_json, load_module, read_header

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
