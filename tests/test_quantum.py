"""QShield circuit and QuantumLayer: structure, channels, exactness against PennyLane, trajectories."""

from __future__ import annotations

import itertools
import math
import pickle
import zlib

import pennylane as qml
import pytest
import torch

from qshield_dist.quantum import (
    CircuitSpec,
    QuantumLayer,
    body_ops,
    check_fits,
    density_matrix,
    entanglement_pairs,
    pauli_twirl,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny tensor ops, for which a second OpenMP thread only adds
    synchronisation (and stalls badly when CI runs other work on the same 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ENTANGLEMENTS = ["none", "linear", "star", "full", "ring"]
NOISES = ["none", "depolarizing", "amplitude_damping", "phase_damping", "mixed"]


def _angles(spec: CircuitSpec, batch: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, spec.n_angles, generator=g, dtype=torch.float64) * 2 - 1).mul(math.pi).to(dtype)


# --- structure -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("none", []),
        ("linear", [(0, 1), (1, 2), (2, 3)]),
        ("star", [(0, 1), (0, 2), (0, 3)]),
        ("full", [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]),
        ("ring", [(0, 1), (1, 2), (2, 3), (3, 0)]),
    ],
)
def test_entanglement_pairs_n4(pattern, expected):
    assert entanglement_pairs(pattern, 4) == expected
    spec = CircuitSpec(4, depth=2, entanglement=pattern, noise_model="none")
    with qml.QueuingManager.stop_recording():
        cnots = [tuple(int(w) for w in op.wires) for op in body_ops(spec) if op.name == "CNOT"]
    assert cnots == expected * 2  # the circuit uses exactly these, once per layer


def test_ring_two_qubits_has_no_duplicate():
    pairs = entanglement_pairs("ring", 2)
    assert pairs == [(0, 1), (1, 0)]
    assert len(set(pairs)) == len(pairs)


def test_spec_validation():
    with pytest.raises(ValueError, match="entanglement"):
        CircuitSpec(4, entanglement="mesh")
    with pytest.raises(ValueError, match="depth"):
        CircuitSpec(4, depth=0)
    with pytest.raises(ValueError, match="noise_strength"):
        CircuitSpec(4, noise_strength=1.5)
    assert CircuitSpec(4, encoding="angle").n_angles == 4
    assert CircuitSpec(4).n_angles == 12


def test_mixed_noise_order_and_shares():
    spec = CircuitSpec(1, entanglement="none", noise_model="mixed", noise_strength=0.1)
    with qml.QueuingManager.stop_recording():
        ops = body_ops(spec)
    assert [op.name for op in ops] == ["DepolarizingChannel", "AmplitudeDamping", "PhaseDamping"]
    assert [float(op.parameters[0]) for op in ops] == pytest.approx([0.04, 0.03, 0.03])


# --- channels against hand-computed values ---------------------------------------------------


def _one_qubit(noise: str, p: float) -> CircuitSpec:
    return CircuitSpec(1, entanglement="none", encoding="angle", noise_model=noise, noise_strength=p)


@pytest.mark.parametrize("simulator", ["compiled", "qnode"])
def test_amplitude_damping_on_one(simulator):
    gamma = 0.3
    layer = QuantumLayer(_one_qubit("amplitude_damping", gamma), simulator=simulator)
    probs = layer(torch.tensor([[math.pi]], dtype=torch.float64))  # RY(pi)|0> = |1>
    assert probs[0].tolist() == pytest.approx([gamma, 1 - gamma], abs=1e-12)


@pytest.mark.parametrize("simulator", ["compiled", "qnode"])
def test_depolarizing_on_zero(simulator):
    p = 0.3  # PennyLane: rho -> (1-p) rho + p/3 (X rho X + Y rho Y + Z rho Z)
    layer = QuantumLayer(_one_qubit("depolarizing", p), simulator=simulator)
    probs = layer(torch.zeros(1, 1, dtype=torch.float64))
    assert probs[0].tolist() == pytest.approx([1 - 2 * p / 3, 2 * p / 3], abs=1e-12)


def test_depolarizing_purity_formula():
    p = 0.25
    spec = _one_qubit("depolarizing", p)
    rho = density_matrix(spec, torch.tensor([[0.7]], dtype=torch.float64))[0]
    purity = torch.trace(rho @ rho).real.item()
    shrink = 1 - 4 * p / 3  # Bloch vector length of a pure state after the channel
    assert purity == pytest.approx((1 + shrink**2) / 2, abs=1e-12)


def test_phase_damping_keeps_populations_shrinks_coherence():
    gamma, theta = 0.36, 1.1
    angles = torch.tensor([[theta]], dtype=torch.float64)
    clean = density_matrix(_one_qubit("none", 0.0), angles)[0]
    noisy = density_matrix(_one_qubit("phase_damping", gamma), angles)[0]
    assert torch.allclose(noisy.diagonal(), clean.diagonal(), atol=1e-12)
    assert abs(noisy[0, 1]).item() == pytest.approx(math.sqrt(1 - gamma) * abs(clean[0, 1]).item(), abs=1e-12)
    assert abs(clean[0, 1]).item() == pytest.approx(math.sin(theta) / 2, abs=1e-12)


def test_density_matrix_matches_pennylane():
    spec = CircuitSpec(3, depth=2, entanglement="ring", noise_model="mixed", noise_strength=0.1)
    angles = _angles(spec, 2, seed=3)
    dev = qml.device("default.mixed", wires=3)

    @qml.qnode(dev, interface="torch")
    def ref(a):
        from qshield_dist.quantum import circuit_ops

        circuit_ops(spec, a)
        return qml.density_matrix(wires=[0, 1, 2])

    assert torch.allclose(density_matrix(spec, angles), ref(angles), atol=1e-12)


def test_pauli_twirl_from_kraus():
    g = 0.2
    twirl = pauli_twirl(qml.AmplitudeDamping(g, wires=0))
    s = math.sqrt(1 - g)
    assert twirl.tolist() == pytest.approx([(1 + s) ** 2 / 4, g / 4, g / 4, (1 - s) ** 2 / 4], abs=1e-12)
    assert pauli_twirl(qml.DepolarizingChannel(0.3, wires=0)).tolist() == pytest.approx([0.7, 0.1, 0.1, 0.1])


# --- probabilities and exactness ---------------------------------------------------------


@pytest.mark.parametrize("qubits, path", [(3, "transfer"), (4, "transfer"), (4, "density"), (5, "density")])
def test_probabilities_are_a_distribution(qubits, path):
    spec = CircuitSpec(qubits, depth=2, noise_strength=0.2)
    probs = QuantumLayer(spec, compiled=path)(_angles(spec, 16, seed=qubits, dtype=torch.float32))
    assert probs.shape == (16, 2**qubits) and probs.dtype == torch.float32
    assert (probs >= -1e-6).all()
    assert torch.allclose(probs.sum(1), torch.ones(16), atol=1e-5)


def _probs_and_grad(layer: QuantumLayer, angles: torch.Tensor, weights: torch.Tensor):
    x = angles.clone().requires_grad_()
    probs = layer(x)
    (probs * weights).sum().backward()
    return probs.detach(), x.grad


@pytest.mark.parametrize("encoding", ["angle", "enhanced_angle"])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("entanglement", ENTANGLEMENTS)
def test_compiled_matches_default_mixed(entanglement, noise, depth, encoding):
    _check_against_default_mixed(CircuitSpec(4, depth, entanglement, encoding, noise, noise_strength=0.05))


def _check_against_default_mixed(spec: CircuitSpec) -> None:
    seed = zlib.crc32(repr(spec).encode())  # stable across runs
    angles = _angles(spec, 3, seed)
    weights = torch.randn(
        3, 2**spec.qubits, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    ref_p, ref_g = _probs_and_grad(QuantumLayer(spec, "qnode", "default.mixed"), angles, weights)
    for path in ("transfer", "density"):
        p, g = _probs_and_grad(QuantumLayer(spec, "compiled", compiled=path), angles, weights)
        assert (p - ref_p).abs().max() <= 1e-5, path
        assert (g - ref_g).abs().max() <= 1e-5, path


def test_compiled_float32_and_single_sample():
    spec = CircuitSpec(4)
    angles = _angles(spec, 5, seed=11)
    ref = QuantumLayer(spec, "qnode")(angles)
    layer = QuantumLayer(spec)
    out32 = layer(angles.float())
    assert out32.dtype == torch.float32 and (out32.double() - ref).abs().max() <= 1e-5
    assert torch.allclose(layer(angles[2]), ref[2], atol=1e-12)
    with torch.no_grad():  # no-grad path skips the forward-mode Jacobian; same values
        assert torch.allclose(layer(angles.requires_grad_()), ref, atol=1e-12)


def test_wrong_angle_count_is_rejected():
    with pytest.raises(ValueError, match="takes 12 angles"):
        QuantumLayer(CircuitSpec(4))(torch.zeros(2, 10))


# --- state-vector devices and trajectories ------------------------------------------------


def test_noiseless_statevector_matches_mixed():
    spec = CircuitSpec(4, depth=2, noise_model="none")
    angles = _angles(spec, 4, seed=5)
    weights = torch.randn(4, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref_p, ref_g = _probs_and_grad(QuantumLayer(spec), angles, weights)
    devices = ["default.qubit"] + (["lightning.qubit"] if _has_device("lightning.qubit") else [])
    for device in devices:
        layer = QuantumLayer(spec, "qnode", device)
        assert not layer.stochastic and layer.noise_approx == "exact"
        p, g = _probs_and_grad(layer, angles, weights)
        assert (p - ref_p).abs().max() <= 1e-10, device
        assert (g - ref_g).abs().max() <= 1e-10, device


def _has_device(name: str) -> bool:
    try:
        qml.device(name, wires=1)
        return True
    except Exception:
        return False


def test_noisy_statevector_requires_trajectories():
    with pytest.raises(ValueError, match="trajectories"):
        QuantumLayer(CircuitSpec(4), "qnode", "default.qubit")
    with pytest.raises(ValueError, match="trajectories"):
        QuantumLayer(CircuitSpec(4), "qnode", "default.mixed", trajectories=10)


def test_trajectories_converge_for_depolarizing():
    spec = CircuitSpec(3, depth=2, noise_model="depolarizing", noise_strength=0.2)
    angles = _angles(spec, 6, seed=7)
    exact = QuantumLayer(spec)(angles)
    errors = {}
    for k in (10, 400):
        layer = QuantumLayer(spec, "qnode", "default.qubit", trajectories=k, seed=0)
        assert layer.stochastic and layer.noise_approx == "exact"
        errors[k] = (layer(angles) - exact).abs().max().item()
    # Each trajectory's probability vector lies in [0, 1]: sd <= 1/2, so the mean of K is
    # within ~2 sd / sqrt(K) of the exact value; the K=400 error should be ~sqrt(40)x smaller.
    assert errors[400] < 1.0 / math.sqrt(400)
    assert errors[400] < errors[10] / 2


def test_trajectories_are_seeded_and_differentiable():
    spec = CircuitSpec(3, noise_model="depolarizing", noise_strength=0.3)
    angles = _angles(spec, 4, seed=1)
    a = QuantumLayer(spec, "qnode", "default.qubit", trajectories=20, seed=42)(angles)
    b = QuantumLayer(spec, "qnode", "default.qubit", trajectories=20, seed=42)(angles)
    assert torch.equal(a, b)
    x = angles.clone().requires_grad_()
    QuantumLayer(spec, "qnode", "default.qubit", trajectories=5, seed=0)(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_phase_damping_is_invisible_to_the_readout():
    # Its twirl is Z errors only, which CNOTs map to Z errors: basis probabilities never move.
    spec = CircuitSpec(3, depth=2, noise_model="phase_damping", noise_strength=0.5)
    angles = _angles(spec, 4, seed=2)
    clean = QuantumLayer(CircuitSpec(3, depth=2, noise_model="none"))(angles)
    assert torch.allclose(QuantumLayer(spec)(angles), clean, atol=1e-12)
    traj = QuantumLayer(spec, "qnode", "default.qubit", trajectories=3, seed=0)(angles)
    assert torch.allclose(traj, clean, atol=1e-12)


def test_amplitude_damping_trajectories_flag_the_approximation():
    for noise in ("amplitude_damping", "mixed"):
        layer = QuantumLayer(CircuitSpec(2, noise_model=noise), "qnode", "default.qubit", trajectories=2)
        assert layer.noise_approx == "pauli_twirl" and layer.stochastic


def test_qnode_layer_pickles():
    layer = QuantumLayer(
        CircuitSpec(2, noise_model="depolarizing"), "qnode", "default.qubit", trajectories=3, seed=1
    )
    clone = pickle.loads(pickle.dumps(layer))
    angles = _angles(CircuitSpec(2), 2, seed=0)
    assert clone(angles).shape == (2, 4)


# --- sizing -------------------------------------------------------------------------------


def test_check_fits():
    check_fits(CircuitSpec(4), "compiled", "default.mixed", batch=128)
    with pytest.raises(ValueError, match=r"at most \d+ qubits fit"):
        check_fits(CircuitSpec(30), "compiled", "default.mixed", batch=128)
    with pytest.raises(ValueError, match=r"at most \d+ qubits fit"):
        check_fits(CircuitSpec(12), "qnode", "default.mixed", batch=128, memory_bytes=2**30)
    with pytest.raises(ValueError, match="at most"):
        check_fits(CircuitSpec(26, noise_model="none"), "qnode", "lightning.qubit", batch=128, grad=False)
    with pytest.raises(ValueError, match="simulator"):
        check_fits(CircuitSpec(4), "tensor-network", "default.mixed", batch=1)


def test_compiled_paths_by_size():
    assert QuantumLayer(CircuitSpec(4)).path == "transfer"
    assert QuantumLayer(CircuitSpec(9)).path == "density"


def test_every_combination_runs_at_the_smallest_size():
    """Two qubits (the floor of `qubits`): every pattern and noise model gives a distribution."""
    for ent, noise, enc in itertools.product(ENTANGLEMENTS, NOISES, ["angle", "enhanced_angle"]):
        spec = CircuitSpec(2, 1, ent, enc, noise)
        probs = QuantumLayer(spec)(torch.rand(3, spec.n_angles))
        assert probs.shape == (3, 4) and bool((probs >= 0).all())
        assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5), (ent, noise, enc)


def test_compiled_probabilities_are_never_negative_in_float32():
    """Near-basis states make exact zeros that float32 rounding pushes below 0; a negative
    probability turns the hybrid's log-probabilities into NaN (it did, on real MNIST)."""
    spec = CircuitSpec(
        qubits=4,
        depth=1,
        entanglement="none",
        encoding="enhanced_angle",
        noise_model="mixed",
        noise_strength=0.005,
    )
    torch.manual_seed(0)
    angles = torch.pi * torch.tanh(0.03 * torch.randn(20000, 12))
    probs = QuantumLayer(spec)(angles)
    assert float(probs.min()) >= 0.0
