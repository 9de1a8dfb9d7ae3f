"""The adaptive speculation policy on hand-fed acceptance (plain Python, no model)."""

from engine.speculation import (MAX_PROBE_INTERVAL, SpeculationPolicy, SpecState,
                                best_num_speculations, modelled_speedup)

L, HEAD = 16, 2.6  # the bundled model: 16 layers, an LM head worth ~2.6 layers


def test_modelled_speedup_matches_the_formula_and_plain_is_one():
    assert modelled_speedup(0, 0.7, 4, L, HEAD) == 1.0
    tokens = (1 - 0.7 ** 3) / (1 - 0.7)
    assert abs(modelled_speedup(2, 0.7, 4, L, HEAD) - tokens * (L + HEAD) / (2 * (4 + HEAD) + L + HEAD)) < 1e-12


def test_good_acceptance_drafts_and_poor_acceptance_does_not():
    gains = [modelled_speedup(k, 0.7, 4, L, HEAD) for k in range(1, 5)]
    assert gains.index(max(gains)) + 1 == 2  # the model's best is k = 2 ...
    assert best_num_speculations(0.7, 4, 4, L, HEAD) == 3  # ... and k = 3 is within TIE of it
    assert best_num_speculations(0.7, 1, 4, L, HEAD) == 1
    assert best_num_speculations(0.95, 8, 4, L, HEAD) > 2
    assert best_num_speculations(0.05, 4, 4, L, HEAD) == 0
    assert best_num_speculations(1.0, 4, L, L, HEAD) == 0  # a full-depth draft never pays


def test_a_sequence_that_keeps_rejecting_stops_drafting_and_probes_ever_more_rarely():
    policy, state = SpeculationPolicy(30, 8.0), SpecState()
    schedule = []
    for _ in range(200):
        k = policy.choose(state, 4, 8)
        schedule.append(k)
        policy.observe(state, k, 0, 4, 8)  # every draft rejected
    probes = [i for i, k in enumerate(schedule) if k]
    assert schedule[0] > 0 and sum(1 for k in schedule if k) < 12
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] == MAX_PROBE_INTERVAL + 1


def test_a_successful_probe_turns_speculation_back_on():
    policy, state = SpeculationPolicy(L, HEAD), SpecState()
    for _ in range(10):
        policy.observe(state, 2, 0, 2, 4)
    assert policy.choose(state, 2, 4) == 0
    k = 0
    while k == 0:
        k = policy.choose(state, 2, 4)
    for _ in range(15):
        policy.observe(state, k, k, 2, 4)  # everything accepted
    assert policy.choose(state, 2, 4) == 2


def test_fixed_policy_always_drafts_k_max():
    policy, state = SpeculationPolicy(L, HEAD, adaptive=False), SpecState()
    for _ in range(10):
        policy.observe(state, 3, 0, 3, 4)
    assert policy.choose(state, 3, 4) == 3
