"""Input files the operator names on the command line (`prices import`, `rates import`)."""

from __future__ import annotations

from pathlib import Path

from worker.errors import ConfigError

MAX_INPUT_FILE_BYTES = 32 * 2**20  # bytes; the ECB's full history is under 2 MiB, so more is not a rates file


def read_input_file(path: Path) -> str:
    """The file's text (UTF-8, a byte-order mark dropped), or one ``ConfigError`` saying why not. Reads at most
    ``MAX_INPUT_FILE_BYTES`` + 1 bytes: ``/dev/zero`` or a huge file named by mistake never fills the memory."""
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_INPUT_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_INPUT_FILE_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_INPUT_FILE_BYTES // 2**20} MiB: not a prices or rates file"])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 (byte {exc.start}): {exc.reason}"]) from None
