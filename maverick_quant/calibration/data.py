"""Calibration and evaluation text -> token windows, saved as a reusable artifact.

Sources: a plain text file, a JSON Lines file (.jsonl, .ndjson, .json) whose records have a
`text` field or (with the chat template) a `messages` list rendered through the tokenizer's
chat template (read by records.py), or `self` (text the model generates itself, see
selfgen.py). All records are
tokenized and joined into one stream (with EOS between them; rendered chats end their turns
themselves), and N windows of L tokens are drawn at start positions chosen by a seeded
generator (`draw_windows`: random or disjoint), so the same inputs always give the same windows.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from maverick_quant.calibration.records import read_records
from maverick_quant.outputs import save_safetensors_atomic, write_json_atomic
from maverick_quant.errors import InputError
from maverick_quant.recipe import CalibSpec

CALIB_TOKENS = "tokens.safetensors"
CALIB_META = "calib.json"


@dataclass(frozen=True)
class CalibrationSet:
    """input_ids: int64 [N, L] windows; meta: provenance (data sha256, options, tokenizer)."""

    input_ids: torch.Tensor
    meta: dict

    def save(self, out_dir: Path) -> None:
        save_safetensors_atomic({"input_ids": self.input_ids}, out_dir / CALIB_TOKENS)
        write_json_atomic(out_dir / CALIB_META, self.meta)

    @classmethod
    def load(cls, calib_dir: Path) -> "CalibrationSet":
        from safetensors.torch import load_file

        calib_dir = Path(calib_dir)
        tokens, meta_path = calib_dir / CALIB_TOKENS, calib_dir / CALIB_META
        if not tokens.is_file() or not meta_path.is_file():
            raise InputError(f"{calib_dir}: not a calibration directory (expected {CALIB_TOKENS} and {CALIB_META})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"{meta_path}: cannot be read ({exc.strerror or exc})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{meta_path}: not JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise InputError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
        try:
            input_ids = load_file(str(tokens)).get("input_ids")
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise InputError(f"{tokens}: not a readable safetensors file ({exc})") from None
        _check_windows(tokens, input_ids, meta)
        return cls(input_ids, meta)


def _check_windows(path: Path, input_ids: torch.Tensor | None, meta: dict) -> None:
    """InputError unless `input_ids` are the windows calib.json describes: an int64 [N, L]
    tensor (N >= 1, L >= 2) of the recorded samples and seq_len, whose bytes have the recorded
    sha256 (a set edited or damaged since it was drawn is not calibrated on silently)."""
    if input_ids is None or input_ids.dtype != torch.long or input_ids.dim() != 2:
        found = "no input_ids" if input_ids is None else f"{input_ids.dtype} {list(input_ids.shape)}"
        raise InputError(f"{path}: expected input_ids, int64 [windows, tokens]; found {found}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 2:
        raise InputError(f"{path}: input_ids {list(input_ids.shape)}: expected at least 1 window of 2 tokens")
    recorded = (meta.get("samples"), meta.get("seq_len"))
    if None not in recorded and tuple(input_ids.shape) != recorded:
        raise InputError(f"{path}: input_ids {list(input_ids.shape)}, but {CALIB_META} records {recorded[0]} windows "
                         f"of {recorded[1]} tokens")
    digest = meta.get("windows_sha256")
    if digest is not None and hashlib.sha256(input_ids.numpy().tobytes()).hexdigest() != digest:
        raise InputError(f"{path}: the windows no longer have the sha256 {CALIB_META} records (edited or damaged "
                         "since they were drawn); draw them again with `maverick-quant calibrate`")


# Tokens that end a document in pretraining, by family: Llama 3 and 4, GPT-2's BPE (SmolLM2), Llama 2.
# An instruct tokenizer's EOS is its end of turn (<|eot|>, <|eot_id|>, <|im_end|>): not a document's end.
END_OF_TEXT_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>")


def document_separator(tokenizer) -> int | None:
    """The id that joins two documents: the first of END_OF_TEXT_TOKENS in the vocabulary,
    else the tokenizer's EOS (None without either)."""
    vocab = tokenizer.get_vocab()
    found = next((vocab[token] for token in END_OF_TEXT_TOKENS if token in vocab), None)
    return found if found is not None else tokenizer.eos_token_id


def token_stream(records: list[str], tokenizer, separate_documents: bool = True) -> torch.Tensor:
    """All records tokenized (no special tokens added) and joined by the end-of-text token
    (`document_separator`): int64 [T]. Records rendered by a chat template end their turns with
    the template's own tokens, so they are joined without one (`separate_documents=False`): no
    doubled end of turn that real chats never hold."""
    end_of_text = document_separator(tokenizer) if separate_documents else None
    separator = torch.tensor([end_of_text] if end_of_text is not None else [], dtype=torch.long)
    parts: list[torch.Tensor] = []
    for record in records:
        if parts:
            parts.append(separator)
        parts.extend(record_ids(record, tokenizer))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


# A record longer than this (characters) is tokenized piece by piece: the fast tokenizer keeps
# offsets and more per token (about 600 bytes), so a 1 GB text in one call would take ~150 GB.
PIECE_CHARS = 1 << 20
SEAM_CHARS = 512  # characters each side of a cut that check_cut_is_invisible tokenizes


def record_ids(text: str, tokenizer) -> list[torch.Tensor]:
    """The token ids of `text` (no special tokens added) as int64 pieces: the whole text in one
    call, or, for a text longer than PIECE_CHARS, pieces cut after newlines that a word follows
    (CUT_AFTER, where byte-level BPE pre-tokenizers split anyway), provided that no cut
    changes a token (`cut_is_invisible` at every cut, ~1 KiB of text each: a SentencePiece
    tokenizer's dummy prefix would add one at each piece's start; the text then goes whole)."""
    pieces = text_pieces(text, PIECE_CHARS)
    if not all(cut_is_invisible(before, after, tokenizer) for before, after in zip(pieces, pieces[1:])):
        pieces = [text]
    return [torch.tensor(tokenizer(piece, add_special_tokens=False)["input_ids"], dtype=torch.long) for piece in pieces]


# Where a long text is cut: right after a newline that a space and a word follow, or that a word
# follows directly and a non-space character precedes. GPT-2's `\s+(?!\S)` leaves a whitespace
# run's last character to the word after it only when no space begins that word: "\n\nThe" is
# "\n", "\n", "The" in one call but "\n\n" | "The" cut in two; " \n The" is " \n", " The" either
# way. Llama 3's `\s*[\r\n]+` ends a token at any such newline.
CUT_AFTER = re.compile(r"\n(?= \S)|(?<=\S)\n(?=\S)")


def text_pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of at least `size` characters (the last may be shorter), each
    right after a newline CUT_AFTER accepts; one piece where there is none."""
    pieces, start = [], 0
    while len(text) - start > size and (cut := CUT_AFTER.search(text, start + size)) is not None:
        pieces.append(text[start : cut.end()])
        start = cut.end()
    return pieces + [text[start:]]


def cut_is_invisible(before: str, after: str, tokenizer) -> bool:
    """Whether tokenizing the SEAM_CHARS either side of the cut between `before` and `after`
    separately gives the ids of tokenizing them together."""
    left, right = before[-SEAM_CHARS:], after[:SEAM_CHARS]
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return ids(left) + ids(right) == ids(left + right)


def draw_windows(stream: torch.Tensor, spec: CalibSpec, source: str) -> torch.Tensor:
    """N windows [N, L] of the stream [T], at starts a generator seeded with `spec.seed` draws.

    random:   N starts uniform in [0, T - L], drawn independently (windows may overlap).
    disjoint: the text is cut into S = T // L slots after an offset uniform in [0, T - S L];
              N of the S slots are drawn without replacement (N <= S, else InputError)."""
    total = stream.numel()
    if total < spec.seq_len:
        raise InputError(f"{source}: only {total} tokens of calibration text, need at least seq_len={spec.seq_len}")
    generator = torch.Generator().manual_seed(spec.seed)
    if spec.windows == "disjoint":
        slots = total // spec.seq_len
        if spec.samples > slots:
            raise InputError(f"{source}: windows=disjoint: {spec.samples} windows of {spec.seq_len} tokens need "
                             f"{spec.samples * spec.seq_len} tokens, the text has {total} ({slots} windows); give more "
                             "text, fewer samples or a shorter seq_len, or draw random windows (they may overlap)")
        offset = int(torch.randint(0, total - slots * spec.seq_len + 1, (1,), generator=generator))
        starts = offset + spec.seq_len * torch.randperm(slots, generator=generator)[: spec.samples]
    else:
        starts = torch.randint(0, total - spec.seq_len + 1, (spec.samples,), generator=generator)
    return torch.stack([stream[s : s + spec.seq_len] for s in starts.tolist()])


def contiguous_windows(stream: torch.Tensor, length: int, max_windows: int | None, source: str) -> torch.Tensor:
    """Non-overlapping windows [W, L] from the start of the stream (evaluation protocol)."""
    count = stream.numel() // length
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise InputError(f"{source}: only {stream.numel()} tokens, need at least one window of {length}")
    return stream[: count * length].view(count, length)


def sha256_text(records: list[str]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.encode("utf-8") + b"\0")
    return digest.hexdigest()


def build_calibration(records: list[str], tokenizer, spec: CalibSpec, source: str) -> CalibrationSet:
    """Windows drawn from the records, with the provenance a later run needs to trust them."""
    if not records:
        raise InputError(f"{source}: calibration data is empty")
    stream = token_stream(records, tokenizer, separate_documents=not spec.chat_template)
    windows = draw_windows(stream, spec, source)
    bos_first = spec.bos and adds_bos(tokenizer)
    if bos_first:
        windows[:, 0] = tokenizer.bos_token_id
    meta = {
        "source": source,
        "text_tokens": stream.numel(),
        "data_sha256": sha256_text(records),
        "samples": spec.samples,
        "seq_len": spec.seq_len,
        "seed": spec.seed,
        "chat_template": spec.chat_template,
        "windows": spec.windows,
        "bos_first": bos_first,
        "separator_id": document_separator(tokenizer) if not spec.chat_template else None,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
    }
    return CalibrationSet(windows, meta)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (every token with its id, added tokens included) and
    its BOS/EOS ids. Two tokenizers with the same fingerprint give the same ids the same meaning;
    their normalizer and pre-tokenizer rules are not hashed (they are not stable across library
    versions, and a vocabulary mismatch is the mistake this catches: a calibration set made
    with another model family's tokenizer whose ids fall inside this model's vocabulary)."""
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    payload = {"vocab": by_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()  # ASCII escapes: any token encodes


def load_calibration_for(calib_dir: Path, model_dir: Path, config) -> CalibrationSet:
    """The calibration set in `calib_dir`, checked against the model it will calibrate (its
    transformers `config`): every id inside the model's vocabulary, windows no longer than its
    max_position_embeddings, and (for sets that record it) the tokenizer the windows were made
    with equal to `model_dir`'s. InputError otherwise: windows of another tokenizer would
    calibrate the model on text it never reads, with no error anywhere later."""
    from maverick_quant.model_config import check_positions

    calibration = CalibrationSet.load(calib_dir)
    ids = calibration.input_ids
    check_positions(config, ids.shape[-1], f"--calib {calib_dir}'s windows", model_dir)
    check_ids_in_vocabulary(ids, config, f"--calib {calib_dir}", model_dir, "the windows were made for another model")
    recorded = calibration.meta.get("tokenizer_sha256")
    if recorded is None:
        click.echo(f"note: --calib {calib_dir} records no tokenizer fingerprint (made by an older version): "
                   f"not checked against {model_dir}'s tokenizer")
        return calibration
    try:
        tokenizer = load_tokenizer(model_dir)
    except InputError as exc:
        click.echo(f"note: --calib {calib_dir} not checked against the model's tokenizer: {exc}")
        return calibration
    if tokenizer_fingerprint(tokenizer) != recorded:
        raise InputError(f"--calib {calib_dir}: its windows were tokenized by another tokenizer "
                         f"({calibration.meta.get('tokenizer') or 'unnamed'}) than {model_dir}'s: make the "
                         "calibration set again with this model (`maverick-quant calibrate`)")
    return calibration


def overlap_note(calibration: CalibrationSet) -> str | None:
    """A note when the windows, drawn at random starts (GPTQ's convention), ask for more tokens
    than the text holds, so they must overlap (they may overlap anyway; `windows=disjoint`
    never do): None otherwise."""
    text = calibration.meta.get("text_tokens")
    drawn = calibration.input_ids.numel()
    if not text or drawn <= text:
        return None
    return (f"note: {calibration.input_ids.shape[0]} windows x {calibration.input_ids.shape[1]} tokens draw "
            f"{drawn / text:.1f}x the {text} tokens of {calibration.meta.get('source')}: they overlap, so the "
            "calibration sees less distinct text than its size suggests; give more text or fewer samples")


def load_tokenizer(model_dir: Path):
    """The tokenizer of the local model folder `model_dir`: never downloaded (a name that is not
    a folder here is refused, not looked up on a model hub), never trust_remote_code."""
    from transformers import AutoTokenizer

    from maverick_quant.checkpoint import NEVER_DOWNLOADS

    if not Path(model_dir).is_dir():
        raise InputError(f"{model_dir}: not a model folder here ({NEVER_DOWNLOADS})")
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{model_dir}: cannot load its tokenizer ({exc})") from None


def check_ids_in_vocabulary(ids: torch.Tensor, config, what: str, model_dir: Path, why: str) -> None:
    """InputError naming `what` when a token id of `ids` lies outside the embedding of the model
    whose transformers `config` this is (`why`: the likely cause): the layers would fail on it
    hours in (or, on a GPU, read memory past the table)."""
    vocab_size = config.get_text_config().vocab_size
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise InputError(f"{what}: token ids span [{int(ids.min())}, {int(ids.max())}], outside {model_dir}'s "
                         f"vocabulary of {vocab_size}: {why}")


def make_calibration(model_dir: Path, data: str, spec: CalibSpec, tokenizer=None) -> CalibrationSet:
    """Calibration windows from `data`: a .txt/.jsonl path, or "self" for model-generated text;
    InputError when they do not fit the model (check_positions, check_ids_in_vocabulary)."""
    from maverick_quant.model_config import load_model_config

    config = load_model_config(Path(model_dir))
    calibration = _draw_calibration(model_dir, data, spec, config, tokenizer)
    check_ids_in_vocabulary(calibration.input_ids, config, f"--data {data}", model_dir,
                            "its tokenizer (or end-of-text token) holds ids the model has no embedding for")
    return calibration


def _draw_calibration(model_dir: Path, data: str, spec: CalibSpec, config, tokenizer=None) -> CalibrationSet:
    from maverick_quant.model_config import check_positions

    check_positions(config, spec.seq_len, "--seq-len", model_dir)
    tokenizer = tokenizer or load_tokenizer(model_dir)
    if data == "self" and spec.chat_template:
        raise InputError("--chat-template renders the 'messages' of a JSON Lines file; --data self is generated text")
    if data == "self":
        from maverick_quant.calibration.selfgen import generate_self_text

        new_tokens = min(spec.seq_len, 256)
        count = -(-spec.samples * spec.seq_len // new_tokens)
        records = generate_self_text(Path(model_dir), n_samples=count, max_new_tokens=new_tokens, seed=spec.seed)
        return build_calibration(records, tokenizer, spec, source="self-generated")
    return build_calibration(read_records(Path(data), tokenizer, spec.chat_template), tokenizer, spec, source=str(data))


PROTOCOLS = ("gptq", "llama.cpp")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS first when it encodes text (Llama 3 and 4 do, SmolLM2 does
    not; a GGUF converted from it records the same as `tokenizer.ggml.add_bos_token`)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def eval_windows(data: str | Path, tokenizer, ctx: int, max_windows: int | None, protocol: str = "gptq") -> torch.Tensor:
    """Evaluation windows [W, ctx]: the text tokenized whole and cut into non-overlapping
    windows from the start; which tokens are scored is `scored_from(protocol, ctx)`.

    "gptq": BOS (when the tokenizer has one) only at the very start of the text.
    "llama.cpp", as `llama-perplexity`: where the vocabulary adds BOS (`adds_bos`), BOS at the
    start and as the first token of every window (`tokens[batch_start] = BOS` when add_bos);
    where it does not, the plain text, with no BOS anywhere."""
    if protocol not in PROTOCOLS:
        raise InputError(f"--protocol {protocol!r}: expected one of {list(PROTOCOLS)}")
    records = read_records(Path(data), tokenizer, chat_template=False, calibration=False)
    if not records:
        raise InputError(f"{data}: evaluation data is empty")
    stream = token_stream(records, tokenizer)
    bos = tokenizer.bos_token_id if protocol == "gptq" or adds_bos(tokenizer) else None
    if bos is not None:
        stream = torch.cat([torch.tensor([bos]), stream])
    windows = contiguous_windows(stream, ctx, max_windows, str(data))
    if protocol == "llama.cpp" and bos is not None:
        windows[:, 0] = bos
    return windows


def scored_from(protocol: str, ctx: int) -> int:
    """First scored position of a window: every token after the first (GPTQ paper), or, as
    llama-perplexity (first = n_ctx/2; logits first..n_ctx-2 score tokens first+1..n_ctx-1),
    positions ctx//2 + 1 .. ctx-1."""
    return ctx // 2 + 1 if protocol == "llama.cpp" else 1


def check_scored(protocol: str, ctx: int, key: str = "--ctx") -> None:
    """InputError (naming the option `key`) when windows of `ctx` tokens under `protocol` score no token."""
    if scored_from(protocol, ctx) >= ctx:
        raise InputError(f"{key} {ctx} with protocol {protocol}: no token of a window is scored (the protocol scores "
                         f"positions {scored_from(protocol, ctx)}..{ctx - 1}); use a longer context")
