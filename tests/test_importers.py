"""The rules every importer follows (genmod.importers.files): safe reading, one-line errors, atomic output."""

import os

import pytest
import torch

from genmod.cli import main
from genmod.importers.files import ImportError_, atomic_output, check_keys, load_state_dict, resolve_file


class _NotATensor:
    pass


def test_weights_only_checkpoint_loads_and_a_subdict_is_picked(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    torch.save({"ema": {"w": torch.ones(2)}, "model": {"w": torch.zeros(2)}, "step": 3}, path)
    assert torch.equal(load_state_dict(path, key=("ema", "model"))["w"], torch.ones(2))
    assert torch.equal(load_state_dict(path, key="model")["w"], torch.zeros(2))


def test_a_checkpoint_that_needs_code_execution_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"w": torch.ones(1), "obj": _NotATensor()}, path)
    with pytest.raises(ImportError_, match=r"refused: unpickling it would execute code") as info:
        load_state_dict(path)
    assert "\n" not in str(info.value)


def test_wrong_model_names_missing_unexpected_and_the_kind_it_looks_like():
    with pytest.raises(ImportError_, match=r"^x.pth: not a var checkpoint: 1 keys missing, 2 unexpected .*looks like a sit "
                                           r"checkpoint \(genmod import sit \.\.\.\)$"):
        check_keys("x.pth", "var", {"a", "b"}, {"a", "c", "d"}, guess="sit")
    check_keys("x.pth", "var", {"a"}, {"a"})  # equal: no error


def test_offline_hub_id_names_the_file_to_fetch_by_hand(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ImportError_, match=r"download https://huggingface.co/org/repo/resolve/main/dir/w.pt by hand"):
        resolve_file("hub:org/repo/dir/w.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint: no such file"):
        resolve_file("/nonexistent/w.pt")


def test_nothing_half_written_stays_at_out(tmp_path):
    out = tmp_path / "pipe"
    with pytest.raises(RuntimeError):
        with atomic_output(str(out)) as staging:
            open(os.path.join(staging, "model_index.json"), "w").write("{}")
            raise RuntimeError("killed mid-import")
    assert not out.exists() and os.listdir(tmp_path) == []
    with atomic_output(str(out)) as staging:
        open(os.path.join(staging, "model_index.json"), "w").write("{}")
    assert sorted(os.listdir(out)) == ["manifest.json", "model_index.json"] and os.listdir(tmp_path) == ["pipe"]


def test_unknown_import_kind_is_one_line(capsys):
    assert main(["import", "no-such-kind", "x.pt", "--out", "o"]) == 2
    assert capsys.readouterr().err.strip().startswith("genmod import: error: KIND: unknown importer 'no-such-kind'")
