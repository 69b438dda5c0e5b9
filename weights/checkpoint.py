"""Strict, lean loading of diffusers/transformers-format checkpoints.

What to read: `modelscope-architecture.md` §2 (files and sizes), §6–§8 (keys and shapes), and the
style guide §4.6 ("loud, accountable loading").

Official implementation: diffusers `ModelMixin.from_pretrained` (modeling_utils.py) and transformers
`PreTrainedModel.from_pretrained`; both are far more general and far more permissive than this.

Differences:
- The safetensors file is parsed here (8-byte header length, JSON header, raw data), so that
  * the key set and every shape are checked *before* anything is allocated,
  * a missing, truncated or corrupt file gives a one-line error that names the file,
  * each tensor is read with `readinto` straight into a buffer of its own dtype: no mmap pages
    and no second copy, so peak memory stays near one copy of the file.
- Modules are built on the meta device and filled with `load_state_dict(strict=True, assign=True)`.
- Renames are one declarative table per model (`rename(key) -> key or None`); None drops a key on
  purpose. Nothing is ever loaded with strict=False.
"""
import dataclasses
import json
import os
import warnings

import torch

# safetensors dtype names -> torch dtypes (the subset a diffusion checkpoint can hold)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(Exception):
    """A weight file or config that does not fit the model. The message says what and where."""


# -----------------------------------------------------------------------------
# config.json -> dataclass

def config_from_json(cls, source):
    """Build the dataclass `cls` from a config.json path or dict.

    Keys that are not fields (older revisions carry extra UNet2D-style keys, and every file carries
    `_class_name`, `_diffusers_version`, ...) are ignored and reported once in a warning, never used.
    A missing required field or a wrong type is a CheckpointError naming the file and the field.
    """
    where = "config"
    if not isinstance(source, dict):
        where = str(source)
        if not os.path.isfile(source):
            raise CheckpointError(f"{where}: config file not found")
        try:
            with open(source, encoding="utf-8") as fh:
                source = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(source, dict):
        raise CheckpointError(f"{where}: expected a JSON object of config keys, found {type(source).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = {k: v for k, v in source.items() if k in fields}
    unknown = sorted(k for k in source if k not in fields and not k.startswith("_"))
    if unknown:
        warnings.warn(f"{where}: ignoring config keys not used by {cls.__name__}: {', '.join(unknown)}")
    try:
        cfg = cls(**known)
    except TypeError as e:
        raise CheckpointError(f"{where}: {e}") from None
    for name, f in fields.items():  # light type check of the values that reached the dataclass
        v = getattr(cfg, name)
        expect = type(f.default) if f.default is not dataclasses.MISSING else None
        if v is None and f.default is None:
            continue
        if expect in (int, float) and not isinstance(v, (int, float)) or expect is str and not isinstance(v, str):
            raise CheckpointError(f"{where}: field {name!r} should be {expect.__name__}, found {v!r}")
        if isinstance(f.default, (tuple, list)) or f.default_factory is not dataclasses.MISSING:
            if not isinstance(v, (list, tuple)):
                raise CheckpointError(f"{where}: field {name!r} should be a list, found {v!r}")
            setattr(cfg, name, tuple(v))
    if hasattr(cfg, "validate"):
        problem = cfg.validate()
        if problem:
            raise CheckpointError(f"{where}: {problem}")
    return cfg


# -----------------------------------------------------------------------------
# safetensors header and raw reads

def read_header(path):
    """Return ({key: (dtype_name, shape, (begin, end))}, data_offset) of a safetensors file.

    Raises CheckpointError for a missing, truncated or corrupt file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weight file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    entries, data_end = {}, 0
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * _DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} byte range does not match its shape {list(shape)}")
        entries[key] = (dtype, shape, (begin, end))
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path}: truncated file: the header needs {8 + n + data_end} bytes, the file has {size}"
                              " (an interrupted download? fetch it again)")
    return entries, 8 + n


def pick_weights_file(folder, stem, dtype):
    """`{stem}.fp16.safetensors` when fp16 is asked for and present, else `{stem}.safetensors`.

    stem is e.g. "diffusion_pytorch_model" (unet, vae) or "model" (text_encoder).
    """
    fp16 = os.path.join(folder, f"{stem}.fp16.safetensors")
    full = os.path.join(folder, f"{stem}.safetensors")
    if dtype == torch.float16 and os.path.isfile(fp16):
        return fp16
    if os.path.isfile(full):
        return full
    if os.path.isfile(fp16):
        return fp16
    raise CheckpointError(f"{folder}: no {stem}.safetensors or {stem}.fp16.safetensors found"
                          " (download the weights with: python weights/download.py)")


# -----------------------------------------------------------------------------
# strict loading

def _diff_message(path, missing, unexpected, misshaped):
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensors: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
    for key, want, got in misshaped[:6]:
        parts.append(f"tensor {key}: expected shape {list(want)}, found {list(got)}")
    if len(misshaped) > 6:
        parts.append(f"... and {len(misshaped) - 6} more mis-shaped tensors")
    return f"{path}: does not fit the model: " + "; ".join(parts)


def load_module(build, path, rename=None, device=None, dtype=None):
    """Build a module on the meta device and fill it strictly from a safetensors file.

    build: a zero-argument callable returning the nn.Module (called under the meta device).
    rename: callable mapping a file key to a module key, or None to drop it on purpose.
    Floating tensors are read in the file's dtype and converted tensor by tensor to `dtype`.
    """
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        module = build()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    entries, offset = read_header(path)
    mapped = {}  # module key -> file key
    for fkey in entries:
        mkey = rename(fkey) if rename else fkey
        if mkey is not None and mkey in mapped:
            raise CheckpointError(f"{path}: tensors {mapped[mkey]} and {fkey} both map to {mkey}")
        if mkey is not None:
            mapped[mkey] = fkey
    missing = sorted(k for k in expected if k not in mapped)
    unexpected = sorted(mapped[k] for k in mapped if k not in expected)
    misshaped = [(k, expected[k], entries[mapped[k]][1]) for k in sorted(expected)
                 if k in mapped and entries[mapped[k]][1] != expected[k]]
    state_dtypes = {k: v.dtype for k, v in module.state_dict().items()}
    for k in sorted(k for k in expected if k in mapped):
        if _DTYPES[entries[mapped[k]][0]].is_floating_point != state_dtypes[k].is_floating_point:
            raise CheckpointError(f"{path}: tensor {mapped[k]} has dtype {entries[mapped[k]][0]}, "
                                  f"expected a {'floating' if state_dtypes[k].is_floating_point else 'integer'} tensor")
    if missing or unexpected or misshaped:
        raise CheckpointError(_diff_message(path, missing, unexpected, misshaped))

    state = {}
    order = sorted(expected, key=lambda k: entries[mapped[k]][2][0])  # sequential reads
    with open(path, "rb") as fh:
        for key in order:
            dt, shape, (begin, end) = entries[mapped[key]]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            fh.seek(offset + begin)
            if fh.readinto(buf.numpy()) != end - begin:
                raise CheckpointError(f"{path}: truncated while reading tensor {mapped[key]}")
            t = buf.view(_DTYPES[dt]).reshape(shape)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            state[key] = t.to(device)
    module.load_state_dict(state, strict=True, assign=True)
    for b_name, b in list(module.named_buffers()):  # non-persistent buffers stay on meta: none expected
        if b.is_meta:
            raise CheckpointError(f"{path}: buffer {b_name} was not filled by the checkpoint")
    return module.eval().requires_grad_(False)
