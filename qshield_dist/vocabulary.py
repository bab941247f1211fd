"""The names every option may take, in one place and free of torch and PennyLane.

Validating a sweep, building the grid and checking a circuit spec all read these tuples, so
a new option value is added here once. The spellings are those a sweep file uses.
"""

from __future__ import annotations

# --- models ------------------------------------------------------------------------------------
MODELS = ("dnn", "cnn", "cnn_small", "hqcnn", "custom")  # custom: the user's own (models/custom.py)
BACKBONES = ("cnn", "cnn_small", "dnn")  # the classical models a hybrid can be built on
FUSIONS = ("dynamic", "entropy")
QUANTUM_GRADS = ("full", "detached")
PROJECTIONS = ("learned", "paper")
INITS = ("from_baseline", "scratch")
# How a model is trained (`train.method`): plain, PGD adversarial training (Madry et al. 2018)
# or TRADES (Zhang et al. 2019); train_methods.py holds the two robust ones.
STANDARD = "standard"
PGD_AT = "pgd_at"
TRADES = "trades"
TRAIN_METHODS = (STANDARD, PGD_AT, TRADES)

# --- the circuit -------------------------------------------------------------------------------
ENTANGLEMENTS = ("none", "linear", "star", "full", "ring")
ENCODINGS = ("angle", "enhanced_angle")
NOISE_MODELS = ("none", "depolarizing", "amplitude_damping", "phase_damping", "mixed")

# --- how the circuit is simulated --------------------------------------------------------------
SIMULATORS = ("compiled", "qnode")
# The compiled simulator's engines; `auto` picks one by size and memory (quantum/memory.py).
COMPILED_PATHS = ("auto", "transfer", "density")
DEVICES = ("default.mixed", "default.qubit", "lightning.qubit", "lightning.gpu", "lightning.kokkos")
# Devices that simulate density matrices, so noise is exact and needs no trajectories.
MIXED_DEVICES = ("default.mixed",)

# --- attacks and runs ---------------------------------------------------------------------------
# The attack names themselves live with their parameters in attack_params.ATTACKS.
ATTACK_PRESETS = ("paper", "standard")
# AutoAttack's `version`: auto (rand on a stochastic model, else standard) | the authors' two |
# fast (ten-step components for smoke runs; recorded as fast, never reported as AutoAttack)
AUTOATTACK_VERSIONS = ("auto", "standard", "rand", "fast")
# Controls of a hybrid: its own backbone with the quantum branch removed, the backbone trained
# alone for the hybrid's whole budget, and (a stochastic hybrid only) the hybrid with its
# randomness frozen to one draw (Carlini et al.'s checklist).
BACKBONE_ONLY = "backbone_only"
EQUAL_BUDGET = "equal_budget"
FIXED_RANDOMNESS = "fixed_randomness"
CONTROLS = (BACKBONE_ONLY, EQUAL_BUDGET, FIXED_RANDOMNESS)
# The controls whose target is deterministic, whatever the hybrid is.
DETERMINISTIC_CONTROLS = (BACKBONE_ONLY, FIXED_RANDOMNESS)
# The paired comparisons the report makes, as (hybrid's side) vs (other side).
VS_CNN = "vs CNN"
VS_BACKBONE_ALONE = "vs backbone alone"
VS_EQUAL_BUDGET = "vs equal-budget backbone"
BACKBONE_ALONE_VS_CNN = "backbone alone vs CNN"
VS_NAMED = "named in compare:"  # the sweep's own list, in place of VS_CNN
VS_FIXED_RANDOMNESS = "vs its randomness fixed"
COMPARISON_KINDS = (
    VS_CNN,
    VS_NAMED,
    VS_BACKBONE_ALONE,
    VS_EQUAL_BUDGET,
    BACKBONE_ALONE_VS_CNN,
    VS_FIXED_RANDOMNESS,
)
# The checks a diagnostic trial can run. `eval.diagnostics: true` runs the gradient-masking
# checks; restart_sensitivity (K full APGD runs) runs only when named.
GRADIENT_MASKING_CHECKS = (
    "iterative_ge_single_step",
    "whitebox_ge_blackbox",
    "adaptive_vs_paper_suite",
    "attack_budget_reachable",
    "eps_sweep_reaches_1",
    "gradient_nonzero_and_stable",
    "gradient_matches_differentiable_twin",
    "batch_independent",
)
RESTART = "restart_sensitivity"  # K full APGD runs: only when listed
DIAGNOSTICS = (*GRADIENT_MASKING_CHECKS, RESTART)
# The checks that compare the model's attack rows: only a diagnostic trial that runs one of them
# waits for the model's attacks (the others attack the model themselves).
CHECKS_ON_ATTACK_ROWS = (
    "iterative_ge_single_step",
    "whitebox_ge_blackbox",
    "adaptive_vs_paper_suite",
    "attack_budget_reachable",
)
EXECUTORS = ("local", "ray", "slurm")
# What a stage's torch code runs on (`resources.<stage>.accelerator`; `device` names the
# PennyLane device). `auto` resolves when the grid is built: cuda where the stage reserves a GPU.
ACCELERATORS = ("auto", "cpu", "cuda")
CPU, CUDA = "cpu", "cuda"
# A sweep's stages, in the order they run: each a kind of trial.
STAGES = ("train", "attack", "diagnostic")
