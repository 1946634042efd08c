"""Damage a ticket file as a disk, a copy or a stray edit would: one bit flipped in the file's bytes where the
value's bytes can be found on disk, otherwise the value rewritten through h5py with one bit flipped. Used by
test_ticket.py and test_packed.py.

Where the bytes lie, from the HDF5 File Format Specification version 3.0
(https://support.hdfgroup.org/archive/support/HDF5/doc/H5.format.html); every helper checks that the bytes it
found hold the value before it flips one, so a layout that differs fails the test rather than flipping elsewhere:
- a contiguous dataset's elements lie one after the other from the address h5py's dataset.id.get_offset() gives;
- a compound element is its members packed in order; a variable-length string member takes 16 bytes in it (its
  length, 4 bytes, then the global heap ID: collection address, 8 bytes, and object index, 4 bytes; "Datatype
  Message", class 9, and "Global Heap");
- a global heap object is its index (2 bytes), reference count (2), 4 reserved bytes, its size (8), then its
  bytes ("III.E Global Heap"); a global heap collection has no checksum, so its strings (those of variable-length
  string attributes and of /layers' names and kinds) are damaged silently as far as HDF5 is concerned;
- a version 3 attribute message: version (1 byte: 3), flags (1), name size (2, the NUL included), datatype size
  (2), dataspace size (2), name encoding (1), then the name, datatype, dataspace and data ("IV.A.2.m Attribute
  Message"); it lies in a version 2 object header or in the fractal heap of dense attribute storage, both of
  which HDF5 checksums, so a flipped bit there is an HDF5 error before any digest is checked.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np

VLEN_BYTES = 16   # a variable-length string member's bytes in a compound element on disk (see above)


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    """Flip the bits of `mask` in the byte at `offset` of the file."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ mask]))


def copy(source: Path, directory: Path, name: str = "damaged.h5") -> Path:
    target = directory / name
    shutil.copy(source, target)
    return target


def dataset_offset(path: Path, name: str) -> int:
    """File offset of a contiguous dataset's first element."""
    with h5py.File(path, "r", locking=False) as h5:
        offset = h5[name].id.get_offset()
    assert offset is not None, f"/{name} is not contiguous or has no storage"
    return offset


def flip_in_dataset(path: Path, name: str, byte: int = 0, mask: int = 0x01) -> None:
    """Flip bits of byte `byte` of contiguous dataset `name` (its raw little-endian bytes), on disk."""
    with h5py.File(path, "r", locking=False) as h5:
        before = np.ascontiguousarray(h5[name][()]).tobytes()
    offset = dataset_offset(path, name)
    assert Path(path).read_bytes()[offset:offset + len(before)] == before, f"/{name} is not where h5py says"
    flip(path, offset + byte, mask)


def layer_field_offset(path: Path, row: int, field: str) -> tuple[int, np.dtype]:
    """File offset and dtype of field `field` of row `row` of /layers (compound, contiguous)."""
    with h5py.File(path, "r", locking=False) as h5:
        table = h5["layers"]
        dtype, rows, base = table.dtype, table.shape[0], table.id.get_offset()
        storage = table.id.get_storage_size()
    position, offsets = 0, {}
    for member in dtype.names:
        member_type = dtype.fields[member][0]
        offsets[member] = position
        position += VLEN_BYTES if h5py.check_string_dtype(member_type) else member_type.itemsize
    assert position * rows == storage, f"/layers rows are not {position} bytes on disk"
    return base + row * position + offsets[field], dtype.fields[field][0]


def flip_in_layer(path: Path, row: int, field: str, mask: int = 0x01) -> None:
    """Flip bits of the lowest byte of a numeric field of a /layers row, on disk."""
    offset, dtype = layer_field_offset(path, row, field)
    with h5py.File(path, "r", locking=False) as h5:
        value = np.ascontiguousarray(h5["layers"][row][field], dtype=dtype.base)
    assert Path(path).read_bytes()[offset:offset + value.nbytes] == value.tobytes(), f"{field} is not on disk there"
    flip(path, offset, mask)


def flip_in_heap_string(path: Path, text: str, byte: int = 0, mask: int = 0x02) -> None:
    """Flip bits of byte `byte` of the global heap object that holds exactly `text`, on disk."""
    raw = text.encode()
    pattern = len(raw).to_bytes(8, "little") + raw
    data = Path(path).read_bytes()
    hits = [i for i in range(len(data)) if data.startswith(pattern, i)]
    assert len(hits) == 1, f"{len(hits)} global heap objects hold {text[:40]!r}"
    flip(path, hits[0] + 8 + byte, mask)


def attribute_data_offset(path: Path, name: str) -> int:
    """File offset of the data of root attribute `name` (its version 3 attribute message)."""
    data = Path(path).read_bytes()
    key = name.encode() + b"\0"
    hits, start = [], 0
    while (found := data.find(key, start)) >= 0:
        header = found - 9
        if header >= 0 and data[header] == 3 and int.from_bytes(data[header + 2:header + 4], "little") == len(key):
            datatype = int.from_bytes(data[header + 4:header + 6], "little")
            dataspace = int.from_bytes(data[header + 6:header + 8], "little")
            hits.append(found + len(key) + datatype + dataspace)
        start = found + 1
    assert len(hits) == 1, f"{len(hits)} attribute messages named {name}"
    return hits[0]


def flip_in_attribute(path: Path, name: str, mask: int = 0x01) -> None:
    """Flip bits of the first byte of a numeric root attribute's data, on disk."""
    offset = attribute_data_offset(path, name)
    with h5py.File(path, "r", locking=False) as h5:
        value = np.asarray(h5.attrs[name])
    assert Path(path).read_bytes()[offset:offset + value.nbytes] == value.tobytes()
    flip(path, offset, mask)


def rewrite_attribute_bit(path: Path, name: str, bit: int = 0) -> None:
    """Rewrite a numeric root attribute through h5py with bit `bit` of its value flipped (HDF5 then writes
    valid checksums of its own metadata: only the ticket's digests can tell)."""
    with h5py.File(path, "r+", locking=False) as h5:
        value = np.asarray(h5.attrs[name])
        as_int = value.view(np.dtype(f"<u{value.itemsize}"))
        h5.attrs[name] = (as_int ^ np.array(1 << bit, as_int.dtype)).view(value.dtype)[()]


def rewrite_string_attribute_bit(path: Path, name: str, byte: int = 0, mask: int = 0x02) -> None:
    """Rewrite a string root attribute through h5py with bits of one byte flipped, keeping its HDF5 type."""
    with h5py.File(path, "r+", locking=False) as h5:
        value = h5.attrs[name]
        raw = bytearray(value if isinstance(value, bytes) else value.encode())
        raw[byte] ^= mask
        h5.attrs[name] = np.bytes_(bytes(raw)) if isinstance(value, bytes) else raw.decode()
