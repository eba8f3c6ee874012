"""tokenizer.hf_tokenizer: the Hugging Face tokenizer of a prepared folder's tokenizer.json, with
the end-of-text token load_data_tokenizer picks for the shards, and the model's two inputs only."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from data_prep.tokenizer import EOS_CANDIDATES, TokenizerError, hf_tokenizer, load_data_tokenizer, train_bpe

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
SAMPLE = "Hello wörld, naïve café 🙂\n  tabs\tand <|endoftext|> inside x=1;"


def _wordlevel(path, words, pad=None) -> str:
    """A whitespace WordLevel tokenizer of ``words`` (ids in that order), saved to ``path``."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if pad is not None:
        tok.enable_padding(pad_id=words.index(pad), pad_token=pad)
    tok.save(str(path))
    return str(path)


def test_eos_is_the_first_candidate_in_the_vocabulary_as_for_the_shards(tmp_path):
    # "<|endoftext|>" is absent; "</s>" comes before "<eos>" in EOS_CANDIDATES, not in the vocabulary
    assert EOS_CANDIDATES.index("</s>") < EOS_CANDIDATES.index("<eos>")
    path = _wordlevel(tmp_path / "t.json", ["[UNK]", "<eos>", "a", "</s>", "b"])
    hf = hf_tokenizer(path)
    assert hf.eos_token == "</s>"
    assert hf.eos_token == load_data_tokenizer(path).eos_token
    assert hf.eos_token_id == 3
    assert hf.pad_token == "</s>"  # the file defines no padding token
    assert hf.pad_token_id == 3
    assert len(hf) == 5  # the special tokens were in the vocabulary: none added
    assert hf_tokenizer(path, eos_token="<eos>").eos_token_id == 1


def test_a_padding_token_of_the_file_is_kept(tmp_path):
    path = _wordlevel(tmp_path / "t.json", ["[UNK]", "<|endoftext|>", "<|padding|>", "a"], pad="<|padding|>")
    hf = hf_tokenizer(path)
    assert hf.eos_token_id == 1
    assert hf.pad_token == "<|padding|>"
    assert hf.pad_token_id == 2


def test_no_end_of_text_token_is_an_error_as_for_the_shards(tmp_path):
    path = _wordlevel(tmp_path / "t.json", ["[UNK]", "a", "b"])
    with pytest.raises(TokenizerError, match=r"no end-of-document token found in .*t\.json"):
        hf_tokenizer(path)
    with pytest.raises(TokenizerError, match="'<nope>' is not in the vocabulary"):
        hf_tokenizer(path, eos_token="<nope>")
    (tmp_path / "bin.json").write_bytes(bytes(range(256)))
    with pytest.raises(TokenizerError, match="not a tokenizers JSON file"):
        hf_tokenizer(tmp_path / "bin.json")


def _files(tmp_path):
    trained = tmp_path / "bpe.json"
    trained.write_text(train_bpe([SAMPLE * 20, "some more words to learn from " * 50], 300).json_text)
    return [trained] + [DATA / n for n in ("20B_tokenizer.json", "gpt2_tokenizer.json") if (DATA / n).is_file()]


def test_encodes_as_the_file_does_with_the_two_model_inputs_only(tmp_path):
    for path in _files(tmp_path):
        hf = hf_tokenizer(path)
        out = hf(SAMPLE)
        assert sorted(out) == ["attention_mask", "input_ids"], path  # no token_type_ids
        assert out["input_ids"] == Tokenizer.from_file(str(path)).encode(SAMPLE).ids, path
        assert out["attention_mask"] == [1] * len(out["input_ids"]), path
        batch = hf([SAMPLE, "a"], padding=True)
        assert sorted(batch) == ["attention_mask", "input_ids"], path
        assert batch["input_ids"][1][-1] == hf.pad_token_id == hf.eos_token_id, path
