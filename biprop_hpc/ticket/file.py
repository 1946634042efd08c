"""The ticket file: a found Multi-Prize Ticket as an HDF5 file, everything inference needs and nothing more.

A BIPROP layer of a found ticket computes with W_eff = sign(W) * alpha * M, values in {-alpha, 0, +alpha}. So a
ticket stores, per BIPROP layer, the mask M as bits, the sign of every KEPT weight as bits, and alpha: about
(1 + k) bits per weight at keep ratio k, plus the small float parts (BN statistics, learned BN affine
parameters, dense first/last layers) as they are. Nothing is regenerated from a seed: torch's random streams
are not promised to stay the same across versions, devices or GPU models.

Schema, version 2 (`SCHEMA_VERSION`):

  /              attributes: format ("biprop-ticket"), schema_version (2), config (JSON of the run's whole
                 Config: model, width_mult, keep_ratio, first_layer, last_layer, learn_batchnorm, dataset, ...),
                 model, keep_ratio, in_channels, num_classes, image_size (the input geometry, so that no dataset
                 has to be read to build the network), source ("biprop-hpc checkpoint" or "original biprop
                 checkpoint"), source_file (its name), source_bytes (its size), created (ISO 8601 UTC),
                 biprop_weights (weights of all BIPROP layers), kept_weights (their kept count),
                 binary_activation ("x >= 0 -> +1, x < 0 -> -1"), biprop_hpc_version, torch_version,
                 sha256_parts and sha256 (the digests, below)
  /layers        compound table, one row per BIPROP layer in module order:
                   name (the module's name in the model, e.g. "3.conv1"), kind ("conv2d" | "linear"),
                   shape (int64[4]: out, in, kh, kw; a linear layer's is out, in, 1, 1), numel,
                   kept (the layer's kept count, n_keep), nonzero (weights with W_eff != 0: kept, unless a kept
                   W was exactly 0), alpha (float32, exactly the value W_eff holds), stride (int64[2]),
                   padding (int64[2]), dilation (int64[2]), groups,
                   mask_offset (first byte of the layer in /mask_bits), sign_offset (first byte in /sign_bits)
  /mask_bits     uint8: per layer the flat (row-major) mask W_eff != 0, packed 8 per byte, most significant bit
                 first (numpy.packbits), padded with 0 bits to a whole byte; layers one after the other
  /sign_bits     uint8: per layer one bit per set mask bit, in flat order: 1 for +alpha, 0 for -alpha; packed
                 and padded the same way
  /tensors/KEY   every other entry of the network's state_dict, under its state_dict key, with its dtype and
                 shape: BN running statistics and num_batches_tracked, learned BN affine parameters, dense
                 first/last layers' weights

Digests: sha256_parts is a JSON object, part -> SHA-256 (hex), over every part of the file: "@NAME" for each
root attribute (JSON of its value and type), "/layers[i]" for row i of the table (JSON of its fields),
"/mask_bits[i]" and "/sign_bits[i]" for layer i's bytes of the bit datasets, "/tensors/KEY" for each tensor
(dtype, shape and bytes); sha256 is the SHA-256 of the sha256_parts string. `read` checks them all, so a file
changed after it was written (one flipped bit anywhere that reaches the network, `ticket info` or the metrics) is
an error naming the layer, dataset or attribute that no longer matches; a part with no digest (added later) or a
digest with no part (removed) is one too. SHA-256 covers the bit datasets, so schema 2 drops their Fletcher-32
checksums (and with them the chunking filters need): the bytes are contiguous, and one check names the damage.
Schema 1 (no digests; /mask_bits and /sign_bits Fletcher-32 checksummed in chunks of 1 MiB) is still read,
with a warning that everything but the bit datasets is unverified; `ticket info` marks it "unverified".
A layer's W_eff is rebuilt as zeros, then +alpha / -alpha at the set mask bits by their sign bits: bit for bit
the W_eff the run evaluated with (a pruned weight is +0.0 here where sign(W) * alpha * 0 may give -0.0).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from biprop_hpc.archive.run_archive import plain_value
from biprop_hpc.files import replace_atomically

log = logging.getLogger("biprop_hpc")

FORMAT = "biprop-ticket"
SCHEMA_VERSION = 2
BINARY_ACTIVATION = "x >= 0 -> +1, x < 0 -> -1"
KINDS = ("conv2d", "linear")
LAYER_DTYPE = np.dtype([("name", h5py.string_dtype()), ("kind", h5py.string_dtype()), ("shape", np.int64, (4,)),
                        ("numel", np.int64), ("kept", np.int64), ("nonzero", np.int64), ("alpha", np.float32),
                        ("stride", np.int64, (2,)), ("padding", np.int64, (2,)), ("dilation", np.int64, (2,)),
                        ("groups", np.int64), ("mask_offset", np.int64), ("sign_offset", np.int64)])
DIGEST_ATTRIBUTES = ("sha256_parts", "sha256")   # the digests: root attributes no digest covers
DATASETS = ("layers", "mask_bits", "sign_bits", "tensors")


class TicketError(ValueError):
    """A file that is not a readable ticket of a schema this version knows, or a ticket that cannot be made;
    the message says why and what to do."""


@dataclass
class LayerRecord:
    """One BIPROP layer of a ticket: the raw contents (packed bits) and its geometry."""
    name: str
    kind: str                     # "conv2d" | "linear"
    shape: tuple                  # the weight's shape: (out, in, kh, kw) or (out, in)
    kept: int                     # n_keep of the layer's selection
    alpha: np.float32
    mask_bits: np.ndarray         # uint8, packed flat mask (numpy.packbits, big-endian bit order)
    sign_bits: np.ndarray         # uint8, packed signs of the set mask bits, 1 = +alpha
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nonzero(self) -> int:
        return int(np.unpackbits(self.mask_bits, count=self.numel).sum())

    def mask(self) -> torch.Tensor:
        """Boolean mask of the weight's shape: True where W_eff != 0."""
        bits = np.unpackbits(self.mask_bits, count=self.numel).astype(bool)
        return torch.from_numpy(bits).view(self.shape)

    def signs(self) -> torch.Tensor:
        """Boolean, one per set mask bit in flat order: True for +alpha, False for -alpha."""
        count = self.nonzero
        return torch.from_numpy(np.unpackbits(self.sign_bits, count=count).astype(bool))

    def effective_weight(self, device="cpu") -> torch.Tensor:
        """W_eff (float32): +alpha / -alpha at the set mask bits, +0.0 elsewhere."""
        alpha = torch.tensor(float(self.alpha), dtype=torch.float32)
        flat = torch.zeros(self.numel, dtype=torch.float32)
        flat[self.mask().flatten()] = torch.where(self.signs(), alpha, -alpha)
        return flat.view(self.shape).to(device)

    @classmethod
    def from_effective_weight(cls, name: str, weight: torch.Tensor, kept: int, **geometry) -> LayerRecord:
        """The record of a layer whose W_eff is `weight` (values in {-alpha, 0, +alpha} for one alpha)."""
        weight = weight.detach().to("cpu", torch.float32)
        flat = weight.flatten()
        mask = flat != 0
        values = flat[mask]
        if values.numel():
            alpha = values.abs()[0]
            if not bool((values.abs() == alpha).all()):
                raise TicketError(f"layer {name}: its effective weight holds more than one magnitude, so it is not "
                                  "a BIPROP layer's sign(W) * alpha * M")
        else:
            alpha = torch.tensor(0.0)
        kind = "conv2d" if weight.dim() == 4 else "linear"
        return cls(name, kind, tuple(weight.shape), int(kept), np.float32(alpha.item()),
                   np.packbits(mask.numpy()), np.packbits((values > 0).numpy()), **geometry)


@dataclass
class Ticket:
    """What a ticket file holds (see the module doc): `read(path)` returns one."""
    config: dict                  # the Config as a dict
    in_channels: int
    num_classes: int
    image_size: int
    layers: list                  # LayerRecord per BIPROP layer, in module order
    tensors: dict                 # state_dict key -> tensor, every entry not of a BIPROP layer
    attrs: dict = field(default_factory=dict)
    verified: bool = True         # False for a schema 1 file read: it holds no digests

    @property
    def biprop_weights(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def kept_weights(self) -> int:
        return sum(layer.kept for layer in self.layers)

    def bit_bytes(self) -> int:
        """Bytes of the packed mask and sign bits."""
        return sum(layer.mask_bits.nbytes + layer.sign_bits.nbytes for layer in self.layers)

    def state_dict(self, device="cpu") -> dict:
        """The state_dict of the network with plain layers holding W_eff (what `load` builds and what
        `biprop export --format torch` writes): the BIPROP layers' "<name>.weight" plus every other entry."""
        state = {f"{layer.name}.weight": layer.effective_weight(device) for layer in self.layers}
        state.update({key: value.to(device) for key, value in self.tensors.items()})
        return state


def _pairs(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def write_ticket(path: str | Path, ticket: Ticket) -> Path:
    """Write `ticket` to `path` atomically (temporary file, fsync, rename): an error leaves nothing behind.
    The digests are taken from the file as written (read back through the code `read` checks them with)."""
    for layer in ticket.layers:
        if layer.kind not in KINDS:
            raise TicketError(f"layer {layer.name}: kind {layer.kind!r} is not one of {KINDS}")

    def write(tmp: Path) -> None:
        # HDF5 1.10 file format (2016): smaller object headers than the 1.8 default; h5py >= 2.10 reads it.
        with h5py.File(tmp, "w", locking=False, libver=("v110", "v110")) as h5:
            h5.attrs["format"] = FORMAT
            h5.attrs["schema_version"] = SCHEMA_VERSION
            h5.attrs["config"] = json.dumps(ticket.config, sort_keys=True)
            h5.attrs["model"] = ticket.config["model"]
            h5.attrs["keep_ratio"] = float(ticket.config["keep_ratio"])
            h5.attrs["in_channels"] = int(ticket.in_channels)
            h5.attrs["num_classes"] = int(ticket.num_classes)
            h5.attrs["image_size"] = int(ticket.image_size)
            h5.attrs["biprop_weights"] = ticket.biprop_weights
            h5.attrs["kept_weights"] = ticket.kept_weights
            h5.attrs["binary_activation"] = BINARY_ACTIVATION
            for key, value in ticket.attrs.items():
                if key not in h5.attrs and key not in DIGEST_ATTRIBUTES:  # a read ticket's digests are not ours
                    h5.attrs[key] = str(value) if isinstance(value, str) else value  # str subclasses too
            rows, mask_offset, sign_offset = [], 0, 0
            for layer in ticket.layers:
                shape = tuple(layer.shape) + (1,) * (4 - len(layer.shape))
                rows.append((layer.name, layer.kind, shape, layer.numel, layer.kept, layer.nonzero, layer.alpha,
                             _pairs(layer.stride), _pairs(layer.padding), _pairs(layer.dilation), layer.groups,
                             mask_offset, sign_offset))
                mask_offset += layer.mask_bits.size
                sign_offset += layer.sign_bits.size
            h5.create_dataset("layers", data=np.array(rows, dtype=LAYER_DTYPE))
            for name, parts in (("mask_bits", [layer.mask_bits for layer in ticket.layers]),
                                ("sign_bits", [layer.sign_bits for layer in ticket.layers])):
                h5.create_dataset(name, data=np.concatenate(parts) if parts else np.zeros(0, np.uint8))
            tensors = h5.create_group("tensors")
            for key, value in ticket.tensors.items():
                tensors.create_dataset(key, data=value.detach().cpu().numpy())
            h5.flush()
            parts = _part_digests(_root_attributes(tmp, h5), *_contents(tmp, h5))
            text = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
            # fixed-length strings: a variable-length one takes a global heap collection (4 KiB) of its own
            h5.attrs["sha256_parts"] = np.bytes_(text)
            h5.attrs["sha256"] = np.bytes_(_sha256(text).encode())

    return replace_atomically(path, write)


def read(path: str | Path) -> Ticket:
    """Read a ticket file and check it against its digests; TicketError (a ValueError) for anything that is not
    a complete, undamaged ticket this version of biprop-hpc reads (the message names the damaged part),
    FileNotFoundError when there is no file. A schema 1 ticket (no digests) is read with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ticket {path} does not exist (write one with `biprop export --checkpoint "
                                "RUN/checkpoints/best.pt --out TICKET`)")
    try:
        h5 = h5py.File(path, "r", locking=False)
    except OSError as error:
        raise TicketError(f"{path} is not a readable ticket: not an HDF5 file, or truncated ({error}); "
                          "export it again") from None
    try:
        with h5:
            return _read_open(path, h5)
    except TicketError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError) as error:
        raise TicketError(f"{path} is not a complete ticket ({type(error).__name__}: {error}); "
                          "export it again") from None


# --------------------------------------------------------------------------------- digests

def _sha256(*pieces: bytes) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def _array_digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return _sha256(f"{array.dtype.str} {array.shape} ".encode(), array.tobytes())


def _attribute_digest(value) -> str:
    """Of an attribute's value as `_root_attributes` gives it; the type is in it so that 1 and "1" differ."""
    if isinstance(value, np.ndarray):
        return _array_digest(value)
    return _sha256(json.dumps([type(value).__name__, value], sort_keys=True).encode())


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _row_digest(row) -> str:
    """Of one /layers row: every field (alpha as float32 -> double, which is exact)."""
    values = [_text(row[name]) if name in ("name", "kind") else np.asarray(row[name]).tolist()
              for name in LAYER_DTYPE.names]
    return _sha256(json.dumps(values).encode())


def _bit_ranges(row) -> tuple[slice, slice]:
    """The layer's bytes in /mask_bits and /sign_bits, from its row."""
    mask_start, sign_start = int(row["mask_offset"]), int(row["sign_offset"])
    return (slice(mask_start, mask_start + (int(row["numel"]) + 7) // 8),
            slice(sign_start, sign_start + (int(row["nonzero"]) + 7) // 8))


def _part_digests(attrs: dict, table: np.ndarray, mask_bits: np.ndarray, sign_bits: np.ndarray,
                  tensors: dict) -> dict:
    """Part name -> SHA-256 of every part of a ticket (the module doc lists them)."""
    parts = {f"@{key}": _attribute_digest(value) for key, value in attrs.items() if key not in DIGEST_ATTRIBUTES}
    for index, row in enumerate(table):
        parts[f"/layers[{index}]"] = _row_digest(row)
        mask, sign = _bit_ranges(row)
        parts[f"/mask_bits[{index}]"] = _array_digest(mask_bits[mask])
        parts[f"/sign_bits[{index}]"] = _array_digest(sign_bits[sign])
    for key, array in tensors.items():
        parts[f"/tensors/{key}"] = _array_digest(array)
    return parts


def _describe_part(part: str, table: np.ndarray) -> str:
    """A part name as the error message says it: the layer's name where the part is a layer's."""
    for prefix, what in (("/layers[", "/layers row"), ("/mask_bits[", "/mask_bits"), ("/sign_bits[", "/sign_bits")):
        if part.startswith(prefix):
            index = int(part[len(prefix):-1])
            name = _text(table[index]["name"]) if index < len(table) else "?"
            return f"{what} of layer {index} ({name})"
    return f"root attribute {part[1:]}" if part.startswith("@") else part


def _verify(path: Path, attrs: dict, table: np.ndarray, mask_bits: np.ndarray, sign_bits: np.ndarray,
            tensors: dict, objects: set) -> None:
    """Raise TicketError naming every part that no longer matches its digest (or has none, or is gone)."""
    stored = _stored_parts(path, attrs)
    actual = _part_digests(attrs, table, mask_bits, sign_bits, tensors)
    damaged_rows = {f"[{index}]" for index in range(len(table))
                    if stored.get(f"/layers[{index}]") != actual[f"/layers[{index}]"]}
    problems = []
    for part in sorted(actual.keys() | stored.keys()):
        if part.startswith(("/mask_bits[", "/sign_bits[")) and part[part.index("["):] in damaged_rows:
            continue     # read through a damaged row's offsets: the row is the damage to report
        if part not in stored:
            problems.append(f"{_describe_part(part, table)} has no digest (added after the ticket was written)")
        elif part not in actual:
            problems.append(f"{_describe_part(part, table)} is missing")
        elif stored[part] != actual[part]:
            problems.append(f"{_describe_part(part, table)} no longer matches its SHA-256 digest")
    problems += [f"/{name} is not part of a ticket" for name in sorted(objects - set(DATASETS))]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise TicketError(f"{path} is damaged: {shown}; do not use it: export it again from its checkpoint (or "
                          "copy it again)")


def _stored_parts(path: Path, attrs: dict) -> dict:
    """The digests the file holds, checked against sha256."""
    if "sha256_parts" not in attrs or "sha256" not in attrs:
        raise TicketError(f"{path} is damaged: a ticket of schema version {SCHEMA_VERSION} without its digests "
                          "(root attributes sha256_parts and sha256); export it again")
    text = attrs["sha256_parts"]
    if not isinstance(text, str) or _sha256(text.encode()) != attrs["sha256"]:
        raise TicketError(f"{path} is damaged: its digests (root attributes sha256_parts and sha256) do not match "
                          "each other, so nothing in it can be verified; export it again")
    return json.loads(text)


# --------------------------------------------------------------------------------- reading

def _root_attributes(path: Path, h5: h5py.File) -> dict:
    """Name -> plain value of every root attribute. HDF5 checksums its own metadata: numbers stored in the
    attributes' heap block fail that checksum when damaged (HDF5 then names no attribute), strings are in the
    unchecksummed global heap and fail their digest instead."""
    try:
        names = list(h5.attrs.keys())
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        raise TicketError(f"{path} is damaged: HDF5 cannot read its root attributes (config, in_channels, "
                          f"num_classes, image_size, ...): {error}; export it again") from None
    attrs = {}
    for name in names:
        try:
            attrs[name] = plain_value(h5.attrs[name])
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            raise TicketError(f"{path} is damaged: HDF5 cannot read its root attribute {name} ({error}); "
                              "export it again") from None
    return attrs


def _dataset(path: Path, h5: h5py.File, name: str) -> np.ndarray:
    """A dataset's contents; one HDF5 cannot read (e.g. a schema 1 bit dataset failing Fletcher-32) is named."""
    try:
        return np.asarray(h5[name][()])
    except KeyError as error:
        if name.lstrip("/") in h5:
            raise TicketError(f"{path} is damaged: HDF5 cannot read /{name} ({error}); export it again") from None
        raise TicketError(f"{path} is not a complete ticket: it has no /{name}; export it again") from None
    except (OSError, RuntimeError) as error:
        # HDF5 says only "filter returned failure" when a chunk fails its Fletcher-32 checksum
        checksum = ", whose Fletcher-32 checksum fails" if "filter" in str(error) and h5[name].fletcher32 else ""
        raise TicketError(f"{path} is damaged: HDF5 cannot read /{name}{checksum} ({error}); "
                          "export it again") from None


def _contents(path: Path, h5: h5py.File) -> tuple:
    """(/layers table, /mask_bits, /sign_bits, {key: array} of /tensors) as stored."""
    tensors = {key: _dataset(path, h5, f"tensors/{key}") for key in (h5["tensors"] if "tensors" in h5 else ())}
    return (_dataset(path, h5, "layers"), _dataset(path, h5, "mask_bits"), _dataset(path, h5, "sign_bits"),
            tensors)


def _check_identity(path: Path, attrs: dict) -> int:
    """The schema version, after format and schema_version are checked (a damaged one named as such)."""
    try:     # digests that say this file was written as FORMAT, SCHEMA_VERSION: a different value is damage
        parts = _stored_parts(path, attrs)
    except (TicketError, ValueError):
        parts = {}
    for key, expected in (("format", FORMAT), ("schema_version", SCHEMA_VERSION)):
        if attrs.get(key) != expected and parts.get(f"@{key}") == _attribute_digest(expected):
            raise TicketError(f"{path} is damaged: root attribute {key} reads {attrs.get(key)!r} but its digest is "
                              f"that of {expected!r}; export it again")
    if attrs.get("format") != FORMAT:
        raise TicketError(f"{path} is an HDF5 file but not a biprop ticket (no format={FORMAT!r} attribute); "
                          "a run's archive.h5 is not a ticket: write one with `biprop export`")
    version = int(attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise TicketError(f"{path} is a ticket of schema version {version}, newer than this biprop-hpc reads "
                          f"(up to {SCHEMA_VERSION}); upgrade biprop-hpc to read it")
    if version < 1:
        raise TicketError(f"{path}: schema_version {version} is not a valid ticket schema version")
    return version


def _read_open(path: Path, h5: h5py.File) -> Ticket:
    attrs = _root_attributes(path, h5)
    version = _check_identity(path, attrs)
    table, mask_bits, sign_bits, stored_tensors = _contents(path, h5)
    if version >= 2:
        _verify(path, attrs, table, mask_bits, sign_bits, stored_tensors, set(h5.keys()))
    else:
        log.warning("%s is a ticket of schema version 1, which holds no digests: only its mask and sign bits are "
                    "checked (Fletcher-32), its alphas, kept counts, BN statistics and config are not; export it "
                    "again from its checkpoint to have it verified whole", path)
    config = json.loads(attrs["config"])
    layers, mask_end, sign_end = [], 0, 0
    for row in table:
        name, kind = _text(row["name"]), _text(row["kind"])
        if kind not in KINDS:
            raise TicketError(f"{path}: layer {name} has kind {kind!r}, not one of {KINDS}")
        shape = tuple(int(v) for v in row["shape"])
        shape = shape if kind == "conv2d" else shape[:2]
        numel, nonzero = int(row["numel"]), int(row["nonzero"])
        if int(np.prod(shape)) != numel:
            raise TicketError(f"{path}: layer {name}: shape {shape} does not hold {numel} weights")
        mask, sign = _bit_ranges(row)
        mask_end, sign_end = mask.stop, sign.stop
        if mask_end > mask_bits.size or sign_end > sign_bits.size:
            raise TicketError(f"{path}: layer {name}: its bits lie beyond the end of /mask_bits or /sign_bits "
                              "(a truncated or damaged ticket); export it again")
        layer = LayerRecord(name, kind, shape, int(row["kept"]), np.float32(row["alpha"]),
                            mask_bits[mask], sign_bits[sign],
                            tuple(int(v) for v in row["stride"]), tuple(int(v) for v in row["padding"]),
                            tuple(int(v) for v in row["dilation"]), int(row["groups"]))
        if layer.nonzero != nonzero:
            raise TicketError(f"{path}: layer {name}: {layer.nonzero} mask bits are set but the table says "
                              f"{nonzero} (a damaged ticket); export it again")
        layers.append(layer)
    if mask_end != mask_bits.size or sign_end != sign_bits.size:
        raise TicketError(f"{path}: /mask_bits or /sign_bits holds more bytes than its layers (a damaged "
                          "ticket); export it again")
    tensors = {key: torch.from_numpy(np.array(array)) for key, array in stored_tensors.items()}
    return Ticket(config, int(attrs["in_channels"]), int(attrs["num_classes"]), int(attrs["image_size"]),
                  layers, tensors, attrs, verified=version >= 2)
