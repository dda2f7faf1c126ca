import shutil

import pytest
from transformers import GPT2TokenizerFast

import gpt2_tokenizer
from gpt2_tokenizer import TOKENIZER_DIR, TokenizerFilesError, build, load_tokenizer, verify_bpe_files


def test_from_pretrained_folder_works_offline(tokenizer):
    tok = GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR))
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.model_max_length == 1024
    assert len(tok) == 50257


def test_round_trip_and_special_token(tokenizer):
    text = "  Héllo wörld!\n\nTabs\tand emoji 😀 and ' quotes 's\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 50256


def test_tiktoken_fast_path_matches_hf(tokenizer):
    enc = gpt2_tokenizer.tiktoken_encoding()
    texts = ["Hello world", " leading space", "numbers 12345 and 3.14", "unicode ñ 漢字 😀", "a\n\n\nb  \n c's"]
    assert [tokenizer.encode(t) for t in texts] == enc.encode_ordinary_batch(texts)
    assert gpt2_tokenizer.is_official_gpt2(tokenizer)


def test_tampered_file_is_refused(tmp_path):
    src = gpt2_tokenizer.official_bpe_dir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(src / name, tmp_path / name)
    verify_bpe_files(tmp_path)  # intact copies pass
    with open(tmp_path / "vocab.bpe", "a", encoding="utf-8") as f:
        f.write("x y\n")
    with pytest.raises(TokenizerFilesError, match="vocab.bpe has sha256 .* reinstall"):
        build(tmp_path / "out", source_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_other_tokenizer_by_path(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("damage, message", [
    ("no_files", r"holds no tokenizer \(no tokenizer.json"),
    ("truncated", "its tokenizer files cannot be loaded"),
    ("id_beyond_vocab", "token id 70000 is beyond its"),
])
def test_a_damaged_tokenizer_folder_is_a_one_line_error_naming_it(tmp_path, damage, message):
    import json

    import dataset
    from readers import DataError

    folder = tmp_path / "tok"
    shutil.copytree(TOKENIZER_DIR, folder)
    tokenizer_json = folder / "tokenizer.json"
    if damage == "no_files":
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):
            (folder / name).unlink(missing_ok=True)
    elif damage == "truncated":
        text = tokenizer_json.read_text(encoding="utf-8")
        tokenizer_json.write_text(text[: len(text) // 2], encoding="utf-8")
    else:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        spec["model"]["vocab"]["zzz_hand_added"] = 70000  # beyond the vocabulary, and beyond uint16 token files
        tokenizer_json.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TokenizerFilesError, match=message) as caught:
        load_tokenizer(folder)
    assert str(folder) in str(caught.value)
    (tmp_path / "d.txt").write_text("Some text to tokenize.\n" * 50)
    with pytest.raises((TokenizerFilesError, DataError), match=message):  # not "contains no text", no OverflowError
        dataset.get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.txt"), tokenizer_name=str(folder),
                                          cache_dir=str(tmp_path / "cache"))
