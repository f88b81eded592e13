"""Start-up settings of the multi-process runtime: flags, environment, cluster detection (no JAX start)."""

import argparse

import pytest

from sharding.distributed import (
    DistributedError,
    add_arguments,
    detected_cluster,
    node_local_devices,
    settings_from,
)


def parse(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_flags_win_over_the_environment():
    env = {"SWITCHYARD_COORDINATOR_ADDRESS": "10.0.0.1:1234", "SWITCHYARD_NUM_PROCESSES": "4",
           "SWITCHYARD_PROCESS_ID": "3", "SWITCHYARD_LOCAL_DEVICE_IDS": "0,1"}
    s = settings_from(parse(), env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == ("10.0.0.1:1234", 4, 3, [0, 1])
    s = settings_from(parse("--process_id=1", "--local_device_ids=2"), env)
    assert (s.process_id, s.local_device_ids) == (1, [2])
    assert settings_from(parse(), {}).coordinator_address == ""


@pytest.mark.parametrize("argv, env, message", [
    (["--coordinator_address=h:1"], {}, "--num_processes=0: required"),
    (["--coordinator_address=h:1", "--num_processes=2", "--process_id=2"], {}, "--process_id=2: must be in [0, 2)"),
    (["--coordinator_address=h", "--num_processes=2", "--process_id=0"], {}, "--coordinator_address=h: expected HOST:PORT"),
    ([], {"SWITCHYARD_NUM_PROCESSES": "two"}, "SWITCHYARD_NUM_PROCESSES='two': expected int"),
    (["--local_device_ids=0,a"], {}, "--local_device_ids=0,a: expected comma-separated integers"),
    (["--init_timeout=0"], {}, "--init_timeout=0: must be >= 1 second"),
])
def test_bad_settings_name_the_flag(argv, env, message):
    with pytest.raises(DistributedError) as e:
        settings_from(parse(*argv), env)
    assert message in str(e.value)


SLURM = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}


def test_cluster_detection():
    assert detected_cluster({}) is None
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    assert detected_cluster(SLURM) == "slurm"
    assert detected_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "openmpi"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "cloud-tpu"
    assert detected_cluster({"JOBSET_NAME": "x"}) == "kubernetes"


def test_one_process_per_node_gets_every_gpu_of_its_node():
    # JAX alone would give each process only GPU [local rank] = [0]
    assert node_local_devices({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == [0, 1, 2, 3]
    assert node_local_devices({**SLURM, "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "8"}) == list(range(8))
    assert node_local_devices({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
                               "CUDA_VISIBLE_DEVICES": "0,1"}) == [0, 1]
    # one process per GPU, or nothing known: JAX's own choice
    assert node_local_devices({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_ON_NODE": "8"}) is None
    assert node_local_devices({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}) is None
    assert node_local_devices({}) is None
