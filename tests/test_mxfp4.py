"""MXFP4 checkpoints (GPT-OSS): the folder reads each ``P_blocks``/``P_scales`` pair as the float32
tensor ``P`` transformers loads, bit for bit, and a malformed pair is one line naming the tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest
torch = pytest.importorskip("torch")
from safetensors.numpy import save_file
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

from train.interop.families import InteropError
from train.interop.quantized import Mxfp4Folder, dequantize_mxfp4, open_folder
from train.interop.safetensors import SafetensorsFolder

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"
EXPERTS, HIDDEN, INTERMEDIATE = 3, 64, 96
CONFIG = {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4",
                                                           "modules_to_not_convert": ["model.layers.*.self_attn"]}}


def _packed(rng, rows: int, cols: int, low: int = 120, high: int = 134):
    """Random MXFP4 codes of an ``[EXPERTS, rows, cols]`` weight as GPT-OSS stores them: blocks
    ``[EXPERTS, rows, cols / 32, 16]`` and scales ``[EXPERTS, rows, cols / 32]``."""
    blocks = rng.integers(0, 256, (EXPERTS, rows, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(low, high + 1, (EXPERTS, rows, cols // 32), dtype=np.uint8)
    return blocks, scales


def _transformers(blocks, scales) -> np.ndarray:
    return convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32).numpy()


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("rows, cols, expected", [
    (2 * INTERMEDIATE, HIDDEN, (EXPERTS, HIDDEN, 2 * INTERMEDIATE)),  # gate_up_proj: [E, hidden, 2 * intermediate]
    (HIDDEN, INTERMEDIATE, (EXPERTS, INTERMEDIATE, HIDDEN)),  # down_proj: [E, intermediate, hidden]
])
def test_dequantize_mxfp4_is_transformers_bit_for_bit(rows, cols, expected):
    rng = np.random.default_rng(rows)
    blocks, scales = _packed(rng, rows, cols)
    ours, ref = dequantize_mxfp4(blocks, scales), _transformers(blocks, scales)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == expected
    np.testing.assert_array_equal(_bits(ours), _bits(ref))  # -0.0 included
    assert len(np.unique(ours)) > 50  # the scales matter, not only the 16 codes
    # every scale byte, 0 (subnormal results) to 255 (2**128: inf, or finite for 0 and +-0.5)
    blocks, scales = _packed(rng, rows, cols, 0, 255)
    scales.reshape(-1)[:256] = np.arange(256)
    np.testing.assert_array_equal(_bits(dequantize_mxfp4(blocks, scales)), _bits(_transformers(blocks, scales)))


def test_dequantize_mxfp4_layout_by_hand():
    """Byte b of a block holds values 2b (low nibble) and 2b + 1 (high), scaled by 2**(s - 127); the
    result is [E, values, rows]. Independent of transformers, so a changed reference cannot hide it."""
    blocks = np.zeros((1, 2, 1, 16), np.uint8)
    blocks[0, 0, 0, 0] = 0x72  # low 2 -> 1.0, high 7 -> 6.0
    blocks[0, 1, 0, 3] = 0x9F  # low 15 -> -6.0, high 9 -> -0.5
    scales = np.array([[[128], [125]]], np.uint8)  # 2**1 and 2**-2
    out = dequantize_mxfp4(blocks, scales)
    assert out.shape == (1, 32, 2)
    expected = np.zeros((1, 32, 2), np.float32)
    expected[0, 0, 0], expected[0, 1, 0] = 2.0, 12.0
    expected[0, 6, 1], expected[0, 7, 1] = -1.5, -0.125
    np.testing.assert_array_equal(out, expected)
    assert list(np.float32(FP4_VALUES)) == [1.0 * v for v in FP4_VALUES]  # the table the reference uses


def _folder(tmp_path, tensors: dict, config: dict = CONFIG):
    tmp_path.mkdir(exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return open_folder(SafetensorsFolder(tmp_path), config, str(tmp_path / "config.json"))


def test_mxfp4_folder_reads_each_pair_as_the_parameter_transformers_loads(tmp_path):
    rng = np.random.default_rng(0)
    gate_blocks, gate_scales = _packed(rng, 2 * INTERMEDIATE, HIDDEN)
    down_blocks, down_scales = _packed(rng, HIDDEN, INTERMEDIATE)
    bias = rng.standard_normal((EXPERTS, 2 * INTERMEDIATE)).astype(np.float32)
    folder = _folder(tmp_path, {GATE_UP + "_blocks": gate_blocks, GATE_UP + "_scales": gate_scales,
                                DOWN + "_blocks": down_blocks, DOWN + "_scales": down_scales,
                                GATE_UP + "_bias": bias})
    assert isinstance(folder, Mxfp4Folder)
    assert folder.names() == sorted([DOWN, GATE_UP, GATE_UP + "_bias"])
    assert GATE_UP in folder and GATE_UP + "_blocks" not in folder and GATE_UP + "_scales" not in folder
    assert folder.shape(GATE_UP) == (EXPERTS, HIDDEN, 2 * INTERMEDIATE)
    assert folder.shape(DOWN) == (EXPERTS, INTERMEDIATE, HIDDEN)
    assert folder.kind(GATE_UP) == "F32" and folder.dtype(GATE_UP) == np.float32
    assert folder.companions(GATE_UP) == (GATE_UP + "_blocks", GATE_UP + "_scales")
    assert folder.companions(GATE_UP + "_bias") == ()
    assert folder.file(GATE_UP) == tmp_path / "model.safetensors"
    for name, blocks, scales in ((GATE_UP, gate_blocks, gate_scales), (DOWN, down_blocks, down_scales)):
        got = folder[name]
        assert got.shape == folder.shape(name)
        np.testing.assert_array_equal(_bits(got), _bits(_transformers(blocks, scales)))
    np.testing.assert_array_equal(folder[GATE_UP + "_bias"], bias)  # a plain tensor reads as stored
    assert folder.kind(GATE_UP + "_bias") == "F32" and folder.shape(GATE_UP + "_bias") == bias.shape


def test_malformed_mxfp4_is_one_line_naming_the_tensor(tmp_path):
    rng = np.random.default_rng(1)
    blocks, scales = _packed(rng, HIDDEN, INTERMEDIATE)
    b, s = DOWN + "_blocks", DOWN + "_scales"
    cases = [
        ("no scales", {b: blocks}, b, DOWN + "_scales"),
        ("no blocks", {s: scales}, s, DOWN + "_blocks"),
        ("scales of another shape", {b: blocks, s: scales[:, :-1]}, s, "expected U8"),
        ("blocks not of 16 bytes", {b: blocks[..., :8], s: scales}, b, "16]"),
        ("blocks not 4-D", {b: blocks[0], s: scales[0]}, b, "expected [experts, rows, groups, 16]"),
        ("scales not uint8", {b: blocks, s: scales.astype(np.float32)}, s, "F32"),
        ("blocks not uint8", {b: blocks.view(np.int8), s: scales}, b, "I8"),
        ("the parameter beside its blocks", {b: blocks, s: scales, DOWN: np.zeros(3, np.float32)}, b, "beside"),
    ]
    for i, (what, tensors, named, expected) in enumerate(cases):
        with pytest.raises(InteropError) as e:
            _folder(tmp_path / str(i), tensors)
        message = str(e.value)
        assert "\n" not in message and f"tensor {named}:" in message and expected in message, (what, message)
        assert "model.safetensors" in message, (what, message)


def test_other_quant_methods_name_both_schemes(tmp_path):
    rng = np.random.default_rng(2)
    blocks, scales = _packed(rng, HIDDEN, INTERMEDIATE)
    config = {"quantization_config": {"quant_method": "gptq", "bits": 4}}
    with pytest.raises(InteropError) as e:
        _folder(tmp_path, {DOWN + "_blocks": blocks, DOWN + "_scales": scales}, config)
    message = str(e.value)
    assert "quant_method='gptq': not supported" in message and "fp8" in message and "mxfp4" in message
    assert "\n" not in message
    # without quantization_config the folder is read as stored
    plain = open_folder(SafetensorsFolder(tmp_path), {}, "config.json")
    assert isinstance(plain, SafetensorsFolder) and DOWN + "_blocks" in plain.names()
