"""Grammars, infill, logprobs and prompt scores through the canvas policy (offline engine, tiny random model, sglang's
xgrammar matchers on the tiny tokenizer): no server."""

import json
import re

import jsonschema
import pytest
import torch

from sgl_diffusion.runtime.offline import OfflineEngine
from sgl_diffusion.runtime.scheduler_policy import DiffusionRequest
from tests.runtime.test_scheduler_policy import params

EOS = (1, 6, 10)
SCHEMA = {"type": "object", "properties": {
    "tags": {"type": "array", "items": {"enum": ["alpha", "beta"]}, "minItems": 6, "maxItems": 6},
    "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["tags", "n"]}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    from sgl_diffusion.entrypoints.tiny_checkpoint import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def backend(tokenizer):
    from sglang.srt.constrained.xgrammar_backend import XGrammarGrammarBackend

    return XGrammarGrammarBackend(tokenizer, vocab_size=len(tokenizer), model_eos_token_ids=list(EOS),
                                  any_whitespace=False)


def prompt(tokenizer, text="Answer:"):
    return tokenizer.encode(text, add_special_tokens=False)


def run(model, reqs, steps_per_round=1):
    engine = OfflineEngine(model, eos_token_ids=EOS, steps_per_round=steps_per_round)
    return engine.generate(reqs), engine


def test_schema_output_is_valid_across_canvases(model, tokenizer, backend):
    """A schema needing more than one 32-token canvas: the commit follows the grammar canvas after canvas (the
    matcher carries over) and the request ends where the grammar terminates, with an EOS."""
    grammar = backend.dispatch_json(json.dumps(SCHEMA))
    req = DiffusionRequest(prompt(tokenizer), params(model, seed=3, max_denoising_steps=2), 200, grammar=grammar)
    [out], _ = run(model, [req])
    assert len(out) > 32 and out[-1] in EOS
    jsonschema.validate(json.loads(tokenizer.decode(out[:-1])), SCHEMA)


def test_constrained_and_unconstrained_share_forwards(model, tokenizer, backend):
    """A constrained request beside a free one: the free one's output is what it is alone (the grammar acts only on
    its own row's commit), and both run in the same forwards."""
    free = DiffusionRequest(prompt(tokenizer, "Hi"), params(model, seed=5, max_denoising_steps=2), 40)
    [alone], _ = run(model, [free])
    free = DiffusionRequest(prompt(tokenizer, "Hi"), params(model, seed=5, max_denoising_steps=2), 40)
    constrained = DiffusionRequest(prompt(tokenizer), params(model, seed=6, max_denoising_steps=2), 40,
                                   grammar=backend.dispatch_regex(r"[0-9]{3}-[0-9]{4}"))
    (shared, digits), _ = run(model, [free, constrained])
    assert shared == alone
    assert tokenizer.decode(digits[:-1]).count("-") == 1 and digits[-1] in EOS


def test_length_limit_leaves_a_valid_unfinished_prefix(model, tokenizer, backend):
    """max_new_tokens before the grammar can end: the output is cut at the limit, and it is a prefix the grammar
    accepts (a fresh matcher takes every token), not a complete document."""
    grammar = backend.dispatch_json(json.dumps(SCHEMA))
    req = DiffusionRequest(prompt(tokenizer), params(model, seed=3, max_denoising_steps=2), 20, grammar=grammar)
    [out], _ = run(model, [req])
    assert len(out) == 20 and not set(out) & set(EOS)
    check = backend.dispatch_json(json.dumps(SCHEMA))
    for token in out:
        check.accept_token(token)  # raises on a token the grammar does not allow
    assert not check.is_terminated()


@pytest.mark.parametrize("steps_per_round", [1, 3])
def test_repair_fixes_the_prefix_spends_steps_and_stays_valid(model, tokenizer, backend, monkeypatch,
                                                               steps_per_round):
    """grammar_repair_steps: a commit that had to change a token sends the canvas back with its accepted prefix
    fixed and that many more denoise steps (at most max_denoising_steps); the output is still valid, and the
    repair count is reset once the canvas is committed."""
    from sgl_diffusion.runtime import constraints

    seen = []
    original = constraints._grammar_tokens

    def spy(req, state, logits, argmax):
        out = original(req, state, logits, argmax)
        if out is None:
            seen.append((state.fixed.nonzero().flatten().tolist(), state.step_remaining, list(req.grammar_prefix)))
        return out

    monkeypatch.setattr(constraints, "_grammar_tokens", spy)
    pattern = r"[a-c]{4}-[0-9]{4}"
    req = DiffusionRequest(prompt(tokenizer), params(model, seed=3, max_denoising_steps=2, grammar_repair_steps=5),
                           60, grammar=backend.dispatch_regex(pattern))
    engine = OfflineEngine(model, eos_token_ids=EOS, steps_per_round=steps_per_round)
    engine.generate([req])
    assert seen, "the random model's canvases always need a repair"
    for fixed, steps, prefix in seen:
        assert fixed == list(range(len(prefix))) and steps == 2
    assert re.fullmatch(pattern, tokenizer.decode(req.output_ids[:-1])) and req.output_ids[-1] in EOS
    assert req.repairs == 0


def test_a_repaired_prefix_keeps_the_logprobs_of_the_pass_that_accepted_it(model, tokenizer, backend, monkeypatch):
    """Logprobs with grammar repairs: a token fixed by a repair was chosen by an earlier pass, over that pass's logits;
    the last step's logits at its position only read back the token the canvas was given. Each committed token of the
    first canvas carries the log-softmax of the pass that accepted it, at its position."""
    from sgl_diffusion.runtime import constraints

    passes = []  # (logits, first position, tokens accepted so far) of each grammar pass over the first canvas
    original = constraints._grammar_tokens

    def spy(req, state, logits, argmax):
        start = len(req.grammar_prefix)
        out = original(req, state, logits, argmax)
        if not req.output_ids:
            passes.append((logits.clone(), start, out if out is not None else list(req.grammar_prefix)))
        return out

    monkeypatch.setattr(constraints, "_grammar_tokens", spy)
    req = DiffusionRequest(prompt(tokenizer), params(model, seed=3, max_denoising_steps=2, grammar_repair_steps=5),
                           60, grammar=backend.dispatch_regex(r"[a-c]{4}-[0-9]{4}"), logprobs=2)
    OfflineEngine(model, eos_token_ids=EOS).generate([req])
    assert len(passes) > 1, "the random model's canvases always need a repair"
    committed = passes[-1][2]
    expected = [None] * len(committed)
    for logits, start, accepted in passes:
        logp = torch.log_softmax(logits.float(), dim=-1)
        for j in range(start, len(accepted)):
            expected[j] = logp[j, committed[j]].item()
    got = req.output_logprobs.token[: len(committed)]
    assert got == pytest.approx(expected, abs=1e-5)
    # the repaired prefix read back from the last step: near-certain there, which is what the fix avoids
    last = torch.log_softmax(passes[-1][0].float(), dim=-1)
    assert any(abs(last[j, committed[j]].item() - expected[j]) > 1e-3 for j in range(passes[-1][1]))


def test_infill_keeps_fixed_tokens_and_fills_holes_without_eos(model, tokenizer):
    """A template over two canvases (a 40-token hole, then text, a 5-token hole, text): fixed positions come back
    identical, holes hold no EOS, and the output is exactly the template's length."""
    from sgl_diffusion.sampling.params import DiffusionParams

    template = "def f(x):\n    {{hole:40}}\n    return {{hole:5}} # done"
    p = DiffusionParams.from_request({"infill": {"template": template}, "seed": 2, "max_denoising_steps": 2},
                                     _defaults(),
                                     vocab_size=model.cfg.vocab_size, canvas_length=32, tokenizer=tokenizer)
    layout = p.infill
    req = DiffusionRequest(prompt(tokenizer), p, len(layout), banned=EOS)
    [out], _ = run(model, [req])
    assert len(out) == len(layout) > 32
    assert all(o == t for o, t in zip(out, layout) if t >= 0)
    assert not {o for o, t in zip(out, layout) if t < 0} & set(EOS)
    text = tokenizer.decode(out)
    assert text.startswith("def f(x):\n    ") and text.endswith(" # done") and "\n    return " in text


def _defaults():
    from sgl_diffusion.entrypoints.tiny_checkpoint import tiny_generation_config
    from sgl_diffusion.sampling.params import DiffusionDefaults

    return DiffusionDefaults.from_generation_config(json.loads(tiny_generation_config().to_json_string()))


def test_output_logprobs_are_sane(model, tokenizer):
    """One logprob per output token, finite and <= 0; top-k sorted, led by the committed (argmax) token."""
    req = DiffusionRequest(prompt(tokenizer), params(model, seed=1, max_denoising_steps=2), 45, logprobs=4)
    [out], _ = run(model, [req])
    lp = req.output_logprobs
    assert len(lp.token) == len(lp.top_values) == len(out) == 45
    for token, value, top_v, top_i in zip(out, lp.token, lp.top_values, lp.top_ids):
        assert value <= 0 and torch.isfinite(torch.tensor(value))
        assert top_v == sorted(top_v, reverse=True) and len(top_v) == 4
        assert top_i[0] == token and value == pytest.approx(top_v[0])


def test_constrained_logprobs_are_the_models_distribution(model, tokenizer, backend):
    """A grammar's committed token may be below the top-k (logprobs are the model's, before the grammar)."""
    req = DiffusionRequest(prompt(tokenizer), params(model, seed=3, max_denoising_steps=2), 200,
                           grammar=backend.dispatch_json(json.dumps(SCHEMA)), logprobs=2)
    [out], _ = run(model, [req])
    lp = req.output_logprobs
    assert len(lp.token) == len(out) and all(v <= 0 for v in lp.token)
    assert any(v < top[-1] for v, top in zip(lp.token, lp.top_values))  # forced below the top 2 somewhere


def test_prompt_scores_are_one_step_first_position_distributions(model, tokenizer):
    """Prompt token i's score is the distribution of a one-step canvas after prompt[:i] at its first position: its
    top-1 is the first token a one-step greedy (seed 0) generation after prompt[:i] commits."""
    ids = prompt(tokenizer, "The cat sat on")
    start = len(ids) - 5
    req = DiffusionRequest(ids, params(model, max_denoising_steps=1, seed=0), 0, logprobs=3, score_from=start)
    run(model, [req])
    lp = req.prompt_logprobs
    assert len(lp.token) == len(ids) - start - 1
    for j, i in enumerate(range(start + 1, len(ids))):
        gen = DiffusionRequest(ids[:i], params(model, max_denoising_steps=1, seed=0), 1)
        [[first]], _ = run(model, [gen])
        assert lp.top_ids[j][0] == first
        assert lp.token[j] <= lp.top_values[j][0] and (lp.token[j] == lp.top_values[j][0]) == (ids[i] == first)


def test_abort_mid_canvas_frees_kv_and_grammar(model, tokenizer, backend):
    """Aborting a constrained request in the middle of a canvas returns its KV slots and drops its matcher."""
    engine = OfflineEngine(model, eos_token_ids=EOS)
    free_before = engine.slots.free_slots.numel()
    req = DiffusionRequest(prompt(tokenizer), params(model, seed=3, max_denoising_steps=8), 200,
                           grammar=backend.dispatch_json(json.dumps(SCHEMA)))
    engine.scheduler.add(req)
    engine.scheduler.step()
    engine.scheduler.step()
    assert req.state is not None and req.grammar is not None and not req.output_ids  # mid-canvas
    engine.scheduler.abort(req)
    assert engine.slots.free_slots.numel() == free_before
    assert req.grammar is None and req.state is None and not engine.scheduler.running


def test_logprobs_are_the_committed_steps_distribution_at_temperature_1(model, tokenizer, monkeypatch):
    """With the LM head scripted to fixed logits L, committed-token logprobs are log_softmax(L) at temperature 1 (not
    at the step's sampling temperature), and the top-k are its k largest."""
    c, vocab = model.cfg.canvas_length, model.cfg.vocab_size
    logits = torch.randn(c, vocab, generator=torch.Generator().manual_seed(0)) * 4
    monkeypatch.setattr(model, "logits", lambda hidden: logits[: hidden.shape[0]].clone())
    req = DiffusionRequest(prompt(tokenizer), params(model, seed=1, max_denoising_steps=2), c, logprobs=3)
    [out], _ = run(model, [req])
    want = torch.log_softmax(logits, dim=-1)
    assert out == logits.argmax(-1).tolist()
    assert torch.allclose(torch.tensor(req.output_logprobs.token), want[torch.arange(c), torch.tensor(out)])
    assert torch.allclose(torch.tensor(req.output_logprobs.top_values), want.topk(3).values)
