"""Run configuration: frozen dataclasses, one per concern.

A :class:`Config` holds everything a run needs; ``metagrad train`` builds one from a preset (see
:mod:`metagrad.training.presets`) and flags (one flag per field, generated from these
dataclasses), and ``config.json`` in the run folder is ``config.to_dict()``. Field names are
unique across the sections, so a flat override ``config.override(ways=20, inner_steps=5)`` is
unambiguous. The choices of the names (algorithm, inner solver, architecture, benchmark, batching
mode) come from the registries.

>>> from metagrad.training import preset
>>> cfg = preset("omniglot-20w1s-maml").override(steps=2000)
>>> cfg.algo.inner_steps, cfg.optim.meta_batch, cfg.optim.steps
(5, 16, 2000)
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from metagrad.algorithms import ALGORITHMS, MODES
from metagrad.data import BENCHMARKS
from metagrad.inner import INNER_SOLVERS
from metagrad.models import MODELS


def _f(default: Any, help: str, choices: tuple | None = None, flag: str | None = None) -> Any:
    """A field whose metadata carries the flag's help text, choices and (optionally) its name."""
    meta = {"help": help, "choices": choices, "flag": flag}
    return field(default=default, metadata=meta)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def fitting_archs(benchmark: str) -> tuple[str, ...]:
    """The models of ``MODELS`` that fit ``benchmark``: its entry's ``archs``, else (a classifier)
    every model that no regression benchmark lists as its own."""
    entry = BENCHMARKS[benchmark]
    if "archs" in entry.extra:
        return tuple(entry.extra["archs"])
    regression = {
        a
        for e in BENCHMARKS.entries()
        if e.extra.get("loss") == "mse"
        for a in e.extra.get("archs", ())
    }
    return tuple(a for a in MODELS.names() if a not in regression)


def _split_protocols() -> tuple[str, ...]:
    """Every class-split protocol that some benchmark knows (its entry's ``splits``)."""
    found = (s for e in BENCHMARKS.entries() for s in e.extra.get("splits", ()))
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True)
class ModelConfig:
    """The network, from ``metagrad.models.MODELS``; its input and output shapes come from the
    benchmark."""

    arch: str = _f("mlp", "network", MODELS.names())

    def __post_init__(self) -> None:
        MODELS.get(self.arch)  # ValueError naming the choices


@dataclass(frozen=True)
class DataConfig:
    """The task distribution and the few-shot protocol."""

    benchmark: str = _f("sinusoid", "task family", BENCHMARKS.names())
    root: str | None = _f(
        None, "data folder (default: the benchmark's variable, $METAGRAD_OMNIGLOT)", flag="data"
    )
    split: str = _f("maml", "class split protocol", _split_protocols())
    split_seed: int = _f(0, "seed of the random 'maml' split (fixed, so runs share test classes)")
    ways: int = _f(5, "classes per task (Omniglot)")
    shots: int = _f(10, "support examples per class (per task for sinusoid) while training")
    queries: int = _f(10, "query examples per class (per task for sinusoid)")
    eval_shots: int | None = _f(None, "support examples at evaluation (default: shots)")
    rotations: bool | None = _f(None, "rotated classes (default: the split's published choice)")
    train_alphabets: int = _f(25, "alphabets to meta-train on (omniglot-alphabets)")

    def __post_init__(self) -> None:
        BENCHMARKS.get(self.benchmark)
        for name in ("ways", "shots", "queries", "train_alphabets"):
            value = getattr(self, name)
            _check(value >= 1, f"{name} must be a positive integer, got {value}")
        _check(
            self.eval_shots is None or self.eval_shots >= 1,
            f"eval_shots must be a positive integer, got {self.eval_shots}",
        )


@dataclass(frozen=True)
class AlgoConfig:
    """The meta-gradient estimator and its inner solver."""

    algorithm: str = _f("maml", "meta-learning algorithm", ALGORITHMS.names())
    inner: str = _f("gd", "inner solver", INNER_SOLVERS.names())
    inner_lr: float = _f(0.01, "inner step size (learning rate of the inner solver)")
    inner_steps: int = _f(1, "inner steps while meta-training")
    eval_inner_steps: int | None = _f(None, "inner steps at test time (default: inner_steps)")
    newton_cg_steps: int = _f(5, "CG steps per Newton step of the newton-cg inner solver")
    inner_momentum: float = _f(0.9, "momentum and nesterov inner solvers: the momentum")
    inner_betas: tuple[float, float] = _f((0.9, 0.999), "adam inner solver: beta1 and beta2")
    inner_carry: bool = _f(
        False,
        "Reptile: carry the inner solver's state (adam's moments) from task to task and into "
        "test time, as one optimiser for all tasks (the Reptile paper's released code)",
    )
    inner_batch_size: int | None = _f(
        None, "inner mini-batch size, where the solver takes one (default: the support set)"
    )
    eval_inner_batch_size: int | None = _f(
        None, "inner mini-batch size at test time (default: inner_batch_size)"
    )
    truncate: int | None = _f(
        None, "MAML: differentiate through the last N inner steps only (0: FOMAML; default: all)"
    )
    checkpoint_inner: bool = _f(
        False, "MAML: keep only each inner step's parameters, recompute its forward backwards"
    )
    learn_lr: str | None = _f(
        None,
        "MAML, ANIL: learn the inner step sizes, per parameter entry (Meta-SGD) or per tensor "
        "and step (MAML++)",
        ("parameter", "layer-step"),
    )
    lam: float = _f(2.0, "iMAML proximal regularisation strength")
    cg_steps: int = _f(5, "iMAML conjugate-gradient steps for the meta-gradient")
    cg_damping: float = _f(0.0, "iMAML: c in (1 + c) v + H v / (lam + d) = g (0: paper)")
    lam_damping: float = _f(0.0, "iMAML: d in (1 + c) v + H v / (lam + d) = g (0: paper)")
    learn_lam: str | None = _f(
        None, "iMAML: learn lam too, one for all or one per module", ("global", "module")
    )
    pullback: float | None = _f(
        None,
        "iMAML: the released code's inner loop, the inner steps on the support loss alone, "
        "then one step of this size on the proximal term; tested without it (None: solve "
        "the proximal problem, the paper)",
    )
    prior_std: float = _f(0.1, "probabilistic-imaml: the prior's std s (its start if learned)")
    learn_prior_std: str | None = _f(
        "global",
        "probabilistic-imaml: learn log s, one for all or one per module",
        ("global", "module"),
    )
    posterior_samples: int = _f(8, "probabilistic-imaml: posterior samples per expected loss")
    noise_std: float = _f(1.0, "probabilistic-imaml: the Gaussian likelihood's noise (regression)")
    nll_scale: float | None = _f(
        None,
        "probabilistic-imaml: the likelihood's weight (default: n / (2 noise^2) for a mean "
        "squared error over n examples, n for cross-entropy); larger tempers the posterior",
    )
    head: tuple[str, ...] = _f(
        ("head.",), "ANIL: prefixes of the parameters adapted in the inner loop"
    )
    leap_metric: str = _f("energy", "Leap path metric", ("energy", "length"))
    loss_term: bool = _f(True, "Leap: include the loss term of the path length")
    stabilizer: bool = _f(True, "Leap: the stabiliser of the loss term")
    mode: str = _f("loop", "how tasks are batched in the meta-gradient", MODES)

    def __post_init__(self) -> None:
        ALGORITHMS.get(self.algorithm)  # ValueError naming the choices
        INNER_SOLVERS.get(self.inner)
        _check(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check(self.inner_lr > 0, f"inner_lr must be positive, got {self.inner_lr}")
        for name in ("inner_steps", "newton_cg_steps", "cg_steps"):
            value = getattr(self, name)
            _check(value >= 0, f"{name} must be >= 0, got {value}")
        _check(
            self.eval_inner_steps is None or self.eval_inner_steps >= 0,
            f"eval_inner_steps must be >= 0, got {self.eval_inner_steps}",
        )
        _check(self.lam > 0, f"lam must be positive, got {self.lam}")
        _check(
            self.pullback is None or self.pullback > 0,
            f"pullback must be positive, got {self.pullback}",
        )
        for name in ("cg_damping", "lam_damping"):
            value = getattr(self, name)
            _check(value >= 0, f"{name} must be >= 0, got {value}")
        _check(len(self.head) > 0, "head needs at least one parameter-name prefix, e.g. 'head.'")
        for name in ("prior_std", "noise_std"):
            value = getattr(self, name)
            _check(value > 0, f"{name} must be positive, got {value}")
        _check(
            self.posterior_samples >= 1,
            f"posterior_samples must be a positive integer, got {self.posterior_samples}",
        )
        _check(
            0 <= self.inner_momentum < 1,
            f"inner_momentum must be in [0, 1), got {self.inner_momentum}",
        )
        _check(
            len(self.inner_betas) == 2 and all(0 <= b < 1 for b in self.inner_betas),
            f"inner_betas must be two numbers in [0, 1), got {self.inner_betas}",
        )
        _check(
            self.truncate is None or 0 <= self.truncate <= self.inner_steps,
            f"truncate must be in [0, inner_steps={self.inner_steps}], got {self.truncate}",
        )
        _check(
            self.eval_inner_batch_size is None or self.eval_inner_batch_size >= 1,
            f"eval_inner_batch_size must be a positive integer, got {self.eval_inner_batch_size}",
        )
        _check(
            self.inner_batch_size is None or self.inner_batch_size >= 1,
            f"inner_batch_size must be a positive integer, got {self.inner_batch_size}",
        )


@dataclass(frozen=True)
class OptimConfig:
    """The outer loop: ``torch.optim`` optimiser, learning-rate schedule, meta-batch and length."""

    optimizer: str = _f("adam", "outer optimiser", ("adam", "sgd"))
    outer_lr: float = _f(1e-3, "outer learning rate (Reptile's meta step size with sgd)")
    adam_eps: float = _f(1e-8, "the outer Adam's eps, added to the root of its second moment")
    schedule: str = _f(
        "constant", "outer lr schedule (linear: anneal to 0)", ("constant", "linear")
    )
    meta_batch: int = _f(25, "tasks per outer step")
    steps: int = _f(70_000, "outer steps")

    def __post_init__(self) -> None:
        _check(self.outer_lr > 0, f"outer_lr must be positive, got {self.outer_lr}")
        _check(self.adam_eps > 0, f"adam_eps must be positive, got {self.adam_eps}")
        _check(
            self.meta_batch >= 1, f"meta_batch must be a positive integer, got {self.meta_batch}"
        )
        _check(self.steps >= 0, f"steps must be >= 0, got {self.steps}")


@dataclass(frozen=True)
class RunConfig:
    """Seeds, device, logging, evaluation and checkpoint cadence."""

    seed: int = _f(0, "seed of every random choice of the run (init, tasks)")
    device: str = _f("cpu", "device", ("cpu", "cuda"))
    deterministic: bool | None = _f(None, "deterministic kernels (default: on for cpu)")
    threads: int = _f(0, "CPU threads for torch (0: torch's default)")
    precision: str = _f(
        "fp32",
        "fp32, or bf16: forward passes under bfloat16 autocast (parameters, gradients and "
        "optimiser stay fp32; fast only where the device has bfloat16 units)",
        ("fp32", "bf16"),
    )
    log_every: int = _f(100, "log metrics every N steps")
    eval_every: int = _f(0, "validate every N steps (0: only at the end)")
    val_tasks: int = _f(100, "validation tasks during training")
    eval_tasks: int = _f(600, "evaluation tasks at the end and in `metagrad eval`")
    eval_seed: int = _f(20_170_703, "seed of the fixed evaluation tasks (same for every run)")
    checkpoint_every: int = _f(1000, "checkpoint every N steps (and at the end)")
    tensorboard: bool = _f(True, "write TensorBoard event files")

    def __post_init__(self) -> None:
        for name in ("log_every", "checkpoint_every", "val_tasks", "eval_tasks"):
            value = getattr(self, name)
            _check(value >= 1, f"{name} must be a positive integer, got {value}")
        _check(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        _check(self.threads >= 0, f"threads must be >= 0, got {self.threads}")

    @property
    def is_deterministic(self) -> bool:
        """``deterministic`` with its default resolved: on for cpu, off for cuda."""
        return self.device == "cpu" if self.deterministic is None else self.deterministic


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "algo": AlgoConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


@dataclass(frozen=True)
class Config:
    """Everything a run needs; ``preset`` names where its settings came from."""

    preset: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        bench = BENCHMARKS[self.data.benchmark]
        archs = fitting_archs(self.data.benchmark)
        _check(
            self.model.arch in archs,
            f"arch {self.model.arch!r} does not fit benchmark {bench.name!r}: use "
            f"--arch {' or '.join(archs)}",
        )
        _check(
            "ways" not in bench.options.values() or self.data.ways >= 2,
            f"ways must be at least 2, got {self.data.ways}",
        )
        splits = bench.extra.get("splits")
        _check(
            "split" not in bench.options.values() or not splits or self.data.split in splits,
            f"split {self.data.split!r} is not a protocol of {bench.name!r}: use --split "
            f"{' or '.join(splits or ())}",
        )
        solvers = ALGORITHMS[self.algo.algorithm].extra.get("solvers", INNER_SOLVERS.names())
        _check(
            self.algo.inner in solvers,
            f"inner solver {self.algo.inner!r} is not for {self.algo.algorithm}; use --inner "
            f"{' or '.join(solvers)}",
        )

    def override(self, **changes: Any) -> Config:
        """A copy with the named fields (from any section) replaced: ``override(ways=20)``."""
        sections: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            section = field_section(name)
            sections.setdefault(section, {})[name] = value
        return dataclasses.replace(
            self,
            **{s: dataclasses.replace(getattr(self, s), **kw) for s, kw in sections.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """The config that :meth:`to_dict` wrote; unknown keys raise ``ValueError``."""
        parts: dict[str, Any] = {"preset": data.get("preset", "custom")}
        for section, kind in SECTIONS.items():
            values = dict(data.get(section, {}))
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = sorted(set(values) - names)
            _check(not unknown, f"unknown {section} settings {unknown} in config")
            for name in tuple_fields(kind) & set(values):
                values[name] = tuple(values[name])  # JSON has lists
            parts[section] = kind(**values)
        return cls(**parts)


def tuple_fields(kind: type) -> set[str]:
    """The names of the fields of section ``kind`` that hold tuples (``head``, ``inner_betas``)."""
    hints = typing.get_type_hints(kind)
    return {f.name for f in dataclasses.fields(kind) if typing.get_origin(hints[f.name]) is tuple}


def field_section(name: str) -> str:
    """The section (``data``, ``algo``, ...) that holds the field ``name``."""
    for section, kind in SECTIONS.items():
        if name in {f.name for f in dataclasses.fields(kind)}:
            return section
    raise ValueError(f"no config field named {name!r}")
