"""minisd.tokenizer: CLIP's BPE gives the same ids as transformers' CLIPTokenizer (chapter 7)."""
import gzip
import json
import random
import unicodedata
import warnings

import pytest
import torch

import minisd
from minisd import CLIPTokenizer

VOCAB = minisd.DATA_DIR / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.sd15()


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    """transformers' CLIPTokenizer on vocab.json + merges.txt written from the same .gz,
    following OpenAI's recipe (as the files of openai/clip-vit-large-patch14 are)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    lines = gzip.open(VOCAB, "rt", encoding="utf-8").read().split("\n")[1:48895]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    tokens = chars + [c + "</w>" for c in chars] + [line.replace(" ", "") for line in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


WORDS = ("a photograph of an astronaut riding a horse masterpiece best quality highly detailed "
         "portrait cinematic lighting 8k unreal engine trending on artstation by greg rutkowski "
         "cat dog red green blue circle square triangle in the top left it's don't we're they've "
         "I'm you'll he'd CAT Dog ÉLAN naïve café façade jalapeño Zürich São Paulo Ελλάδα ΟΔΟΣ "
         "Москва İstanbul straße ﬁne ½ ² Ⅻ 東京 猫が好き 한국어 中文提示词 ไทย العربية עברית हिन्दी "
         "😀 👍🏽 🐱‍👤 ❤️ 🇫🇷 © ™ → … — – «quote» “smart” ‘single’ e\u0301 n\u0303 anime 1girl "
         "solo long_hair looking_at_viewer <lora:style:0.8> [cat|dog] {a|b} BREAK AND").split()
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "!!", "?!", "'s", "''", "&amp;", "&lt;"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\u200b", "\x1c", "\x85", "\u2028"]


def random_char(rng):
    while True:  # a code point Python's Unicode database knows (assigned, not a surrogate)
        c = chr(rng.choice([rng.randrange(32, 0x3000), rng.randrange(0x3000, 0x10000),
                            rng.randrange(0x1F300, 0x1FAFF)]))
        if unicodedata.category(c) not in ("Cn", "Cs", "Co"):
            return c


def prompts(n, seed=0):
    rng = random.Random(seed)
    out = ["", " ", "\n\t ", "a photograph of an astronaut riding a horse", "(red:1.2)",
           "((masterpiece)), (best quality:1.4), [lowres:0.5]", "a <|endoftext|> b",
           "x<|startoftext|>y", "<|ENDOFTEXT|>", "it'sun 's'S ''s", "3.14159 1,000,000 2024-01-01",
           "Hello&amp;World &quot;hi&quot;", "ΟΔΟΣ ΣΑΣ Σ", "a " * 100, "supercalifragilistic" * 8]
    while len(out) < n:
        parts = []
        for _ in range(rng.randrange(0, 40)):
            r = rng.random()
            if r < 0.45:
                w = rng.choice(WORDS)
                parts.append(w.upper() if rng.random() < 0.1 else w)
            elif r < 0.6:
                parts.append(rng.choice(PUNCT))
            elif r < 0.7:
                parts.append(str(rng.randrange(10 ** rng.randrange(1, 7))))
            elif r < 0.78:
                parts.append(f"({rng.choice(WORDS)}:{rng.uniform(0, 2):.{rng.randrange(1, 3)}f})")
            elif r < 0.9:
                parts.append("".join(random_char(rng) for _ in range(rng.randrange(1, 6))))
            else:
                parts.append(rng.choice(SPACES))
            parts.append(rng.choice(SPACES) if rng.random() < 0.3 else ("" if rng.random() < 0.2 else " "))
        out.append("".join(parts))
    return out


def test_known_ids(ours):
    # the vocabulary's layout: 256 byte characters, the same with </w>, merges, then the specials
    assert ours.vocab_size == 49408
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (49406, 49407, 49407)
    assert ours.encode("a photograph of an astronaut riding a horse") == \
        [320, 8853, 539, 550, 18376, 6765, 320, 4558]


def test_batch_shape_and_padding(ours):
    ids = ours(["a photograph of an astronaut riding a horse", ""])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[0, :10].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert (ids[0, 10:] == 49407).all()
    assert ids[1].tolist() == [49406] + [49407] * 76
    assert ours("a cat").shape == (1, 77)  # one string is a batch of one


def test_same_ids_as_transformers(ours, theirs):
    texts = prompts(1200)
    assert len(texts) >= 1000
    for text in texts:
        expected = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == expected, repr(text)


def test_batch_equals_transformers_with_truncation(ours, theirs):
    texts = prompts(64, seed=1) + ["a very long prompt " * 30]
    expected = theirs(texts, padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt")["input_ids"]
    with pytest.warns(UserWarning):
        got = ours(texts)
    assert torch.equal(got, expected)


def test_truncation_warns_with_count(ours):
    text = " ".join(["cat"] * 80)  # 80 tokens, 75 fit
    with pytest.warns(UserWarning, match="5 tokens were dropped"):
        ids = ours(text)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0, 1:76] == ours.encode("cat")[0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 tokens fit: no warning
        assert (ours(" ".join(["cat"] * 75))[0, 1:76] == ours.encode("cat")[0]).all()


def test_cache_returns_same_ids(ours):
    text = "a red circle in the top left, a red circle!"
    first = ours.encode(text)
    assert "circle" in ours.cache
    assert ours.encode(text) == first


def test_html_clean_is_an_option(ours):
    cleaned = CLIPTokenizer.sd15(clean="html")
    # transformers leaves "&amp;" as four characters; OpenAI's clean-up reads it as "&"
    assert ours.encode("salt &amp; pepper") != ours.encode("salt & pepper")
    assert cleaned.encode("salt &amp; pepper") == ours.encode("salt & pepper")
    assert cleaned.encode("&amp;amp;") == ours.encode("&")  # unescaped twice, as OpenAI does


def test_bad_options_and_input(ours):
    with pytest.raises(ValueError, match="clean="):
        CLIPTokenizer.sd15(clean="yes")
    with pytest.raises(TypeError, match="prompt 1"):
        ours(["ok", 3])
    try:
        import ftfy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install ftfy"):
            CLIPTokenizer.sd15(clean="ftfy")


def test_decode_round_trip(ours):
    assert ours.decode(ours("A Photograph, of 2 cats!")[0, :9]) == \
        "<|startoftext|> a photograph , of 2 cats ! <|endoftext|>"


def test_sd2_pads_with_exclamation_mark_as_transformers(theirs, tmp_path):
    """SD 2.x's tokenizer_config.json says pad_token "!": the same ids, then 0s where SD 1.x has 49407s."""
    transformers = pytest.importorskip("transformers")
    theirs.save_pretrained(str(tmp_path))
    sd2 = transformers.CLIPTokenizer.from_pretrained(str(tmp_path), pad_token="!")
    prompts = ["a photograph of an astronaut riding a horse", ""]
    expected = sd2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ours2 = CLIPTokenizer.sd2()(prompts)
    assert torch.equal(ours2, expected)
    assert ours2[1].tolist()[:3] == [49406, 49407, 0] and ours2.shape == (2, 77)
    with pytest.raises(ValueError, match="not a token"):
        CLIPTokenizer(VOCAB, pad="<pad>")
