"""Prompt structure for the cross-attention controls: which tokens a word occupies, and the prompt's noun phrases.

Positions are found by tokenizing growing prefixes of the prompt's words, so they are right for any tokenizer that
splits at whitespace (CLIP's BPE, where one word may be several tokens, and word-level vocabularies alike), and they
include the tokenizer's BOS offset.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

from accel.errors import InvalidOptionError

# Words that end a noun phrase in the built-in chunker: conjunctions, prepositions and relation words.
_BOUNDARIES = frozenset(
    "and or with without on in under over above below behind beside near next to of left right at by".split()
)


@dataclass(frozen=True)
class PromptWord:
    text: str
    index: int  # position among the prompt's words
    tokens: tuple[int, ...]  # positions in the tokenized prompt (BOS included in the count)
    core: tuple[int, ...] = ()  # the tokens of the word without punctuation around it ("circle," -> circle's)


def prompt_span(tokenizer, prompt: str, max_length: int | None = None) -> tuple[int, int]:
    """``(first, end)``: the positions of the prompt's own tokens in its encoded sequence, BOS (CLIP) before them
    and EOS and padding after them left out; T5 (FLUX) has no BOS, so its prompt starts at 0. At least one token."""
    limit = max_length or tokenizer.model_max_length
    ids = _token_ids(tokenizer, prompt)[:limit]
    first = _bos_offset(tokenizer, ids)
    end = len(ids)
    if end > first and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        end -= 1
    elif end == limit:
        end -= 1  # truncated: the encoder's last position holds EOS
    return first, max(end, first + 1)


def prompt_words(tokenizer, prompt: str, max_length: int | None = None) -> list[PromptWord]:
    """The prompt's whitespace words with the token positions each occupies (words past the length limit dropped).

    ``max_length``: the sequence length the pipeline encodes (FLUX's ``max_sequence_length``); default the
    tokenizer's ``model_max_length``.
    """
    words = prompt.split()
    ids = _token_ids(tokenizer, prompt)
    offset = _bos_offset(tokenizer, ids)
    limit = (max_length or tokenizer.model_max_length) - offset - 1
    result, used = [], 0
    for index, word in enumerate(words):
        count = len(_token_ids(tokenizer, " ".join(words[: index + 1]), special=False))
        if count > limit:
            break
        tokens = tuple(range(offset + used, offset + count))
        core = tokens
        bare = word.strip(_PUNCTUATION)
        if bare and bare != word:
            # A subject's map must not average in the comma after it: count the tokens up to the bare word's edges.
            lead = word[: len(word) - len(word.lstrip(_PUNCTUATION))]
            start = len(_token_ids(tokenizer, " ".join([*words[:index], lead]), special=False)) if lead else used
            end = len(_token_ids(tokenizer, " ".join([*words[:index], lead + bare]), special=False))
            if used <= start < end <= count:
                core = tuple(range(offset + start, offset + end))
        result.append(PromptWord(word, index, tokens, core))
        used = count
    return result


def token_count(tokenizer, text: str) -> int:
    """How many tokens ``text`` takes on its own, special tokens left out."""
    return len(_token_ids(tokenizer, text, special=False))


def word_positions(
    tokenizer, prompt: str, words: list[str | int], max_length: int | None = None
) -> list[tuple[int, ...]]:
    """Token positions of each requested word (or token index, given as an int).

    A word matches a prompt word case-insensitively, ignoring punctuation around it (which is left out of its
    tokens); a word asked for k times takes its first k occurrences in order ("a red circle and a blue circle":
    ``["circle", "circle"]`` is both circles). Raises `InvalidOptionError` listing the prompt's words for a word that
    is not in it (or not that many times), and for a token index outside the prompt's own tokens (``prompt_span``).
    """
    found = prompt_words(tokenizer, prompt, max_length)
    positions = []
    taken: set[int] = set()
    for word in words:
        if isinstance(word, int) and not isinstance(word, bool):
            first, end = prompt_span(tokenizer, prompt, max_length)
            if not first <= word < end:
                raise InvalidOptionError(
                    f"token index {word} is outside the prompt's own tokens {first}..{end - 1} of {prompt!r}"
                )
            positions.append((word,))
            continue
        wanted = _normalise(str(word))
        occurrences = [w for w in found if _normalise(w.text) == wanted]
        match = next((w for w in occurrences if w.index not in taken), None)
        if match is None:
            listed = ", ".join(repr(w.text) for w in found)
            cut = len(prompt.split()) - len(found)
            encoded = max_length or tokenizer.model_max_length
            truncated = f" (the {cut} words after those do not fit the {encoded} tokens encoded)" if cut else ""
            if occurrences:
                raise InvalidOptionError(
                    f"{word!r} is asked for {sum(_normalise(str(w)) == wanted for w in words)} times but the prompt "
                    f"{prompt!r} has it {len(occurrences)}x{truncated}; name each occurrence once"
                )
            raise InvalidOptionError(
                f"{word!r} is not a word of the prompt {prompt!r}; its words are: {listed}{truncated}"
            )
        taken.add(match.index)
        positions.append(match.core or match.tokens)
    return positions


# Words of a noun phrase that name no property of the subject: left out of a phrase's subject tokens.
_FUNCTION_WORDS = frozenset("a an the this that these those some two three four five six many several".split())


def phrase_positions(tokenizer, prompt: str, max_length: int | None = None) -> list[tuple[int, ...]]:
    """Token positions of each noun phrase's content words (articles and counts left out), one entry per phrase:
    "a red circle and a blue square" gives the positions of "red circle" and of "blue square"."""
    found = prompt_words(tokenizer, prompt, max_length)
    positions = []
    for phrase in noun_phrases(prompt):
        tokens = tuple(
            position
            for word in found[phrase.words[0] : phrase.words[1]]
            if _normalise(word.text) not in _FUNCTION_WORDS
            for position in word.core or word.tokens
        )
        if tokens:
            positions.append(tokens)
    return positions


def head_noun_positions(tokenizer, prompt: str, max_length: int | None = None) -> list[tuple[int, ...]]:
    """Token positions of each noun phrase's last word (its head noun), by the phrase's own word index, so "a red
    circle and a blue circle" gives both circles; phrases past the encoded length are left out."""
    found = prompt_words(tokenizer, prompt, max_length)
    heads = [found[p.words[1] - 1] for p in noun_phrases(prompt) if p.words[1] <= len(found)]
    return [word.core or word.tokens for word in heads]


@dataclass(frozen=True)
class NounPhrase:
    text: str
    words: tuple[int, int]  # [first, last) word indices in the prompt


def noun_phrases(prompt: str, parser: str = "auto") -> list[NounPhrase]:
    """The prompt's noun phrases of more than one word, left to right.

    ``parser``: ``"spacy"`` (``doc.noun_chunks`` of ``en_core_web_sm``; an error if it is not installed),
    ``"builtin"`` (a chunker that cuts at conjunctions, prepositions, relation words and punctuation: right for
    "a red circle and a blue square", "a green star left of a red circle"), ``"auto"``: spaCy when its English model
    is installed, the built-in chunker otherwise.
    """
    if parser not in ("auto", "spacy", "builtin"):
        raise InvalidOptionError(f"parser={parser!r} must be one of auto, spacy, builtin")
    if parser in ("auto", "spacy"):
        nlp = _spacy_english()
        if nlp is not None:
            return _spacy_phrases(nlp, prompt)
        if parser == "spacy":
            raise InvalidOptionError(
                "parser='spacy' needs spaCy and its English model: pip install spacy && python -m spacy download "
                "en_core_web_sm (or use parser='builtin')"
            )
    return _builtin_phrases(prompt)


def explicit_phrases(prompt: str, phrases: list[str]) -> list[NounPhrase]:
    """User-given noun phrases located in the prompt (word-aligned, case-insensitive), with a clear error if not."""
    words = [_normalise(w) for w in prompt.split()]
    result = []
    for phrase in phrases:
        wanted = [_normalise(w) for w in phrase.split()]
        start = next(
            (i for i in range(len(words) - len(wanted) + 1) if wanted and words[i : i + len(wanted)] == wanted), None
        )
        if start is None:
            raise InvalidOptionError(
                f"noun phrase {phrase!r} is not in the prompt {prompt!r} (word for word); its words are: "
                + ", ".join(repr(w) for w in prompt.split())
            )
        result.append(NounPhrase(" ".join(prompt.split()[start : start + len(wanted)]), (start, start + len(wanted))))
    return result


def _builtin_phrases(prompt: str) -> list[NounPhrase]:
    words = prompt.split()
    phrases, start = [], 0
    for index in range(len(words) + 1):
        word = _normalise(words[index]) if index < len(words) else None
        ends_with_comma = index < len(words) and words[index].endswith((",", ";", "."))
        if word is None or word in _BOUNDARIES or not word:  # "" : a word of punctuation alone (" , ")
            if index - start > 1:
                phrases.append(NounPhrase(" ".join(words[start:index]), (start, index)))
            start = index + 1
        elif ends_with_comma:
            if index + 1 - start > 1:
                phrases.append(NounPhrase(" ".join(words[start : index + 1]).rstrip(",;."), (start, index + 1)))
            start = index + 1
    return phrases


def _spacy_phrases(nlp, prompt: str) -> list[NounPhrase]:
    doc = nlp(prompt)
    # spaCy tokens -> whitespace word indices, through character offsets.
    starts = [m.start() for m in re.finditer(r"\S+", prompt)]
    phrases = []
    for chunk in doc.noun_chunks:
        first = max(i for i, s in enumerate(starts) if s <= chunk.start_char)
        last = max(i for i, s in enumerate(starts) if s < chunk.end_char) + 1
        if last - first > 1:
            phrases.append(NounPhrase(" ".join(prompt.split()[first:last]), (first, last)))
    return phrases


@functools.lru_cache(maxsize=1)
def _spacy_english():
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except (ImportError, OSError):
        return None


_PUNCTUATION = ".,;:!?\"'()"


def _normalise(word: str) -> str:
    return word.strip(_PUNCTUATION).lower()


def _bos_offset(tokenizer, ids: list[int]) -> int:
    return 1 if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else 0


def _token_ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special, truncation=False)["input_ids"]


def observe_encode_prompt(observe):
    """A wrapper for ``pipe.encode_prompt`` (for ``PatchPlan.wrap_pipeline``): it calls the original, then
    ``observe(out, arguments, original)`` with every argument bound by name (defaults applied), and returns the
    original's output unchanged. The wrapper keeps the original's signature for wrappers outside it."""

    def wrap(original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def encode_prompt(*args, **kwargs):
            out = original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            observe(out, bound.arguments, original)
            return out

        return encode_prompt

    return wrap
