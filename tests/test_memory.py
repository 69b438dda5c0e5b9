"""memory.py: the convolutions that keep no input, the recompute of cheap work, the mode names (issue 4, 7).

Oracles: PyTorch's own autograd on nn.functional.conv2d / conv3d and on the plain function (same gradients,
bit for bit on the CPU); `torch.autograd.graph.saved_tensors_hooks` for what each node keeps.
"""
import pytest
import torch
import torch.nn.functional as F

from memory import Conv2d, Conv3d, checkpoint_mode, recompute


def kept(fn, x):
    """(output, storages autograd keeps for the backward, as data pointers)."""
    ptrs = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ptrs.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        y = fn(x)
    return y, set(ptrs)


@pytest.mark.parametrize("make, shape", [
    (lambda: Conv2d(6, 8, 3, padding=1), (2, 6, 9, 7)),
    (lambda: Conv2d(6, 6, 3, stride=2, padding=1), (2, 6, 9, 7)),   # Downsample2D, odd sizes
    (lambda: Conv2d(6, 8, 1), (3, 6, 5, 5)),                         # conv_shortcut
    (lambda: Conv3d(6, 6, (3, 1, 1), padding=(1, 0, 0)), (2, 6, 4, 5, 3)),  # TemporalConvLayer
], ids=["3x3", "3x3-stride2", "1x1", "3x1x1"])
def test_frozen_convolutions_keep_no_input_and_give_the_same_gradient(make, shape):
    torch.manual_seed(0)
    conv = make().requires_grad_(False)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn_like(conv(x))
    ref_fn = F.conv2d if isinstance(conv, Conv2d) else F.conv3d
    ref = lambda x: ref_fn(x, conv.weight, conv.bias, conv.stride, conv.padding)
    y_ref, kept_ref = kept(ref, x)
    y, kept_ours = kept(conv, x)
    assert torch.equal(y, y_ref)
    assert x.untyped_storage().data_ptr() in kept_ref  # PyTorch's node keeps the input ...
    assert kept_ours == set()  # ... ours keeps nothing
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    (gx,) = torch.autograd.grad(y, x, g)
    assert gx.shape == x.shape and torch.equal(gx, gx_ref)


def test_convolutions_with_trainable_weights_use_the_ordinary_node():
    conv = Conv2d(4, 4, 3, padding=1)  # weights require grad: the weight gradient needs the input
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    y, kept_ours = kept(conv, x)
    assert x.untyped_storage().data_ptr() in kept_ours
    y.sum().backward()
    assert conv.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_recompute_keeps_only_its_input_and_gives_the_same_gradient():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(2, 6).requires_grad_(False)
    fn = lambda x: F.silu(norm(x))
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    y_ref, kept_ref = kept(fn, x)
    y, kept_ours = kept(lambda x: recompute(fn, x, cheap=True), x)
    assert torch.equal(y, y_ref)
    assert len(kept_ref) >= 2 and kept_ours == {x.untyped_storage().data_ptr()}  # GN's input only, not its output
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])
    with torch.no_grad():  # without a graph (the CFG step) it is the plain function
        assert torch.equal(recompute(fn, x, cheap=True), fn(x))


def test_checkpoint_mode_names():
    assert checkpoint_mode(False) == checkpoint_mode("off") == checkpoint_mode(None) == (False, False)
    assert checkpoint_mode("cheap") == (False, True)
    assert checkpoint_mode(True) == checkpoint_mode("full") == (True, False)
    with pytest.raises(ValueError, match="'off', 'cheap' or 'full'"):
        checkpoint_mode("half")
