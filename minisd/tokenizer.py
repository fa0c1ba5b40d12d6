"""CLIP's tokenizer (chapter 7): text -> 77 token ids, with the byte-level BPE of OpenAI's CLIP.

The vocabulary is `data/bpe_simple_vocab_16e6.txt.gz` (48,894 merges; 49,408 tokens).
Text goes through four steps, each a method below so the book can show it:

1. `normalize`: Unicode NFC, every run of whitespace -> one space, lowercase;
2. `pretokenize`: split into words, single digits, runs of punctuation and 's 't 're 've 'm 'll 'd;
3. `bpe`: each piece's UTF-8 bytes as 256 printable characters, the last one marked
   with `</w>`, then the learned merges applied, lowest rank first;
4. `__call__`: <|startoftext|> + ids + <|endoftext|>, padded to 77 with <|endoftext|> (SD 1.x)
   or "!" (SD 2.x).

`add_tokens` appends new words after the 49,408 (textual inversion, chapter 16): they are found
in the normalised text before BPE sees it, as transformers' added tokens are.

The result equals transformers' `CLIPTokenizer` (what diffusers' SD pipelines use), id for id.
"""
import gzip
import html
import re
import unicodedata
import warnings

import torch

from . import paths

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Unicode's White_Space characters: the ones transformers' `\s+` turns into a single space
WHITESPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
# the two special tokens, matched in the raw text (case-sensitive) before anything else
SPECIAL = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
CONTRACTIONS = ("'s", "'t", "'m", "'d", "'re", "'ve", "'ll")
CACHE_SIZE = 100_000  # words remembered before the cache starts over


def bytes_to_unicode():
    """The 256 bytes -> 256 printable characters (GPT-2's table): printable Latin-1 bytes
    map to themselves, the others (control characters, space...) to chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    moved = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return table


def _kind(char):
    """'L' for a letter, 'N' for a number, 'P' for anything else (punctuation, symbols, emoji)."""
    kind = unicodedata.category(char)[0]
    return kind if kind in "LN" else "P"


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (chapter 7); `CLIPTokenizer.sd15()` is SD 1.x's.

    `clean` chooses the text clean-up OpenAI's original tokenizer applies first:
    None (default) does none, as transformers and diffusers do; "html" undoes HTML
    escapes (`&amp;` -> `&`, twice, as OpenAI does); "ftfy" also repairs mojibake with
    `ftfy.fix_text` (needs `pip install ftfy`), which is exactly OpenAI's clean-up.
    """

    length = 77  # the text encoder's positions: start + 75 tokens + end

    def __init__(self, vocab_path, clean=None, pad=EOS):
        if clean not in (None, "html", "ftfy"):
            raise ValueError(f"clean={clean!r}: expected None (as transformers), 'html' or 'ftfy' (as OpenAI)")
        if clean == "ftfy":
            try:
                import ftfy  # noqa: F401
            except ImportError as e:
                raise ImportError("clean='ftfy' needs the ftfy package: `pip install ftfy`, "
                                  "or use clean='html' (html.unescape only, no mojibake repair)") from e
        self.clean = clean
        lines = gzip.open(vocab_path, "rt", encoding="utf-8").read().split("\n")
        # line 0 is a version header; CLIP uses the first 49152 - 256 - 2 = 48,894 merges
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        chars = list(self.byte_encoder.values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.decoder = tokens
        self.ranks = {m: i for i, m in enumerate(merges)}  # lower rank = learned earlier = merged first
        self.bos_id, self.eos_id = self.encoder[BOS], self.encoder[EOS]
        if pad not in self.encoder:
            raise ValueError(f"pad={pad!r} is not a token of this vocabulary")
        self.pad_id = self.encoder[pad]  # SD 1.x pads with <|endoftext|>, SD 2.x with "!" (id 0)
        self.cache = {}  # word (no spaces) -> its ids
        self.added = {}  # added token, normalised -> id (textual inversion, chapter 16)
        self._added_pattern = None

    @classmethod
    def sd15(cls, clean=None, pad=EOS):
        """SD 1.x's tokenizer: CLIP ViT-L/14's vocabulary, from data/."""
        return cls(paths.DATA_DIR / "bpe_simple_vocab_16e6.txt.gz", clean=clean, pad=pad)

    @classmethod
    def sd2(cls, clean=None):
        """SD 2.x's tokenizer: the same vocabulary, but it pads with "!" (id 0), as OpenCLIP's
        tokenizer pads with 0 and diffusers' SD 2 tokenizer_config.json says pad_token "!"."""
        return cls.sd15(clean=clean, pad="!")

    @property
    def vocab_size(self):
        return len(self.decoder)

    def add_tokens(self, tokens):
        """Append new tokens after the vocabulary (textual inversion, chapter 16); returns their ids.

        As transformers' `add_tokens`: a token is matched in the normalised text (so "<Cat>" also
        matches "<cat>"), anywhere, longest first, before the text is split into words. A token
        `<t>` followed by added tokens `<t>_1`, `<t>_2`... stands for all of them (a multi-vector
        embedding), as diffusers' `maybe_convert_prompt` expands it."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        for token in tokens:
            key = self.normalize(token).strip() if isinstance(token, str) else ""
            if not key:
                raise ValueError(f"cannot add {token!r}: a token is a non-empty string")
            if key in self.added or token in self.encoder or key in self.encoder or key + "</w>" in self.encoder:
                raise ValueError(f"{token!r} is already in the tokenizer's vocabulary: adding it would change what "
                                 "prompts that use it mean. Choose a new name, e.g. '<my-concept>'")
        if len(set(tokens)) < len(tokens):
            raise ValueError(f"{tokens}: a token is listed twice")
        ids = []
        for token in tokens:
            self.added[self.normalize(token).strip()] = len(self.decoder)
            ids.append(len(self.decoder))
            self.decoder.append(token)
        # longest first, so that "<t>_1" is not read as "<t>" followed by "_1"
        self._added_pattern = re.compile("(" + "|".join(map(re.escape, sorted(self.added, key=len, reverse=True)))
                                         + ")")
        self.cache.clear()
        return ids

    def added_ids(self, key):
        """An added token's id, then those of `key_1`, `key_2`... (its other vectors)."""
        ids, i = [self.added[key]], 1
        while f"{key}_{i}" in self.added:
            ids.append(self.added[f"{key}_{i}"])
            i += 1
        return ids

    # --- the four steps ---------------------------------------------------------------------
    def normalize(self, text):
        """Optional clean-up, then NFC, whitespace runs -> ' ', lowercase."""
        if self.clean == "ftfy":
            import ftfy
            text = ftfy.fix_text(text)
        if self.clean is not None:
            text = html.unescape(html.unescape(text))
        text = WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        # lowercase letter by letter, as transformers does: str.lower() alone would turn a
        # word-final capital sigma into "ς" where transformers writes "σ"
        return text.replace("Σ", "σ").lower()

    def pretokenize(self, text):
        """Normalised text -> pieces: letter runs, single digits, punctuation runs, contractions."""
        return [piece for word in text.split(" ") for piece in self._split_word(word)]

    @staticmethod
    def _split_word(word):
        pieces, i = [], 0
        while i < len(word):
            if word[i] == "'" and (word[i:i + 2] in CONTRACTIONS or word[i:i + 3] in CONTRACTIONS):
                j = i + (2 if word[i:i + 2] in CONTRACTIONS else 3)
            elif _kind(word[i]) == "N":
                j = i + 1  # numbers are split digit by digit
            else:
                kind, j = _kind(word[i]), i + 1
                while j < len(word) and _kind(word[j]) == kind:
                    j += 1
            pieces.append(word[i:j])
            i = j
        return pieces

    def bpe(self, piece):
        """One piece -> its BPE tokens (strings): merge the lowest-ranked adjacent pair until none is left."""
        symbols = [self.byte_encoder[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"  # the end of a word is part of its last token
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text):
        """Text -> token ids, without <|startoftext|> / <|endoftext|> around it and without padding."""
        ids = []
        for segment in SPECIAL.split(text):
            if segment in (BOS, EOS):  # typed special tokens count as themselves
                ids.append(self.encoder[segment])
                continue
            text = self.normalize(segment)
            parts = self._added_pattern.split(text) if self._added_pattern else [text]
            for k, part in enumerate(parts):
                if k % 2:  # an added token (the pattern's group)
                    ids.extend(self.added_ids(part))
                    continue
                for word in part.split(" "):
                    if word and word not in self.cache:
                        if len(self.cache) >= CACHE_SIZE:
                            self.cache.clear()
                        self.cache[word] = [self.encoder[t] for p in self._split_word(word) for t in self.bpe(p)]
                    ids.extend(self.cache.get(word, ()))
        return ids

    def __call__(self, texts):
        """A prompt or a list of prompts -> LongTensor (B, 77): start, ids, end, padding.

        A prompt longer than 75 tokens is cut to its first 75 (the end token is kept), with a warning.
        """
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompt {row} is a {type(text).__name__}; the tokenizer takes str or a list of str")
            ids = self.encode(text)
            room = self.length - 2
            if len(ids) > room:
                warnings.warn(f"prompt {row} has {len(ids)} tokens but CLIP reads at most {room} "
                              f"(77 with start and end): {len(ids) - room} tokens were dropped: "
                              f"{self.decode(ids[room:])!r}", stacklevel=2)
                ids = ids[:room]
            out[row, :len(ids) + 2] = torch.tensor([self.bos_id, *ids, self.eos_id])
        return out

    def decode(self, ids):
        """Token ids -> text (words separated by spaces, lowercase, special tokens kept)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        first_added = len(self.decoder) - len(self.added)
        words, run = [], []
        for i in [*ids, None]:
            if i is not None and i < first_added:
                run.append(i)
                continue
            for part in SPECIAL.split("".join(self.decoder[j] for j in run)):
                if part in (BOS, EOS):  # special tokens are not byte-encoded
                    words.append(part)
                    continue
                for word in part.split("</w>"):
                    words.append(bytearray(self.byte_decoder[c] for c in word).decode("utf-8", "replace"))
            run = []
            if i is not None:
                words.append(self.decoder[i])  # an added token, as it was added
        return " ".join(w for w in words if w)
