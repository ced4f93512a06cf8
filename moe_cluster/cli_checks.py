"""What the command line checks before it starts anything, and how it reports a mistake.

A mistake in the command line or in the files it names is one line on stderr,
`moe-cluster: error: ...`, exit status 2, saying what to pass instead (`--debug` adds the
traceback). Every path is checked here, before Ray starts: a wrong path found later costs
seconds of start-up and ends in a traceback that names the library's argument, not the flag.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["UsageError", "USER_ERRORS", "one_line", "port_number", "checkpoint_dir", "hf_model_dir",
           "tokenizer_dir", "existing_file", "output_dir"]

CHECKPOINT_FORMAT = "moe-cluster/1"  # checkpoint/format.py's FORMAT (not imported: that pulls in torch)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class UsageError(Exception):
    """A mistake in what the user asked for; its message says what to do instead."""


# Exceptions that the library raises for the user's input (pydantic's ValidationError and
# CheckpointError are ValueErrors; PortBusyError is an OSError of its own, listed by the CLI).
# Any other exception is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
    PermissionError)


def one_line(error: BaseException) -> str:
    """The error's message on one line: pydantic's errors as `field: message; ...`, else the
    message with its line breaks (YAML's, pydantic's) folded into spaces."""
    errors = getattr(error, "errors", None)
    if callable(errors) and hasattr(error, "title"):  # pydantic.ValidationError
        items = [f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in errors()]
        return f"invalid {error.title}: " + "; ".join(items)
    return " ".join(str(error).split()) or type(error).__name__


def port_number(text: str) -> int:
    """argparse type of a TCP port to listen on: 1..65535 (0 would make the proxy pick one, and
    the banner would print the wrong address)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number; pass one in 1..65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port; pass one in 1..65535 (e.g. 8100)")
    return port


def directory_kind(path: Path) -> str:
    """"missing", "file", "empty" (no config.json), "checkpoint" (ours), "hf" (a Hugging Face model)
    or "unknown" (a config.json that is neither)."""
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    config = path / "config.json"
    if not config.is_file():
        return "empty"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return "unknown"
    if not isinstance(data, dict):
        return "unknown"
    if data.get("format") == CHECKPOINT_FORMAT:
        return "checkpoint"
    return "hf" if "model_type" in data else "unknown"


def checkpoint_dir(path: Path, flag: str = "--checkpoint") -> Path:
    """`path` if it is a moe-cluster checkpoint directory, else UsageError naming `flag`."""
    create = "create one with `moe-cluster init DIR` or `moe-cluster import-hf HF_MODEL DIR`"
    kind = directory_kind(path)
    if kind == "missing":
        raise UsageError(f"{flag} {path}: no such directory; pass a moe-cluster checkpoint ({create})")
    if kind == "file":
        raise UsageError(f"{flag} {path} is a file; pass a checkpoint directory ({create})")
    if kind == "hf":
        raise UsageError(f"{flag} {path}: this is a Hugging Face model directory; convert it with "
                         f"`moe-cluster import-hf {path} DST` and pass DST")
    if kind != "checkpoint":
        raise UsageError(f"{flag} {path} is not a moe-cluster checkpoint (no config.json of format "
                         f"{CHECKPOINT_FORMAT!r}); {create}")
    return path


def hf_model_dir(path: Path, flag: str = "--hf-model") -> Path:
    """`path` if it is a Hugging Face model directory (config.json with a model_type), else UsageError."""
    what = "a Hugging Face model directory (config.json + *.safetensors, e.g. DIR/model of `moe-cluster train`)"
    kind = directory_kind(path)
    if kind == "missing":
        raise UsageError(f"{flag} {path}: no such directory; pass {what}")
    if kind == "file":
        raise UsageError(f"{flag} {path} is a file; pass {what}")
    if kind == "checkpoint":
        raise UsageError(f"{flag} {path} is a moe-cluster checkpoint (already imported), not a Hugging Face "
                         "model; pass it as --checkpoint, and the Hugging Face directory it came from as --hf-model")
    if kind != "hf":
        raise UsageError(f"{flag} {path} is not {what}: no config.json with a model_type")
    return path


def tokenizer_dir(path: Path, flag: str = "--tokenizer") -> Path:
    """`path` if it holds a tokenizer's files, else UsageError naming `flag`."""
    if not path.is_dir():
        raise UsageError(f"{flag} {path}: no such directory; pass a directory with the model's tokenizer "
                         "(tokenizer.json or tokenizer_config.json)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{flag} {path} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}); save one there "
                         "with tokenizer.save_pretrained(DIR)")
    return path


def existing_file(path: Path, flag: str, what: str) -> Path:
    """`path` if it is a file, else UsageError: "FLAG PATH: no such file; pass WHAT"."""
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file; pass {what}")
    if not path.is_file():
        raise UsageError(f"{flag} {path} is a directory; pass {what}")
    return path


def output_dir(path: Path, flag: str) -> Path:
    """`path` if a directory may be written there (it is one, or nothing is there yet)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; pass a directory (created if missing)")
    return path
