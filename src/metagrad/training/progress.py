"""Progress of the outer loop: a bar on a terminal, one log line per logged step elsewhere."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm  # type: ignore[import-untyped]

__all__ = ["Progress"]


class Progress:
    """A tqdm bar (steps/s, loss, accuracy, ETA) on a terminal, else one log line per log step."""

    def __init__(self, total: int, initial: int, enabled: bool | None = None) -> None:
        enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = (
            tqdm(total=total, initial=initial, unit="step", file=sys.stderr) if enabled else None
        )
        self.total, self.initial, self.start = total, initial, time.perf_counter()

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, values: dict[str, float]) -> None:
        shown = {k: values[k] for k in ("query_loss", "query_accuracy") if k in values}
        if self.bar is not None:
            self.bar.set_postfix({k.split("_")[1][:4]: f"{v:.4g}" for k, v in shown.items()})
            return
        rate = (step - self.initial) / max(time.perf_counter() - self.start, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        text = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
        self.write(f"step {step}/{self.total}  {text}  {rate:.1f} steps/s  ETA {eta:.0f}s")

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
