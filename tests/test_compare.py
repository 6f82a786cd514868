"""Tests of ``python -m presam_kernels compare`` (presam_kernels/compare/)."""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from presam_kernels.__main__ import main
from presam_kernels.compare import cli, data, diagnose, report, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _without_timing(rows):
    return [{k: v for k, v in row.items() if k not in train.TIMING_COLUMNS} for row in rows]


def _training_columns(rows):
    """Every column a run's trajectory fixes: no timings, no diagnostic."""
    dropped = set(train.TIMING_COLUMNS) | set(diagnose.COLUMNS)
    return [{k: v for k, v in row.items() if k not in dropped} for row in rows]


# --- the command end to end ---------------------------------------------------


def test_quick_run_prints_table_and_writes_csv_and_plot(tmp_path):
    """The CI smoke run: the default --quick comparison, as a user types it."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "presam_kernels", "compare", "--quick", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table] == [
        "optimizer", "sgd", "sam", "asam", "infosam",
    ]
    assert "test acc" in table[0] and "optimizer share" in table[0]
    assert f"plot: {out / 'accuracy.png'}" in result.stdout
    # stderr is not a terminal here: no progress bars.
    assert "epoch/s" not in result.stderr and "it/s" not in result.stderr

    rows = _read_csv(out / "results.csv")
    assert len(rows) == 4 * len(cli.QUICK_SEEDS) * cli.QUICK_EPOCHS
    assert set(rows[0]) == set(report.CSV_COLUMNS)
    for row in rows:
        assert 0.0 <= float(row["test_acc"]) <= 1.0
        assert 0.0 <= float(row["optimizer_seconds"]) <= float(row["step_seconds"])
    with open(out / "accuracy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _quick(out, *extra):
    return main(["compare", "--quick", "--epochs", "2", "--out", str(out), *extra])


def test_same_seed_gives_identical_results(tmp_path, capsys):
    """Two runs with one seed agree on every number except the timings."""
    args = ("--optimizers", "sam,infosam", "--seeds", "3")
    _quick(tmp_path / "a", *args)
    _quick(tmp_path / "b", *args)
    first = _read_csv(tmp_path / "a" / "results.csv")
    second = _read_csv(tmp_path / "b" / "results.csv")
    assert _without_timing(first) == _without_timing(second)


def test_different_seeds_give_different_runs(tmp_path, capsys):
    _quick(tmp_path / "a", "--optimizers", "sgd", "--seeds", "0,1")
    rows = _read_csv(tmp_path / "a" / "results.csv")
    by_seed = {s: [r["train_loss"] for r in rows if r["seed"] == s] for s in ("0", "1")}
    assert by_seed["0"] != by_seed["1"]


def test_every_optimizer_variant_runs(tmp_path, capsys):
    names = ",".join(cli.VARIANTS)
    main(["compare", "--quick", "--epochs", "1", "--optimizers", names, "--out", str(tmp_path)])
    rows = _read_csv(tmp_path / "results.csv")
    assert [r["optimizer"] for r in rows] == list(cli.VARIANTS)
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)


def test_rho_flag_reaches_the_csv_per_optimizer(tmp_path, capsys):
    _quick(tmp_path, "--epochs", "1", "--optimizers", "sgd,sam,infosam", "--rho", "infosam=2.5")
    rho = {r["optimizer"]: r["rho"] for r in _read_csv(tmp_path / "results.csv")}
    assert rho == {"sgd": "", "sam": str(cli.DEFAULT_RHO["sam"]), "infosam": "2.5"}


def test_label_noise_list_runs_each_level_as_its_own_run(tmp_path, capsys):
    """One run per level with the same seeds: the 50% rows of a sweep are
    the rows of a run at 50% alone; one table per level; noise.png."""
    args = ("--epochs", "1", "--optimizers", "sgd", "--seeds", "1")
    _quick(tmp_path / "sweep", *args, "--label-noise", "0,0.5")
    stdout = capsys.readouterr().out
    _quick(tmp_path / "alone", *args, "--label-noise", "0.5")
    sweep = _read_csv(tmp_path / "sweep" / "results.csv")
    alone = _read_csv(tmp_path / "alone" / "results.csv")
    assert [r["label_noise"] for r in sweep] == ["0.0", "0.5"]
    assert _without_timing(sweep[1:]) == _without_timing(alone)
    assert sweep[0]["train_loss"] != alone[0]["train_loss"]
    assert "label noise 0%:" in stdout and "label noise 50%:" in stdout
    with open(tmp_path / "sweep" / "noise.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not os.path.exists(tmp_path / "alone" / "noise.png")


def test_diagnose_every_leaves_the_training_bit_identical(tmp_path, capsys):
    """The diagnostic runs on copies: every trajectory column of a run with
    --diagnose-every equals the run without, bit for bit (floats in full)."""
    # Two epochs: training must go on after a checkpoint for a side effect to show.
    args = ("--epochs", "2", "--optimizers", "sgd,infosam", "--seeds", "2")
    _quick(tmp_path / "plain", *args)
    _quick(tmp_path / "diagnosed", *args, "--diagnose-every", "1")
    plain = _read_csv(tmp_path / "plain" / "results.csv")
    diagnosed = _read_csv(tmp_path / "diagnosed" / "results.csv")
    assert _training_columns(plain) == _training_columns(diagnosed)
    for row in diagnosed:
        values = [row[k] for k in diagnose.COLUMNS]
        if row["optimizer"] == "sgd":
            assert values == ["", ""]  # SGD takes no perturbation
        else:
            assert all(np.isfinite(float(v)) for v in values), row
    assert all(row[k] == "" for row in plain for k in diagnose.COLUMNS)
    assert "adv ratio" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "diagnosed" / "diagnostic.png")


# --- the adversarial-effectiveness diagnostic -------------------------------------


@functools.lru_cache(maxsize=1)
def _digits():
    return data.load_digits()


def _trained(name, steps=3, n_train=200):
    """A digits model and optimizer ``name`` after a few steps (EMA warm),
    with the training images and noisy labels."""
    from presam_kernels.compare.models import build_model
    from presam_kernels.compare.optimizers import DEFAULT_RHO, VARIANTS, build_optimizer

    dataset = data.subset(_digits(), n_train, 10)
    labels, _ = data.inject_label_noise(dataset.train_labels, 0.4, 10, seed=0)
    model = build_model(dataset)
    optimizer = build_optimizer(name, model, 0.05, DEFAULT_RHO.get(name))
    clock = train._Clock(torch.device("cpu"))
    for idx in torch.arange(n_train).split(50)[:steps]:
        x = data.normalise(dataset.train_images[idx], dataset)
        train.train_step(model, optimizer, VARIANTS[name].two_pass, torch.nn.CrossEntropyLoss(), x, labels[idx], clock)
    return model, optimizer, dataset, labels


def _snapshot(model, optimizer):
    """Every tensor the next step reads: parameters, buffers, per-parameter
    state (base optimizer's and the EMA), the EMA-ready flags."""
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for key, value in optimizer.state[p].items():
            tensors[f"state[{i}].{key}"] = value.clone()
    for device, flag in optimizer._ema_ready.flags.items():
        tensors[f"ema_ready.{device}"] = flag.clone()
    return tensors


# Plain gradient, the ASAM constraint, and both EMA objectives (the EMA and
# its ready flag are what a careless diagnostic would advance).
@pytest.mark.parametrize("name", ["sam", "asam", "vasso", "infosam"])
def test_diagnostic_leaves_model_and_optimizer_bit_identical(name):
    model, optimizer, dataset, labels = _trained(name)
    before = _snapshot(model, optimizer)
    assert any(k.endswith(".grad_ema") for k in before) == (name in ("vasso", "infosam"))
    result = diagnose.adversarial_effectiveness(
        model, optimizer, dataset.train_images, labels, dataset, torch.arange(200).split(50)
    )
    assert all(np.isfinite(result[k]) for k in diagnose.COLUMNS), result
    after = _snapshot(model, optimizer)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"the diagnostic changed {changed}"
    assert optimizer._pending is None and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["sam", "asam", "infosam"])
def test_diagnosed_perturbation_is_the_one_the_optimizer_then_takes(name):
    model, optimizer, dataset, labels = _trained(name)
    idx = torch.arange(100, 150)
    x, y = data.normalise(dataset.train_images[idx], dataset), labels[idx]
    predicted, _ = diagnose.perturbation(model, optimizer, x, y)
    at_x = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    taken = [p.detach() - p0 for p, p0 in zip(model.parameters(), at_x)]
    assert all(torch.equal(a, b) for a, b in zip(predicted, taken))
    assert max(float(e.abs().max()) for e in taken) > 0
    optimizer.restore()


def test_sam_from_the_whole_training_set_scores_one():
    """SAM's perturbation from a 'minibatch' that is the whole training set
    is the full-batch SAM perturbation: ratio and cosine 1."""
    model, optimizer, dataset, labels = _trained("sam")
    result = diagnose.adversarial_effectiveness(
        model, optimizer, dataset.train_images, labels, dataset, [torch.arange(200)]
    )
    assert result["adv_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["adv_ratio"] == pytest.approx(1.0, abs=1e-3)
    # A minibatch of 10 points elsewhere: noisier, so less aligned.
    small = diagnose.adversarial_effectiveness(
        model, optimizer, dataset.train_images, labels, dataset, [torch.arange(10)]
    )
    assert small["adv_cosine"] < 0.9


# --- label noise ----------------------------------------------------------------


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.4, 0.37, 0.999])
@pytest.mark.parametrize("n, classes", [(1, 10), (7, 2), (1348, 10), (1000, 100)])
def test_label_noise_changes_exactly_the_requested_fraction(noise, n, classes):
    labels = torch.arange(n) % classes
    original = labels.clone()
    noisy, changed = data.inject_label_noise(labels, noise, classes, seed=5)
    assert torch.equal(labels, original), "the input labels must not be modified"
    assert int(changed.sum()) == round(noise * n)
    # No label that had to change kept its class; every other label is intact.
    assert torch.all(noisy[changed] != original[changed])
    assert torch.equal(noisy[~changed], original[~changed])
    assert noisy.min() >= 0 and noisy.max() < classes


def test_label_noise_draws_the_new_class_uniformly_from_the_others():
    classes, n = 10, 90_000
    labels = torch.full((n,), 3)
    noisy, changed = data.inject_label_noise(labels, 0.5, classes, seed=0)
    counts = torch.bincount(noisy[changed], minlength=classes).double()
    assert counts[3] == 0
    expected = changed.sum().item() / (classes - 1)
    others = torch.cat([counts[:3], counts[4:]])
    assert torch.all((others - expected).abs() < 0.05 * expected), counts


def test_label_noise_is_fixed_by_the_seed():
    labels = torch.arange(500) % 10
    a, _ = data.inject_label_noise(labels, 0.4, 10, seed=1)
    b, _ = data.inject_label_noise(labels, 0.4, 10, seed=1)
    c, _ = data.inject_label_noise(labels, 0.4, 10, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_leaves_the_test_set_and_the_clean_labels_untouched():
    dataset = data.subset(data.load_digits(), 200, 100)
    before = [t.clone() for t in (dataset.train_labels, dataset.test_images, dataset.test_labels)]
    settings = train.Settings(
        epochs=1, batch_size=50, lr=0.05, label_noise=0.9, device=torch.device("cpu")
    )
    records = train.run(dataset, "sgd", None, 0, settings)
    after = (dataset.train_labels, dataset.test_images, dataset.test_labels)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    # Training accuracy is measured on the noisy labels: with 90% of them
    # random, it cannot be anywhere near the clean test accuracy's ceiling.
    assert records[0]["train_acc"] < 0.5


def test_digits_split_is_fixed_and_disjoint():
    first, second = data.load_digits(), data.load_digits()
    assert torch.equal(first.test_labels, second.test_labels)
    assert len(first.train_labels) + len(first.test_labels) == 1797
    flat_train = {bytes(x.numpy()) for x in first.train_images.flatten(1)}
    flat_test = [bytes(x.numpy()) for x in first.test_images.flatten(1)]
    # digits has a few duplicate scans; the split itself is a partition.
    assert sum(x in flat_train for x in flat_test) < 10


# --- the CIFAR reader -----------------------------------------------------------


def _write_batch(path, images, labels, label_key=b"labels"):
    batch = {b"batch_label": b"test", label_key: labels, b"data": images, b"filenames": []}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def _images(n, offset):
    """n CIFAR rows whose pixel values encode (image, channel, row, column)."""
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            plane = (np.arange(1024) + 7 * c + 11 * (i + offset)) % 256
            rows[i, c * 1024 : (c + 1) * 1024] = plane
    return rows


@pytest.fixture
def cifar10_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _write_batch(folder / f"data_batch_{i}", _images(4, 4 * i), [(4 * i + j) % 10 for j in range(4)])
    _write_batch(folder / "test_batch", _images(6, 100), list(range(6)))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f, protocol=2)
    return tmp_path


def test_cifar10_reader_loads_the_release_format(cifar10_dir):
    dataset = data.load_cifar("cifar10", str(cifar10_dir))
    assert dataset.train_images.shape == (20, 3, 32, 32) and dataset.train_images.dtype == torch.uint8
    assert dataset.test_images.shape == (6, 3, 32, 32)
    # Rows are channel-major: 1024 red, then green, then blue, each row-major.
    expected = torch.from_numpy(_images(4, 4).reshape(4, 3, 32, 32))
    assert torch.equal(dataset.train_images[:4], expected)
    assert dataset.train_labels.tolist() == [(4 + j) % 10 for j in range(20)]
    assert dataset.test_labels.tolist() == list(range(6))
    assert dataset.num_classes == 10 and dataset.augment


def test_cifar_reader_accepts_the_folder_itself_or_its_parent(cifar10_dir):
    inner = data.load_cifar("cifar10", str(cifar10_dir / "cifar-10-batches-py"))
    outer = data.load_cifar("cifar10", str(cifar10_dir))
    assert torch.equal(inner.train_images, outer.train_images)


def test_cifar100_reader_uses_the_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 5), ("test", 3)):
        batch = {b"data": _images(n, 0), b"fine_labels": [99 - i for i in range(n)], b"coarse_labels": [0] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    dataset = data.load_dataset("cifar100", str(tmp_path))
    assert dataset.num_classes == 100
    assert dataset.train_labels.tolist() == [99, 98, 97, 96, 95]


def test_cifar_run_end_to_end_on_a_small_release_file(cifar10_dir, tmp_path, capsys):
    out = tmp_path / "out"
    main(["compare", "--dataset", "cifar10", "--data-dir", str(cifar10_dir), "--quick", "--epochs", "1",
          "--optimizers", "sgd,infosam", "--threads", "1", "--out", str(out)])
    assert len(_read_csv(out / "results.csv")) == 2


def test_missing_cifar_data_names_the_path_and_the_expected_file(tmp_path):
    with pytest.raises(data.DatasetError) as err:
        data.load_cifar("cifar10", str(tmp_path))
    assert str(tmp_path) in str(err.value) and "data_batch_1" in str(err.value)
    with pytest.raises(data.DatasetError) as err:
        data.load_cifar("cifar100", str(tmp_path / "nowhere"))
    assert "nowhere" in str(err.value) and "cifar-100-python" in str(err.value)


def test_missing_cifar_test_batch_is_named(cifar10_dir):
    os.remove(cifar10_dir / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(data.DatasetError, match="test_batch"):
        data.load_cifar("cifar10", str(cifar10_dir))


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"\(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "b'labels'"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 integer labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"\[0, 10\)"),
        ([1, 2, 3], "pickled dict"),
    ],
)
def test_malformed_cifar_file_is_rejected_with_its_path(cifar10_dir, batch, message):
    path = cifar10_dir / "cifar-10-batches-py" / "data_batch_3"
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(data.DatasetError, match=message) as err:
        data.load_cifar("cifar10", str(cifar10_dir))
    assert "data_batch_3" in str(err.value)


def test_cifar_reader_refuses_pickles_that_name_other_code(cifar10_dir):
    path = cifar10_dir / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": os.getcwd, b"labels": []}, f)  # a global outside numpy
    with pytest.raises(data.DatasetError, match="refusing"):
        data.load_cifar("cifar10", str(cifar10_dir))


# --- argument checking ------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizers", "sgd,adamw"], "--optimizers: unknown optimizer 'adamw'"),
        (["--optimizers", ","], "--optimizers: give at least one"),
        (["--label-noise", "1"], "--label-noise: must lie in [0, 1)"),
        (["--label-noise", "-0.1"], "--label-noise: must lie in [0, 1)"),
        (["--label-noise", "lots"], "--label-noise: 'lots' is not a number"),
        (["--label-noise", "1.2"], "--label-noise: must lie in [0, 1), got 1.2"),
        (["--label-noise", "0,0.2,1.2"], "--label-noise: must lie in [0, 1), got 1.2"),
        (["--label-noise", "0.2,x"], "--label-noise: 'x' is not a number"),
        (["--label-noise", "nan"], "--label-noise: must lie in [0, 1)"),
        (["--label-noise", ""], "--label-noise: give at least one level"),
        (["--label-noise", " , "], "--label-noise: give at least one level"),
        (["--diagnose-every", "-1"], "--diagnose-every: must lie in [0, 30]"),
        (["--quick", "--diagnose-every", "4"], "--diagnose-every: must lie in [0, 3]"),
        (["--rho", "sam:0.1"], "--rho: rho 'sam:0.1' is not a number"),
        (["--rho", "sam=0.1,infosam"], "--rho: expected NAME=VALUE"),
        (["--rho", "adamw=0.1"], "--rho: unknown optimizer 'adamw'"),
        (["--rho", "sgd=0.1"], "--rho: sgd takes no radius"),
        (["--rho", "sam=-1"], "--rho: rho for sam must be a positive"),
        (["--rho", "0"], "--rho: rho must be a positive"),
        (["--epochs", "0"], "--epochs: must be at least 1"),
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--lr", "nan"], "--lr: lr must be a positive finite"),
        (["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
        (["--threads", "0"], "--threads: must be at least 1"),
        (["--dataset", "cifar10"], "--data-dir"),
        (["--dataset", "mnist"], "--dataset: invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_message_naming_the_option(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--out", str(tmp_path), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "results.csv"), "the error must come before any training"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--device", "cuda"])
    assert "--device: cuda requested" in capsys.readouterr().err


def test_missing_cifar_folder_is_an_argument_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--dataset", "cifar10", "--data-dir", str(tmp_path / "absent")])
    err = capsys.readouterr().err
    assert str(tmp_path / "absent") in err and "cifar-10-batches-py" in err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--dataset", "--data-dir", "--label-noise", "--optimizers", "--seeds", "--epochs",
                   "--batch-size", "--lr", "--rho", "--device", "--out", "--quick", "--threads",
                   "--diagnose-every"):
        assert option in text


def test_rho_spec_sets_one_value_for_all_or_named_ones():
    names = ["sgd", "sam", "infosam"]
    assert cli.resolve_rho(cli.parse_rho("0.3"), names) == {"sgd": None, "sam": 0.3, "infosam": 0.3}
    assert cli.resolve_rho(cli.parse_rho("infosam=2"), names) == {
        "sgd": None, "sam": cli.DEFAULT_RHO["sam"], "infosam": 2.0,
    }
    assert cli.resolve_rho(None, names)["infosam"] == cli.DEFAULT_RHO["infosam"]


# --- pieces -------------------------------------------------------------------------


def test_summary_reports_mean_std_and_best_epoch():
    records = [
        {"optimizer": "sam", "rho": 0.1, "seed": s, "epoch": e, "test_acc": acc, "train_loss": 1.0,
         "epoch_seconds": 2.0, "step_seconds": 1.0, "optimizer_seconds": 0.25}
        for s, accs in ((0, (0.5, 0.9, 0.7)), (1, (0.5, 0.8, 0.9)))
        for e, acc in enumerate(accs, start=1)
    ]
    (row,) = report.summarise(records)
    assert row.final_acc_mean == pytest.approx(0.8)
    assert row.final_acc_std == pytest.approx(np.std([0.7, 0.9], ddof=1))
    assert (row.best_epoch, row.best_acc) == (2, pytest.approx(0.85))
    assert row.optimizer_share == pytest.approx(0.25)


def test_noise_sweep_reports_final_and_best_epoch_per_seed():
    records = [
        {"label_noise": level, "optimizer": "sam", "rho": 0.5, "seed": s, "epoch": e, "test_acc": acc}
        for level, per_seed in ((0.0, ((0.5, 0.9, 0.7), (0.5, 0.8, 0.9))), (0.4, ((0.2, 0.3, 0.6), (0.4, 0.1, 0.4))))
        for s, accs in enumerate(per_seed)
        for e, acc in enumerate(accs, start=1)
    ]
    sweep = report.noise_sweep(records)["sam"]
    assert sweep["levels"] == [0.0, 0.4]
    assert [a.tolist() for a in sweep["final"]] == [[0.7, 0.9], [0.6, 0.4]]  # per level, per seed
    # Seed-mean peaks: epoch 2 at 0% (0.85), epoch 3 at 40% (0.5).
    assert [a.tolist() for a in sweep["best"]] == [[0.9, 0.8], [0.6, 0.4]]


def test_table_shows_the_diagnostic_only_when_measured():
    row = report.Summary("sam", "0.5", 2, 0.9, 0.01, 0.95, 3, 1.2, 0.4, 0.07)
    assert "adv ratio" not in report.format_table([row])
    diagnosed = report.format_table([row, dataclasses.replace(row, adv_ratio=0.8125, adv_cosine=0.25)])
    assert "adv ratio" in diagnosed and "0.812" in diagnosed and "0.250" in diagnosed


def test_augment_keeps_shape_and_is_fixed_by_the_generator():
    x = torch.randn(5, 3, 32, 32)
    a = data.augment(x, torch.Generator().manual_seed(0))
    b = data.augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    # Without padding only the flips remain: each image is itself or its mirror.
    c = data.augment(x, torch.Generator().manual_seed(1), pad=0)
    assert all(torch.equal(ci, xi) or torch.equal(ci, xi.flip(-1)) for ci, xi in zip(c, x))
