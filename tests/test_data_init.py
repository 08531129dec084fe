"""init_locas_weights: every method against a direct computation on tiny models, its invariants, the two-step form and
the error messages."""

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from tiny_models import HIDDEN, WIDTH, tiny_model, tokens

from peft_locas import (
    LocasConfig,
    LocasInitState,
    LocasLayer,
    get_locas_init_state,
    grow_locas_memory,
    init_locas_weights,
)
from peft_locas.weights.blocks import Units

GLU_METHODS = ("top_k", "bottom_k", "random_clone", "gaussian", "activation_keys", "param_norm")


def _model(family="llama", r=6, **kwargs):
    kwargs.setdefault("init_weights", "gaussian")
    return get_peft_model(tiny_model(family), LocasConfig(r=r, **kwargs))


def _layers(model) -> dict[str, LocasLayer]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LocasLayer)}


def _memory(model, adapter_name="default"):
    return {n: layer.locas_memory[adapter_name] for n, layer in _layers(model).items()}


def _padded_batch(seed=1):
    """Two sequences, the second right-padded by 5, with labels -100 on a 3-token prompt and on the padding."""
    input_ids = tokens(2, 12, seed=seed)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _loader():
    return [_padded_batch(1), {"input_ids": tokens(1, 9, seed=2)}]


def _token_mask(batch):
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    return mask & (batch["labels"] != -100) if "labels" in batch else mask


def _block_inputs(family, loader):
    """Per MLP block of the plain base model, the block inputs at the counted tokens, concatenated over batches."""
    base = tiny_model(family)
    blocks = [layer.mlp for layer in (base.model.layers if hasattr(base, "model") else base.transformer.h)]
    captured = {i: [] for i in range(len(blocks))}
    for batch in loader:
        current = {}
        handles = [
            b.register_forward_pre_hook(lambda m, a, i=i, seen=current: seen.__setitem__(i, a[0]))
            for i, b in enumerate(blocks)
        ]
        with torch.no_grad():
            base(**{k: v for k, v in batch.items() if k != "labels"})
        for handle in handles:
            handle.remove()
        for i in captured:
            captured[i].append(current[i][_token_mask(batch)])
    return blocks, {i: torch.cat(rows) for i, rows in captured.items()}


def _hand_unit_activity(family, loader):
    """Mean |intermediate activation| per base unit, computed directly from the block weights."""
    blocks, inputs = _block_inputs(family, loader)
    scores = []
    for i, block in enumerate(blocks):
        a = inputs[i]
        if family == "llama":
            m = F.silu(a @ block.gate_proj.weight.T) * (a @ block.up_proj.weight.T)
        else:  # GPT-2: Conv1D weights are (in, out); gelu_new is the tanh approximation
            m = F.gelu(a @ block.c_fc.weight + block.c_fc.bias, approximate="tanh")
        scores.append(m.abs().mean(dim=0))
    return blocks, scores


def _gate_up(block):
    if hasattr(block, "gate_proj"):
        return block.gate_proj.weight, block.up_proj.weight
    return None, block.c_fc.weight.T


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["top_k", "bottom_k"])
def test_selection_equals_a_direct_computation(family, method):
    r = 7
    blocks, scores = _hand_unit_activity(family, _loader())
    # a non-identity adapter: statistics must come from the base model (adapter disabled) all the same
    model = _model(family, r=r, init_weights=False)
    state = init_locas_weights(model, _loader(), method=method, show_progress_bar=False)
    for i, (name, memory) in enumerate(_memory(model).items()):
        expected = torch.topk(scores[i], r, largest=method == "top_k").indices
        assert state.indices[name].tolist() == expected.tolist()
        gate, up = _gate_up(blocks[i])
        torch.testing.assert_close(memory.key, F.normalize(up[expected], dim=1))
        if gate is not None:
            torch.testing.assert_close(memory.gate, F.normalize(gate[expected], dim=1))
        assert torch.count_nonzero(memory.value) == 0


def test_padding_is_ignored():
    """Other tokens under the padding, or more padding, change nothing (the direct computation above also checks
    that tokens labelled -100 do not count)."""
    clean = _padded_batch()
    other_pad_tokens = dict(clean, input_ids=clean["input_ids"].clone())
    other_pad_tokens["input_ids"][1, 7:] = torch.arange(5) + 100
    more_padding = {
        "input_ids": torch.cat([clean["input_ids"], torch.zeros(2, 4, dtype=torch.long)], 1),
        "attention_mask": torch.cat([clean["attention_mask"], torch.zeros(2, 4, dtype=torch.long)], 1),
        "labels": torch.cat([clean["labels"], torch.full((2, 4), -100)], 1),
    }
    states = [
        get_locas_init_state(_model(), [batch], method=method, show_progress_bar=False)
        for batch in (clean, other_pad_tokens, more_padding)
        for method in ("top_k", "activation_keys")
    ]
    for reference, state in zip(states[:2] * 2, states[2:], strict=True):
        assert all(torch.equal(state.indices[n], i) for n, i in reference.indices.items())
        for name, memory in reference.memories.items():
            torch.testing.assert_close(state.memories[name].key, memory.key, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "family, method",
    [(f, m) for f in ("llama", "phi3", "gpt2", "gpt_neox") for m in GLU_METHODS]
    + [(f, "gradient") for f in ("gpt2", "gpt_neox")],
)
def test_method_invariants(family, method):
    x = tokens()
    base_logits = tiny_model(family)(x).logits
    model = _model(family, r=6, max_norm=0.8)
    model.train()  # a train-mode PeftModel around an eval-mode base: each module's mode must be restored
    modes = {n: m.training for n, m in model.named_modules()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    base_state = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "locas_" not in k}

    init_locas_weights(model, _loader(), method=method, show_progress_bar=False)

    assert {n: m.training for n, m in model.named_modules()} == modes
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    after = {k: v for k, v in model.get_base_model().state_dict().items() if "locas_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base_state.items())
    config = model.peft_config["default"]
    assert config.init_weights == "data"
    for memory in _memory(model).values():
        assert memory.width == config.r and memory.key.requires_grad and memory.key.dtype == torch.float32
        for rows in (memory.gate, memory.key, memory.value):
            if rows is not None:
                assert rows.norm(dim=1).max() <= 0.8 + 1e-6
    if method != "gradient":
        assert config.r == 6
        assert all(torch.count_nonzero(m.value) == 0 for m in _memory(model).values())
        model.eval()
        assert torch.equal(model(x).logits, base_logits)


def test_tau_is_recomputed_for_the_new_width_or_kept_when_fixed():
    model = _model("gpt2", r=6)
    init_locas_weights(model, _loader(), method="gradient", show_progress_bar=False)
    width = model.peft_config["default"].r
    for layer in _layers(model).values():
        down_norms = layer.get_base_layer().c_proj.weight.norm(dim=1)  # Conv1D (in=units, out): rows are units
        assert layer.locas_memory["default"].tau.item() == pytest.approx(down_norms.mean().item() / width, rel=1e-6)
    fixed = _model("llama", r=6, tau=0.3)
    init_locas_weights(fixed, _loader(), show_progress_bar=False)
    assert all(m.tau.item() == pytest.approx(0.3) for m in _memory(fixed).values())


def test_param_norm_equals_the_construction_default():
    constructed = _model(r=6, init_weights=True)
    initialised = _model(r=6)
    init_locas_weights(initialised, method="param_norm", show_progress_bar=False)
    for a, b in zip(_memory(constructed).values(), _memory(initialised).values(), strict=True):
        assert torch.equal(a.gate, b.gate) and torch.equal(a.key, b.key) and torch.equal(a.tau, b.tau)


def test_random_methods_follow_the_seed():
    def state(method, seed):
        return get_locas_init_state(_model(r=6), method=method, seed=seed, show_progress_bar=False)

    clone = state("random_clone", 0)
    assert all(len(set(i.tolist())) == 6 for i in clone.indices.values())
    assert all(torch.equal(i, state("random_clone", 0).indices[n]) for n, i in clone.indices.items())
    assert any(not torch.equal(i, state("random_clone", 1).indices[n]) for n, i in clone.indices.items())
    gauss = state("gaussian", 0)
    assert all(torch.equal(m.key, state("gaussian", 0).memories[n].key) for n, m in gauss.memories.items())
    assert not torch.equal(
        next(iter(gauss.memories.values())).key, next(iter(state("gaussian", 1).memories.values())).key
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_activation_keys_are_the_leading_eigenvectors_of_the_normalised_inputs(family):
    r = 5
    _, inputs = _block_inputs(family, _loader())
    model = _model(family, r=r)
    init_locas_weights(model, _loader(), method="activation_keys", show_progress_bar=False)
    for i, memory in enumerate(_memory(model).values()):
        a = F.normalize(inputs[i].double(), dim=1)
        eigenvalues, eigenvectors = torch.linalg.eigh(a.T @ a)
        expected = eigenvectors[:, -r:].flip(-1).T
        expected = expected * torch.sign(expected @ a.sum(0))[:, None]
        torch.testing.assert_close(memory.key.double(), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(memory.key @ memory.key.T, torch.eye(r), atol=1e-5, rtol=0)
        if family == "llama":
            assert torch.equal(memory.gate, memory.key)


def _gradient_batch():
    input_ids = tokens(2, 6, seed=3)
    attention_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, 2] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_gradient_slots_equal_the_formula():
    eps = 0.5
    batch = _gradient_batch()
    model = _model("gpt2", r=6)
    init_locas_weights(model, [batch], method="gradient", eps=eps, grad_batch_size=3, show_progress_bar=False)

    # the formula, computed one token and one layer at a time on the plain base model
    base = tiny_model("gpt2")
    blocks = [h.mlp for h in base.transformer.h]
    targets = [
        (b, t) for b in range(2) for t in range(1, 6) if batch["attention_mask"][b, t] and batch["labels"][b, t] != -100
    ]
    expected_keys = [[] for _ in blocks]
    expected_grads = [[] for _ in blocks]
    for b, t in targets:
        for layer, block in enumerate(blocks):
            captured = {}

            def perturb(module, args, output, captured=captured):
                captured["input"] = args[0]
                captured["delta"] = torch.zeros_like(output, requires_grad=True)
                return output + captured["delta"]

            handle = block.register_forward_hook(perturb)
            logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            handle.remove()
            log_p = logits[b, t - 1].log_softmax(-1)[batch["input_ids"][b, t]]
            (grad,) = torch.autograd.grad(log_p, captured["delta"])
            expected_keys[layer].append(F.normalize(captured["input"][b, t - 1].detach(), dim=0))
            expected_grads[layer].append(grad[b, t - 1])
    joint = torch.stack([torch.stack(g) for g in expected_grads]).norm(dim=(0, 2))  # per token, over all layers

    memories = list(_memory(model).values())
    assert model.peft_config["default"].r == len(targets) == 7
    for layer, memory in enumerate(memories):
        torch.testing.assert_close(memory.key, torch.stack(expected_keys[layer]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            memory.value, eps * torch.stack(expected_grads[layer]) / joint[:, None], atol=1e-6, rtol=1e-4
        )
    joint_value_norms = torch.stack([m.value for m in memories]).norm(dim=(0, 2))
    torch.testing.assert_close(joint_value_norms, torch.full((7,), eps))


def test_append_grows_the_memory_and_keeps_existing_slots():
    model = _model("gpt2", r=6)
    init_locas_weights(model, [_gradient_batch()], method="gradient", show_progress_bar=False)
    first = {n: (m.key.detach().clone(), m.value.detach().clone(), m.tau.clone()) for n, m in _memory(model).items()}
    second = {"input_ids": tokens(1, 5, seed=9)}
    init_locas_weights(model, [second], method="gradient", append=True, show_progress_bar=False)
    assert model.peft_config["default"].r == 7 + 4
    for name, memory in _memory(model).items():
        key, value, tau = first[name]
        assert (
            torch.equal(memory.key[:7], key) and torch.equal(memory.value[:7], value) and torch.equal(memory.tau, tau)
        )


def test_grow_appends_given_slots_and_checks_them():
    model = _model("llama", r=3)
    old = {n: (m.gate.detach().clone(), m.tau.clone()) for n, m in _memory(model).items()}
    slots = {n: Units(torch.randn(2, HIDDEN), torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)) for n in old}
    grow_locas_memory(model, slots)
    assert model.peft_config["default"].r == 5
    for name, memory in _memory(model).items():
        assert torch.equal(memory.gate[:3], old[name][0]) and torch.equal(memory.tau, old[name][1])
        torch.testing.assert_close(
            memory.key[3:],
            F.normalize(slots[name].key, dim=1) * torch.clamp(slots[name].key.norm(dim=1, keepdim=True), max=1),
        )
    two_layer_slots = {n: Units(None, torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)) for n in old}
    with pytest.raises(
        ValueError, match=r"memory given for 'model.layers.0.mlp' \(key \(2, 64\), value \(2, 64\)\) does not fit"
    ):
        grow_locas_memory(model, two_layer_slots)
    with pytest.raises(ValueError, match=r"first mismatch: 'model.layers.1.mlp'"):
        grow_locas_memory(model, {"model.layers.0.mlp": slots["model.layers.0.mlp"]})


def test_custom_forward_fn_is_used():
    calls = []

    def forward_fn(model, batch):
        calls.append(sorted(batch))
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))

    init_locas_weights(_model(r=6), _loader(), forward_fn=forward_fn, show_progress_bar=False)
    assert calls == [["attention_mask", "input_ids", "labels"], ["input_ids"]]


def test_two_step_form_applies_to_another_copy(tmp_path):
    x = tokens()
    source = _model("llama", r=6, tau=0.5)
    before = {n: m.key.detach().clone() for n, m in _memory(source).items()}
    state = get_locas_init_state(source, _loader(), method="top_k", show_progress_bar=False)
    assert all(torch.equal(m.key, before[n]) for n, m in _memory(source).items()), "computing the state changes nothing"

    state.save(tmp_path / "init.safetensors")
    cached = LocasInitState.load(tmp_path / "init.safetensors")
    assert cached.method == "top_k" and cached.taus == state.taus
    assert all(torch.equal(cached.indices[n], i) for n, i in state.indices.items())

    init_locas_weights(source, init_state=state)
    for dtype in (torch.float32, torch.bfloat16):
        copy = get_peft_model(tiny_model("llama", dtype=dtype), LocasConfig(r=6, tau=0.5, init_weights="gaussian"))
        init_locas_weights(copy, init_state=cached)
        for target, reference in zip(_memory(copy).values(), _memory(source).values(), strict=True):
            assert torch.equal(target.key.float(), reference.key.to(target.key.dtype).float())
            assert torch.equal(target.gate.float(), reference.gate.to(target.gate.dtype).float())
            assert target.tau.item() == reference.tau.item()
        with copy.disable_adapter():
            expected = copy(x).logits
        assert torch.equal(copy(x).logits, expected)


def test_state_from_a_model_with_other_targets_is_rejected():
    state = get_locas_init_state(_model(r=6), _loader(), show_progress_bar=False)
    other = _model(r=6, layers_to_transform=[0], layers_pattern="layers")
    with pytest.raises(
        ValueError, match=r"do not match the Locas layers of adapter 'default' \(first mismatch: 'model.layers.1.mlp'\)"
    ):
        init_locas_weights(other, init_state=state)


def test_saved_adapter_reloads_at_any_width(tmp_path):
    """A gradient memory wider than the MLP (r > intermediate size) saves and loads through PEFT's own API."""
    tiny_model("gpt2").save_pretrained(tmp_path / "base")
    model = get_peft_model(type(tiny_model("gpt2")).from_pretrained(tmp_path / "base").eval(), LocasConfig(r=4))
    long = {"input_ids": tokens(2, 70, seed=4)}
    init_locas_weights(model, [long], method="gradient", show_progress_bar=False)
    assert model.peft_config["default"].r == 138 > WIDTH
    model.save_pretrained(tmp_path / "adapter")
    x = tokens()
    for low_cpu_mem_usage in (False, True):
        fresh = type(tiny_model("gpt2")).from_pretrained(tmp_path / "base").eval()
        loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter", low_cpu_mem_usage=low_cpu_mem_usage)
        assert loaded.peft_config["default"].init_weights == "data"
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_data_placeholder_construction():
    config = LocasConfig(r=WIDTH + 1, init_weights="data")
    x = tokens()
    model = get_peft_model(tiny_model("llama"), config)
    assert all(m.width == WIDTH + 1 and torch.count_nonzero(m.value) == 0 for m in _memory(model).values())
    assert torch.equal(model(x).logits, tiny_model("llama")(x).logits)


def test_inference_mode_adapter_stays_frozen():
    model = _model(r=6, inference_mode=True)
    init_locas_weights(model, _loader(), show_progress_bar=False)
    assert not any(p.requires_grad for p in model.parameters())


def _batch_without_valid_tokens():
    batch = _padded_batch()
    return dict(batch, attention_mask=torch.zeros_like(batch["attention_mask"]))


@pytest.mark.parametrize(
    "family, r, loader, kwargs, message",
    [
        ("llama", 6, [], {}, r"the dataloader is empty; give it at least one batch"),
        (
            "llama",
            6,
            [_batch_without_valid_tokens()],
            {},
            r"batch 0 has no valid token \(attention_mask 1 and labels != -100\); drop it",
        ),
        (
            "gpt2",
            6,
            [{"input_ids": tokens(1, 1)}],
            {"method": "gradient"},
            r"batch 0 has no valid token .*followed by a valid target",
        ),
        (
            "llama",
            6,
            _loader(),
            {"method": "pca"},
            r"unknown method 'pca'; choose one of top_k, bottom_k, random_clone, gaussian",
        ),
        (
            "llama",
            6,
            _loader(),
            {"method": "gradient"},
            r"method='gradient' needs a two-layer-MLP \(Locas-MLP\) memory, but 'model.layers.0.mlp' is a "
            r"SplitGlu\(glu\) block; for it use one of top_k, bottom_k",
        ),
        ("llama", WIDTH + 1, _loader(), {}, r"r=129\) exceeds the MLP's intermediate size 128.*use method='gaussian'"),
        ("gpt2", WIDTH + 1, _loader(), {"method": "random_clone"}, r"exceeds the MLP's intermediate size 128"),
        (
            "llama",
            HIDDEN + 1,
            _loader(),
            {"method": "activation_keys"},
            r"at most the hidden size 64 orthogonal keys, but r=65",
        ),
        (
            "llama",
            6,
            [{"inputs_embeds": torch.zeros(1, 3, HIDDEN)}],
            {},
            r"batch 0 has no `input_ids` \(got \['inputs_embeds'\]\)",
        ),
        ("llama", 6, [tokens()], {}, r"batch 0 has no `input_ids` \(got Tensor\); the dataloader must yield mappings"),
        ("llama", 6, None, {}, r"method='top_k' learns from data; pass a dataloader"),
        ("gpt2", 6, _loader(), {"method": "gradient", "eps": 0}, r"`eps` must be positive"),
    ],
)
def test_errors(family, r, loader, kwargs, message):
    model = _model(family, r=r, init_weights="data")
    before = {n: m.key.detach().clone() for n, m in _memory(model).items()}
    with pytest.raises(ValueError, match=message):
        init_locas_weights(model, loader, show_progress_bar=False, **kwargs)
    assert all(torch.equal(m.key, before[n]) for n, m in _memory(model).items()), "a failed init changes nothing"


def test_model_errors():
    with pytest.raises(
        TypeError, match=r"Expected a PeftModel with a Locas adapter, got a LlamaForCausalLM.*get_peft_model"
    ):
        init_locas_weights(tiny_model(), _loader())
    model = _model(r=6)
    with pytest.raises(
        ValueError, match=r"'other' is not a Locas adapter of this model; its Locas adapters are \['default'\]"
    ):
        init_locas_weights(model, _loader(), adapter_name="other")
    with pytest.raises(ValueError, match="pass either a dataloader .* or init_state, not both"):
        init_locas_weights(model, _loader(), init_state=get_locas_init_state(model, _loader(), show_progress_bar=False))
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged into its MLP block; call `unmerge_adapter\(\)` before"):
        init_locas_weights(model, _loader())
