"""The HQCNN: gradient modes, stochasticity of the paper projection, BPDA, adaptive attacks."""

from __future__ import annotations

import pytest
import torch

from qshield_dist.attacks import ATTACKS, BPDA, CallCounter, build_attack
from qshield_dist.config import ModelSpec
from qshield_dist.data import DATASETS
from qshield_dist.diagnostics import tolerance
from qshield_dist.models import build_model
from qshield_dist.train import predict

INFO = DATASETS["digits"]


def _hqcnn(**fields) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = ModelSpec(model="hqcnn", backbone="cnn_small", **fields).resolved(INFO.classes)
    return build_model(spec, INFO).eval()


def _quantum_input_grad(model, x) -> torch.Tensor:
    """Gradient at the input of the quantum branch's output alone."""
    x = x.clone().requires_grad_(True)
    model.quantum_logprobs(model.backbone(x)).sum().backward()
    return x.grad


def test_full_gradient_reaches_the_input_through_the_quantum_branch():
    x = torch.rand(4, 1, 28, 28)
    assert float(_quantum_input_grad(_hqcnn(quantum_grad="full"), x).abs().sum()) > 0


def test_detached_gives_no_input_gradient_through_the_quantum_branch():
    x = torch.rand(4, 1, 28, 28)
    grad = _quantum_input_grad(_hqcnn(quantum_grad="detached"), x)
    assert grad is None or float(grad.abs().sum()) == 0.0


def test_paper_projection_is_stochastic_and_learned_is_not():
    x = torch.rand(8, 1, 28, 28)
    paper, learned = _hqcnn(projection="paper"), _hqcnn(projection="learned")
    assert paper.stochastic and not learned.stochastic
    with torch.no_grad():
        assert not torch.allclose(paper(x), paper(x))
        assert torch.equal(learned(x), learned(x))


def test_outputs_are_log_probabilities():
    out = _hqcnn()(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-4)


@pytest.fixture(scope="module")
def trained_detached(digits, trained_hqcnn):
    _, test = digits
    model = trained_hqcnn(quantum_grad="detached", projection="learned")
    correct = predict(model, test.x) == test.y
    assert correct.float().mean() > 0.8
    return model, test.x[correct][:32], test.y[correct][:32]


def test_bpda_recovers_the_input_gradient_of_a_detached_model(trained_detached):
    model, x, y = trained_detached
    twin = model.differentiable_twin()
    bpda = BPDA(model, twin)
    xs = x.clone().requires_grad_(True)
    torch.nn.functional.nll_loss(bpda(xs), y).backward()
    # forward values are the real model's, gradients the twin's (the quantum branch included)
    with torch.no_grad():
        assert torch.allclose(bpda(x), model(x))
    xt = x.clone().requires_grad_(True)
    torch.nn.functional.nll_loss(twin(xt), y).backward()
    assert torch.allclose(xs.grad, xt.grad, atol=1e-6)
    q_real = _quantum_input_grad(model, x)
    q_twin = _quantum_input_grad(twin, x)
    assert (q_real is None or float(q_real.abs().sum()) == 0.0) and float(q_twin.abs().sum()) > 0


def test_eot_pgd_reaches_at_least_plain_pgd_on_a_stochastic_model(digits, trained_hqcnn):
    _, test = digits
    model = trained_hqcnn(quantum_grad="detached", projection="paper")
    torch.manual_seed(0)
    votes = torch.stack([predict(model, test.x) == test.y for _ in range(5)]).float().mean(0) > 0.5
    x, y = test.x[votes][:48], test.y[votes][:48]

    def asr(name: str) -> float:
        params = ATTACKS[name].params(
            "digits", "standard", {"eps": 0.1, "steps": 10} | ({"eot_iter": 8} if name == "eot_pgd" else {})
        )
        torch.manual_seed(1)
        adv = build_attack(name, CallCounter(model), params, 10)(x, y).detach()
        wrong = torch.stack([predict(model, adv) != y for _ in range(5)]).float().mean(0) > 0.5
        return float(wrong.float().mean())

    eot, plain = asr("eot_pgd"), asr("pgd")
    # "At least", up to sampling noise: the same rule the diagnostics use (two standard errors).
    assert eot >= plain - tolerance(eot, len(y), plain, len(y)), (eot, plain)


def test_fusion_gradient_is_finite_when_a_probability_underflows():
    from qshield_dist.models.hybrid import DynamicFusion

    fusion = DynamicFusion().eval()
    logp_c = torch.log_softmax(torch.tensor([[200.0, 0.0, -200.0, 0.0]]).repeat(4, 1), dim=1).requires_grad_(
        True
    )
    logp_q = torch.log_softmax(torch.zeros(4, 4), dim=1)
    assert (
        float(logp_c.detach().exp().min()) == 0.0
    )  # exp underflows: sqrt(p) would have an infinite gradient
    fusion(logp_c, logp_q).sum().backward()
    assert torch.isfinite(logp_c.grad).all()


SIMULATION = [  # (simulator, device, trajectories, noise_model)
    ("compiled", "default.mixed", 0, "mixed"),
    ("qnode", "default.mixed", 0, "mixed"),
    ("qnode", "default.qubit", 2, "mixed"),  # Monte-Carlo trajectories
    ("qnode", "default.qubit", 0, "none"),
    ("qnode", "default.qubit", 2, "none"),  # noiseless: trajectories ignored
]


@pytest.mark.parametrize("simulator,device,trajectories,noise_model", SIMULATION)
def test_the_torch_free_rule_says_which_models_are_stochastic(simulator, device, trajectories, noise_model):
    """ModelSpec.stochastic (what the grid uses, without torch) agrees with the built model's
    `stochastic`, and that with what its draws show, for every setting that can
    make a model random: the paper projection (enhanced_angle, fewer classes than angles),
    input noise, trajectories."""
    from qshield_dist.models.classic import Classifier

    x = torch.rand(2, 1, 28, 28)
    for projection in ("paper", "learned"):
        for encoding in ("angle", "enhanced_angle"):
            for qubits in (3, 4):  # enhanced_angle: 9 or 12 angles for 10 classes
                for input_noise in (0.0, 0.1):
                    spec = ModelSpec(
                        model="hqcnn",
                        backbone="cnn_small",
                        projection=projection,
                        encoding=encoding,
                        qubits=qubits,
                        input_noise=input_noise,
                        simulator=simulator,
                        device=device,
                        trajectories=trajectories,
                        noise_model=noise_model,
                        noise_strength=0.3,  # trajectories whose draws differ visibly
                    ).resolved(INFO.classes)
                    torch.manual_seed(0)
                    model = build_model(spec, INFO).eval()
                    said = spec.stochastic(INFO.classes)
                    assert model.stochastic is said, spec
                    with torch.no_grad():
                        draws = model.draws(x, 8)  # eight draws: all equal only if nothing is random
                    # (batched PennyLane runs may differ in the last bits between equal copies)
                    varies = not all(torch.allclose(d, draws[0], rtol=0, atol=1e-5) for d in draws)
                    assert varies is said, spec
                    assert Classifier(model.backbone).stochastic is False  # a backbone_only control
    expected = (projection, encoding, qubits, input_noise)  # the last combination: all four apply
    assert expected == ("learned", "enhanced_angle", 4, 0.1)
