"""The channels-last layout of the UNet's activations: GroupNorm without a copy, what stays channels-last, and
that the layout changes nothing but speed.

What to read: fast/__init__.py (`apply(..., channels_last=True)`); fast/memory.py's `group_norm`.

Oracles: torch's own F.group_norm (fp32 and float64, forward and gradients); the reference UNet (NCHW,
`fast.remove`), which tests/test_unet3d.py ties to diffusers; forward hooks and a
TorchDispatchMode that see every module output and every copy on the CPU (the same ops a GPU runs, bar the
insides of convolutions).

Glossary: b (batch), f (frames), c (channels), h, w (latent height, width), G (groups).
"""
import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import attention as A
import fast
import lvd
from fast.memory import Conv2d, Conv3d, GroupNorm, batch_to_frames, frames_to_batch, group_norm, memory_format
from unet3d import UNet3D, UNet3DConfig
from vae import VAEConfig, VAEDecoder

CL, CL3 = torch.channels_last, torch.channels_last_3d
TINY = dict(block_out_channels=(64, 64, 128, 128), cross_attention_dim=32)
COPIES = ("aten.clone.default", "aten.copy_.default", "aten._to_copy.default")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def unet():
    """The tiny UNet with the fast layer's channels-last forwards (no fused kernels: their own tests)."""
    torch.manual_seed(0)
    return fast.apply(UNet3D(UNet3DConfig(**TINY)).eval().requires_grad_(False), kernels=None)


def inputs(b=2, f=3, h=16, w=24, seed=0):
    """16×24 halves to 8×12, 4×6, 2×3: no level is 1×1, where channels-last and NCHW are the same memory."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, f, h, w, generator=g), torch.tensor([981, 21]), torch.randn(b, 77, 32, generator=g)


# -----------------------------------------------------------------------------
# group_norm

CASES = [  # (shape, groups, layout)
    ((2, 64, 5, 7), 32, CL), ((3, 6, 4, 4), 2, CL), ((2, 12, 3, 5), 1, CL), ((2, 8, 3, 3), 8, CL),
    ((2, 64, 3, 5, 7), 32, CL3), ((1, 6, 4, 2, 3), 3, CL3),
    ((2, 64, 5, 7), 32, torch.contiguous_format), ((2, 16, 1, 1), 2, CL),  # NCHW: F.group_norm; 1×1: both
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape, groups, layout", CASES, ids=[f"{s}-G{g}" for s, g, _ in CASES])
def test_group_norm_equals_torch(shape, groups, layout, dtype):
    """Values and gradients (x, weight, bias) against F.group_norm; channels-last stays channels-last."""
    g = torch.Generator().manual_seed(len(shape) + groups)
    x = (3 * torch.randn(shape, generator=g, dtype=dtype) + 2).contiguous(memory_format=layout)
    wt, bs = 1 + 0.1 * torch.randn(shape[1], generator=g, dtype=dtype), torch.randn(shape[1], generator=g, dtype=dtype)
    # max rel measured (CPU): fp32 3.5e-7 (gradients): 2e-6 = 5.7x; fp64 5.4e-16: 1e-12 ≫ 5x
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    with torch.no_grad():
        y = group_norm(x, groups, wt, bs, 1e-5)
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
    ref_args = [t.detach().clone().requires_grad_(True) for t in (x, wt, bs)]
    our_args = [t.detach().clone().requires_grad_(True) for t in (x, wt, bs)]
    y_ref = F.group_norm(ref_args[0], groups, *ref_args[1:], 1e-5)
    y_grad = group_norm(our_args[0], groups, *our_args[1:], 1e-5)  # the autograd path (guidance)
    assert rel_err(y, y_ref) <= tol and torch.equal(y, y_grad)
    gy = torch.randn(shape, generator=g, dtype=dtype)
    for ours, ref in zip(torch.autograd.grad(y_grad, our_args, gy), torch.autograd.grad(y_ref, ref_args, gy)):
        assert rel_err(ours, ref) <= tol
    y_plain = group_norm(x, groups, None, None, 1e-6)  # no affine
    assert rel_err(y_plain, F.group_norm(x, groups, None, None, 1e-6)) <= tol


def test_group_norm_makes_no_copy_of_a_channels_last_input():
    """What a GPU would run: statistics and one addcmul, no clone and no native GroupNorm (which copies to NCHW)."""
    x = torch.randn(2, 64, 3, 5, 7).contiguous(memory_format=CL3)
    norm = GroupNorm(32, 64)
    with torch.no_grad(), Ops() as ops:
        norm(x)
    assert not any(op in ops.counts for op in COPIES + ("aten.native_group_norm.default",)), ops.counts
    assert ops.counts["aten.std_mean.correction"] == 1 and ops.counts["aten.addcmul.out"] == 1


def test_group_norm_fp16_keeps_large_activations_finite():
    """std is 3000: its square overflows fp16 (max 65504), so the statistics are kept as std, not var."""
    g = torch.Generator().manual_seed(1)
    x32 = 3000 * torch.randn(2, 64, 6, 6, generator=g) + 500
    x = x32.half().contiguous(memory_format=CL)
    wt, bs = torch.ones(64, dtype=torch.half), torch.zeros(64, dtype=torch.half)
    with torch.no_grad():
        y = group_norm(x, 32, wt, bs, 1e-5)
    y_grad = group_norm(x, 32, wt, bs, 1e-5)  # grad mode: the autograd path, same numbers
    assert y.dtype == torch.half and y.is_contiguous(memory_format=CL) and torch.equal(y, y_grad)
    # fp16 output rounding: measured 2.7e-4; 2e-3 = 7x
    assert rel_err(y, F.group_norm(x.float(), 32, eps=1e-5)) <= 2e-3


# -----------------------------------------------------------------------------
# convolutions and folds

@pytest.mark.parametrize("conv, shape", [(lambda: Conv2d(6, 8, 3, padding=1), (2, 6, 5, 7)),
                                         (lambda: Conv3d(6, 6, (3, 1, 1), padding=(1, 0, 0)), (2, 6, 4, 5, 3))],
                         ids=["conv2d", "conv3d"])
def test_frozen_convolution_input_gradient_keeps_the_layout(conv, shape):
    """memory.py's convolutions on channels-last input: output and input gradient channels-last, input not kept,
    the gradient of torch's own convolution."""
    conv = conv().requires_grad_(False)
    fmt = CL if len(shape) == 4 else CL3
    conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        y = conv(x)  # conv3d: on one CPU thread torch's plain kernel gives NCDHW, which Conv3d turns back
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    ref = (F.conv2d if len(shape) == 4 else F.conv3d)(x, conv.weight, conv.bias, conv.stride, conv.padding)
    assert memory_format(gx) == fmt and memory_format(y) == fmt and x.untyped_storage().data_ptr() not in kept
    # measured 0 (the same conv kernels); 1e-6: fp32 round-off
    assert rel_err(y, ref) <= 1e-6 and rel_err(gx, torch.autograd.grad(ref, x, g)[0]) <= 1e-6


@pytest.mark.parametrize("dims", [4, pytest.param(5, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CPU's plain conv3d copies (NCDHW); cuDNN's does not"))])
def test_frozen_convolution_input_gradient_copies_nothing(dims):
    """The input gradient through memory.py's node runs on g as it is: no layout copy inside
    aten::convolution_backward (cuDNN converted g to the shape-only input's layout and back: two copies of g)."""
    from torch.profiler import ProfilerActivity, profile
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fmt = CL if dims == 4 else CL3
    conv = (Conv2d(64, 64, 3, padding=1) if dims == 4 else Conv3d(64, 64, (3, 1, 1), padding=(1, 0, 0))).to(device)
    conv.requires_grad_(False).weight.data = conv.weight.data.contiguous(memory_format=fmt)
    x = torch.randn((4, 64, 8, 8) if dims == 4 else (1, 64, 4, 8, 8), device=device)
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    y = conv(x)
    g = torch.randn_like(y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (gx,) = torch.autograd.grad(y, x, g)
    assert [e.name for e in prof.events()].count("aten::copy_") == 0 and memory_format(gx) == fmt


def test_folds_are_views_in_channels_last():
    """(b f) c h w channels-last <-> b c f h w channels_last_3d: the same memory, (b f h w c)."""
    x = torch.randn(6, 8, 5, 7).contiguous(memory_format=CL)
    x5 = batch_to_frames(x, 3)
    assert x5.data_ptr() == x.data_ptr() and memory_format(x5) == CL3
    back = frames_to_batch(x5)
    assert back.data_ptr() == x.data_ptr() and memory_format(back) == CL and torch.equal(back, x)


# -----------------------------------------------------------------------------
# the UNet

class Ops(TorchDispatchMode):
    """Counts the aten ops run; `copies` counts the copies per innermost running module class (set by hooks)."""

    def __init__(self, stack=None):
        super().__init__()
        self.counts, self.copies = collections.Counter(), collections.Counter()
        self.stack = stack if stack is not None else ["?"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        if str(func) in COPIES:
            self.copies[self.stack[-1]] += 1
        return func(*args, **(kwargs or {}))


def walk(unet, fn):
    """Run fn() with hooks: -> ([(module path, class, output)] of every module, Ops of the run)."""
    outs, stack = [], []
    names = {m: n for n, m in unet.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda m, a: stack.append(type(m).__name__)) for m in unet.modules()]
    hooks += [m.register_forward_hook(lambda m, a, o: outs.append((names[m], stack.pop(), o))) for m in unet.modules()]
    try:
        with Ops(stack) as ops:
            fn()
    finally:
        for hk in hooks:
            hk.remove()
    return outs, ops


@pytest.mark.parametrize("grad", [False, True], ids=["cfg-step", "guidance-pass"])
def test_every_activation_is_channels_last(unet, grad):
    """Every 4-D module output is channels-last, every 5-D one channels_last_3d, with and without a graph; the
    only copies are the temporal transformers' (b h w) f c tokens (one in; the one out is fused into the residual
    add) and, in UNet3D itself, the input and output conversions, the timestep cast and the time / text repeats."""
    x, t, ctx = inputs()
    z = x.clone().requires_grad_(grad)
    torch.set_num_threads(2)  # oneDNN's conv3d, NDHWC as cuDNN's; torch's one-thread plain conv3d gives NCDHW
    try:
        with torch.set_grad_enabled(grad):
            outs, ops = walk(unet, lambda: unet(z, t, ctx, checkpoint="cheap" if grad else False))
    finally:
        torch.set_num_threads(1)
    seen = collections.Counter()
    for path, cls, out in outs:
        for out in out if isinstance(out, tuple) else (out,):  # a GroupNorm with keep: (its input, its output)
            if isinstance(out, torch.Tensor) and out.ndim in (4, 5) and path:  # path "": the UNet's own output
                assert out.is_contiguous(memory_format=CL if out.ndim == 4 else CL3), (path, cls, out.stride())
                seen[cls] += 1
    assert {"ResnetBlock2D", "TemporalConvLayer", "Transformer2DModel", "TransformerTemporalModel", "Conv2d",
            "Conv3d", "GroupNorm", "Downsample2D", "Upsample2D", "UNetBlock3D"} <= set(seen)  # SiLU: F.silu
    n_temporal = sum(isinstance(m, type(unet.transformer_in)) for m in unet.modules())
    assert dict(ops.copies) == {"TransformerTemporalModel": n_temporal, "UNet3D": 5}, ops.copies
    assert "aten.native_group_norm.default" not in ops.counts


def test_nchw_layout_is_the_reference_and_gives_the_same_output(unet):
    """The reference (`fast.remove`: NCHW, nn.GroupNorm) gives the channels-last forward's output and guidance
    gradient; with the fast layer applied again, the same numbers again."""
    x, t, ctx = inputs(seed=3)
    masks = A.layer_masks([[(0.1, 0.2, 0.6, 0.9)] * 3], (16, 24))
    forward = torch.no_grad()(lambda: unet(x, t, ctx))

    def guidance_grad():
        store, z = A.AttentionStore(A.GUIDED_LAYERS, truncate=True), x[:1].clone().requires_grad_(True)
        unet(z, 500, ctx[:1], store=store)
        return torch.autograd.grad(A.energy(store.maps, masks, [[1, 2]], A.GuidanceParams()), z)[0]
    y_cl, g_cl = forward(), guidance_grad()
    try:
        fast.remove(unet)
        assert all(m.weight.is_contiguous() for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
        y_nchw = []
        outs, ops = walk(unet, lambda: y_nchw.append(forward()))
        assert "aten.native_group_norm.default" in ops.counts  # the NCHW path really ran
        assert all(o.is_contiguous() for p, _, o in outs if isinstance(o, torch.Tensor) and o.ndim == 4)
        g_nchw = guidance_grad()
    finally:
        fast.apply(unet, kernels=None)
    assert y_cl.is_contiguous() and y_cl.shape == x.shape  # the API: contiguous b c f h w
    # fp32 (CPU): output 1.9e-6, so 1e-5 = 5.3x. The guidance gradient: 4.6-5.9e-6 over seeds 3-10, fp32 noise of
    # the gradient itself (tests/test_fused.py: the reference's fp32 gradient is 4.2e-6 from float64), so its bound
    # is 3e-5 = 5x the worst; channels-last changes no arithmetic the float64 tests there would not see.
    assert rel_err(y_cl, y_nchw[0]) <= 1e-5 and rel_err(g_cl, g_nchw) <= 3e-5
    assert torch.equal(forward(), y_cl)


def test_weights_are_channels_last_with_unchanged_keys(unet, tiny_model_dir):
    """After apply (to a new model, a .half() one and a loaded one: the file is NCHW), .half() after apply too;
    keys and shapes as the reference's (diffusers')."""
    convs = lambda net: [m.weight for m in net.modules() if isinstance(m, (Conv2d, Conv3d))]
    loaded = UNet3D.from_pretrained(f"{tiny_model_dir}/unet")
    assert all(w.is_contiguous() for w in convs(loaded) or [torch.zeros(1)]) and not convs(loaded)  # the reference
    for net in (unet, fast.apply(UNet3D(UNet3DConfig(**TINY)).half()), fast.apply(UNet3D(UNet3DConfig(**TINY))).half(),
                fast.apply(loaded)):
        assert convs(net) and all(w.is_contiguous(memory_format=CL if w.ndim == 4 else CL3) for w in convs(net))
    nchw = UNet3D(UNet3DConfig(**TINY))
    assert {k: v.shape for k, v in nchw.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}


def test_fused_temporal_transformers_keep_their_tokens_in_place(unet):
    """With fused kernels the temporal transformers copy nothing: their tokens are (b, f, h·w, c) views of the
    channels-last activations (the copies left are the 'torch' reference attention's, which the Triton kernel does
    not make), and the output equals the unfused one, whose tokens are folded to (b h w) f c."""
    x, t, ctx = inputs(seed=4)
    ys = []
    with torch.no_grad():
        ys.append(unet(x, t, ctx))
        try:
            fast.apply(unet, kernels="torch")
            outs, ops = walk(unet, lambda: ys.append(unet(x, t, ctx)))
        finally:
            fast.apply(unet, kernels=None)
    temporal = [o for path, cls, o in outs if cls == "Linear" and path.endswith("proj_in") and "attentions" not in path]
    assert temporal and all(o.ndim == 4 for o in temporal)  # transformer_in and temp_attentions: b f (h w) d
    assert "TransformerTemporalModel" not in ops.copies and ops.copies["UNet3D"] == 5, ops.copies
    # fp32, the fused norms round differently: measured 1.6e-6 (CPU); 1e-5 = 6x
    assert float((ys[1] - ys[0]).norm() / ys[0].norm()) <= 1e-5


# -----------------------------------------------------------------------------
# the VAE decoder (fast/decoder.py, fast.apply_vae)

VAE_TINY = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1)


def _vae(dtype):
    torch.manual_seed(0)
    vae = VAEDecoder(VAEConfig(**VAE_TINY)).to(dtype).eval().requires_grad_(False)
    for m in vae.modules():  # GroupNorms with non-trivial affine parameters
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return vae


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (cuDNN's NHWC kernels)"))])
@pytest.mark.parametrize("dtype, bound", [
    (torch.float32, 1e-5),  # 8.1e-7 to 8.8e-7 over 5 inputs on the 2-core CPU (the NHWC convolutions' summation order)
    (torch.float64, 1e-10),  # 0 there; the float64 bound
])
def test_fast_vae_equals_the_reference_and_remove_restores_it(dtype, bound, device):
    ref = _vae(dtype).to(device)
    z = torch.randn(1, 4, 3, 9, 10, dtype=dtype).to(device)  # b c f h w, odd sizes
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 as fp32 on a GPU
        want = ref.decode_video(z, slice_size=2)
        vae = fast.apply_vae(copy.deepcopy(ref))
        assert type(vae) is fast.decoder.VAEDecoder and type(vae.decoder.conv_norm_out) is GroupNorm
        assert rel_err(vae.decode_video(z, slice_size=2), want) <= bound
        fast.remove(vae)
        assert type(vae) is VAEDecoder and all(type(m) is type(r) for m, r in zip(vae.modules(), ref.modules()))
        assert all(p.is_contiguous() for p in vae.parameters())
        assert rel_err(vae.decode_video(z, slice_size=2), want) == 0


def test_fast_vae_activations_are_channels_last():
    vae, seen = fast.apply_vae(_vae(torch.float32)), []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((type(m).__name__, i[0].is_contiguous(
        memory_format=CL), o.is_contiguous(memory_format=CL)))) for m in vae.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm))]
    vae.decode_video(torch.randn(1, 4, 2, 8, 8), slice_size=1)
    for h in hooks:
        h.remove()
    assert len(seen) > 20 and all(i and o for _, i, o in seen), [s for s in seen if not all(s[1:])]


def test_generate_plugs_the_fast_vae_in_and_out(tiny_model_dir):
    pipe = lvd.load_pipeline(tiny_model_dir)
    assert lvd.use_fast_layer(pipe, True) is fast and type(pipe.vae) is fast.decoder.VAEDecoder
    lvd.use_fast_layer(pipe, False, memory="cheap")  # the memory modes alone: the reference VAE
    assert type(pipe.vae) is VAEDecoder and type(pipe.unet) is not UNet3D
    assert lvd.use_fast_layer(pipe, False) is None and type(pipe.vae) is VAEDecoder and type(pipe.unet) is UNet3D
    assert all(p.is_contiguous() for p in pipe.vae.parameters())
