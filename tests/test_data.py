"""Reading files with config alone, label handling, and clear errors for bad files."""

import os

import pytest

from jaxft.data import files, labels
from jaxft.data.encode import read_split
from jaxft.errors import UserError
from tests.conftest import SHARED_DATA, write_tsv


def test_tsv_with_bare_quotes_keeps_every_row(tmp_path):
  path = write_tsv(tmp_path / "q.tsv", [('he said " hello', 1), ('a "quoted" word', 0),
                                        ("NA", 1), ("null", 0)])
  cols = files.read_columns(path, None)
  assert cols["sentence"] == ['he said " hello', 'a "quoted" word', "NA", "null"]
  assert cols["label"] == ["1", "0", "1", "0"]


def test_headerless_file_with_column_names(tmp_path):
  path = write_tsv(tmp_path / "h.tsv", [("src", 1, "", "a sentence")], header=None)
  cols = files.read_columns(path, "tsv", has_header=False,
                            column_names=("source", "label", "mark", "sentence"))
  assert cols == {"source": ["src"], "label": ["1"], "mark": [""], "sentence": ["a sentence"]}
  unnamed = files.read_columns(path, "tsv", has_header=False)
  assert list(unnamed) == ["0", "1", "2", "3"]


def test_max_rows_takes_the_first_rows(tmp_path):
  path = write_tsv(tmp_path / "m.tsv", [(f"s{i}", i % 2) for i in range(10)])
  assert files.read_columns(path, None, max_rows=3)["sentence"] == ["s0", "s1", "s2"]


def test_jsonl_and_csv(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "x", "y": "pos"}\n{"text": "z", "y": "neg"}\n')
  assert files.read_columns(str(tmp_path / "a.jsonl"), None)["y"] == ["pos", "neg"]
  (tmp_path / "a.csv").write_text("text,y\n\"a, b\",1\nc,0\n")
  assert files.read_columns(str(tmp_path / "a.csv"), None)["text"][1] == "c"


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"sentence\tlabel\nok\t1\n\xff\xfe bad\t0\n", "not valid UTF-8"),
])
def test_bad_files_raise_user_errors(tmp_path, content, message):
  path = tmp_path / "bad.tsv"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(UserError, match=message):
    files.read_columns(str(path), None)


def test_tsv_rows_as_pandas_read_them(tmp_path):
  """Blank lines skipped, CRLF line ends and a byte-order mark dropped, trailing spaces kept,
  a short row padded with empty strings, a field past csv's default 128 KiB limit kept."""
  long_text = "w " * 100_000
  (tmp_path / "r.tsv").write_bytes(
      ("\ufeffsentence\tlabel\r\na \t1\r\n\r\nb\r\n" + long_text + "\t0\r\n").encode())
  cols = files.read_columns(str(tmp_path / "r.tsv"), None)
  assert cols == {"sentence": ["a ", "b", long_text], "label": ["1", "", "0"]}
  assert files.read_columns(str(tmp_path / "r.tsv"), None, max_rows=2)["label"] == ["1", ""]


def test_a_row_with_too_many_fields_names_its_line(tmp_path):
  (tmp_path / "x.tsv").write_text("sentence\tlabel\nok\t1\nbad\t0\textra\n")
  with pytest.raises(UserError, match=r"line 3 of .*x.tsv has 3 fields where the header has 2"):
    files.read_columns(str(tmp_path / "x.tsv"), None)


def test_reading_tsv_does_not_import_datasets(tmp_path):
  """`datasets` (with pandas and pyarrow) took 0.6 s to import: only non-delimited formats
  pay for it."""
  import subprocess
  import sys
  path = write_tsv(tmp_path / "t.tsv", [("a", 1)])
  code = ("import sys; from jaxft.data import files; files.read_columns(sys.argv[1], None); "
          "print('datasets' in sys.modules, 'pandas' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       check=True).stdout.split()
  assert out == ["False", "False"]


def test_unknown_extension_asks_for_format(tmp_path):
  (tmp_path / "data.txt").write_text("a\tb\n")
  with pytest.raises(UserError, match="data.format"):
    files.read_columns(str(tmp_path / "data.txt"), None)


def test_label_inference_and_encoding():
  assert labels.infer_label_names(["10", "2", "2", "1"], "f") == ("1", "2", "10")
  assert labels.infer_label_names(["pos", "neg"], "f") == ("neg", "pos")
  ids = labels.encode_labels(["pos", "neg", "1"], ("neg", "pos"), "f")
  assert ids.tolist() == [1, 0, 1]  # "1" is an index when it is not a name
  with pytest.raises(UserError, match="data row 2: label 'maybe'"):
    labels.encode_labels(["pos", "maybe"], ("neg", "pos"), "f")
  with pytest.raises(UserError, match="regression"):
    labels.infer_label_names(["0.5", "1.25"], "f")


def test_read_split_errors_name_the_column_and_row(tmp_path, tiny_config, minilm_dir):
  from jaxft import models
  tok = models.load_tokenizer(minilm_dir)
  path = write_tsv(tmp_path / "d.tsv", [("fine", 1), ("", 0)])
  with pytest.raises(UserError, match="data row 2: text column 'sentence' is empty"):
    read_split(path, tiny_config, tok, None, None)
  path = write_tsv(tmp_path / "e.tsv", [("fine", 1)], header=("text", "label"))
  with pytest.raises(UserError, match="no column 'sentence'.*columns are \\['text', 'label'\\]"):
    read_split(path, tiny_config, tok, None, None)


def test_sentence_pairs_get_segment_ids(tmp_path, tiny_config, minilm_dir):
  from jaxft import models
  tok = models.load_tokenizer(minilm_dir)
  path = write_tsv(tmp_path / "p.tsv", [("a cat", "a dog", "no")], header=("s1", "s2", "label"))
  with tiny_config.unlocked():
    tiny_config.data.text_fields = ("s1", "s2")
    tiny_config.data.label_names = ("no", "yes")
  data, names = read_split(path, tiny_config, tok, tiny_config.data.label_names, None)
  assert names == ("no", "yes")
  assert data.token_type_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
  assert data.labels.tolist() == [0]


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is not present")
@pytest.mark.parametrize("name, kwargs, rows, label_col", [
    ("sst2/dev.tsv", {}, 872, "label"),
    ("rte/dev.tsv", {}, 277, "label"),
    ("stsb/dev.tsv", {}, 1500, "score"),
    ("cola/dev.tsv", {"has_header": False, "column_names": ("source", "label", "mark", "sentence")},
     1043, "label"),
])
def test_shared_glue_files_load_with_config_alone(name, kwargs, rows, label_col):
  cols = files.read_columns(os.path.join(SHARED_DATA, name), None, **kwargs)
  assert len(cols[label_col]) == rows
