"""text_encoder.CLIPTextEncoder vs transformers' CLIPTextModel, tiny random weights (modelscope-architecture.md §7.1-7.3).

A 3-layer copy of the real config (hidden 64, 2 heads), every parameter re-randomised so no LayerNorm is the
identity and no bias is zero, saved by transformers (safetensors, transformers-5 key names) or by hand in the
transformers-4 layout (`text_model.` prefix plus the int64 `position_ids` buffer), loaded by our loader and
compared in fp32 on a batch of 2 prompts tokenised by our tokenizer (77 positions, pad id 0).
"""
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from text_encoder import CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer, checkpoint_key
from weights.checkpoint import CheckpointError, config_from_json

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["A realistic lively video of a brown bear walking from the left to the right",
           "a cat and a dog, running! 12 🐻 " + "zebra " * 70]  # the second one is truncated
TINY = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=49408,
            max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=32)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def ids():
    with pytest.warns(UserWarning, match="dropped"):
        return CLIPTokenizer.from_pretrained(ROOT / "data" / "clip-tokenizer")(PROMPTS)


def reference(hidden_act, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_act=hidden_act, **TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    return model


def expected(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state  # no attention_mask, as the pipeline calls it


def load(folder, **kw):
    """Our loader; the only warning allowed names the config key "dtype" (transformers 5 writes it, 4.x torch_dtype)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model = CLIPTextEncoder.from_pretrained(folder, **kw)
    assert all(str(w.message).endswith("ignoring config keys not used by CLIPTextConfig: dtype") for w in rec), rec
    return model


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_matches_transformers(tmp_path, ids, hidden_act):
    model = reference(hidden_act)
    model.save_pretrained(tmp_path)
    assert "text_model.final_layer_norm.weight" not in load_file(tmp_path / "model.safetensors")  # transformers-5 names
    with pytest.warns(UserWarning, match="dtype"):
        ours = CLIPTextEncoder.from_pretrained(tmp_path)
    assert ours.config.hidden_act == hidden_act and not any(p.requires_grad for p in ours.parameters())
    assert ids.shape == (2, 77) and ids[0, -1] == 0  # padded with "!" = 0, all 77 rows fed
    with torch.no_grad():
        out = ours(ids)
    ref = expected(model, ids)
    assert out.shape == (2, 77, 64)
    assert rel_err(out, ref) <= 1e-5, rel_err(out, ref)  # measured 0 (CPU, fp32)


def test_legacy_prefix_and_position_ids(tmp_path, ids):
    """transformers-4 layout: every key under `text_model.`, plus the int64 position_ids buffer (dropped on purpose)."""
    model = reference("gelu", seed=1)
    model.config.save_pretrained(tmp_path)
    state = {("" if k.startswith("text_model.") else "text_model.") + k: v.contiguous()
             for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)  # l -> 1 l
    save_file(state, tmp_path / "model.safetensors")
    out = load(tmp_path)(ids)
    assert rel_err(out, expected(model, ids)) <= 1e-5  # measured 0 (CPU, fp32)


def test_fp16_file_is_picked_for_fp16(tmp_path, ids):
    model = reference("gelu", seed=2)
    model.config.save_pretrained(tmp_path)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.fp16.safetensors")
    ours = load(tmp_path, dtype=torch.float16)
    assert ours.final_layer_norm.weight.dtype == torch.float16
    ours32 = load(tmp_path, dtype=torch.float32)  # fp16 file into an fp32 model: only the weights' fp16 rounding
    ref = expected(model, ids)
    assert rel_err(ours32(ids), ref) < 3e-2  # fp16 weight rounding: measured 5.0e-3; 3e-2 = 6x
    assert rel_err(ours(ids).float(), ref) < 5e-2  # fp16 weights and math: measured 8.4e-3; 5e-2 = 6x


def test_rename_table():
    assert checkpoint_key("text_model.encoder.layers.0.mlp.fc1.weight") == "encoder.layers.0.mlp.fc1.weight"
    assert checkpoint_key("encoder.layers.0.mlp.fc1.weight") == "encoder.layers.0.mlp.fc1.weight"
    assert checkpoint_key("text_model.embeddings.position_ids") is None
    assert checkpoint_key("embeddings.position_ids") is None


# -----------------------------------------------------------------------------
# loud loading

@pytest.fixture()
def saved(tmp_path):
    """A folder with config.json and a transformers-5 model.safetensors, plus the state to edit."""
    model = reference("gelu")
    model.config.save_pretrained(tmp_path)
    return tmp_path, {k: v.contiguous() for k, v in model.state_dict().items()}


def _expect_error(folder, state, *names):
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load(folder)
    for name in names:
        assert name in str(err.value), str(err.value)


def test_wrong_shape_names_the_tensor(saved):
    folder, state = saved
    state["encoder.layers.1.mlp.fc1.bias"] = torch.zeros(127)
    _expect_error(folder, state, "encoder.layers.1.mlp.fc1.bias", "[128]", "[127]", "model.safetensors")


def test_missing_tensor_is_named(saved):
    folder, state = saved
    del state["final_layer_norm.bias"]
    _expect_error(folder, state, "missing", "final_layer_norm.bias")


def test_extra_tensor_is_named(saved):
    folder, state = saved
    state["text_model.text_projection.weight"] = torch.zeros(32, 64)
    _expect_error(folder, state, "unexpected", "text_model.text_projection.weight")


def test_more_layers_in_file_than_config(saved):
    folder, state = saved
    for k in [k for k in state if k.startswith("encoder.layers.2.")]:
        state[k.replace("layers.2.", "layers.3.")] = state[k].clone()
    _expect_error(folder, state, "unexpected 16 tensors", "encoder.layers.3.layer_norm1.bias")


def test_missing_weights_file(tmp_path):
    reference("gelu").config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(tmp_path)


# -----------------------------------------------------------------------------
# config

def test_config_reads_the_published_keys():
    published = {  # text_encoder/config.json of ali-vilab/text-to-video-ms-1.7b (§7.1)
        "_name_or_path": "x", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
        "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
        "model_type": "clip_text_model", "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
        "projection_dim": 512, "torch_dtype": "float32", "transformers_version": "4.27.0.dev0", "vocab_size": 49408}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of the published file is a field: no warning
        cfg = config_from_json(CLIPTextConfig, published)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_act) == (1024, 23, 16, "gelu")
    with torch.device("meta"):  # the real size, without memory
        n = sum(p.numel() for p in CLIPTextEncoder(cfg).parameters())
    assert n == 340_387_840  # §2.2: text_encoder/model.safetensors holds 340,387,840 fp32 params


def test_config_unknown_key_warned_and_bad_act_refused(tmp_path):
    with pytest.warns(UserWarning, match="use_fancy_thing"):
        config_from_json(CLIPTextConfig, {"hidden_size": 64, "num_attention_heads": 2, "use_fancy_thing": True})
    with pytest.raises(CheckpointError, match="hidden_act"):
        config_from_json(CLIPTextConfig, {"hidden_act": "relu"})


def test_bad_ids_are_a_clear_error():
    model = CLIPTextEncoder(CLIPTextConfig(**TINY))
    with pytest.raises(ValueError, match="at most 77"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 77))
    with pytest.raises(ValueError, match="49408"):
        model(torch.full((1, 77), 49408))
