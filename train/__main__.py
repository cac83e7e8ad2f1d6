"""`python -m train --cache DIR [--fusion scoter] [--ablate ...]`: train, evaluate, report."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from typing import TextIO

from train.config import ArgumentError, parse_args
from train.data import TrainError
from train.loop import run
from train.metrics import KS


def format_metrics(result: dict) -> str:
    """Both protocols, the one that chose the best epoch first and starred."""
    keys = [f"{m}@{k}" for m in ("recall", "ndcg") for k in KS]
    lines = ["split  protocol " + "  ".join(f"{k:>9}" for k in keys)]
    chosen = result["protocol"]
    order = [chosen] + [p for p in result["protocols"] if p != chosen]
    for proto in order:
        for split in ("valid", "test"):
            m = result["protocols"][proto][split]
            lines.append(f"{split:<5}  {proto + ('*' if proto == chosen else ''):<8} "
                         + "  ".join("        -" if m[k] is None else f"{m[k]:>9.4f}"
                                     for k in keys))
    for proto in order:
        lines.append(f"{proto + ('*' if proto == chosen else ''):<8} "
                     f"{result['protocols'][proto]['name']}")
    if any(v is None for v in result["test"].values()):
        lines.append(f"- beyond the ranked list: {result['params']['beam']} beams (--beam)")
    lines.append(f"* selected the best epoch. "
                 f"best epoch {result['best_epoch']} of {result['epochs_run']}, "
                 f"{result['seconds_per_epoch']:.2f} s/epoch on {result['device']}; "
                 f"written to {result['out']}")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class StderrProgress:
    """Batches within a stage (`epoch 3/50 1,200/5,000 batches 24.0/s ETA 2:38`). train/
    stands alone (no factory, no rich), so this is the plain twin of factory.console's
    bars: on a terminal one line redrawn in place, elsewhere a line every `every` seconds
    and one when a stage ends, so that log files stay readable."""

    def __init__(self, stream: TextIO | None = None, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, tty: bool | None = None):
        stream = sys.stderr if stream is None else stream  # now, not when imported
        self.stream, self.every, self.clock = stream, every, clock
        self.tty = stream.isatty() if tty is None else tty
        self.stage: str | None = None
        self.start = self.next = 0.0
        self.first = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage != self.stage:
            self.stage, self.start, self.first = stage, now, done
            self.next = now + (0.2 if self.tty else self.every)
        if now < self.next and done < total:
            return
        self.next = now + (0.2 if self.tty else self.every)
        speed = (done - self.first) / (now - self.start) if now > self.start else 0.0
        eta = (f"in {_clock(now - self.start)}" if done >= total else
               f"ETA {_clock((total - done) / speed)}" if speed else "ETA -:--")
        rate = f"{speed:,.1f}/s" if speed else "-/s"
        line = f"{stage} {done:,}/{total:,} batches {rate} {eta}"
        if self.tty:     # redrawn in place; cleared at the end (the epoch's log line follows)
            self.stream.write("\r\x1b[K" + ("" if done >= total else line[:79]))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ArgumentError as exc:
        print(f"error: {exc} (python -m train --help)", file=sys.stderr)
        return 2
    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)   # a batch scheduler's stop, like Ctrl-C
    try:
        result = run(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                     progress=StderrProgress())
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        how = "SIGTERM" if str(exc) == "SIGTERM" else "Ctrl-C"
        print(f"\ninterrupted ({how}): nothing is reported or written for this run",
              file=sys.stderr)
        return 143 if how == "SIGTERM" else 130
    print(format_metrics(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
