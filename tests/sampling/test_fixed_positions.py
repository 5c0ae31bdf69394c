"""Fixed positions and banned tokens in the Entropy-Bound step (infill, grammar repair), on hand-made logits."""

import torch

from sgl_diffusion.sampling import SamplerRow, new_history, prepare, step
from tests.sampling.test_entropy_bound import BASE, C, V, params, random_logits, row


def fixed_row(p, s, fixed_at, tokens, banned=()):
    fixed = torch.zeros(C, dtype=torch.bool)
    fixed[list(fixed_at)] = True
    ids = torch.zeros(C, dtype=torch.long)
    ids[list(fixed_at)] = torch.tensor(tokens)
    return SamplerRow(p, s, new_history(p.stability_threshold, C), fixed, ids, banned)


def test_fixed_positions_hold_their_token_and_are_accepted():
    """A fixed position is accepted, keeps its token in the next canvas and the argmax, and its self-conditioning
    input is the one-hot of that token, whatever the logits say."""
    fixed_at, tokens = [0, 5, 15], [3, 60, 7]
    out = step(random_logits(1), prepare([fixed_row(BASE, 30, fixed_at, tokens)]), [torch.Generator().manual_seed(0)])
    assert out.next_canvas[0, fixed_at].tolist() == tokens and out.argmax[0, fixed_at].tolist() == tokens
    assert out.accepted[0, fixed_at].all()
    one_hot = torch.nn.functional.one_hot(torch.tensor(tokens), V).float()
    assert torch.equal(out.self_conditioning_probs[0, fixed_at], one_hot)


def test_fixed_positions_spend_no_entropy_bound_and_leave_the_rng_stream_alone():
    """Free positions are accepted as if the fixed ones were not there (a fixed position costs nothing of the bound),
    and the generator is advanced exactly as without fixed positions (same draws at the free positions)."""
    logits = random_logits(2)
    fixed_at = [1, 2, 3]
    plain = step(logits, prepare([row(BASE, 40)]), [torch.Generator().manual_seed(5)])
    g = torch.Generator().manual_seed(5)
    fixed = step(logits, prepare([fixed_row(BASE, 40, fixed_at, [9, 9, 9])]), [g])
    free = torch.ones(C, dtype=torch.bool)
    free[fixed_at] = False
    # every free position the plain step accepted is accepted again (the bound is not spent by fixed ones)
    assert (fixed.accepted[0] | ~plain.accepted[0])[free].all()
    assert torch.equal(fixed.next_canvas[0, free][plain.accepted[0, free]], plain.next_canvas[0, free][plain.accepted[0, free]])
    g2 = torch.Generator().manual_seed(5)
    step(logits, prepare([row(BASE, 40)]), [g2])
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=g2))


def test_rows_without_fixed_positions_are_bit_identical():
    """In a batch where one row fixes positions and bans tokens, the other row's results equal a batch without."""
    logits = random_logits(3, batch=2)
    mixed = step(logits, prepare([row(BASE, 12), fixed_row(BASE, 12, [4], [1], banned=(2, 3))]),
                 [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    alone = step(logits[:1], prepare([row(BASE, 12)]), [torch.Generator().manual_seed(1)])
    for a, b in zip(mixed, alone):
        assert torch.equal(a[:1], b), a


def test_stopping_mean_entropy_is_over_free_positions():
    """The stopping rule's mean entropy is over the free positions: a row whose one free position is uncertain
    (entropy ~0.018 > 0.005) does not stop, though its mean over all 16 positions (0 at fixed ones) would."""
    logits = torch.zeros(1, C, V)
    logits[0, :, 11] = 6.0  # every position: entropy ~0.018 at step 20 of 48
    p = params(stability_threshold=0)
    plain = step(logits, prepare([row(p, 20)]), [torch.Generator().manual_seed(0)])
    assert 0.005 < plain.mean_entropy[0] < 0.005 * C and not bool(plain.done[0])
    out = step(logits, prepare([fixed_row(p, 20, range(1, C), [4] * (C - 1))]), [torch.Generator().manual_seed(0)])
    assert torch.allclose(out.mean_entropy, plain.mean_entropy) and not bool(out.done[0])
    certain = logits.clone()
    certain[0, 0, 11] = 60.0
    out = step(certain, prepare([fixed_row(p, 20, range(1, C), [4] * (C - 1))]), [torch.Generator().manual_seed(0)])
    assert bool(out.done[0])  # the free position settled: stable (threshold 0) and confident


def test_banned_tokens_are_never_drawn_nor_chosen():
    """A banned token is neither the argmax, nor sampled, nor in the next canvas's accepted tokens, even where the
    logits put all their mass on it; its self-conditioning probability is 0."""
    logits = random_logits(4)
    logits[0, :, 17] = 29.0
    out = step(logits, prepare([SamplerRow(BASE, 5, new_history(1, C), banned=(17,))]),
               [torch.Generator().manual_seed(3)])
    assert (out.argmax != 17).all()
    assert not ((out.next_canvas == 17) & out.accepted).any()
    assert (out.self_conditioning_probs[..., 17] == 0).all()
