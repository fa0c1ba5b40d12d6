"""minisd.clip: CLIPTextEncoder equals transformers' CLIPTextModel on the same weights (chapter 7);
the course CLIP's shapes and loading (chapter 8)."""
import math

import pytest
import torch

import minisd
from minisd import CLIPTextConfig, CLIPTextEncoder, checkpoint, weights
from minisd.clip import CLIP, CLIPConfig

transformers = pytest.importorskip("transformers")


def reference(config):
    """transformers' CLIPTextModel at our config, random weights (seeded), fp32, eval."""
    torch.manual_seed(0)
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, intermediate_size=config.mlp_width,
        max_position_embeddings=config.positions, hidden_act=config.act, layer_norm_eps=config.eps,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return transformers.CLIPTextModel(hf_config).eval()


# stabilityai/stable-diffusion-2-1 text_encoder/config.json, as published (the fields that shape the model)
SD21_TEXT_JSON = {"architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024,
                  "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
                  "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512, "vocab_size": 49408,
                  "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def final_norm(model):
    """transformers' final LayerNorm (5.x has no `text_model` level; diffusers' code reads 4.x's)."""
    return getattr(model, "text_model", model).final_layer_norm


def prompt_ids():
    tok = minisd.CLIPTokenizer.sd15()
    return tok(["a photograph of an astronaut riding a horse", "", "a red circle in the top left"])


def compare(config, atol):
    theirs = reference(config)
    sd = theirs.state_dict()
    assert not any(k.startswith("text_model.") for k in sd)  # transformers 5.x: no prefix
    ours = weights.load_text_encoder(sd, config)
    ids = prompt_ids()
    with torch.no_grad():
        out = theirs(ids, output_hidden_states=True)
        last, penultimate = out.last_hidden_state, final_norm(theirs)(out.hidden_states[-2])
        torch.testing.assert_close(ours(ids), last, atol=atol, rtol=0)
        torch.testing.assert_close(ours(ids, skip=1), penultimate, atol=atol, rtol=0)
    return ours, theirs


def test_tiny_parity():
    compare(CLIPTextConfig.tiny(), atol=1e-5)


def test_course_config_parity():
    compare(CLIPTextConfig.course(), atol=1e-5)


@pytest.mark.slow
def test_sd15_parity_and_parameter_count():
    ours, theirs = compare(CLIPTextConfig.sd15(), atol=1e-4)
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    assert len(ours.state_dict()) == 196
    del ours, theirs


def test_sd2_config_is_sd21s_published_config():
    c = CLIPTextConfig.sd2()
    j = SD21_TEXT_JSON
    assert (c.width, c.layers, c.heads, c.mlp_width, c.positions, c.vocab_size, c.act, c.eps) == (
        j["hidden_size"], j["num_hidden_layers"], j["num_attention_heads"], j["intermediate_size"],
        j["max_position_embeddings"], j["vocab_size"], j["hidden_act"], j["layer_norm_eps"])


def test_gelu_text_encoder_parity_small():
    """OpenCLIP's exact GELU where OpenAI's CLIP has quick_gelu: the only change inside a layer."""
    compare(CLIPTextConfig(width=64, layers=2, heads=2, mlp_width=128, act="gelu"), atol=1e-5)
    with pytest.raises(ValueError, match="quick_gelu"):
        CLIPTextEncoder(CLIPTextConfig(width=32, layers=1, heads=1, mlp_width=64, act="relu"))


@pytest.mark.slow
def test_sd2_parity_and_parameter_count():
    ours, theirs = compare(CLIPTextConfig.sd2(), atol=1e-4)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == 340_387_840
    del ours, theirs


def test_skip_matches_diffusers_clip_skip():
    """diffusers' encode_prompt with clip_skip=k: hidden_states[-(k + 1)], then final_layer_norm."""
    config = CLIPTextConfig(width=32, layers=4, heads=4, mlp_width=64)
    theirs = reference(config)
    ours = weights.load_text_encoder(theirs.state_dict(), config)
    ids = prompt_ids()
    with torch.no_grad():
        hidden = theirs(ids, output_hidden_states=True).hidden_states  # 5: embeddings + 4 layers
        for k in (1, 2, 3):
            expected = final_norm(theirs)(hidden[-(k + 1)])
            torch.testing.assert_close(ours(ids, skip=k), expected, atol=1e-5, rtol=0)


def test_loads_sd15_folder_layout_with_prefix_and_position_ids():
    theirs = reference(CLIPTextConfig.tiny())
    sd = {"text_model." + k: v for k, v in theirs.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as in the real SD 1.5 file
    ours = weights.load_text_encoder(sd, CLIPTextConfig.tiny())
    ids = prompt_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).last_hidden_state, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in ours.parameters())  # frozen, as in SD training
    # and back: the original file's names, loadable by transformers 4.x-style code
    back = weights.text_encoder_to_original(ours)
    assert set(back) == set(sd)


def test_config_read_off_sd15_shapes():
    with torch.device("meta"):  # shapes only, no memory
        sd = reference(CLIPTextConfig.sd15()).state_dict()
    assert weights.text_config_from_weights(sd) == CLIPTextConfig.sd15()
    assert weights.text_config_from_weights({"text_model." + k: v for k, v in sd.items()}) == CLIPTextConfig.sd15()


def test_built_on_meta_without_random_init():
    sd = reference(CLIPTextConfig.tiny()).state_dict()
    ours = weights.load_text_encoder(sd, CLIPTextConfig.tiny())
    for key, tensor in ours.state_dict().items():
        assert tensor.device.type == "cpu"
        assert tensor.data_ptr() == sd[key].data_ptr()  # the file's tensors, assigned, not copied


def test_bad_weights_are_named():
    sd = reference(CLIPTextConfig.tiny()).state_dict()
    with pytest.raises(weights.WeightsError, match="layers.0.mlp.fc1.weight"):
        weights.load_text_encoder({**sd, "encoder.layers.0.mlp.fc1.weight": torch.zeros(3, 3)},
                                  CLIPTextConfig.tiny())
    with pytest.raises(weights.WeightsError, match="missing"):
        weights.load_text_encoder({k: v for k, v in sd.items() if "final_layer_norm" not in k},
                                  CLIPTextConfig.tiny())
    with pytest.raises(weights.WeightsError, match="does not have"):
        weights.load_text_encoder({**sd, "text_projection.weight": torch.zeros(8, 32)}, CLIPTextConfig.tiny())


def test_shapes_and_input_errors():
    torch.manual_seed(0)
    text = CLIPTextEncoder(CLIPTextConfig.tiny())
    ids = torch.randint(0, 49408, (2, 77))
    assert text(ids).shape == (2, 77, 32)
    with pytest.raises(ValueError, match="78 tokens"):
        text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="skip=2"):
        text(ids, skip=2)


def test_causal_mask_later_tokens_do_not_change_earlier_outputs():
    torch.manual_seed(0)
    text = CLIPTextEncoder(CLIPTextConfig.tiny()).eval()
    a = torch.randint(0, 49408, (1, 10))
    b = a.clone()
    b[0, 6:] = torch.randint(0, 49408, (4,))
    with torch.no_grad():
        ha, hb = text(a), text(b)
    torch.testing.assert_close(ha[:, :6], hb[:, :6])
    assert not torch.allclose(ha[:, 6:], hb[:, 6:])


# --- the contrastive CLIP (chapter 8) -----------------------------------------------------------

def test_clip_logits_and_embeddings():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.tiny()).eval()
    images = torch.randn(3, 3, 32, 32)
    ids = prompt_ids()
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(ids)
        logits = model(images, ids)
    assert img.shape == txt.shape == (3, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(logits, (1 / 0.07) * img @ txt.T)  # initial temperature 0.07
    assert logits.shape == (3, 3)


def test_text_embedding_is_the_end_token_output():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.tiny()).eval()
    ids = prompt_ids()
    end = [9, 1, 8]  # positions of the first <|endoftext|> in each row
    with torch.no_grad():
        h = model.text(ids)  # all 77 positions: cutting the batch short must change nothing
        expected = torch.nn.functional.normalize(model.text_projection(h[torch.arange(3), end]), dim=-1)
        torch.testing.assert_close(model.encode_text(ids), expected)


def test_logit_scale_is_capped_at_100():
    model = CLIP(CLIPConfig.tiny())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500))
    assert model.scale().item() == pytest.approx(100)


def test_course_clip_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.tiny())
    checkpoint.save_checkpoint(tmp_path / "c.safetensors", model, metadata={"command": "test"}, dtype=torch.float16)
    back = checkpoint.load_checkpoint(tmp_path / "c.safetensors")
    assert back.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(b, a.half().float(), msg=k)
    with pytest.raises(FileNotFoundError, match="train clip"):
        checkpoint.course_clip(tmp_path / "none.safetensors")


def test_training_lowers_the_contrastive_loss():
    from minisd.train import train_clip_model
    model, log = train_clip_model(CLIPConfig.tiny(), steps=40, batch_size=16, lr=3e-3, n_train=400,
                                  log_every=10, progress=False)
    assert log["loss"][0] > 2.0          # about ln 16 = 2.77 at the start
    assert log["loss"][-1] < 0.6 * log["loss"][0]


def test_committed_course_clip():
    """data/course_clip.safetensors: small, reproducible, and it reads the course images."""
    from safetensors import safe_open
    from minisd import data
    from minisd.train import clip_zero_shot_accuracy
    path = minisd.DATA_DIR / "course_clip.safetensors"
    assert path.stat().st_size <= 8_000_000
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["command"].startswith("python -m minisd train clip")
    model = checkpoint.course_clip()
    assert model.config == CLIPConfig.course()
    # one 64-wide head, so an original-layout round trip (config read off the shapes) is exact
    assert weights.text_config_from_weights(model.text.state_dict()) == CLIPTextConfig.course()
    text = checkpoint.course_text_encoder()
    assert not any(p.requires_grad for p in text.parameters())
    assert text(minisd.CLIPTokenizer.sd15()("a red circle in the top left")).shape == (1, 77, 64)
    images, captions = data.sample(180, seed=99, only=data.HELD_OUT)   # never seen in training
    acc = clip_zero_shot_accuracy(model, images, captions)
    assert acc["colour"] >= 0.95 and acc["shape"] >= 0.90 and acc["position"] >= 0.90, acc


def test_building_on_meta_draws_nothing():
    # a model about to receive weights must not random-initialise (SD 1.5's 49408 x 768 table
    # on meta cost ~7 s through normal_'s meta path before this was fixed)
    from minisd.clip import CLIPTextConfig, CLIPTextEncoder
    state = torch.random.get_rng_state()
    with torch.device("meta"):
        model = CLIPTextEncoder(CLIPTextConfig.sd15())
    assert model.embeddings.token_embedding.weight.is_meta
    assert torch.equal(state, torch.random.get_rng_state())
