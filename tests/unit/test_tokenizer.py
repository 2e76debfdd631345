import pytest

from tether.models.tokenizer import CharTokenizer

pytestmark = pytest.mark.unit


def test_roundtrip_and_ids():
    tok = CharTokenizer()
    text = "12+34=46\nHello, World! ~"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) == len(text)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 99
    assert all(3 <= i < tok.vocab_size for i in ids)
    assert tok.encode(" ") == [4] and tok.encode("~") == [98] and tok.encode("\n") == [3]
    assert len(set(tok.vocab().values())) == tok.vocab_size


def test_specials_and_bos():
    tok = CharTokenizer()
    assert tok.encode("a", add_bos=True)[0] == tok.bos_id
    assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id, tok.pad_id]) == "ab"
    assert tok.decode([tok.eos_id], skip_special=False) == "<eos>"


def test_unknown_character_named():
    with pytest.raises(ValueError, match=r"'é'.*position 2"):
        CharTokenizer().encode("caé")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CharTokenizer().decode([500])
