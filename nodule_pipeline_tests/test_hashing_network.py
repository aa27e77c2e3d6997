"""The hashing network, its training, encoding, storage and packed codes (CPU, small sizes for speed)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from nodule_pipeline.hashing.codes import code_health, pack_codes, unpack_codes
from nodule_pipeline.hashing.network import (
    ALLOWED_BITS,
    HU_WINDOW,
    VARIANTS,
    HashNet,
    NetworkConfig,
    NormalisationStats,
    normalise_rois,
)
from nodule_pipeline.hashing.training import (
    TRAINING_THREADS,
    EpochStats,
    TrainConfig,
    classification_metrics,
    encode,
    load_model,
    read_model_card,
    save_model,
    train_hash_model,
    validation_patients,
)

SMALL = {"lstm_hidden": 16, "attention_dim": 16, "fc_dim": 64, "cnn_channels": (8, 16, 16, 16, 16), "dropout": 0.2}
# One thread: on a busy 2-core machine two OpenMP threads can run 100x slower on these tiny ops.
FAST = {"epochs": 20, "num_threads": 1, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_rois(n_patients: int = 30, per_patient: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Separable HU ROIs on a lung background: benign = small bright solid blob, malignant = large
    dim ring; labels alternate by patient so any patient-wise split keeps both classes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    images, labels, patients = [], [], []
    for patient in range(n_patients):
        label = patient % 2
        for _ in range(per_patient):
            cy, cx = rng.uniform(13, 19, 2)
            r = np.hypot(yy - cy, xx - cx)
            image = np.full((32, 32), -850.0)
            if label == 0:
                image[r < rng.uniform(3, 6)] = rng.uniform(0, 150)
            else:
                radius = rng.uniform(6, 10)
                image[(r < radius) & (r > radius - 2.5)] = rng.uniform(-300, -150)
            images.append(image + rng.normal(0, 60, image.shape))
            labels.append(label)
            patients.append(f"P{patient:03d}")
    return np.asarray(images, np.float32), np.asarray(labels, np.int8), np.asarray(patients)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    images, labels, patients = make_rois()
    test = np.isin(patients, np.unique(patients)[::5])  # 6 held-out patients, both classes
    return images, labels, patients, test


@pytest.fixture(scope="module")
def trained(data) -> object:
    images, labels, patients, test = data
    return train_hash_model(
        images[~test], labels[~test], patients[~test], NetworkConfig(bits=32, **SMALL), TrainConfig(**FAST)
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_gives_the_contract_shapes(variant: str) -> None:
    config = NetworkConfig(variant=variant, bits=64, **SMALL)
    out = HashNet(config).eval()(torch.rand(3, 1, 32, 32))
    assert out.fc.shape == (3, 64)
    assert out.hash_probs.shape == (3, 64)
    assert out.logits.shape == (3, 2)
    assert ((out.hash_probs >= 0) & (out.hash_probs <= 1)).all()


@pytest.mark.parametrize("bits", ALLOWED_BITS)
def test_every_hash_size(bits: int) -> None:
    out = HashNet(NetworkConfig(bits=bits, **SMALL)).eval()(torch.rand(2, 1, 32, 32))
    assert out.hash_probs.shape == (2, bits)
    assert out.logits.shape == (2, 2)


def test_paper_size_forward() -> None:
    config = NetworkConfig.paper()
    assert (config.bits, config.lstm_hidden, config.attention_dim, config.variant) == (256, 768, 768, "ours")
    assert NetworkConfig().variant == "ours"  # the default keeps the paper's architecture, narrower
    net = HashNet(config).eval()
    assert net.lstm.hidden_size == 768 and net.lstm.bidirectional  # 1536 BiLSTM neurons (Table 1)
    with torch.inference_mode():
        out = net(torch.rand(2, 1, 32, 32))
    assert out.fc.shape == (2, config.fc_dim)
    assert out.hash_probs.shape == (2, 256)
    assert out.logits.shape == (2, 2)


def test_variants_switch_parts_of_one_network() -> None:
    assert HashNet(NetworkConfig(variant="cnn", **SMALL)).lstm is None
    assert HashNet(NetworkConfig(variant="bilstm", **SMALL)).cnn is None
    ours = HashNet(NetworkConfig(variant="ours", **SMALL))
    plain = HashNet(NetworkConfig(variant="parallel", **SMALL))
    n_att = sum(p.numel() for p in ours.parameters()) - sum(p.numel() for p in plain.parameters())
    assert n_att > 0  # the parallel ablation is "ours" minus the attention weights


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 48}, "bits must be one of"),
        ({"bits": 100}, "bits must be one of"),
        ({"variant": "resnet"}, "valid: ours"),
        ({"num_classes": 1}, "at least 2"),
        ({"bits": 32, "num_classes": 2**33}, "log2"),
        ({"dropout": 1.0}, "dropout"),
        ({"cnn_channels": (8, 8)}, "five"),
        ({"lstm_hidden": 0}, "lstm_hidden"),
    ],
)
def test_invalid_network_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NetworkConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"epochs": 0}, "epochs"), ({"batch_size": 1}, "batch_size"), ({"validation_fraction": 1.0}, "validation")],
)
def test_invalid_train_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_wrong_input_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        HashNet(NetworkConfig(**SMALL))(torch.rand(2, 32, 32))
    with pytest.raises(ValueError, match="differ"):
        train_hash_model(np.zeros((4, 32, 32)), np.zeros(3), np.array(["a"] * 4), NetworkConfig(**SMALL))
    with pytest.raises(ValueError, match="labels"):
        train_hash_model(np.zeros((4, 32, 32)), np.array([0, 1, 2, 0]), np.array(["a"] * 4), NetworkConfig(**SMALL))


def test_hu_normalisation_uses_the_fixed_window() -> None:
    images = np.full((1, 1024), -850.0, np.float32)  # lung background: detected as HU
    images[0, :5] = [-2000.0, -1200.0, -300.0, 600.0, 3000.0]
    x, stats = normalise_rois(images)
    assert stats == NormalisationStats("hu", *HU_WINDOW)
    assert x.shape == (1, 1, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, 0, :5], [0.0, 0.0, 0.5, 1.0, 1.0])


def test_non_hu_normalisation_uses_training_percentiles() -> None:
    rng = np.random.default_rng(1)
    train = rng.uniform(0, 1, (20, 32, 32)).astype(np.float32)
    x, stats = normalise_rois(train)
    assert stats.mode == "percentile"
    assert stats.low == pytest.approx(np.percentile(train, 1)) and stats.high == pytest.approx(np.percentile(train, 99))
    assert x.min() >= 0 and x.max() <= 1
    query, same = normalise_rois(train[:3] * 2, stats)  # queries reuse the stored map
    assert same is stats and query.max() == 1.0
    forced, forced_stats = normalise_rois(train, mode="hu")
    assert forced_stats.mode == "hu" and forced.max() < 1.0


def test_training_learns_and_generalises_to_new_patients(data, trained) -> None:
    images, labels, _, test = data
    losses = [epoch.loss for epoch in trained.history]
    assert len(losses) == FAST["epochs"] and all(isinstance(e, EpochStats) for e in trained.history)
    assert losses[-1] < 0.6 * losses[0]
    assert trained.normalisation.mode == "hu"
    assert trained.device == "cpu" and not trained.module.training
    assert trained.images_per_s > 0
    encoded = encode(trained, images[test])
    metrics = classification_metrics(labels[test], encoded.predicted)
    assert metrics["accuracy"] >= 0.85, metrics
    assert encoded.codes.shape == (test.sum(), 32) and encoded.codes.dtype == bool
    assert encoded.fc.shape == (test.sum(), 64) and encoded.fc.dtype == np.float32
    assert encoded.probs.shape == (test.sum(), 2) and encoded.probs.dtype == np.float32
    assert encoded.predicted.dtype == np.int8
    np.testing.assert_allclose(encoded.probs.sum(axis=1), 1.0, rtol=1e-5)
    with torch.inference_mode():  # codes are decided, not noise around the 0.5 threshold
        x = torch.from_numpy(normalise_rois(images[test], trained.normalisation)[0])
        hash_probs = trained.module(x).hash_probs
    # The bit-balance term keeps every bit splitting the data, so sigmoids sit less deep in
    # saturation than under cross-entropy alone; still, almost no bit is within 0.05 of the threshold.
    assert (hash_probs - 0.5).abs().mean() > 0.15
    assert ((hash_probs - 0.5).abs() < 0.05).float().mean() < 0.1
    # class supervision through the hash layer: the two classes' codes differ
    codes = encoded.codes.astype(int)
    y = labels[test]
    between = np.abs(codes[y == 0].mean(0) - codes[y == 1].mean(0)).sum()
    assert between > 2


def test_same_seed_gives_identical_weights(data, trained) -> None:
    images, labels, patients, test = data
    again = train_hash_model(
        images[~test], labels[~test], patients[~test], NetworkConfig(bits=32, **SMALL), TrainConfig(**FAST)
    )
    first, second = trained.module.state_dict(), again.module.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert [e.loss for e in trained.history] == [e.loss for e in again.history]


def test_save_load_round_trip(tmp_path, data, trained) -> None:
    images = data[0][:40]
    folder = tmp_path / "model"
    save_model(trained, folder, {"data_version": "abc", "split": "patient"})
    save_model(trained, folder, {"data_version": "abc", "split": "patient"})  # replacing works
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "weights.pt"]
    card = read_model_card(folder)
    assert card["card"]["data_version"] == "abc" and card["network"]["bits"] == 32
    assert len(card["history"]) == FAST["epochs"]
    loaded = load_model(folder)
    assert loaded.network == trained.network and loaded.config == trained.config
    assert loaded.normalisation == trained.normalisation and loaded.history == trained.history
    assert trained.validation.startswith("skipped: 24 training patients, fewer than 50")  # fraction 0.1
    assert (loaded.validation, loaded.validation_patients) == (trained.validation, 0)
    assert loaded.used_config == replace(trained.config, validation_fraction=0.0)
    before, after = encode(trained, images), encode(loaded, images)
    for name in ("codes", "fc", "probs", "predicted"):
        np.testing.assert_array_equal(getattr(before, name), getattr(after, name))
    json.loads((folder / "model.json").read_text())


def test_a_model_saved_before_the_validation_note_loads(tmp_path, trained) -> None:
    folder = tmp_path / "model"
    save_model(trained, folder)
    meta = json.loads((folder / "model.json").read_text())
    del meta["validation"], meta["validation_patients"]
    (folder / "model.json").write_text(json.dumps(meta))
    loaded = load_model(folder)
    assert (loaded.validation, loaded.validation_patients) == ("", 0) and not loaded.validated


def test_save_refuses_a_card_that_is_not_json_and_keeps_the_old_model(tmp_path, trained) -> None:
    folder = tmp_path / "model"
    save_model(trained, folder, {"ok": 1})
    with pytest.raises(TypeError):
        save_model(trained, folder, {"bad": object()})
    assert read_model_card(folder)["card"] == {"ok": 1}


def test_tampered_weights_are_refused(tmp_path, trained) -> None:
    folder = tmp_path / "model"
    save_model(trained, folder, {})
    with (folder / "weights.pt").open("ab") as handle:
        handle.write(b"x")
    with pytest.raises(ValueError, match="checksum"):
        load_model(folder)


def test_non_hu_inputs_train_and_encode() -> None:
    images, labels, patients = make_rois(n_patients=20, per_patient=3, seed=3)
    unit = (images - images.min()) / (images.max() - images.min())  # 0..1 floats
    model = train_hash_model(
        unit,
        labels,
        patients,
        NetworkConfig(bits=32, **SMALL),
        TrainConfig(epochs=2, num_threads=1, validation_fraction=0.25, batch_size=16),
    )
    assert model.normalisation.mode == "percentile"
    assert all(e.val_loss is not None and e.val_accuracy is not None for e in model.history)
    encoded = encode(model, unit[:7], batch_size=3)
    assert encoded.codes.shape == (7, 32) and np.isfinite(encoded.fc).all()
    assert encode(model, unit[:0]).codes.shape == (0, 32)


def test_validation_is_carved_by_patient() -> None:
    _, labels, patients = make_rois(n_patients=30, per_patient=3)
    held = validation_patients(patients, labels, 0.2, np.random.default_rng(0))
    assert not set(patients[held]) & set(patients[~held])
    assert len(set(patients[held])) == 6 and set(labels[held]) == {0, 1}


def test_too_few_patients_for_a_validation_split_train_on_all() -> None:
    images, labels, patients = make_rois(n_patients=12, per_patient=2)
    assert not validation_patients(patients, labels, 0.2, np.random.default_rng(0)).any()  # 2.4 < 5 patients
    config = TrainConfig(epochs=2, num_threads=1, validation_fraction=0.2, batch_size=8)
    model = train_hash_model(images, labels, patients, NetworkConfig(bits=32, **SMALL), config)
    assert all(e.val_loss is None for e in model.history) and model.selected_epoch == 2


def test_progress_is_reported_each_epoch() -> None:
    images, labels, patients = make_rois(n_patients=4, per_patient=4)
    seen: list[EpochStats] = []
    config = TrainConfig(epochs=2, batch_size=15, num_threads=1)
    train_hash_model(images, labels, patients, NetworkConfig(bits=32, **SMALL), config, seen.append)
    assert [e.epoch for e in seen] == [1, 2] and all(e.val_loss is None for e in seen)


@pytest.mark.parametrize("bits", [8, 32, 256, 1024])
def test_pack_unpack_round_trip(bits: int) -> None:
    codes = np.random.default_rng(bits).random((5, bits)) > 0.5
    packed = pack_codes(codes)
    assert packed.dtype == np.uint8 and packed.shape == (5, bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits), codes)


def test_pack_is_big_endian_and_validates() -> None:
    code = np.zeros((1, 8), bool)
    code[0, 0] = True
    assert pack_codes(code)[0, 0] == 0b1000_0000
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(np.zeros((1, 12), bool))
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_codes(np.zeros((1, 4), np.uint8), 64)


def test_classification_metrics_are_exact() -> None:
    metrics = classification_metrics(np.array([1, 1, 1, 0, 0, 0, 0]), np.array([1, 1, 0, 0, 0, 0, 1]))
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["recall_macro"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert metrics["precision_macro"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert (metrics["tp"], metrics["fp"], metrics["fn"], metrics["tn"]) == (2, 1, 1, 3)
    none_predicted = classification_metrics(np.array([1, 0]), np.array([0, 0]))
    assert none_predicted["precision"] == 0.0 and none_predicted["f1"] == 0.0


def test_code_health_matches_pairwise_counts() -> None:
    rng = np.random.default_rng(4)
    codes = rng.random((60, 16)) < 0.3
    codes[:, 3] = True  # a constant bit
    codes[10:20] = codes[9]  # duplicates
    labels = rng.integers(0, 3, 60)
    health = code_health(codes, labels)
    distances = (codes[:, None, :] != codes[None, :, :]).sum(-1)
    pairs = ~np.eye(60, dtype=bool)
    same = (labels[:, None] == labels[None, :]) & pairs
    other = labels[:, None] != labels[None, :]
    assert health["intra_class_hamming"] == pytest.approx(distances[same].mean())
    assert health["inter_class_hamming"] == pytest.approx(distances[other].mean())
    assert health["distinct_codes"] == len({tuple(c) for c in codes})
    assert health["constant_bits"] == 1 and health["items"] == 60 and health["bits"] == 16
    share = codes.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.nan_to_num(-(share * np.log2(share) + (1 - share) * np.log2(1 - share)))
    assert health["mean_bit_entropy"] == pytest.approx(entropy.mean())
    collapsed = code_health(np.repeat(codes[:1], 5, axis=0), np.zeros(5))
    assert collapsed["distinct_codes"] == 1 and collapsed["constant_bits"] == 16
    assert collapsed["mean_bit_entropy"] == 0.0 and collapsed["inter_class_hamming"] is None


def test_the_order_of_the_rows_does_not_change_the_model() -> None:
    images, labels, patients = make_rois(n_patients=10, per_patient=4, seed=5)
    order = np.random.default_rng(0).permutation(len(labels))
    config = TrainConfig(epochs=2, num_threads=1, batch_size=8)
    first = train_hash_model(images, labels, patients, NetworkConfig(bits=32, **SMALL), config)
    second = train_hash_model(images[order], labels[order], patients[order], NetworkConfig(bits=32, **SMALL), config)
    one, two = first.module.state_dict(), second.module.state_dict()
    assert all(torch.equal(one[key], two[key]) for key in one)


def test_the_host_thread_count_does_not_change_the_model() -> None:
    """Training runs in its own fixed thread count (recorded in the config the card keeps), so a
    host with one core and one with two train the same weights; with the host's count (None) the
    reductions split differently and the weights differ in their last bits."""
    images, labels, patients = make_rois(n_patients=10, per_patient=4, seed=5)
    config = TrainConfig(epochs=2, batch_size=8)
    assert config.num_threads == TRAINING_THREADS and config.to_dict()["num_threads"] == TRAINING_THREADS
    weights = []
    previous = torch.get_num_threads()
    try:
        for host_threads in (1, 2):
            torch.set_num_threads(host_threads)
            model = train_hash_model(images, labels, patients, NetworkConfig(bits=32, **SMALL), config)
            assert torch.get_num_threads() == host_threads  # the caller's count is restored
            weights.append(model.module.state_dict())
    finally:
        torch.set_num_threads(previous)
    one, two = weights
    assert all(torch.equal(one[key], two[key]) for key in one)
