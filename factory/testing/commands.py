"""`factory testing serve`: the simulated teacher as a local OpenAI-compatible server, so the
teacher half of the tour runs offline, in seconds, with answers in each paper's format."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import typer

testing_app = typer.Typer(help="Local stand-ins for the services a job needs (no network, "
                          "no model).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(testing_app, name="testing")


def simulated_server(latency: float = 0.0, fault_rate: float = 0.0, faults: str = "",
                     seed: int = 0) -> Any:
    """The simulated teacher behind an OpenAIServer (not started), GVM titles read from the
    warehouse; `faults`: comma-separated kinds."""
    from factory.cli import warehouse
    from factory.errors import FactoryError
    from factory.testing.openai_server import (
        CUT_FAULT_KINDS,
        FAULT_KINDS,
        SLOW_FAULT_KINDS,
        Faults,
        OpenAIServer,
    )
    from factory.testing.simulated import MODEL_ID, SimulatedTeacher, WarehouseCatalogue

    kinds = tuple(k.strip() for k in faults.split(",") if k.strip())
    known = FAULT_KINDS + SLOW_FAULT_KINDS + CUT_FAULT_KINDS
    unknown = sorted(set(kinds) - set(known))
    if unknown:
        raise FactoryError(f"--faults: unknown kind(s) {', '.join(unknown)}; choose from "
                           f"{', '.join(known)}")
    wh = warehouse(reader=True)
    return OpenAIServer(SimulatedTeacher(catalogue=WarehouseCatalogue(wh.path)),
                        latency=latency, faults=Faults(rate=fault_rate, kinds=kinds, seed=seed),
                        model_ids=(MODEL_ID,))


@testing_app.command("serve")
def serve_cmd(
    port: int = typer.Option(8000, "--port", min=0, max=65535,
                             help="Port on 127.0.0.1 (0: any free port)."),
    latency: float = typer.Option(0.0, "--latency", min=0.0, help="Seconds per request."),
    fault_rate: float = typer.Option(0.0, "--fault-rate", min=0.0, max=1.0,
                                     help="Share of requests answered with a fault."),
    faults: str = typer.Option("429,500,503,malformed,empty", "--faults",
                               help="Comma-separated fault kinds to draw from: 429, 500, 503, "
                               "slow, drop, malformed, empty, badjson, trickle, hang, length "
                               "(cut at max_tokens, finish_reason length)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the fault draws (answers are seeded by "
                             "the request itself)."),
) -> None:
    """Serve the simulated teacher: every prompt of prompts/ answered in its paper's format,
    deterministically, under the model id `simulated-teacher` (any other id gets 404). GVM
    answers recommend real titles of the warehouse's catalogue (--warehouse), read on demand."""
    from factory.errors import FactoryError, Interrupted
    from factory.testing.simulated import MODEL_ID

    server = simulated_server(latency, fault_rate, faults, seed)
    sys.setswitchinterval(0.0005)      # many handler threads wake at once: hand the GIL over fast
    try:
        server.start(port)
    except OSError as exc:
        raise FactoryError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}; "
                           "pick another --port") from exc
    print(f"simulated teacher (not a real model) at {server.url}, model {MODEL_ID}", flush=True)
    print(f"  export FACTORY_TEACHER_URL={server.url} FACTORY_TEACHER_MODEL={MODEL_ID}",
          flush=True)
    try:
        threading.Event().wait()
    except (KeyboardInterrupt, Interrupted):   # Ctrl-C or SIGTERM: a clean stop, exit 0
        pass
    finally:
        server.stop()


@testing_app.command("run-batch")
def run_batch_cmd(
    input_file: Path = typer.Option(..., "-i", "--input", help="Batch input file (JSONL), "
                                    "as --batch-file writes it."),
    output_file: Path = typer.Option(..., "-o", "--output", help="Where to write the output "
                                     "file (JSONL) for --import-batch."),
) -> None:
    """Answer a batch input file with the simulated teacher, offline, as `python -m
    vllm.entrypoints.openai.run_batch -i IN -o OUT --model M` would with a real model."""
    from factory.errors import FactoryError

    try:
        content = input_file.read_bytes()
    except OSError as exc:
        raise FactoryError(f"-i {input_file}: {exc.strerror or exc}") from None
    try:
        output = simulated_server().run_batch(content)
    except ValueError as exc:
        raise FactoryError(f"-i {input_file}: {exc}") from None
    output_file.parent.mkdir(parents=True, exist_ok=True)
    output_file.write_bytes(output)
    lines = len(output.splitlines())
    print(f"answered {lines:,} requests of {input_file} into {output_file} "
          "(simulated teacher, not a real model)", flush=True)
