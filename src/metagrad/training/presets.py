"""Presets: the papers' settings as named configurations, each with its source.

:data:`PRESET_TABLE` maps ``name -> (flat config overrides, source)``; the ``presets`` of every
entry of :data:`metagrad.algorithms.ALGORITHMS` join it (a name defined twice is an error), and
:data:`PRESETS` holds each as a :class:`Preset` with its :class:`~metagrad.training.Config`. A
source says which paper, section or table a number comes from, and says so where a number is not
stated there (assumed, or taken from the authors' released code).

>>> from metagrad.training import preset
>>> preset("sinusoid-maml").algo.inner_lr
0.01
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from metagrad.algorithms import ALGORITHMS
from metagrad.training.config import Config

MAML = "Finn, Abbeel & Levine 2017 (MAML)"
REPTILE = "Nichol, Achiam & Schulman 2018 (Reptile)"
IMAML = "Rajeswaran, Finn, Kakade & Levine 2019 (iMAML)"
ANIL = "Raghu, Raghu, Bengio & Vinyals 2020 (ANIL)"
LEAP = "Flennerhag, Moreno, Lawrence & Damianou 2019 (Leap)"
METASGD = "Li, Zhou, Chen & Li 2017 (Meta-SGD)"

SINUSOID: dict[str, Any] = dict(
    arch="mlp",
    benchmark="sinusoid",
    shots=10,
    queries=10,
    algorithm="maml",
    inner_lr=0.01,
    inner_steps=1,
    eval_inner_steps=10,
    optimizer="adam",
    outer_lr=1e-3,
    meta_batch=25,
    steps=70_000,
    log_every=100,
    eval_every=5000,
    checkpoint_every=1000,
    mode="vmap",  # the faster mode for this small MLP (docs/PERFORMANCE.md)
    threads=1,  # tiny ops lose more to thread hand-offs than they gain
)
SINUSOID_SOURCE = (
    f"{MAML}, Sec. 5.1 and App. A.1: K=10, inner lr 0.01, 1 step, meta-batch 25, Adam 1e-3; "
    "70,000 iterations from the authors' code; 10 test-time steps as in Fig. 3"
)

IMAML_RELEASED: dict[str, Any] = dict(lam=2.0, cg_steps=5, cg_damping=1.0, lam_damping=10.0)
"""iMAML's released code: lam 2, 5 CG steps, the CG system damped (``IMAML_DAMPING``)."""
IMAML_SINUSOID: dict[str, Any] = dict(algorithm="imaml", **IMAML_RELEASED)
IMAML_DAMPING = "cg_damping 1, lam_damping 10: (2 v + H v / 12) = grad L_q"

PRESET_TABLE: dict[str, tuple[dict[str, Any], str]] = {
    "quickstart": (
        {**SINUSOID, "steps": 4000, "log_every": 100, "eval_every": 0, "checkpoint_every": 1000},
        f"{SINUSOID_SOURCE}; shortened to 4,000 steps for a first run",
    ),
    "sinusoid-maml": (SINUSOID, SINUSOID_SOURCE),
    "sinusoid-fomaml": (
        {**SINUSOID, "algorithm": "fomaml"},
        f"{SINUSOID_SOURCE}; first-order (Sec. 5.2), no sinusoid number reported for it",
    ),
    "sinusoid-anil": (
        {**SINUSOID, "algorithm": "anil"},
        f"MAML sinusoid settings; {ANIL} report no sinusoid experiment (assumed)",
    ),
    "sinusoid-imaml-gd": (
        {**SINUSOID, **IMAML_SINUSOID, "inner_steps": 16, "inner_lr": 0.005},
        f"MAML sinusoid data and outer loop; {IMAML} report no sinusoid run: lam 2.0, 5 CG steps, "
        "16 inner GD steps taken from their Omniglot setting (assumed); the CG system damped as "
        f"in their released code ({IMAML_DAMPING}), without which it does not train here; inner "
        "lr 0.005, as 16 steps of 0.01 diverged on a task after 1,357 outer steps",
    ),
    "sinusoid-probabilistic-imaml": (
        {
            **SINUSOID,
            "algorithm": "probabilistic-imaml",
            "inner_steps": 16,
            "inner_lr": 0.005,
            "eval_inner_steps": None,
            "prior_std": 0.03,
            "learn_prior_std": "module",
            "posterior_samples": 4,
            "noise_std": 0.1,
            "cg_steps": 5,
            "cg_damping": 20.0,
        },
        f"{MAML} sinusoid data and outer loop; the proximal term of {IMAML} read as a prior; "
        "no published setting: the inner solver of sinusoid-imaml-gd (16 GD steps of 0.005, "
        "as many at test time), prior std 0.03 learned per module, likelihood noise 0.1 (so "
        "the proximal strength 1 / (w s^2) starts near iMAML's lam 2 at K = 10), 4 posterior "
        "samples, 5 CG steps damped by 20. Chosen by 1,500-step trials (K = 10, 200 test "
        "tasks): undamped and damped by 2 it did not train; 5 inner steps of 0.01 gave MSE "
        "1.15 and 35/72/77% coverage of the 50/90/95% intervals, these settings 0.85 and "
        "49/86/92% (both with 10 test-time steps)",
    ),
    "sinusoid-imaml-hf": (
        {**SINUSOID, **IMAML_SINUSOID, "inner": "newton-cg", "inner_steps": 3},
        f"MAML sinusoid data and outer loop; {IMAML} report no sinusoid run: lam 2.0, 5 CG steps, "
        f"3 Newton-CG steps (assumed); the CG system damped as in their released code "
        f"({IMAML_DAMPING})",
    ),
    "sinusoid-reptile": (
        {
            **SINUSOID,
            "algorithm": "reptile",
            "inner_lr": 0.02,
            "inner_steps": 5,
            "eval_inner_steps": 32,
            "optimizer": "sgd",
            "outer_lr": 0.1,
            "schedule": "linear",
            "meta_batch": 1,
            "steps": 30_000,
        },
        f"{REPTILE}, sine-wave demo released with the paper (uncertain): inner SGD lr 0.02, "
        "outer step 0.1 annealed linearly to 0, 1 task per step, 30,000 iterations, 32 "
        "test-time steps (Fig. 1). Two deviations, kept so that Reptile adapts on the same K = "
        "10 support points as the other sinusoid presets: the demo takes one epoch of SGD over "
        "mini-batches of 10 of 50 points per curve (5 steps), here 5 full-batch steps on the 10 "
        "support points; the demo's 1-64-64-1 tanh net is replaced by MAML's MLP",
    ),
    "sinusoid-leap": (
        {**SINUSOID, "algorithm": "leap", "inner_steps": 5},
        f"MAML sinusoid data and outer loop; {LEAP} report no sinusoid run: energy metric, loss "
        "term and stabiliser (their defaults), 5 inner steps (assumed)",
    ),
}

REPTILE_PAPER: dict[str, Any] = dict(
    algorithm="reptile",
    queries=1,
    inner="adam",
    inner_betas=(0.0, 0.999),
    eval_inner_steps=50,
    optimizer="sgd",
    outer_lr=1.0,
    schedule="linear",
    meta_batch=5,
)
"""What the Reptile paper's few-shot settings share (App. A, Table 3, and its released commands):
an Adam inner loop with beta1 0, 50 test-time steps, 1 query per class, meta step 1.0 annealed
linearly to 0 by SGD, meta-batch 5; each benchmark adds its shots, step sizes and batch sizes."""

OMNIGLOT: dict[str, Any] = dict(
    arch="conv4",
    benchmark="omniglot",
    split="maml",
    optimizer="adam",
    outer_lr=1e-3,
    log_every=100,
    eval_every=5000,
    checkpoint_every=1000,
)


METASGD_STEPS = {"inner_steps": 1, "eval_inner_steps": 1}
"""Meta-SGD adapts in one step with its learned step sizes, in training and at test time."""


IMAML_INNER_LR = 0.1
"""iMAML's inner GD step on Omniglot: the released code's 5-way 1-shot command (16 steps of 0.1,
lam 2). MAML's single step of 0.4, taken 16 times, kept 5-way 1-shot at chance (query loss 4.4
over 40 outer steps on meta-batches of 8; 0.1: 1.25 after 300). With the released code's CG
damping as well (``IMAML_DAMPING``): query loss 1.04 and test accuracy 65% after 150 steps,
against 1.29 and about 51% undamped."""


def _omniglot(ways: int, shots: int, algo: str) -> tuple[dict[str, Any], str]:
    five = ways == 5
    base = {**OMNIGLOT, "ways": ways, "shots": shots, "queries": shots, "steps": 60_000}
    maml = {
        "inner_lr": 0.4 if five else 0.1,
        "inner_steps": 1 if five else 5,
        "eval_inner_steps": 3 if five else 5,
        "meta_batch": 32 if five else 16,
    }
    maml_src = (
        f"{MAML}, Sec. 5.2 and App. A.1: inner lr {maml['inner_lr']}, {maml['inner_steps']} "
        f"step(s), {maml['eval_inner_steps']} at test time, meta-batch {maml['meta_batch']}, "
        "Adam 1e-3; 60,000 iterations, K query images per class and the 1200/423 split from "
        "the authors' code; results Table 1"
    )
    if algo in ("maml", "fomaml"):
        note = "" if algo == "maml" else "; first order, Omniglot results in Nichol et al. Table 1"
        return {**base, **maml, "algorithm": algo}, maml_src + note
    if algo == "metasgd":
        return (
            {**base, **maml, "algorithm": "maml", "learn_lr": "parameter", **METASGD_STEPS},
            f"{METASGD}: Conv4 and the Omniglot protocol of MAML, one inner step with a learned "
            f"step size per parameter entry (here started at MAML's {maml['inner_lr']}; the "
            "paper draws them from U[0.005, 0.1]), one step at test time; meta-batch "
            f"{maml['meta_batch']}, Adam 1e-3 and 60,000 iterations as MAML (uncertain); results "
            "Table 1 (99.53 / 99.93 / 95.93 / 98.97%, quoted from memory: check the paper)",
        )
    if algo == "anil":
        table = "Table 2 (20-way)" if not five else "5-way not reported, assumed"
        return (
            {**base, **maml, "algorithm": "anil", "head": ("head.",)},
            f"{ANIL}: MAML's hyper-parameters reused, head-only inner loop; {table}. {maml_src}",
        )
    if algo in ("reptile", "reptile-carried"):
        carried = algo == "reptile-carried"
        adam = (
            "Adam's moments and step count carried from task to task and into test time, as the "
            "released code's one Adam optimiser (the tasks of a meta-batch start from the same "
            "state: see metagrad.inner.Adam.carry)"
            if carried
            else "One difference: metagrad starts Adam's moments at zero for every task, the "
            "released code carries them across tasks"
        )
        return (
            {
                **base,
                **REPTILE_PAPER,
                **({"inner_carry": True} if carried else {}),
                "shots": 10,
                "eval_shots": shots,
                "inner_lr": 1e-3 if five else 5e-4,
                "inner_batch_size": 10 if five else 20,
                "eval_inner_batch_size": 5 if five else 10,
                "inner_steps": 5 if five else 10,
                "steps": 100_000 if five else 200_000,
            },
            f"{REPTILE}, App. A Table 3 and the released commands: Adam inner loop (beta1 0, lr "
            f"{'1e-3' if five else '5e-4'}) on mini-batches of {10 if five else 20} "
            f"({5 if five else 10} at test), "
            f"10 training shots, {5 if five else 10} inner steps (50 at test time), meta step 1.0 "
            f"annealed linearly to 0, meta-batch 5, {100 if five else 200}k iterations; results "
            f"Table 1. {adam}",
        )
    if algo == "probabilistic-imaml":
        prior = 0.005
        return (
            {
                **base,
                "algorithm": "probabilistic-imaml",
                "inner_steps": 16,
                "inner_lr": IMAML_INNER_LR,
                "eval_inner_steps": None,
                "prior_std": prior,
                "learn_prior_std": "module",
                "posterior_samples": 1,
                "nll_scale": 1 / (2.0 * prior**2),  # 1 / (lam s^2), iMAML's lam 2
                "cg_steps": 5,
                "cg_damping": 20.0,
                "meta_batch": maml["meta_batch"],
            },
            f"{IMAML}'s Omniglot setting (16 inner GD steps of {IMAML_INNER_LR}, 5 CG steps, "
            f"meta-batch {maml['meta_batch']}) with its proximal term read as a prior; no "
            f"published setting: prior std {prior} learned per module (a fifth of the initial "
            "std of the 64-channel convolutions' weights, torch's default 0.024, so sampled "
            "networks still classify), the likelihood tempered "
            "(nll_scale 1 / (lam s^2) with iMAML's lam 2, so the mean's proximal strength "
            "starts at iMAML's), 1 posterior sample per expected loss, CG damped by 20 as the "
            "sinusoid preset (chosen, not tuned)",
        )
    hf = algo == "imaml-hf"
    inner = {"inner": "newton-cg", "inner_steps": 3} if hf else {"inner_steps": 16}
    released = algo == "imaml-gd-released"
    loop = (
        f"; the released code's loop in place of the paper's proximal solve: the 16 steps on "
        f"the support loss alone, then one step of {IMAML_INNER_LR} on the proximal term "
        "(pullback), tested with the 16 plain steps (its lam 0 at test time); its outer Adam's "
        "eps 1e-3"
        if released
        else ""
    )
    return (
        {
            **base,
            "algorithm": "imaml",
            **inner,
            "inner_lr": IMAML_INNER_LR,
            "eval_inner_steps": None,
            **IMAML_RELEASED,
            **({"pullback": IMAML_INNER_LR, "adam_eps": 1e-3} if released else {}),
            "meta_batch": maml["meta_batch"],
        },
        f"{IMAML}, Sec. 5 and App.: 5 CG steps damped as the released code ({IMAML_DAMPING}), "
        + ("3 Newton-CG inner steps (assumed)" if hf else "16 inner GD steps")
        + f", lam 2.0 and inner lr {IMAML_INNER_LR} (the released code's 5-way 1-shot command; "
        f"per-setting values uncertain), meta-batch {maml['meta_batch']} as MAML (assumed), "
        f"60,000 iterations (assumed); results Table 2{loop}",
    )


for _ways, _shots in ((5, 1), (5, 5), (20, 1), (20, 5)):
    for _algo in (
        "maml", "fomaml", "reptile", "reptile-carried", "imaml-gd", "imaml-gd-released",
        "imaml-hf", "anil", "metasgd", "probabilistic-imaml",
    ):  # fmt: skip
        PRESET_TABLE[f"omniglot-{_ways}w{_shots}s-{_algo}"] = _omniglot(_ways, _shots, _algo)

PRESET_TABLE["leap-omniglot"] = (
    {
        **OMNIGLOT,
        "benchmark": "omniglot-alphabets",
        "split": "lake",
        "ways": 20,
        "shots": 15,
        "queries": 5,
        "train_alphabets": 25,
        "algorithm": "leap",
        "leap_metric": "energy",
        "loss_term": True,
        "stabilizer": True,
        "inner_lr": 0.1,
        "inner_steps": 100,
        "eval_inner_steps": 100,
        "optimizer": "sgd",
        "outer_lr": 0.1,
        "meta_batch": 25,
        "steps": 1000,
        "eval_every": 100,
        "checkpoint_every": 50,
        "log_every": 10,
    },
    f"{LEAP}, Sec. 4.1 and App. C: one 20-way task per alphabet, up to 25 training alphabets and "
    "10 held out, 100 inner steps, energy metric with loss term and stabiliser; inner lr 0.1, "
    "outer SGD lr 0.1, 1,000 meta steps and the 15/5 train/test drawings per character are "
    "uncertain (check against the paper before quoting)",
)

# mini-ImageNet 5-way 1/5-shot (issue 19) ---------------------------------------------------------

MINI_IMAGENET: dict[str, Any] = dict(
    arch="conv4-mini",  # MAML Sec. 5.2: 32 filters per layer, 2x2 max-pooling
    benchmark="mini-imagenet",
    split="ravi",
    ways=5,
    queries=15,
    optimizer="adam",
    outer_lr=1e-3,
    log_every=100,
    eval_every=5000,
    checkpoint_every=1000,
)
_REPTILE_TABLE = "mini-ImageNet results table, Reptile + transduction (table number uncertain)"
MINI_IMAGENET_PUBLISHED: dict[str, tuple[float, float, str, bool]] = {
    "mini-imagenet-5w1s-maml": (48.70, 1.84, f"{MAML}, Table 1", True),
    "mini-imagenet-5w5s-maml": (63.11, 0.92, f"{MAML}, Table 1", True),
    "mini-imagenet-5w1s-fomaml": (48.07, 1.75, f"{MAML}, Table 1 (first order)", True),
    "mini-imagenet-5w5s-fomaml": (63.15, 0.91, f"{MAML}, Table 1 (first order)", True),
    "mini-imagenet-5w1s-reptile": (49.97, 0.32, f"{REPTILE}, {_REPTILE_TABLE}", True),
    "mini-imagenet-5w5s-reptile": (65.99, 0.58, f"{REPTILE}, {_REPTILE_TABLE}", True),
    "mini-imagenet-5w1s-anil": (46.7, 0.4, f"{ANIL}, Table 2 (uncertain)", False),
    "mini-imagenet-5w5s-anil": (61.5, 0.5, f"{ANIL}, Table 2 (uncertain)", False),
    "mini-imagenet-5w1s-imaml-hf": (49.30, 1.88, f"{IMAML}, Table 3 (uncertain)", False),
    "mini-imagenet-5w1s-imaml-gd": (48.96, 1.84, f"{IMAML}, Table 3 (uncertain)", False),
}
"""Published 5-way test accuracy (%) of a mini-ImageNet preset: ``(mean, 95% CI, source,
sure)``; ``sure`` is ``False`` where the number was not checked against the paper. A preset
that is missing has no published number (iMAML reports no 5-shot result)."""


def _published(name: str) -> str:
    if name not in MINI_IMAGENET_PUBLISHED:
        return "no published mini-ImageNet number for this setting"
    mean, ci, where, _ = MINI_IMAGENET_PUBLISHED[name]
    return f"published {mean:g} ± {ci:g}% ({where})"


def _mini_imagenet(shots: int, algo: str) -> tuple[dict[str, Any], str]:
    name = f"mini-imagenet-5w{shots}s-{algo}"
    base = {**MINI_IMAGENET, "shots": shots, "steps": 60_000}
    maml = {
        "inner_lr": 0.01,
        "inner_steps": 5,
        "eval_inner_steps": 10,
        "meta_batch": 4 if shots == 1 else 2,
    }
    maml_src = (
        f"{MAML}, Sec. 5.2 and App. A.1: 32 filters, inner lr 0.01, 5 steps (10 at test time), "
        f"meta-batch {maml['meta_batch']}, 15 queries per class, Adam 1e-3, 60,000 iterations"
    )
    if algo in ("maml", "fomaml"):
        return {**base, **maml, "algorithm": algo}, f"{maml_src}; {_published(name)}"
    if algo == "anil":
        return (
            {**base, **maml, "algorithm": "anil", "head": ("head.",)},
            f"{ANIL}: MAML's mini-ImageNet settings reused (uncertain), head-only inner loop. "
            f"{maml_src}; {_published(name)}",
        )
    if algo == "reptile":
        return (
            {
                **base,
                **REPTILE_PAPER,
                "shots": 15,
                "eval_shots": shots,
                "inner_lr": 1e-3,
                "inner_batch_size": 10,
                "eval_inner_batch_size": 5 if shots == 1 else 15,
                "inner_steps": 8,
                "steps": 100_000,
            },
            f"{REPTILE}, App. A Table 3 and the released transductive mini-ImageNet commands: "
            "Adam inner loop (lr 1e-3, beta1 0) on mini-batches of 10 (at test time "
            f"{5 if shots == 1 else 15}; the 5-shot value is recalled from the released "
            "commands, uncertain), 15 training shots, 8 inner steps (50 at test time), meta step "
            "1.0 annealed linearly to 0, meta-batch 5, 100,000 iterations, 1 query per class "
            f"(the released code's evaluation); {_published(name)}. metagrad starts Adam's "
            "moments at zero for every task (the released code carries them across tasks), and "
            "its batch norm uses each batch's statistics, so its evaluation is transductive too",
        )
    hf = algo == "imaml-hf"
    inner = {"inner": "newton-cg", "inner_steps": 3} if hf else {"inner_steps": 16}
    return (
        {
            **base,
            "algorithm": "imaml",
            **inner,
            "inner_lr": 0.01,
            "eval_inner_steps": None,
            "lam": 2.0,
            "cg_steps": 5,
            "meta_batch": maml["meta_batch"],
        },
        f"{IMAML}, Sec. 5: 5 CG steps, "
        + ("3 Newton-CG inner steps" if hf else "16 inner GD steps")
        + ", lam 2.0 (their Omniglot value; the mini-ImageNet settings are uncertain), inner lr "
        "0.01, meta-batch and 60,000 iterations as MAML (assumed); " + _published(name),
    )


for _shots in (1, 5):
    for _algo in ("maml", "fomaml", "anil", "reptile", "imaml-gd", "imaml-hf"):
        PRESET_TABLE[f"mini-imagenet-5w{_shots}s-{_algo}"] = _mini_imagenet(_shots, _algo)


@dataclass(frozen=True)
class Preset:
    """A named configuration and where its numbers come from (paper, section or table)."""

    name: str
    config: Config
    source: str


def _merged() -> dict[str, tuple[Mapping[str, Any], str]]:
    """The table and every algorithm's registered presets; ``ValueError`` for a repeated name.

    An algorithm's preset runs that algorithm unless its overrides name another.
    """
    table: dict[str, tuple[Mapping[str, Any], str]] = dict(PRESET_TABLE)
    for entry in ALGORITHMS.entries():
        for name, (changes, source) in entry.presets.items():
            if name in table:
                raise ValueError(
                    f"preset {name!r} of algorithm {entry.name!r} is already defined: rename it"
                )
            table[name] = ({"algorithm": entry.name, **changes}, source)
    return table


PRESETS: dict[str, Preset] = {
    name: Preset(name, Config(preset=name).override(**changes), source)
    for name, (changes, source) in _merged().items()
}
DEFAULT_PRESET = "quickstart"


def preset(name: str) -> Config:
    """The configuration of a named preset; ``ValueError`` names the closest ones if unknown."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "`metagrad presets` lists them"
        raise ValueError(f"unknown preset {name!r}: {hint}")
    return PRESETS[name].config
