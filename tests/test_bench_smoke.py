"""The benchmark scripts run in their quick mode and their float64 agreement check passes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: two threads can be many times slower
    yield
    torch.set_num_threads(threads)


def test_quick_run_and_check(one_thread, capsys):
    bench = _load("bench_meta")
    impls = "maml,user-maml,plain,plain-mg-conv4"
    assert bench.main(["--quick", "--impls", impls, "--threads", "1"]) == 0  # the check passes
    out = capsys.readouterr().out
    assert "| maml |" in out and "| plain |" in out and "| user-maml |" in out
    assert "user-maml / maml (wall, median): " in out


def test_the_user_defined_maml_is_maml(one_thread):
    """The benchmark's user-written MAML, in float64, against the plain autograd loop."""
    bench = _load("bench_meta")
    errors = bench.check(bench.CONFIGS["quick"], ["user-maml", "user-maml-serial", "maml"])
    assert set(errors) == {"user-maml", "user-maml-serial", "maml"}
    assert all(e < 1e-10 for e in errors.values()), errors


def test_vmap_variant_is_maml(one_thread):
    """``maml-vmap`` (the tasks batched by ``mode="vmap"``) in float64 against the plain loop."""
    bench = _load("bench_meta")
    assert bench.split_variant("maml-vmap") == ("maml", "-vmap")
    assert bench.split_variant("maml-serial") == ("maml", "-serial")
    assert bench.split_variant("plain") == ("plain", "")
    errors = bench.check(bench.CONFIGS["quick"], ["maml-vmap", "plain"])
    assert errors["plain"] == 0.0 and errors["maml-vmap"] < 1e-10, errors


def test_trained_configs_are_the_maml_presets_shapes():
    """``--configs trained``: each Omniglot MAML preset's ways, shots, queries, meta-batch, inner
    steps and step size (5-way 1-shot: meta-batch 32, one step of 0.4, 1 query per class)."""
    from metagrad.training import preset

    bench = _load("bench_meta")
    assert len(bench.TRAINED_CONFIGS) == 4
    for name in bench.TRAINED_CONFIGS:
        cfg = bench.CONFIGS[name]
        p = preset(f"omniglot-{cfg.ways}w{cfg.shots}s-maml")
        assert (cfg.ways, cfg.shots, cfg.queries) == (p.data.ways, p.data.shots, p.data.queries)
        assert (cfg.tasks, cfg.steps, cfg.lr) == (
            p.optim.meta_batch,
            p.algo.inner_steps,
            p.algo.inner_lr,
        )
        assert (cfg.arch, cfg.channels, cfg.size) == ("conv4", 1, 28)
    assert bench.CONFIGS["5w1s-b32-s1-q1"].queries == 1


def test_time_to_target_from_a_metrics_log(tmp_path, one_thread, capsys):
    """The first validated step at or above the target, times each median step time."""
    bench = _load("bench_meta")
    log = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 100, "query_loss": 1.0},
        {"step": 500, "val_accuracy": 0.91},
        {"step": 1000, "val_accuracy": 0.965},
        {"step": 1500, "val_accuracy": 0.972},
        {"step": 2000, "val_accuracy": 0.969},
    ]
    log.write_text("".join(bench.json.dumps(r) + "\n" for r in rows))
    assert bench.steps_to(str(log), 0.97) == 1500
    assert bench.steps_to(str(log), 0.91) == 500
    assert bench.steps_to(str(log), 0.99) is None
    times = {"a": {"wall": [0.2, 0.4, 0.2]}, "b": {"wall": [0.6]}}
    table = bench.time_to(times, 1500, 0.97)
    assert "| a | 5.00 | 5.0 |" in table and "| b | 1.67 | 15.0 |" in table  # 1500 x 0.2 s
    assert "| a | 5.00 | not reached |" in bench.time_to(times, None, 0.99)
    argv = ["--quick", "--impls", "plain", "--no-check", "--curve", str(tmp_path / "none.jsonl")]
    assert bench.main(argv) == 2
    assert bench.main(["--quick", "--impls", "plain", "--no-check", "--curve", str(log)]) == 0
    assert "Time to 97% validation accuracy: 1500 outer steps" in capsys.readouterr().out


def test_check_catches_a_wrong_meta_gradient(one_thread, monkeypatch):
    bench = _load("bench_meta")
    cfg = bench.CONFIGS["quick"]
    honest = bench.make

    def wrong(name, *args):
        run, params = honest(name, *args)
        return (lambda: [g * 1.001 for g in run()]) if name == "maml" else run, params

    monkeypatch.setattr(bench, "make", wrong)
    errors = bench.check(cfg, ["maml", "plain"])
    assert errors["plain"] == 0.0 and errors["maml"] > 1e-4


@pytest.mark.slow
def test_quick_run_of_every_implementation_with_memory(one_thread, capsys):
    bench = _load("bench_meta")
    assert bench.main(["--quick", "--threads", "1", "--memory"]) == 0  # the check passes too
    out = capsys.readouterr().out
    for name in bench.available(bench.IMPLS):
        assert f"| {name} |" in out


@pytest.mark.slow
def test_memory_script_quick(one_thread, capsys):
    memory = _load("bench_memory")
    args = ["--steps", "1,2", "--impls", "imaml-gd", "--ways", "3", "--shots", "1", "--tasks", "1"]
    assert memory.main([*args, "--threads", "1"]) == 0
    assert "| 2 |" in capsys.readouterr().out


def test_flop_count_matches_the_closed_form(one_thread):
    """First-order MAML, one step: a forward and a backward pass over every support and query
    image. Per image, a 3x3 convolution costs 2 * c_in * c_out * 9 * h_out * w_out forward and
    twice that backward (input and weight gradients), except the first, whose input needs none."""
    bench = _load("bench_meta")
    cfg = bench.CONFIGS["quick"]
    convs = [2 * c_in * 64 * 9 * h * h for c_in, h in [(1, 14), (64, 7), (64, 4), (64, 2)]]
    head = 2 * 256 * cfg.ways
    per_image = sum(convs) + head + convs[0] + 2 * sum(convs[1:]) + 2 * head
    images = cfg.tasks * cfg.ways * (cfg.shots + cfg.queries)
    assert bench.flops(cfg, "fomaml") == per_image * images


def test_kernel_script_quick(one_thread, capsys):
    kernels = _load("bench_kernels")
    assert kernels.main(["--quick", "--impls", "maml"]) == 0
    out = capsys.readouterr().out
    assert "| 2 | 64x14x14 -> 64x7x7 |" in out and "| quick | maml |" in out


def test_data_script_quick(one_thread, capsys):
    """The data benchmark's synthetic sampling row, with its claim (not asserted: a speed)."""
    data = _load("bench_data")
    assert data.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "synthetic 5-way 1-shot, 15 queries" in out and ">= 10,000 tasks/min" in out


def test_mini_imagenet_shapes_quick(one_thread, capsys):
    """The mini-ImageNet Conv4 and a small ResNet-12 config: the float64 check passes."""
    bench = _load("bench_meta")
    argv = ["--configs", "quick-mini,quick-resnet12", "--impls", "maml,plain", "--reps", "1"]
    assert bench.main([*argv, "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "conv4-mini on 3x84x84" in out and "resnet12 (4, 8, 8, 16) on 3x84x84" in out
    assert out.count("| maml |") == 2 and out.count("| plain |") == 2


def test_mini_imagenet_configs_are_its_shapes(one_thread):
    """The mini-* configs hold MAML's mini-ImageNet settings; the plain-PyTorch Conv4 that the
    other libraries run computes the same function as metagrad's ``conv4-mini``."""
    bench = _load("bench_meta")
    for name, (shots, tasks) in {"5w1s-b4-s5": (1, 4), "5w5s-b2-s5": (5, 2)}.items():
        for arch, key in (("conv4-mini", f"mini-{name}"), ("resnet12", f"mini-resnet12-{name}")):
            cfg = bench.CONFIGS[key]
            assert (cfg.arch, cfg.ways, cfg.shots, cfg.tasks) == (arch, 5, shots, tasks)
            assert (cfg.steps, cfg.channels, cfg.size, cfg.queries, cfg.lr) == (5, 3, 84, 15, 0.01)
    cfg = bench.CONFIGS["mini-5w1s-b4-s5"]
    task = bench.make_tasks(bench.dataclasses.replace(cfg, tasks=1), torch.float64)
    assert task.support.x.shape == (1, 5, 3, 84, 84) and task.query.x.shape == (1, 75, 3, 84, 84)
    init = bench.initial(cfg, torch.float64)
    ours = bench.load(bench.mg_model(cfg).double(), init)
    theirs = bench.load(bench.standard_conv4_mini(5).double(), init)
    x = task.query.x[0]
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    resnet = bench.mg_model(bench.CONFIGS["mini-resnet12-5w1s-b4-s5"])
    widths = [m.out_channels for m in resnet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(set(widths)) == [64, 160, 320, 640]
