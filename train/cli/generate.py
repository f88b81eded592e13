"""moe-generate: sample text from a checkpoint with a KV cache."""

from __future__ import annotations

import argparse
import sys

from train.cli.common import INT32_MAX, Range, check_ranges, check_workdir, common_args, run_guarded, start_jax, stderr_log


MAX_NEW_TOKENS = 1 << 20
RANGES = {
    "step": Range(0, INT32_MAX),
    "max_new_tokens": Range(1, MAX_NEW_TOKENS),
    "temperature": Range(0, 100.0),
    "top_k": Range(0, INT32_MAX),
    "seed": Range(0, INT32_MAX),
}


def generate_main(argv=None) -> int:
    """moe-generate --workdir=DIR --prompt=TEXT: sampled text on stdout."""
    prog = "moe-generate"
    p = argparse.ArgumentParser(prog=prog, description="Sample text from a checkpoint (KV-cached decoding).")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=200,
                   help=f"1 to {MAX_NEW_TOKENS}, and no more than the KV cache that fits the device")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    common_args(p)
    args = p.parse_args(argv)
    check_ranges(prog, args, RANGES)
    check_workdir(prog, args.workdir)
    start_jax(prog, args)

    return run_guarded(prog, args.verbose, lambda: _generate(prog, args))


def _generate(prog: str, args) -> int:
    import jax

    from train.data.tokenizers import build_tokenizer
    from train.errors import ConfigError
    from train.inference.evaluate import load_run, require_tokens
    from train.inference.generate import generate

    loaded = load_run(args.workdir, args.step, devices=jax.devices()[:1],  # one sequence: one device
                      log=stderr_log(prog))
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
    with loaded.context():
        model = loaded.model()
        _check_cache_fits(model, len(prompt), args.max_new_tokens)
    positions, trained = len(prompt) + args.max_new_tokens, loaded.cfg.train.seq_len
    if positions > trained:
        print(f"{prog}: note: the prompt and --max_new_tokens={args.max_new_tokens} reach position {positions}, "
              f"past the {trained} positions the model was trained on (train.seq_len); what it writes there "
              "was never trained", file=sys.stderr)
    with loaded.context():
        ids, _ = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          seed=args.seed, stop_id=tokenizer.eos_id)
    print(args.prompt + tokenizer.decode(ids))
    return 0


def _check_cache_fits(model, prompt_len: int, max_new_tokens: int) -> None:
    """The KV cache of the prompt and the new tokens may take at most half of the device's memory."""
    import jax

    from train.services.memory import device_memory, human_bytes
    from train.errors import ConfigError
    from train.inference.generate import cache_bytes

    have, where = device_memory(jax.devices()[:1])
    positions = prompt_len + max_new_tokens
    need = cache_bytes(model, positions)
    if have is None or need <= have // 2:
        return
    most = max(int(have // 2 * positions / need) - prompt_len, 0)
    raise ConfigError(f"--max_new_tokens={max_new_tokens}: the KV cache of {positions} positions needs "
                      f"{human_bytes(need)}, more than half of {where} ({human_bytes(have)}); at most {most} new "
                      "tokens fit after this prompt")
