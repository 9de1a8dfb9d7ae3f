"""The speculation controller on fake timings and synthetic acceptance (plain Python, no model)."""

import random

from engine.speculation import (MAX_PROBE_INTERVAL, PROBE_BUDGET, CostTable, SpeculationController, SpecState,
                                expected_tokens)

L, E = 16, 4


def fake_costs(plain: float, draft_step: float, verify_base: float, verify_per_token: float,
               batch_exponent: float = 0.5):
    """A round-time function ``(B, k) -> (seconds, draft_step, verify)``: plain rounds cost
    ``plain·B^batch_exponent``; a drafting round ``k`` draft steps plus a verify call over
    ``k + 1`` tokens, scaled alike."""
    def time_round(B, k):
        scale = B ** batch_exponent
        if k == 0:
            return plain * scale, None, None
        verify = (verify_base + verify_per_token * (k + 1)) * scale
        return k * draft_step * scale + verify, draft_step * scale, verify
    return time_round


def controller(time_round, batch_sizes=(1, 2, 4), k_max=6) -> SpeculationController:
    c = SpeculationController(L, E)
    c.calibrate(time_round, list(batch_sizes), E, k_max, repeats=1)
    return c


def simulate(c: SpeculationController, profile, time_round, rounds=3000, batch=1, k_max=6, seed=0):
    """Run ``rounds`` rounds of ``batch`` rows whose draft ``i`` is accepted with probability
    ``profile[i]`` given the earlier ones were; return (tokens per second, the ks chosen)."""
    rng = random.Random(seed)
    states = [SpecState() for _ in range(batch)]
    tokens = seconds = 0.0
    chosen = []
    for _ in range(rounds):
        ks = c.plan(states, [k_max] * batch, E, k_max)
        k = max(ks)
        chosen.append(k)
        rows = [i for i in range(batch) if ks[i]]
        seconds += time_round(len(rows), k)[0] if rows else 0.0
        if len(rows) < batch:
            seconds += time_round(batch - len(rows), 0)[0]
        for b, state in enumerate(states):
            j = 0
            while j < ks[b] and rng.random() < profile[j]:
                j += 1
            c.observe(state, ks[b], j)
            tokens += j + 1
    return tokens / seconds, chosen


def best_fixed(profile, time_round, k_max=6):
    """The best fixed k's expected tokens per second at batch 1, and that k."""
    rates = {k: expected_tokens(profile, k) / time_round(1, k)[0] for k in range(k_max + 1)}
    k = max(rates, key=rates.get)
    return rates[k], k


def test_expected_tokens_is_the_product_formula():
    assert expected_tokens([0.5, 0.5], 0) == 1.0
    assert abs(expected_tokens([0.8, 0.5, 0.9], 3) - (1 + 0.8 + 0.4 + 0.36)) < 1e-12
    alpha = 0.7  # constant acceptance: (1 − α^{k+1}) / (1 − α)
    assert abs(expected_tokens([alpha] * 4, 4) - (1 - alpha ** 5) / (1 - alpha)) < 1e-12


def test_it_picks_plain_decoding_when_drafting_is_slower():
    # A draft step costs 90 % of a plain step: no acceptance rate can pay for that here.
    slow = fake_costs(plain=10e-3, draft_step=9e-3, verify_base=9e-3, verify_per_token=1e-3)
    c = controller(slow)
    rate, chosen = simulate(c, [0.6] * 6, slow, rounds=1000)
    assert best_fixed([0.6] * 6, slow)[1] == 0
    assert sum(1 for k in chosen if k) < 1000 * 0.03  # only the first guesses and the probes
    assert rate >= 0.97 * best_fixed([0.6] * 6, slow)[0]


def test_it_settles_on_plain_when_drafts_are_never_accepted_and_probes_ever_more_rarely():
    cheap = fake_costs(plain=10e-3, draft_step=3e-3, verify_base=9e-3, verify_per_token=1e-3)
    c = controller(cheap)
    _, chosen = simulate(c, [0.0] * 6, cheap, rounds=600)
    probes = [i for i, k in enumerate(chosen) if k]
    assert chosen[0] > 0 and len(probes) < 14
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps[-1] == MAX_PROBE_INTERVAL + 1 and gaps == sorted(gaps)


def test_it_finds_the_best_fixed_k_within_five_percent():
    cheap = fake_costs(plain=10e-3, draft_step=2.5e-3, verify_base=9.5e-3, verify_per_token=1e-3)
    profile = [0.85, 0.8, 0.7, 0.6, 0.5, 0.4]  # acceptance falls with the draft's position
    best_rate, best_k = best_fixed(profile, cheap)
    assert 1 < best_k < 6, "the profile should make a middle k best"
    rate, chosen = simulate(c := controller(cheap), profile, cheap)
    assert rate >= 0.95 * best_rate, (rate, best_rate, best_k)
    assert max(set(chosen), key=chosen.count) == best_k
    assert c.costs.cost_ratio(E, 1, best_k) is not None


def test_a_batch_splits_rows_that_accept_from_rows_that_do_not_when_rows_cost_time():
    good, bad = SpecState(), SpecState()
    for _ in range(30):
        good.observe(4, 4)
        bad.observe(4, 0)
    # Compute-bound (cost ∝ rows): the rows that reject decode plainly in a call of their own.
    linear = controller(fake_costs(plain=10e-3, draft_step=2e-3, verify_base=9e-3,
                                   verify_per_token=0.5e-3, batch_exponent=1.0))
    ks = linear.plan([bad, good, bad, good], [6] * 4, E, 6)
    assert ks[1] == ks[3] > 0 and ks[0] == ks[2] == 0
    # Overhead-bound (a call costs the same for any rows): they ride in the drafting call.
    flat = controller(fake_costs(plain=10e-3, draft_step=2e-3, verify_base=9e-3,
                                 verify_per_token=0.5e-3, batch_exponent=0.0))
    assert all(k > 0 for k in flat.plan([bad, good, bad, good], [6] * 4, E, 6))


def test_room_caps_a_rows_drafts_and_fixed_control_drafts_k_max():
    cheap = fake_costs(plain=10e-3, draft_step=2e-3, verify_base=9e-3, verify_per_token=0.5e-3)
    c = controller(cheap)
    good = SpecState()
    for _ in range(20):
        c.observe(good, 4, 4)
    assert c.plan([good], [1], E, 6) == [1]
    fixed = SpeculationController(L, E, adaptive=False)
    assert fixed.plan([SpecState(), SpecState()], [6, 2], E, 4) == [4, 2]


def test_cost_table_interpolates_batch_sizes_and_other_exit_layers():
    t = CostTable(L, E)
    t.observe_round(0, 1, 0, 10.0)
    t.observe_round(0, 4, 0, 16.0)
    t.observe_round(E, 1, 2, 14.0, draft_step=4.0, verify=6.0)
    assert t.round(0, 2, 0) == 12.0 and t.round(0, 8, 0) == 32.0
    assert t.layer_cost(1) == (10.0 - 4.0) / (L - E)
    assert t.round(E + 2, 1, 2) == 14.0 + 2 * 2 * t.layer_cost(1)
    assert t.cost_ratio(E, 1, 2) == 4.0 / 6.0
    for _ in range(100):  # the running mean turns into a moving average that follows load
        t.observe_round(0, 1, 0, 20.0)
    assert abs(t.round(0, 1, 0) - 20.0) < 0.01


def test_expensive_probes_are_spaced_to_cost_at_most_the_probe_budget():
    # SmolLM2-like: a one-draft round costs twice a plain step, and no draft is ever accepted.
    costly = fake_costs(plain=10e-3, draft_step=5e-3, verify_base=13e-3, verify_per_token=1e-3)
    c = controller(costly)
    rate, chosen = simulate(c, [0.0] * 6, costly, rounds=2000)
    # One probe after 4 plain rounds; then one per 100 (budget / extra cost 1.0).
    assert 0 < sum(1 for k in chosen if k) <= 2000 * PROBE_BUDGET / 1.0 + 2
    assert rate >= 0.98 * best_fixed([0.0] * 6, costly)[0]


def test_sampled_rounds_are_priced_apart_falling_back_to_greedy_times_the_measured_ratio():
    cheap = fake_costs(plain=10e-3, draft_step=2e-3, verify_base=9e-3, verify_per_token=1e-3)
    c = controller(cheap)
    greedy_k2 = c.costs.round(E, 1, 2)
    c.observe_round(E, 1, 2, 2 * greedy_k2, sampled=True)
    assert c.sampled_costs.round(E, 1, 2) == 2 * greedy_k2
    assert abs(c.sampled_costs.round(0, 1, 0) - 2 * c.costs.round(0, 1, 0)) < 1e-12
    assert c.costs.round(E, 1, 2) == greedy_k2  # the greedy table is untouched


def test_plain_rows_ride_in_the_drafting_round_only_when_that_is_cheaper():
    """``merge_pays``: with calls that cost the same for any rows (overhead-bound) two plain
    rows are cheaper inside a 2-row drafting round than in a round of their own; when a round's
    cost grows with its rows and a drafting row costs more than a plain one, they are not.
    Unmeasured prices never merge."""
    flat = controller(fake_costs(plain=10e-3, draft_step=2e-3, verify_base=9e-3,
                                 verify_per_token=0.5e-3, batch_exponent=0.0))
    assert flat.merge_pays(E, 2, 2, 2)
    linear = controller(fake_costs(plain=10e-3, draft_step=2e-3, verify_base=9e-3,
                                   verify_per_token=0.5e-3, batch_exponent=1.0))
    assert not linear.merge_pays(E, 2, 2, 2)
    assert not SpeculationController(L, E).merge_pays(E, 2, 2, 2)
