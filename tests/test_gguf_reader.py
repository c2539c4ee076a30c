"""FastReader against the gguf package's own reader: the same fields, parts and values for
string and number arrays, the bulk decoding's one-by-one fallback included."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from hayate.loading.gguf_reader import FastReader, read_metadata

ValueType = gguf.GGUFValueType
# Bytes that are not UTF-8, a NUL inside a string, empty strings, multi-byte characters.
AWKWARD = [b"plain", b"", "Ġé日本🚀".encode(), b"bad\xff\xfe", b"nul\x00inside", b"\xe6\x97", b"", b"end"]


def write_metadata(path, strings: list[bytes]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("test.strings", strings)
    writer.add_array("test.numbers", [1.5, -2.25, 3.0])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_string("test.text", "héllo")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def contents(field: gguf.ReaderField):
    """ReaderField.contents(), or the error the stock reader's strict decoding raises."""
    try:
        return field.contents()
    except UnicodeDecodeError:
        return UnicodeDecodeError


@pytest.mark.parametrize("strings", [AWKWARD, [s for s in AWKWARD if b"\x00" not in s and s.isascii()],
                                     [b"x" * n for n in range(300)]], ids=["awkward", "ascii", "lengths"])
def test_fast_reader_matches_stock_reader(tmp_path, strings):
    path = tmp_path / "meta.gguf"
    write_metadata(path, strings)
    fast, stock = FastReader(path), gguf.GGUFReader(path)
    assert list(fast.fields) == list(stock.fields)
    for name, field in stock.fields.items():
        twin = fast.fields[name]
        assert (twin.types, twin.data, twin.offset) == (field.types, field.data, field.offset), name
        assert len(twin.parts) == len(field.parts), name
        assert all(np.array_equal(a, b) for a, b in zip(twin.parts[-3:], field.parts[-3:])), name   # slices
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(twin.parts, field.parts)), name
        assert contents(twin) == contents(field), name
    metadata = read_metadata(fast)
    assert metadata == read_metadata(stock)
    assert metadata["test.strings"] == [s.decode("utf-8", errors="replace") for s in strings]
    assert metadata["test.numbers"] == [1.5, -2.25, 3.0]


def test_truncated_string_array_is_refused(tmp_path):
    path = tmp_path / "meta.gguf"
    write_metadata(path, AWKWARD)
    data = path.read_bytes()
    cut = data.index(b"nul\x00inside") + 2   # inside a string of the array
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(ValueError, match="runs past the end of the file"):
        FastReader(tmp_path / "cut.gguf")
