"""inference.fused: sibling projections as one matmul for a lone row give the model's own outputs."""
import torch


def _pair(path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ref, got


def test_fused_siblings_decode_what_the_model_decodes(tiny_qwen3):
    from qtune.inference.fused import fuse_siblings

    ref, got = _pair(tiny_qwen3)
    before = {k: v.clone() for k, v in got.state_dict().items()}
    layers = got.config.num_hidden_layers
    assert fuse_siblings(got) == 2 * layers
    assert fuse_siblings(got) == 0            # once
    after = got.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    prompt = torch.tensor([[5, 17, 99, 3, 250, 41]])
    with torch.no_grad():
        r = ref(input_ids=prompt, use_cache=True)
        g = got(input_ids=prompt, use_cache=True)
        torch.testing.assert_close(g.logits, r.logits, rtol=0, atol=1e-5)   # six rows: the layers' own matmuls
        rc, gc = r.past_key_values, g.past_key_values
        for token in (7, 300, 12):   # one row a forward: the fused matmul
            step = torch.tensor([[token]])
            r = ref(input_ids=step, past_key_values=rc, use_cache=True)
            g = got(input_ids=step, past_key_values=gc, use_cache=True)
            torch.testing.assert_close(g.logits, r.logits, rtol=1e-5, atol=1e-5)
    # the lone-row path did run: a group's layers share one output
    attn = got.model.layers[0].self_attn
    x = torch.randn(1, 1, got.config.hidden_size)
    q, k = attn.q_proj(x), attn.k_proj(x)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()


def test_fused_siblings_under_peft_keep_the_adapter(tiny_qwen3):
    from peft import LoraConfig, get_peft_model

    from qtune.inference.fused import fuse_siblings

    ref, got = _pair(tiny_qwen3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    ref, got = get_peft_model(ref, cfg), get_peft_model(got, cfg)
    torch.manual_seed(0)
    for (n, a), (_, b) in zip(ref.named_parameters(), got.named_parameters()):
        if "lora_" in n:
            if "lora_B" in n:
                a.data.normal_(0, 0.5)
            b.data.copy_(a.data)
    assert fuse_siblings(got) == 2 * got.config.num_hidden_layers
    with torch.no_grad():
        for ids in ([[9]], [[9, 10, 11]]):
            x = torch.tensor(ids)
            torch.testing.assert_close(got(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-5, atol=1e-5)
        with got.disable_adapter(), ref.disable_adapter():
            torch.testing.assert_close(got(input_ids=torch.tensor([[9]])).logits,
                                       ref(input_ids=torch.tensor([[9]])).logits, rtol=1e-5, atol=1e-5)


def test_serve_s_rope_takes_liger_s_kernel_for_one_token_a_row_only():
    """serve.liger's RoPE (modeling.fast._rope_by_length): liger's kernel compiles anew for each batch size, so a
    prefill (many tokens a row) goes through transformers' own RoPE, a decode step (one token a row) through the
    kernel."""
    from transformers.models.qwen3 import modeling_qwen3

    from qtune.modeling.fast import _from_liger, _rope_by_length

    eager = modeling_qwen3.apply_rotary_pos_emb
    calls = []

    def single(q, k, cos, sin, *args, **kwargs):
        calls.append(q.shape[-2])
        return eager(q, k, cos, sin, *args, **kwargs)

    rope = _rope_by_length(single, eager)
    assert _from_liger(rope) and not _from_liger(eager)
    for length in (1, 5):
        q, k = torch.randn(3, 4, length, 8), torch.randn(3, 2, length, 8)
        cos, sin = torch.randn(3, length, 8), torch.randn(3, length, 8)
        got, want = rope(q, k, cos, sin), eager(q, k, cos, sin)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert calls == [1]
