"""Run configuration and its command line (shared by `python -m train` and `factory train`)."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from train.fusion import ABLATIONS, check_ablations
from train.metrics import PROTOCOLS

BACKBONES = ("sasrec", "hstu")  # dense: score the last state against every item vector
GENERATIVE = ("tiger",)  # decode semantic IDs; ranked lists are their beams

#: each backbone's own defaults for the options left unset (None) on the command line
DEFAULTS: dict[str, dict[str, Any]] = {
    "sasrec": {"dim": 64, "layers": 2, "heads": 1, "dropout": 0.2, "lr": 1e-3,
               "batch_size": 128, "fusion_heads": 4},
    # generative-recommenders configs/ml-1m/hstu-sampled-softmax-n128-final.gin (the README's
    # ML-1M HSTU row): item_embedding_dim 50, num_blocks 2, num_heads 1, dqk = dv = 50,
    # dropout_rate = linear_dropout_rate 0.2, learning_rate 1e-3, weight_decay 0, batch 128;
    # SCoTER-H fuses with 4 heads (Table 8)
    "hstu": {"dim": 50, "layers": 2, "heads": 1, "dropout": 0.2, "lr": 1e-3,
             "batch_size": 128, "fusion_heads": 4},
    # SCoTER A.1, Table 8 (SCoTER-T: 6 fusion heads of T5's d_kv 64)
    "tiger": {"dim": 128, "layers": 4, "heads": 6, "d_kv": 64, "ffn_dim": 1024,
              "dropout": 0.1, "lr": 1e-4, "batch_size": 256, "fusion_heads": 6,
              "fusion_head_dim": 64},
}

@dataclass
class Config:
    cache: str
    out: str | None = None  # default: <runs root>/<cache name>-<variant>-<time> (loop.runs_root)
    backbone: str = "sasrec"
    fusion: str = "none"  # none | scoter
    ablate: list[str] = field(default_factory=list)
    shuffle_steps: bool = False  # control: give each row another user's reasoning
    sid: bool = False  # sum semantic-ID embeddings into item embeddings
    # None: the backbone's default (DEFAULTS), filled in on construction
    dim: int = None  # type: ignore[assignment]
    layers: int = None  # type: ignore[assignment]
    heads: int = None  # type: ignore[assignment]
    d_kv: int | None = None  # T5 (TIGER) per-head width, independent of dim
    ffn_dim: int | None = None  # default: dim, as in SASRec
    dropout: float = None  # type: ignore[assignment]
    fusion_heads: int = None  # type: ignore[assignment]  # SCoTER-H: 4, SCoTER-T: 6
    fusion_head_dim: int | None = None  # default: dim // fusion_heads, else ceil
    fusion_dropout: float = 0.1  # SCoTER Table 8
    lam: float = 0.1  # SCoTER eq. 8
    temperature: float = 0.1  # eq. 6; the paper gives no value
    loss: str = "full"  # full | sampled (dense backbones)
    negatives: int = 128  # sampled softmax: uniform negatives per batch
    softmax_temperature: float = 0.05  # sampled softmax over L2-normalised vectors
    lr: float = None  # type: ignore[assignment]
    weight_decay: float = 0.0
    batch_size: int = None  # type: ignore[assignment]
    eval_batch_size: int = 512
    epochs: int = 200
    patience: int = 20  # SCoTER Table 8; counted in evaluations
    max_minutes: float | None = None  # stop after the epoch that passes this training time
    eval_every: int = 1
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision on CUDA only
    threads: int | None = None
    protocol: str = "full"  # ranking that early-stops and heads the report (both reported)
    verify: bool = True  # check every cache file's sha256 on open
    save_model: bool = False
    beam: int = 20  # generative backbones: beams decoded = depth of the ranked list (SCoTER A.1)
    predict: bool = False  # write the top-K candidates of every row after training
    top_k: int = 50  # candidates per row (TwiSTAR's M_fast retrieves 50)
    candidates: str | None = None  # default: <out>/candidates.parquet

    def __post_init__(self) -> None:
        for name, value in DEFAULTS.get(self.backbone, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def check(self) -> None:
        if self.backbone not in BACKBONES + GENERATIVE:
            raise ValueError(f"unknown backbone {self.backbone!r} "
                             f"(known: {', '.join(BACKBONES + GENERATIVE)})")
        if self.fusion not in ("none", "scoter"):
            raise ValueError(f"unknown fusion {self.fusion!r} (known: none, scoter)")
        check_ablations(frozenset(self.ablate))
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"unknown loss {self.loss!r} (known: full, sampled)")
        if self.loss == "sampled" and self.backbone not in BACKBONES:
            raise ValueError(f"--loss sampled is for the dense backbones "
                             f"({', '.join(BACKBONES)})")
        if self.fusion == "none" and (self.ablate or self.shuffle_steps):
            raise ValueError("--ablate and --shuffle-steps need --fusion scoter")
        for name in ("dim", "layers", "heads", "fusion_heads", "batch_size", "eval_batch_size",
                     "epochs", "patience", "eval_every", "beam", "top_k", "negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.backbone in GENERATIVE and self.sid:
            raise ValueError(f"--sid adds semantic-ID embeddings to a dense backbone; "
                             f"{self.backbone} always works on semantic IDs")
        if self.backbone in GENERATIVE and self.predict and self.top_k > self.beam:
            raise ValueError(f"--top-k {self.top_k} > --beam {self.beam}: {self.backbone}'s "
                             f"candidates are its beams; pass --beam {self.top_k} (a wider "
                             "search would rank differently from the reported metrics)")
        if self.backbone in GENERATIVE and self.beam < 10:
            raise ValueError(f"--beam {self.beam}: at least 10 (the best epoch is chosen by "
                             "NDCG@10, which needs ten ranked items)")
        for name in ("fusion_head_dim", "d_kv", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        # a NaN compares false with everything, so each range is written to fail on it
        for name, ok, what in (
                ("lr", self.lr > 0 and math.isfinite(self.lr), "a positive number"),
                ("weight_decay", 0 <= self.weight_decay < math.inf, "a number >= 0"),
                ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                ("fusion_dropout", 0 <= self.fusion_dropout < 1, "in [0, 1)"),
                ("lam", 0 <= self.lam < math.inf, "a number >= 0"),
                ("temperature", self.temperature > 0 and math.isfinite(self.temperature),
                 "a positive number"),
                ("softmax_temperature", self.softmax_temperature > 0
                 and math.isfinite(self.softmax_temperature), "a positive number")):
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"--{name.replace('_', '-')} {value:g}: must be {what}")
        if self.backbone not in GENERATIVE and self.dim % self.heads:
            raise ValueError(f"--heads ({self.heads}) must divide --dim ({self.dim}) "
                             "(the backbone's self-attention)")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError("--max-minutes must be positive")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("--device must be auto, cpu or cuda")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ArgumentError(ValueError):
    """Bad command-line arguments (raised instead of argparse's exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise ArgumentError(message)


def parser(require_cache: bool = True) -> argparse.ArgumentParser:
    d = Config(cache="")
    p = _Parser(prog="python -m train",
                description="Train SASRec, HSTU or TIGER, optionally with SCoTER reasoning "
                            "fusion, on an exported cache; leave-one-out evaluation by full "
                            "ranking, reported with and without the history masked.")
    p.add_argument("--cache", required=require_cache, help="exported cache directory")
    p.add_argument("--out", help="output directory [runs/<cache>-<variant>-<time>, runs/ "
                   "beside the cache's caches/ folder, else beside the cache]")
    p.add_argument("--backbone", default=d.backbone, choices=list(BACKBONES + GENERATIVE))
    p.add_argument("--fusion", default=d.fusion, choices=["none", "scoter"])
    p.add_argument("--ablate", action="append", default=[], metavar="|".join(ABLATIONS),
                   help="SCoTER Table 4 ablation; repeat or comma-separate to combine")
    p.add_argument("--shuffle-steps", action="store_true",
                   help="control: each row gets another user's reasoning")
    p.add_argument("--sid", action="store_true", help="add semantic-ID embeddings")
    p.add_argument("--loss", default=d.loss, choices=["full", "sampled"],
                   help="dense backbones: softmax over the whole catalog, or sampled softmax "
                        "over --negatives uniform items with L2-normalised vectors "
                        f"(generative-recommenders' ML-1M runs) [{d.loss}]")
    for name, typ, hlp in [
        ("dim", int, "model and item dimension"), ("layers", int, "transformer blocks"),
        ("heads", int, "self-attention heads"),
        ("d-kv", int, "TIGER: width of each T5 attention head, independent of --dim"),
        ("ffn-dim", int, "FFN width [dim]"),
        ("dropout", float, "backbone dropout"), ("fusion-heads", int, "cross-attention heads"),
        ("fusion-head-dim", int, "width of each cross-attention head, independent of --dim "
         "[dim // fusion-heads when it divides, else rounded up]"),
        ("fusion-dropout", float, "fusion dropout"), ("lam", float, "InfoNCE weight lambda"),
        ("temperature", float, "InfoNCE temperature tau"),
        ("negatives", int, "sampled softmax: negatives drawn per batch"),
        ("softmax-temperature", float, "sampled softmax: temperature of its cosine logits"),
        ("lr", float, "Adam learning rate"),
        ("weight-decay", float, "Adam weight decay"), ("batch-size", int, "training batch"),
        ("eval-batch-size", int, "evaluation batch"), ("epochs", int, "most epochs"),
        ("patience", int, "evaluations without a better valid NDCG@10 before stopping"),
        ("eval-every", int, "epochs between evaluations"),
        ("max-minutes", float, "stop after the epoch that passes this much training time "
         "(the best epoch so far is still tested)"),
        ("seed", int, "random seed"),
        ("threads", int, "CPU threads for torch [the physical cores this process may use "
         "(affinity, cgroup quota), or OMP_NUM_THREADS]"),
    ]:
        field_name = name.replace("-", "_")
        per_backbone = {b: v[field_name] for b, v in DEFAULTS.items() if field_name in v}
        if per_backbone:  # left None here, filled in for the chosen backbone
            p.add_argument(f"--{name}", type=typ, default=None, help=f"{hlp} [" + ", ".join(
                f"{b} {v:g}" for b, v in per_backbone.items()) + "]")
            continue
        default = getattr(d, field_name)
        p.add_argument(f"--{name}", type=typ, default=default,
                       help=hlp if default is None else f"{hlp} [{default}]")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision")
    p.add_argument("--protocol", default=d.protocol, choices=list(PROTOCOLS),
                   help="ranking protocol that selects the best epoch and heads the report; "
                        "both are always reported. full: the whole catalog, history "
                        "included (SCoTER 4.1, TwiSTAR 5); masked: history items excluded "
                        f"[{d.protocol}]")
    p.add_argument("--mask-history", dest="protocol", action="store_const", const="masked",
                   help="same as --protocol masked")
    p.add_argument("--no-mask-history", dest="protocol", action="store_const", const="full",
                   help=argparse.SUPPRESS)  # the old spelling of the default
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the sha256 check of the cache files")
    p.add_argument("--save-model", action="store_true", help="write model.pt (best epoch)")
    p.add_argument("--beam", type=int, default=d.beam,
                   help="generative backbones: beams decoded, the ranked list's depth "
                        f"[{d.beam}]")
    p.add_argument("--predict", action="store_true",
                   help="after training, write the top --top-k items of every train/valid/"
                        "test row (the best epoch, ranked under --protocol) to "
                        "<out>/candidates.parquet, or to --out when it ends in .parquet")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"candidates per row [{d.top_k}]")
    return p


def parse_args(argv: list[str], require_cache: bool = True) -> Config:
    """A checked Config from command-line arguments; ArgumentError on anything wrong."""
    ns = vars(parser(require_cache).parse_args(argv))
    ns["ablate"] = sorted({a.strip() for arg in ns["ablate"] for a in arg.split(",")
                           if a.strip()})
    ns["cache"] = ns["cache"] or ""
    if (ns["out"] or "").endswith(".parquet"):
        if not ns["predict"]:
            raise ArgumentError(f"--out {ns['out']}: a .parquet --out names the candidates "
                                "file, written with --predict; without it --out is a directory")
        ns["candidates"], ns["out"] = ns["out"], None  # `--predict --out cands.parquet`
    cfg = Config(**ns)
    try:
        cfg.check()
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None
    return cfg
