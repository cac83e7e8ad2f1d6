"""`python -m train --cache DIR [--fusion scoter] [--ablate ...]`: train, evaluate, report."""

from __future__ import annotations

import sys

from train.config import ArgumentError, parse_args
from train.data import TrainError
from train.loop import run


def format_metrics(result: dict) -> str:
    """Both protocols, the one that chose the best epoch first and starred."""
    keys = [f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)]
    lines = ["split  protocol " + "  ".join(f"{k:>9}" for k in keys)]
    chosen = result["protocol"]
    order = [chosen] + [p for p in result["protocols"] if p != chosen]
    for proto in order:
        for split in ("valid", "test"):
            m = result["protocols"][proto][split]
            lines.append(f"{split:<5}  {proto + ('*' if proto == chosen else ''):<8} "
                         + "  ".join(f"{m[k]:>9.4f}" for k in keys))
    for proto in order:
        lines.append(f"{proto + ('*' if proto == chosen else ''):<8} "
                     f"{result['protocols'][proto]['name']}")
    lines.append(f"* selected the best epoch. "
                 f"best epoch {result['best_epoch']} of {result['epochs_run']}, "
                 f"{result['seconds_per_epoch']:.2f} s/epoch on {result['device']}; "
                 f"written to {result['out']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ArgumentError as exc:
        print(f"error: {exc} (python -m train --help)", file=sys.stderr)
        return 2
    try:
        result = run(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_metrics(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
