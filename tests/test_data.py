"""repablate.data: splits, determinism, batch serving, the shapes difficulty knob and missing-data errors."""

from __future__ import annotations

import itertools

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import datasets

from repablate.data import (
    CIFARDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    SeededBatchSampler,
    ShapesDataModule,
    TensorBatches,
    batch_loader,
    render_shapes,
)
from repablate.data.check import DatasetCheckError
from repablate.data.vision import channel_stats, random_crop_flip


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    module = DigitsDataModule(batch_size=64, seed=3)
    module.setup()
    return module


# --- digits -------------------------------------------------------------------------------------------------


def test_digits_split_sizes_are_disjoint_and_cover_everything(digits):
    indices = digits.split_indices
    assert {name: len(idx) for name, idx in indices.items()} == {"train": 1257, "val": 180, "test": 360}
    together = torch.cat(list(indices.values()))
    assert len(together.unique()) == 1797 == len(together)
    for name in indices:
        assert len(digits.split(name)) == len(indices[name])
        assert set(digits.split(name).labels.tolist()) == set(range(10))  # stratified: every class present


def test_digits_are_the_real_images_standardized(digits):
    raw = torch.from_numpy(load_digits().images).float()[:, None] / 16
    train = digits.split("train")
    mean, std = raw[digits.split_indices["train"]].mean(), raw[digits.split_indices["train"]].std()
    expected = (raw[digits.split_indices["test"]] - mean) / std
    assert torch.allclose(digits.split("test").images, expected, atol=1e-6)
    assert train.images.shape[1:] == (digits.in_channels, digits.image_size, digits.image_size) == (1, 8, 8)
    assert abs(train.images.mean().item()) < 1e-5 and abs(train.images.std().item() - 1) < 1e-5


def test_digits_split_is_fixed_by_split_seed_not_by_seed(digits):
    other_seed = DigitsDataModule(seed=99)
    other_seed.setup()
    assert all(torch.equal(other_seed.split_indices[k], v) for k, v in digits.split_indices.items())
    other_split = DigitsDataModule(split_seed=1)
    other_split.setup()
    assert not torch.equal(other_split.split_indices["test"], digits.split_indices["test"])


def test_digits_loaders_serve_whole_batches(digits):
    train = list(digits.train_dataloader())
    assert len(train) == 1257 // 64 and all(x.shape == (64, 1, 8, 8) and y.shape == (64,) for x, y in train)
    val = list(digits.val_dataloader())
    assert torch.equal(torch.cat([y for _, y in val]), digits.split("val").labels)  # in order, every sample


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"seed": -1}, "seed=-1"),
        ({"val_size": 1000, "test_size": 1000}, "val_size=1000"),
    ],
)
def test_digits_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        DigitsDataModule(**kwargs)


def test_batch_larger_than_training_split_is_refused():
    with pytest.raises(ValueError, match="batch_size=5000"):
        DigitsDataModule(batch_size=5000).train_dataloader()


# --- batch serving ------------------------------------------------------------------------------------------


def epoch_orders(sampler: SeededBatchSampler, epochs: int) -> list[list[int]]:
    return [[i for batch in sampler for i in batch.tolist()] for _ in range(epochs)]


@settings(max_examples=20, deadline=None)
@given(size=st.integers(1, 200), batch=st.integers(1, 64), seed=st.integers(0, 2**31), drop=st.booleans())
def test_sampler_is_a_seeded_permutation_per_epoch(size, batch, seed, drop):
    sampler = SeededBatchSampler(size, batch, shuffle=True, seed=seed, drop_last=drop)
    first, second = epoch_orders(sampler, 2)
    batches = list(SeededBatchSampler(size, batch, shuffle=True, seed=seed, drop_last=drop))
    assert len(batches) == len(sampler) and all(len(b) == batch for b in batches[:-1])
    expected = size - size % batch if drop else size
    assert len(first) == len(set(first)) == expected and set(first) <= set(range(size))
    again = SeededBatchSampler(size, batch, shuffle=True, seed=seed, drop_last=drop)
    again.set_epoch(1)
    assert epoch_orders(again, 1)[0] == second  # an epoch's order depends only on (seed, epoch)


def test_sampler_orders_differ_between_epochs_and_seeds():
    a = epoch_orders(SeededBatchSampler(100, 10, shuffle=True, seed=0), 2)
    b = epoch_orders(SeededBatchSampler(100, 10, shuffle=True, seed=1), 1)
    assert a[0] != a[1] and a[0] != b[0]
    assert epoch_orders(SeededBatchSampler(100, 10, shuffle=False), 1)[0] == list(range(100))


class _RecordFirstLabels(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch[1].tolist()))
        return self.layer(batch[0].float()[:, :1]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_sets_the_epoch_so_orders_are_reproducible(tmp_path):
    data = TensorBatches(torch.arange(40).float()[:, None], torch.arange(40))
    module = _RecordFirstLabels()
    trainer = L.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(module, train_dataloaders=batch_loader(data, 8, shuffle=True, seed=5, drop_last=True))
    for epoch in range(3):
        sampler = SeededBatchSampler(40, 8, shuffle=True, seed=5, drop_last=True)
        sampler.set_epoch(epoch)
        assert [labels for e, labels in module.seen if e == epoch] == [b.tolist() for b in sampler]


# --- shapes -------------------------------------------------------------------------------------------------


def test_shapes_splits_sizes_and_standardization():
    data = ShapesDataModule(batch_size=32, difficulty=0.5, train_size=120, val_size=30, test_size=36)
    assert (data.num_classes, data.in_channels, data.image_size) == (6, 3, 32)
    sizes = {name: len(data.split(name)) for name in ("train", "val", "test")}
    assert sizes == {"train": 120, "val": 30, "test": 36}
    train = data.split("train")
    assert train.images.shape == (120, 3, 32, 32) and train.images.dtype == torch.float32
    assert torch.allclose(train.images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.bincount(train.labels).tolist() == [20] * 6
    # splits are independent draws: no image of val appears in train
    flat = train.images.flatten(1)
    assert torch.cdist(data.split("val").images.flatten(1), flat).min() > 1e-3


def test_shapes_are_deterministic_from_data_seed():
    a = ShapesDataModule(train_size=16, val_size=8, test_size=8, seed=0).split("train")
    b = ShapesDataModule(train_size=16, val_size=8, test_size=8, seed=7).split("train")
    c = ShapesDataModule(train_size=16, val_size=8, test_size=8, data_seed=1).split("train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 16), difficulty=st.floats(0, 1), classes=st.integers(2, 8), seed=st.integers(0, 2**40))
def test_render_shapes_any_setting(n, difficulty, classes, seed):
    images, labels = render_shapes(n, difficulty, classes, seed)
    assert images.shape == (n, 3, 32, 32) and torch.isfinite(images).all()
    assert labels.min() >= 0 and labels.max() < classes
    again, same_labels = render_shapes(n, difficulty, classes, seed)
    assert torch.equal(images, again) and torch.equal(labels, same_labels)
    assert torch.equal(render_shapes(n, 1 - difficulty, classes, seed)[1], labels)  # same scenes, any difficulty


def nearest_centroid_accuracy(difficulty: float) -> float:
    images, labels = render_shapes(1200, difficulty, 6, seed=11)
    test_images, test_labels = render_shapes(600, difficulty, 6, seed=12)
    centroids = torch.stack([images[labels == k].flatten(1).mean(0) for k in range(6)])
    predicted = torch.cdist(test_images.flatten(1), centroids).argmin(1)
    return (predicted == test_labels).float().mean().item()


def test_difficulty_knob_goes_from_trivial_to_hard():
    # A nearest-centroid classifier on raw pixels: near perfect at 0 (measured 0.98), near chance (1/6) at 1.
    easy, medium, hard = (nearest_centroid_accuracy(d) for d in (0.0, 0.5, 1.0))
    assert easy > 0.9 > medium > hard and hard < 0.3


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"difficulty": 1.5}, "difficulty=1.5"),
        ({"num_classes": 9}, "num_classes=9"),
        ({"train_size": 0}, "train_size=0"),
    ],
)
def test_shapes_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        ShapesDataModule(**kwargs)


# --- CIFAR and ImageFolder ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_root_names_path_and_download_switch(tmp_path, name):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="download=true") as error:
        CIFARDataModule(str(root), name=name)
    assert str(root) in str(error.value) and name in str(error.value)
    assert not root.exists()  # nothing was created, nothing downloaded


def test_cifar_bad_name_and_download_is_only_on_request(tmp_path):
    with pytest.raises(ValueError, match="name='svhn'"):
        CIFARDataModule(str(tmp_path), name="svhn")
    data = CIFARDataModule(str(tmp_path / "later"), name="cifar100", download=True)  # fetched in prepare_data
    assert data.num_classes == 100 and data.name == "cifar100" and not (tmp_path / "later").exists()


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded") as error:
        ImageFolderDataModule(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="class"):
        ImageFolderDataModule(str(tmp_path / "empty"))  # exists but holds no class folders


def write_pngs(folder, classes=("cat", "dog", "eel"), per_class=10, start=0):
    """Solid images whose red channel encodes a unique id, of varying sizes, so splits can be traced."""
    for k, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            uid = start + k * per_class + i
            size = (20 + i, 16 + 2 * k)
            Image.new("RGB", size, (uid, 40 * k, 200)).save(folder / name / f"{i}.png")


def image_ids(split: TensorBatches) -> list[int]:
    return split.images[:, 0, 0, 0].tolist()  # uint8 red channel of a solid image


def test_imagefolder_loads_real_pngs_into_disjoint_splits(tmp_path):
    tmp_path = tmp_path / "images"  # a folder of our own: fixtures may put files into tmp_path
    write_pngs(tmp_path)
    data = ImageFolderDataModule(str(tmp_path), image_size=12, batch_size=4, val_fraction=0.2, test_fraction=0.1)
    assert (data.num_classes, data.in_channels, data.image_size) == (3, 3, 12)
    ids = {name: image_ids(data.split(name)) for name in ("train", "val", "test")}
    assert {name: len(v) for name, v in ids.items()} == {"train": 21, "val": 6, "test": 3}
    assert sorted(itertools.chain(*ids.values())) == list(range(30))
    for name, values in ids.items():
        assert data.split(name).labels.tolist() == [uid // 10 for uid in values]  # label follows the folder
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32
    again = ImageFolderDataModule(str(tmp_path), image_size=12, val_fraction=0.2, test_fraction=0.1)
    assert image_ids(again.split("test")) == ids["test"]


def test_imagefolder_with_train_and_val_folders(tmp_path):
    tmp_path = tmp_path / "images"
    write_pngs(tmp_path / "train")
    write_pngs(tmp_path / "val", per_class=2, start=100)
    data = ImageFolderDataModule(str(tmp_path), image_size=8, test_fraction=0.2)
    assert sorted(image_ids(data.split("val"))) == [100, 101, 102, 103, 104, 105]
    assert len(data.split("test")) == 6 and len(data.split("train")) == 24
    write_pngs(tmp_path / "test", classes=("cat", "dog"), per_class=1)
    with pytest.raises(ValueError, match="differ from train"):
        ImageFolderDataModule(str(tmp_path), image_size=8).setup()


def test_imagefolder_uses_a_valid_folder_as_given(tmp_path):
    tmp_path = tmp_path / "images"
    write_pngs(tmp_path / "train")
    write_pngs(tmp_path / "valid", per_class=2, start=100)  # Roboflow's and YOLO's name for it
    data = ImageFolderDataModule(str(tmp_path), image_size=8, test_fraction=0.2)
    assert sorted(image_ids(data.split("val"))) == [100, 101, 102, 103, 104, 105]
    write_pngs(tmp_path / "val", per_class=1)
    with pytest.raises(ValueError, match=r"both val/ and valid/"):
        ImageFolderDataModule(str(tmp_path), image_size=8)


def test_imagefolder_ignores_hidden_and_system_folders_and_files(tmp_path):
    tmp_path = tmp_path / "images"
    write_pngs(tmp_path, classes=("cat", "dog"), per_class=5)
    write_pngs(tmp_path / "__MACOSX", classes=("cat",), per_class=2)  # macOS archive metadata
    write_pngs(tmp_path / ".ipynb_checkpoints", classes=("cat",), per_class=1)
    (tmp_path / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # would crash a decoder
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\x00")
    data = ImageFolderDataModule(str(tmp_path), image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert data.classes == ["cat", "dog"] and data.num_classes == 2
    data.setup()
    assert sum(len(data.split(name)) for name in ("train", "val", "test")) == 10
    assert data.check_data().report["splits"]["train"]["skipped"] == {"hidden": 4}


def _truncated_jpeg(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def test_imagefolder_names_every_unreadable_file_before_training_or_drops_it(tmp_path):
    root = tmp_path / "images"
    write_pngs(root, classes=("cat", "dog"), per_class=5)
    _truncated_jpeg(root / "dog" / "broken.jpg")
    (root / "cat" / "empty.png").write_bytes(b"")
    data = ImageFolderDataModule(str(root), image_size=8, report_path=str(tmp_path / "report.json"))
    with pytest.raises(DatasetCheckError) as error:
        data.prepare_data()
    message = str(error.value)
    assert "dog/broken.jpg: unreadable: OSError: image file is truncated" in message
    assert "cat/empty.png: unreadable:" in message and "data.check.policy.unreadable=warn-and-drop" in message
    assert str(tmp_path / "report.json") in message
    dropping = ImageFolderDataModule(
        str(root), image_size=8, val_fraction=0.2, test_fraction=0.2, check={"policy": {"unreadable": "warn-and-drop"}}
    )
    dropping.setup()
    assert sum(len(dropping.split(name)) for name in ("train", "val", "test")) == 10
    assert dropping.check_data().report["splits"]["train"]["dropped"] == 2


def test_imagefolder_scales_16_bit_pngs(tmp_path):
    tmp_path = tmp_path / "images"  # a folder of our own: fixtures put files into tmp_path
    for name in ("a", "b"):
        (tmp_path / name).mkdir(parents=True)
        values = np.full((8, 8), 257 * (50 if name == "a" else 200), dtype=np.uint16)
        Image.fromarray(values).save(tmp_path / name / "0.png")  # mode I;16
    data = ImageFolderDataModule(str(tmp_path), image_size=8, val_fraction=0, test_fraction=0, augment=False)
    assert sorted(image_ids(data.split("train"))) == [50, 200]  # not 255, 255: clipped


def _fake_cifar(root, name="cifar10", corrupt=False, drop=()):
    dataset_class = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    folder = root / dataset_class.base_folder
    folder.mkdir(parents=True)
    files = [*dataset_class.train_list, *dataset_class.test_list, [dataset_class.meta["filename"], None]]
    for file, _ in files:
        if file not in drop:
            (folder / file).write_bytes(b"half a download" if corrupt else b"")
    return folder


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_checksum_mismatch_is_told_apart_from_missing_files(tmp_path, name):
    folder = _fake_cifar(tmp_path / "a", name, corrupt=True)
    data = CIFARDataModule(str(tmp_path / "a"), name=name)
    with pytest.raises(DatasetCheckError, match=r"is corrupt: .* fail torchvision's MD5 checksum") as error:
        data.setup()
    assert f"delete the folder {str(folder)!r} and set data.download=true" in str(error.value)
    assert "not found" not in str(error.value)
    _fake_cifar(tmp_path / "b", name, drop=("test_batch", "test"))
    with pytest.raises(FileNotFoundError, match=r"not found .* lacks \['test"):
        CIFARDataModule(str(tmp_path / "b"), name=name).setup()


# --- batch transforms ---------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 6), h=st.integers(1, 7), w=st.integers(1, 7), pad=st.integers(0, 3), seed=st.integers(0, 99))
def test_random_crop_flip_returns_a_crop_or_flipped_crop_of_the_padded_image(n, h, w, pad, seed):
    images = torch.rand(n, 2, h, w)
    out = random_crop_flip(images, pad, torch.Generator().manual_seed(seed))
    padded = torch.nn.functional.pad(images, [pad] * 4)
    for image, result in zip(padded, out, strict=True):
        candidates = [
            image[:, top : top + h, left : left + w] for top in range(2 * pad + 1) for left in range(2 * pad + 1)
        ]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(result, c) for c in candidates)


def test_channel_stats_match_torch():
    images = torch.randint(0, 256, (50, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_stats(images, chunk=7)
    as_float = images.double() / 255
    assert torch.allclose(mean.double(), as_float.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(std.double(), as_float.std(dim=(0, 2, 3), correction=0), atol=1e-6)


def test_numpy_free_of_global_state():
    # Splits and orders come from their own generators: global RNG state must not change what is served.
    np.random.seed(0)
    torch.manual_seed(0)
    first = torch.cat(list(SeededBatchSampler(30, 7, shuffle=True, seed=2)))
    np.random.seed(1)
    torch.manual_seed(1)
    assert torch.equal(first, torch.cat(list(SeededBatchSampler(30, 7, shuffle=True, seed=2))))
