"""Config dataclasses and presets: the papers' numbers, round trips, validation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from metagrad.training import PRESETS, SECTIONS, Config, field_section, preset

ALGOS = ("maml", "fomaml", "reptile", "imaml-gd", "imaml-hf", "anil")


def test_every_named_preset_exists_with_a_source():
    expected = {f"sinusoid-{a}" for a in ("maml", "fomaml", "reptile", "imaml-gd", "imaml-hf")}
    expected |= {"sinusoid-anil", "sinusoid-leap", "leap-omniglot", "quickstart"}
    expected |= {f"omniglot-{s}-{a}" for s in ("5w1s", "5w5s", "20w1s", "20w5s") for a in ALGOS}
    assert expected <= set(PRESETS)
    for name, p in PRESETS.items():
        assert p.name == name and p.config.preset == name
        assert any(year in p.source for year in ("2017", "2018", "2019", "2020")), name


def test_maml_presets_carry_the_papers_numbers():
    s = preset("sinusoid-maml")
    assert (s.data.shots, s.algo.inner_lr, s.algo.inner_steps) == (10, 0.01, 1)
    assert (s.optim.meta_batch, s.optim.optimizer, s.optim.outer_lr, s.optim.steps) == (
        25,
        "adam",
        1e-3,
        70_000,
    )
    for shots in (1, 5):
        five = preset(f"omniglot-5w{shots}s-maml")
        assert (five.data.ways, five.data.shots) == (5, shots)
        assert (five.algo.inner_lr, five.algo.inner_steps, five.algo.eval_inner_steps) == (
            0.4,
            1,
            3,
        )
        assert five.optim.meta_batch == 32
        twenty = preset(f"omniglot-20w{shots}s-maml")
        assert (twenty.algo.inner_steps, twenty.algo.eval_inner_steps) == (5, 5)
        assert twenty.optim.meta_batch == 16 and twenty.data.ways == 20


def test_algorithm_presets_pick_their_estimator():
    assert preset("omniglot-5w1s-imaml-hf").algo.inner == "newton-cg"
    gd = preset("omniglot-5w1s-imaml-gd").algo
    assert (gd.algorithm, gd.inner, gd.inner_steps, gd.cg_steps) == ("imaml", "gd", 16, 5)
    reptile = preset("omniglot-5w1s-reptile")
    assert reptile.optim.schedule == "linear" and reptile.optim.optimizer == "sgd"
    assert preset("omniglot-20w1s-fomaml").algo.algorithm == "fomaml"
    assert preset("leap-omniglot").data.benchmark == "omniglot-alphabets"
    for ways, shots, lr in ((5, 1, 0.4), (5, 5, 0.4), (20, 1, 0.1), (20, 5, 0.1)):
        m = preset(f"omniglot-{ways}w{shots}s-metasgd").algo
        assert (m.algorithm, m.learn_lr, m.inner_lr) == ("maml", "parameter", lr)
        assert m.inner_steps == m.eval_inner_steps == 1, "one step, as it trains"


def test_imaml_damping_reaches_the_estimator():
    from metagrad.training import build_estimator, build_model

    config = preset("sinusoid-imaml-gd").override(cg_damping=1.0, lam_damping=10.0)
    est = build_estimator(config, build_model(config))
    assert (est.lam, est.cg_damping, est.lam_damping) == (config.algo.lam, 1.0, 10.0)
    omniglot = preset("omniglot-5w1s-imaml-gd")  # damped as the released iMAML code
    released = build_estimator(omniglot, build_model(omniglot))
    assert (released.cg_damping, released.lam_damping) == (1.0, 10.0)
    paper = omniglot.override(cg_damping=0.0, lam_damping=0.0)  # the paper's undamped system
    undamped = build_estimator(paper, build_model(paper))
    assert (undamped.cg_damping, undamped.lam_damping) == (0.0, 0.0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    config = PRESETS[name].config
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_field_names_are_unique_across_sections():
    names = [f.name for kind in SECTIONS.values() for f in dataclasses.fields(kind)]
    assert len(names) == len(set(names))
    assert field_section("inner_steps") == "algo" and field_section("ways") == "data"


def test_override_replaces_fields_in_any_section():
    c = preset("omniglot-20w1s-maml").override(steps=2000, meta_batch=8, inner_steps=2, seed=3)
    assert (c.optim.steps, c.optim.meta_batch, c.algo.inner_steps, c.run.seed) == (2000, 8, 2, 3)
    assert c.data == preset("omniglot-20w1s-maml").data


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"ways": 0}, "ways"),
        ({"shots": -1}, "shots"),
        ({"inner_lr": 0.0}, "inner_lr"),
        ({"lam": -1.0}, "lam"),
        ({"cg_damping": -1.0}, "cg_damping"),
        ({"lam_damping": -0.5}, "lam_damping"),
        ({"meta_batch": 0}, "meta_batch"),
        ({"log_every": 0}, "log_every"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"arch": "conv4"}, "conv4"),
        ({"inner": "no-such-solver"}, "no-such-solver"),
        ({"truncate": 2}, "truncate"),  # quickstart has 1 inner step
        ({"posterior_samples": 0}, "posterior_samples"),
        ({"prior_std": 0.0}, "prior_std"),
    ],
)
def test_bad_settings_raise_value_error_naming_them(changes, named):
    with pytest.raises(ValueError, match=named):
        preset("quickstart").override(**changes)


def test_every_inner_solver_fits_every_algorithm():
    """MAML differentiates through any solver; the others run it on their own inner problem."""
    from metagrad.algorithms import ALGORITHMS
    from metagrad.inner import INNER_SOLVERS

    for algorithm in ALGORITHMS:
        for inner in INNER_SOLVERS:
            config = preset("quickstart").override(algorithm=algorithm, inner=inner)
            assert (config.algo.algorithm, config.algo.inner) == (algorithm, inner)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ValueError, match="omniglot-5w1s-maml"):
        preset("omniglot-5w1s-mam")


def test_from_dict_rejects_unknown_keys():
    data = Config().to_dict()
    data["algo"]["wat"] = 1
    with pytest.raises(ValueError, match="wat"):
        Config.from_dict(data)
