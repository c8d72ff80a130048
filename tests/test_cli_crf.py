"""`scratchseg eval --crf` and `predict --crf`: the dense CRF behind the command line."""

import json

import numpy as np
import pytest
from PIL import Image

from scratchseg.cli import main
from scratchseg.crf import dense_crf
from scratchseg.data import transforms as T
from scratchseg.training.evaluate import image_for_crf
from helpers import tiny_run

def test_image_for_crf_undoes_the_normalisation():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x, _ = T.Normalize(mean, std)(rgb, None)
    back = image_for_crf(np.moveaxis(x, -1, 0)[None], mean, std)  # (1, 5, 7, 3) in [0, 1]
    assert back.shape == (1, 5, 7, 3)
    np.testing.assert_allclose(back[0] * 255, rgb, atol=1e-3)
    grey = image_for_crf(np.full((2, 1, 4, 4), 0.0, np.float32), (0.5,), (0.25,))
    assert grey.shape == (2, 4, 4, 3) and np.all(grey == 0.5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory, seed=5)


def test_eval_crf_scores_the_refined_probabilities(run_dir, tmp_path, capsys):
    assert main(["eval", run_dir, "--json", str(tmp_path / "plain.json")]) == 0
    assert main(["eval", run_dir, "--crf", "--json", str(tmp_path / "crf.json")]) == 0
    plain, crf = (json.load(open(tmp_path / f"{n}.json")) for n in ("plain", "crf"))
    assert 0 <= crf["miou"] <= 1
    assert crf["loss"] != plain["loss"]  # the CRF changed the probabilities that were scored
    assert main(["eval", run_dir, "--crf", "--flip", "--json", str(tmp_path / "both.json")]) == 0
    assert json.load(open(tmp_path / "both.json"))["loss"] != crf["loss"]


def test_predict_crf_writes_the_crf_labels(run_dir, tmp_path):
    image = np.zeros((24, 30, 3), np.uint8)
    image[:, 15:] = 220  # two flat regions: the CRF's appearance kernel keeps labels within each
    Image.fromarray(image).save(tmp_path / "two.png")
    assert main(["predict", run_dir, str(tmp_path / "two.png"), "--out", str(tmp_path / "p"), "--crf"]) == 0
    mask = np.asarray(Image.open(tmp_path / "p" / "two_mask.png"))
    assert mask.shape == (24, 30) and mask.max() < 4


def test_crf_refuses_scores_of_another_size():
    with pytest.raises(ValueError, match="10x12"):
        dense_crf(np.full((2, 10, 12), 0.5), np.zeros((10, 14, 3), np.uint8))
