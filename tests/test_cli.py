"""The command line: flags generated from the config, and user mistakes as one line on stderr."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import torch

from metagrad import cli
from metagrad.training import PRESETS, SECTIONS

TINY = ["--steps", "3", "--meta-batch", "2", "--eval-tasks", "10", "--no-tensorboard"]


def _other_value(field: dataclasses.Field, hint: object) -> tuple[list[str], object]:
    """Command-line words that set ``field`` to a non-default value, and that value."""
    flag = "--" + (field.metadata.get("flag") or field.name).replace("_", "-")
    default, choices = field.default, field.metadata.get("choices")
    if typing.get_origin(hint) is tuple:
        values = ("a.", "b.") if typing.get_args(hint)[0] is str else (0.25, 0.5)
        return [flag, *map(str, values)], values
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if base[0] is bool:
        return ([flag.replace("--", "--no-")] if default else [flag]), not default
    if choices:
        value = next(c for c in choices if c != default)
        return [flag, value], value
    if base[0] is int:
        value = 7 if default != 7 else 8
    elif base[0] is float:
        value = 0.25
    else:
        value = "some/where"
    return [flag, str(value)], value


def test_every_config_field_is_a_flag():
    for kind in SECTIONS.values():
        hints = typing.get_type_hints(kind)
        for field in dataclasses.fields(kind):
            words, value = _other_value(field, hints[field.name])
            args = cli.parser().parse_args(["train", *words])
            assert cli._config_changes(args) == {field.name: value}, words


def test_flags_reach_the_config():
    args = cli.parser().parse_args(
        ["train", "--ways", "20", "--inner-steps", "5", "--no-loss-term"]
    )
    config = PRESETS["omniglot-5w1s-maml"].config.override(**cli._config_changes(args))
    assert (config.data.ways, config.algo.inner_steps, config.algo.loss_term) == (20, 5, False)


def test_presets_lists_every_preset_with_its_source(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, p in PRESETS.items():
        assert name in out and p.source[:40] in out.replace("\n    ", " ")
    assert "Finn" in out and "Nichol" in out and "Rajeswaran" in out and "Flennerhag" in out
    assert cli.main(["presets", "omniglot-20w5s-maml"]) == 0
    assert "--inner-steps" in capsys.readouterr().out


def _one_line_error(capsys, argv: list[str], *expected: str) -> str:
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status != 0, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("metagrad: training")]
    assert len(lines) == 1 and lines[0].startswith("metagrad: error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--preset", "omniglot-5w1s-mamll"], ["omniglot-5w1s-maml"]),
        (["train", "--ways", "0"], ["ways", "0"]),
        (["train", "--ways", "many"], ["--ways", "many"]),
        (["train", "--bogus"], ["--bogus"]),
        (["train", "--device", "tpu"], ["tpu"]),
        (["train", "--resume", "x", "--preset", "quickstart"], ["--resume"]),
        (["eval"], ["run"]),
        (["train", "--adam-eps", "0"], ["adam_eps", "positive"]),
        (["train", "--preset", "sinusoid-reptile", "--adam-eps", "1e-3"], ["--adam-eps", "sgd"]),
    ],
)
def test_usage_mistakes(capsys, argv, expected):
    _one_line_error(capsys, argv, *expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(capsys, tmp_path):
    _one_line_error(
        capsys, ["train", *TINY, "--device", "cuda", "--out", str(tmp_path / "r")], "cuda"
    )


def test_missing_data_folder(capsys, tmp_path):
    argv = ["train", "--preset", "omniglot-5w1s-maml", "--data", str(tmp_path / "nowhere")]
    argv += ["--out", str(tmp_path / "run")]
    _one_line_error(capsys, argv, "nowhere")
    assert not (tmp_path / "run").exists()


def test_resuming_a_folder_without_a_run(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--resume", str(tmp_path)], str(tmp_path), "no metagrad run")
    _one_line_error(capsys, ["eval", str(tmp_path)], "no metagrad run")


def test_out_folder_holding_a_run_or_files_is_never_overwritten(capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    other = ["train", "--preset", "sinusoid-fomaml", *TINY, "--out", str(run)]
    _one_line_error(capsys, other, "already holds a run", "--resume")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    _one_line_error(capsys, ["train", *TINY, "--out", str(full)], "not an empty folder")
    assert [p.name for p in full.iterdir()] == ["notes.txt"]
    _one_line_error(capsys, ["train", "--resume", str(run), "--inner-lr", "0.5"], "inner_lr")


def test_eval_writes_json_into_the_run(capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--tasks", "20", "--split", "val"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval_val.json").read_text())
    assert result["tasks"] == 20 and result["split"] == "val" and result["step"] == 3
    assert f"{result['loss']:.3f}" in out
    _one_line_error(capsys, ["eval", str(run), "--lake-runs", str(tmp_path)], "20-way")


def test_entry_point_prints_one_line(run_metagrad):
    done = run_metagrad("train", "--preset", "no-such-preset")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "metagrad: error: unknown preset 'no-such-preset': `metagrad presets` lists them"
    ]
