"""Per-point random streams: a point's random start never depends on the batch it sits in.

torchattacks draws an attack's randomness for a whole batch from the global generator
(`torch.rand(x.shape)` for APGD's start, `uniform_` for PGD's), so a point's start depends on
its position in the batch, on its batch-mates and on how many of them an earlier restart
already broke. On the hybrids of the quick sweep that alone moved APGD's result by 5% of the
points (issue 23). Here every point owns a stream, keyed by its own pixels and the trial's
seed, and counted per use: restart r of a point always starts from the same place, whatever
the batch size, the shard or the order of the points.

How: `PointStreams(seed)` is entered around an attack. An attack class with the
`PerPointStarts` mixin announces the rows it is about to randomize (`point_rows(x)`, in its
`forward` and `attack_single_run`, where torchattacks draws starts); while rows are announced, a
`TorchFunctionMode` turns every random tensor whose leading dimension is the number of rows
(`rand`, `randn`, `*_like`, `uniform_`, `normal_`) into one drawn row by row from the rows'
own generators. Attacks whose random search is shared by the batch (torchattacks' Square
draws one square per iteration for all images) instead draw each point's whole search up front
from its own generator (`generators(x)`). Outside `PointStreams` nothing changes:
torchattacks' own behaviour.

On any device the streams are host generators: a point's draws are the same numbers on a CPU
and a GPU run. A point's seed reads its pixels from the device once per announced batch (at an
attack's or a restart's start, not per iteration), and the draws cross to the device in one
asynchronous copy from pinned memory (the host does not wait for the device).
"""

from __future__ import annotations

import contextvars
import hashlib
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torchattacks
from torch.overrides import TorchFunctionMode

_ACTIVE: contextvars.ContextVar["PointStreams | None"] = contextvars.ContextVar("point_streams", default=None)

_FACTORIES = {torch.rand: torch.rand, torch.randn: torch.randn}
_LIKE = {torch.rand_like: torch.rand, torch.randn_like: torch.randn}
_IN_PLACE = (torch.Tensor.uniform_, torch.Tensor.normal_)


def _digest(*parts: bytes) -> bytes:
    return hashlib.blake2b(b"\x00".join(parts), digest_size=16).digest()


def _seed(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64, as manual_seed wants


class PointStreams:
    """The streams of one attack run: each point's stream is a function of (seed, its pixels,
    how many times it was used), nothing else."""

    def __init__(self, *seeds: int):
        self.salt = ",".join(str(int(s)) for s in seeds).encode()
        self.uses: dict[bytes, int] = {}
        self._stack: list[list[torch.Generator]] = []
        self._mode: _RowMode | None = None
        self._token: contextvars.Token | None = None

    def __enter__(self) -> "PointStreams":
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.reset(self._token)

    def seeds_for(self, x: torch.Tensor) -> list[int]:
        """The next seed of each row of `x`, its pixels read from the device in one copy."""
        pixels = x.detach().to("cpu", torch.float32).contiguous().numpy()
        seeds = []
        for row in pixels:
            key = _digest(self.salt, row.tobytes())
            use = self.uses.get(key, 0)
            self.uses[key] = use + 1
            seeds.append(_seed(_digest(key, str(use).encode())))
        return seeds

    def generators(self, x: torch.Tensor) -> list[torch.Generator]:
        """A host generator per row of `x`, each at its point's next seed."""
        return [torch.Generator(device="cpu").manual_seed(seed) for seed in self.seeds_for(x)]

    @contextmanager
    def rows(self, x: torch.Tensor) -> Iterator[None]:
        # One generator per row; identical images get identical streams.
        generators = self.generators(x)
        self._stack.append(generators)
        outermost = self._mode is None
        if outermost:
            self._mode = _RowMode(self)
            self._mode.__enter__()
        try:
            yield
        finally:
            self._stack.pop()
            if outermost:
                self._mode.__exit__(None, None, None)
                self._mode = None

    def current(self) -> list[torch.Generator]:
        return self._stack[-1]


def to_device(host: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Host draws on `device`: as they are on the CPU, else in one asynchronous copy from
    pinned memory (the host does not wait for the device, nor the device for the host)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class _RowMode(TorchFunctionMode):
    """Random tensors of the announced rows' batch size, drawn row by row on the host, from
    each row's own generator, and put where they were asked for."""

    def __init__(self, streams: PointStreams):
        super().__init__()
        self.streams = streams

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gens = self.streams.current()
        n = len(gens)
        if func in _FACTORIES or func in _LIKE:
            if func in _LIKE:
                like = args[0]
                shape = tuple(like.shape)
                kwargs.setdefault("dtype", like.dtype)
                kwargs.setdefault("device", like.device)
                draw = _LIKE[func]
            else:
                shape = tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else tuple(args)
                draw = _FACTORIES[func]
            if shape and shape[0] == n and "generator" not in kwargs:
                host = torch.stack(
                    [draw(shape[1:], generator=g, dtype=kwargs.get("dtype"), device="cpu") for g in gens]
                )
                return to_device(host, kwargs.get("device"))
        elif func in _IN_PLACE:
            tensor = args[0]
            if tensor.dim() and tensor.shape[0] == n and "generator" not in kwargs:
                if tensor.device.type == "cpu":
                    for row, g in zip(tensor, gens):
                        func(row, *args[1:], generator=g, **kwargs)
                    return tensor
                rows = [torch.empty(tensor.shape[1:], dtype=tensor.dtype, device="cpu") for _ in gens]
                for row, g in zip(rows, gens):
                    func(row, *args[1:], generator=g, **kwargs)
                return tensor.copy_(to_device(torch.stack(rows), tensor.device), non_blocking=True)
        return func(*args, **kwargs)


def active_streams() -> PointStreams | None:
    return _ACTIVE.get()


@contextmanager
def point_rows(x: torch.Tensor) -> Iterator[None]:
    """Announce that the random draws that follow are for the rows of `x` (no-op outside
    PointStreams)."""
    streams = _ACTIVE.get()
    if streams is None:
        yield
        return
    with streams.rows(x):
        yield


class PerPointStarts:
    """Mixin for a torchattacks attack: its random starts come from each point's own stream.
    torchattacks draws them in `forward` (PGD, EOT-PGD, VMI-FGSM) or `attack_single_run` (APGD,
    APGD-T, FAB)."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with point_rows(images):
            return super().forward(images, labels)

    def attack_single_run(self, x: torch.Tensor, y: torch.Tensor, *args: Any, **kwargs: Any):
        with point_rows(x):
            return super().attack_single_run(x, y, *args, **kwargs)


# torchattacks' attacks with random starts, drawn per point (same names and parameters).
class PGD(PerPointStarts, torchattacks.PGD):
    pass


class EOTPGD(PerPointStarts, torchattacks.EOTPGD):
    pass


class VMIFGSM(PerPointStarts, torchattacks.VMIFGSM):
    pass


class APGD(PerPointStarts, torchattacks.APGD):
    pass


class APGDT(PerPointStarts, torchattacks.APGDT):
    pass


class FAB(PerPointStarts, torchattacks.FAB):
    pass
