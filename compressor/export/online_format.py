"""The format of an export's run-time parts: online Hadamards (R4, R3), per-token input quantizers, the KV quantizer.

They go into ``config.json["quantization_config"]`` beside the weight schemes,
in the keys compressed-tensors and llm-compressor write:

* ``config_groups[g]["input_activations"]``: compressed-tensors
  ``QuantizationArgs`` of a dynamic per-token quantizer (``strategy: token``,
  ``dynamic: true``), for the quantized linears of group ``g`` that carry an
  ``input_quantizer``; linears with other settings (or none) get other groups.
* ``kv_cache_scheme``: ``QuantizationArgs`` with ``strategy: group``,
  ``dynamic: true`` and ``group_size`` = ``kv_group_size`` or head_dim.
  compressed-tensors' dynamic group strategy takes one range per group of the
  last dim of the cached (B, H_kv, T, D) keys and values, i.e. one scale per
  (batch, kv head, token, group): exactly our per-head per-token KV quantizer.
* ``transform_config``: the ``TransformConfig`` of llm-compressor's
  SpinQuantModifier: group ``R4`` (location ``input`` on the linears that rotate
  their input, plus the ``weight_input`` inverse already fused into their
  weights) and group ``R3`` (``q_attn`` and ``k_cache`` on the attention
  modules, ``head_dim`` = D), and one group ``RB<b>`` per block size b of
  block-diagonal input Hadamards (the ``hadamard_inputs`` pass: ``input`` and
  ``weight_input`` as R4, ``head_dim`` = b, which compressed-tensors applies as
  the same (b, b) transform on every block of b inputs). The unnormalized matrix ``H`` (forward
  ``x ↦ x H / √n``, entries ±1, float32) is stored once per size in the
  safetensors under compressed-tensors' name for transform weights,
  ``<first target>.<group>_<location>.weight`` (e.g.
  ``model.layers.0.mlp.down_proj.R4_input.weight``), as ``save_pretrained``
  writes a transform shared by every target. The scheme ``type`` is
  ``hadamard`` when every size is a power of two (Sylvester's matrix, which
  compressed-tensors and vLLM's hadacore build identically), otherwise
  ``random-hadamard``: our Paley factors (e.g. 1536 = 128 * 12) differ from
  compressed-tensors' tables, and that type makes compressed-tensors and vLLM
  apply the stored matrix as a dense ``x H / √n``.
* ``compressor`` (:data:`EXTENSION`; other loaders ignore it): what
  ``QuantizationArgs`` cannot hold: ``clip_ratio`` per config group when it is
  not 1, the true width of 7-bit weight codes declared 8-bit
  (``weights.<group>.num_bits``), the KV quantizer's exact settings (``group_size: null`` = the whole
  head) and the attention implementation the quantizers wrap (``sdpa`` /
  ``eager``).

:mod:`compressor.export.online_write` writes it (for
:mod:`compressor.export.compressed_tensors`); :mod:`compressor.export.online_read`
reads it back for :func:`compressor.export.loader.load_compressed`
(``attach_transforms``, ``attach_kv_quantizers``, ``input_quantizer``), so a
reload computes the same logits.
"""

from __future__ import annotations

__all__ = ["EXTENSION", "EXTENSION_VERSION", "R4", "R3", "RB", "OFFLINE_LOCATIONS", "is_pow2"]

EXTENSION = "compressor"
EXTENSION_VERSION = 1
R4, R3 = "R4", "R3"
RB = "RB"  # block-diagonal input Hadamards: group "RB<b>" per block size b (``head_dim`` = b)
OFFLINE_LOCATIONS = ("weight_input", "weight_output")  # fused into the stored weights; nothing to do at load


def is_pow2(n: int) -> bool:
    """Whether ``n`` is a power of two (the sizes whose Hadamard is Sylvester's, built identically everywhere)."""
    return n > 0 and n & (n - 1) == 0
