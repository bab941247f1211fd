"""Torch module that runs the QShield circuit of `circuits.py` on a batch of angles.

Simulators:

- `compiled` (default, exact): the encoded state is a product state whose Pauli vector r comes
  from `encoding.py`; the data-independent body is compiled once per CircuitSpec (`superop.py`)
  into the real readout matrix T, so p = T^T r. Gradients are forward-mode (one extra kron
  variant per angle) so the backward pass is a single multiply-and-sum. Above
  TRANSFER_MAX_QUBITS (`memory.py` picks the path) it falls back to an exact batched
  density-matrix simulation applying the same local superoperators, with an adjoint
  (Heisenberg) backward pass, so no intermediate density matrix is stored for autograd.
- `qnode`: a PennyLane QNode on a named device, broadcast over the batch. `default.mixed` is
  exact for every noise model; state-vector devices run noisy circuits by Monte-Carlo
  trajectories over each channel's Pauli twirl (`trajectories.py`; exact in expectation for
  Pauli-mixture channels, an approximation for amplitude damping: `noise_approx == "pauli_twirl"`).

The two autograd functions here join an encoding to a compiled body; they live with the layer,
not in `superop.py`, so that `superop.py` needs nothing from `encoding.py`.
"""

from __future__ import annotations

import functools
import logging

import pennylane as qml
import torch

from qshield_dist.quantum.circuits import circuit_ops, encoding_ops, probs_qfunc
from qshield_dist.quantum.encoding import _encoding_stages, encoded_factors, kron_factors, pauli_vector
from qshield_dist.quantum.memory import compiled_path, density_chunk
from qshield_dist.quantum.spec import CircuitSpec
from qshield_dist.quantum.superop import (
    _heisenberg,
    _Program,
    _schrodinger,
    compile_body,
    complex_dtype,
    matrix_to_pauli,
    pauli_to_matrix,
    transfer_matrix,
)
from qshield_dist.quantum.trajectories import queue_plan, sample_paulis, trajectory_plan, twirl_is_exact
from qshield_dist.randomness import samples_trajectories
from qshield_dist.vocabulary import COMPILED_PATHS, MIXED_DEVICES, SIMULATORS

log = logging.getLogger(__name__)


class _DensityEvolve(torch.autograd.Function):
    """Pauli vector (B, 4^n) -> probabilities (B, 2^n) by density-matrix simulation.

    The map is linear, so the backward pass is the adjoint channel applied to diag(grad):
    nothing but the program is saved, whatever the circuit length.
    """

    @staticmethod
    def forward(ctx, r: torch.Tensor, program: _Program, chunk: int) -> torch.Tensor:
        ctx.program, ctx.chunk = program, chunk
        n = program.n
        cdtype = complex_dtype(r.dtype)
        out = []
        for part in r.split(chunk):
            rho = _schrodinger(program, pauli_to_matrix(part.to(cdtype), n))
            out.append(torch.diagonal(rho.reshape(-1, 2**n, 2**n), dim1=1, dim2=2).real)
        return torch.cat(out).to(r.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        program, n = ctx.program, ctx.program.n
        cdtype = complex_dtype(grad.dtype)
        out = []
        for part in grad.split(ctx.chunk):
            g = torch.diag_embed(part.to(cdtype)).reshape([part.shape[0]] + [2] * (2 * n))
            out.append(matrix_to_pauli(_heisenberg(program, g), n).real / 2**n)
        return torch.cat(out).to(grad.dtype), None, None


class _TransferReadout(torch.autograd.Function):
    """p = T^T r(angles) with the Jacobian computed in the forward pass (forward mode).

    r is multilinear in the per-qubit factors and each angle moves one factor, so all
    n_angles directional derivatives cost one batched kron and one matmul alongside the value;
    the backward pass is then one multiply-and-sum. Far fewer small torch ops than reverse-mode
    autograd through the kron, which dominates the cost at n = 4.
    """

    @staticmethod
    def forward(ctx, angles: torch.Tensor, tt: torch.Tensor, spec: CircuitSpec) -> torch.Tensor:
        need = ctx.needs_input_grad[0]
        r = kron_factors(encoded_factors(spec, angles, jacobian=need))  # (4^n, V, B)
        out = (tt @ r.reshape(r.shape[0], -1)).reshape(tt.shape[0], r.shape[1], r.shape[2])
        if need:
            ctx.save_for_backward(out[:, 1:])
            ctx.order = _encoding_stages(spec).order
        return out[:, 0].T.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (jac,) = ctx.saved_tensors  # (2^n, n_angles, B), angles in (stage, wire) order
        g = (jac * grad.T.unsqueeze(1)).sum(0)  # (n_angles, B)
        order = ctx.order
        if order != tuple(range(len(order))):
            g = torch.empty_like(g).index_copy_(0, _order_index(order, g.device), g)
        return g.T, None, None


@functools.lru_cache(maxsize=64)
def _order_index(order: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The angle order as an index on `device`, made once (not copied over at every backward)."""
    return torch.tensor(order, device=device)


# --- the module ----------------------------------------------------------------------------


class QuantumLayer(torch.nn.Module):
    """Angles (B, n_angles) -> basis-state probabilities (B, 2^n), differentiable w.r.t. angles.

    Attributes: `noise_approx` ('exact' or 'pauli_twirl'), `stochastic` (trajectory sampling),
    `path` (which engine runs: 'transfer', 'density', 'qnode-mixed', 'qnode-statevector',
    'qnode-trajectories'). The layer has no parameters and no buffers, so it adds nothing to a
    checkpoint; compiled matrices live in caches keyed by the (hashable) spec.
    """

    def __init__(
        self,
        spec: CircuitSpec,
        simulator: str = "compiled",
        device: str = "default.mixed",
        trajectories: int = 0,
        seed: int | None = None,
        *,
        compiled: str = "auto",
    ):
        super().__init__()
        if simulator not in SIMULATORS:
            raise ValueError(f"simulator must be one of {SIMULATORS}, got {simulator!r}")
        if compiled not in COMPILED_PATHS:
            raise ValueError(f"compiled must be one of {COMPILED_PATHS}, got {compiled!r}")
        if trajectories < 0:
            raise ValueError(f"trajectories must be >= 0, got {trajectories}")
        self.spec, self.simulator, self.device_name = spec, simulator, device
        self.trajectories, self.seed = int(trajectories), seed
        self.stochastic = samples_trajectories(spec, simulator, device, self.trajectories)
        self.noise_approx = "exact"
        self._qnodes: dict = {}
        self._cast: dict = {}

        if simulator == "compiled":
            # The compiled simulator is its own engine (runs where the angles live); the
            # PennyLane device name plays no role, so it is kept only for the record.
            if trajectories:
                raise ValueError("trajectories apply to qnode on a state-vector device; compiled is exact")
            self.path = compiled_path(spec) if compiled == "auto" else compiled
            return

        if device in MIXED_DEVICES:
            if trajectories:
                raise ValueError(
                    f"{device} simulates noise exactly; trajectories must be 0, got {trajectories}"
                )
            self.path = "qnode-mixed"
        elif spec.noisy:
            if trajectories <= 0:
                raise ValueError(
                    f"noise model {spec.noise_model!r} on state-vector device {device!r} runs by "
                    "Monte-Carlo trajectories: pass trajectories=K > 0 (or use default.mixed / compiled)"
                )
            self.path = "qnode-trajectories"
            self._plan, self._flush_probs = trajectory_plan(spec)
            self.noise_approx = "exact" if twirl_is_exact(spec) else "pauli_twirl"
            # Without a seed, draws come from torch's global generator, which the trial seeds:
            # the same trial draws the same trajectories on every executor.
            self._generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        else:
            if trajectories:
                log.warning("trajectories=%d ignored: the circuit is noiseless", trajectories)
            self.path = "qnode-statevector"
        self._qdevice = qml.device(device, wires=spec.qubits)  # fails early on unknown devices

    # pickling (Ray, multiprocessing): QNodes and devices are rebuilt lazily
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_qnodes"], state["_cast"] = {}, {}
        state.pop("_qdevice", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.simulator == "qnode":
            self._qdevice = qml.device(self.device_name, wires=self.spec.qubits)

    def extra_repr(self) -> str:
        return f"{self.spec}, simulator={self.simulator!r}, path={self.path!r}"

    def forward(self, angles: torch.Tensor) -> torch.Tensor:
        if angles.shape[-1] != self.spec.n_angles:
            raise ValueError(
                f"{self.spec.encoding} on {self.spec.qubits} qubits takes {self.spec.n_angles} angles, "
                f"got shape {tuple(angles.shape)}"
            )
        if not angles.is_floating_point():
            raise TypeError(f"angles must be float32/float64, got {angles.dtype}")
        single = angles.dim() == 1
        batch = angles.unsqueeze(0) if single else angles
        if self.simulator == "compiled":
            # Runs where the angles are (compiled matrices are cast there once, per instance).
            # The readout map sums terms of both signs: in float32 a probability that is 0
            # comes out as about -2e-8, and a log-probability downstream would be NaN.
            probs = self._compiled(batch).clamp_min(0.0)
        else:
            # PennyLane's devices take host arrays (lightning.gpu copies them into its own GPU
            # memory): a QNode runs on the angles' host copy, and its probabilities go back to
            # the angles' device, differentiably. On a CUDA trial that is a round trip per call.
            host = batch.cpu()
            if self.path == "qnode-trajectories":
                probs = self._trajectories(host)
            else:
                probs = self._run(host).to(host.dtype)
            probs = probs.to(batch.device)
        return probs[0] if single else probs

    # compiled ---------------------------------------------------------------------------------
    def _compiled(self, angles: torch.Tensor) -> torch.Tensor:
        if self.path == "transfer":
            t = transfer_matrix(self.spec)
            key = (angles.dtype, str(angles.device))
            cast = self._cast.get(key)  # per-instance cache of the matrix in this dtype/device
            if cast is None:
                cast = self._cast[key] = t.T.contiguous().to(device=angles.device, dtype=angles.dtype)
            if not (torch.is_grad_enabled() and angles.requires_grad):
                angles = angles.detach()  # skips the forward-mode Jacobian
            return _TransferReadout.apply(angles, cast, self.spec)
        r = pauli_vector(self.spec, angles)
        chunk = density_chunk(self.spec.qubits, r.element_size())
        return _DensityEvolve.apply(r, compile_body(self.spec), chunk)

    # qnode --------------------------------------------------------------------------------------
    def _qdevice_kind(self) -> str:
        return "lightning" if self.device_name.startswith("lightning") else "backprop"

    def _qnode(self, kind: str, qfunc_factory) -> qml.QNode:
        if kind not in self._qnodes:
            if kind.endswith("adjoint"):
                diff = "adjoint"
            elif kind.endswith("nograd"):
                diff = None
            else:
                diff = "backprop"
            qnode = qml.QNode(qfunc_factory(), self._qdevice, interface="torch", diff_method=diff)
            self._qnodes[kind] = qnode
        return self._qnodes[kind]

    def _run(self, angles: torch.Tensor, *extra) -> torch.Tensor:
        """Run the broadcast circuit; lightning has no backprop and its adjoint method cannot
        differentiate qml.probs, so with a gradient it reads expvals of the 2^n projectors."""
        spec = self.spec
        if self._qdevice_kind() == "lightning":
            if torch.is_grad_enabled() and angles.requires_grad:
                qnode = self._qnode(self.path + "-adjoint", lambda: self._qfunc(projectors=True))
                return torch.stack(list(qnode(angles, *extra)), dim=-1)
            qnode = self._qnode(self.path + "-nograd", lambda: self._qfunc(projectors=False))
        else:
            qnode = self._qnode(self.path, lambda: self._qfunc(projectors=False))
        out = qnode(angles, *extra)
        return out.reshape(angles.shape[0], 2**spec.qubits) if out.dim() == 1 else out

    def _qfunc(self, projectors: bool):
        spec = self.spec
        plan = getattr(self, "_plan", None)

        def readout():
            if projectors:
                n = spec.qubits
                bits = [[(b >> (n - 1 - q)) & 1 for q in range(n)] for b in range(2**n)]
                return [qml.expval(qml.Projector(basis, wires=spec.wires)) for basis in bits]
            return qml.probs(wires=spec.wires)

        if plan is None:
            if not projectors:
                return probs_qfunc(spec)

            def qfunc(angles):
                circuit_ops(spec, angles)  # constructing the ops inside the QNode queues them
                return readout()

            return qfunc

        def qfunc_traj(angles, xbits, zbits):
            encoding_ops(spec, angles)
            queue_plan(plan, spec, xbits, zbits)
            return readout()

        return qfunc_traj

    # trajectories -----------------------------------------------------------------------------
    def _trajectories(self, angles: torch.Tensor) -> torch.Tensor:
        b, k = angles.shape[0], self.trajectories
        xbits, zbits = sample_paulis(self._flush_probs, b * k, self._generator, angles.dtype, angles.device)
        rep = angles.repeat(k, 1)  # trajectory-major: row t*B + i is sample i, trajectory t
        out = self._run(rep, xbits, zbits)
        return out.reshape(k, b, -1).mean(0).to(angles.dtype)
