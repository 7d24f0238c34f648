"""Layer-wise reconstruction: after a decoder layer's linears are pruned, a few Adam passes over the calibration
rows move the layer's kept weights so that its outputs come back towards the DENSE layer's outputs (EBFT-style
block reconstruction; no fine-tuning tokens beyond the calibration set).

Loss of one step = Σ‖f_sparse(X) − T‖² over the step's rows, divided by (their share of the calibration rows) ×
Σ‖T‖² over all rows: the mean relative output error, so the learning rate does not depend on the activation scale.
`inputs` says what X is: "dense" trains the layer on the dense model's own inputs at this depth (a second stream of
activations, the dense prefix's outputs, carried layer to layer), T = f_dense(X_dense); "pruned" trains it on what
the pass already holds (the pruned prefix's outputs), T = f_dense(X_pruned) — free, it is the Hessian forward's
output. The next layer is then calibrated and fed, as always, on the reconstructed layer's outputs of the pruned
stream. Only the layer's pruned matrices are trained (norms, biases and unpruned linears stay), in float32 whatever
the model's dtype, the mask held exactly (masked gradients zeroed before each step, masked weights re-zeroed after).

Steps are defined on the global calibration rows: chunk c = rows [c·batch, (c+1)·batch), chunks visited in a seeded
order per pass. Each rank forwards the part of each chunk it holds (the pass captures its share cut at the chunk
boundaries, `row_pieces`), and the gradients are summed over the ranks (one all-reduce per step), so any world size
takes the same steps as one process up to float rounding. A layer whose error ends above where it started (too high
a learning rate) gets its solved weights back, with a warning and `reverted` in its stats.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsegpt.config.settings import ReconstructSettings
from sparsegpt.core.architectures import ExpertLinear
from sparsegpt.core.errors import UserError
from sparsegpt.core.masks import mask_in_param_layout
from sparsegpt.core.world import World
from sparsegpt.prune.capture import LayerBatch, forward_layer, to_device
from sparsegpt.prune.distributed import all_reduce_

log = logging.getLogger(__name__)
_DEFAULTS = ReconstructSettings().model_dump()

INPUTS = ("dense", "pruned")


@dataclass
class ReconstructConfig:
    """Adam passes over the calibration rows per decoder layer, its learning rate, rows per step, and which inputs
    the layer is trained on ("dense": the dense prefix's outputs; "pruned": the pruned prefix's)."""

    # the defaults are the recipe's (`ReconstructSettings`, their one owner): SmolLM2-135M at 90 %, 3 passes at 4e-3
    # equal 4 at 3e-3 on the tune split (117.9 vs 117.5) at 0.8x the cost; chosen there only (bench/RESULTS.md)
    passes: int = _DEFAULTS["passes"]
    lr: float = _DEFAULTS["lr"]
    batch: int = _DEFAULTS["batch"]
    inputs: str = _DEFAULTS["inputs"]

    def validate(self) -> None:
        """Raise UserError on the first bad field."""
        if self.passes < 1:
            raise UserError(f"reconstruct passes must be >= 1, got {self.passes} (leave reconstruct unset for none)")
        if not self.lr > 0:
            raise UserError(f"reconstruct lr must be > 0, got {self.lr} (e.g. 1e-3)")
        if self.batch < 1:
            raise UserError(f"reconstruct batch must be >= 1 calibration row, got {self.batch}")
        if self.inputs not in INPUTS:
            raise UserError(f"reconstruct inputs {self.inputs!r} is unknown; choose one of {list(INPUTS)}")


def as_config(value) -> ReconstructConfig | None:
    """A ReconstructConfig from itself, a mapping, or the recipe's settings model (anything with `model_dump`)."""
    if value is None or isinstance(value, ReconstructConfig):
        return value
    if isinstance(value, dict):
        return ReconstructConfig(**value)
    if hasattr(value, "model_dump"):
        return ReconstructConfig(**value.model_dump())
    raise TypeError(f"reconstruct must be a ReconstructConfig, a mapping or None, got {type(value).__name__}")


def row_pieces(share: range, step_rows: int, max_rows: int) -> list[tuple[int, int]]:
    """(chunk, rows) of this rank's contiguous share of the calibration rows, cut at every multiple of `step_rows`
    (a step's chunk) and into pieces of at most `max_rows` (the pass's forward batch)."""
    pieces, row = [], share.start
    while row < share.stop:
        chunk = row // step_rows
        end = min(share.stop, (chunk + 1) * step_rows, row + max_rows)
        pieces.append((chunk, end - row))
        row = end
    return pieces


def _cast(obj, dtype: torch.dtype):
    """Floating tensors inside (nested) tuples/lists/dicts cast to dtype."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _forward32(layer: nn.Module, index: int, batch: LayerBatch, hidden: Tensor, device) -> Tensor:
    """The layer's float32 output for `hidden` with the batch's captured arguments (the layer already float32)."""
    args, kwargs = batch.inputs[index]
    out = layer(hidden.to(device, torch.float32), *_cast(to_device(args, device), torch.float32),
                **_cast(to_device(kwargs, device), torch.float32))
    return out[0] if isinstance(out, tuple) else out


def _trainable(matrices: dict[str, tuple[nn.Module | ExpertLinear, Tensor]], device) -> list[tuple[nn.Parameter,
                                                                                                    Tensor]]:
    """(parameter, pruned mask in its layout) per parameter holding a pruned matrix; a fused experts parameter
    once, with every pruned expert's slice set."""
    found: dict[int, tuple[nn.Parameter, Tensor]] = {}
    for module, mask in matrices.values():
        param = module.weight
        layout = mask_in_param_layout(module, mask.to(param.device))
        if id(param) in found:
            found[id(param)][1].logical_or_(layout)
        else:
            found[id(param)] = (param, layout.clone())
    return [(p, m.to(device)) for p, m in found.values()]


class Reconstructor:
    """One pruning pass's reconstruction: the dense stream (inputs="dense"), the step chunks, each layer's run."""

    def __init__(self, cfg: ReconstructConfig, pieces: list[tuple[int, int]], total_rows: int, world: World):
        self.cfg, self.world = cfg, world
        self.chunks = [c for c, _ in pieces]             # the chunk of each of this rank's stored batches
        self.chunk_rows = [min(cfg.batch, total_rows - c * cfg.batch) for c in range(-(-total_rows // cfg.batch))]
        self.total_rows = total_rows
        self.dense: list[Tensor] | None = None           # the dense prefix's outputs, per stored batch
        self._kept: list[Tensor] | None = None           # the last trained layer's outputs (see `outputs`)

    @property
    def from_pruned(self) -> bool:
        return self.cfg.inputs == "pruned"

    def start(self, calib: list[LayerBatch]) -> None:
        """Layer 0's dense inputs are the captured ones."""
        if not self.from_pruned:
            self.dense = [b.hidden for b in calib]

    @torch.no_grad()
    def targets(self, layer: nn.Module, index: int, calib: list[LayerBatch], outputs: list[LayerBatch] | None,
                device, store_device) -> list[Tensor]:
        """The dense layer's outputs on the inputs it will be trained on (call before the layer is solved)."""
        if self.from_pruned:
            return [o.hidden for o in outputs]
        return [forward_layer(layer, index, LayerBatch(x, b.inputs), device).to(store_device)
                for b, x in zip(calib, self.dense)]

    def inputs(self, calib: list[LayerBatch]) -> list[Tensor]:
        return [b.hidden for b in calib] if self.from_pruned else self.dense

    @torch.no_grad()
    def advance(self, layer: nn.Module, index: int, calib: list[LayerBatch], targets: list[Tensor] | None,
                device, store_device) -> None:
        """The dense stream moves past layer `index`: its dense outputs (the targets when it had any)."""
        if self.from_pruned:
            return
        if targets is None:  # nothing pruned in this layer: it is still dense
            targets = [forward_layer(layer, index, LayerBatch(x, b.inputs), device).to(store_device)
                       for b, x in zip(calib, self.dense)]
        self.dense = targets

    @torch.no_grad()
    def _errors(self, layer, index, calib, inputs, targets, device, keep: list | None = None) -> tuple[float, float]:
        """(Σ‖f(X) − T‖², Σ‖T‖²) over every rank's rows, in float64; the outputs f(X) appended to `keep` if given."""
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for b, x, t in zip(calib, inputs, targets):
            t = t.to(device, torch.float64)
            out = _forward32(layer, index, b, x, device)
            sums[0] += (out.double() - t).square().sum()
            sums[1] += t.square().sum()
            if keep is not None:
                keep.append(out)
        all_reduce_(self.world, sums)
        return sums[0].item(), sums[1].item()

    def outputs(self, store_device) -> list[Tensor] | None:
        """The reconstructed layer's outputs on the pruned stream, kept from the last `train` where they are exactly
        what propagating it would compute (float32 layer, pruned inputs, weights not reverted): the pass then skips
        that forward. None otherwise; consumed by the call."""
        kept, self._kept = self._kept, None
        return None if kept is None else [o.to(store_device) for o in kept]

    def train(self, layer: nn.Module, index: int, calib: list[LayerBatch], targets: list[Tensor],
              matrices: dict[str, tuple[nn.Module | ExpertLinear, Tensor]], device) -> dict:
        """Reconstruct the solved layer `index` in place; its stats {layer, error_before, error_after (relative
        output errors), steps, seconds, reverted}."""
        start, cfg = time.perf_counter(), self.cfg
        inputs = self.inputs(calib)
        tensors = list(layer.parameters()) + list(layer.buffers())
        dtypes = [t.dtype for t in tensors]
        for t in tensors:
            if t.is_floating_point():
                t.data = t.data.float()
        trained = _trainable(matrices, device)
        params = [p for p, _ in trained]
        flags = [p.requires_grad for p in params]
        solved = [p.detach().clone() for p in params]
        # the last error forward is the propagation forward where nothing differs: float32 layer, pruned stream
        keep = [] if self.from_pruned and all(d == torch.float32 for d in dtypes if d.is_floating_point) else None
        self._kept = None
        try:
            err, norm = self._errors(layer, index, calib, inputs, targets, device)
            before = err / norm
            steps = self._optimize(layer, index, calib, inputs, targets, trained, norm, device)
            err, _ = self._errors(layer, index, calib, inputs, targets, device, keep)
            after = err / norm
            reverted = after > before
            self._kept = None if reverted else keep
            if reverted:
                log.warning("layer %d: reconstruction raised the output error %.4g -> %.4g (lr %g too high?); "
                            "keeping the solved weights", index, before, after, cfg.lr)
                with torch.no_grad():
                    for p, w in zip(params, solved):
                        p.copy_(w)
                after = before
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
                p.grad = None
            for t, dtype in zip(tensors, dtypes):
                t.data = t.data.to(dtype)
            for p, mask in trained:  # exact zeros in the model's dtype too
                p.data.masked_fill_(mask.to(p.device), 0)
        seconds = time.perf_counter() - start
        log.info("layer %d reconstructed: output error %.4g -> %.4g in %d steps, %.1fs", index, before, after,
                 steps, seconds)
        return dict(layer=index, error_before=before, error_after=after, steps=steps, seconds=seconds,
                    reverted=reverted)

    def _optimize(self, layer, index, calib, inputs, targets, trained, norm: float, device) -> int:
        """Adam over the chunks, `passes` times; returns the steps taken."""
        params = [p for p, _ in trained]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=self.cfg.lr)
        order = torch.Generator().manual_seed(index)
        mine: dict[int, list[int]] = {}
        for j, c in enumerate(self.chunks):
            mine.setdefault(c, []).append(j)
        steps = 0
        for _ in range(self.cfg.passes):
            for c in torch.randperm(len(self.chunk_rows), generator=order).tolist():
                grads = [torch.zeros_like(p) for p in params]
                weight = self.total_rows / (self.chunk_rows[c] * norm)  # the chunk's mean relative error
                for j in mine.get(c, ()):
                    with torch.enable_grad():
                        out = _forward32(layer, index, calib[j], inputs[j], device)
                        loss = (out - targets[j].to(device, torch.float32)).square().sum() * weight
                        for g, d in zip(grads, torch.autograd.grad(loss, params)):
                            g += d
                if self.world.size > 1:
                    flat = all_reduce_(self.world, torch.cat([g.reshape(-1) for g in grads]))
                    grads = [f.view_as(p) for f, p in zip(flat.split([p.numel() for p in params]), params)]
                for (p, mask), g in zip(trained, grads):
                    p.grad = g.masked_fill_(mask, 0)
                optimizer.step()
                with torch.no_grad():
                    for p, mask in trained:
                        p.masked_fill_(mask, 0)
                steps += 1
        return steps
