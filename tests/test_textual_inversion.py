"""minisd.textual_inversion (chapter 16): the files people share load into our tokenizer and text
encoder as diffusers' `load_textual_inversion` loads them (same ids, same text embeddings, same
image), and bad files get errors that say what they are."""
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from minisd import CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer, StableDiffusion, textual_inversion
from minisd.weights import WeightsError, load_text_encoder
from reference_sd import SD15_TEXT, TINY_TEXT, reference_pipeline

PROMPT = "a photo of {} in the top left"


def embedding_files(folder, width, seed=0):
    """One file per format: (path, token to pass or None, the token written in prompts, vectors)."""
    g = torch.Generator().manual_seed(seed)
    v = {n: torch.randn(n, width, generator=g) for n in (1, 2, 3)}
    files = []
    p = folder / "learned_embeds.safetensors"          # diffusers / sd-concepts-library, one vector
    save_file({"<cat-toy>": v[1]}, str(p))
    files.append((p, None, "<cat-toy>", v[1]))
    p = folder / "learned_embeds.bin"                  # the older .bin, a 1-D vector
    torch.save({"<bin-toy>": v[1][0] * 0.5}, p)
    files.append((p, None, "<bin-toy>", v[1] * 0.5))
    p = folder / "style.pt"                            # A1111 .pt, three vectors
    torch.save({"string_to_param": {"*": v[3]}, "string_to_token": {"*": 265}, "name": "mystyle", "step": 3000,
                "sd_checkpoint": "abc123", "sd_checkpoint_name": "v1-5"}, p)
    files.append((p, None, "mystyle", v[3]))
    p = folder / "charturner.safetensors"              # A1111 .safetensors: the name is passed
    save_file({"emb_params": v[2]}, str(p))
    files.append((p, "<turner>", "<turner>", v[2]))
    return files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_ti")
    reference_pipeline(folder / "sd")
    (folder / "emb").mkdir()
    return folder / "sd", embedding_files(folder / "emb", TINY_TEXT["hidden_size"])


def fresh(folder):
    import diffusers
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref, StableDiffusion.from_pretrained(folder)


def reference_embeddings(ref, prompt):
    with torch.no_grad():
        return ref.encode_prompt(prompt, "cpu", 1, False)[0]


@pytest.mark.parametrize("index", range(4), ids=["diffusers-safetensors", "diffusers-bin", "a1111-pt",
                                                 "a1111-safetensors"])
def test_each_format_equals_diffusers(tiny, index):
    folder, files = tiny
    path, token, word, vectors = files[index]
    ref, ours = fresh(folder)
    ref.load_textual_inversion(str(path), token=token)
    assert textual_inversion.load(ours, path, token=token) == word
    prompts = [PROMPT.format(word), f"{word}, {word} and a circle"]
    ids = ref.tokenizer(ref.maybe_convert_prompt(prompts, ref.tokenizer), padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
    assert torch.equal(ours.tokenizer(prompts), ids)
    assert (ids >= 49408).sum() == 3 * len(vectors)           # every use of the word is all its vectors
    torch.testing.assert_close(textual_inversion.embedding(ours.tokenizer, ours.text_encoder, word), vectors)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_prompt(prompts), reference_embeddings(ref, prompts), atol=1e-5, rtol=0)
    # and the image: same latents, same sampler, same pixels
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(index))
    theirs = ref(prompts[0], height=16, width=16, num_inference_steps=3, guidance_scale=7.5, latents=x,
                 output_type="np").images
    image = ours(prompts[0], height=16, width=16, steps=3, guidance=7.5, latents=x, output_type="np", progress=False)
    np.testing.assert_allclose(image, theirs, atol=1e-5, rtol=0)


def test_prompts_without_the_token_are_unchanged(tiny):
    folder, files = tiny
    _, ours = fresh(folder)
    before = ours.encode_prompt(["a red circle in the top left"])
    textual_inversion.load(ours, files[2][0])
    torch.testing.assert_close(ours.encode_prompt(["a red circle in the top left"]), before, atol=0, rtol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_save_then_load_gives_the_same_vectors(tiny, tmp_path, suffix):
    folder, files = tiny
    _, ours = fresh(folder)
    word = textual_inversion.load(ours, files[2][0])
    out = textual_inversion.save(ours, word, tmp_path / f"saved{suffix}")
    _, other = fresh(folder)
    assert textual_inversion.load(other, out, token=word) == word
    torch.testing.assert_close(other.encode_prompt([PROMPT.format(word)]), ours.encode_prompt([PROMPT.format(word)]),
                               atol=0, rtol=0)
    assert not list(tmp_path.glob("*.tmp"))


def test_diffusers_reads_what_we_save(tiny, tmp_path):
    folder, files = tiny
    ref, ours = fresh(folder)
    textual_inversion.load(ours, files[0][0])
    ref.load_textual_inversion(str(textual_inversion.save(ours, "<cat-toy>", tmp_path / "learned_embeds.safetensors")))
    prompts = [PROMPT.format("<cat-toy>")]
    torch.testing.assert_close(ours.encode_prompt(prompts), reference_embeddings(ref, prompts), atol=1e-5, rtol=0)


def test_added_tokens_match_like_transformers(tiny):
    """Case-insensitive, inside words, the longer name first, whitespace runs: transformers' rules."""
    folder, _ = tiny
    ref, _ = fresh(folder)
    ours = CLIPTokenizer.sd15()
    for tok in ("<tok>", "<tok>_x", "<Mix>"):
        ref.tokenizer.add_tokens(tok)
    assert ours.add_tokens(["<tok>", "<tok>_x", "<Mix>"]) == [49408, 49409, 49410]
    prompts = ["a <tok> circle", "a<tok>circle", "A <TOK> Circle", "<tok>s and <tok>_x", "x <Mix> <mix> <MIX>",
               "a   <tok>\tcircle", "<tok><tok>", "no added token here"]
    theirs = ref.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ours(prompts), theirs)
    assert ours.decode(ours(["a <tok> circle"])[0, :5]) == "<|startoftext|> a <tok> circle <|endoftext|>"


def test_bad_files_are_named(tiny, tmp_path):
    folder, files = tiny
    _, ours = fresh(folder)
    rows, vocab = ours.text_encoder.embeddings.token_embedding.weight.shape[0], ours.tokenizer.vocab_size
    wide = tmp_path / "sd2_embedding.safetensors"
    save_file({"<sd2>": torch.randn(1, 1024)}, str(wide))
    with pytest.raises(ValueError, match=r"sd2_embedding.safetensors.*\(1, 1024\).*64 wide"):
        textual_inversion.load(ours, wide)
    with pytest.raises(ValueError, match=r"'circle' is already in the tokenizer's vocabulary.*new name"):
        textual_inversion.load(ours, files[0][0], token="circle")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0.lora_up.weight": torch.zeros(8, 4)}, str(lora))
    with pytest.raises(WeightsError, match=r"lora.safetensors is a LoRA \(load it with minisd.lora.load\)"):
        textual_inversion.load(ours, lora)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "global_step": 10}, ckpt)
    with pytest.raises(WeightsError, match=r"model.ckpt is a model checkpoint"):
        textual_inversion.load(ours, ckpt)
    pointer = tmp_path / "learned_embeds.bin"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 3819\n")
    with pytest.raises(WeightsError, match=r"learned_embeds.bin is a Git LFS pointer.*git lfs pull"):
        textual_inversion.load(ours, pointer)
    pickled = tmp_path / "pickled.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 64)}, "extra": types.SimpleNamespace(a=1)}, pickled)
    with pytest.raises(WeightsError, match=r"pickled.pt could not be read .*weights_only=True"):
        textual_inversion.load(ours, pickled)
    with pytest.raises(FileNotFoundError, match="no embedding file"):
        textual_inversion.load(ours, tmp_path / "missing.pt")
    # nothing was added by the failures
    assert ours.text_encoder.embeddings.token_embedding.weight.shape[0] == rows and ours.tokenizer.vocab_size == vocab
    textual_inversion.load(ours, files[0][0])
    with pytest.raises(ValueError, match=r"'<cat-toy>' is already in the tokenizer's vocabulary"):
        textual_inversion.load(ours, files[0][0])


def test_sd2_embedding_into_sd1_says_so():
    with torch.device("meta"):
        encoder = CLIPTextEncoder(CLIPTextConfig(width=768, layers=1, heads=12, mlp_width=3072))
    with pytest.raises(ValueError, match=r"made for SD 2.x \(OpenCLIP ViT-H/14\), this model is SD 1.x"):
        textual_inversion.add_tokens(CLIPTokenizer.sd15(), encoder, "<x>", torch.zeros(2, 1024))


@pytest.mark.slow
def test_sd15_text_encoder_equals_diffusers(tmp_path):
    """At SD 1.5's text-encoder size (768 wide, 12 layers), every format."""
    import diffusers
    ref0 = reference_pipeline(tmp_path / "sd", text=SD15_TEXT)   # a tiny U-Net: only the text side is compared
    files = embedding_files(tmp_path, SD15_TEXT["hidden_size"], seed=1)
    for path, token, word, _ in files:
        ref = diffusers.StableDiffusionPipeline(**ref0.components)
        ref.text_encoder = type(ref0.text_encoder).from_pretrained(str(tmp_path / "sd" / "text_encoder"))
        ref.tokenizer = type(ref0.tokenizer).from_pretrained(str(tmp_path / "sd" / "tokenizer"))
        ours = types.SimpleNamespace(tokenizer=CLIPTokenizer.sd15(), text_encoder=load_text_encoder(
            ref.text_encoder.state_dict()))
        ref.load_textual_inversion(str(path), token=token, tokenizer=ref.tokenizer, text_encoder=ref.text_encoder)
        textual_inversion.load(ours, path, token=token)
        prompts = [PROMPT.format(word), f"{word} of a cat"]
        with torch.no_grad():
            mine = ours.text_encoder(ours.tokenizer(prompts))
        torch.testing.assert_close(mine, reference_embeddings(ref, prompts), atol=1e-4, rtol=0)


def test_course_training_moves_only_the_new_row(tmp_path):
    """`train ti`: a few steps on the course model change the new row and nothing else (U-Net, text
    encoder, the 49,408 old rows), and the saved file loads back into a fresh text encoder."""
    from minisd.checkpoint import course_unet
    from minisd.train.ti import encode_concept_images, ti_prompt, train_ti
    from minisd.train.unet import frozen_course_models
    vae, text_encoder, tokenizer = frozen_course_models()
    unet = course_unet()
    before_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    before_text = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    old = text_encoder(tokenizer(["a red bar in the center"])).detach()
    encoded = encode_concept_images(vae, "bar", n=64)
    token, log = train_ti(unet, vae, text_encoder, tokenizer, "bar", steps=3, batch_size=4,
                          encoded=encoded, progress=False)
    assert token == "<bar>" and len(log["loss"]) == 3
    table = text_encoder.embeddings.token_embedding.weight
    assert table.shape[0] == 49409
    bar_row = table[tokenizer.encode("bar")[0]]
    assert not torch.equal(table[-1], bar_row)                       # it started at "bar" and moved
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before_unet[k]), k
    for k, v in text_encoder.state_dict().items():
        assert torch.equal(v[:49408] if k.endswith("token_embedding.weight") else v, before_text[k]), k
    assert torch.equal(text_encoder(tokenizer(["a red bar in the center"])), old)   # prompts without the token
    assert ti_prompt("a red bar in the center", "bar") == "a red <bar> in the center"
    pipe = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder)
    path = textual_inversion.save(pipe, token, tmp_path / "bar.safetensors")
    _, te2, tok2 = frozen_course_models()
    textual_inversion.load(types.SimpleNamespace(tokenizer=tok2, text_encoder=te2), path)
    prompt = ["a red <bar> in the center"]
    torch.testing.assert_close(te2(tok2(prompt)), text_encoder(tokenizer(prompt)), atol=0, rtol=0)


def test_train_ti_refuses_an_unknown_concept():
    from minisd.train.ti import cli_ti
    with pytest.raises(SystemExit, match="'dog' is not a shape or colour"):
        cli_ti(["--concept", "dog"])


def test_course_training_with_two_vectors(tmp_path):
    """--vectors 2: the word is <orange> and <orange>_1, both rows train, and the saved (2, D) file
    loads back as one word that stands for both."""
    from minisd.checkpoint import course_unet
    from minisd.train.ti import encode_concept_images, train_ti
    from minisd.train.unet import frozen_course_models
    vae, text_encoder, tokenizer = frozen_course_models()
    start = text_encoder.embeddings.token_embedding.weight[tokenizer.encode("orange")[0]].clone()
    token, _ = train_ti(course_unet(), vae, text_encoder, tokenizer, "orange", vectors=2, steps=2, batch_size=2,
                        encoded=encode_concept_images(vae, "orange", n=8), progress=False)
    assert tokenizer.encode(f"a {token} circle")[1:3] == [49408, 49409]
    rows = textual_inversion.embedding(tokenizer, text_encoder, token)
    assert rows.shape == (2, 64) and not torch.equal(rows[0], start) and not torch.equal(rows[1], start)
    path = textual_inversion.save(types.SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder), token,
                                  tmp_path / "orange.pt")
    name, vectors = textual_inversion.read(path)
    assert name == token and torch.equal(vectors, rows)
