"""The grammar's commit pass over a canvas's logits (sampling/constrained.py), with sglang's xgrammar matchers on the
tiny checkpoint's tokenizer and random logits: no model, no server."""

import json
import re

import pytest
import torch

from sgl_diffusion.sampling.constrained import allowed_tokens, grammar_commit

EOS = (1, 6, 10)


@pytest.fixture(scope="module")
def tokenizer():
    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def backend(tokenizer):
    from sglang.srt.constrained.xgrammar_backend import XGrammarGrammarBackend

    return XGrammarGrammarBackend(tokenizer, vocab_size=len(tokenizer), model_eos_token_ids=list(EOS))


def random_logits(seed, n, vocab):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def masked_argmax_reference(logits, grammar, tokens, vocab):
    """The brute-force masked argmax at each position, replaying ``tokens`` on a copy of the grammar."""
    g = grammar.copy()
    mask = g.allocate_vocab_mask(vocab, 1, "cpu")
    want = []
    for pos, token in enumerate(tokens):
        g.fill_vocab_mask(mask, 0)
        allowed = allowed_tokens(mask[0], vocab)
        want.append(int(logits[pos].masked_fill(~allowed, float("-inf")).argmax()))
        g.accept_token(token)
    return want


@pytest.mark.parametrize("seed", range(4))
def test_pass_is_the_masked_argmax_and_valid(backend, tokenizer, seed):
    """Each committed token is the highest-logit token the matcher allows at that point (top-k candidates or the
    full masked argmax give the same), and a terminated pass decodes to a full match of the regex."""
    vocab = len(tokenizer)
    logits = random_logits(seed, 32, vocab)
    fresh = backend.dispatch_regex(r"[a-c]{2,5}-[0-9]{1,3}")
    grammar = fresh.copy()
    out = grammar_commit(logits, logits.argmax(-1).tolist(), grammar)
    assert out.tokens == masked_argmax_reference(logits, fresh, out.tokens, vocab)
    assert out.terminated and out.tokens[-1] in EOS and grammar.is_terminated()
    assert re.fullmatch(r"[a-c]{2,5}-[0-9]{1,3}", tokenizer.decode(out.tokens[:-1]))
    assert out.changed is not None  # random logits: the grammar had to change something


def test_valid_argmax_is_kept_unchanged(backend, tokenizer):
    """Where the argmax already follows the grammar, the pass commits it as is: no change, no fallback."""
    vocab = len(tokenizer)
    ids = tokenizer.encode('{"a": 7}', add_special_tokens=False) + [EOS[0]]
    logits = torch.full((len(ids) + 3, vocab), -5.0)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = 5.0
    grammar = backend.dispatch_json(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                "required": ["a"]}))
    out = grammar_commit(logits, logits.argmax(-1).tolist(), grammar)
    assert (out.tokens, out.changed, out.terminated, out.fallbacks) == (ids, None, True, 0)


def test_stop_bounds_the_pass_and_the_state_carries_on(backend, tokenizer):
    """A pass over [0, 5) commits 5 tokens without terminating; a second pass continues the same document."""
    vocab = len(tokenizer)
    grammar = backend.dispatch_regex(r"[0-9]{8}")
    logits = random_logits(7, 16, vocab)
    first = grammar_commit(logits, logits.argmax(-1).tolist(), grammar, 0, 5)
    assert len(first.tokens) == 5 and not first.terminated
    second = grammar_commit(logits, logits.argmax(-1).tolist(), grammar, 5, 16)
    assert second.terminated
    assert re.fullmatch(r"[0-9]{8}", tokenizer.decode(first.tokens + second.tokens[:-1]))


def test_stop_at_change_stops_right_after_the_first_change(backend, tokenizer):
    """With stop_at_change the pass ends with the first token the grammar changed (the rest will be re-denoised)."""
    vocab = len(tokenizer)
    ids = tokenizer.encode("abcX", add_special_tokens=False)  # X is not allowed by [a-z]+
    logits = torch.full((8, vocab), -5.0)
    logits[torch.arange(4), torch.tensor(ids)] = 5.0
    out = grammar_commit(logits, logits.argmax(-1).tolist(), backend.dispatch_regex(r"[a-z]+"), stop_at_change=True)
    assert out.changed == 3 and len(out.tokens) == 4 and out.tokens[:3] == ids[:3] and out.tokens[3] != ids[3]


def test_allowed_tokens_unpacks_bits():
    words = torch.tensor([0b101, -1 << 31, 1], dtype=torch.int32)
    assert allowed_tokens(words, 70).nonzero().flatten().tolist() == [0, 2, 63, 64]
