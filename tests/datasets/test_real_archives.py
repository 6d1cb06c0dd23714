"""The real archives in ../shared/data (skipped, saying why, where that folder is absent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BNINCEPTION
from torchvision import transforms as tv

import msl_kit.datasets as D
from msl_kit.datasets.transforms import build_transform
from msl_kit.preprocessing import Preprocessing

SMALL_TRAIN = {"Balinese": 24, "Greek": 24, "Korean": 40, "Sanskrit": 42}
SMALL_TEST = {"Early_Aramaic": 22, "Japanese_(katakana)": 47, "Latin": 26, "Tagalog": 17}


@pytest.fixture(scope="module")
def cub_root(shared_data, tmp_path_factory):
    archive = shared_data / "CUB_200_2011_subset100.tgz"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent")
    root = tmp_path_factory.mktemp("cub")
    D.prepare("cub200", root, archive=archive, progress=False)
    return root


@pytest.mark.xdist_group("cub_root")
@pytest.mark.slow
def test_cub_subset_splits_as_published(cub_root):
    train, test = D.build("cub200", cub_root, "train"), D.build("cub200", cub_root, "test")
    assert (len(train), len(train.classes)) == (3428, 58)
    assert (len(test), len(test.classes)) == (2474, 42)
    assert all(int(c[:3]) <= 100 for c in train.classes) and all(
        int(c[:3]) > 100 for c in test.classes
    )
    assert (
        train.classes[0] == "001.Black_footed_Albatross" and test.classes[0] == "101.White_Pelican"
    )
    assert np.array_equal(np.unique(train.labels), np.arange(58))
    image, label, index = test[2473]
    assert image.mode == "RGB" and image.size == (227, 227) and index == 2473 and label == 41


@pytest.mark.xdist_group("cub_root")
@pytest.mark.slow
def test_cub_subset_transform_matches_torchvision_on_real_photos(cub_root):
    test = D.build("cub200", cub_root, "test")
    ours = build_transform(BNINCEPTION, train=False)
    reference = tv.Compose(
        [
            tv.Resize(256),
            tv.CenterCrop(227),
            tv.ToTensor(),
            tv.Lambda(lambda t: t.flip(0) * 255),
            tv.Normalize(BNINCEPTION.mean, BNINCEPTION.std),
        ]
    )
    for i in range(0, len(test), 500):
        image = test[i][0]
        diff = (ours(image) - reference(image)).abs()
        assert diff.mean() < 1.0, (i, diff.mean())  # in 0-255 units: one resampling instead of two


def test_omniglot_small_background_zips(shared_data, tmp_path):
    zips = [shared_data / "omniglot" / f"images_background_small{i}.zip" for i in (1, 2)]
    if not all(z.is_file() for z in zips):
        pytest.skip(f"{zips} are absent")
    D.prepare("omniglot", tmp_path, archive=zips, progress=False)
    train, test = D.build("omniglot", tmp_path, "train"), D.build("omniglot", tmp_path, "test")
    # Greek and Latin are in both zips: counted once, 8 alphabets, 242 characters, 4,840 images
    assert len(train.classes) + len(test.classes) == 242 and len(train) + len(test) == 4840
    for ds, alphabets in ((train, SMALL_TRAIN), (test, SMALL_TEST)):
        per_alphabet = {}
        for name in ds.classes:
            per_alphabet[name.split("/")[0]] = per_alphabet.get(name.split("/")[0], 0) + 1
        assert per_alphabet == alphabets
        assert len(ds) == 20 * sum(alphabets.values())
    image, _, _ = test[0]
    assert image.mode == "L" and image.size == (105, 105)
    grey = Preprocessing(
        color="L",
        mean=(0.5,),
        std=(0.5,),
        input_size=28,
        resize_size=28,
        crop_scale=(1.0, 1.0),
        hflip=False,
    )
    batch = next(
        iter(
            torch.utils.data.DataLoader(
                D.build("omniglot", tmp_path, "train", build_transform(grey, True)), batch_size=16
            )
        )
    )
    assert batch[0].shape == (16, 1, 28, 28)
