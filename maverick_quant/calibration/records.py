"""Records of calibration and evaluation files -> texts: plain UTF-8 text (one record), JSON
Lines (.jsonl, .ndjson, .json) whose records have a `text` field or a `messages` list rendered
by the tokenizer's chat template (dated TEMPLATE_DATE, so any day gives the same windows), or
a .json file holding one JSON array of such records. Bad input is named `file:line`."""

from __future__ import annotations

import contextlib
import datetime
import json
from pathlib import Path

from maverick_quant.errors import InputError


JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")  # JSON Lines, as `Dataset.to_json` writes them


GZIP_MAGIC = b"\x1f\x8b"
# What a chat template that prints today's date (Llama 3.x: strftime_now, date_string) renders
# instead: the same records then give the same windows on any day (locks, --resume).
TEMPLATE_DATE = datetime.datetime(2024, 7, 26)


def utf8_text(path: Path) -> str:
    """The UTF-8 text file `path` as it is, less a leading byte-order mark (an editor's, which
    would otherwise be tokenized as text); InputError naming `path:line` and the byte where it
    is not UTF-8 (a binary file, or another encoding, was read with replacement characters),
    or for a gzip file."""
    raw = Path(path).read_bytes()
    if raw.startswith(GZIP_MAGIC):
        raise InputError(f"{path}: gzip-compressed; decompress it first (gunzip -k {path})")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 (byte {raw[exc.start]:#04x}), at file offset {exc.start}: "
                         "the file must be UTF-8 text") from None


def text_lines(path: Path) -> list[str]:
    """The lines of the UTF-8 text file `path` (`split_lines`). InputError naming `path:line`
    for bytes that are not UTF-8."""
    return split_lines(utf8_text(path))


def split_lines(text: str) -> list[str]:
    """`text` split at \\n only (a \\r before it goes too): U+2028, U+0085 and the like stay
    inside their line, as JSON strings may hold them raw."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and not lines[-1]:  # the newline that ends the last line
        lines.pop()
    return lines


def read_records(path: Path, tokenizer, chat_template: bool, calibration: bool = True) -> list[str]:
    """The non-empty text records of a JSON Lines file (`JSON_LINES_SUFFIXES`; chat messages
    rendered when asked), of a .json file holding one JSON array of such records, or of any
    other file, read as one plain-text record. `calibration`: read for calibration windows
    (a plain text's \r\n line ends read as \n, as Python's and datasets' text readers do),
    else for evaluation (bytes as llama-perplexity reads them; --chat-template is not offered)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: a directory; expected a text or JSON Lines file")
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    json_lines = path.suffix.lower() in JSON_LINES_SUFFIXES
    if chat_template and not json_lines:  # else the template would be silently left out
        raise InputError(f"{path}: --chat-template renders the 'messages' of a JSON Lines file "
                         f"({', '.join(JSON_LINES_SUFFIXES)}); this is plain text")
    if not json_lines:
        text = utf8_text(path)
        text = text.replace("\r\n", "\n") if calibration else text
        return [text] if text.strip() else []
    text = utf8_text(path)
    if path.suffix.lower() == ".json" and (array := _json_array(path, text)) is not None:
        numbered = [(f"{path}: record {index}", record) for index, record in enumerate(array)]
    else:
        numbered = [(f"{path}:{number}", _json_object(path, number, line))
                    for number, line in enumerate(split_lines(text), start=1) if line.strip()]
    texts = (_record_text(where, record, tokenizer, chat_template, calibration) for where, record in numbered)
    return [text for text in texts if text.strip()]  # an empty record would add a bare separator


def _json_array(path: Path, text: str) -> list | None:
    """The records of a .json file `path` (its `text`) that holds one JSON array
    (`json.dump(records)`, as Alpaca and many exports are), or None for a JSON Lines file."""
    if not text.lstrip().startswith("["):
        return None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); a .json file is read as one JSON "
                         "array of records, or as JSON Lines") from None
    if not isinstance(records, list):
        raise InputError(f"{path}: expected one JSON array of records, got {type(records).__name__}")
    return records


def _json_object(path: Path, number: int, line: str):
    """Line `number` of a JSON Lines file, parsed; InputError naming `path:number` when it is not JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}); {path.suffix} files are read as JSON Lines, "
                         "one JSON object per line") from None


def _record_text(where: str, record, tokenizer, chat_template: bool, calibration: bool) -> str:
    """The text of one record (at `where`, "file:line"): its 'text', or its 'messages' rendered
    by the chat template (dated TEMPLATE_DATE). InputError naming `where` for a record of
    another shape, and for text that cannot be encoded (a lone UTF-16 surrogate escape)."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object per record, got {type(record).__name__}")
    text = _rendered(where, record, tokenizer) if chat_template else record.get("text")
    if not isinstance(text, str):
        hint = " (or use --chat-template with 'messages')" if calibration else ""
        raise InputError(f"{where}: expected a string 'text' field{hint}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{where}: the text holds an unpaired UTF-16 surrogate ({text[exc.start]!r}, a truncated "
                         "escape such as half an emoji), which is no character") from None
    return text


def _rendered(where: str, record: dict, tokenizer) -> str:
    """A record's 'messages' rendered by the tokenizer's chat template, dated TEMPLATE_DATE."""
    messages = record.get("messages")
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise InputError(f"{where}: --chat-template expects a non-empty 'messages' list of "
                         "{'role': ..., 'content': ...} objects in every record")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("--chat-template: the model's tokenizer has no chat template")
    try:
        with _template_clock_at(TEMPLATE_DATE):
            return tokenizer.apply_chat_template(messages, tokenize=False, date_string=TEMPLATE_DATE.strftime("%d %b %Y"))
    except Exception as exc:  # jinja2's TemplateError, or what the template itself raises
        raise InputError(f"{where}: the chat template cannot render these messages ({exc})") from None


@contextlib.contextmanager
def _template_clock_at(moment: datetime.datetime):
    """transformers' `strftime_now` template global reads `moment` instead of the clock while
    this holds (it calls `datetime.now()` of its module; render keywords cannot replace it,
    as transformers passes them to the template as text). Where the module has no such name,
    only `date_string` fixes the date."""
    from transformers.utils import chat_template_utils

    real = getattr(chat_template_utils, "datetime", None)
    if real is None:
        yield
        return

    class Stopped(real):
        @classmethod
        def now(cls, tz=None):
            return moment

    chat_template_utils.datetime = Stopped
    try:
        yield
    finally:
        chat_template_utils.datetime = real
