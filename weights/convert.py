"""Zeroscope's fp16 pickles (.bin) -> safetensors, for weights/download.py: loaded weights-only, checked,
written, read back through safetensors' own reader and compared byte for byte.

What to read: `modelscope-architecture.md` §2.3 (Zeroscope's files), §6.2, §7.3, §8.3 (the shapes checked).

Official implementation: diffusers loads the .bin with torch.load; nothing is converted there.
"""
import hashlib
import json
import os
import types

import torch
from safetensors import safe_open

from weights.hub import DownloadError, short

# one tensor per component with its shape (§6.2, §7.3, §8.3): catches a .bin in the wrong folder
_SIGNATURE = types.MappingProxyType({"unet": ("conv_in.weight", (320, 4, 3, 3)),
                                     "vae": ("decoder.conv_in.weight", (512, 4, 3, 3)),
                                     "text_encoder": ("final_layer_norm.weight", (1024,))})
_ST_DTYPE = types.MappingProxyType({
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL"})


def _write_safetensors(tensors, path, metadata):
    """Write tensors in the safetensors layout (8-byte header size, JSON header, raw data); -> sha256."""
    header, offset = {"__metadata__": metadata}, 0
    for k in sorted(tensors):
        t = tensors[k]
        if t.dtype not in _ST_DTYPE:
            raise DownloadError(f"{path}: tensor {k} has dtype {t.dtype}, which safetensors cannot hold here")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        for piece in (len(blob).to_bytes(8, "little"), blob):
            fh.write(piece)
            h.update(piece)
        for k in sorted(tensors):
            raw = tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy()  # any shape -> (bytes,)
            fh.write(raw)
            h.update(raw)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()


def convert(src, dst):
    """Load a .bin weights-only, check it, write dst atomically, read it back, compare; -> sha256."""
    try:
        sd = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is not plain tensors, or a damaged file
        raise DownloadError(f"{src}: cannot load as a weights-only checkpoint ({type(e).__name__}: {short(e)})") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
        raise DownloadError(f"{src}: not a flat state dict of named tensors")
    name, shape = _SIGNATURE[os.path.basename(os.path.dirname(src))]
    found = sd.get(name, sd.get("text_model." + name))
    if found is None or tuple(found.shape) != shape:
        raise DownloadError(f"{src}: expected tensor {name} of shape {list(shape)}, found "
                            f"{'none' if found is None else list(found.shape)} (a file of another component?)")
    tmp = dst + ".tmp"
    try:
        sha = _write_safetensors(sd, tmp, {"format": "pt", "converted_from": os.path.basename(src)})
        with safe_open(tmp, framework="pt") as f:  # round trip through safetensors' own reader
            keys = set(f.keys())
            if keys != set(sd):
                raise DownloadError(f"{dst}: converted keys differ from {src} ({len(keys ^ set(sd))} keys)")
            for k, t in sd.items():
                back = f.get_tensor(k)
                same = back.dtype == t.dtype and back.shape == t.shape and torch.equal(
                    back.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8))  # bytes
                if not same:
                    raise DownloadError(f"{dst}: tensor {k} differs after conversion from {src}")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return sha
