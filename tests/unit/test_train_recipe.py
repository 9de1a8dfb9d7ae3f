"""The LayerSkip training recipe's formulas, and a short training run end to end."""

import json
import math

import pytest

from models import corpus
from models.train import (enabled_exits, exit_weights, expected_speedup, layer_dropout_rates,
                          main, parse_exits, pick_defaults)


def test_layer_dropout_rises_exponentially_from_zero_to_p_max():
    rates = layer_dropout_rates(8, 0.2)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates[3] == pytest.approx(0.2 * (math.exp(3 * math.log(2) / 7) - 1))
    assert all(a < b for a, b in zip(rates, rates[1:]))


def test_paper_exit_weights_grow_with_depth():
    w = exit_weights(4, 1.0)
    assert w == [0.0, 1.0, 3.0, 3.0 + 3.0]


def test_rotational_curriculum_rotates_and_always_keeps_the_last_layer():
    exits = [1, 2, 3, 4, 5, 6]
    assert enabled_exits(0, 100, exits, 8, "rotational", 2) == [2, 4, 6, 8]
    assert enabled_exits(1, 100, exits, 8, "rotational", 2) == [1, 3, 5, 8]
    assert enabled_exits(0, 100, exits, 8, "gradual", 2) == [6, 8]
    assert enabled_exits(99, 100, exits, 8, "gradual", 2) == [1, 2, 3, 4, 5, 6, 8]


def test_parse_exits_rejects_the_last_layer():
    assert parse_exits("2-4,6", 8) == [2, 3, 4, 6]
    with pytest.raises(ValueError):
        parse_exits("1-8", 8)


def test_expected_speedup_formula():
    # α = 0: one token per round; a round costs k·(E+1) + E + (L−E) + 1 calls against L + 1.
    assert expected_speedup(0.0, 2, 1, 8) == pytest.approx(9 / (3 + 2 + 6 + 1))
    # α = 0.5, k = 2: (1 − 0.5³) / 0.5 = 1.75 tokens per round.
    assert expected_speedup(0.5, 4, 2, 16) == pytest.approx(1.75 * 17 / (10 + 4 + 12 + 1))


def test_held_out_lists_are_the_hash_rule_on_this_python_and_never_trained_on():
    root = corpus.stdlib_root()
    train, valid, test = ({p.relative_to(root).as_posix() for p in corpus.stdlib_files(s)}
                          for s in corpus.SPLITS)
    assert len(valid) > 50 and len(test) > 50
    assert valid == set(corpus.heldout()["valid"]) and test == set(corpus.heldout()["test"])
    assert not (train & valid or train & test or valid & test)
    assert all(corpus.hash_bucket(p) == "test" for p in test)
    assert all(corpus.hash_bucket(p) == "train" for p in list(train)[:200])


def test_training_smoke_run_writes_a_servable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    main(["--out", str(out), "--layers", "4", "--hidden", "32", "--intermediate", "64",
          "--heads", "2", "--kv-heads", "1", "--vocab", "300", "--seq-len", "32",
          "--batch-size", "2", "--steps", "3", "--warmup", "1", "--exit-layers", "1-3",
          "--eval-windows", "2", "--max-files", "3"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert (out / name).exists(), name
    gen = json.loads((out / "generation_config.json").read_text())
    stats = json.loads((out / "train_stats.json").read_text())
    assert len(stats["agreement"]) == 4 and stats["agreement"][-1] == 1.0
    exit_layer, k, _ = pick_defaults(stats["agreement"], 4)
    assert (gen["assistant_early_exit"], gen["num_assistant_tokens"]) == (exit_layer, k)
    from engine.config import EngineConfig
    from engine.loop import EngineCore
    from tests.conftest import run_engine, tokens_of

    core = EngineCore(EngineConfig(model=str(out)))
    assert len(tokens_of(run_engine(core, [[5, 6, 7]], 5))["r0"]) == 5
