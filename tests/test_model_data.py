"""Models, data loading and splitting, augmentation and checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import zlib

import pytest
import torch
from PIL import Image
from safetensors.torch import load as safetensors_load

from fedgrpc import data as utils
from fedgrpc.leader import checkpoint
from fedgrpc.model import MODELS, build_model, memory_format_for, recompute_batchnorm


@pytest.mark.parametrize(
    "name, parameters", [("resnet18", 11_181_642), ("resnet18-cifar", 11_173_962), ("resnet20", 272_474), ("tiny-cnn", 11_642)]
)
def test_models_take_native_32x32_inputs(name, parameters):
    model = build_model(name, 10)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_build_model_refuses_unknown_names():
    with pytest.raises(ValueError, match="choose one of resnet18"):
        build_model("evil; import os")
    assert set(MODELS) == {"resnet18", "resnet18-cifar", "resnet20", "tiny-cnn", "small-cnn"}


def test_split_is_seeded_disjoint_and_complete():
    parts = utils.split_iid(103, 4, seed=5)
    assert [len(p) for p in parts] == [26, 26, 26, 25]
    joined = torch.cat(parts)
    assert sorted(joined.tolist()) == list(range(103))
    assert all(torch.equal(a, b) for a, b in zip(parts, utils.split_iid(103, 4, seed=5), strict=False))
    assert not torch.equal(joined, torch.cat(utils.split_iid(103, 4, seed=6)))


def test_augment_crops_within_padding_and_flips():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).view(2, 3, 32, 32) % 251 + 1
    images = images.to(torch.uint8)
    out = utils.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    for index in range(2):
        found = False
        padded = torch.nn.functional.pad(images[index], (4,) * 4)
        for dy in range(9):
            for dx in range(9):
                crop = padded[:, dy : dy + 32, dx : dx + 32]
                if torch.equal(out[index], crop) or torch.equal(out[index], crop.flip(2)):
                    found = True
        assert found, "each output is a (possibly flipped) 32x32 window of the padded image"


@pytest.mark.parametrize("shape", [(16, 3, 32, 32), (7, 1, 5, 9)])
def test_augment_is_a_per_image_crop_and_flip_from_the_same_draws(shape):
    # the draws' order is part of the contract: a run repeats only if each batch draws the same shifts and flips
    batch = shape[0]
    images = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    draws = torch.Generator().manual_seed(7)
    shifts = torch.randint(0, 9, (2, batch), generator=draws)
    flips = torch.rand(batch, generator=draws) < 0.5
    assert flips.any() and not flips.all()  # both branches are checked
    out = utils.augment(images, torch.Generator().manual_seed(7))
    for index in range(batch):
        dy, dx = shifts[:, index].tolist()
        crop = torch.nn.functional.pad(images[index], (4,) * 4)[:, dy : dy + shape[2], dx : dx + shape[3]]
        assert torch.equal(out[index], crop.flip(2) if flips[index] else crop), index


def test_normalize_uses_cifar_statistics():
    white = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    expected = torch.tensor([(1 - m) / s for m, s in zip(utils.CIFAR10_MEAN, utils.CIFAR10_STD, strict=False)])
    torch.testing.assert_close(utils.normalize(white).view(3), expected)


def test_training_inputs_pick_the_batch_crop_it_and_lay_it_out():
    # each image is one shade, so a picked image is known by its value wherever the crop lands
    images = torch.arange(1, 6, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 8, 8).contiguous()
    indices = torch.tensor([4, 1])
    plain = utils.training_inputs(images, indices, None, torch.channels_last)
    assert plain.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(plain, utils.normalize(images[[4, 1]]))
    cropped = utils.training_inputs(images, indices, torch.Generator().manual_seed(3))
    shades = utils.normalize(torch.tensor([0, 5, 2], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 1, 1))
    for row, shade in zip(cropped, (shades[1], shades[2]), strict=False):
        values = row.reshape(3, -1)
        assert bool(((values == shade.view(3, 1)) | (values == shades[0].view(3, 1))).all())  # the image or the padding
        assert bool((values == shade.view(3, 1)).all(0).sum() >= 16)  # a crop keeps at least a 4x4 corner of it


def test_image_folder_loads_classes_in_sorted_order(tmp_path):
    colours = {"cat": (255, 0, 0), "ant": (0, 255, 0)}
    for name, colour in colours.items():
        (tmp_path / "train" / name).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (32, 32), colour).save(tmp_path / "train" / name / f"{index}.png")
    Image.new("RGB", (64, 48), (0, 0, 255)).save(tmp_path / "train" / "cat" / "big.png")
    data = utils.load_dataset("imagefolder", tmp_path, train=True)
    assert data.num_classes == 2 and data.images.shape == (5, 3, 32, 32)
    assert data.labels.tolist() == [0, 0, 1, 1, 1]  # ant, then cat
    assert data.images[0, :, 0, 0].tolist() == [0, 255, 0]
    assert data.images[4, :, 5, 5].tolist() == [0, 0, 255]  # resized to 32x32


def test_decoded_images_are_cached_beside_the_folder_and_redecoded_when_a_file_changes(tmp_path, monkeypatch):
    (tmp_path / "test" / "dog").mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (32, 32), (index, 10, 20)).save(tmp_path / "test" / "dog" / f"{index}.png")
    first = utils.load_dataset("imagefolder", tmp_path, train=False)
    assert len(list((tmp_path / utils.DECODED_CACHE_DIR).glob("test-*.npy"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache was fresh")

    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", no_decoding)
        again = utils.load_dataset("imagefolder", tmp_path, train=False)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)

    Image.new("RGB", (32, 32), (200, 10, 20)).save(tmp_path / "test" / "dog" / "1.png")  # same name, new content
    changed = utils.load_dataset("imagefolder", tmp_path, train=False)
    assert changed.images[1, :, 0, 0].tolist() == [200, 10, 20]


def test_missing_data_sets_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(utils.DataError, match="no image folder at"):
        utils.load_dataset("imagefolder", tmp_path, train=True)
    with pytest.raises(utils.DataError, match="--dataset synthetic"):
        utils.load_dataset("cifar10", None, train=True)

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Dataset not found or corrupted")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(utils.DataError, match="could not be downloaded.*--data-dir.*--dataset synthetic"):
        utils.load_dataset("cifar10", tmp_path, train=True)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(utils.DataError, match="--dataset imagefolder"):
        utils.load_dataset("cifar10", tmp_path, train=True)


def test_synthetic_data_is_seeded_and_class_structured():
    a = utils.synthetic_dataset(200, seed=1)
    b = utils.synthetic_dataset(200, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # same-class images are closer to each other than to other classes' images
    images = a.images.float().flatten(1)
    first = images[a.labels == 0]
    other = images[a.labels == 1]
    assert torch.cdist(first, first).mean() < torch.cdist(first, other).mean()


def test_checkpoints_are_atomic_hashed_and_pruned(tmp_path):
    state = {"w": torch.arange(4.0), "n": torch.tensor(3)}
    for round_number in range(1, 6):
        checkpoint.save(tmp_path, round_number, state, {"metrics": {"acc": round_number / 10}}, keep=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["latest.json", "round-00004.json", "round-00004.safetensors", "round-00005.json", "round-00005.safetensors"]
    record, weights = checkpoint.load(checkpoint.latest(tmp_path))
    assert record["round"] == 5 and record["metrics"]["acc"] == 0.5
    assert torch.equal(weights["w"], state["w"]) and torch.equal(weights["n"], state["n"])
    assert record["weights_crc32"] == f"{zlib.crc32((tmp_path / 'round-00005.safetensors').read_bytes()):08x}"
    (tmp_path / "round-00005.safetensors").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="does not match the hash"):
        checkpoint.load(tmp_path / "round-00005.json")


def test_checkpoint_files_are_safetensors_that_the_library_reads_back_for_every_dtype(tmp_path):
    state = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(2, dtype=torch.float64),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(5).bfloat16(),
        "i64": torch.tensor(7),
        "i32": torch.arange(3, dtype=torch.int32),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([250], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 2),
        "strided": torch.arange(12.0).view(3, 4).t(),
    }
    json_path = checkpoint.save(tmp_path, 1, state, {}, optimizer_state={"f32.momentum_buffer": torch.full((3, 4), 0.5)})
    written = safetensors_load((tmp_path / "round-00001.safetensors").read_bytes())  # the library's own reader
    assert written.keys() == state.keys()
    for name, tensor in state.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    record = json.loads(json_path.read_text())
    assert torch.equal(checkpoint.load_optimizer(json_path, record)["f32.momentum_buffer"], torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="cannot checkpoint a torch.complex64 tensor"):
        checkpoint.save(tmp_path, 2, {"z": torch.zeros(2, dtype=torch.complex64)}, {})


def test_checkpoints_recorded_with_sha256_still_load_and_are_checked(tmp_path):
    json_path = checkpoint.save(tmp_path, 1, {"w": torch.arange(4.0)}, {})
    record = json.loads(json_path.read_text())
    data = (tmp_path / record["weights"]).read_bytes()
    del record["weights_crc32"]
    record["weights_sha256"] = hashlib.sha256(data).hexdigest()  # as checkpoints were recorded before CRC-32
    json_path.write_text(json.dumps(record))
    assert torch.equal(checkpoint.load(json_path)[1]["w"], torch.arange(4.0))
    record["weights_sha256"] = hashlib.sha256(b"other").hexdigest()
    json_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not match the hash"):
        checkpoint.load(json_path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    checkpoint.atomic_write(target, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_resolve_device():
    assert utils.resolve_device("cpu").type == "cpu"
    assert utils.resolve_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device auto or cpu"):
            utils.resolve_device("cuda")


def test_channels_last_is_chosen_where_it_was_measured_faster_unless_set():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory_format_for("auto", "resnet20", cpu) == torch.channels_last
    assert memory_format_for("auto", "resnet18-cifar", cpu) == torch.channels_last
    assert memory_format_for("auto", "resnet18", cpu) == torch.contiguous_format  # measured slower at 32x32
    assert memory_format_for("auto", "small-cnn", cpu) == torch.channels_last
    assert memory_format_for("auto", "resnet20", cuda) == torch.contiguous_format  # not measured there
    assert memory_format_for("on", "resnet18", cpu) == torch.channels_last
    assert memory_format_for("off", "resnet20", cpu) == torch.contiguous_format
    with pytest.raises(ValueError, match="choose one of auto, on, off"):
        memory_format_for("yes", "resnet20", cpu)


def test_recompute_batchnorm_averages_each_batch_statistics_and_touches_nothing_else():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
    model.eval()
    batches = [torch.tensor([[1.0, 10.0], [3.0, 14.0]]), torch.tensor([[5.0, 0.0], [7.0, 0.0]])]
    assert recompute_batchnorm(model, batches) == 1
    # batch means (2, 12) and (6, 0), unbiased batch variances (2, 8) and (2, 0): averaged over the two batches
    assert torch.equal(model[1].running_mean, torch.tensor([4.0, 6.0]))
    assert torch.equal(model[1].running_var, torch.tensor([2.0, 4.0]))
    assert torch.equal(model[0].weight, torch.eye(2)) and not model.training and model[1].momentum == 0.1
    assert recompute_batchnorm(build_model("tiny-cnn"), batches) == 0  # no BatchNorm: nothing to do


def test_recompute_batchnorm_agrees_with_torch_swa_update_bn():
    torch.manual_seed(0)
    model = build_model("resnet20")
    reference = build_model("resnet20")
    reference.load_state_dict(model.state_dict())
    batches = [torch.randn(16, 3, 32, 32) for _ in range(3)]
    recompute_batchnorm(model, batches)
    torch.optim.swa_utils.update_bn(batches, reference)
    for name, tensor in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6), name
