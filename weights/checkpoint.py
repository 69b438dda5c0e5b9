"""Strict, lean loading of diffusers/transformers-format checkpoints.

What to read: `modelscope-architecture.md` §2 (files and sizes), §6–§8 (keys and shapes), and the
style guide §4.6 ("loud, accountable loading").

What it reads: `config.json` into a config dataclass, and one `.safetensors` file into a module built
from that config. Tensor bytes are read by the `safetensors` library (`safe_open` / `get_tensor`).

Official implementation: diffusers `ModelMixin.from_pretrained` (modeling_utils.py) and transformers
`PreTrainedModel.from_pretrained`; both are far more general and far more permissive than this.

Differences:
- The safetensors header is parsed and checked here (`read_header`) *before* the module's weights are
  allocated: strict key set (missing and unexpected tensors listed), every shape, floating vs integer
  dtypes, two file keys renamed onto one module key, a missing, truncated or corrupt file. Every such
  problem, and any safetensors error while reading, is a one-line CheckpointError naming the file
  (and the tensor, where there is one).
- Modules are built on the meta device with their initialisers skipped (`_meta_build`): the values are
  never read, and some meta initialisers (normal_, erfinv_, clamp_) are Python decompositions whose
  first call imports torch._dynamo (~1-2 s of a start-up). Then `load_state_dict(strict=True, assign=True)`.
- Each tensor keeps the memory format the module was built with (e.g. channels_last convolutions) and
  is converted to `dtype` (floating tensors only), one tensor at a time.
- CPU loads use safetensors' `pread` backend where it exists (safetensors >= 0.8): every tensor is read
  into memory of its own, so peak RSS stays near one copy of the file and the module does not depend
  on the file afterwards. Older safetensors memory-maps the file (default backend): tensors that need
  no conversion then stay views of the mapping (zero copy; the file must not be rewritten in place
  while the module lives, which the downloader never does: it renames finished files into place).
- GPU loads memory-map the file and copy each tensor (a view of the mapping) into one of two pinned
  slots, converting its dtype on the way, then on to the GPU asynchronously: one slot's transfer runs
  while the next tensors fill the other (`_staged_to_cuda`). The mapping is closed when the load ends.
- Renames are one declarative table per model (`rename(key) -> key or None`); None drops a key on
  purpose. Nothing is ever loaded with strict=False.
"""
import contextlib
import dataclasses
import json
import os
import warnings

import torch
from safetensors import SafetensorError, safe_open
from torch.overrides import TorchFunctionMode

# safetensors dtype names -> torch dtypes (the subset a diffusion checkpoint can hold)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


_SLOT_BYTES = 64 << 20  # each of the two pinned slots of a GPU load (at least the largest tensor)


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
        cut = min((k for k, e in entries.items() if 8 + n + e[2][1] > size), key=lambda k: entries[k][2][0])
        raise CheckpointError(f"{path}: truncated file: tensor {cut} ends at byte {8 + n + entries[cut][2][1]}, "
                              f"the file has {size} (an interrupted download? fetch it again)")
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
# building on the meta device

# In-place writes that only set values (every torch.nn.init initialiser and the Tensor methods they use):
# on a meta tensor there are no values, so skipping them changes nothing but the time taken.
_VALUE_WRITES = frozenset(
    {n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")}
    | {"uniform_", "normal_", "fill_", "zero_", "random_", "bernoulli_", "exponential_", "geometric_",
       "log_normal_", "cauchy_", "erfinv_", "copy_", "add_", "sub_", "mul_", "div_", "clamp_", "clamp_min_",
       "clamp_max_", "fill_diagonal_", "masked_fill_", "index_fill_"})


class _SkipMetaInit(TorchFunctionMode):
    """Value-only in-place writes (torch.nn.init.*, Tensor.normal_, ...) on a meta tensor return it unchanged.

    Shapes, dtypes and strides are untouched; any other call, and any call on a real tensor, runs as usual.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _VALUE_WRITES:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def _meta_build():
    """Modules built inside have meta tensors and skip initialisation; both modes are popped on exit.

    A torch function mode, not a patch of torch.nn.init or of reset_parameters: it is thread-local and
    scoped, so nothing outside this block (another thread, an exception) ever sees a changed function.
    """
    with torch.device("meta"), _SkipMetaInit():
        yield


# -----------------------------------------------------------------------------
# strict loading

def _diff_message(path, missing, unexpected, misshaped, wrong_kind):
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensors: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
    for key, want, got in misshaped[:6]:
        parts.append(f"tensor {key}: expected shape {list(want)}, found {list(got)}")
    if len(misshaped) > 6:
        parts.append(f"... and {len(misshaped) - 6} more mis-shaped tensors")
    for key, found, want in wrong_kind[:6]:
        parts.append(f"tensor {key}: dtype {found}, expected {want} tensor")
    if len(wrong_kind) > 6:
        parts.append(f"... and {len(wrong_kind) - 6} more tensors of the wrong dtype kind")
    return f"{path}: does not fit the model: " + "; ".join(parts)


def _match(path, entries, meta, rename):
    """{module key: file key} for a file header and a module's (meta) state dict, or a CheckpointError."""
    mapped = {}  # module key -> file key
    for fkey in entries:
        mkey = rename(fkey) if rename else fkey
        if mkey is not None and mkey in mapped:
            raise CheckpointError(f"{path}: tensors {mapped[mkey]} and {fkey} both map to {mkey}")
        if mkey is not None:
            mapped[mkey] = fkey
    missing = sorted(k for k in meta if k not in mapped)
    unexpected = sorted(mapped[k] for k in mapped if k not in meta)
    both = sorted(k for k in meta if k in mapped)
    misshaped = [(mapped[k], tuple(meta[k].shape), entries[mapped[k]][1]) for k in both
                 if entries[mapped[k]][1] != tuple(meta[k].shape)]
    kind = lambda floating: "a floating" if floating else "an integer"
    wrong_kind = [(mapped[k], entries[mapped[k]][0], kind(meta[k].is_floating_point())) for k in both
                  if _DTYPES[entries[mapped[k]][0]].is_floating_point != meta[k].is_floating_point()]
    if missing or unexpected or misshaped or wrong_kind:
        raise CheckpointError(_diff_message(path, missing, unexpected, misshaped, wrong_kind))
    return mapped


def _memory_format(t):
    """The memory format a (meta) tensor was built in: channels_last(_3d) where its strides say so."""
    if not t.is_contiguous():
        for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
            if t.dim() == ndim and t.is_contiguous(memory_format=fmt):
                return fmt
    return torch.contiguous_format


def _open(path, backend):
    """safe_open on the CPU with `backend`: "pread" (tensors in memory of their own) or "mmap" (tensors are views of
    the mapped file, read as they are copied: the staged GPU load). safetensors < 0.8 has only the memory map."""
    try:
        return safe_open(path, framework="pt", device="cpu", backend=backend)
    except TypeError:  # no backend argument
        return safe_open(path, framework="pt", device="cpu")


def _staged_to_cuda(path, fh, items, device):
    """(key, file key, dtype, shape, memory format) items -> (key, tensor on the CUDA `device`), via two pinned slots.

    Each tensor is a view of the memory-mapped file; copying it into a pinned slot reads its bytes (in torch, which
    converts the dtype on the way and releases the GIL), and the slot goes on to the GPU asynchronously while the
    next tensors fill the other slot. A copy straight from the mapping (pageable memory) would wait for each transfer.
    """
    sizes = [dt.itemsize * torch.Size(shape).numel() for _, _, dt, shape, _ in items]
    slot_bytes = max([_SLOT_BYTES, *sizes])
    slots = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    copied, s, used = [None, None], 0, 0
    with torch.cuda.device(device):
        for (key, fkey, dt, shape, fmt), n in zip(items, sizes):
            used = -(-used // 256) * 256  # each tensor 256-byte aligned in the slot
            if used + n > slot_bytes:  # this slot's copies are queued: fill the other one once its copies are done
                copied[s] = torch.cuda.Event()
                copied[s].record()
                s, used = 1 - s, 0
                if copied[s] is not None:
                    copied[s].synchronize()
            host = slots[s][used:used + n].view(dt).view(shape)
            try:
                host.copy_(fh.get_tensor(fkey))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: cannot read tensor {fkey}: {_one_line(e)}") from None
            used += n
            out = torch.empty(shape, dtype=dt, device=device, memory_format=fmt)
            yield key, out.copy_(host, non_blocking=True)
        torch.cuda.current_stream().synchronize()  # before the slots are freed


def _one_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_module(build, path, rename=None, device=None, dtype=None):
    """Build a module on the meta device and fill it strictly from a safetensors file.

    build: a zero-argument callable returning the nn.Module (called under `_meta_build`: meta device,
    initialisers skipped). rename: callable mapping a file key to a module key, or None to drop it on purpose.
    Tensors are read on the CPU, tensor by tensor, and go to a CUDA `device` through pinned slots
    (`_staged_to_cuda`) or to another device type directly; floating tensors are converted to `dtype` on the
    way. Returns the module in eval mode with requires_grad off.
    """
    device = torch.device(device or "cpu")
    with _meta_build():
        module = build()
    meta = module.state_dict()
    entries, _ = read_header(path)  # every check before any weight is allocated
    mapped = _match(path, entries, meta, rename)
    order = sorted(mapped, key=lambda k: entries[mapped[k]][2][0])  # file order
    want = lambda k: dtype if dtype is not None and meta[k].is_floating_point() else _DTYPES[entries[mapped[k]][0]]
    items = [(k, mapped[k], want(k), entries[mapped[k]][1], _memory_format(meta[k])) for k in order]
    state, fkey = {}, None
    try:
        if device.type == "cuda":  # staged through pinned memory (above)
            with _open(path, "mmap") as fh:
                state = dict(_staged_to_cuda(path, fh, items, device))
        else:  # read on the CPU (another device type: then moved)
            with _open(path, "pread") as fh:
                for key, fkey, dt, _, fmt in items:  # no copy where dtype and layout are already the module's
                    state[key] = fh.get_tensor(fkey).to(dt, memory_format=fmt).to(device)
    except (SafetensorError, OSError) as e:  # the file, not torch: a device or memory error stays itself
        where = f"tensor {fkey}" if fkey else "the file"
        raise CheckpointError(f"{path}: cannot read {where}: {_one_line(e)}") from None
    module.load_state_dict(state, strict=True, assign=True)
    for b_name, b in list(module.named_buffers()):  # non-persistent buffers stay on meta: none expected
        if b.is_meta:
            raise CheckpointError(f"{path}: buffer {b_name} was not filled by the checkpoint")
    return module.eval().requires_grad_(False)
