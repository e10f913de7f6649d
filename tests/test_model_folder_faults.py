"""Model folders: written whole or not at all; a damaged or edited file is one line naming it, exit 2."""
from __future__ import annotations

import json

import pytest

from cachetune.stages.training.side_model import load_side_model
from tests.test_extract import assert_one_line_error, cli
from tests.test_fit import tiny_cache, train  # noqa: F401  (the module's tiny cache fixture)


def damage(folder, case):
    weights, config = folder / "model.safetensors", folder / "config.json"
    if case == "truncated weights of a folder without a checksum":
        payload = json.loads(config.read_text())
        del payload["model_sha256"]
        config.write_text(json.dumps(payload))
    if case.startswith("truncated weights"):
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "edited weights":  # a flipped byte in the tensor data, header intact
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif case == "truncated config":
        config.write_text(config.read_text()[:100])
    elif case == "edited config":  # valid JSON, but a width that the saved tensors do not have
        payload = json.loads(config.read_text())
        payload["method_config"]["r"] = 2
        config.write_text(json.dumps(payload))
    elif case == "config without a key":
        payload = json.loads(config.read_text())
        del payload["task"]
        config.write_text(json.dumps(payload))
    return weights if "weights" in case else config


@pytest.mark.parametrize("case", ["truncated weights", "truncated weights of a folder without a checksum", "edited weights", "truncated config", "edited config",
                                  "config without a key"])
def test_damaged_model_folder_is_one_line_naming_the_file(case, tiny_cache, tmp_path):  # noqa: F811
    folder = tmp_path / "lst"
    train(tiny_cache[0], "lst", folder, epochs=1)
    assert load_side_model(folder).model is not None
    broken = damage(folder, case)
    for command in (["predict", folder, "--text", "a good film"], ["evaluate", folder, "--cache", tiny_cache[0]]):
        result = cli(*command)
        assert_one_line_error(result, str(broken))
        assert "damaged" in result.output


def test_baseline_folder_given_to_predict_is_named_as_such(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "config.json").write_text('{"baseline": "lora"}')
    (folder / "model.safetensors").write_bytes(b"")
    assert_one_line_error(cli("predict", folder, "--text", "a good film"), "holds a `pipeline baseline` model")


def test_a_fit_killed_while_saving_leaves_the_old_folder_or_none(tiny_cache, tmp_path, monkeypatch):  # noqa: F811
    from cachetune.stages.training import fit as fit_module

    folder = tmp_path / "lst"
    train(tiny_cache[0], "lst", folder, epochs=1)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    original = fit_module.save_side_model

    def killed_after_the_weights(side, target, state):
        original(side, target, state)
        (target / "config.json").unlink()  # as if killed between the two files
        raise KeyboardInterrupt("simulated kill while the folder is written")

    monkeypatch.setattr(fit_module, "save_side_model", killed_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cache[0], "lst", folder, epochs=2)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # the previous model, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lst", "lst.checkpoint.pt"]  # nothing half-written
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cache[0], "lst", tmp_path / "new", epochs=1)
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(fit_module, "save_side_model", original)
    train(tiny_cache[0], "lst", folder, epochs=2)
    assert json.loads((folder / "metrics.json").read_text())["settings"]["epochs"] == 2
    assert load_side_model(folder).model is not None


def test_unreadable_model_file_is_an_os_error_exit_3(tiny_cache, tmp_path):  # noqa: F811
    folder = tmp_path / "lst"
    train(tiny_cache[0], "lst", folder, epochs=1)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()  # reading it fails in the OS (EISDIR), as root too
    result = cli("predict", folder, "--text", "a good film")
    assert result.exit_code == 3 and "Traceback" not in result.output, result.output
    assert result.output.startswith(f"error: Is a directory (EISDIR) at {folder / 'config.json'}; "), result.output
