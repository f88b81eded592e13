"""The routers of moe/routers/ through training, checkpoints, evaluation and generation."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from test_train import tiny_config

from moe.transformer import Transformer
from train.core import loop
from train.core.setup import setup



def _router_weights(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree) if "['router']['w']" in jax.tree_util.keystr(p)}


def test_frozen_router_weights_never_change_and_restore_for_eval(tmp_path):
    from train.inference.evaluate import load_run

    cfg = tiny_config(tmp_path)
    cfg.model.moe.router = "frozen"
    cfg.optimizer.weight_decay, cfg.optimizer.learning_rate = 0.1, 1e-2  # decay would move a trained weight
    cfg.checkpoint.every_steps = 3
    run, state = setup(cfg, tmp_path / "w")
    before = _router_weights(state.model_state)
    assert len(before) == 2 and not _router_weights(state.params)  # state, not parameters
    first = jax.tree.map(np.asarray, state.params)
    state, _ = loop.train(run, state)
    after = _router_weights(state.model_state)
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), first, state.params)
    run.close()
    assert any(jax.tree.leaves(moved))  # the rest of the model trained
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    restored = _router_weights(load_run(tmp_path / "w").model_state)
    for name in before:
        np.testing.assert_array_equal(restored[name], before[name])


def test_bigram_routing_decodes_with_the_kv_cache_as_the_full_sequence(tmp_path):
    """bigram_hash reads each token's predecessor: during cached decoding it comes from the cache."""
    from reference import generate_without_cache
    from train.inference.generate import generate

    cfg = tiny_config(tmp_path)
    cfg.model.moe.router, cfg.model.vocab_size, cfg.model.moe.eval_capacity_factor = "bigram_hash", 64, 0.0
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    model.eval()
    prompt = [3, 9, 9, 27]
    cached, cached_logits = generate(model, prompt, 5)
    full, full_logits = generate_without_cache(model, prompt, 5)
    assert cached == full
    np.testing.assert_allclose(cached_logits, full_logits, rtol=1e-4, atol=1e-4)


def test_balanced_hash_table_is_built_from_the_training_split_saved_and_reused_at_eval(tmp_path):
    from moe.routers.hashing import balanced_table
    from train.inference.evaluate import load_run

    cfg = tiny_config(tmp_path)
    cfg.model.moe.router, cfg.model.moe.experts_per_token, cfg.checkpoint.every_steps = "balanced_hash", 1, 2
    run, state = setup(cfg, tmp_path / "w")
    counts = np.bincount(run.data.train.tokens, minlength=run.cfg.model.vocab_size)
    expected = balanced_table(counts, 8, 1, seed=0)
    tables = [np.asarray(v) for p, v in jax.tree.leaves_with_path(state.model_state)
              if "['router']['table']" in jax.tree_util.keystr(p)]
    assert len(tables) == 2
    for table in tables:
        np.testing.assert_array_equal(table, expected)
    mass = np.bincount(expected[:, 0], weights=counts, minlength=8)
    top = counts.max() / counts.sum()  # no table can put less than the commonest id on one expert
    assert mass.max() / mass.sum() <= max(top, 1 / 8) * 1.25
    state, _ = loop.train(run, state)
    run.close()
    restored = [np.asarray(v) for p, v in jax.tree.leaves_with_path(load_run(tmp_path / "w").model_state)
                if "['router']['table']" in jax.tree_util.keystr(p)]
    assert len(restored) == 2 and all(np.array_equal(t, expected) for t in restored)


@pytest.mark.parametrize("router", ["gshard", "loss_free"])
def test_stochastic_and_biased_routers_train_checkpoint_and_evaluate(tmp_path, router):
    from train.inference.evaluate import evaluate_run, load_run

    cfg = tiny_config(tmp_path)
    cfg.model.moe.router, cfg.model.moe.capacity_factor, cfg.checkpoint.every_steps = router, 1.0, 3
    cfg.model.moe.router_options.loss_free.gamma = 0.01
    run, state = setup(cfg, tmp_path / "w")
    state, summary = loop.train(run, state)
    biases = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(state.model_state)
              if "['router']['bias']" in jax.tree_util.keystr(p)}
    run.close()
    if router == "loss_free":  # the bias moved, is saved with the checkpoint and restored for eval
        assert len(biases) == 2 and all(np.abs(b).max() > 0 for b in biases.values())
        restored = {jax.tree_util.keystr(p): np.asarray(v)
                    for p, v in jax.tree.leaves_with_path(load_run(tmp_path / "w").model_state)
                    if "['router']['bias']" in jax.tree_util.keystr(p)}
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


def test_thor_draws_one_expert_per_batch_in_training_and_a_fixed_one_per_token_in_eval():
    import jax.numpy as jnp

    from moe import FFNConfig, MoEConfig, MoEFeedForward

    layer = MoEFeedForward(MoEConfig(num_experts=8, router="thor"), FFNConfig(16, 32, "gelu"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16))
    drawn = []
    for _ in range(40):
        ids = np.asarray(layer.route(x, None).expert_ids)
        assert np.all(ids == ids.flat[0])  # the whole batch on one expert
        drawn.append(int(ids.flat[0]))
    assert len(set(drawn)) == 8  # a fresh expert per call (P(some expert unseen in 40) < 0.04)
    layer.eval()
    first, again = (np.asarray(layer.route(x, None).expert_ids) for _ in range(2))
    np.testing.assert_array_equal(first, again)  # fixed seed
    assert len(np.unique(first)) == 8  # per token
    y, aux = layer(x)
    assert float(aux.dropped_fraction) == 0 and jnp.all(jnp.isfinite(y))


def test_symmetric_kl():
    from train.core.step import symmetric_kl

    a, b = jax.random.normal(jax.random.key(0), (2, 2, 3, 11))
    w = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    pa, pb = np.asarray(jax.nn.softmax(a)), np.asarray(jax.nn.softmax(b))
    kl = lambda p, q: np.sum(p * np.log(p / q), axis=-1)  # noqa: E731
    expected = float(np.sum(0.5 * (kl(pa, pb) + kl(pb, pa)) * w) / w.sum())
    assert float(symmetric_kl(a, b, w)) == pytest.approx(expected, rel=1e-5)
    assert float(symmetric_kl(b, a, w)) == pytest.approx(expected, rel=1e-5)
    assert float(symmetric_kl(a, a, w)) == 0.0


def test_thor_with_consistency_trains_checkpoints_and_evaluates_deterministically(tmp_path):
    from train.inference.evaluate import evaluate_run, load_run

    cfg = tiny_config(tmp_path)
    cfg.model.moe.router, cfg.model.moe.experts_per_token, cfg.model.moe.router_options.thor.consistency = "thor", 1, 1.0
    cfg.checkpoint.every_steps = 2
    run, state = setup(cfg, tmp_path / "w")
    state, summary = loop.train(run, state)
    run.close()
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert np.isfinite(summary["last_loss"]) and len(train_rows) == 4
    assert max(r["thor/consistency"] for r in train_rows) > 0  # the two passes drew different experts
    # one expert per layer per pass: the two passes' mean load has at most 2 experts per layer
    assert all(r["moe/layer0/load_imbalance"] >= 4 for r in train_rows)
    run = load_run(tmp_path / "w")
    first, second = (evaluate_run(run, log=lambda *_: None) for _ in range(2))
    assert first["loss"] == second["loss"] and np.isfinite(first["loss"]) and first["step"] == 4


def test_expert_choice_is_non_causal_and_refused_for_the_causal_lm_unless_allowed(tmp_path, capsys):
    import jax.numpy as jnp

    from moe.routers.expert_choice import expert_choice_route
    from train.cli import generate_main
    from train.inference.evaluate import evaluate_run, load_run

    # expert 0 takes 2 of a group of 4: token 1 is chosen until a later token outbids it
    logits = jnp.asarray([[[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    before = np.asarray(expert_choice_route(logits, 4, 2).expert_ids)[0, :, 0]
    after = np.asarray(expert_choice_route(logits.at[0, 3, 0].set(5.0), 4, 2).expert_ids)[0, :, 0]
    assert before.tolist() == [0, 0, 2, 2] and after.tolist() == [0, 2, 2, 0]  # 2 = no expert
    tied = np.asarray(expert_choice_route(jnp.zeros((1, 6, 2)), 6, 3).expert_ids)[0]
    assert tied.tolist() == [[0, 1]] * 3 + [[2, 2]] * 3  # equal scores: earlier tokens first

    cfg = tiny_config(tmp_path)
    cfg.model.moe.router, cfg.model.vocab_size, cfg.model.moe.capacity_factor = "expert_choice", 64, 1.0
    with pytest.raises(ValueError, match="would see the future"):
        Transformer(cfg.model, rngs=nnx.Rngs(0))
    cfg.model.allow_non_causal_router = True
    cfg.model.vocab_size, cfg.checkpoint.every_steps = 0, 4
    run, state = setup(cfg, tmp_path / "w")
    state, summary = loop.train(run, state)
    run.close()
    assert np.isfinite(summary["last_loss"])
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    row = [r for r in rows if r["split"] == "train"][-1]
    assert row["moe/layer0/load_imbalance"] == pytest.approx(1.0)  # each expert takes its C tokens
    assert 0 < row["moe/layer0/dropped_fraction"] < 1  # tokens no expert took
    assert np.isfinite(evaluate_run(load_run(tmp_path / "w"), log=lambda *_: None)["loss"])
    capsys.readouterr()  # the run's own step lines
    with pytest.raises(SystemExit) as exc:
        generate_main([f"--workdir={tmp_path / 'w'}", "--prompt=def "])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "needs later tokens" in err and len(err.splitlines()) == 1


def test_capacity_groups_do_not_stop_evaluation_or_generation(tmp_path, capsys):
    """A capacity group of 16 tokens cannot divide a 7-token prompt; nothing is dropped there, so
    the group size does not matter and generation (and evaluation on any mesh) goes on."""
    from train.cli import eval_main, generate_main

    cfg = tiny_config(tmp_path)
    cfg.model.moe.capacity_group_size, cfg.model.moe.capacity_factor, cfg.checkpoint.every_steps = 16, 1.0, 4
    run, state = setup(cfg, tmp_path / "w")
    state, _ = loop.train(run, state)
    run.close()
    capsys.readouterr()
    assert eval_main([f"--workdir={tmp_path / 'w'}", "--max_batches=2"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"])
    assert generate_main([f"--workdir={tmp_path / 'w'}", "--prompt=def add", "--max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.startswith("def add")


def test_loss_free_bias_moves_once_per_step_whatever_the_accumulation(tmp_path):
    """grad_accum 1 and 4 over the same global batch: the bias moves by gamma per step, from the
    whole step's load, and ends the same."""

    def biases(accum):
        cfg = tiny_config(tmp_path, data=1, expert=4)
        cfg.model.moe.router, cfg.model.moe.router_options.loss_free.gamma, cfg.model.moe.capacity_factor = "loss_free", 0.01, 8.0  # no drops
        cfg.train.batch_size, cfg.train.grad_accum_steps = 16, accum
        run, state = setup(cfg, tmp_path / f"accum{accum}", devices=jax.devices()[:4])
        with run.context():
            for _ in range(3):
                state, _ = run.train_step(state, run.global_batch(next(run.batches)))
        out = [np.asarray(v) for p, v in jax.tree.leaves_with_path(state.model_state)
               if "['router']['bias']" in jax.tree_util.keystr(p)]
        run.close()
        return out

    one, four = biases(1), biases(4)
    assert len(one) == 2
    for a, b in zip(one, four, strict=True):
        assert np.abs(b).max() <= 3 * 0.01 + 1e-6  # at most gamma per step, never M x gamma
        np.testing.assert_allclose(b, a, atol=1e-6)
    assert max(np.abs(a).max() for a in one) > 0


def test_fixed_evaluation_draws_differ_between_layers_and_match_cached_decoding(tmp_path):
    """random, gshard and thor draw with a fixed seed in eval mode, a different one in every layer;
    cached decoding draws as the full sequence does."""
    from reference import generate_without_cache
    from train.inference.generate import generate

    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    for router in ("random", "gshard", "thor"):
        cfg = tiny_config(tmp_path)
        cfg.model.moe.router, cfg.model.vocab_size = router, 64
        cfg.model.moe.experts_per_token = 2 if router == "gshard" else 1
        model = Transformer(cfg.model, rngs=nnx.Rngs(0))
        model.eval()
        ids = [np.asarray(block.ffn.route(x, tokens).expert_ids) for block in model.blocks]
        assert len(ids) == 2 and not np.array_equal(ids[0], ids[1]), router
        np.testing.assert_array_equal(np.asarray(model.blocks[0].ffn.route(x, tokens).expert_ids), ids[0])
        if router == "random":  # routing ignores the token: any change of draw shows in the logits
            cached, cached_logits = generate(model, [3, 9, 27], 3)
            full, full_logits = generate_without_cache(model, [3, 9, 27], 3)
            assert cached == full
            np.testing.assert_allclose(cached_logits, full_logits, rtol=1e-4, atol=1e-4)


def test_cached_decoding_never_drops_even_with_an_eval_capacity(tmp_path):
    """With eval_capacity_factor the full forward pass drops; decoding equals the no-drop model."""
    import dataclasses

    from reference import generate_without_cache
    from train.inference.generate import generate

    cfg = tiny_config(tmp_path)
    cfg.model.moe.router, cfg.model.vocab_size, cfg.model.moe.experts_per_token = "topk", 64, 1
    dropping = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, eval_capacity_factor=0.25))
    model, reference = (Transformer(c, rngs=nnx.Rngs(0)) for c in (dropping, cfg.model))
    for m in (model, reference):
        m.eval()
    prompt = [3, 9, 27, 5, 11, 40, 2, 8]
    _, aux = model(jax.numpy.asarray([prompt]))
    assert float(aux.dropped_fraction) > 0  # the full forward pass does drop
    cached, cached_logits = generate(model, prompt, 3)
    full, full_logits = generate_without_cache(reference, prompt, 3)
    assert cached == full
    np.testing.assert_allclose(cached_logits, full_logits, rtol=1e-4, atol=1e-4)
