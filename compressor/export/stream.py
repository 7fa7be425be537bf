"""Streamed compression: a checkpoint bigger than host RAM, one decoder block at a time.

:func:`load_skeleton` builds the model with its parameters on the ``meta``
device (no memory) and reads only what lives outside the decoder blocks
(embeddings, final norm, ``lm_head``) from the checkpoint's safetensors shards.
:class:`StreamedExport` is what the sequential pipeline calls around each block
(:class:`compressor.pipeline.sequential.BlockStream`):

* ``load``: the block's tensors are read from the shards when its turn comes
  (plain reads, not memory maps, whose touched pages would stay resident), in
  the dtype the skeleton gives them; fused MoE experts are assembled from the
  checkpoint's per-expert linears, as transformers does when it loads them;
* ``release``: once the block is compressed and its outputs have fed the next
  block, its tensors are packed as :func:`~compressor.export.compressed_tensors.save_compressed`
  would pack them and written at once to the export's current shard (a spool
  file from which the safetensors file is assembled when the shard closes),
  and the block goes back to ``meta``.

:func:`~compressor.export.compressed_tensors.save_compressed` then adds the
tensors outside the blocks, names the shards and writes the index, config and
manifest into the atomic output directory. Host RAM stays near one block + the
activation cache + one block's statistics, whatever the depth: the tensors
outside the blocks are parked on ``meta`` while the blocks run
(:meth:`StreamedExport.park`). The export holds the same tensors as the
in-memory path's (byte-identical files when both fit one shard).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import uuid
from pathlib import Path

import torch
from torch import nn

from compressor.core.arch import ExpertCheckpointNames, expert_checkpoint_names, experts_layout, find_blocks
from compressor.core.hub import check_remote_code, resolve_model
from compressor.core.memory import trim_heap
from compressor.core.sparsity import is_pruned, pruned_zeros
from compressor.export.checkpoint import check_checkpoint
from compressor.export.compressed_tensors import block_tensors
from compressor.runtime.online import OnlineHadamard

__all__ = ["CheckpointReader", "load_skeleton", "StreamedExport"]

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
NOT_STREAMABLE = "run without stream (--stream), which loads the whole model into memory"


# safetensors dtype names -> torch dtypes (the format is little-endian, as every CPU torch runs on here)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FLOATS = ("F32", "F16", "BF16", "F64")


class CheckpointReader:
    """Tensors of a Hugging Face checkpoint's safetensors files, read one by one by name.

    Each tensor is read with plain file reads into memory of its own, not memory-mapped: pages of a mapped
    file stay in the process's resident set once touched, so a streamed run over mapped shards would end
    up holding the whole checkpoint in its RSS.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path} has no *.safetensors weights to stream")
        self._where: dict[str, tuple[Path, int, str, list[int], int]] = {}  # key -> file, offset, dtype, shape, bytes
        for file in files:
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self._where[key] = (file, 8 + n + start, info["dtype"], info["shape"], end - start)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        """The stored tensor ``key``, as stored (dtype and shape), in memory of its own."""
        file, offset, dtype, shape, nbytes = self._where[key]
        if dtype not in DTYPES:
            raise ValueError(f"{key}: safetensors dtype {dtype} is not supported by the streamed reader")
        raw = torch.empty(nbytes, dtype=torch.uint8)
        with open(file, "rb", buffering=0) as fh:
            fh.seek(offset)
            view, done = memoryview(raw.numpy()), 0
            while done < nbytes:
                got = fh.readinto(view[done:])
                if not got:
                    raise ValueError(f"{file} ends inside {key}: the checkpoint is truncated")
                done += got
        return raw.view(DTYPES[dtype]).reshape(shape)

    def first_float_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point tensor (what ``dtype="auto"`` picks without ``config.dtype``)."""
        return next((DTYPES[d] for _, _, d, _, _ in self._where.values() if d in FLOATS), None)


def load_skeleton(path: str | Path, *, revision: str | None = None,
                  trust_remote_code: bool = False) -> tuple[nn.Module, CheckpointReader]:
    """The model of a checkpoint with its decoder blocks on ``meta`` and everything else read, plus its reader.

    Parameters get the dtype ``from_pretrained(dtype="auto")`` would give them (``config.dtype``, else the
    checkpoint's first float tensor's); non-persistent buffers (rotary frequencies) are built as usual.

    Raises:
        ValueError: a tensor outside the blocks the checkpoint does not hold (see :meth:`StreamedExport.load`).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig

    path = resolve_model(path, revision=revision, trust_remote_code=trust_remote_code)
    check_checkpoint(path)
    check_remote_code(path, trust_remote_code)
    reader = CheckpointReader(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    cls = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
    dtype = getattr(config, "dtype", None) or reader.first_float_dtype() or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.tie_weights()  # tied embeddings become one parameter, read once
    blocks_name, _ = find_blocks(model)
    _read(model, reader, lambda name: not (name == blocks_name or name.startswith(blocks_name + ".")),
          names=expert_checkpoint_names(config))
    model.eval()
    return model, reader


def _read(root: nn.Module, reader: CheckpointReader, wanted, prefix: str = "",
          names: ExpertCheckpointNames | None = None) -> None:
    """Replace the meta parameters of ``root`` whose full names ``wanted`` accepts by the checkpoint's tensors;
    parameters shared by several modules (tied embeddings) are read once and stay shared.

    With ``names`` (the family's :class:`~compressor.core.arch.ExpertCheckpointNames`), a tensor the checkpoint
    stores under its family's name (Mixtral's ``block_sparse_moe``) is found there, and a fused-experts
    parameter (E, N, K) is assembled from the per-expert linears the checkpoint holds, as transformers does
    when it loads one (:func:`_fused_experts`).
    """
    groups: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in root.named_parameters(prefix=prefix, remove_duplicate=False):
        if wanted(name):
            groups.setdefault(id(p), []).append(name)
            params[id(p)] = p
    for pid, names_of_p in groups.items():
        old = params[pid]
        key = next((k for n in names_of_p for k in _keys(n, names) if k in reader), None)
        if key is not None:
            tensor = reader.get(key)
        else:
            tensor = _fused_experts(root, names_of_p[0], prefix, old, reader, names)
            key = names_of_p[0]
        if tensor is None:
            if not old.is_meta:
                continue
            raise ValueError(f"{names_of_p[0]} is not in the checkpoint's safetensors files under that name (its family "
                             f"stores it otherwise, or the checkpoint is incomplete): {NOT_STREAMABLE}")
        if tuple(tensor.shape) != tuple(old.shape):
            raise ValueError(f"{key}: the checkpoint holds {tuple(tensor.shape)}, the model's config makes "
                             f"{tuple(old.shape)}; the checkpoint does not match its config.json")
        new = nn.Parameter(tensor.to(old.dtype), requires_grad=old.requires_grad)
        for name in names_of_p:
            owner, _, leaf = _relative(name, prefix).rpartition(".")
            root.get_submodule(owner)._parameters[leaf] = new
    for name, buf in list(root.named_buffers(prefix=prefix)):
        key = next((k for k in _keys(name, names) if k in reader), None) if wanted(name) else None
        if key is not None:
            owner, _, leaf = _relative(name, prefix).rpartition(".")
            root.get_submodule(owner)._buffers[leaf] = reader.get(key).to(buf.dtype)


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 if prefix else 0:]


def _keys(name: str, names: ExpertCheckpointNames | None) -> list[str]:
    """Where a checkpoint may store tensor ``name``: under it, then under its family's name for it."""
    theirs = names.to_checkpoint(name) if names is not None else name
    return [name] if theirs == name else [name, theirs]


def _fused_experts(root: nn.Module, name: str, prefix: str, old: torch.Tensor, reader: CheckpointReader,
                   names: ExpertCheckpointNames | None) -> torch.Tensor | None:
    """Fused-experts parameter ``name`` (E, N, K), e.g. ``gate_up_proj`` (E, 2I, H), built from the per-expert
    linears of the checkpoint (``experts.{e}.gate_proj.weight`` (I, H) then ``up_proj``, rows stacked; Mixtral's
    ``w1`` / ``w3``), in ``old``'s dtype and written in place, no stacked copy; None when ``name`` is not such
    a parameter or the checkpoint holds none of its experts.

    Raises:
        ValueError: the checkpoint holds some of the experts' tensors, not all.
    """
    if names is None or names.fused:
        return None
    owner, _, leaf = _relative(name, prefix).rpartition(".")
    layout = experts_layout(root.get_submodule(owner))
    if layout is None or leaf not in dict(layout.params):
        return None
    experts = name.rpartition(".")[0]
    keys = [[names.to_checkpoint(f"{experts}.{e}.{names.name(s)}.weight") for s in layout.splits(leaf)]
            for e in range(old.shape[0])]
    missing, total = [k for row in keys for k in row if k not in reader], sum(map(len, keys))
    if len(missing) == total:
        return None
    if missing:
        raise ValueError(f"{missing[0]} is not in the checkpoint's safetensors files ({len(missing)} of {leaf}'s "
                         f"{total} per-expert tensors are missing): the checkpoint is incomplete")
    out = torch.empty(old.shape, dtype=old.dtype)
    for e, row in enumerate(keys):
        start = 0
        for key in row:
            part = reader.get(key)
            if part.ndim != 2 or part.shape[1] != old.shape[2] or start + part.shape[0] > old.shape[1]:
                raise ValueError(f"{key}: the checkpoint holds {tuple(part.shape)}, which does not fit the model's "
                                 f"{tuple(old.shape)} {leaf}; the checkpoint does not match its config.json")
            out[e, start:start + part.shape[0]] = part
            start += part.shape[0]
        if start != old.shape[1]:
            raise ValueError(f"{row[0]}: expert {e}'s {'/'.join(layout.splits(leaf))} hold {start} rows, the model's "
                             f"{leaf} {old.shape[1]}; the checkpoint does not match its config.json")
    return out


def _header(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The safetensors header (length prefix included) for tensors of these dtypes and shapes, and the order in
    which their data follows it: both as ``safetensors`` itself lays them out, taken from its serialization of
    one-element stand-ins of the same names and dtypes."""
    from safetensors.torch import save

    probe = save({k: torch.zeros(1, dtype=dtype) for k, (dtype, _) in specs.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", probe[:8])
    layout = json.loads(probe[8:8 + n])
    header: dict = {"__metadata__": layout.pop("__metadata__")} if "__metadata__" in layout else {}
    order = sorted(layout, key=lambda k: layout[k]["data_offsets"][0])
    offset = 0
    for key in order:
        dtype, shape = specs[key]
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": layout[key]["dtype"], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in row-major order (a copy only when it is not contiguous)."""
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _copy_range(src: int, dst: int, offset: int, nbytes: int) -> None:
    """Append ``nbytes`` of file descriptor ``src`` from ``offset`` at ``dst``'s position, in the kernel where it
    can (``copy_file_range``), else through a bounded buffer."""
    end = offset + nbytes
    if hasattr(os, "copy_file_range"):
        try:
            while offset < end:
                done = os.copy_file_range(src, dst, end - offset, offset)
                if done <= 0:
                    break
                offset += done
        except OSError:  # not supported between these files: copy below what is left
            pass
    while offset < end:
        chunk = os.pread(src, min(end - offset, 2**26), offset)
        if not chunk:
            raise OSError("the spool file ended early")
        view = memoryview(chunk)
        while view:  # os.write may write less than it is given
            view = view[os.write(dst, view):]
        offset += len(chunk)


class _Shard:
    """One export shard written as its tensors arrive: their bytes go straight to a spool file, and
    :meth:`close` assembles the safetensors file (header, then the data in safetensors' order) from it, so no
    tensor waits in memory for its shard to fill."""

    def __init__(self, path: Path):
        self.path = path
        self.spool = path.with_name(path.name + ".spool")
        self.fh = open(self.spool, "wb")
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}  # dtype, shape, offset, bytes
        self.size = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        self.fh.write(_raw(t))
        self.entries[key] = (t.dtype, tuple(t.shape), self.size, nbytes)
        self.size += nbytes

    def close(self, metadata: dict[str, str]) -> None:
        self.fh.close()
        header, order = _header({k: (d, s) for k, (d, s, _, _) in self.entries.items()}, metadata)
        with open(self.spool, "rb") as src, open(self.path, "wb") as dst:
            dst.write(header)
            dst.flush()
            for key in order:
                _, _, offset, nbytes = self.entries[key]
                _copy_range(src.fileno(), dst.fileno(), offset, nbytes)
        self.spool.unlink()


class _Reread:
    """:meth:`StreamedExport.reread`'s stream: block reads as the export's, releases that only free."""

    def __init__(self, export: "StreamedExport"):
        self.export = export

    def load(self, index: int, prefix: str, block: nn.Module) -> None:
        self.export.load(index, prefix, block)

    def release(self, index: int, prefix: str, block: nn.Module) -> None:
        block.to("meta")
        trim_heap()

    def park(self) -> None:  # the sweep runs before the export's run, which parks what lies outside the blocks
        pass

    def unpark(self) -> None:
        pass

    def reread(self) -> "_Reread":
        return self


class StreamedExport:
    """Block weights read on demand from ``reader``; finished blocks packed into export shards, then freed.

    Args:
        model: the skeleton from :func:`load_skeleton`.
        reader: its checkpoint's tensors.
        output: the export directory the run will write (the shards wait beside it, in a hidden directory,
            until :func:`~compressor.export.compressed_tensors.save_compressed` moves them in).
        max_shard_bytes: the size at which a shard is closed and the next begins (the in-memory export's
            default); tensors are written to disk as they come, so no shard is ever held in memory.
        write: False on the ranks of a data-parallel run other than rank 0: blocks are read and freed as
            on rank 0, nothing is packed or written (rank 0 writes the export).
    """

    def __init__(self, model: nn.Module, reader: CheckpointReader, output: str | Path,
                 max_shard_bytes: int = 5 * 2**30, write: bool = True):
        self.model, self.reader, self.max_shard_bytes, self.write = model, reader, max_shard_bytes, write
        output = Path(output)
        self.dir = output.parent / f".{output.name}.stream-{uuid.uuid4().hex[:8]}"
        if write:
            output.parent.mkdir(parents=True, exist_ok=True)
            self.dir.mkdir()
        self.files: list[tuple[Path, list[str]]] = []  # written shards and their keys
        self.shard: _Shard | None = None  # the shard being written
        self.total = 0
        self.zeros: dict[str, int] = {}  # pruned modules freed: the zeros their masks hold
        self.released: set[str] = set()
        self.parked: set[str] = set()  # parameters outside the blocks freed while the blocks run
        self.blocks_name, _ = find_blocks(model)
        self.names = expert_checkpoint_names(model.config)

    # the pipeline's hooks (compressor.pipeline.sequential.BlockStream)
    def load(self, index: int, prefix: str, block: nn.Module) -> None:
        """Read block ``index`` (named ``prefix``) from the checkpoint."""
        _read(block, self.reader, lambda name: True, prefix, names=self.names)

    def park(self) -> None:
        """Free the parameters outside the blocks (embeddings, final norm, ``lm_head``) while the blocks run:
        once block 0's inputs are captured nothing reads them until the export, and at the 8B shape they are
        2 GB. Their current values (a leading pass such as rotate may have changed them) go to a file in the
        staging directory, written as they are, no copy in memory; tied parameters stay one.
        :meth:`unpark` reads them back."""
        metas: dict[int, nn.Parameter] = {}
        spill = None
        if self.write:  # a rank that writes nothing needs them no more: freed, not spilled
            (self.dir / "parked").mkdir(exist_ok=True)
            spill = _Shard(self.dir / "parked" / "outside.safetensors")
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if self._inside(name) or p.is_meta:
                continue
            if id(p) not in metas and spill is not None:
                spill.add(name, p.detach())
            meta = metas.setdefault(id(p), nn.Parameter(p.to("meta"), requires_grad=p.requires_grad))
            owner, _, leaf = name.rpartition(".")
            self.model.get_submodule(owner)._parameters[leaf] = meta
            self.parked.add(name)
        if spill is not None:
            spill.close({"format": "pt"})
        trim_heap()

    def unpark(self) -> None:
        """Read back what :meth:`park` freed, as it was when parked (on a rank that writes the export)."""
        if self.parked and self.write:
            _read(self.model, CheckpointReader(self.dir / "parked"), lambda name: name in self.parked)
            self.parked.clear()
            shutil.rmtree(self.dir / "parked", ignore_errors=True)

    def reread(self) -> "_Reread":
        """A stream that reads each block from the checkpoint and frees it again, writing nothing: the
        calibration sweep a plan runs over the unchanged model (OWL's outlier ratios) before the run."""
        return _Reread(self)

    def _inside(self, name: str) -> bool:
        return name == self.blocks_name or name.startswith(self.blocks_name + ".")

    def release(self, index: int, prefix: str, block: nn.Module) -> None:
        """Pack the finished block, write its tensors into the current export shard and free it."""
        if self.write:
            for name, module in block.named_modules(prefix=prefix):
                if is_pruned(module):
                    self.zeros[name] = pruned_zeros(module)
            self.add(block_tensors(self.model, block, prefix))
        # online transforms keep their (small, non-persistent) buffers: the export describes them afterwards
        kept = [(m, dict(m._buffers)) for m in block.modules() if isinstance(m, OnlineHadamard)]
        block.to("meta")
        for module, buffers in kept:
            module._buffers.update(buffers)
        self.released.add(prefix)
        trim_heap()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write tensors of the export into the current shard, closing it first when they would overflow it."""
        for key, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if self.shard is not None and self.shard.entries and self.shard.size + nbytes > self.max_shard_bytes:
                self._close_shard()
            if self.shard is None:
                self.shard = _Shard(self.dir / f"part-{len(self.files):05d}.safetensors")
            self.shard.add(key, t)
            self.total += nbytes

    def _close_shard(self) -> None:
        shard, self.shard = self.shard, None
        shard.close({"format": "pt"})
        self.files.append((shard.path, list(shard.entries)))
        log.debug("wrote %s (%d tensors, %.1f MB)", shard.path.name, len(shard.entries), shard.size / 2**20)

    def finish(self, rest: dict[str, torch.Tensor], into: Path) -> None:
        """Add ``rest`` (the tensors outside the blocks), write the last shard and move every shard into ``into``
        under its final name (``model.safetensors``, or ``model-00001-of-0000N.safetensors`` with an index)."""
        if not self.write:
            raise RuntimeError("this stream writes nothing (a data-parallel rank other than 0): rank 0 exports")
        missing = [n for n, p in self.model.named_parameters() if p.is_meta
                   and not any(n.startswith(prefix + ".") for prefix in self.released)]
        if missing:
            raise ValueError(f"{missing[0]} was never read from the checkpoint nor written ({len(missing)} tensors): "
                             "the streamed run did not reach every block")
        self.add(rest)
        if self.shard is not None or not self.files:
            if self.shard is None:
                self.shard = _Shard(self.dir / f"part-{len(self.files):05d}.safetensors")
            self._close_shard()
        if len(self.files) == 1:
            os.replace(self.files[0][0], into / "model.safetensors")
            return
        weight_map = {}
        for i, (file, keys) in enumerate(self.files, 1):
            name = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(file, into / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (into / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")

    def close(self) -> None:
        """Remove the shards that were not moved into an export (a failed or interrupted run)."""
        if self.shard is not None:
            self.shard.fh.close()
            self.shard = None
        shutil.rmtree(self.dir, ignore_errors=True)
