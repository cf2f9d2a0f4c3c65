"""mini-ImageNet, tiered-ImageNet, CIFAR-FS and FC100 through the command line, on small files in
their exact formats: a short meta-training run and its evaluation per benchmark, the data folder
from the benchmark's variable, and every missing or malformed input as one line on stderr."""

from __future__ import annotations

import json
import pickle

import pytest
from image_fixtures import (
    MINI_CLASSES,
    TIERED_SIZES,
    Evil,
    make_cifar100,
    make_mini_folder,
    make_mini_pickles,
    make_tiered,
)

from metagrad import cli
from metagrad.training import PRESETS, train

SPLITS = ("train", "val", "test")
QUICK = ["--shots", "1", "--queries", "2", "--steps", "3", "--meta-batch", "2"]
QUICK += ["--eval-tasks", "4", "--val-tasks", "4", "--no-tensorboard", "--no-progress"]
QUICK += ["--threads", "1", "--inner-steps", "1", "--eval-inner-steps", "2"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """One folder per data set layout, written once for the module."""
    base = tmp_path_factory.mktemp("data")
    make_mini_pickles(base / "mini", per_class=6)
    make_mini_folder(base / "mini-csv", per_class=4)
    make_tiered(base / "tiered")
    make_cifar100(base / "cifar", train=4, test=2)
    return base


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """Decoded arrays go to a folder of the test session, never the user's cache; no benchmark
    variable leaks in from the environment."""
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    for name in ("MINI_IMAGENET", "TIERED_IMAGENET", "CIFAR100"):
        monkeypatch.delenv(f"METAGRAD_{name}", raising=False)


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status != 0, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("metagrad: training")]
    assert len(lines) == 1 and lines[0].startswith("metagrad: error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# name, folder, class-split protocol, ways (the fixture's smallest split), classes per split
BENCHMARKS = [
    ("mini-imagenet", "mini", "ravi", 3, [MINI_CLASSES[s] for s in SPLITS]),
    ("tiered-imagenet", "tiered", "ren", 2, [len(TIERED_SIZES[s]) for s in SPLITS]),
    ("cifar-fs", "cifar", "bertinetto", 5, [64, 16, 20]),
    ("fc100", "cifar", "oreshkin", 5, [60, 20, 20]),
]


def test_the_benchmarks_and_models_are_command_line_choices():
    for bench in ("omniglot", "mini-imagenet", "tiered-imagenet", "cifar-fs", "fc100"):
        for arch in ("conv4", "conv4-mini", "resnet12"):
            args = cli.parser().parse_args(["train", "--benchmark", bench, "--arch", arch])
            assert cli._config_changes(args) == {"benchmark": bench, "arch": arch}


@pytest.mark.parametrize(("bench", "folder", "split", "ways", "counts"), BENCHMARKS)
def test_train_then_eval(capsys, roots, tmp_path, bench, folder, split, ways, counts):
    run = tmp_path / "run"
    argv = ["train", "--benchmark", bench, "--arch", "conv4-mini", "--split", split]
    argv += ["--data", str(roots / folder), "--ways", str(ways), *QUICK, "--out", str(run)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "test: accuracy" in capsys.readouterr().out
    record = json.loads((run / "config.json").read_text())
    data = record["config"]["data"]
    assert data["benchmark"] == bench and data["split"] == split
    assert [len(record["data_split"][s]) for s in SPLITS] == counts
    names = [set(record["data_split"][s]) for s in SPLITS]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    steps = [json.loads(ln).get("step") for ln in (run / "metrics.jsonl").open()]
    assert max(s for s in steps if s is not None) == 3

    assert cli.main(["eval", str(run), "--tasks", "6"]) == 0, capsys.readouterr().err
    result = json.loads((run / "eval_test.json").read_text())
    assert result["tasks"] == 6 and result["split"] == "test" and result["step"] == 3
    assert 0 <= result["accuracy"] <= 1 and f"{100 * result['accuracy']:.2f}" in (
        capsys.readouterr().out
    )


def test_mini_imagenet_preset_from_its_variable_and_the_csv_layout(
    capsys, roots, tmp_path, monkeypatch
):
    """The preset's settings, 3 ways for the fixture; the folder from $METAGRAD_MINI_IMAGENET;
    Ravi & Larochelle's CSVs and JPEGs in place of the pickles."""
    monkeypatch.setenv("METAGRAD_MINI_IMAGENET", str(roots / "mini-csv"))
    run = tmp_path / "run"
    argv = ["train", "--preset", "mini-imagenet-5w1s-maml", "--ways", "3", *QUICK]
    assert cli.main([*argv, "--out", str(run)]) == 0, capsys.readouterr().err
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["preset"] == "mini-imagenet-5w1s-maml"
    assert record["config"]["data"]["root"] == str(roots / "mini-csv")
    assert [len(record["data_split"][s]) for s in SPLITS] == [MINI_CLASSES[s] for s in SPLITS]


@pytest.mark.slow
def test_resnet12_on_cifar_fs(capsys, roots, tmp_path):
    """The full-width ResNet-12 (64-160-320-640) through a short first-order run."""
    run = tmp_path / "run"
    argv = ["train", "--benchmark", "cifar-fs", "--arch", "resnet12", "--split", "bertinetto"]
    argv += ["--algorithm", "fomaml", "--data", str(roots / "cifar"), "--ways", "2", *QUICK]
    assert cli.main([*argv, "--out", str(run)]) == 0, capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["config"]["model"]["arch"] == "resnet12"
    assert cli.main(["eval", str(run), "--tasks", "2"]) == 0
    assert 0 <= json.loads((run / "eval_test.json").read_text())["accuracy"] <= 1


# Mistakes: one line on stderr, naming the expected files ----------------------------------------


def _argv(bench: str, split: str, *extra: str) -> list[str]:
    return ["train", "--benchmark", bench, "--arch", "conv4-mini", "--split", split, *extra]


@pytest.mark.parametrize(
    ("bench", "split", "env", "files"),
    [
        ("mini-imagenet", "ravi", "METAGRAD_MINI_IMAGENET", "mini-imagenet-cache-"),
        ("tiered-imagenet", "ren", "METAGRAD_TIERED_IMAGENET", "_images_png.pkl"),
        ("cifar-fs", "bertinetto", "METAGRAD_CIFAR100", "cifar-100-python"),
        ("fc100", "oreshkin", "METAGRAD_CIFAR100", "cifar-100-python"),
    ],
)
def test_no_folder_and_an_empty_folder(capsys, tmp_path, bench, split, env, files):
    out = ["--out", str(tmp_path / "run")]
    one_line_error(capsys, _argv(bench, split, *out), "--data", env, files)
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, _argv(bench, split, "--data", str(tmp_path / "empty"), *out), files)
    assert not (tmp_path / "run").exists()


def test_malformed_files(capsys, roots, tmp_path):
    out = ["--out", str(tmp_path / "run")]
    bad = tmp_path / "bad-mini"
    bad.mkdir()
    for s in SPLITS:
        (bad / f"mini-imagenet-cache-{s}.pkl").write_bytes(b"not a pickle at all")
    one_line_error(capsys, _argv("mini-imagenet", "ravi", "--data", str(bad), *out), "image_data")
    (bad / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps({"image_data": [1, 2]}))
    one_line_error(capsys, _argv("mini-imagenet", "ravi", "--data", str(bad), *out), "class_dict")
    csv = tmp_path / "bad-csv"
    csv.mkdir()
    (csv / "train.csv").write_text("file,class\nx.jpg,n01\n")
    one_line_error(capsys, _argv("mini-imagenet", "ravi", "--data", str(csv), *out), "header")
    tiered = tmp_path / "bad-tiered"
    tiered.mkdir()
    for s in SPLITS:
        labels = (roots / "tiered" / f"{s}_labels.pkl").read_bytes()
        (tiered / f"{s}_labels.pkl").write_bytes(labels)
        (tiered / f"{s}_images_png.pkl").write_bytes(pickle.dumps([b"\x89PNG", b"junk"]))
    one_line_error(capsys, _argv("tiered-imagenet", "ren", "--data", str(tiered), *out), "items")
    cifar = tmp_path / "bad-cifar" / "cifar-100-python"
    cifar.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (cifar / name).write_bytes(b"\x80\x02garbage")
    one_line_error(
        capsys, _argv("cifar-fs", "bertinetto", "--data", str(cifar.parent), *out), "meta"
    )
    assert not (tmp_path / "run").exists()


def test_a_malicious_pickle_is_refused_and_never_run(capsys, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    for s in SPLITS:
        (evil / f"mini-imagenet-cache-{s}.pkl").write_bytes(pickle.dumps(Evil(marker)))
    argv = _argv("mini-imagenet", "ravi", "--data", str(evil), "--out", str(tmp_path / "run"))
    one_line_error(capsys, argv, "mini-imagenet-cache-train.pkl")
    assert not marker.exists()


def test_wrong_split_or_model_names_the_fix(capsys, roots, tmp_path):
    data = ["--data", str(roots / "mini"), "--out", str(tmp_path / "run")]
    one_line_error(capsys, _argv("mini-imagenet", "maml", *data), "'maml'", "--split ravi")
    one_line_error(capsys, _argv("cifar-fs", "ravi", *data), "--split bertinetto")
    argv = ["train", "--benchmark", "fc100", "--split", "oreshkin", *data]
    one_line_error(capsys, argv, "'mlp'", "conv4-mini", "resnet12")


def test_every_mini_imagenet_preset_names_its_source():
    names = [n for n in PRESETS if n.startswith("mini-imagenet-")]
    assert len(names) == 12
    for name in names:
        config, source = PRESETS[name].config, PRESETS[name].source
        assert config.data.benchmark == "mini-imagenet" and config.data.split == "ravi"
        assert config.model.arch == "conv4-mini" and config.data.ways == 5
        assert any(who in source for who in ("Finn", "Nichol", "Raghu", "Rajeswaran"))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("mini-imagenet-")])
def test_mini_imagenet_presets_train(tmp_path_factory, tmp_path, name):
    """Each preset as written (queries, shots, optimiser, schedule), two short steps; 3 ways, as
    the fixture's validation split has 3 classes, and one inner step to keep it short."""
    root = tmp_path_factory.getbasetemp() / "mini-20"
    if not root.exists():
        make_mini_pickles(root, per_class=20)  # 5-shot + 15 queries, Reptile's 15 + 1
    short = dict(steps=2, meta_batch=2, eval_tasks=4, val_tasks=4, log_every=1, threads=1)
    config = PRESETS[name].config.override(
        root=str(root), ways=3, inner_steps=1, eval_inner_steps=1, tensorboard=False, **short
    )
    test_support = 3 * (config.data.eval_shots or config.data.shots)
    if config.algo.eval_inner_batch_size:  # the paper's 5 is 5-way 1-shot's whole support set
        size = min(config.algo.eval_inner_batch_size, test_support)
        config = config.override(eval_inner_batch_size=size)
    result = train(config, tmp_path / "run", progress=False)
    assert result.step == 2 and 0 <= result.evaluation.accuracy <= 1
    assert all(v.isfinite().all() for v in result.params.values())
