"""Structured Diffusion Guidance and the prompt structure under it (token positions, noun phrases)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import generate_shapes

import accel
from accel.errors import InvalidOptionError
from accel.pipelines.prompts import explicit_phrases, noun_phrases, prompt_words, word_positions


@pytest.mark.parametrize(
    ("prompt", "phrases"),
    [
        ("a red circle and a blue square", ["a red circle", "a blue square"]),
        ("a green star left of a red circle", ["a green star", "a red circle"]),
        ("two red circles", ["two red circles"]),
        ("a cat, a dog with a hat", ["a cat", "a dog", "a hat"]),
        ("circles", []),
    ],
)
def test_builtin_chunker(prompt, phrases):
    assert [p.text for p in noun_phrases(prompt, parser="builtin")] == phrases


def test_explicit_phrases_must_be_in_the_prompt():
    assert explicit_phrases("A red circle and a blue square", ["a blue square"])[0].words == (4, 7)
    with pytest.raises(InvalidOptionError, match="its words are: 'a', 'red', 'circle'"):
        explicit_phrases("a red circle", ["a green star"])


def test_token_positions_of_multi_token_words(tiny_pipelines):
    tokenizer = tiny_pipelines["sd15-tiny"].tokenizer
    prompt = "a giraffe-like hippopotamus and a cat"
    words = prompt_words(tokenizer, prompt)
    tokens = tokenizer(prompt)["input_ids"]
    # Every token between BOS and EOT belongs to exactly one word, in order.
    assert [t for w in words for t in w.tokens] == list(range(1, len(tokens) - 1))
    assert len(words[2].tokens) > 1  # "hippopotamus" is several BPE pieces
    assert word_positions(tokenizer, prompt, ["Cat", 3]) == [words[5].tokens, (3,)]
    with pytest.raises(InvalidOptionError, match="'dog' is not a word of the prompt.*'giraffe-like'"):
        word_positions(tokenizer, prompt, ["dog"])


def test_repeated_words_take_their_occurrences_in_order_and_leave_punctuation_out(tiny_pipelines):
    from accel.pipelines.controls import prompt_rows

    tokenizer = tiny_pipelines["sd15-tiny"].tokenizer
    # One token per word here: BOS, then a=1 red=2 circle=3 and=4 a=5 blue=6 circle=7.
    assert word_positions(tokenizer, "a red circle and a blue circle", ["circle", "circle"]) == [(3,), (7,)]
    # The default subjects (each phrase's head noun) are both circles, not the first one twice.
    assert prompt_rows(tokenizer, "a red circle and a blue circle", 1, None, None).positions == [[(3,), (7,)]]
    with pytest.raises(InvalidOptionError, match="'circle' is asked for 2 times but the prompt .* has it 1x"):
        word_positions(tokenizer, "a red circle", ["circle", "circle"])
    words = prompt_words(tokenizer, "a red Circle, and a blue square.")
    assert words[2].tokens == (3, 4) and words[2].core == (3,)  # "Circle," is the word and its comma
    assert word_positions(tokenizer, "a red Circle, and a blue square.", ["circle", "square"]) == [(3,), (8,)]


def test_a_single_noun_phrase_is_the_unpatched_pipeline(shapes_pipe):
    for prompt in ("a red circle", "two blue squares"):
        reference = generate_shapes(shapes_pipe, prompt)
        with accel.patched(shapes_pipe, "structured"):
            assert np.array_equal(generate_shapes(shapes_pipe, prompt), reference)


def test_values_average_the_prompt_and_each_phrase_spliced_in(shapes_pipe):
    prompt = "a red circle and a blue square"
    reference = generate_shapes(shapes_pipe, prompt)
    with accel.patched(shapes_pipe, "structured") as handle:
        patched = generate_shapes(shapes_pipe, prompt)
        processor = next(iter(p for p in shapes_pipe.unet.attn_processors.values() if hasattr(p, "shared")))
        values = processor.shared.values
    assert np.abs(patched - reference).max() > 1e-2
    assert not handle.active

    def encode(text):
        ids = shapes_pipe.tokenizer(text, padding="max_length", max_length=shapes_pipe.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            return shapes_pipe.text_encoder(ids)[0]

    whole, first, second = encode(prompt), encode("a red circle"), encode("a blue square")
    # Words 0-2 are tokens 1-3 and words 4-6 are tokens 5-7 (one token per word in this vocabulary).
    copy_first, copy_second = whole.clone(), whole.clone()
    copy_first[:, 1:4] = first[:, 1:4]
    copy_second[:, 5:8] = second[:, 1:4]
    expected = (whole + copy_first + copy_second) / 3
    torch.testing.assert_close(values, expected, atol=1e-6, rtol=1e-6)


def test_the_processor_attends_with_prompt_keys_and_structured_values(shapes_pipe):
    from accel.processors.structured import StructuredAttnProcessor, StructuredValues

    name, attn = next((n, m) for n, m in shapes_pipe.unet.named_modules() if n.endswith("attn2"))
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(1, 16, attn.to_k.in_features, generator=generator)
    values = torch.randn(1, 16, attn.to_k.in_features, generator=generator)
    uncond = torch.randn(1, 16, attn.to_k.in_features, generator=generator)
    hidden = torch.randn(2, 20, attn.to_q.in_features, generator=generator)
    processor = StructuredAttnProcessor(None, name, StructuredValues(prompt_embeds=text, values=values))
    context = torch.cat([uncond, text])
    with torch.no_grad():
        out = processor(attn, hidden, context)
        heads = attn.heads

        def split(x):
            return x.unflatten(-1, (heads, -1)).transpose(1, 2)

        expected = F.scaled_dot_product_attention(
            split(attn.to_q(hidden)), split(attn.to_k(context)), split(attn.to_v(torch.cat([uncond, values])))
        )
        expected = attn.to_out[0](expected.transpose(1, 2).flatten(2))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        # Another text (not the encoded prompt): exact attention, values from the call's own context.
        other = torch.cat([uncond, uncond])
        plain = StructuredAttnProcessor(None, name, StructuredValues())(attn, hidden, other)
        torch.testing.assert_close(processor(attn, hidden, other), plain)


def test_unpatch_restores_the_pipeline_and_misuse_is_refused(shapes_pipe, tiny_pipelines):
    assert "encode_prompt" not in vars(shapes_pipe)
    with accel.patched(shapes_pipe, "structured"):
        assert "encode_prompt" in vars(shapes_pipe)
        with pytest.raises(InvalidOptionError, match="needs the prompt text"):
            embeds = shapes_pipe.encode_prompt("a red circle", "cpu", 1, False)[0]
            generate_shapes(shapes_pipe, None, prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds))
    assert "encode_prompt" not in vars(shapes_pipe)
    with pytest.raises(InvalidOptionError, match="pass the pipeline to accel.patch"):
        accel.patch(shapes_pipe.unet, "structured")
    with pytest.raises(InvalidOptionError, match="noun phrase 'a green star' is not in the prompt"):
        with accel.patched(shapes_pipe, "structured", noun_phrases=["a green star"]):
            generate_shapes(shapes_pipe, "a red circle")
    with pytest.raises(InvalidOptionError, match="must be a list of phrases"):
        accel.patch(shapes_pipe, "structured", noun_phrases="a red circle")
    assert accel.get_patch(shapes_pipe) is None


def test_phrases_write_their_own_tokens_only_and_named_ones_must_fit(shapes_pipe):
    from accel.pipelines.prompts import NounPhrase
    from accel.pipelines.structured import aligned_values

    # "a red circle," is 4 prompt tokens (the comma included) but its phrase text "a red circle" encodes to 3 and
    # an EOS: the comma keeps the prompt's embedding.
    prompt_embedding, own = torch.zeros(1, 10, 2), torch.ones(1, 10, 2)
    phrase = NounPhrase("a red circle", (0, 3))
    words = [(1,), (2,), (3, 4), (5,)]
    values = aligned_values(prompt_embedding, [phrase], [own], words, 1, [3])
    assert values[0, 1:4].eq(0.5).all() and values[0, 4].eq(0).all()
    long_prompt = " ".join(["big"] * 80) + " and a green star"
    with accel.patched(shapes_pipe, "structured", noun_phrases=["a green star"]):
        with pytest.raises(InvalidOptionError, match="'a green star' lies past the"):
            generate_shapes(shapes_pipe, long_prompt, steps=1)


def test_a_comma_standing_alone_ends_a_phrase_and_is_no_subject(tiny_pipelines, caplog):
    from accel.pipelines.controls import prompt_rows

    tokenizer = tiny_pipelines["sd15-tiny"].tokenizer
    assert noun_phrases("a red circle , a blue square", parser="builtin")[0].words == (0, 3)
    # BOS, a=1 red=2 circle=3 ,=4 a=5 blue=6 square=7
    assert prompt_rows(tokenizer, "a red circle , a blue square", 1, None, None).positions == [[(3,), (7,)]]
    with caplog.at_level("WARNING"):
        prompt_rows(tokenizer, "a red circle and those two", 1, None, None, "phrases")
    assert "lie past" not in caplog.text  # a phrase of function words only is not a truncated one
