"""`load_tokenizer` (llm_rl.models.loading): a pad token distinct from EOS, reusing an existing unk or adding
a new token, and left padding for generation."""


def test_load_tokenizer_pad_equal_to_eos_gets_a_distinct_pad(tmp_path):
    from llm_rl.models.loading import load_tokenizer
    from llm_rl.tasks.arithmetic import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id is not None and loaded.pad_token_id != loaded.eos_token_id
    assert loaded.pad_token == "<unk>"  # an existing unk is reused: no new embedding row
    assert len(loaded) == 15
    assert loaded.padding_side == "left"


def test_load_tokenizer_without_pad_or_unk_adds_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llm_rl.models.loading import load_tokenizer

    backend = Tokenizer(models.WordLevel(vocab={"<eos>": 0, "a": 1, "b": 2}))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    assert tokenizer.pad_token is None and tokenizer.unk_token is None
    tokenizer.save_pretrained(tmp_path)

    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token is not None
    assert loaded.pad_token_id not in (None, loaded.eos_token_id)
    assert loaded.pad_token_id == 3 and len(loaded) == 4  # a new token after the 3 existing ones
    assert loaded.padding_side == "left"


def test_load_tokenizer_keeps_a_distinct_pad(tiny_model_dir):
    from llm_rl.models.loading import load_tokenizer

    loaded = load_tokenizer(str(tiny_model_dir))
    assert loaded.pad_token == "<pad>" and loaded.pad_token_id == 0 and len(loaded) == 15
