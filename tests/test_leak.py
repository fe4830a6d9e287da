"""Issue 16: the leak measurement (perfusion_ops/leak.py) against an independent computation of the gate."""
import pytest
import torch

from reference import random_concept
from support.tiny_models import tiny_clip, tiny_model

pytestmark = pytest.mark.host

# The concept's word sits at token 4 of each prompt (BOS a photo of <word> ...), and each prompt has `length`
# tokens from BOS through EOS.
PROMPTS = [("a photo of embedding:sks on a table", 9), ("a photo of embedding:sks in the snow at night", 11),
           ("a dog and a cat on a sofa", 10)]


@pytest.fixture(scope="module")
def setup():
    from perfusion_ops.text import clip_with_concepts
    model, clip = tiny_model("sd1"), tiny_clip("sd1")
    draft = random_concept(model, "sd1", "sks", seed=3)
    concept_clip = clip_with_concepts(clip, [draft])
    context = concept_clip.encode_from_tokens(concept_clip.tokenize(PROMPTS[0][0]))
    concept = random_concept(model, "sd1", "sks", seed=3, context=context[:, :9], position=4).replace(
        embeddings=draft.embeddings)
    return clip_with_concepts(clip, [concept]), concept


def expected(concept_clip, concept, beta, tau):
    """(leak, own r values) from the encodings directly, with the positions known from the prompts' wording."""
    open_others, others, own = 0, 0, []
    u, i_star = concept.u.double(), concept.i_star.double()
    for prompt, length in PROMPTS:
        context = concept_clip.encode_from_tokens(concept_clip.tokenize(prompt))[0, :length].double()
        r = context @ u / (u @ i_star)
        g = torch.sigmoid((r - beta) / tau)
        concept_positions = [4] if "embedding:" in prompt else []
        for position in range(length):
            if position in concept_positions:
                own.append(float(r[position]))
            else:
                others += 1
                open_others += int(g[position] > 0.5)
    return open_others / others, own, others


@pytest.mark.parametrize("beta,tau", [(0.7, 0.15), (0.3, 0.05), (-50.0, 0.1), (50.0, 0.1)])
def test_gate_report_counts_the_open_gates_of_the_other_tokens(setup, beta, tau):
    from perfusion_ops.leak import gate_report, token_gate_inputs
    concept_clip, concept = setup
    report = gate_report(concept_clip, concept, [p for p, _ in PROMPTS], beta, tau)
    leak, own, others = expected(concept_clip, concept, beta, tau)
    assert report.other_tokens == others == sum(n for _, n in PROMPTS) - 2
    assert report.own_tokens == 2 and abs(report.own_r - sum(own) / 2) < 1e-6
    assert report.leak == pytest.approx(leak)
    assert report.own_r == pytest.approx(sum(own) / 2)
    if beta < -10:
        assert report.leak == 1.0 and report.own_gate > 0.999
    if beta > 10:
        assert report.leak == 0.0 and report.own_gate < 1e-3
    # The concept's word in the prompt its i* came from has r = 1.
    r, positions = token_gate_inputs(concept_clip, concept, PROMPTS[0][0])
    assert positions == [4] and abs(float(r[4]) - 1.0) < 1e-5
