"""bitfit.sdk.data: records, labels, the bundle's tokenizer, holdout splits and batches."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitfit.sdk import Personalizer, Predictor
from bitfit.sdk.bundle import Bundle, TextSpec
from bitfit.sdk.data import (
    SCORING_TOKENS, TextEncoder, batches, check_text, encode_labels, length_groups, load_examples, normalize_records, scoring_batches,
    split_holdout,
)
from bitfit.sdk.errors import InvalidArgumentError, BundleInvalidError, InvalidUserDataError

from sdk_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from sdk_fixtures import MAX_LENGTH, VOCAB, build_tokenizer, text_data, write_csv, write_jsonl


def fake_bundle(tokenizer_path, **text) -> SimpleNamespace:
    spec = TextSpec(tokenizer="tokenizer.json", max_length=text.pop("max_length", 16), **text)
    return SimpleNamespace(manifest=SimpleNamespace(text=spec), file=lambda key: tokenizer_path)


def test_normalize_records_from_every_form(tmp_path):
    pairs = [("good day", "pos"), ("bad day", "neg")]
    expected = [("good day", "pos"), ("bad day", "neg")]
    assert normalize_records(pairs) == expected
    assert normalize_records([list(x) for x in pairs]) == expected
    assert normalize_records([{"text": t, "label": label, "extra": 1} for t, label in pairs]) == expected
    assert normalize_records(write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": label} for t, label in pairs]
                                         + [{"text": "x", "label": 1}])) == [*expected, ("x", 1)]
    # CSV: quoted commas and newlines survive; integer labels become ints.
    csv_path = write_csv(tmp_path / "d.csv", [("good, really\ngood", "pos"), ("bad", 0)])
    assert normalize_records(csv_path) == [("good, really\ngood", "pos"), ("bad", 0)]
    blank_lines = tmp_path / "blank.jsonl"
    blank_lines.write_text('\n{"text": "a", "label": "pos"}\n\n', encoding="utf-8")
    assert normalize_records(str(blank_lines)) == [("a", "pos")]
    with pytest.raises(InvalidUserDataError, match="list of"):
        normalize_records(42)


def test_check_text():
    assert check_text("fine", "x") == "fine"
    assert check_text("caf\xe9".encode(), "x") == "caf\xe9"
    with pytest.raises(InvalidUserDataError, match="example 3: text is not valid UTF-8"):
        check_text(b"\xff\xfe", "example 3")
    with pytest.raises(InvalidUserDataError, match="not valid Unicode"):
        check_text("bad \ud800 surrogate", "x")
    with pytest.raises(InvalidUserDataError, match="got int"):
        check_text(5, "x")


def test_encode_labels_by_name_and_index(text_bundle):
    manifest = Bundle.open(text_bundle).manifest
    np.testing.assert_array_equal(encode_labels(["pos", "neg", "pos"], manifest), [1, 0, 1])
    np.testing.assert_array_equal(encode_labels([1, 0, np.int64(1)], manifest), [1, 0, 1])
    assert encode_labels([1, 0], manifest).dtype == np.int64
    for bad, message in [([True, 0], "must be a label name or an integer index"), ([0.5], "must be a label name"),
                         ([-1], "out of range"), (["POS"], "unknown label")]:
        with pytest.raises(InvalidUserDataError, match=message):
            encode_labels(bad, manifest)


def test_load_examples_removes_exact_repeats_only(text_bundle):
    bundle = Bundle.open(text_bundle)
    data = [("good day", "pos"), ("good day", "pos"), ("good day", "neg"), ("Good day", "pos")]
    examples = load_examples(data, bundle, TextEncoder(bundle))
    assert len(examples) == 3 and examples.duplicates_removed == 1
    assert examples.labels.tolist() == [1, 0, 1]


def test_text_encoder_pads_with_the_tokenizers_pad_id(tmp_path):
    # A tokenizer whose pad token is not "[PAD]" nor id 0 (like RoBERTa's "<pad>" = 1).
    vocab = ["<s>", "<pad>", "[UNK]", "good", "day", "bad"]
    path = build_tokenizer(tmp_path / "tokenizer.json", pad_token="<pad>", vocab=vocab)
    encoder = TextEncoder(fake_bundle(path, attention_mask="attention_mask"))
    assert encoder.pad_id == 1
    feeds = encoder.feeds_for_texts(["good day", "bad"])
    assert feeds["input_ids"].tolist() == [[3, 4], [5, 1]]
    assert feeds["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert set(feeds) == {"input_ids", "attention_mask"}


def test_text_encoder_truncates_and_fills_the_spec_inputs(tokenizer_file):
    encoder = TextEncoder(fake_bundle(tokenizer_file, max_length=4, input_ids="ids", attention_mask=None,
                                      token_type_ids="types"))
    feeds = encoder.feeds_for_texts(["good great nice love happy fun", "bad"])
    assert set(feeds) == {"ids", "types"}
    assert feeds["ids"].shape == (2, 4) and feeds["ids"].dtype == np.int64
    assert feeds["ids"][1].tolist() == [VOCAB.index("bad"), 0, 0, 0]
    assert encoder.feeds_for_texts(["unknownword good"])["ids"].tolist() == [[VOCAB.index("[UNK]"), VOCAB.index("good")]]


def test_long_texts_are_truncated_to_the_bundles_max_length(text_bundle, tmp_path):
    p = Personalizer(text_bundle, store=tmp_path)
    long_text = " ".join(["good", "great", "the", "movie", "was"] * 40)  # 200 words
    head = " ".join(long_text.split()[:MAX_LENGTH])
    feeds, rows = p.predictor.encode([long_text, "bad"])
    assert rows == 2 and feeds["input_ids"].shape == (2, MAX_LENGTH)
    np.testing.assert_allclose(p.predict([long_text]).logits, p.predict([head]).logits, atol=1e-6)
    r = p.personalize([(long_text, "pos"), ("bad day", "neg")], user="u", max_steps=1, progress_bar=False)
    assert r.steps == 1


def test_bundle_with_a_broken_tokenizer_is_refused(text_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(text_bundle, copy)
    (copy / "tokenizer.json").write_text("{not a tokenizer", encoding="utf-8")
    with pytest.raises(BundleInvalidError, match="tokenizer.json"):
        Predictor(Bundle.open(copy, verify="none"))
    with pytest.raises(BundleInvalidError, match="tokenizer.json"):
        Personalizer(copy, store=tmp_path / "store")  # the default verify="hashes" notices first


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 200), share=st.floats(0, 0.95), seed=st.integers(0, 2**16))
def test_split_holdout_is_a_partition(count, share, seed):
    size = min(count - 1, int(count * share))
    train, held = split_holdout(count, size, np.random.default_rng(seed))
    assert sorted([*train.tolist(), *held.tolist()]) == list(range(count))
    assert len(held) == size and len(train) == count - size >= 1
    again = split_holdout(count, size, np.random.default_rng(seed))
    assert train.tolist() == again[0].tolist() and held.tolist() == again[1].tolist()


def test_split_holdout_refuses_bad_sizes():
    for bad in (-1, 10, 11, 0.5, True):
        with pytest.raises(InvalidArgumentError, match="holdout size must be an int in"):
            split_holdout(10, bad, np.random.default_rng(0))


def test_batches_cover_every_example_once_and_pad_per_batch(text_bundle):
    bundle = Bundle.open(text_bundle)
    encoder = TextEncoder(bundle)
    data = text_data(10) + [("good " * 9 + "good", "pos")]
    examples = load_examples(data, bundle, encoder)
    seen = []
    for feeds, labels in batches(examples, encoder, 4, np.random.default_rng(0)):
        assert feeds["input_ids"].shape[0] == len(labels) <= 4
        lengths = feeds["attention_mask"].sum(axis=1)
        assert feeds["input_ids"].shape[1] == lengths.max()  # padded to this batch's longest row only
        for row, length in zip(feeds["input_ids"], lengths):
            assert (row[length:] == 0).all()
            seen.append(tuple(row[:length]))
    assert sorted(seen) == sorted(tuple(ids) for ids in examples.token_ids)
    ordered = [labels.tolist() for _, labels in batches(examples, encoder, 4, None)]
    assert sum(ordered, []) == examples.labels.tolist()


def test_jsonl_lines_that_are_not_objects(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(["good", "pos"]) + "\n", encoding="utf-8")
    assert normalize_records(path) == [("good", "pos")]  # a 2-item JSON list is a pair
    path.write_text(json.dumps(["good", "pos"]) + "\n" + json.dumps("just a string") + "\n", encoding="utf-8")
    with pytest.raises(InvalidUserDataError, match="example 1"):
        normalize_records(path)


def test_files_keep_unicode_line_separators_inside_texts(tmp_path):
    # U+2028, U+2029 and U+0085 are legal unescaped inside JSON strings and CSV fields:
    # they are not record separators (str.splitlines() would treat them as such).
    texts = ["good\u2028great day", "bad\u2029day", "nice\x85day", "two\nlines"]
    rows = [{"text": t, "label": "pos"} for t in texts[:3]]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert normalize_records(jsonl) == [(t, "pos") for t in texts[:3]]
    csv_path = write_csv(tmp_path / "d.csv", [(t, "neg") for t in texts])
    assert normalize_records(csv_path) == [(t, "neg") for t in texts]
    crlf = tmp_path / "crlf.csv"
    crlf.write_bytes(b'text,label\r\n"a\r\nb",pos\r\nc,neg\r\n')
    assert normalize_records(crlf) == [("a\r\nb", "pos"), ("c", "neg")]


# -- scoring batches --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=0, max_size=50), budget=st.integers(1, 120),
       max_rows=st.integers(1, 9))
def test_length_groups_take_every_row_once_within_the_budget(lengths, budget, max_rows) -> None:
    groups = length_groups(np.array(lengths, np.int64), token_budget=budget, max_rows=max_rows)
    rows = np.concatenate(groups) if groups else np.array([], np.int64)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    assert [lengths[i] for i in rows] == sorted(lengths), "rows go in order of length"
    for group in groups:
        assert 1 <= len(group) <= max_rows
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= budget


def test_evaluate_scores_in_length_batches_with_the_metrics_of_data_order(text_bundle, tmp_path) -> None:
    """evaluate (and the holdout) run length-sorted batches of at most SCORING_TOKENS padded
    tokens; the metrics are those of every example scored in its own order, through predict."""
    p = Personalizer(text_bundle, store=tmp_path)
    data = [(f"{text} " + " ".join(["the"] * (i % 9)), label) for i, (text, label) in enumerate(text_data(80, seed=3))]
    mask_name = p.bundle.manifest.text.attention_mask
    widths: list[tuple[int, int]] = []
    logits = p.predictor.logits

    def spy(feeds, users, fallbacks=None):
        widths.append((feeds[mask_name].shape[0], feeds[mask_name].shape[1]))
        return logits(feeds, users, fallbacks)

    p.predictor.logits = spy
    metrics = p.evaluate(data)
    assert len(widths) > 1, "80 examples of up to ~16 tokens exceed one batch's budget"
    assert [w for _, w in widths] == sorted(w for _, w in widths), "batches go from the shortest rows up"
    assert all(rows == 1 or rows * width <= SCORING_TOKENS for rows, width in widths)
    p.predictor.logits = logits
    predicted = p.predict([t for t, _ in data]).labels
    assert metrics["accuracy"] == pytest.approx(np.mean([a == b for a, (_, b) in zip(predicted, data)]))
    assert metrics["examples"] == len(data)
