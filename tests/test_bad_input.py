"""Bad input (config, command line, data, tokenizer) ends in one line naming the field or path,
exit code 2 and no traceback, before anything is compiled or written."""

import pathlib

import pytest

from train.cli import eval_main, generate_main, train_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TYPO_CONFIG = """
from train.core.config import Config


def get_config():
    cfg = Config()
    cfg.train.step = 5  # misspelt: the field is train.steps
    return cfg
"""

BAD_INPUTS = [
    (["--config.model.num_expert=3"], "config.model.num_expert: unknown key"),
    (["--config.trian.steps=3"], "config.trian.steps: unknown key"),
    (["--config.train.steps=ten"], "config.train.steps='ten': expected int"),
    (["--config.train.steps=0"], "config.train.steps=0: must be >= 1"),
    (["--config.train.steps=-5"], "config.train.steps=-5: must be >= 1"),
    (["--config.mesh.expert=3"], "config.mesh: data=2, fsdp=1, expert=3, tensor=1 needs 6 devices"),
    (["--config.mesh.data=4"], "needs 16 devices, but 8 are present"),
    (["--config.model.moe.num_experts=6"], "config.model.moe.num_experts=6: not divisible by mesh.expert=4"),
    (["--config.model.moe.experts_per_token=9"], "config.model.moe.experts_per_token=9: cannot exceed num_experts=8"),
    (["--config.model.moe.capacity_factor=0"], "config.model.moe.capacity_factor=0.0: must be a number > 0"),
    (["--config.model.attention=mla", "--config.model.mla.kv_lora_rank=0"], "config.model.mla.kv_lora_rank=0: must be a positive integer"),
    (["--config.train.batch_size=12"], "config.train.batch_size=12: each micro-batch"),
    (["--config.model.moe.router=learned"], "config.model.moe.router='learned'"),
    (["--config.model.moe.dispatch=ragged"], "config.model.moe.dispatch='ragged': choose one of capacity, dropless"),
    (["--config.data.path=/no/such/dir"], "data.path=/no/such/dir"),
    (["--config.data.path=EMPTY_DIR"], "data.path=EMPTY_DIR"),
    (["--config.data.tokenizer=bpe", "--config.data.tokenizer_path=BAD_TOKENIZER"], "data.tokenizer_path=BAD_TOKENIZER"),
    (["--config.data.tokenizer_path=/no/such/tokenizer.json"], "config.data.tokenizer_path='/no/such/tokenizer.json': no such file"),
    (["--bogus=1"], "--bogus=1: unrecognised argument"),
    (["--cpu_devices=0"], "--cpu_devices=0: must be >= 1"),
    (["--config.profile_steps=-1"], "config.profile_steps=-1: must be an integer >= 0"),
    (["--config.model.moe.router=expert_choice"], "config.model.moe.router='expert_choice': routes each token by later tokens"),
    (["--config.model.moe.experts_per_token=2", "--config.model.moe.capacity_priority=choice"],
     "config.model.moe.capacity_priority='choice': gives every first choice a slot before any second choice"),
    (["--config.model.moe.capacity_priority=first"], "config.model.moe.capacity_priority='first': choose one of token, choice"),
    (["--config.model.moe.capacity_group_size=96"], "config.model.moe.capacity_group_size=96: must divide the 256 tokens"),
    (["--config.model.moe.thor_consistency=1.0"],
     "config.model.moe.thor_consistency: unknown key; it is config.model.moe.router_options.thor.consistency now"),
    (["--config.model.moe.router_options.stable.gate=maybe"],
     "config.model.moe.router_options.stable.gate='maybe': choose one of softmax, sigmoid, one"),
    (["--config.model.moe.router=sigmoid", "--config.model.moe.router_options.sigmoid.num_groups=3"],
     "config.model.moe.router_options.sigmoid.num_groups=3: must be a positive divisor of num_experts=8"),
    (["--config.model.moe.router=thor", "--config.model.moe.experts_per_token=2"], "experts_per_token=2: the thor router sends"),
    (["--config.mesh.data=1", "--config.mesh.tensor=2"], "config.mesh.tensor=2: mesh.rules=ep shards nothing over the tensor axis"),
    (["--workdir=gs://bucket/run"], "--workdir=gs://bucket/run: URLs are not supported"),
    (["--workdir=A_FILE"], "--workdir=A_FILE: is a file, not a folder"),
    (["--workdir=A_FILE/run"], "--workdir=A_FILE/run: cannot create or write it (Not a directory)"),
    (["--workdir=/sys/kernel"], "--workdir=/sys/kernel: cannot create or write it"),  # a folder nobody may write
    (["--config.train.batch_size=100000"], "config.train.batch_size=100000: a training step needs about"),
    (["--config=TYPO_CONFIG"], "get_config() failed: AttributeError: TrainConfig has no field 'step' (did you mean 'steps'?)"),
    (["--plan", "--device_memory_gb=inf"], "--device_memory_gb=inf: must be a finite number > 0 and <= 1048576 GiB"),
    (["--plan", "--device_memory_gb=-1"], "--device_memory_gb=-1.0: must be a finite number > 0 and <= 1048576 GiB"),
    (["--device_memory_gb=80"], "--device_memory_gb=80.0: goes with --plan"),
    (["--cpu_devices=100000"], "--cpu_devices=100000: must be >= 1 and <= 4096"),
    (["--init_timeout=0"], "--init_timeout=0: must be >= 1 and <= 604800 seconds"),
    (["--sync_timeout=1000000000000"], "--sync_timeout=1000000000000: must be >= 1 and <= 604800 seconds"),
    (["--process_id=-1"], "--process_id=-1: must be >= 0 and <= 65535"),
]
# moe-eval and moe-generate: every numeric flag outside its range, before JAX starts or the workdir is read
BAD_FLAGS = [
    ("generate", ["--max_new_tokens=1000000000"], "--max_new_tokens=1000000000: must be >= 1 and <= 1048576"),
    ("generate", ["--max_new_tokens=0"], "--max_new_tokens=0: must be >= 1 and <= 1048576"),
    ("generate", ["--temperature=nan"], "--temperature=nan: must be a finite number >= 0 and <= 100"),
    ("generate", ["--temperature=1e9"], "--temperature=1000000000.0: must be a finite number >= 0 and <= 100"),
    ("generate", ["--top_k=-1"], "--top_k=-1: must be >= 0 and <= 2147483647"),
    ("generate", ["--seed=-3"], "--seed=-3: must be >= 0 and <= 2147483647"),
    ("generate", ["--step=-1"], "--step=-1: must be >= 0 and <= 2147483647"),
    ("generate", ["--cpu_devices=0"], "--cpu_devices=0: must be >= 1 and <= 4096"),
    ("eval", ["--step=99999999999"], "--step=99999999999: must be >= 0 and <= 2147483647"),
    ("eval", ["--max_batches=-1"], "--max_batches=-1: must be >= 0 and <= 2147483647"),
    ("eval", ["--shutdown_timeout=-5"], "--shutdown_timeout=-5: must be >= 0 and <= 604800 seconds"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "typo.py").write_text(TYPO_CONFIG)
    (tmp_path / "a_file").write_text("not a folder")
    subst = {"EMPTY_DIR": str(tmp_path / "empty"), "BAD_TOKENIZER": str(tmp_path / "tokenizer.json"),
             "TYPO_CONFIG": str(tmp_path / "typo.py"), "A_FILE": str(tmp_path / "a_file")}
    for k, v in subst.items():
        argv = [a.replace(k, v) for a in argv]
        message = message.replace(k, v)
    with pytest.raises(SystemExit) as exc:
        train_main(["--config", str(ROOT / "configs/default.py"), f"--workdir={tmp_path / 'w'}", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "w").exists()  # nothing written: a failed start leaves no trace
    assert (tmp_path / "a_file").read_text() == "not a folder"


@pytest.mark.parametrize("command, argv, message", BAD_FLAGS, ids=[f"{c} {' '.join(a)}" for c, a, _ in BAD_FLAGS])
def test_a_numeric_flag_out_of_range_gets_one_line_and_exit_2(tmp_path, capsys, command, argv, message):
    main = {"eval": eval_main, "generate": generate_main}[command]
    extra = ["--prompt=def "] if command == "generate" else []
    with pytest.raises(SystemExit) as exc:
        main([f"--workdir={tmp_path / 'w'}", *extra, *argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err == f"moe-{command}: {message}", err
    assert not (tmp_path / "w").exists()
