"""Calibration windows: reproducible by seed, JSONL text and chat records, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from maverick_quant.calibration.data import CalibrationSet, eval_windows, load_tokenizer, make_calibration
from maverick_quant.errors import InputError
from maverick_quant.recipe import CalibSpec


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return load_tokenizer(tiny_llama_dir)


def test_windows_are_reproducible_and_seeded(tiny_llama_dir, tokenizer, small_text_file: Path, tmp_path: Path) -> None:
    spec = CalibSpec(samples=5, seq_len=32, seed=3)
    first = make_calibration(tiny_llama_dir, str(small_text_file), spec, tokenizer)
    again = make_calibration(tiny_llama_dir, str(small_text_file), spec, tokenizer)
    other = make_calibration(tiny_llama_dir, str(small_text_file), CalibSpec(samples=5, seq_len=32, seed=4), tokenizer)
    assert first.input_ids.shape == (5, 32) and torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)
    first.save(tmp_path)
    loaded = CalibrationSet.load(tmp_path)
    assert torch.equal(loaded.input_ids, first.input_ids) and loaded.meta["data_sha256"] == first.meta["data_sha256"]


def test_jsonl_text_and_chat_records(tiny_llama_dir, tokenizer, tmp_path: Path) -> None:
    text_file = tmp_path / "data.jsonl"
    text_file.write_text("\n".join(json.dumps({"text": f"record number {i} says hello world"}) for i in range(40)))
    calibration = make_calibration(tiny_llama_dir, str(text_file), CalibSpec(samples=2, seq_len=16), tokenizer)
    assert calibration.input_ids.shape == (2, 16)
    chat_file = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    chat_file.write_text("\n".join(json.dumps({"messages": messages}) for _ in range(20)))
    chat = make_calibration(tiny_llama_dir, str(chat_file), CalibSpec(samples=2, seq_len=16, chat_template=True), tokenizer)
    rendered = tokenizer.decode(chat.input_ids[0])
    assert "assistant" in rendered or "user" in rendered
    plain = tmp_path / "chat.txt"  # a chat template asked of plain text (or of self) is refused, not left out
    plain.write_text("some plain text " * 50)
    for data in (str(plain), "self"):
        with pytest.raises(InputError, match="--chat-template renders the 'messages' of a JSON Lines file"):
            make_calibration(tiny_llama_dir, data, CalibSpec(samples=2, seq_len=16, chat_template=True), tokenizer)


def test_json_lines_files_read_record_by_record(tiny_llama_dir, tokenizer, tmp_path: Path) -> None:
    """Lines end at \\n only (a JSON string may hold U+2028 or U+0085 raw, as json.dumps(...,
    ensure_ascii=False) writes it); `.json`/`.ndjson` JSON Lines (what Dataset.to_json writes)
    are records, not plain text whose JSON syntax would be calibrated on; chat records are
    joined without an EOS of ours after the template's own end of turn."""
    from maverick_quant.calibration.data import token_stream
    from maverick_quant.calibration.records import read_records

    texts = ["first line\u2028still the first record", "second\x85record", "third record"]
    body = "\n".join(json.dumps({"text": text}, ensure_ascii=False) for text in texts) + "\n"
    for suffix in (".jsonl", ".json", ".ndjson"):
        path = tmp_path / f"data{suffix}"
        path.write_text(body, encoding="utf-8")
        assert read_records(path, tokenizer, False) == texts, suffix
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    chat_file = tmp_path / "chat.jsonl"
    chat_file.write_text("\n".join(json.dumps({"messages": messages}) for _ in range(3)))
    records = read_records(chat_file, tokenizer, True)
    rendered = [tokenizer(record, add_special_tokens=False)["input_ids"] for record in records]
    assert token_stream(records, tokenizer, separate_documents=False).tolist() == [t for ids in rendered for t in ids]
    chat = make_calibration(tiny_llama_dir, str(chat_file), CalibSpec(samples=1, seq_len=len(rendered[0]) * 3,
                                                                      chat_template=True), tokenizer)
    assert chat.input_ids[0].tolist() == [t for ids in rendered for t in ids]


def test_plain_text_that_is_not_utf8_is_refused_naming_the_line(tiny_llama_dir, tokenizer, tmp_path: Path) -> None:
    """Plain text was read with replacement characters: a binary or Latin-1 file calibrated on
    U+FFFD runs, silently. It is refused naming the file, line and byte."""
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nsecond line, caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match=re.escape("latin1.txt:2: not UTF-8 (byte 0xe9), at file offset 27")):
        make_calibration(tiny_llama_dir, str(path), CalibSpec(samples=1, seq_len=2), tokenizer)


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n\xe9t\xe9\n', "bad.jsonl:2: not UTF-8 (byte 0xe9)"),
    (b'{\n  "text": "pretty"\n}\n', "bad.jsonl:1: not valid JSON (Expecting property name enclosed in double quotes); "
                                    ".jsonl files are read as JSON Lines, one JSON object per line"),
    (b'["a list"]\n', "bad.jsonl:1: expected a JSON object per record, got list"),
    (b'{"text": "a \\ud800 b"}\n', "bad.jsonl:1: the text holds an unpaired UTF-16 surrogate ('\\ud800'"),
    (b'{"messages": []}\n', "bad.jsonl:1: --chat-template expects a non-empty 'messages' list"),
    (b'{"messages": ["hi"]}\n', "bad.jsonl:1: --chat-template expects a non-empty 'messages' list"),
])
def test_malformed_json_lines_name_the_file_and_line(tiny_llama_dir, tokenizer, tmp_path: Path, content: bytes,
                                                     message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(message)):
        make_calibration(tiny_llama_dir, str(path), CalibSpec(samples=1, seq_len=2, chat_template=b"messages" in content),
                         tokenizer)


def test_data_files_are_read_as_their_writers_meant_them(tokenizer, tmp_path: Path) -> None:
    """An editor's byte-order mark was tokenized as text (and a JSON Lines one refused); a
    Windows text file's \r became a token per line in calibration; a .json array (Alpaca's
    layout) was refused; empty records added bare separators; a gzip file was called "not
    UTF-8" and a folder "not found"."""
    from maverick_quant.calibration.records import read_records

    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfHello there")
    assert read_records(bom, tokenizer, False) == ["Hello there"]
    bom_lines = tmp_path / "bom.jsonl"
    bom_lines.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n')
    assert read_records(bom_lines, tokenizer, False) == ["one", "two"]
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"first line\r\nsecond line\r\n")
    assert read_records(crlf, tokenizer, False) == ["first line\nsecond line\n"]
    assert read_records(crlf, tokenizer, False, calibration=False) == ["first line\r\nsecond line\r\n"]  # as llama.cpp reads it
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps([{"text": "one"}, {"text": ""}, {"text": "  "}, {"text": "four"}], indent=2))
    assert read_records(array, tokenizer, False) == ["one", "four"]
    lines = tmp_path / "hf.jsonl"  # Dataset.to_json of wikitext holds empty records
    lines.write_text("\n".join(json.dumps({"text": text}) for text in ("one", "", "two")))
    assert read_records(lines, tokenizer, False) == ["one", "two"]
    array.write_text(json.dumps([{"text": "one"}, ["two"]]))
    with pytest.raises(InputError, match=r"alpaca.json: record 1: expected a JSON object per record, got list"):
        read_records(array, tokenizer, False)
    gz = tmp_path / "text.txt.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00rest")
    with pytest.raises(InputError, match=r"text.txt.gz: gzip-compressed; decompress it first"):
        read_records(gz, tokenizer, False)
    with pytest.raises(InputError, match=r": a directory; expected a text or JSON Lines file"):
        read_records(tmp_path, tokenizer, False)
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"body": "x"}\n')
    with pytest.raises(InputError, match=r"no_text.jsonl:1: expected a string 'text' field$"):  # validate has no --chat-template
        read_records(no_text, tokenizer, False, calibration=False)


def test_records_are_joined_by_the_end_of_text_token_not_the_end_of_turn(tokenizer) -> None:
    """SmolLM2-Instruct's EOS is <|im_end|>, its end of turn: documents joined by it read as
    chat turns. They are joined by <|endoftext|>, as in pretraining."""
    from maverick_quant.calibration.data import document_separator, token_stream

    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert document_separator(tokenizer) == end_of_text != tokenizer.eos_token_id
    one, two = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("one", "two"))
    assert token_stream(["one", "two"], tokenizer).tolist() == [*one, end_of_text, *two]


def test_a_chat_template_that_prints_the_date_renders_the_same_on_any_day(tiny_llama_dir, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """Llama 3.x templates print today's date (strftime_now, or date_string): the same records
    gave other windows the next day, so a lock or a --resume no longer matched."""
    import datetime

    from maverick_quant.calibration import records

    tokenizer = load_tokenizer(tiny_llama_dir)
    tokenizer.chat_template = ("{{ 'Today: ' + strftime_now('%d %b %Y') + ' / ' + (date_string | default('none')) }}"
                               "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    first = records.read_records(chat, tokenizer, True)
    monkeypatch.setattr(records, "TEMPLATE_DATE", datetime.datetime(2031, 1, 2))  # as if run another day
    assert first == ["Today: 26 Jul 2024 / 26 Jul 2024hi"]
    assert records.read_records(chat, tokenizer, True) == ["Today: 02 Jan 2031 / 02 Jan 2031hi"]  # the date is ours alone


def test_a_model_name_that_is_not_a_folder_here_is_refused_never_downloaded(tmp_path: Path, monkeypatch) -> None:
    """A hub name is refused before transformers could look it up (no network is touched:
    HF_HUB_OFFLINE would make a lookup fail differently)."""
    from click.testing import CliRunner

    from maverick_quant.cli import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = tmp_path / "t.txt"
    text.write_text("words " * 100)
    result = CliRunner().invoke(cli, ["calibrate", "meta-llama/Llama-3.2-1B", "--data", str(text), "--out",
                                      str(tmp_path / "calib"), "--samples", "1", "--seq-len", "8"])
    assert result.exit_code == 2 and "meta-llama/Llama-3.2-1B: not a model folder here" in result.output, result.output
    assert "never downloads" in result.output and not (tmp_path / "calib").exists()


@pytest.mark.parametrize("content, match", [("", "empty"), ("short text", "need at least"), ('{"text": 3}\n', "string 'text'")])
def test_bad_calibration_data(tiny_llama_dir, tokenizer, tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / ("bad.jsonl" if content.startswith("{") else "bad.txt")
    path.write_text(content)
    with pytest.raises(InputError, match=match):
        make_calibration(tiny_llama_dir, str(path), CalibSpec(samples=2, seq_len=64), tokenizer)


def test_eval_windows_are_contiguous(tokenizer, small_text_file: Path) -> None:
    """GPTQ protocol: BOS once, then the text's own tokens, cut into consecutive windows."""
    from maverick_quant.calibration.data import token_stream
    from maverick_quant.calibration.records import read_records

    windows = eval_windows(small_text_file, tokenizer, ctx=16, max_windows=3)
    stream = token_stream(read_records(small_text_file, tokenizer, False), tokenizer)
    assert windows.shape == (3, 16)
    assert windows.flatten().tolist() == [tokenizer.bos_token_id, *stream[: 3 * 16 - 1].tolist()]


def test_calibration_windows_are_runs_of_the_text(tiny_llama_dir, tokenizer, small_text_file: Path) -> None:
    from maverick_quant.calibration.data import token_stream
    from maverick_quant.calibration.records import read_records

    stream = token_stream(read_records(small_text_file, tokenizer, False), tokenizer).tolist()
    for windows in ("random", "disjoint"):
        calibration = make_calibration(tiny_llama_dir, str(small_text_file), CalibSpec(samples=6, seq_len=24, seed=5,
                                                                                       windows=windows), tokenizer)
        for row in calibration.input_ids.tolist():
            assert any(stream[s : s + 24] == row for s in range(len(stream) - 23)), windows


def test_self_generated_data_is_refused_before_loading_a_model_larger_than_memory(tiny_llama_dir, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """`--data self` loads the whole model in fp32: with less memory available than that (here
    made so), calibrate refuses before loading it, naming the model and both sizes."""
    import math

    from click.testing import CliRunner

    from maverick_quant import host_memory
    from maverick_quant.calibration import selfgen
    from maverick_quant.checkpoint import Checkpoint
    from maverick_quant.cli import cli

    fp32 = 4 * sum(math.prod(info.shape) for info in Checkpoint(tiny_llama_dir).tensors.values())
    selfgen.check_fits_in_memory(tiny_llama_dir, available=fp32)  # exactly enough: passes
    with pytest.raises(InputError, match=r"whole model loaded in fp32, .* GiB, and this machine has"):
        selfgen.check_fits_in_memory(tiny_llama_dir, available=fp32 - 1)

    monkeypatch.setattr(host_memory, "available_bytes", lambda: 1024)
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_llama_dir), "--data", "self", "--samples", "2",
                                      "--seq-len", "16", "--out", str(tmp_path / "calib")])
    assert result.exit_code == 2 and str(tiny_llama_dir) in result.output and "pass the file instead" in result.output
    assert not (tmp_path / "calib").exists()


def test_self_generated_data_from_a_model_whose_logits_turn_nan_is_refused_naming_it(tiny_llama_dir, tmp_path: Path) -> None:
    """Layer 1's gate/up x 1e21 overflow fp32: sampling failed with torch's 'probability tensor
    contains inf, nan' traceback (exit 3)."""
    import shutil

    from click.testing import CliRunner

    from maverick_quant.cli import cli
    from tests.test_checkpoint import _rewrite_tensor, _tensor

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    for name in ("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        _rewrite_tensor(model, name, _tensor(model, name) * 1e21)
    result = CliRunner().invoke(cli, ["calibrate", str(model), "--data", "self", "--samples", "2", "--seq-len", "16",
                                      "--out", str(tmp_path / "calib")])
    assert result.exit_code == 2, result.output
    assert f"{model}: the model's logits became NaN/Inf while it generated text of its own" in result.output
    assert not (tmp_path / "calib").exists()


def test_self_written_evaluation_text_never_shares_the_calibration_seed(tmp_path: Path, monkeypatch) -> None:
    """Generation with one seed starts with the same texts: a recipe calibrating on `self` with
    the evaluation text's seed would have validated on its own calibration text."""
    from maverick_quant.calibration import selfgen
    from maverick_quant.demo import EVAL_SEED, write_eval_text

    seeds = []
    monkeypatch.setattr(selfgen, "generate_self_text", lambda *args, seed, **kwargs: seeds.append(seed) or ["text"])
    for calibration_seed in (None, 0, EVAL_SEED):
        write_eval_text(tmp_path, tmp_path / "eval.txt", 2, 16, calibration_seed)
    assert seeds[:2] == [EVAL_SEED, EVAL_SEED] and seeds[2] != EVAL_SEED


def test_windows_that_must_overlap_come_with_a_note(tiny_llama_dir, tokenizer, tmp_path: Path) -> None:
    """Random starts (GPTQ's convention) over a text shorter than samples x seq_len overlap:
    `calibrate` says so instead of silently calibrating on a few distinct windows."""
    from click.testing import CliRunner

    from maverick_quant.calibration.data import overlap_note
    from maverick_quant.cli import cli

    text = tmp_path / "short.txt"
    text.write_text("The river runs past the old mill and under the stone bridge. " * 20)
    small = make_calibration(tiny_llama_dir, str(text), CalibSpec(samples=2, seq_len=16), tokenizer)
    assert overlap_note(small) is None and small.meta["text_tokens"] > 32
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_llama_dir), "--data", str(text), "--samples", "64",
                                      "--seq-len", "64", "--out", str(tmp_path / "calib")])
    assert result.exit_code == 0 and "they overlap" in result.output and "short.txt" in result.output, result.output


def test_disjoint_windows_share_no_token_and_are_seeded(tmp_path: Path) -> None:
    """windows=disjoint: over a stream of distinct tokens (0..T-1) no position is drawn twice,
    the windows are the stream's own runs, the draw follows the seed, and asking for more
    windows than fit is refused, naming the option; random windows on the same stream overlap."""
    from maverick_quant.calibration.data import draw_windows

    stream = torch.arange(1000)
    spec = CalibSpec(samples=15, seq_len=64, seed=7, windows="disjoint")  # 15 of the 15 slots: a tight fit
    windows = draw_windows(stream, spec, "text.txt")
    assert windows.shape == (15, 64) and windows.unique().numel() == 15 * 64
    assert torch.equal(windows - windows[:, :1], torch.arange(64).expand(15, 64))  # contiguous runs
    assert torch.equal(windows, draw_windows(stream, spec, "text.txt"))
    assert not torch.equal(windows, draw_windows(stream, CalibSpec(samples=15, seq_len=64, seed=8, windows="disjoint"), "t"))
    randomly = draw_windows(stream, CalibSpec(samples=15, seq_len=64, seed=7), "text.txt")
    assert randomly.unique().numel() < 15 * 64  # what disjoint windows avoid
    with pytest.raises(InputError, match=r"text.txt: windows=disjoint: 16 windows of 64 tokens need 1024 tokens, "
                                         r"the text has 1000 \(15 windows\)"):
        draw_windows(stream, CalibSpec(samples=16, seq_len=64, windows="disjoint"), "text.txt")
    with pytest.raises(InputError, match="windows='overlapping': expected one of random, disjoint"):
        CalibSpec(windows="overlapping")


def test_calibrate_draws_disjoint_windows_and_records_it(tiny_llama_dir, small_text_file: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from maverick_quant.cli import cli

    result = CliRunner().invoke(cli, ["calibrate", str(tiny_llama_dir), "--data", str(small_text_file), "--samples", "4",
                                      "--seq-len", "16", "--windows", "disjoint", "--out", str(tmp_path / "calib")])
    assert result.exit_code == 0, result.output
    calibration = CalibrationSet.load(tmp_path / "calib")
    assert calibration.meta["windows"] == "disjoint" and calibration.input_ids.shape == (4, 16)


def test_windows_start_with_bos_where_the_tokenizer_adds_it_unless_told_not_to(small_text_file: Path) -> None:
    """Llama 4 always reads BOS at position 0 (its attention sink); calibration windows cut
    mid-text never held it. Now each window starts with BOS where the tokenizer adds one, the
    rest of the window unchanged; `bos=False` keeps the text as drawn."""
    from maverick_quant.calibration.data import build_calibration
    from maverick_quant.calibration.records import read_records

    from test_protocols import _BosTokenizer

    tokenizer = _BosTokenizer()
    records = read_records(small_text_file, tokenizer, chat_template=False)
    spec = CalibSpec(samples=6, seq_len=16, seed=3)
    with_bos = build_calibration(records, tokenizer, spec, "text")
    plain = build_calibration(records, tokenizer, CalibSpec(samples=6, seq_len=16, seed=3, bos=False), "text")
    assert (with_bos.input_ids[:, 0] == tokenizer.bos_token_id).all() and with_bos.meta["bos_first"]
    assert not (plain.input_ids[:, 0] == tokenizer.bos_token_id).any() and not plain.meta["bos_first"]
    assert torch.equal(with_bos.input_ids[:, 1:], plain.input_ids[:, 1:])


def test_a_tokenizer_that_adds_no_bos_draws_the_same_windows_either_way(tokenizer, small_text_file: Path) -> None:
    """SmolLM2's tokenizer has a BOS token but adds none: its windows stay as drawn."""
    from maverick_quant.calibration.data import build_calibration
    from maverick_quant.calibration.records import read_records

    records = read_records(small_text_file, tokenizer, chat_template=False)
    drawn = [build_calibration(records, tokenizer, CalibSpec(samples=4, seq_len=32, bos=bos), "text") for bos in (True, False)]
    assert torch.equal(drawn[0].input_ids, drawn[1].input_ids) and not drawn[0].meta["bos_first"]


def test_a_long_text_is_tokenized_in_pieces_with_the_ids_of_one_call(tokenizer, wiki_valid_path: Path,
                                                                     monkeypatch) -> None:
    """A plain text took ~600 bytes per token in one tokenizer call (a 1 GB corpus: ~150 GB).
    Cut into pieces before lines that start a word, it gives the same ids; a tokenizer whose
    pieces would differ at a cut (SentencePiece's dummy prefix) gets the whole text at once."""
    from maverick_quant.calibration import data

    text = wiki_valid_path.read_text(encoding="utf-8")[:60_000]
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(data, "PIECE_CHARS", 5_000)
    pieces = data.record_ids(text, tokenizer)
    assert len(pieces) >= 10 and torch.cat(pieces).tolist() == whole
    assert "".join(data.text_pieces(text, 5_000)) == text
    # blank lines, indented lines: GPT-2's BPE keeps a whitespace run at a piece's end whole ("\n\n"
    # is one id) where one call gives its last character to the word after ("\n", "\n", "The")
    prose = "".join(f"Line {i} of the text.\n\nThe next one{i}.\n  \nIndented\n    code {i}\n" for i in range(2_000))
    cut = data.record_ids(prose, tokenizer)
    assert len(cut) > 5 and torch.cat(cut).tolist() == tokenizer(prose, add_special_tokens=False)["input_ids"]

    class DummyPrefix:  # marks the start of every call, as a dummy prefix changes a piece's first token
        def __call__(self, piece, add_special_tokens):
            return {"input_ids": [-1, *tokenizer(piece, add_special_tokens=False)["input_ids"]]}

    assert [ids.tolist() for ids in data.record_ids(text, DummyPrefix())] == [[-1, *whole]]


def test_self_generated_samples_never_open_on_an_added_token(tokenizer) -> None:
    """The first token of a `self` sample was drawn over the whole vocabulary, special and
    reserved tokens included (Llama 4 reserves about a thousand)."""
    from maverick_quant.calibration.selfgen import first_tokens

    added = set(tokenizer.added_tokens_decoder)
    generator = torch.Generator().manual_seed(3)
    plain = torch.randint(0, len(tokenizer), (4000, 1), generator=generator)
    hits = [row for row in range(4000) if int(plain[row, 0]) in added]
    assert hits  # the seed draws some added tokens: 17 of SmolLM2's 49,152 ids
    first = first_tokens(tokenizer, 4000, 3)
    assert not any(int(token) in added for token in first[:, 0])
    keep = [row for row in range(4000) if row not in hits]
    assert torch.equal(first[keep], plain[keep])  # every other sample keeps its draw


def test_windows_holding_ids_past_the_models_vocabulary_are_refused(tiny_llama_dir, small_text_file: Path,
                                                                    tmp_path: Path) -> None:
    """Ids the embedding has no row for (a tokenizer of more tokens than the model, an added
    end-of-text token) failed in the first layer, or read past the table on a GPU."""
    import shutil

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_llama_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    with pytest.raises(InputError, match=r"--data .*small.txt: token ids span \[\d+, \d+\], outside .* vocabulary of 100"):
        make_calibration(tmp_path, str(small_text_file), CalibSpec(samples=2, seq_len=16))
