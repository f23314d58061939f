"""CLIP's byte-level BPE tokenizer without torch or open_clip, so deployed bundles tokenise anywhere.

It reads the same merges file open_clip ships (``bpe_simple_vocab_16e6.txt.gz``; a bundle carries a
copy) and produces the same ids: text cleaned with ftfy, HTML-unescaped twice, whitespace collapsed
and lower-cased; ``<start_of_text> … <end_of_text>`` zero-padded to 77. Prompts longer than that are
refused, as OpenAI's tokenizer does, rather than silently cut; so are empty prompts and text that is not
valid UTF-8 (undecodable bytes on a command line arrive as lone surrogates).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import itertools
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from cfdeploy.errors import CfdeployError, missing_extra
from cfdeploy.files import require_file

CONTEXT_LENGTH = 77
VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
END_OF_WORD = "</w>"
MAX_VOCAB_BYTES = 16 << 20  # open_clip's merges file is 3.2 MB uncompressed; more is not a vocabulary
MAX_PROMPT_CHARS = 2000  # 77 tokens of the longest words; a longer prompt is refused before it is tokenised
MAX_CACHED_WORDS = 50_000


def packaged_vocab_path() -> Path:
    """open_clip's copy of the merges file (export side only: deployed bundles carry their own), found without
    importing open_clip (and torch with it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise missing_extra("open_clip", "CLIP's vocabulary file")
    return Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILENAME


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """One printable character per byte value, in CLIP's vocabulary order.

    Printable bytes come first and stand for themselves; the others follow, mapped above 255.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {
        **{byte: chr(byte) for byte in printable},
        **{byte: chr(256 + offset) for offset, byte in enumerate(others)},
    }


def read_merges(path: Path) -> list[tuple[str, str]]:
    """The first :data:`N_MERGES` BPE merges of a vocabulary file (gzip, UTF-8, ``a b`` per line after a header)."""
    require_file(path)
    try:
        with gzip.open(path) as file:
            data = file.read(MAX_VOCAB_BYTES + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise CfdeployError(f"{path}: not a readable CLIP BPE merges file: {error}") from None
    if len(data) > MAX_VOCAB_BYTES:
        raise CfdeployError(f"{path}: not a CLIP BPE merges file: more than {MAX_VOCAB_BYTES:,} bytes uncompressed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CfdeployError(
            f"{path}: not a CLIP BPE merges file: invalid UTF-8 at byte {error.start:,} (uncompressed)"
        ) from None
    lines = text.split("\n")[1 : N_MERGES + 1]
    if len(lines) < N_MERGES:
        raise CfdeployError(
            f"{path}: not a CLIP BPE merges file: {len(lines):,} merges where CLIP's vocabulary has {N_MERGES:,}"
        )
    merges = []
    for number, line in enumerate(lines, start=2):
        symbols = line.split()
        if len(symbols) != 2:
            raise CfdeployError(f"{path}: line {number:,} is not a merge of two symbols: {line!r:.60}")
        merges.append((symbols[0], symbols[1]))
    return merges


def clean(text: str) -> str:
    import ftfy  # here and in ClipTokenizer: imported when text is tokenised, not by every edit from text features

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """``prompts → int64 [P, 77]`` token ids identical to open_clip's for CLIP ViT-B/32."""

    def __init__(self, vocab_path: Path | None = None) -> None:
        merges = read_merges(vocab_path or packaged_vocab_path())
        alphabet = list(byte_alphabet().values())
        vocab = [
            *alphabet,
            *(symbol + END_OF_WORD for symbol in alphabet),
            *("".join(m) for m in merges),
            *SPECIAL_TOKENS,
        ]
        self.ids = {token: index for index, token in enumerate(vocab)}
        self.merge_rank = {merge: rank for rank, merge in enumerate(merges)}
        self.start_id, self.end_id = (self.ids[token] for token in SPECIAL_TOKENS)
        import regex

        specials = "|".join(SPECIAL_TOKENS)
        self.pattern = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
        self._word_cache: dict[str, list[str]] = {token: [token] for token in SPECIAL_TOKENS}

    def _merge(self, word: str) -> list[str]:
        """Apply BPE merges to one pre-token (already mapped to the byte alphabet), lowest rank first."""
        if word in self._word_cache:
            return self._word_cache[word]
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = set(itertools.pairwise(symbols))
            best = min(pairs, key=lambda pair: self.merge_rank.get(pair, N_MERGES))
            if best not in self.merge_rank:
                break
            merged: list[str] = []
            index = 0
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                    merged.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        if len(self._word_cache) >= MAX_CACHED_WORDS:  # a server sees unbounded distinct words
            self._word_cache = {token: [token] for token in SPECIAL_TOKENS}
        self._word_cache[word] = symbols
        return symbols

    def encode(self, prompt: str) -> list[int]:
        """BPE ids of one prompt, without start/end tokens. A prompt is bounded in characters before it is tokenised:
        byte-pair merging is quadratic in a word's length, and no prompt CLIP can read (77 tokens) is that long."""
        if len(prompt) > MAX_PROMPT_CHARS:
            raise CfdeployError(
                f"prompt {prompt[:40]!r}… is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} "
                f"are read (CLIP reads {CONTEXT_LENGTH} tokens)"
            )
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise CfdeployError(f"prompt {prompt!r:.60} is not valid UTF-8 text") from None
        alphabet = byte_alphabet()
        ids: list[int] = []
        for piece in self.pattern.findall(clean(prompt)):
            word = "".join(alphabet[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.ids[symbol] for symbol in self._merge(word))
        if not ids:
            raise CfdeployError(f"prompt {prompt!r:.60} is empty (or only whitespace): there is no text to encode")
        return ids

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        tokens = np.zeros((len(prompts), CONTEXT_LENGTH), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids = [self.start_id, *self.encode(prompt), self.end_id]
            if len(ids) > CONTEXT_LENGTH:
                raise CfdeployError(
                    f"prompt {prompt[:40]!r}… is {len(ids)} tokens; CLIP reads at most {CONTEXT_LENGTH}"
                )
            tokens[row, : len(ids)] = ids
        return tokens
