r"""Property: minisd's CLIPTokenizer gives transformers' ids on arbitrary Unicode text.

The reference is `transformers.CLIPTokenizer` as the test extra installs it (transformers
5.24.0, pinned in constraints.txt): in transformers 5 that class is the Rust-backed tokenizer
(`TokenizersBackend`: normalizer NFC, `\s+` -> " ", lowercase; a split regex; byte-level BPE),
the one diffusers' SD pipelines load. It is built on the same vocabulary as
tests/test_tokenizer.py builds it. ftfy is *not* installed by the test extra (the first test
asserts it is absent): transformers 5 never calls ftfy, and minisd's default (clean=None) does
not either; clean="ftfy" is OpenAI's original clean-up, compared nowhere here.

Text classes drawn: every assigned code point (letters of every script, CJK, Hangul, combining
marks, emoji with ZWJ and variation selectors, control and format characters, the Unicode
spaces, private use), words of many scripts mixed with contractions, HTML escapes, digits and
the special tokens typed inside the text, and long input (60-300 words, which both sides cut
at 75 tokens in the batch call).

Excluded, and why:
- lone surrogates (category Cs): not encodable as UTF-8, so no str a user can type or a file
  can hold; both tokenizers refuse them.
- code points that this Python's Unicode database does not assign (category Cn; Python 3.11
  ships Unicode 14.0). The Rust tokenizer classifies characters with its own, newer Unicode
  tables, so a character assigned since (e.g. U+31350, a CJK Extension H ideograph, Unicode
  15.0) is a letter there and unassigned, hence punctuation, here: ":\U00031350" gives
  [25, 172, 109, 235, 494] here (":" and the ideograph one punctuation run) and
  [281, 172, 109, 235, 494] in transformers (":" a word of its own). minisd classifies with
  Python's `unicodedata`, so it follows the Unicode version of the Python it runs on; the ids
  agree for every character both databases assign (a newer Python narrows the gap).
"""
import unicodedata

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from test_tokenizer import WORDS, ours, theirs  # noqa: E402,F401  (the fixtures: ours, and transformers' on the same vocabulary)

CHEAP = 20 * settings().max_examples  # a tokenizer call costs microseconds: draw more

# every code point this Python's Unicode database assigns, surrogates excepted (see the docstring)
any_char = st.characters(exclude_categories=["Cs", "Cn"])
texts = st.one_of(
    st.text(any_char, max_size=60),                                               # anything at all
    st.text(st.characters(categories=["Mn", "Mc", "Me", "Cc", "Cf", "Co", "Zs", "Zl", "Zp"]), max_size=20),
    st.lists(st.one_of(st.sampled_from(WORDS), st.text(any_char, min_size=1, max_size=4),
                       st.sampled_from(["<|startoftext|>", "<|endoftext|>", "'s", "'LL", "&amp;", "1,000"])),
             max_size=12).map(" ".join),                                           # words of many scripts
)


def test_the_reference_has_no_ftfy():
    """transformers' CLIPTokenizer changes behaviour with ftfy installed; these properties name the fallback."""
    import importlib.util
    assert importlib.util.find_spec("ftfy") is None, "ftfy is installed: compare with CLIPTokenizer(clean='ftfy')"


@settings(max_examples=CHEAP)
@given(text=texts)
def test_ids_equal_transformers_on_any_text(ours, theirs, text):
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]


@settings(max_examples=CHEAP)
@given(text=st.text(st.sampled_from([c for c in map(chr, range(0x300, 0x370))] + list("aeiouAEIOUΣσ")), max_size=30))
def test_combining_marks_and_normalisation(ours, theirs, text):
    """Letters followed by combining marks (NFC composes some, not others): the same ids."""
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]


@settings(max_examples=settings().max_examples)
@given(words=st.lists(st.one_of(st.sampled_from(WORDS), st.text(any_char, min_size=1, max_size=3)),
                      min_size=60, max_size=300))
def test_long_input_is_cut_as_transformers_cuts_it(ours, theirs, words):
    """Very long prompts: the batch call (77 ids, start, end, padding) equals transformers' with truncation."""
    text = " ".join(words)
    expected = theirs([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with pytest.warns(UserWarning) if len(ours.encode(text)) > 75 else _no_warning():
        got = ours([text])
    assert torch.equal(got, expected)


def _no_warning():
    import warnings
    import contextlib

    @contextlib.contextmanager
    def cm():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    return cm()


@pytest.mark.skipif(unicodedata.unidata_version >= "15.0", reason="this Python's Unicode database assigns U+31350")
def test_the_one_known_difference_is_unicode_version_skew(ours, theirs):
    """The excluded class, pinned: a character newer than this Python's Unicode database."""
    text = ":\U00031350"  # U+31350: a CJK Extension H ideograph, assigned in Unicode 15.0
    assert unicodedata.category(text[1]) == "Cn"
    assert ours.encode(text) == [25, 172, 109, 235, 494]                                # ':' joins the ideograph
    assert theirs(text, add_special_tokens=False)["input_ids"] == [281, 172, 109, 235, 494]  # ':</w>' alone
