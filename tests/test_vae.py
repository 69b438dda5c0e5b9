"""vae.py against diffusers' AutoencoderKL (test-only reference), at a tiny randomised config.

The reference is built, every parameter re-randomised (no zero-initialised or identity layer can hide
a bug), saved with `save_pretrained` (safetensors) and loaded through our strict loader. The oracle is
always the diffusers model built in the same run.
"""
import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_synth import TextToVideoSDPipeline
from safetensors.torch import load_file, save_file

from vae import VAEConfig, VAEDecoder, rename
from weights.checkpoint import CheckpointError, config_from_json

TINY = dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=32, layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            in_channels=3, out_channels=3, sample_size=64)
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # diffusers <= 0.15 names
WEIGHTS = "diffusion_pytorch_model.safetensors"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    """(diffusers reference in eval mode, folder with its config.json + safetensors)."""
    torch.manual_seed(0)
    ref = AutoencoderKL(**TINY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim > 1:  # conv / linear weights: ~unit-gain random
                p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
            elif "norm" in name and name.endswith("weight"):  # GroupNorm scales around 1
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:  # every bias non-zero
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


@pytest.fixture(scope="module")
def case(ref_dir):
    """ours loaded from the folder, 3 non-square scaled latents, and their images from diffusers (one batch)
    and from ours (one batch, and the default one image at a time)."""
    ref, folder = ref_dir
    ours = VAEDecoder.from_pretrained(folder)
    latents = scaled_latents(3, 4, 4, 6)
    return SimpleNamespace(ours=ours, latents=latents, want=ref_decode(ref, latents),
                           whole=ours.decode(latents, slice_size=None), sliced=ours.decode(latents))


def scaled_latents(*shape, seed=2):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def ref_decode(ref, latents):
    """What the text-to-video pipeline does for one batch of images: 1/scaling_factor, then vae.decode."""
    with torch.no_grad():
        return ref.decode(1 / ref.config.scaling_factor * latents).sample


def rewrite(src, dst, edit):
    """Copy the checkpoint folder src to dst with its tensors passed through edit(dict) -> dict."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(edit(load_file(src / WEIGHTS)), dst / WEIGHTS)
    return dst


# -----------------------------------------------------------------------------
# parity

def test_keys_are_the_decoder_half(ref_dir):
    ref, folder = ref_dir
    ours = VAEDecoder.from_pretrained(folder)
    want = {k: v.shape for k, v in ref.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert {k: v.shape for k, v in ours.state_dict().items()} == want


def test_decode_matches_diffusers(case):
    want = case.want
    assert case.whole.shape == case.sliced.shape == want.shape == (3, 3, 32, 48)
    assert want.abs().max() > 0.1 and want.std() > 0.1  # measured 3.1, 0.62: 6x; the reference output is not degenerate
    for label, got in (("one batch", case.whole), ("slice_size=1", case.sliced)):
        err = rel_err(got, want)
        print(f"vae decode rel L2 err vs diffusers ({label}): {err:.2e}")
        assert err <= 1e-5  # measured ≤ 1.3e-6 (CPU, fp32); 1e-5 = 8x


def test_decode_matches_diffusers_fp64(ref_dir):
    """In float64 the two agree to roundoff: the fp32 error above is numerics, not a structural slip."""
    ref, folder = ref_dir
    ours = VAEDecoder.from_pretrained(folder, dtype=torch.float64)
    assert ours.decoder.conv_in.weight.dtype == torch.float64
    latents = scaled_latents(1, 4, 4, 6, seed=7).double()
    want = ref_decode(copy.deepcopy(ref).double(), latents)
    err = rel_err(ours.decode(latents), want)
    print(f"vae decode rel L2 err vs diffusers, float64: {err:.2e}")
    assert err <= 1e-12  # float64: measured 0


def test_legacy_attention_names(ref_dir, tmp_path):
    ref, folder = ref_dir

    def to_legacy(sd):
        out = {}
        for k, v in sd.items():
            for new, old in LEGACY.items():
                k = k.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{old}.")
            out[k] = v
        return out

    legacy = rewrite(folder, tmp_path / "legacy", to_legacy)
    keys = load_file(legacy / WEIGHTS).keys()
    for side in ("encoder", "decoder"):
        for old in LEGACY.values():
            assert f"{side}.mid_block.attentions.0.{old}.weight" in keys
    assert not any(".to_q." in k or ".to_out." in k for k in keys)

    latents = scaled_latents(1, 4, 4, 6, seed=3)
    want = ref_decode(ref, latents)
    # the rewritten file really is the legacy layout diffusers knows: diffusers itself loads it the same
    assert rel_err(ref_decode(AutoencoderKL.from_pretrained(legacy, low_cpu_mem_usage=False).eval(), latents), want) == 0
    err = rel_err(VAEDecoder.from_pretrained(legacy).decode(latents), want)
    print(f"vae legacy-names rel L2 err vs diffusers: {err:.2e}")
    assert err <= 1e-5  # measured 0 (CPU, fp32)


def test_decoder_only_file_loads(ref_dir, case, tmp_path):
    """encoder.* and quant_conv.* are dropped on purpose: a file without them loads the same."""
    slim = rewrite(ref_dir[1], tmp_path / "slim",
                   lambda sd: {k: v for k, v in sd.items() if not k.startswith(("encoder.", "quant_conv."))})
    # measured 1.3e-6 (CPU, fp32); 1e-5 = 7.8x
    assert rel_err(VAEDecoder.from_pretrained(slim).decode(case.latents[:1]), case.want[:1]) <= 1e-5


def test_sliced_equals_unsliced(case):
    results = {1: case.sliced, 2: case.ours.decode(case.latents, slice_size=2)}  # 2 leaves a remainder of one
    for n, got in results.items():
        err = rel_err(got, case.whole)
        print(f"slice_size={n}: rel L2 err vs unsliced {err:.2e}")
        assert err <= 1e-5  # batched vs per-image conv kernels: roundoff only, measured ≤ 1.3e-6; 1e-5 = 8x


def test_decode_video_matches_pipeline(ref_dir, case):
    """decode_video == TextToVideoSDPipeline.decode_latents (frame-major folding, 1/scaling_factor, float)."""
    ref, ours = ref_dir[0], case.ours
    latents = scaled_latents(2, 4, 2, 4, 6, seed=6)  # b c f h w
    with torch.no_grad():
        want = TextToVideoSDPipeline.decode_latents(SimpleNamespace(vae=ref), latents)
    got = ours.decode_video(latents, slice_size=2)
    assert got.shape == want.shape == (2, 3, 2, 32, 48) and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5  # measured 0 (CPU, fp32)
    # frames differ, so a wrong fold (b-major vs f-major) could not pass the check above by accident
    assert rel_err(want[:, :, 0], want[:, :, 1]) > 0.1 and rel_err(want[0], want[1]) > 0.1  # measured ≥ 1.1: 11x


def test_rename_table():
    assert rename("encoder.mid_block.attentions.0.query.weight") is None
    assert rename("quant_conv.bias") is None
    assert rename("post_quant_conv.bias") == "post_quant_conv.bias"
    assert rename("decoder.mid_block.attentions.0.proj_attn.bias") == "decoder.mid_block.attentions.0.to_out.0.bias"
    assert rename("decoder.mid_block.attentions.0.key.weight") == "decoder.mid_block.attentions.0.to_k.weight"
    assert rename("decoder.up_blocks.0.resnets.0.conv1.weight") == "decoder.up_blocks.0.resnets.0.conv1.weight"


# -----------------------------------------------------------------------------
# loud failures

@pytest.mark.parametrize("case, edit, named", [
    ("missing", lambda sd: {k: v for k, v in sd.items() if k != "decoder.up_blocks.1.resnets.2.conv2.weight"},
     "decoder.up_blocks.1.resnets.2.conv2.weight"),
    ("shape", lambda sd: {**sd, "decoder.mid_block.attentions.0.to_q.bias": torch.zeros(65)},
     "decoder.mid_block.attentions.0.to_q.bias"),
    ("unexpected", lambda sd: {**sd, "decoder.up_blocks.3.upsamplers.0.conv.bias": torch.zeros(32)},
     "decoder.up_blocks.3.upsamplers.0.conv.bias"),
])
def test_bad_checkpoint_names_the_tensor(ref_dir, tmp_path, case, edit, named):
    _, folder = ref_dir
    bad = rewrite(folder, tmp_path / case, edit)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")) as e:
        VAEDecoder.from_pretrained(bad)
    assert str(bad / WEIGHTS) in str(e.value) and "\n" not in str(e.value)


def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model"):
        VAEDecoder.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(up_block_types=("AttnUpDecoderBlock2D",) * 4), "UpDecoderBlock2D"),
    (dict(up_block_types=("UpDecoderBlock2D",) * 3), "same, non-zero length"),
    (dict(block_out_channels=(32, 64, 64, 48)), "norm_num_groups"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(shift_factor=0.1159), "shift_factor"),
])
def test_config_validate(change, message):
    assert config_from_json(VAEConfig, TINY).validate() is None
    with pytest.raises(CheckpointError, match=message):
        config_from_json(VAEConfig, {**TINY, **change})


def test_real_config_defaults():
    """The dataclass defaults are the 1.7B vae/config.json (§8.1) and give an 8x decoder."""
    cfg = VAEConfig()
    assert cfg.validate() is None and cfg.upscale == 8 and cfg.scaling_factor == 0.18215
    with torch.device("meta"):
        m = VAEDecoder(cfg)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["decoder.conv_in.weight"] == (512, 4, 3, 3)
    assert shapes["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in shapes


def test_bad_latents(case):
    ours = case.ours
    with pytest.raises(ValueError, match=r"expected latents \(b, 4, h, w\)"):
        ours.decode(torch.zeros(1, 3, 4, 6))
    with pytest.raises(ValueError, match="slice_size"):
        ours.decode(torch.zeros(1, 4, 4, 6), slice_size=0)
    with pytest.raises(ValueError, match=r"\(b, 4, f, h, w\)"):
        ours.decode_video(torch.zeros(1, 4, 4, 6))
