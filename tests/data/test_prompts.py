"""Prompt datasets: loading local files and saved folders, `PromptData` (tokenizing, left-padded batches,
chat messages, named errors) and `PromptSampler` (the order of prompts over processes and passes, resume)."""

import json

import pytest
import torch
from conftest import write_jsonl

from llm_rl.data.prompts import DataError, PromptData, PromptSampler, load_prompt_dataset

# Character tokenizer ids: <pad>=0, <eos>=1, <unk>=2, '0'..'9'=3..12, '+'=13, '='=14.
ROWS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "12+34=", "answer": "46"}, {"prompt": "5+5=", "answer": "10"}]


def dataset(columns: dict):
    import datasets

    return datasets.Dataset.from_dict(columns)


# ----------------------------------------------------------------- load_prompt_dataset


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path


def write_file(folder, fmt: str):
    import pandas as pd

    path = folder / f"prompts.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, ROWS)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        pd.DataFrame(ROWS).to_csv(path, index=False)
    else:
        pd.DataFrame(ROWS).to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_load_prompt_dataset_local_files(datasets_cache, fmt):
    path = write_file(datasets_cache, fmt)
    ds = load_prompt_dataset(str(path))
    assert len(ds) == 3
    assert set(ds.column_names) == {"prompt", "answer"}
    assert list(ds["prompt"]) == ["1+2=", "12+34=", "5+5="]
    assert [str(a) for a in ds["answer"]] == ["3", "46", "10"]  # csv infers integers


def test_load_prompt_dataset_missing_file(tmp_path):
    with pytest.raises(DataError, match="absent.jsonl does not exist"):
        load_prompt_dataset(str(tmp_path / "absent.jsonl"))


def test_load_prompt_dataset_saved_folder(datasets_cache):
    dataset({"prompt": ["1+2="], "answer": ["3"]}).save_to_disk(str(datasets_cache / "saved"))
    ds = load_prompt_dataset(str(datasets_cache / "saved"))
    assert list(ds["prompt"]) == ["1+2="]


# ----------------------------------------------------------------- PromptData


def test_prompt_data_tokenizes_and_keeps_columns(tiny_tokenizer):
    data = PromptData(
        dataset({"prompt": [r["prompt"] for r in ROWS], "answer": [r["answer"] for r in ROWS]}), tiny_tokenizer
    )
    assert len(data) == 3
    assert data.texts == ["1+2=", "12+34=", "5+5="]
    assert data.ids == [[4, 13, 5, 14], [4, 5, 13, 6, 7, 14], [8, 13, 8, 14]]
    assert data.columns == {"answer": ["3", "46", "10"]}


def test_batch_left_pads(tiny_tokenizer):
    data = PromptData(
        dataset({"prompt": [r["prompt"] for r in ROWS], "answer": [r["answer"] for r in ROWS]}), tiny_tokenizer
    )
    batch = data.batch([0, 1])
    assert batch["prompt_ids"].tolist() == [[0, 0, 4, 13, 5, 14], [4, 5, 13, 6, 7, 14]]
    assert batch["prompt_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch["prompt_ids"].dtype == batch["prompt_mask"].dtype == torch.long
    assert batch["prompts"] == ["1+2=", "12+34="]
    assert batch["columns"] == {"answer": ["3", "46"]}

    batch = data.batch([2, 0])  # equal lengths: no padding, order kept
    assert batch["prompt_ids"].tolist() == [[8, 13, 8, 14], [4, 13, 5, 14]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert batch["columns"] == {"answer": ["10", "3"]}


def test_missing_prompt_column_lists_columns(tiny_tokenizer):
    with pytest.raises(DataError) as e:
        PromptData(dataset({"question": ["1+2="], "answer": ["3"]}), tiny_tokenizer)
    message = str(e.value)
    assert "'prompt'" in message and "question" in message and "answer" in message
    assert "prompt_column" in message


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_prompt_names_the_row(tiny_tokenizer, empty):
    with pytest.raises(DataError, match="row 1") as e:
        PromptData(dataset({"prompt": ["1+2=", empty, "3+4="]}), tiny_tokenizer)
    assert "empty" in str(e.value)


def test_over_long_prompt(tiny_tokenizer):
    ds = dataset({"prompt": ["1+2=", "123+4567="]})  # 4 and 9 tokens
    with pytest.raises(DataError, match="row 1") as e:
        PromptData(ds, tiny_tokenizer, max_prompt_length=4)
    assert "max_prompt_length" in str(e.value) and "truncate_prompts" in str(e.value)
    assert "9" in str(e.value)

    data = PromptData(ds, tiny_tokenizer, max_prompt_length=4, truncate=True)
    assert data.ids == [[4, 13, 5, 14], [8, 9, 10, 14]]  # the last 4 tokens: "567="
    assert PromptData(ds, tiny_tokenizer, max_prompt_length=9).ids[1] == [4, 5, 6, 13, 7, 8, 9, 10, 14]


CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}={% endif %}{% endfor %}"


def test_chat_messages_rendered_with_template(tiny_tokenizer):
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    ds = dataset(
        {
            "messages": [
                [{"role": "user", "content": "1+2"}],
                [{"role": "system", "content": "9"}, {"role": "user", "content": "12+34"}],
            ],
            "answer": ["3", "46"],
        }
    )
    data = PromptData(ds, tiny_tokenizer, prompt_column="messages")
    assert data.texts == ["1+2=", "912+34="]
    assert data.ids == [[4, 13, 5, 14], [12, 4, 5, 13, 6, 7, 14]]
    assert data.columns == {"answer": ["3", "46"]}


def test_chat_messages_without_template(tiny_tokenizer):
    assert tiny_tokenizer.chat_template is None
    ds = dataset({"messages": [[{"role": "user", "content": "1+2"}]]})
    with pytest.raises(DataError, match="chat_template") as e:
        PromptData(ds, tiny_tokenizer, prompt_column="messages")
    assert "row 0" in str(e.value)


@pytest.mark.parametrize("rows, message", [
    ([[{"role": "usr", "content": "1+2"}]],
     "row 0: column 'messages' message 0 has role 'usr'; the roles are system, user, assistant, tool"),
    ([[{"role": "user", "text": "1+2"}]],
     "row 0: column 'messages' message 0 has keys ['role', 'text']; each message needs 'role' and 'content'"),
    # datasets gives every row the keys of all rows: the 'text' row's content is None, not missing
    ([[{"role": "user", "content": "1+2"}], [{"role": "system", "content": "9"}, {"role": "user", "text": "3"}]],
     "row 1: column 'messages' message 1 has keys ['role', 'text']; each message needs 'role' and 'content'"),
    ([[{"from": "human", "value": "1+2"}]],
     "row 0: column 'messages' message 0 has keys ['from', 'value']; each message needs 'role' and 'content'"),
])
def test_misspelt_chat_messages_name_the_row_and_message(tiny_tokenizer, rows, message):
    """A role or key a chat template does not read would render as an empty prompt: refused at load."""
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(DataError) as e:
        PromptData(dataset({"messages": rows}), tiny_tokenizer, prompt_column="messages")
    assert str(e.value) == message


def test_prompt_of_the_wrong_type(tiny_tokenizer):
    with pytest.raises(DataError, match="row 0"):
        PromptData(dataset({"prompt": [[1, 2, 3]]}), tiny_tokenizer)


# ----------------------------------------------------------------- PromptSampler


def take(sampler, n):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(n)]


def test_sampler_without_shuffle_hand_values():
    # 14 prompts, 3 per process, 2 processes: 6 per update, 2 updates per pass, tail {12, 13} dropped.
    rank0 = take(PromptSampler(14, 3, 2, rank=0, seed=0, shuffle=False), 3)
    rank1 = take(PromptSampler(14, 3, 2, rank=1, seed=0, shuffle=False), 3)
    assert rank0 == [[0, 1, 2], [6, 7, 8], [0, 1, 2]]
    assert rank1 == [[3, 4, 5], [9, 10, 11], [3, 4, 5]]
    assert PromptSampler(14, 3, 2, rank=0, seed=0, shuffle=False).updates_per_epoch == 2


def test_sampler_ranks_disjoint_and_cover_the_global_batch():
    num_prompts, batch_size = 20, 4  # global batch 8, 2 updates per pass
    rank0 = take(PromptSampler(num_prompts, batch_size, 2, rank=0, seed=5, shuffle=True), 6)
    rank1 = take(PromptSampler(num_prompts, batch_size, 2, rank=1, seed=5, shuffle=True), 6)
    for a, b in zip(rank0, rank1):
        assert len(a) == len(b) == batch_size
        assert not set(a) & set(b)
        assert len(set(a) | set(b)) == 2 * batch_size
    for p in range(3):  # within a pass, no prompt is seen twice
        seen = rank0[2 * p] + rank1[2 * p] + rank0[2 * p + 1] + rank1[2 * p + 1]
        assert len(set(seen)) == 16 and set(seen) <= set(range(num_prompts))


def test_sampler_seeded_and_reshuffled_every_pass():
    def one_pass_orders(seed):
        batches = take(PromptSampler(12, 6, 1, rank=0, seed=seed, shuffle=True), 6)  # 2 updates per pass
        return [batches[0] + batches[1], batches[2] + batches[3], batches[4] + batches[5]]

    passes = one_pass_orders(seed=1)
    assert one_pass_orders(seed=1) == passes  # same seed, same order
    assert one_pass_orders(seed=2) != passes
    for order in passes:
        assert sorted(order) == list(range(12))  # every pass is a permutation
    assert passes[0] != passes[1] and passes[1] != passes[2]  # a new pass reshuffles
    assert passes[0] != list(range(12))


def test_sampler_resume_from_state_dict():
    for rank in (0, 1):
        sampler = PromptSampler(14, 3, 2, rank=rank, seed=3, shuffle=True)
        iterator = iter(sampler)
        for _ in range(3):  # one pass and a half
            next(iterator)
        state = json.loads(json.dumps(sampler.state_dict()))  # it must survive a JSON checkpoint
        expected = [next(iterator) for _ in range(4)]

        resumed = PromptSampler(14, 3, 2, rank=rank, seed=3, shuffle=True)
        resumed.load_state_dict(state)
        assert take(resumed, 4) == expected


def test_sampler_resume_at_a_pass_boundary():
    sampler = PromptSampler(12, 3, 2, rank=0, seed=0, shuffle=True)
    iterator = iter(sampler)
    next(iterator), next(iterator)  # exactly one pass
    state = sampler.state_dict()
    expected = [next(iterator) for _ in range(2)]
    resumed = PromptSampler(12, 3, 2, rank=0, seed=0, shuffle=True)
    resumed.load_state_dict(state)
    assert take(resumed, 2) == expected


def test_sampler_too_few_prompts():
    with pytest.raises(DataError, match="batch_size"):
        PromptSampler(5, 3, 2, rank=0, seed=0, shuffle=True)
    PromptSampler(6, 3, 2, rank=1, seed=0, shuffle=True)  # exactly one update is enough
