"""generate(cache_implementation="static"), eager and with the model's forward under torch.compile, for MixLoRA,
MiLoRA and a mixed batch: the same greedy tokens and close logits as eager generate() with the dynamic cache.

The compiled runs take transformers' own path, the one that applies `mode="reduce-overhead"` (CUDA graphs) on
a GPU: with a static cache, generate() runs the prefill eagerly and every decoding step through
`torch.compile(model.__call__)` (routing hooks included), here forced on CPU by the CompileConfig flag that
transformers keeps for tests. The backend is "aot_eager" (dynamo, then AOTAutograd's functionalised graph,
which inductor would compile, run eagerly): inductor itself would spend most of a minute per model on two cores
compiling C++ for a 2-layer model. Graph breaks are allowed (a table bounds them), errors are not, and only the
first decoding step may compile graphs: a step that recompiles would leave CUDA graphs nothing to replay and
soon hit dynamo's recompile limit. (MiLoRA's routing hook is traced once more at the second step, which finds
the cache reference the first one dropped; that adds no graph.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_model
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList

import moelora
from moelora import LoraConfig, MiLoraConfig, MixLoraConfig, MoeLoraModel, get_moelora_model

NEW_TOKENS = 6


def _model(kind: str) -> tuple[MoeLoraModel, list[str] | None]:
    """A tiny llama with random adapters; for "mixed" the adapter names of a 3-row batch (one per kind)."""
    mixlora = MixLoraConfig(r=4, num_experts=4, top_k=2, lora_dropout=0.0)
    milora = MiLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    if kind == "mixlora":
        model, names = get_moelora_model(tiny_model("llama"), mixlora), None
    elif kind == "milora":
        model, names = get_moelora_model(tiny_model("llama"), milora), None
    else:
        model = get_moelora_model(tiny_model("llama"), milora, "mi")
        model.add_adapter(mixlora, "mix")
        model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), "lora")
        names = ["mi", "mix", "lora"]
    randomize_adapters(model, seed=7, std=0.3)
    return model.eval(), names


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 6, 4 and 5 tokens, left-padded (padding must not enter MiLoRA's prompt pooling)."""
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


class _CompilesPerStep(LogitsProcessor):
    """Records, after each model call of generate(), how many graphs have been compiled so far (runs eagerly,
    between the calls; returns the scores unchanged)."""

    def __init__(self, graphs: list) -> None:
        self.graphs, self.seen = graphs, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.seen.append(len(self.graphs))
        return scores


def _generate(model: MoeLoraModel, names: list[str] | None, **kwargs):
    ids, mask = _prompts()
    return model.generate(
        ids,
        attention_mask=mask,
        adapter_names=names,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def _assert_same(got, want, what: str) -> None:
    assert torch.equal(got.sequences, want.sequences), f"{what}: greedy tokens differ"
    for step, (a, b) in enumerate(zip(got.logits, want.logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, s=step: f"{what}, step {s}: {m}")


KINDS = [
    pytest.param("mixlora", id="mixlora"),
    pytest.param("milora", id="milora"),
    pytest.param("mixed", id="mixed-milora-mixlora-lora"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_generate_equals_the_dynamic_cache(kind, backend):
    """Eager. generate() hands a static cache's model calls a 4D attention mask; MiLoRA reads its prompt tokens
    from that mask's diagonal (padding pooled in would change the left-padded rows' routing)."""
    if backend == "cpu":
        pytest.importorskip("moelora.cpu_backend", reason="moelora._C is not built", exc_type=ImportError)
    model, names = _model(kind)
    with moelora.set_backend(backend):
        dynamic = _generate(model, names)
        static = _generate(model, names, cache_implementation="static")
    _assert_same(static, dynamic, f"{kind}, {backend}: static cache against dynamic")


@pytest.fixture
def fresh_dynamo():
    """Each compiled test starts from an empty dynamo cache: the cache is keyed by code objects, which every
    model shares, so models of earlier tests would count against the recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Graphs dynamo compiles for one decoding step (measured, torch 2.13, transformers 5.25): each kind traces
# whole (fullgraph). The mixed batch broke into 35 graphs while LoraLinear._stacked checked Tensor._version
# under compile (dynamo cannot guard on it); a compiled step now reuses the stack its eager prefill built.
COMPILED = [
    pytest.param("mixlora", 1, id="mixlora"),
    pytest.param("milora", 1, id="milora"),
    pytest.param("mixed", 1, id="mixed-milora-mixlora-lora"),
]


@pytest.mark.parametrize(("kind", "max_graphs"), COMPILED)
def test_compiled_static_generate_equals_eager(kind, max_graphs, fresh_dynamo):
    """On the C++ backend, which compiles fullgraph (the reference compiles only with graph breaks, slowly)."""
    pytest.importorskip("moelora.cpu_backend", reason="moelora._C is not built", exc_type=ImportError)
    model, names = _model(kind)
    graphs: list = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    config = CompileConfig(backend=counting_backend, mode="default")
    config._compile_all_devices = True  # transformers' switch for compiling generate() on CPU, meant for tests
    steps = _CompilesPerStep(graphs)
    with moelora.set_backend("cpu"):
        eager = _generate(model, names)
        compiled = _generate(
            model,
            names,
            cache_implementation="static",
            compile_config=config,
            logits_processor=LogitsProcessorList([steps]),
        )
    _assert_same(compiled, eager, f"{kind}: compiled static cache against eager dynamic cache")
    assert len(steps.seen) == NEW_TOKENS
    # seen: graphs compiled so far after each model call; the prefill runs eagerly, the first step compiles.
    assert steps.seen[0] == 0 < steps.seen[1] <= max_graphs, f"graphs compiled after each call: {steps.seen}"
    assert len(set(steps.seen[1:])) == 1, f"a later decoding step compiled again: {steps.seen}"
