"""The manifest of a prepared folder: both writers (prepare, link_indexed) write it through
manifest.Manifest and every reader reads it through Manifest.read, which turns a missing or
mistyped key into a one-line error naming the file and the key."""

import json
import re
import shutil

import pytest
from support.data_fixtures import corpus, jsonl

from data_prep.dataset import PackedDataset
from data_prep.indexed import IndexedDataset
from data_prep.layout import FORMAT, MANIFEST, TRAIN, VAL
from data_prep.link import link_indexed
from data_prep.manifest import Manifest, ManifestError
from data_prep.prepare import prepare
from utils.atomic import NotReplaceableError

SETTINGS = dict(vocab_size=300, workers=1, val_fraction=0.1, verbose=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A folder prepared from 120 documents, and the JSON file those settings made."""
    d = tmp_path_factory.mktemp("manifest")
    prepare([jsonl(d / "a.jsonl", corpus(120))], d / "out", **SETTINGS)
    return d / "out"


def test_reading_and_writing_back_changes_no_byte(prepared, tmp_path):
    text = (prepared / MANIFEST).read_text(encoding="utf-8")
    m = Manifest.read(prepared / MANIFEST)
    assert m.to_json() == text
    assert m.write(tmp_path).read_text(encoding="utf-8") == text
    assert m.format == FORMAT
    assert [m.splits[s].prefix for s in (TRAIN, VAL)] == ["train", "val"]
    assert m.splits[TRAIN].sequences is None  # only linked folders record it
    assert m.documents.written == m.splits[TRAIN].documents + m.splits[VAL].documents == 120
    assert m.tokens == m.splits[TRAIN].tokens + m.splits[VAL].tokens
    assert len(m.sources) == 1
    assert m.sources[0].documents == 120


def test_a_linked_folder_writes_only_what_it_knows(prepared, tmp_path):
    returned = link_indexed(tmp_path / "linked", str(prepared / "train"), str(prepared / "tokenizer.json"))
    on_disk = json.loads((tmp_path / "linked" / MANIFEST).read_text(encoding="utf-8"))
    assert on_disk == returned
    assert sorted(on_disk) == ["corpus", "dtype", "format", "splits", "tokenizer"]
    split = on_disk["splits"]["train"]
    assert sorted(split) == ["bin_bytes", "documents", "idx_bytes", "prefix", "sequences", "tokens"]
    assert split["prefix"] == str((prepared / "train").resolve())
    m = Manifest.read(tmp_path / "linked" / MANIFEST)
    assert m.settings is None
    assert m.splits[TRAIN].tokens == Manifest.read(prepared / MANIFEST).splits[TRAIN].tokens


def _set(obj, path, value):
    """``obj`` with the key at the dotted ``path`` set to ``value`` (deleted when value is ...)."""
    *parents, last = path.split(".")
    for key in parents:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    if value is ...:
        del obj[last]
    else:
        obj[last] = value


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("splits.train.tokens", ..., "key 'splits.train.tokens' is missing"),
        ("tokenizer", ..., "key 'tokenizer' is missing"),
        ("tokenizer.vocab_size", "300", "key 'tokenizer.vocab_size' is a string, expected an integer"),
        ("tokenizer.eos_id", True, "key 'tokenizer.eos_id' is true or false, expected an integer"),
        ("splits", [], "key 'splits' is an array, expected an object"),
        ("documents.skipped.blank", 1.5, "key 'documents.skipped.blank' is a number, expected an integer"),
        ("sources.0.records", None, "key 'sources[0].records' is null, expected an integer"),
        ("format", "other/1", "format 'other/1' is not 'hyena-rtf-data-prep/1'"),
    ],
)
def test_a_bad_key_is_one_line_naming_the_file_and_the_key(prepared, tmp_path, key, value, message):
    obj = json.loads((prepared / MANIFEST).read_text(encoding="utf-8"))
    _set(obj, key, value)
    path = tmp_path / MANIFEST
    path.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(ManifestError) as e:
        Manifest.read(path)
    assert str(e.value).startswith(f"{path}: {message}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text,message",
    [("{", "not a JSON file"), ("[]", "the manifest is an array, expected an object"), ("\udcff", "not a JSON file")],
)
def test_a_file_that_is_no_json_object_is_one_line(tmp_path, text, message):
    path = tmp_path / MANIFEST
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ManifestError, match=f"^{re.escape(str(path))}: {message}"):
        Manifest.read(path)


def test_readers_and_the_rerun_with_a_damaged_manifest(prepared, tmp_path):
    """The training reader refuses it naming the key; the shard reader, which can do without
    it, ignores it; a rerun of prepare does not trust it: refused, or rebuilt with --overwrite."""
    folder = tmp_path / "out"
    shutil.copytree(prepared, folder)
    good = (folder / MANIFEST).read_bytes()
    obj = json.loads(good)
    del obj["tokenizer"]["eos_id"]
    (folder / MANIFEST).write_text(json.dumps(obj), encoding="utf-8")
    where = re.escape(str(folder / MANIFEST))
    with pytest.raises(ManifestError, match=rf"^{where}: key 'tokenizer.eos_id' is missing$"):
        PackedDataset(folder, "train", seq_len=8)
    assert IndexedDataset(folder / "train").num_documents == obj["splits"]["train"]["documents"]
    # The changed manifest is no longer the file the stamp lists (its size differs): a plain rerun
    # refuses rather than overwrite what may be someone's edit; --overwrite rebuilds.
    with pytest.raises(NotReplaceableError, match=r"also holds files it did not write \(manifest.json\)"):
        prepare([str(prepared.parent / "a.jsonl")], folder, **SETTINGS)
    rebuilt = prepare([str(prepared.parent / "a.jsonl")], folder, overwrite=True, **SETTINGS)
    assert rebuilt == json.loads(good)
    assert (folder / MANIFEST).read_bytes() == good
