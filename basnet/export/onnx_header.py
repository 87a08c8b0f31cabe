"""What the bulk job checks in an ONNX file, read without parsing its weights.

An ONNX model is one protobuf message; BASNet's weights are 350 MB of it. Parsing it whole
(``onnx.load``) to read its image input and its size metadata took about 2 s and 0.7 GB at the
start of every masking run. This walks the message's fields instead, reading the small ones
(the graph's inputs, the initializers' names and data locations, the metadata) and seeking past
the rest, so a local file costs a few hundred small reads. ONNX Runtime still loads the file
itself, and refuses what this walk cannot see (an operator it lacks).

Field numbers are ONNX's (onnx/onnx.proto3): ModelProto graph 7, metadata_props 14; GraphProto
initializer 5, input 11; TensorProto name 8, data_location 14.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

__all__ = ["OnnxHeader", "read_header"]

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_MODEL_GRAPH, _MODEL_METADATA = 7, 14
_GRAPH_INITIALIZER, _GRAPH_INPUT = 5, 11
_TENSOR_NAME, _TENSOR_DATA_LOCATION = 8, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass
class OnnxHeader:
    inputs: list = field(default_factory=list)  # onnx.ValueInfoProto of every graph input
    initializers: set[str] = field(default_factory=set)  # their names (inputs that are weights)
    external: bool = False  # any initializer kept in an external data file
    metadata: dict[str, str] = field(default_factory=dict)


def _varint(f: BinaryIO) -> int:
    value = 0
    for shift in range(0, 70, 7):
        byte = f.read(1)
        if not byte:
            raise ValueError("truncated varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    raise ValueError("varint longer than 10 bytes")


def _fields(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value, length) of each field of the message in ``[start, end)``: a
    varint's value, or a length-delimited field's payload offset and length (the consumer may read
    it; the walk seeks past it when resumed)."""
    f.seek(start)
    while (position := f.tell()) < end:
        key = _varint(f)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {position}")
        if wire == _VARINT:
            value = _varint(f)
            if (after := f.tell()) > end:
                raise ValueError(f"field {number} at byte {position} runs past the end of its message")
            yield number, wire, value, 0
            f.seek(after)
            continue
        if wire in (_FIXED64, _FIXED32):
            if f.seek(8 if wire == _FIXED64 else 4, io.SEEK_CUR) > end:
                raise ValueError(f"field {number} at byte {position} runs past the end of its message")
            continue
        if wire != _BYTES:
            raise ValueError(f"wire type {wire} at byte {position}")
        length = _varint(f)
        offset = f.tell()
        if offset + length > end:
            raise ValueError(f"field {number} at byte {position} runs past the end of its message")
        yield number, wire, offset, length
        f.seek(offset + length)


def _read(f: BinaryIO, offset: int, length: int) -> bytes:
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise ValueError("truncated field")
    return data


def read_header(source: bytes | BinaryIO) -> OnnxHeader:
    """The inputs, initializer names and locations, and metadata of an ONNX model.

    Raises:
        ValueError: The bytes are not a well-formed protobuf message holding a graph.
    """
    import onnx

    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    end = f.seek(0, io.SEEK_END)
    header, graph = OnnxHeader(), None
    for number, wire, offset, length in _fields(f, 0, end):
        if number == _MODEL_GRAPH and wire == _BYTES:
            graph = (offset, offset + length)
        elif number == _MODEL_METADATA and wire == _BYTES:
            entry = onnx.StringStringEntryProto.FromString(_read(f, offset, length))
            header.metadata[entry.key] = entry.value
    if graph is None:
        raise ValueError("no graph")
    for number, wire, offset, length in _fields(f, *graph):
        if number == _GRAPH_INPUT and wire == _BYTES:
            header.inputs.append(onnx.ValueInfoProto.FromString(_read(f, offset, length)))
        elif number == _GRAPH_INITIALIZER and wire == _BYTES:
            for t_number, t_wire, t_value, t_length in _fields(f, offset, offset + length):
                if t_number == _TENSOR_NAME and t_wire == _BYTES:
                    header.initializers.add(_read(f, t_value, t_length).decode("utf-8", "replace"))
                elif t_number == _TENSOR_DATA_LOCATION and t_wire == _VARINT and t_value == _EXTERNAL:
                    header.external = True
    return header
