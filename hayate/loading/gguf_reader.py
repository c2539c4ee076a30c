"""The gguf package's GGUFReader, parsing metadata arrays in bulk and refusing any count,
length or offset that reaches past the end of the file before acting on it."""
from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Callable

import gguf
import numpy as np

from hayate.loading.gguf_checks import check_array_length, check_tensor_info

ValueType = gguf.GGUFValueType
# Fewest bytes a metadata field (key length, a 1-byte key, type, a 1-byte value) and a tensor
# entry (name length, a 1-byte name, dimension count, type, offset) take.
_MIN_FIELD_BYTES, _MIN_TENSOR_BYTES = 14, 25
_LENGTH = struct.Struct("=Q")   # a string's byte count, before its bytes


class ArrayParts(Sequence):
    """A metadata array field's parts in the stock reader's layout (the header's, then each
    element's: (length, bytes) per string, one value otherwise), an element's made only when
    asked for; `values` holds the elements, read in bulk. Numpy views of each string of a
    151k-token vocabulary took ~0.5 s, for the reader and then for reading them again."""

    def __init__(self, head: list[np.ndarray], count: int, element_parts: Callable[[int], tuple], values: list):
        self.head, self.count, self.values = head, count, values
        self._element_parts = element_parts
        self._per_element = len(element_parts(0)) if count else 1

    def with_head(self, head: list[np.ndarray]) -> ArrayParts:
        return ArrayParts(head + self.head, self.count, self._element_parts, self.values)

    def data_indices(self) -> list[int]:
        """Indices of the parts that hold the values (a string's bytes), as ReaderField.data."""
        return list(range(len(self.head) + self._per_element - 1, len(self), self._per_element))

    def __len__(self) -> int:
        return len(self.head) + self.count * self._per_element

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError("part index out of range")
        index %= len(self)
        if index < len(self.head):
            return self.head[index]
        element, part = divmod(index - len(self.head), self._per_element)
        return self._element_parts(element)[part]


class FastReader(gguf.GGUFReader):
    """GGUFReader whose array fields hold ArrayParts (the stock reader's parts and data
    indices, made on demand), and which refuses (ValueError) any count, length or offset that
    reaches past the end of the file before acting on it."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        # The stock reader would return a short (or empty) view and read on from there.
        if int(offset) + np.dtype(dtype).itemsize * int(count) > self.data.size:
            raise ValueError(f"the field at byte {int(offset)} runs past the end of the file")
        return super()._get(offset, dtype, count, override_order)

    def _build_fields(self, offs: int, count: int) -> int:
        if self.byte_order != "I":
            raise ValueError("its byte order is not this machine's, which hayate does not read")
        if int(count) * _MIN_FIELD_BYTES > self.data.size - offs:
            raise ValueError(f"the header claims {int(count)} metadata fields, more than the file holds")
        for _ in range(int(count)):   # the stock loop, without copying an array's parts into a list
            start = offs
            key_length, key = self._get_str(offs)
            offs += 8 + int(key_length[0])
            value_type = self._get(offs, np.uint32)
            size, parts, data, types = self._get_field_parts(offs + 4, value_type[0])
            head = [key_length, key, value_type]
            if isinstance(parts, ArrayParts):
                parts = parts.with_head(head)
                data = parts.data_indices()
            else:
                parts, data = head + parts, [index + len(head) for index in data]
            self._push_field(gguf.ReaderField(start, str(bytes(key), encoding="utf-8"), parts, data, types),
                             skip_sum=True)
            offs += 4 + size
        return offs

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list]:
        if int(count) * _MIN_TENSOR_BYTES > self.data.size - offs:
            raise ValueError(f"the header claims {int(count)} tensors, more than the file holds")
        return super()._build_tensor_info(offs, count)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        for field in fields:
            _name_length, name, _n_dims, dims, raw_type, offset = field.parts
            check_tensor_info(bytes(name).decode("utf-8", errors="replace"), [int(d) for d in dims],
                              int(raw_type[0]), int(offset[0]), start_offs, self.data.size)
        super()._build_tensors(start_offs, fields)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, Sequence, list[int], list]:
        if _value_type(raw_type, orig_offs) != ValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = struct.unpack_from("=IQ", self.data, orig_offs)
        scalar = self.gguf_scalar_to_np.get(_value_type(item_type, orig_offs))
        item_bytes = {ValueType.STRING: 8, ValueType.ARRAY: 12}.get(item_type) or np.dtype(scalar).itemsize
        check_array_length(count, item_bytes, self.data.size - orig_offs - 12, orig_offs)
        if item_type == ValueType.STRING:
            element_parts, values, end = self._strings(orig_offs + 12, count)
        elif scalar is not None:
            element_parts, values, end = self._scalars(orig_offs + 12, count, np.dtype(scalar))
        else:  # arrays of arrays, each read through this method again
            return super()._get_field_parts(orig_offs, raw_type)
        header = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
        parts = ArrayParts(header, count, element_parts, values)
        types = [ValueType.ARRAY] + ([ValueType(item_type)] if count else [])
        return end - orig_offs, parts, parts.data_indices(), types

    def _strings(self, offs: int, count: int) -> tuple[Callable[[int], tuple], list[str], int]:
        """Where each string starts (each length says where the next one starts), then all
        of them decoded."""
        raw = self.data.view(np.ndarray)  # plain ndarray: memmap slicing is slow
        unpack, starts = _LENGTH.unpack_from, []
        for _ in range(count):
            (length,) = unpack(raw, offs)
            offs += 8 + length
            if offs > raw.size:
                raise ValueError("string runs past the end of the file")
            starts.append(offs - length)

        def element_parts(index: int) -> tuple[np.ndarray, np.ndarray]:
            length = raw[starts[index] - 8:starts[index]].view(np.uint64)
            return length, raw[starts[index]:starts[index] + int(length[0])]
        return element_parts, _decoded(raw, starts, offs), offs

    def _scalars(self, offs: int, count: int, dtype: np.dtype) -> tuple[Callable[[int], tuple], list, int]:
        end = offs + count * dtype.itemsize
        if end > self.data.size:
            raise ValueError("array runs past the end of the file")
        values = self.data.view(np.ndarray)[offs:end].view(dtype)
        return lambda index: (values[index:index + 1],), values.tolist(), end


def _value_type(raw_type: int, offset: int) -> ValueType:
    try:
        return ValueType(int(raw_type))
    except ValueError:
        raise ValueError(f"the field at byte {offset} has unknown value type {int(raw_type)}") from None


def _decoded(raw: np.ndarray, starts: list[int], end: int) -> list[str]:
    """The strings at `starts` (each ends 8 bytes, its successor's length, before the next
    starts; the last at `end`), decoded in one call: joined by a NUL byte where each length
    was, then split. One by one (bad bytes replaced by U+FFFD) where a string holds a NUL or
    bytes that are not UTF-8."""
    if not starts:
        return []
    later = np.array(starts[1:], dtype=np.int64) - starts[0]   # into the joined bytes
    joined = raw[starts[0]:end].copy()
    joined[later - 1] = 0   # the last byte of each length the NUL, bytes 0..6 dropped
    keep = np.ones(joined.size, dtype=bool)
    keep[(later[:, None] - np.arange(8, 1, -1)).ravel()] = False
    try:
        strings = joined[keep].tobytes().decode("utf-8").split("\0")
    except UnicodeDecodeError:
        strings = []
    if len(strings) == len(starts):
        return strings
    ends = [start - 8 for start in starts[1:]] + [end]
    return [raw[start:stop].tobytes().decode("utf-8", errors="replace") for start, stop in zip(starts, ends)]


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields of a GGUF file as plain Python values (str, int, float, bool, list)."""
    return {name: _field_value(field) for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def _field_value(field: gguf.ReaderField) -> Any:
    if isinstance(field.parts, ArrayParts) and len(field.types) == 2:
        return list(field.parts.values)   # the caller's own list
    if field.types == [ValueType.FLOAT32]:
        # The shortest decimal that rounds to this float32: 1e-05, not 9.999999747378752e-06.
        return float(str(field.parts[-1][0]))
    if field.types == [ValueType.STRING]:
        return field.parts[-1].tobytes().decode("utf-8", errors="replace")
    if len(field.types) != 2 or field.types[0] != ValueType.ARRAY:
        return field.contents()  # scalars, strings, empty and nested arrays
    if field.types[1] == ValueType.STRING:   # the stock reader's (tests compare the two)
        return [field.parts[i].tobytes().decode("utf-8", errors="replace") for i in field.data]
    if field.types[1] == ValueType.ARRAY:
        return field.contents()
    return np.concatenate([field.parts[i] for i in field.data]).tolist()
