import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from llm_rl.models.value_head import VALUE_HEAD_FILE, CausalLMWithValueHead, disable_dropout, position_ids_from_mask

# Token ids of the character tokenizer: '0'..'9' = 3..12, '+' = 13, '=' = 14.
PROMPTS = [[4, 13, 5, 14], [4, 5, 13, 6, 7, 14], [4, 5, 6, 13, 7, 8, 9, 10, 14]]  # 1+2=  12+34=  123+4567=
RESPONSES = [[6, 1, 3], [7, 9, 1], [7, 9, 12]]  # "3<eos>0", "46<eos>", "469"


def test_position_ids_from_mask_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert torch.equal(position_ids_from_mask(mask), expected)
    # bool masks and right padding after a response: pads repeat the last position
    mask = torch.tensor([[False, True, True, False, False]])
    assert torch.equal(position_ids_from_mask(mask), torch.tensor([[0, 0, 1, 1, 1]]))


def batch_of_prompts_and_responses():
    longest = max(len(p) for p in PROMPTS)
    ids = torch.zeros((len(PROMPTS), longest + 3), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        ids[row, longest - len(p) :] = torch.tensor(p + r)
        mask[row, longest - len(p) :] = 1
    return ids, mask, longest


@torch.no_grad()
def test_forward_logits_match_plain_lm_on_unpadded_prompts(tiny_model_dir, tiny_lm):
    policy = CausalLMWithValueHead.from_pretrained(str(tiny_model_dir)).eval()
    ids, mask, response_start = batch_of_prompts_and_responses()
    logits, values = policy(ids, mask, response_start=response_start)
    vocab = tiny_lm.config.vocab_size
    assert logits.shape == (3, 3, vocab)
    assert values.shape == (3, 3)
    for row, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        alone = tiny_lm(torch.tensor([p + r])).logits[0]  # one prompt, no padding
        expected = alone[len(p) - 1 : len(p) + len(r) - 1]  # positions that predict the response
        torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)

    # Control: the same batch through the plain LM without position ids scores the
    # shorter (shifted) prompts differently, so the check above is a real one for GPT-2.
    shifted = tiny_lm(input_ids=ids, attention_mask=mask).logits[:, response_start - 1 : -1]
    assert (shifted[0] - logits[0]).abs().max() > 1e-3
    torch.testing.assert_close(shifted[2], logits[2], atol=1e-5, rtol=1e-5)  # the longest prompt has no padding


@torch.no_grad()
def test_values_zero_at_init(tiny_model_dir):
    policy = CausalLMWithValueHead.from_pretrained(str(tiny_model_dir), value_head_init_std=0.0).eval()
    ids, mask, start = batch_of_prompts_and_responses()
    _, values = policy(ids, mask, response_start=start)
    assert values.shape == (3, 3)
    assert values.dtype == torch.float32
    assert torch.equal(values, torch.zeros(3, 3))

    random_head = CausalLMWithValueHead.from_pretrained(str(tiny_model_dir), value_head_init_std=0.5).eval()
    _, values = random_head(ids, mask, response_start=start)
    assert values.abs().min() > 0


def test_loading_keeps_the_models_eval_mode(tiny_model_dir):
    """The check at load runs in eval mode; it must hand back the loaded model (eval, dropout off) as it
    was, or two copies of one checkpoint would give different log-probs (dropout in one of them)."""
    for value_head in (True, False):
        model = CausalLMWithValueHead.from_pretrained(str(tiny_model_dir), value_head=value_head)
        assert not model.pretrained_model.training
        assert not any(m.training for m in model.pretrained_model.modules())
    ids, mask, start = batch_of_prompts_and_responses()
    tokens = ids[:, start:]
    policy = CausalLMWithValueHead.from_pretrained(str(tiny_model_dir))
    reference = CausalLMWithValueHead.from_pretrained(str(tiny_model_dir), value_head=False)
    with torch.no_grad():
        a, _, _ = policy(ids, mask, response_start=start, tokens=tokens)
        b, _, _ = reference(ids, mask, response_start=start, tokens=tokens)
    assert torch.equal(a, b)


def test_no_value_head(tiny_lm):
    policy = CausalLMWithValueHead(tiny_lm, value_head=False)
    assert policy.v_head is None
    assert not any(name.startswith("v_head") for name, _ in policy.named_parameters())
    ids, mask, start = batch_of_prompts_and_responses()
    with torch.no_grad():
        logits, values = policy(ids, mask, response_start=start)
    assert values is None and logits.shape[:2] == (3, 3)


@torch.no_grad()
def test_save_pretrained_writes_safetensors_loadable_as_plain_lm(tiny_lm, tmp_path):
    policy = CausalLMWithValueHead(tiny_lm).eval()
    policy.save_pretrained(tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in files
    assert VALUE_HEAD_FILE == "value_head.safetensors" and VALUE_HEAD_FILE in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], files

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert all(torch.equal(v, tiny_lm.state_dict()[k]) for k, v in reloaded.state_dict().items())
    ids, mask, _ = batch_of_prompts_and_responses()
    # the wrapped model runs GPT-2's gelu_new as one kernel (fuse_tanh_gelu): the same function to rounding
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                               tiny_lm(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    assert not any(k.startswith("v_head") for k in reloaded.state_dict())


def test_tanh_gelu_is_fused_into_one_kernel_with_the_same_values():
    from transformers.activations import NewGELUActivation

    from llm_rl.models.value_head import fuse_tanh_gelu

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), NewGELUActivation(), torch.nn.Sequential(NewGELUActivation()))
    x = torch.linspace(-6, 6, 97)[:, None].expand(97, 4)
    before = model(x)
    assert fuse_tanh_gelu(model) == 2
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


@torch.no_grad()
def test_from_pretrained_restores_value_head(tiny_lm, tmp_path):
    policy = CausalLMWithValueHead(tiny_lm)
    policy.v_head.weight.copy_(torch.randn_like(policy.v_head.weight))
    policy.v_head.bias.fill_(0.75)
    policy.save_pretrained(tmp_path / "out")

    restored = CausalLMWithValueHead.from_pretrained(str(tmp_path / "out"))
    assert torch.equal(restored.v_head.weight, policy.v_head.weight)
    assert torch.equal(restored.v_head.bias, torch.tensor([0.75]))

    # a value head from another folder (value_model_name_or_path)
    other = CausalLMWithValueHead.from_pretrained(str(tmp_path / "out"), value_head_path=str(tmp_path / "out"))
    assert torch.equal(other.v_head.weight, policy.v_head.weight)

    ids, mask, start = batch_of_prompts_and_responses()
    _, v_saved = policy.eval()(ids, mask, response_start=start)
    _, v_loaded = restored.eval()(ids, mask, response_start=start)
    assert torch.equal(v_saved, v_loaded)
    assert v_loaded.abs().max() > 0


def test_folder_without_value_head_starts_fresh(tiny_model_dir):
    policy = CausalLMWithValueHead.from_pretrained(str(tiny_model_dir))
    assert torch.equal(policy.v_head.weight, torch.zeros_like(policy.v_head.weight))
    assert torch.equal(policy.v_head.bias, torch.zeros(1))


def test_disable_dropout():
    config = GPT2Config(vocab_size=15, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    assert config.resid_pdrop > 0 and config.attn_pdrop > 0 and config.embd_pdrop > 0
    model = GPT2LMHeadModel(config)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and any(m.p > 0 for m in dropouts)

    disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    model.train()
    ids = torch.tensor([[4, 13, 5, 14, 6, 7]])
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    assert torch.equal(first, second)  # training mode, yet deterministic


@pytest.mark.parametrize("response_start", [1, 5])
@torch.no_grad()
def test_forward_response_start_slices(tiny_lm, response_start):
    policy = CausalLMWithValueHead(tiny_lm).eval()
    ids = torch.tensor([[4, 13, 5, 14, 6, 1, 3, 3]])
    mask = torch.ones_like(ids)
    logits, values = policy(ids, mask, response_start=response_start)
    n = ids.shape[1] - response_start
    assert logits.shape == (1, n, tiny_lm.config.vocab_size) and values.shape == (1, n)
    torch.testing.assert_close(logits[0], tiny_lm(ids).logits[0, response_start - 1 : -1], atol=1e-5, rtol=1e-5)


def test_a_model_without_an_lm_head_is_refused():
    from transformers import GPT2Model

    from llm_rl.config.errors import ModelLoadError

    base = GPT2Model(GPT2Config(vocab_size=15, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ModelLoadError, match="no linear lm head"):
        CausalLMWithValueHead(base)
