import pytest
import torch

from finetune.data.pack import best_fit_bins, collate, make_units, pack, packing_efficiency, single_units


def ex(n, start=10):
    ids = list(range(start, start + n))
    return ids, [-100] + ids[1:]


def test_best_fit_decreasing_bins():
    # 6 -> new bin A (room 4); 5 -> new bin B (room 5); 4 -> A, the tightest fit (room 0);
    # 3 -> B (room 2); 2 -> B (room 0)
    assert best_fit_bins([3, 6, 2, 5, 4], 10) == [[1, 4], [3, 0, 2]]
    # 7 -> A (room 3); 6 -> B (room 4); 3 -> A, not B: best fit, not first fit
    assert best_fit_bins([6, 7, 3], 10) == [[1, 2], [0]]
    with pytest.raises(ValueError):
        best_fit_bins([11], 10)


def test_pack_units_and_position_ids():
    units = pack([ex(3, 10), ex(2, 20), ex(4, 30)], seq_len=6)
    assert units == [
        {"input_ids": [30, 31, 32, 33, 20, 21], "labels": [-100, 31, 32, 33, -100, 21], "position_ids": [0, 1, 2, 3, 0, 1]},
        {"input_ids": [10, 11, 12], "labels": [-100, 11, 12], "position_ids": [0, 1, 2]},
    ]
    assert packing_efficiency(units, 6) == 9 / 12
    assert make_units([ex(2)], 6, packing=False) == single_units([ex(2)])


def test_collate_pads_with_own_segment():
    units = single_units([ex(3), ex(1)])
    b = collate(units, pad_id=0)
    assert b["input_ids"].tolist() == [[10, 11, 12], [10, 0, 0]]
    assert b["labels"].tolist() == [[-100, 11, 12], [-100, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert all(v.dtype == torch.long for v in b.values())


@pytest.fixture(scope="module")
def tiny_models():
    from transformers import AutoModelForCausalLM

    from finetune.models.tiny import tiny_model_dir

    from finetune.memory.lean import LEAN_SDPA, patch_attention

    path = tiny_model_dir()
    models = {impl: AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32).eval()
              for impl in ("sdpa", "eager")}
    lean = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    assert patch_attention(lean) and lean.config._attn_implementation == LEAN_SDPA  # what training uses on CPU
    return {**models, "lean_sdpa": lean}


def assert_no_leak(model, device="cpu", atol=1e-5):
    """Packed logits of four examples in two units equal each example's logits alone; the units."""
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(3, 259, (n,), generator=g).tolist(), None) for n in (9, 7, 5, 3)]
    examples = [(ids, [-100] + ids[1:]) for ids, _ in examples]
    units = pack(examples, seq_len=16)
    assert len(units) == 2 and all(len(set(u["position_ids"])) < len(u["position_ids"]) for u in units)
    batch = {k: v.to(device) for k, v in collate(units, pad_id=0).items()}
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                       use_cache=False).logits
        for row, u in enumerate(units):
            pos = u["position_ids"]
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([u["input_ids"][a:b]], device=device), use_cache=False).logits[0]
                torch.testing.assert_close(packed[row, a:b], alone, atol=atol, rtol=0)
    return units


@pytest.mark.parametrize("impl", ["sdpa", "eager", "lean_sdpa"])
def test_no_leak_inside_pack(tiny_models, impl):
    """An example's logits inside a pack (and inside a padded batch) equal its logits alone."""
    model = tiny_models[impl]
    units = assert_no_leak(model)
    # and the check is not vacuous: without position ids the second example does see the first
    with torch.no_grad():
        leaky = model(input_ids=collate(units, pad_id=0)["input_ids"][:1], use_cache=False).logits[0]
    a = units[0]["position_ids"].index(0, 1)
    alone = model(input_ids=torch.tensor([units[0]["input_ids"][a:]]), use_cache=False).logits[0]
    assert not torch.allclose(leaky[a:], alone, atol=1e-3)


def _load_tiny(attn: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    from finetune.models.tiny import tiny_model_dir

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir(), attn_implementation=attn,
                                                dtype=torch.float32).to(device).eval()


@pytest.mark.slow  # compiles flex_attention: ~35 s on the shared CPU
def test_no_leak_with_flex_attention_on_cpu():
    """The CPU rehearsal of the document-masked attention a GPU may use instead of a dense mask:
    transformers turns the restarting position ids into a flex_attention BlockMask (packed-sequence
    detection in masking_utils), and packed logits equal each document's alone. Forward only:
    torch has no flex backward on the CPU (finetune.runtime refuses to train with it there)."""
    try:
        model = _load_tiny("flex_attention")
        assert_no_leak(model)
    except (ImportError, NotImplementedError, RuntimeError) as e:  # a torch without CPU flex (a leak is an AssertionError)
        pytest.skip(f"flex_attention does not run on this CPU: {e}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn's varlen kernel is CUDA only")
def test_no_leak_with_flash_attention_varlen():
    """On a GPU with flash-attn (what model.attn_implementation=auto picks there): packed rows run
    varlen, with no mask, and attend only inside their documents."""
    pytest.importorskip("flash_attn")
    model = _load_tiny("flash_attention_2", "cuda").to(torch.bfloat16)
    assert_no_leak(model, device="cuda", atol=3e-2)

