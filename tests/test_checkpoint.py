"""Checkpoints: round trips, atomic writes, clear errors, torch files read without torch."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from scratchseg.checkpoint import (CheckpointError, load_checkpoint, load_torch_file, load_weights, match_weights,
                                   save_checkpoint)


def sample_state():
    rng = np.random.default_rng(0)
    model = OrderedDict([("conv.weight", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
                         ("bn.num_batches_tracked", np.array(7, dtype=np.int64))])
    optim = {"state": {0: {"exp_avg": rng.standard_normal(5), "step": 3}, 1: {}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "nesterov": False}]}
    sched = {"base_lrs": [0.1], "last_epoch": 4, "_last_lr": [0.05]}
    meta = {"epoch": 2, "rng": np.random.default_rng(5).bit_generator.state, "history": [{"miou": None}],
            "weights": np.arange(3.0)}
    return model, optim, sched, meta


def test_round_trip_keeps_structure_types_and_values(tmp_path):
    model, optim, sched, meta = sample_state()
    path = save_checkpoint(tmp_path / "c.npz", model, optim, sched, meta)
    ck = load_checkpoint(path)
    assert list(ck["model"]) == list(model)
    for k in model:
        np.testing.assert_array_equal(ck["model"][k], model[k])
        assert ck["model"][k].dtype == model[k].dtype
    np.testing.assert_array_equal(ck["optimizer"]["state"][0]["exp_avg"], optim["state"][0]["exp_avg"])
    assert ck["optimizer"]["state"][1] == {} and ck["optimizer"]["state"][0]["step"] == 3
    assert ck["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert 0 in ck["optimizer"]["state"]  # integer keys stay integers
    assert ck["scheduler"] == sched
    assert ck["meta"]["rng"] == meta["rng"]  # 128-bit PCG64 state survives
    assert ck["meta"]["history"] == [{"miou": None}]
    np.testing.assert_array_equal(ck["meta"]["weights"], np.arange(3.0))


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    model, optim, sched, meta = sample_state()
    path = tmp_path / "last.npz"
    save_checkpoint(path, model, optim, sched, meta)
    model["conv.weight"] = model["conv.weight"] + 1
    save_checkpoint(path, model, optim, sched, meta)  # replace in place
    assert os.listdir(tmp_path) == ["last.npz"]
    np.testing.assert_array_equal(load_checkpoint(path)["model"]["conv.weight"], model["conv.weight"])


def test_truncated_foreign_and_missing_files_name_the_file(tmp_path):
    model, optim, sched, meta = sample_state()
    good = save_checkpoint(tmp_path / "good.npz", model, optim, sched, meta)
    data = open(good, "rb").read()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.npz.*truncated"):
        load_checkpoint(tmp_path / "cut.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CheckpointError, match=r"text\.npz"):
        load_checkpoint(tmp_path / "text.npz")
    np.savez(tmp_path / "plain.npz", w=np.ones(2))
    with pytest.raises(CheckpointError, match=r"plain\.npz.*not a scratchseg checkpoint"):
        load_checkpoint(tmp_path / "plain.npz")
    with pytest.raises(CheckpointError, match=r"nope\.npz does not exist"):
        load_checkpoint(tmp_path / "nope.npz")


def test_pickled_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", w=np.array([{"a": 1}], dtype=object))  # needs pickle to read
    with pytest.raises(CheckpointError, match=r"obj\.npz"):
        load_weights(tmp_path / "obj.npz")


def test_match_weights_reports_skips_with_reasons():
    model = OrderedDict([("enc.weight", np.zeros((4, 3))), ("head.weight", np.zeros((5, 4))), ("head.bias", np.zeros(5))])
    weights = OrderedDict([("enc.weight", np.ones((4, 3))), ("head.weight", np.ones((21, 4))),
                           ("extra.weight", np.ones(2))])
    matched, skipped, missing = match_weights(model, weights)
    assert list(matched) == ["enc.weight"]
    reasons = dict(skipped)
    assert "(21, 4) in the file, (5, 4) in the model" in reasons["head.weight"]
    assert "no entry" in reasons["extra.weight"]
    assert missing == ["head.weight", "head.bias"]


def test_plain_npz_and_scratchseg_checkpoint_both_give_weights(tmp_path):
    np.savez(tmp_path / "plain.npz", **{"a.weight": np.ones(3)})
    assert list(load_weights(tmp_path / "plain.npz")) == ["a.weight"]
    model, optim, sched, meta = sample_state()
    save_checkpoint(tmp_path / "ck.npz", model, optim, sched, meta)
    assert list(load_weights(tmp_path / "ck.npz")) == list(model)


def test_torch_state_dict_file_is_read_without_torch(tmp_path):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    net[1].running_mean += 0.5
    sd = net.state_dict()
    sd["view"] = torch.arange(12.0).reshape(3, 4).t()  # a non-contiguous view of a storage
    torch.save(sd, tmp_path / "w.pt")
    state = load_torch_file(tmp_path / "w.pt")
    assert list(state) == list(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(state[k], v.numpy())
        assert state[k].dtype == v.numpy().dtype
    torch.save({"epoch": 3, "model": net.state_dict()}, tmp_path / "full.pth")
    assert list(load_weights(tmp_path / "full.pth")) == list(net.state_dict())


def test_torch_file_with_foreign_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refusing to load .*system"):
        load_torch_file(path)
    (tmp_path / "old.pt").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(CheckpointError, match="not a zip archive"):
        load_torch_file(tmp_path / "old.pt")
