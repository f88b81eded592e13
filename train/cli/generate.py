"""moe-generate: sample text from a checkpoint with a KV cache."""

from __future__ import annotations

import argparse
import math
import sys

from train.cli.common import check_workdir, common_args, fail, run_guarded, start_jax


def generate_main(argv=None) -> int:
    """moe-generate --workdir=DIR --prompt=TEXT: sampled text on stdout."""
    prog = "moe-generate"
    p = argparse.ArgumentParser(prog=prog, description="Sample text from a checkpoint (KV-cached decoding).")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    common_args(p)
    args = p.parse_args(argv)
    check_workdir(prog, args.workdir)
    for name in ("max_new_tokens", "top_k"):
        if getattr(args, name) < (1 if name == "max_new_tokens" else 0):
            fail(prog, f"--{name}={getattr(args, name)}: out of range")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        fail(prog, f"--temperature={args.temperature}: must be a finite number >= 0 (0 = greedy)")
    start_jax(prog, args)

    return run_guarded(prog, args.verbose, lambda: _generate(prog, args))


def _generate(prog: str, args) -> int:
    import jax

    from train.data.tokenizers import build_tokenizer
    from train.errors import ConfigError
    from train.inference.evaluate import load_run, require_tokens
    from train.inference.generate import generate

    loaded = load_run(args.workdir, args.step, devices=jax.devices()[:1])  # one sequence: one device
    m = loaded.cfg.model
    if m.non_causal_routing:
        raise ConfigError(f"{m.non_causal_message()} (checkpoint {loaded.workdir}): it needs later tokens, which "
                          "token-by-token generation does not have")
    if m.moe.eval_capacity_factor and m.moe_every:
        print(f"{prog}: note: model.moe.eval_capacity_factor={m.moe.eval_capacity_factor} applies to scoring; "
              "generation never drops tokens", file=sys.stderr)
    tokenizer = build_tokenizer(loaded.cfg.data, loaded.workdir, lambda: iter(()))
    if args.top_k > tokenizer.vocab_size:
        raise ConfigError(f"--top_k={args.top_k}: more than the {tokenizer.vocab_size} tokens of the vocabulary")
    prompt = require_tokens(tokenizer, args.prompt)
    positions, trained = len(prompt) + args.max_new_tokens, loaded.cfg.train.seq_len
    if positions > trained:
        print(f"{prog}: note: the prompt and --max_new_tokens={args.max_new_tokens} reach position {positions}, "
              f"past the {trained} positions the model was trained on (train.seq_len); what it writes there "
              "was never trained", file=sys.stderr)
    with loaded.context():
        ids, _ = generate(
            loaded.model(), prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            seed=args.seed, stop_id=tokenizer.eos_id,
        )
    print(args.prompt + tokenizer.decode(ids))
    return 0
