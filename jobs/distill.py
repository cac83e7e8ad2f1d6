"""`factory distill teach | student | generate`: SCoTER structured distillation (3.3.1, Alg. 2).

    teach     the teacher writes template-consistent chains for training sequences (line 6);
              --parts train,valid,test also for valid/test histories ("w/o Student Distill",
              SCoTER Table 4: the cache is built from teacher chains)
    student   LoRA fine-tuning of a small causal LM on the kept (history -> chain) pairs (l. 9)
    generate  the student writes chains for every sequence of the chosen parts (line 12)

teach and generate go through the teacher platform (cache, provenance, resume, --shard), so a
killed or sharded run resumes and merges like every teacher job. Chains land in `chains`
(one row per sequence, with its verdict) and `chain_steps` (one row per kept step).
"""

from __future__ import annotations

from pathlib import Path

import typer

from factory.teacher.options import TeacherOptions, teacher_options
from factory.vocabulary import DatasetOpt

app = typer.Typer(help="SCoTER structured distillation: teacher chains, student, student "
                  "chains.", no_args_is_help=True)

SplitOpt = typer.Option("loo", "--split", help="Leave-one-out split whose rows are the "
                        "sequences.")
MaxHistoryOpt = typer.Option(20, "--history", min=1, help="Most recent history items "
                             "shown per sequence (SCoTER: 20).")


def parse_parts(text: str) -> list[str]:
    """`train,valid,test` -> the parts in split order, each once."""
    from factory.distill import PARTS
    from factory.errors import FactoryError

    given = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in given if p not in PARTS]
    if unknown or not given:
        raise FactoryError(f"unknown split part {unknown[0] if unknown else text!r} (choose "
                           "from train, valid, test)")
    return [p for p in PARTS if p in given]


@app.command("teach")
@teacher_options
def teach(
    dataset: str = DatasetOpt,
    template: str = typer.Option("discovered", "--template", help="Template name: "
                                 "discovered (the dataset's latest GVM pattern), two-step, "
                                 "three-step, five-step, paper-<dataset>, or a gvm run id."),
    split: str = SplitOpt,
    max_history: int = MaxHistoryOpt,
    parts: str = typer.Option("train", "--parts", help="Parts to write chains for, comma-"
                              "separated: train (Alg. 2 line 6, what a student learns from), "
                              "or train,valid,test so that `embed-steps` and `export cache "
                              "--chains teacher:<run>` can use teacher chains for every "
                              "sequence (Table 4: w/o Student Distill)."),
    *,
    teacher: TeacherOptions,
) -> None:
    """The teacher writes a chain for each sequence of --parts (default: training
    sequences), from its history only."""
    from factory.cli import warehouse
    from factory.distill import run_chains

    run_chains(warehouse(), "teacher", dataset=dataset, split=split, parts=parse_parts(parts),
               template_name=template, max_history=max_history, options=teacher)


@app.command("generate")
@teacher_options
def generate(
    dataset: str = DatasetOpt,
    student: str = typer.Option(None, "--student", help="A `distill student` run id, a "
                                "unique prefix of one, or latest [default: the dataset's "
                                "latest finished]."),
    splits: str = typer.Option("train,valid,test", "--splits", help="Parts to write chains "
                               "for, comma-separated."),
    redraw_rejected: bool = typer.Option(False, "--redraw-rejected", help="Ask again only "
                                         "for the rejected chains, with new draw seeds (a "
                                         "greedy student samples at temperature 0.7); each "
                                         "new draw is paid once and cached, so a re-run "
                                         "replays it."),
    redraws: int = typer.Option(1, "--redraws", min=1, max=20, help="With --redraw-rejected: "
                                "new draws per rejected chain, in all (raising it sends only "
                                "the draws not yet made)."),
    *,
    teacher: TeacherOptions,
) -> None:
    """The student writes chains for every sequence (transformers in-process with its LoRA
    adapter; --backend vllm on a GPU; or --teacher-url of a vLLM server that serves the
    adapter under the student's model id, see jobs/slurm/teacher_array.sbatch)."""
    from factory.cli import warehouse
    from factory.distill import run_chains

    run_chains(warehouse(), "student", dataset=dataset, split=None, parts=parse_parts(splits),
               student_run=student, options=teacher,
               redraws=redraws if redraw_rejected else 0)


@app.command("student")
def student(
    dataset: str = DatasetOpt,
    chains: str = typer.Option(None, "--chains", help="teacher:<distill teach run> (an id, a "
                               "unique prefix, or latest) [default: teacher:latest, the "
                               "dataset's latest successful teach run]."),
    base: str = typer.Option("smollm2", "--base", help="smollm2 (the embedded SmolLM2-135M-"
                             "Instruct GGUF), a local model directory, or a cached name."),
    lora_r: int = typer.Option(8, "--lora-r", min=1),
    lora_alpha: int = typer.Option(None, "--lora-alpha", min=1, help="[default: 2 x r]"),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout", min=0.0, max=0.9),
    epochs: float = typer.Option(1.0, "--epochs", min=0.01),
    max_steps: int = typer.Option(None, "--max-steps", min=1, help="Stop after N optimizer "
                                  "steps (before the epochs end) [default on a CPU: 10]."),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1),
    lr: float = typer.Option(2e-4, "--lr", min=0.0),
    max_length: int = typer.Option(2048, "--max-length", min=16, help="Examples longer than "
                                   "this many tokens are left out (counted), never cut."),
    seed: int = typer.Option(0, "--seed"),
    checkpointing: bool = typer.Option(True, "--gradient-checkpointing/"
                                       "--no-gradient-checkpointing", help="Recompute layer "
                                       "activations in the backward pass: ~3x less memory, "
                                       "~30% more time."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 [default: cuda "
                               "when available]."),
    out: Path = typer.Option(None, "--out", help="Directory for the adapter and loss curve "
                             "[default: <warehouse>.files/models/<run>]."),
) -> None:
    """Fine-tune a student with LoRA on the kept teacher chains (chat format)."""
    from factory.cli import warehouse
    from factory.distill import train_student
    from factory.student import LoraOptions, TrainOptions

    opts = TrainOptions(epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                        grad_accum=grad_accum, lr=lr, max_length=max_length, seed=seed,
                        device=device or "", gradient_checkpointing=checkpointing,
                        lora=LoraOptions(r=lora_r, alpha=lora_alpha or 2 * lora_r,
                                         dropout=lora_dropout))
    train_student(warehouse(), dataset=dataset, chains=chains, base=base, opts=opts, out=out)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="distill")
