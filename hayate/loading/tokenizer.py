"""Tokenizers built from GGUF metadata or a Hugging Face folder, and streaming detokenization.

A GGUF file carries no `tokenizer.json`, only llama.cpp's vocabulary keys, so the `tokenizers`
pipeline is rebuilt here: byte-level BPE for `tokenizer.ggml.model == "gpt2"` and SentencePiece
BPE with byte fallback for `"llama"`, the way transformers' GGUF loader and llama.cpp read them.
"""
from __future__ import annotations

import itertools
import json
import operator
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from hayate.loading.builtin_templates import gemma_chat_template
from hayate.loading.gguf_checks import GGUFError, check_tokenizer_metadata

_GEMMAS = ("gemma", "gemma2", "gemma3")
# llama.cpp token types (they are SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens llama.cpp treats as end-of-generation by their text, since GGUF files rarely list them.
END_OF_TURN_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>", "<end_of_utterance>",
})

# Pre-tokenizer splits by `tokenizer.ggml.pre`, from llama.cpp's llama-vocab.cpp. Each regex is
# applied in turn to the pieces the previous one left, as Split(..., "isolated") does.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_V3 = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_NORDIC = r" ?[^(\s|.,!?…。，、।۔،)]+"
_SPLITS_BY_FAMILY = {
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "starcoder": [r"\p{N}", _GPT2],  # digits one by one, then GPT-2's split
    "tekken": [_TEKKEN],
    "gpt4o": [_GPT4O],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"],
    # DeepSeek's tokenizer.json spells the Lu/Ll/Lt letter class out as explicit ranges.
    "deepseek-llm": [r"[\r\n]", r"\s?[\p{Lu}\p{Ll}\p{Lt}]+",
                     "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                     r"\s+$", _CJK, r"\p{N}+"],
    "deepseek-v3": [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK_V3],
    "bloom": [_NORDIC],
    "viking": [_NORDIC, r"\p{N}"],
}
_FAMILY_BY_PRE = {
    **dict.fromkeys(["default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion",
                     "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "gigachat", "exaone4"], "gpt2"),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "dbrx", "smaug-bpe", "chatglm-bpe", "glm4"], "llama3"),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez", "kormo", "stablelm2", "hunyuan",
                     "grok-2"], "qwen2"),
    **dict.fromkeys(["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                     "minerva-7b"], "starcoder"),
    **dict.fromkeys(["gpt-4o", "llama4", "minimax-m2"], "gpt4o"),
    **dict.fromkeys(["poro-chat", "bloom", "gpt3-finnish"], "bloom"),
    **dict.fromkeys(["deepseek-v3", "hunyuan-dense"], "deepseek-v3"),
    "tekken": "tekken", "falcon": "falcon", "viking": "viking",
    "deepseek-coder": "deepseek-coder", "deepseek-llm": "deepseek-llm",
}
# llama.cpp looks a whole pre-token up in the vocabulary before merging, and adds BOS, for these.
_IGNORE_MERGES_FAMILIES = frozenset({"llama3", "tekken"})


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    """token -> id; empty or repeated spellings get placeholders so every id keeps a name."""
    vocab = dict(zip(tokens, range(len(tokens))))
    if len(vocab) == len(tokens) and "" not in vocab:
        return vocab   # no placeholders needed: built at C speed
    vocab = {}
    for token_id, token in enumerate(tokens):
        key = token or f"[EMPTY_{token_id}]"
        vocab[key if key not in vocab else f"[DUPLICATE_{token_id}]"] = token_id
    return vocab


def _split_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs = (merge.split(" ") for merge in merges)
    return [(pair[0], pair[1]) for pair in pairs if len(pair) == 2]


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], source: str, **options) -> models.BPE:
    """models.BPE, once every merge is known to join two tokens into a third (the `tokenizers`
    library panics, with a Rust backtrace, on a merge whose result is not in the vocabulary)."""
    for index, (left, right) in enumerate(merges):
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise GGUFError(f"{source}: tokenizer.ggml.merges entry {index} ({left} {right}) "
                            "joins pieces that are not tokens of the vocabulary")
    return models.BPE(vocab, merges, **options)


def _byte_level_backend(metadata: dict, source: str) -> Backend:
    tokens, types = metadata["tokenizer.ggml.tokens"], _token_types(metadata)
    spelling = _byte_alphabet()
    # Added tokens keep their text (that is how they are matched); a normal token with
    # characters outside the byte alphabet is stored as text by the converter: respell it.
    spelled = list(tokens)
    for token_id in _outside(tokens, set(spelling.values())):
        if types[token_id] == NORMAL:
            spelled[token_id] = "".join(spelling[b] for b in tokens[token_id].encode("utf-8"))
    family = _FAMILY_BY_PRE.get(metadata.get("tokenizer.ggml.pre", "default"), "gpt2")
    bpe = _bpe(_vocab(spelled), _split_merges(metadata.get("tokenizer.ggml.merges", [])), source,
               ignore_merges=family in _IGNORE_MERGES_FAMILIES)
    backend = Backend(bpe)
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in _SPLITS_BY_FAMILY[family]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _outside(tokens: Sequence[str], alphabet: set[str]) -> Iterator[int]:
    """Ids of the tokens with a character outside `alphabet` (found at C speed: few are)."""
    return itertools.compress(itertools.count(), map(operator.not_, map(alphabet.issuperset, tokens)))


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges: every split of a token into two tokens, best-scored result first.

    Same order as transformers' `generate_merges`, so ties break identically."""
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    # Only split points where both pieces have some token's length: linear in a token's length
    # would be quadratic in all, for a vocabulary with a few enormous tokens.
    lengths = sorted({len(token) for token in tokens})
    merges = []
    for merged, score in dict(zip(tokens, scores)).items():
        # Short tokens (nearly all): every split point, cheaper than filtering the lengths.
        splits = range(1, len(merged)) if len(merged) <= len(lengths) else (i for i in lengths if i < len(merged))
        local = [(merged[:i], merged[i:], score) for i in splits if merged[:i] in vocab and merged[i:] in vocab]
        merges.extend(sorted(local, key=lambda merge: (vocab[merge[0]], vocab[merge[1]])))
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_backend(metadata: dict, source: str) -> Backend:
    tokens = list(metadata["tokenizer.ggml.tokens"])
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    architecture = metadata.get("general.architecture", "")
    is_gemma = architecture in _GEMMAS
    if is_gemma:
        # Gemma stores runs of spaces as real spaces and orders merges by position, not score.
        tokens = _gemma_pieces(tokens)
        scores = [-float(i) for i in range(len(tokens))]
    merges = (_split_merges(metadata["tokenizer.ggml.merges"]) if "tokenizer.ggml.merges" in metadata
              else _merges_from_scores(tokens, scores))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None
    backend = Backend(_bpe(_vocab(tokens), merges, source, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix_space = metadata.get("tokenizer.ggml.add_space_prefix", not is_gemma)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if architecture == "phi3" or is_gemma:
        # transformers builds these two with normalizers, which also prefix text after special tokens.
        prefix = [normalizers.Prepend("▁")] if prefix_space else []
        backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    else:
        scheme = "first" if prefix_space else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix_space else []))
    return backend


def _builtin_template(metadata: dict) -> str | None:
    """Gemma's own chat format for a Gemma 3 file that ships no template (base models' files)."""
    tokens = metadata["tokenizer.ggml.tokens"]
    gemma = metadata.get("general.architecture") == "gemma3" and "<start_of_turn>" in tokens
    return gemma_chat_template() if gemma else None


def _gemma_pieces(tokens: Sequence[str]) -> list[str]:
    """Gemma's vocabulary with its runs of spaces spelled as the pieces text normalizes to."""
    return ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]


def _token_types(metadata: dict) -> list[int]:
    types = metadata.get("tokenizer.ggml.token_type")
    return list(types) if types else [NORMAL] * len(metadata["tokenizer.ggml.tokens"])


def _end_of_turn_ids(special_tokens: dict[str, int]) -> set[int]:
    """llama.cpp's end-of-generation heuristic, over tokens that are special in the vocabulary."""
    ids = {token_id for text, token_id in special_tokens.items() if text in END_OF_TURN_TEXTS}
    if {"<|return|>", "<|call|>", "<|end|>"} <= special_tokens.keys():
        ids.discard(special_tokens["<|end|>"])  # gpt-oss: <|end|> closes a message, not the reply
    return ids


def _add_gguf_special_tokens(backend: Backend, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens,
    so both encode as one id when they appear in text (llama.cpp parses all three)."""
    special_types = (CONTROL, UNKNOWN)
    added = [
        # A run of spaces (Gemma's) is matched in the normalized text, where spaces are "▁".
        AddedToken(token, special=token_type in special_types or token in END_OF_TURN_TEXTS,
                   normalized=token.startswith("▁") and not token.strip("▁"))
        for token, token_type in zip(tokens, types)
        if token and (token_type in (*special_types, USER_DEFINED) or token in END_OF_TURN_TEXTS)
    ]
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])


def _gguf_token(metadata: dict, key: str) -> tuple[str | None, int | None]:
    tokens = metadata["tokenizer.ggml.tokens"]
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    if token_id is None or not 0 <= token_id < len(tokens):
        return None, None
    return tokens[token_id], token_id


def _content(token) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _folder_chat_template(folder: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default", else the first
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default", next(iter(named.values()), None))
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    return template


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token facts a chat engine needs."""

    def __init__(self, backend: Backend, *, bos_token: str | None, eos_token: str | None,
                 extra_eos_ids: Sequence[int] = (), add_bos_token: bool = False,
                 add_eos_token: bool = False, chat_template: str | None = None):
        self.backend = backend
        backend.no_truncation()
        backend.no_padding()
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id: int | None = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id: int | None = backend.token_to_id(eos_token) if eos_token else None
        special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.special_token_ids: frozenset[int] = frozenset(special.values())
        eos_ids = {self.eos_token_id, *extra_eos_ids, *_end_of_turn_ids(special)}
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids - {None})
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template
        self.byte_token_ids = _byte_fallback_ids(backend)
        anchor = backend.encode("a", add_special_tokens=False).ids
        self._anchor = anchor[-1:]  # a plain token to decode single tokens after (keeps their spaces)

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, source: str = "GGUF metadata") -> "Tokenizer":
        """From llama.cpp's tokenizer.ggml.* keys; GGUFError (naming `source`) if they are malformed."""
        check_tokenizer_metadata(metadata, source=source)
        if metadata["tokenizer.ggml.model"] == "gpt2":
            backend = _byte_level_backend(metadata, source)
            family = _FAMILY_BY_PRE.get(metadata.get("tokenizer.ggml.pre", "default"), "gpt2")
            default_bos = family in _IGNORE_MERGES_FAMILIES
        else:   # "llama"
            backend, default_bos = _sentencepiece_backend(metadata, source), True
        tokens = metadata["tokenizer.ggml.tokens"]
        gemma = metadata["tokenizer.ggml.model"] == "llama" and metadata.get("general.architecture") in _GEMMAS
        _add_gguf_special_tokens(backend, _gemma_pieces(tokens) if gemma else tokens, _token_types(metadata))
        bos_token, _ = _gguf_token(metadata, "bos_token_id")
        eos_token, _ = _gguf_token(metadata, "eos_token_id")
        extra_eos = [_gguf_token(metadata, key)[1] for key in ("eot_token_id", "eom_token_id")]
        return cls(backend, bos_token=bos_token, eos_token=eos_token,
                   extra_eos_ids=[i for i in extra_eos if i is not None],
                   add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)),
                   add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=metadata.get("tokenizer.chat_template") or _builtin_template(metadata))

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        backend = Backend.from_file(str(folder / "tokenizer.json"))
        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        bos_token, eos_token = _content(config.get("bos_token")), _content(config.get("eos_token"))
        generation_eos = _read_json(folder / "generation_config.json").get("eos_token_id") or []
        add_bos, add_eos = _post_processor_adds(backend, bos_token, eos_token)
        return cls(backend, bos_token=bos_token, eos_token=eos_token,
                   extra_eos_ids=[generation_eos] if isinstance(generation_eos, int) else generation_eos,
                   add_bos_token=bool(config.get("add_bos_token", add_bos)),
                   add_eos_token=bool(config.get("add_eos_token", add_eos)),
                   chat_template=_folder_chat_template(folder, config))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = ids if ids[:1] == [self.bos_token_id] else [self.bos_token_id, *ids]
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Decoded text of one token, with the leading space SentencePiece strips at text start."""
        anchor_text = self.decode(self._anchor, skip_special_tokens=False)
        text = self.decode([*self._anchor, token_id], skip_special_tokens=False)
        return text[len(anchor_text):] if text.startswith(anchor_text) else self.decode([token_id], False)


def _byte_fallback_ids(backend: Backend) -> frozenset[int]:
    """Ids of `<0xNN>` tokens, if the decoder turns them into bytes (SentencePiece byte fallback)."""
    probe = backend.token_to_id("<0x41>")
    if probe is None or backend.decode([probe], skip_special_tokens=False) != "A":
        return frozenset()
    ids = (backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
    return frozenset(token_id for token_id in ids if token_id is not None)


def _post_processor_adds(backend: Backend, bos_token: str | None, eos_token: str | None) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor adds BOS / EOS (used when the config does not say)."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    bos_id = backend.token_to_id(bos_token) if bos_token else None
    eos_id = backend.token_to_id(eos_token) if eos_token else None
    adds_bos = bos_id is not None and full[:1] == [bos_id] and plain[:1] != [bos_id]
    adds_eos = eos_id is not None and full[-1:] == [eos_id] and plain[-1:] != [eos_id]
    return adds_bos, adds_eos


class IncrementalDetokenizer:
    """Streams text for token ids one at a time, never emitting half a UTF-8 character
    and keeping word-boundary spacing right (SentencePiece's leading-space rule).

    Offsets technique: decode a window from `_prefix_offset`, diff it against the text of the
    window's already-emitted part, and hold back while the text ends in U+FFFD. Without a prompt
    the pushes plus `flush()` concatenate to `decode(all_ids)`; with one, the text continues the
    prompt (so a SentencePiece token's leading space is kept)."""

    PROMPT_CONTEXT = 6  # prompt tokens decoded before the first output token

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids[max(0, len(prompt_ids) - self.PROMPT_CONTEXT):])
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._in_byte_run = False
        self.text = ""

    def push(self, token_id: int) -> str:
        """The new text (possibly "") made final by this token."""
        self._ids.append(token_id)
        if not (self._skip_special_tokens and token_id in self._tokenizer.special_token_ids):
            self._in_byte_run = token_id in self._tokenizer.byte_token_ids
        if self._in_byte_run:
            return ""  # a run of byte tokens decodes as one group (skipped tokens don't end it)
        return self._emit(final=False)

    def flush(self) -> str:
        """Any text still held back at the end."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special_tokens)
        window = decode(self._ids[self._prefix_offset:], self._skip_special_tokens)
        if len(window) <= len(emitted) or (window.endswith("\ufffd") and not final):
            return ""
        new_text = window[len(emitted):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += new_text
        return new_text
