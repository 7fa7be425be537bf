"""The ``adaround`` pass: AdaRound (arXiv 2004.10568) inside the calibration pipelines.

A thin adapter: records each targeted layer's inputs (or reads the pipeline's
block cache), then calls :func:`compressor.algorithms.quant.adaround.adaround_quantize`
or :func:`~compressor.algorithms.quant.adaround.optimise_rounding`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from compressor.algorithms.quant.adaround import AdaRoundConfig, SoftRounding, adaround_quantize, optimise_rounding
from compressor.core.layers import conv_positions, conv_rows, is_quantizable, layer_view, rows_forward
from compressor.core.passes import Pass, register_pass, select_modules
from compressor.core.sparsity import prune_mask
from compressor.core.state import attach_qparams
from compressor.pipeline.cache import select_rows

__all__ = ["AdaRoundPass"]

log = logging.getLogger(__name__)


@register_pass
class AdaRoundPass(Pass):
    """AdaRound inside the calibration pipelines.

    ``granularity="layer"`` (the paper): each targeted layer reconstructs its
    full-precision output on its own inputs, taken from the partially
    compressed model. ``granularity="block"`` (sequential pipeline only): all
    targeted layers of a decoder block learn their rounding together so that
    the block, fed the compressed model's activations, reproduces the
    full-precision model's block output.
    """

    name = "adaround"
    config_cls = AdaRoundConfig
    weight_pass = "quantize"
    requires_calibration = True

    def __init__(self, config: AdaRoundConfig):
        super().__init__(config)
        self._inputs: dict[str, dict[str, list[torch.Tensor]]] = {"compressed": {}, "fp": {}}
        self._handles: list = []

    @property
    def wants_fp_targets(self) -> bool:
        """The pipeline should keep a full-precision stream (block outputs, or layer inputs)."""
        return self.config.granularity == "block" or self.config.asymmetric

    @property
    def wants_fp_inputs(self) -> bool:
        """The pipeline should also run the full-precision stream through :meth:`begin_block` hooks."""
        return self.config.granularity == "layer" and self.config.asymmetric

    def _layers(self, block: nn.Module, prefix: str):
        return [(n, m) for n, m in select_modules(block, self.config, prefix) if is_quantizable(m)]

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Record each targeted layer's inputs (token rows for linears, feature maps for convs).

        The inputs go to the stream named by :attr:`stream`, which the pipeline
        sets before each forward: ``"compressed"`` (the model being compressed)
        or ``"fp"`` (the full-precision model, for asymmetric reconstruction).

        Returns:
            the observed layers; none with ``granularity="block"``, which reads
            the pipeline's cached block inputs instead.
        """
        if self.config.granularity == "block":
            return []
        layers = self._layers(block, prefix)
        for name, module in layers:
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: self._inputs[self.stream].setdefault(name, []).append(args[0].detach())))
        return [m for _, m in layers]

    def end_block(self, block: nn.Module, prefix: str, *, cache=None, targets=None, **context) -> None:
        """Optimise the rounding of the block's targeted layers, then fix it on the grid."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.config.granularity == "block":
            if cache is None or targets is None:
                raise ValueError("adaround granularity='block' runs in the sequential pipeline of a decoder model")
            self._block(block, prefix, cache, targets)
            return
        gen = torch.Generator().manual_seed(self.config.seed)
        for name, module in self._layers(block, prefix):
            xs, fp_xs = self._inputs["compressed"].pop(name, None), self._inputs["fp"].pop(name, None)
            if xs is None:
                raise ValueError(f"{name}: no calibration input reached this layer")
            if self.config.asymmetric and fp_xs is None:
                raise ValueError(f"{name}: asymmetric adaround needs the full-precision inputs; the pipeline gave none "
                                 "(set asymmetric: false, or run it through compress())")
            try:
                self._layer(name, module, xs, fp_xs, gen)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None

    def _layer(self, name: str, module: nn.Module, xs: list[torch.Tensor], fp_xs: list[torch.Tensor] | None,
               gen: torch.Generator) -> None:
        """Sample reconstruction rows from the recorded inputs, learn the rounding, attach it."""
        cfg = self.config
        w, fwd, to_weight = layer_view(module)
        conv = isinstance(module, nn.Conv2d)

        def stack(ts: list[torch.Tensor]) -> torch.Tensor:  # feature maps (S, C, H, W), or token rows (T, K)
            return torch.cat(ts) if conv else torch.cat([t.reshape(-1, t.shape[-1]) for t in ts])

        x = stack(xs)
        total = conv_positions(x, module) if conv else x.shape[0]
        pick = torch.randperm(total, generator=gen)[: cfg.max_samples]
        if conv:
            bias = None if module.bias is None else module.bias.detach().float()

            def fwd(r, v):
                return rows_forward(r, v, bias)

        def rows_of(t: torch.Tensor) -> torch.Tensor:
            return (conv_rows(t, module, pick) if conv else t[pick.to(t.device)]).float()

        rows = rows_of(x)
        fp_rows = rows if fp_xs is None else rows_of(stack(fp_xs))
        del x, xs, fp_xs
        if not (torch.isfinite(rows).all() and torch.isfinite(fp_rows).all()):
            raise ValueError("calibration activations contain NaN/inf")
        with torch.no_grad():
            target = fwd(fp_rows, w.float())
        res = adaround_quantize(w, fwd, rows, target, cfg.scheme, cfg, mask=_mask_in_view(module))
        log.debug("adaround %s recon error %.4g", name, res.recon_mse)
        attach_qparams(module, cfg.scheme, res.qparams, to_weight(res.weight))

    def _block(self, block: nn.Module, prefix: str, cache, targets: list[torch.Tensor]) -> None:
        """Block-wise reconstruction: one optimiser over every targeted layer of the block."""
        from torch.func import functional_call

        layers = self._layers(block, prefix)
        if not layers:
            return
        views = [layer_view(m) for _, m in layers]
        keys = [f"{n[len(prefix) + 1:]}.weight" if n != prefix else "weight" for n, _ in layers]
        roundings = [SoftRounding(w, self.config.scheme, self.config.learn_scale, _mask_in_view(m))
                     for (w, _, _), (_, m) in zip(views, layers)]
        seq_len = targets[0].shape[1]
        per_step = max(1, self.config.batch_size // seq_len)  # sequences per step

        def recon(pick, ws):
            j, rows = pick
            params = {k: to_w(w) for k, (_, _, to_w), w in zip(keys, views, ws)}
            out = functional_call(block, params, (cache.hidden(j)[rows],), select_rows(cache.kwargs(j), rows, cache.hidden(j).shape[0]))
            out = out[0] if isinstance(out, (tuple, list)) else out
            return (out.float() - targets[j][rows].float()).pow(2).sum(-1).mean()

        def sample(gen):
            j = int(torch.randint(0, len(targets), (1,), generator=gen))
            b = targets[j].shape[0]
            return j, torch.randperm(b, generator=gen)[: min(per_step, b)]

        optimise_rounding(roundings, recon, sample, (0, torch.arange(min(per_step * 4, targets[0].shape[0]))), self.config)
        for (name, module), (_, _, to_w), r in zip(layers, views, roundings):
            _, qparams, w_hat = r.harden()
            attach_qparams(module, self.config.scheme, qparams, to_w(w_hat))


def _mask_in_view(module: nn.Module) -> torch.Tensor | None:
    """A pruned linear's (N, K) keep-mask (its quantization view is its weight), else None."""
    mask = prune_mask(module)
    if mask is not None and not isinstance(module, nn.Linear):
        raise ValueError(f"pruned {type(module).__name__} layers are not supported by adaround; prune linears only")
    return mask
