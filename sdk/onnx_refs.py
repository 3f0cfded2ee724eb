"""Which files an ONNX model reads besides itself: the external-data ``location`` of every
tensor, found by walking the protobuf wire format. No ``onnx`` import: a device has none.

Why: ONNX Runtime opens an external-data ``location`` relative to the model's folder, so a
model whose tensor says ``../../private/notes.db`` or ``/etc/passwd`` (or ORT's in-memory
tag ``*/_ORT_MEM_ADDR_/*``) reads outside the bundle. ``Bundle.open`` lists every location
with this module and refuses any that is not one of the bundle's own files.

What is walked (field numbers from ``onnx.proto``)::

    ModelProto      graph 7, training_info 20, functions 25
    TrainingInfo    initialization 1, algorithm 2                  (GraphProto)
    FunctionProto   node 7
    GraphProto      node 1, initializer 5, sparse_initializer 15
    NodeProto       attribute 5
    AttributeProto  t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23
    SparseTensor    values 1, indices 2                            (TensorProto)
    TensorProto     name 8, external_data 13, data_location 14 (1 = EXTERNAL)
    StringStringEntryProto  key 1, value 2

Everything else is skipped by its length, so the cost is one pass over the bytes.

Example:
    >>> entry = b"\\x0a\\x08location" + b"\\x12\\x05w.bin"            # key 1, value 2
    >>> tensor = b"\\x42\\x01w" + b"\\x6a" + bytes([len(entry)]) + entry + b"\\x70\\x01"
    >>> model = b"\\x3a" + bytes([len(tensor) + 2]) + b"\\x2a" + bytes([len(tensor)]) + tensor
    >>> external_data_refs(model)
    [ExternalRef(tensor='w', location='w.bin', where='graph.initializer[0]')]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .errors import BundleInvalidError

_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_LOCATION_KEY = b"location"  # an external_data entry's key, as protobuf stores it
_MAX_DEPTH = 64  # nested graphs (If/Loop bodies); real models use a handful

# message kind -> {field number: (child kind, name for messages)}
_SCHEMA: dict[str, dict[int, tuple[str, str]]] = {
    "model": {7: ("graph", "graph"), 20: ("training_info", "training_info"), 25: ("function", "functions")},
    "training_info": {1: ("graph", "initialization"), 2: ("graph", "algorithm")},
    "function": {7: ("node", "node")},
    "graph": {1: ("node", "node"), 5: ("tensor", "initializer"), 15: ("sparse_tensor", "sparse_initializer")},
    "node": {5: ("attribute", "attribute")},
    "attribute": {5: ("tensor", "t"), 6: ("graph", "g"), 10: ("tensor", "tensors"), 11: ("graph", "graphs"),
                  22: ("sparse_tensor", "sparse_tensor"), 23: ("sparse_tensor", "sparse_tensors")},
    "sparse_tensor": {1: ("tensor", "values"), 2: ("tensor", "indices")},
}


@dataclass(frozen=True)
class ExternalRef:
    """One tensor stored as external data: its name, its ``location`` (None if it has
    none) and where in the model it sits (e.g. ``graph.initializer[3]``).

    Example:
        >>> tensor = b"\\x42\\x01c" + b"\\x70\\x01"                     # name "c", data_location EXTERNAL
        >>> attribute = b"\\x2a" + bytes([len(tensor)]) + tensor          # AttributeProto.t
        >>> node = b"\\x2a" + bytes([len(attribute)]) + attribute         # NodeProto.attribute
        >>> graph = b"\\x0a" + bytes([len(node)]) + node                  # GraphProto.node
        >>> external_data_refs(b"\\x3a" + bytes([len(graph)]) + graph)    # ModelProto.graph
        [ExternalRef(tensor='c', location=None, where='graph.node[0].attribute[0].t[0]')]
    """

    tensor: str
    location: str | None
    where: str


def external_data_refs(data: bytes | bytearray | memoryview, *, located_only: bool = False) -> list[ExternalRef]:
    """Every tensor of a serialized ``ModelProto`` that keeps its data in another file.

    A tensor counts when its ``data_location`` is EXTERNAL or it has ``external_data``
    entries at all; a tensor with several ``location`` entries gives one ref for each.

    ``located_only=True`` finds what can make ONNX Runtime read another file, faster: only
    tensors with a ``location`` entry. Such an entry's key is stored as the plain bytes
    ``location``, so a message whose bytes lack them is skipped unparsed (a node, a graph,
    the whole file); a tensor marked EXTERNAL without a location, which ORT cannot load, is
    not reported then. ``Bundle.open`` checks this way: walking MiniLM's five models in full
    took ~50 ms, ~11 ms this way (the two ORT training models hold no location at all).

    Args:
        data: the bytes of an ``.onnx`` file.
        located_only: only tensors that name a location (see above).

    Returns:
        The refs in file order (empty for a model that holds all its data).

    Raises:
        BundleInvalidError: the bytes are not a well-formed protobuf message.

    Example:
        >>> external_data_refs(b"")        # an empty ModelProto is valid and reads nothing
        []
    """
    out: list[ExternalRef] = []
    if not located_only:
        view = memoryview(bytes(data) if not isinstance(data, (bytes, memoryview)) else data).cast("B")
        _walk(view, 0, len(view), "model", "model", 0, out)
        return out
    raw = data if isinstance(data, bytes) else bytes(data)  # bytes.find runs at C speed over a span
    if _LOCATION_KEY in raw:
        _walk(memoryview(raw).cast("B"), 0, len(raw), "model", "model", 0, out,
              lambda start, end: raw.find(_LOCATION_KEY, start, end) >= 0)
    return out


def external_data_locations(path: str | os.PathLike) -> list[str | None]:
    """The external-data locations an ``.onnx`` file refers to, in file order, with repeats.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "empty.onnx"; _ = p.write_bytes(b"")
        >>> external_data_locations(p)
        []
    """
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return [ref.location for ref in external_data_refs(data)]
    except BundleInvalidError as err:
        raise BundleInvalidError(f"{path}: {err}") from err


# ---------------------------------------------------------------- the wire format


def _malformed(why: str, where: str, position: int) -> BundleInvalidError:
    return BundleInvalidError(
        f"the ONNX model is not a well-formed protobuf ({why} in {where} at byte {position}); "
        "the file is damaged or not an ONNX model: copy or re-export the bundle"
    )


def _varint(buf: memoryview, pos: int, end: int, where: str) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise _malformed("truncated varint", where, pos)
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise _malformed("varint longer than 10 bytes", where, pos)


def _fields(buf: memoryview, start: int, end: int, where: str):
    """Yield (field number, wire type, value or (payload start, payload end)) for one message."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end, where)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise _malformed("field number 0", where, pos)
        if wire == 0:
            value, pos = _varint(buf, pos, end, where)
            yield field, wire, value
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise _malformed("truncated fixed-size field", where, pos)
            pos += size
        elif wire == 2:
            length, pos = _varint(buf, pos, end, where)
            if length > end - pos:
                raise _malformed(f"field {field} claims {length} bytes, {end - pos} left", where, pos)
            yield field, wire, (pos, pos + length)
            pos += length
        else:  # 3/4 are deprecated groups (never in ONNX), 6/7 do not exist
            raise _malformed(f"wire type {wire}", where, pos)


def _text(buf: memoryview, span: tuple[int, int], where: str) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError as err:
        raise _malformed("a string that is not UTF-8", where, span[0]) from err


def _walk(buf: memoryview, start: int, end: int, kind: str, where: str, depth: int, out: list[ExternalRef],
          holds_key: Callable[[int, int], bool] | None = None) -> None:
    """Walk one message of ``kind``; ``holds_key(start, end)`` False skips a child message
    (``located_only``: its bytes hold no ``location`` key)."""
    if depth > _MAX_DEPTH:
        raise _malformed(f"graphs nested deeper than {_MAX_DEPTH}", where, start)
    if kind == "tensor":
        _tensor(buf, start, end, where, out)
        return
    children = _SCHEMA[kind]
    counts: dict[int, int] = {}
    for field, wire, value in _fields(buf, start, end, where):
        child = children.get(field)
        if child is None:
            continue
        if wire != 2:
            raise _malformed(f"field {field} should be a message", where, start)
        index = counts[field] = counts.get(field, -1) + 1
        if holds_key is not None and not holds_key(value[0], value[1]):
            continue
        name = child[1] if kind == "model" and field == 7 else f"{child[1]}[{index}]"
        _walk(buf, value[0], value[1], child[0], name if kind == "model" else f"{where}.{name}", depth + 1, out, holds_key)


def _tensor(buf: memoryview, start: int, end: int, where: str, out: list[ExternalRef]) -> None:
    name, external, locations, has_entries = "", False, [], False
    for field, wire, value in _fields(buf, start, end, where):
        if field == 8 and wire == 2:
            name = _text(buf, value, where)
        elif field == 14 and wire == 0:
            external = value == _EXTERNAL
        elif field == 13 and wire == 2:
            has_entries = True
            key, entry_value = None, None
            for f, w, v in _fields(buf, value[0], value[1], where):
                if f == 1 and w == 2:
                    key = _text(buf, v, where)
                elif f == 2 and w == 2:
                    entry_value = _text(buf, v, where)
            if key == "location":
                locations.append(entry_value if entry_value is not None else "")
        elif field in (8, 13, 14):
            raise _malformed(f"field {field} has wire type {wire}", where, start)
    if external or has_entries:
        for location in locations or [None]:
            out.append(ExternalRef(name, location, where))


__all__ = ["ExternalRef", "external_data_refs", "external_data_locations"]
