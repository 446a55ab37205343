"""What an ONNX graph file declares, read from its protobuf wire format (no ``onnx`` package).

The runtime must refuse a graph that is truncated or not ONNX, or whose external data lies
outside the artifact, BEFORE an engine parses it (ONNX Runtime and OpenVINO fail with their own
multi-line errors). This reader walks the file (memory-mapped: large tensors are skipped, never
copied) and returns the graph inputs' declared shapes and every external-data location, from
initializers, sparse initializers and tensor attributes of nodes (subgraphs included).

Field numbers are those of ``onnx.proto`` (ModelProto.graph = 7, GraphProto.input = 11, ...).
Torch-free and numpy-free: the standard library only.
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from anoclip_core.errors import ArtifactError

Dim = int | str | None  # a fixed size, a symbolic name, or unknown

# onnx.proto field numbers used here
_MODEL_IR_VERSION, _MODEL_GRAPH = 1, 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_SPARSE_INITIALIZER = 1, 5, 11, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR, _TENSOR_SHAPE, _SHAPE_DIM = 1, 2, 1
_DIM_VALUE, _DIM_PARAM = 1, 2
_MAX_DEPTH = 16  # nested subgraphs; deeper is not a graph we exported


class _Malformed(Exception):
    """The bytes are not a well-formed protobuf message."""


@dataclass
class GraphInfo:
    """Declared graph inputs (name -> dims) and external-data locations (as written in the file)."""

    inputs: dict[str, list[Dim]] = field(default_factory=dict)
    external_locations: list[str] = field(default_factory=list)


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("varint runs past its message")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) of one message's fields."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise _Malformed("fixed-size field runs past its message")
            yield number, wire, pos, pos + size
            pos += size
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed("length-delimited field runs past its message (truncated file?)")
            yield number, wire, pos, pos + length
            pos += length
        else:
            raise _Malformed(f"unsupported wire type {wire}")


def _text(buf: mmap.mmap | bytes, start: int, end: int) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("a name is not UTF-8") from None


def _dims(buf: mmap.mmap | bytes, start: int, end: int) -> list[Dim]:
    """ValueInfoProto -> its tensor shape's dims (empty when the type declares no shape)."""
    dims: list[Dim] = []
    for num, wire, a, b in _fields(buf, start, end):
        if num != _VALUE_TYPE or wire != 2:
            continue
        for n2, w2, a2, b2 in _fields(buf, a, b):
            if n2 != _TYPE_TENSOR or w2 != 2:
                continue
            for n3, w3, a3, b3 in _fields(buf, a2, b2):
                if n3 != _TENSOR_SHAPE or w3 != 2:
                    continue
                for n4, w4, a4, b4 in _fields(buf, a3, b3):
                    if n4 == _SHAPE_DIM and w4 == 2:
                        dims.append(_one_dim(buf, a4, b4))
    return dims


def _one_dim(buf: mmap.mmap | bytes, start: int, end: int) -> Dim:
    dim: Dim = None
    for num, wire, a, b in _fields(buf, start, end):
        if num == _DIM_VALUE and wire == 0:
            dim = int(a)
        elif num == _DIM_PARAM and wire == 2:
            dim = _text(buf, a, b)
    return dim


def _tensor_locations(buf: mmap.mmap | bytes, start: int, end: int, out: list[str]) -> None:
    """TensorProto -> the ``location`` of its external data, if any."""
    for num, wire, a, b in _fields(buf, start, end):
        if num != _TENSOR_EXTERNAL_DATA or wire != 2:
            continue
        key = value = None
        for n2, w2, a2, b2 in _fields(buf, a, b):
            if n2 == _ENTRY_KEY and w2 == 2:
                key = _text(buf, a2, b2)
            elif n2 == _ENTRY_VALUE and w2 == 2:
                value = _text(buf, a2, b2)
        if key == "location" and value is not None:
            out.append(value)


def _node_locations(buf: mmap.mmap | bytes, start: int, end: int, out: list[str], depth: int) -> None:
    """NodeProto -> external data of its tensor attributes and subgraphs."""
    for num, wire, a, b in _fields(buf, start, end):
        if num != _NODE_ATTRIBUTE or wire != 2:
            continue
        for n2, w2, a2, b2 in _fields(buf, a, b):
            if w2 != 2:
                continue
            if n2 in (_ATTR_T, _ATTR_TENSORS):
                _tensor_locations(buf, a2, b2, out)
            elif n2 in (_ATTR_G, _ATTR_GRAPHS):
                _graph(buf, a2, b2, None, out, depth + 1)


def _graph(buf: mmap.mmap | bytes, start: int, end: int, inputs: dict[str, list[Dim]] | None, out: list[str],
           depth: int) -> None:
    """GraphProto -> its inputs (top level only) and every external-data location inside it."""
    if depth > _MAX_DEPTH:
        raise _Malformed("subgraphs nested too deep")
    for num, wire, a, b in _fields(buf, start, end):
        if wire != 2:
            continue
        if num == _GRAPH_INITIALIZER:
            _tensor_locations(buf, a, b, out)
        elif num == _GRAPH_SPARSE_INITIALIZER:
            for n2, w2, a2, b2 in _fields(buf, a, b):
                if n2 in (_SPARSE_VALUES, _SPARSE_INDICES) and w2 == 2:
                    _tensor_locations(buf, a2, b2, out)
        elif num == _GRAPH_NODE:
            _node_locations(buf, a, b, out, depth)
        elif num == _GRAPH_INPUT and inputs is not None:
            name = ""
            for n2, w2, a2, b2 in _fields(buf, a, b):
                if n2 == _VALUE_NAME and w2 == 2:
                    name = _text(buf, a2, b2)
            inputs[name] = _dims(buf, a, b)


def _parse(buf: mmap.mmap | bytes, size: int) -> GraphInfo:
    info = GraphInfo()
    graph = None
    has_version = False
    for num, wire, a, b in _fields(buf, 0, size):
        if num == _MODEL_IR_VERSION and wire == 0:
            has_version = True
        elif num == _MODEL_GRAPH and wire == 2:
            graph = (a, b)
    if graph is None or not has_version:
        raise _Malformed("no ir_version or no graph")
    _graph(buf, graph[0], graph[1], info.inputs, info.external_locations, 0)
    return info


def read_graph_info(path: str | os.PathLike) -> GraphInfo:
    """Declared inputs and external-data locations of an ONNX file; ``ArtifactError`` (one line,
    naming the file) when it is missing, empty, truncated or not an ONNX model."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise ArtifactError(f"{name}: not a valid ONNX graph (empty file)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, size)
    except _Malformed as err:
        raise ArtifactError(f"{name}: not a valid ONNX graph ({err})") from None
    except OSError as err:
        raise ArtifactError(f"cannot read graph {name}: {err.strerror or err}") from None
