"""IDX loading, stratified subsets and on-device batches."""


import pytest
import torch
from omegaconf import OmegaConf

from conftest import write_idx, write_mnist_like
from kdrun.data.batches import DeviceData, random_shift
from kdrun.data.idx import check_idx, read_idx_pair
from kdrun.data.sources import load_split, locate, stratified_subset
from kdrun.errors import KdrunError


def test_idx_round_trip(tmp_path):
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2], dtype=torch.uint8)
    write_idx(tmp_path / "img", images)
    write_idx(tmp_path / "lab", labels)
    x, y = read_idx_pair(tmp_path / "img", tmp_path / "lab")
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], images) and torch.equal(y, labels.long())


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "img"
    write_idx(path, torch.zeros(2, 28, 28))
    data = bytearray(path.read_bytes())
    data[2] = 0x0D  # float instead of unsigned byte
    path.write_bytes(bytes(data))
    with pytest.raises(KdrunError) as e:
        check_idx(path, 3)
    assert str(e.value) == f"corrupt IDX file {path}: bad magic 00000d03, expected 00000803"


def test_idx_truncated(tmp_path):
    path = tmp_path / "img"
    write_idx(path, torch.zeros(2, 28, 28))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(KdrunError) as e:
        check_idx(path, 3)
    assert str(e.value) == f"corrupt IDX file {path}: expected 1584 bytes for shape [2, 28, 28], found 1574"


def test_idx_count_mismatch(tmp_path):
    write_idx(tmp_path / "img", torch.zeros(3, 28, 28))
    write_idx(tmp_path / "lab", torch.zeros(2))
    with pytest.raises(KdrunError, match="has 3 images, .* 2 labels"):
        read_idx_pair(tmp_path / "img", tmp_path / "lab")


def test_locate_finds_mnist_layout_written_by_the_test(tmp_path):
    write_mnist_like(tmp_path / "MNIST" / "raw", n_train=50, n_test=20)
    cfg = OmegaConf.create({"name": "mnist", "torchvision_class": "MNIST", "system_dir": None})
    raw = locate(cfg, tmp_path, download=False)
    train = load_split(raw, "train")
    assert train.images.shape == (50, 1, 28, 28) and train.labels.tolist() == [i % 10 for i in range(50)]


def test_locate_unpacks_a_system_copy(tmp_path):
    import gzip

    source = tmp_path / "system"
    write_mnist_like(tmp_path / "plain", n_train=30, n_test=10)
    source.mkdir()
    for f in (tmp_path / "plain").iterdir():
        (source / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
    cfg = OmegaConf.create({"name": "x", "torchvision_class": "X", "system_dir": str(source)})
    raw = locate(cfg, tmp_path / "data", download=False)
    assert raw == tmp_path / "data" / "X" / "raw"
    assert load_split(raw, "test").labels.numel() == 10


def test_locate_names_every_place_it_looked(tmp_path):
    cfg = OmegaConf.create({"name": "mnist", "torchvision_class": "MNIST", "system_dir": None,
                            "fallback_hint": "dataset=fashion_mnist"})
    with pytest.raises(KdrunError) as e:
        locate(cfg, tmp_path, download=False)
    assert str(e.value) == (f"dataset mnist not found in {tmp_path / 'MNIST' / 'raw'}, torchvision download "
                            "(failed or offline); try dataset=fashion_mnist")


def test_stratified_subset_keeps_class_proportions_and_is_repeatable():
    labels = torch.cat([torch.full((600,), 0), torch.full((300,), 1), torch.full((100,), 2)])
    idx = stratified_subset(labels, 100, seed=0)
    assert idx.numel() == 100 and idx.unique().numel() == 100
    assert torch.bincount(labels[idx]).tolist() == [60, 30, 10]
    assert torch.equal(idx, stratified_subset(labels, 100, seed=0))
    assert not torch.equal(idx, stratified_subset(labels, 100, seed=1))
    assert stratified_subset(labels, 7, seed=0).numel() == 7
    assert torch.equal(stratified_subset(labels, None, seed=0), torch.arange(1000))


def test_random_shift_moves_each_image_within_k_pixels():
    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0  # one lit pixel per image
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    rows, cols = (out[:, 0] == 1).nonzero()[:, 1], (out[:, 0] == 1).nonzero()[:, 2]
    assert out.sum() == 64  # nothing lost at this distance from the border
    assert (rows - 14).abs().max() <= 2 and (cols - 14).abs().max() <= 2
    assert len({(r, c) for r, c in zip(rows.tolist(), cols.tolist())}) > 10  # shifts really vary
    assert torch.equal(random_shift(x, 0), x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_shift_is_a_crop_of_the_zero_padded_image_at_the_drawn_offset(dtype):
    x = torch.randint(0, 256, (40, 3, 7, 9)).to(dtype)  # several channels, not square
    out = random_shift(x, 2, torch.Generator().manual_seed(5))
    dy, dx = torch.randint(0, 5, (2, 40), generator=torch.Generator().manual_seed(5))  # the draw it made
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    assert torch.equal(out, torch.stack([padded[i, :, dy[i]:dy[i] + 7, dx[i]:dx[i] + 9] for i in range(40)]))


def test_batches_cover_the_split_once_normalised():
    images = torch.randint(0, 256, (250, 1, 28, 28), dtype=torch.uint8)
    data = DeviceData(images, torch.arange(250) % 10, mean=0.5, std=0.25, device="cpu")
    seen = []
    for b in data.batches(64, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert torch.allclose(b.x, (images[b.idx].float() / 255 - 0.5) / 0.25, atol=1e-5)
        assert torch.equal(b.y, data.labels[b.idx])
        seen.append(b.idx)
    assert sorted(torch.cat(seen).tolist()) == list(range(250)) and data.n_batches(64) == len(seen) == 4


def test_batches_normalise_per_channel_and_flip_half_the_images():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 3, 4, 5), generator=g, dtype=torch.uint8)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    data = DeviceData(images, torch.arange(200) % 10, mean, std, "cpu")
    plain = next(data.batches(200)).x
    expected = (images.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(plain, expected, atol=1e-5)
    assert torch.allclose(data.to_unit(plain), images.float() / 255, atol=1e-5)
    flipped = next(data.batches(200, generator=torch.Generator().manual_seed(1), flip=True)).x
    mirrored = [torch.equal(flipped[i], plain[i].flip(-1)) for i in range(200)]
    same = [torch.equal(flipped[i], plain[i]) for i in range(200)]
    assert all(m or s for m, s in zip(mirrored, same)) and 70 < sum(mirrored) < 130
