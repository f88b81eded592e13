"""The routers of moe/routing.py through training, checkpoints, evaluation and generation."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from test_train import tiny_config

from moe.transformer import Transformer
from train.loop import Trainer



def _router_weights(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree) if "router_w" in jax.tree_util.keystr(p)}


def test_frozen_router_weights_never_change_and_restore_for_eval(tmp_path):
    from train.evaluate import load_run

    cfg = tiny_config(tmp_path)
    cfg.model.router = "frozen"
    cfg.optimizer.weight_decay, cfg.optimizer.learning_rate = 0.1, 1e-2  # decay would move a trained weight
    cfg.checkpoint.every_steps = 3
    trainer = Trainer(cfg, tmp_path / "w")
    before = _router_weights(trainer.state.model_state)
    assert len(before) == 2 and not _router_weights(trainer.state.params)  # state, not parameters
    first = jax.tree.map(np.asarray, trainer.state.params)
    trainer.run()
    after = _router_weights(trainer.state.model_state)
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), first, trainer.state.params)
    trainer.close()
    assert any(jax.tree.leaves(moved))  # the rest of the model trained
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    restored = _router_weights(load_run(tmp_path / "w").model_state)
    for name in before:
        np.testing.assert_array_equal(restored[name], before[name])


def test_bigram_routing_decodes_with_the_kv_cache_as_the_full_sequence(tmp_path):
    """bigram_hash reads each token's predecessor: during cached decoding it comes from the cache."""
    from train.generate import generate, generate_without_cache

    cfg = tiny_config(tmp_path)
    cfg.model.router, cfg.model.vocab_size, cfg.model.eval_capacity_factor = "bigram_hash", 64, 0.0
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    model.eval()
    prompt = [3, 9, 9, 27]
    cached, cached_logits = generate(model, prompt, 5)
    full, full_logits = generate_without_cache(model, prompt, 5)
    assert cached == full
    np.testing.assert_allclose(cached_logits, full_logits, rtol=1e-4, atol=1e-4)


def test_balanced_hash_table_is_built_from_the_training_split_saved_and_reused_at_eval(tmp_path):
    from moe.routing import balanced_table
    from train.evaluate import load_run

    cfg = tiny_config(tmp_path)
    cfg.model.router, cfg.model.experts_per_token, cfg.checkpoint.every_steps = "balanced_hash", 1, 2
    trainer = Trainer(cfg, tmp_path / "w")
    counts = np.bincount(trainer.train_corpus.tokens, minlength=trainer.cfg.model.vocab_size)
    expected = balanced_table(counts, 8, 1, seed=0)
    tables = [np.asarray(v) for p, v in jax.tree.leaves_with_path(trainer.state.model_state)
              if "hash_table" in jax.tree_util.keystr(p)]
    assert len(tables) == 2
    for table in tables:
        np.testing.assert_array_equal(table, expected)
    mass = np.bincount(expected[:, 0], weights=counts, minlength=8)
    top = counts.max() / counts.sum()  # no table can put less than the commonest id on one expert
    assert mass.max() / mass.sum() <= max(top, 1 / 8) * 1.25
    trainer.run()
    trainer.close()
    restored = [np.asarray(v) for p, v in jax.tree.leaves_with_path(load_run(tmp_path / "w").model_state)
                if "hash_table" in jax.tree_util.keystr(p)]
    assert len(restored) == 2 and all(np.array_equal(t, expected) for t in restored)


@pytest.mark.parametrize("router", ["gshard", "loss_free"])
def test_stochastic_and_biased_routers_train_checkpoint_and_evaluate(tmp_path, router):
    from train.evaluate import evaluate_run, load_run

    cfg = tiny_config(tmp_path)
    cfg.model.router, cfg.model.capacity_factor, cfg.checkpoint.every_steps = router, 1.0, 3
    cfg.model.loss_free_gamma = 0.01
    trainer = Trainer(cfg, tmp_path / "w")
    summary = trainer.run()
    biases = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(trainer.state.model_state)
              if "expert_bias" in jax.tree_util.keystr(p)}
    trainer.close()
    if router == "loss_free":  # the bias moved, is saved with the checkpoint and restored for eval
        assert len(biases) == 2 and all(np.abs(b).max() > 0 for b in biases.values())
        restored = {jax.tree_util.keystr(p): np.asarray(v)
                    for p, v in jax.tree.leaves_with_path(load_run(tmp_path / "w").model_state)
                    if "expert_bias" in jax.tree_util.keystr(p)}
        assert restored.keys() == biases.keys()
        for name in biases:
            np.testing.assert_array_equal(restored[name], biases[name])
    assert np.isfinite(summary["last_loss"])
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert 1 <= train_rows[-1]["moe/layer0/load_imbalance"] <= 8
    run = load_run(tmp_path / "w")
    result = evaluate_run(run, log=lambda *_: None)
    assert np.isfinite(result["loss"]) and result["step"] == 4
