"""The ``adaround`` pass: AdaRound (arXiv 2004.10568) inside the calibration pipelines.

A thin adapter: records each targeted layer's inputs (or reads the pipeline's
block cache), then calls :func:`compressor.algorithms.quant.adaround.adaround_quantize`
or :func:`~compressor.algorithms.quant.adaround.optimise_rounding`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from compressor.algorithms.quant.adaround import AdaRoundConfig, adaround_quantize, optimise_rounding, soft_rounding
from compressor.core.layers import conv_positions, conv_rows, is_quantizable, layer_view, rows_forward
from compressor.core.passes import Pass, register_pass, select_modules
from compressor.core.arch import experts_layout, fused_groups
from compressor.core.distributed import all_gather_rows
from compressor.core.scheme import shared_global_scales
from compressor.core.sparsity import expert_mask, prune_mask
from compressor.core.state import allocated_scheme, attach_qparams
from compressor.passes.rtn import quantize_experts, round_matrix
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
    streams = True  # everything it reads and changes lives in the block (and the pipeline's fp stream)

    def __init__(self, config: AdaRoundConfig):
        super().__init__(config)
        self._inputs: dict[str, dict[str, list[torch.Tensor]]] = {"compressed": {}, "fp": {}}
        self._handles: list = []
        self._routed: dict[str, _RoutedRows] = {}  # fused experts module name -> its experts' sampled tokens
        self._observed: list[tuple[str, nn.Module]] = []  # the block's targeted layers, in the same order on every rank

    def compressible(self, module: nn.Module) -> bool:
        """Layers, and fused-experts modules of a known layout (layer granularity: each expert's gate/up and
        down learn their rounding on the tokens routed to that expert)."""
        return is_quantizable(module) or experts_layout(module) is not None

    @property
    def data_parallel(self) -> bool:  # type: ignore[override]
        """Layer granularity calibrates data-parallel: each layer's recorded inputs are gathered from every rank
        (:meth:`reduce_statistics`). Block granularity trains on the pipeline's cached block inputs, which stay
        on their rank: one process."""
        return self.config.granularity == "layer"

    def reduce_statistics(self) -> None:
        """Gather every targeted layer's recorded inputs (both streams) from every rank, in rank order: each rank
        then samples the same reconstruction rows as one process over all the calibration data would.

        Raises:
            ValueError: when the block has fused MoE experts (the ranks route different tokens to them), or a
                rank recorded no rows.
        """
        if self._routed:
            raise ValueError(f"adaround: data-parallel calibration of MoE experts is not supported yet "
                             f"({next(iter(self._routed))}: the ranks route different tokens to different experts): "
                             "run in one process")
        for stream, recorded in self._inputs.items():
            for name, module in self._observed:
                if stream == "fp" and not self.wants_fp_inputs:
                    continue
                if isinstance(module, nn.Conv2d):
                    raise ValueError(f"adaround: {name}: data-parallel calibration covers linears only: run in one "
                                     "process")
                xs = recorded.get(name) or []
                rows = (torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) if xs
                        else torch.empty(0, 1, device=module.weight.device))  # refused below on every rank
                recorded[name] = [all_gather_rows(rows, f"adaround {name}")]

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

    def _experts(self, block: nn.Module, prefix: str):
        return [(n, m) for n, m in select_modules(block, self.config, prefix) if experts_layout(m) is not None]

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Record each targeted layer's inputs (token rows for linears, feature maps for convs).

        The inputs go to the stream named by :attr:`stream`, which the pipeline
        sets before each forward: ``"compressed"`` (the model being compressed)
        or ``"fp"`` (the full-precision model, for asymmetric reconstruction).

        Returns:
            the observed layers; none with ``granularity="block"``, which reads
            the pipeline's cached block inputs instead.
        """
        experts = self._experts(block, prefix)
        if self.config.granularity == "block":
            if experts:
                raise ValueError(f"adaround granularity='block' does not cover fused MoE experts yet ({experts[0][0]}): "
                                 "use granularity: layer, or add the experts to ignore")
            return []
        layers = self._layers(block, prefix)
        self._observed = layers
        for name, module in layers:
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: self._inputs[self.stream].setdefault(name, []).append(args[0].detach())))
        for name, module in experts:
            self._routed[name] = _RoutedRows(module.gate_up_proj.shape[0], self.config.max_samples, self.config.seed)
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: self._observe_experts(name, args, kwargs), with_kwargs=True))
        return [m for _, m in layers] + [m for _, m in experts]

    def _observe_experts(self, name: str, args: tuple, kwargs: dict) -> None:
        if self.stream == "fp":  # the two streams route differently: experts reconstruct on the compressed one
            return
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index") if k in kwargs]
        x = values[0].reshape(-1, values[0].shape[-1]).detach()
        self._routed[name].add(x, values[1].reshape(x.shape[0], -1))

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
        layers = self._layers(block, prefix)
        # NVFP4: fused siblings (q/k/v, gate/up) share one global scale, from the weights before any is rounded
        gscales = shared_global_scales({n: layer_view(m)[0] for n, m in layers}, fused_groups([n for n, _ in layers]),
                                       self.config.scheme)
        for name, module in layers:
            xs, fp_xs = self._inputs["compressed"].pop(name, None), self._inputs["fp"].pop(name, None)
            if xs is None:
                raise ValueError(f"{name}: no calibration input reached this layer")
            if self.config.asymmetric and fp_xs is None:
                raise ValueError(f"{name}: asymmetric adaround needs the full-precision inputs; the pipeline gave none "
                                 "(set asymmetric: false, or run it through compress())")
            try:
                self._layer(name, module, xs, fp_xs, gen, gscales.get(name))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        for name, module in self._experts(block, prefix):
            self._quantize_experts(name, module, self._routed.pop(name, None))
        self._routed.clear()

    def _quantize_experts(self, name: str, module: nn.Module, routed: _RoutedRows | None) -> None:
        """Learn the rounding of every expert's down, then gate/up, on a random sample of its routed tokens.

        Down's inputs ``act(x W_gate[e]ᵀ) * (x W_up[e]ᵀ)`` come from the full-precision gate/up, as a dense
        down_proj's do in the layer pipeline (the block's layers are quantized after its forwards), so down
        goes first. An expert no token reached is rounded to nearest, with a warning.
        """
        cfg = self.config
        layout = experts_layout(module)
        skipped: list[int] = []

        def solve(pname: str, e: int, w: torch.Tensor):
            keep = expert_mask(module, pname, e)
            x = routed.rows(e) if routed is not None else None
            if x is None:
                if pname == "down_proj":
                    skipped.append(e)
                return round_matrix(w if keep is None else w.masked_fill(~keep, 0), cfg.scheme)
            rows = layout.inputs(module, e, x.to(w.device))[pname].float()  # (S, K)
            with torch.no_grad():
                target = rows @ w.float().T  # (S, N): the full-precision output
            try:
                res = adaround_quantize(w, lambda r, v: r @ v.T, rows, target, cfg.scheme, cfg, mask=keep)
            except ValueError as err:
                raise ValueError(f"{name}.{pname}[{e}]: {err}") from None
            return res.weight.to(w.dtype), res.qparams

        quantize_experts(module, cfg.scheme, solve, params=("down_proj", "gate_up_proj"))
        if cfg.asymmetric:
            log.warning("adaround %s: experts reconstruct their own full-precision outputs on the compressed stream "
                        "(asymmetric applies to the other layers; the two streams route tokens differently)", name)
        if skipped:
            log.warning("adaround %s: %d of %d experts got no calibration token and were rounded to nearest",
                        name, len(skipped), module.gate_up_proj.shape[0])

    def _layer(self, name: str, module: nn.Module, xs: list[torch.Tensor], fp_xs: list[torch.Tensor] | None,
               gen: torch.Generator, gscale: torch.Tensor | None = None) -> None:
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
        scheme = allocated_scheme(module, cfg.scheme, name)
        res = adaround_quantize(w, fwd, rows, target, scheme, cfg, mask=_mask_in_view(module), gscale=gscale)
        log.debug("adaround %s recon error %.4g", name, res.recon_mse)
        attach_qparams(module, scheme, res.qparams, to_weight(res.weight))

    def _block(self, block: nn.Module, prefix: str, cache, targets: list[torch.Tensor]) -> None:
        """Block-wise reconstruction: one optimiser over every targeted layer of the block."""
        from torch.func import functional_call

        layers = self._layers(block, prefix)
        if not layers:
            return
        views = [layer_view(m) for _, m in layers]
        keys = [f"{n[len(prefix) + 1:]}.weight" if n != prefix else "weight" for n, _ in layers]
        gscales = shared_global_scales({n: w for (w, _, _), (n, _) in zip(views, layers)},
                                       fused_groups([n for n, _ in layers]), self.config.scheme)
        schemes = [allocated_scheme(m, self.config.scheme, n) for n, m in layers]
        roundings = [soft_rounding(w, s, self.config.learn_scale, _mask_in_view(m), gscales[n])
                     for (w, _, _), (n, m), s in zip(views, layers, schemes)]
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
        for (name, module), (_, _, to_w), r, scheme in zip(layers, views, roundings, schemes):
            _, qparams, w_hat = r.harden()
            attach_qparams(module, scheme, qparams, to_w(w_hat))


def _mask_in_view(module: nn.Module) -> torch.Tensor | None:
    """A pruned linear's (N, K) keep-mask (its quantization view is its weight), else None."""
    mask = prune_mask(module)
    if mask is not None and not isinstance(module, nn.Linear):
        raise ValueError(f"pruned {type(module).__name__} layers are not supported by adaround; prune linears only")
    return mask


class _RoutedRows:
    """A uniform random sample (without replacement) of at most ``cap`` tokens routed to each expert.

    Every routed token gets a random key; each expert keeps the ``cap`` rows with the smallest keys seen so
    far (reservoir sampling by random priorities), so memory is ``E * cap * H`` whatever the calibration size.
    """

    def __init__(self, n_experts: int, cap: int, seed: int):
        self._rows: list[torch.Tensor | None] = [None] * n_experts
        self._keys: list[torch.Tensor | None] = [None] * n_experts
        self._cap = cap
        self._gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor, index: torch.Tensor) -> None:
        """x (T, H) tokens, index (T, k) their experts."""
        for e in range(len(self._rows)):
            rows = x[(index == e).any(-1)]
            if not rows.shape[0]:
                continue
            keys = torch.rand(rows.shape[0], generator=self._gen)
            if self._rows[e] is not None:
                rows, keys = torch.cat([self._rows[e], rows]), torch.cat([self._keys[e], keys])
            if rows.shape[0] > self._cap:
                pick = torch.topk(keys, self._cap, largest=False).indices
                rows, keys = rows[pick.to(rows.device)], keys[pick]
            self._rows[e], self._keys[e] = rows, keys

    def rows(self, expert: int) -> torch.Tensor | None:
        """(S, H) the sampled tokens of ``expert``, or None when none was routed to it."""
        return self._rows[expert]
