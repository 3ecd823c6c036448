"""Reading and writing item tables as CSV, JSONL or Parquet, chosen by file extension."""

import csv
import io
import json
from datetime import datetime
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from services.errors import InvalidInput

TableFormat = Literal["csv", "jsonl", "parquet"]
_SUFFIXES: dict[str, TableFormat] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def table_format(name: str) -> TableFormat:
    """The format a file name's extension names; InvalidInput for anything else."""
    suffix = Path(name).suffix.lower()
    if suffix not in _SUFFIXES:
        raise InvalidInput(f"{name!r}: expected a .csv, .jsonl or .parquet file")
    return _SUFFIXES[suffix]


def read_table_bytes(data: bytes, fmt: TableFormat, *, name: str) -> pa.Table:
    """Parse a table; every column of CSV and JSONL input is read as text, so ids such as
    "007" keep their leading zeros. A malformed file is InvalidInput naming it."""
    try:
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(data))
        if fmt == "csv":
            first_line = data.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")
            header = next(csv.reader([first_line]), [])
            return pacsv.read_csv(
                io.BytesIO(data),
                convert_options=pacsv.ConvertOptions(
                    column_types={column: pa.string() for column in header},
                    strings_can_be_null=False,
                ),
            )
        table = pajson.read_json(io.BytesIO(data))
        return table.cast(pa.schema([pa.field(f.name, _as_text(f.type)) for f in table.schema]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
        raise InvalidInput(f"{name}: cannot read as {fmt}: {error}") from None


def _as_text(kind: pa.DataType) -> pa.DataType:
    return pa.string() if pa.types.is_integer(kind) or pa.types.is_string(kind) else kind


def read_table_file(path: Path) -> pa.Table:
    fmt = table_format(path.name)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidInput(f"cannot read {path}: {error.strerror}") from None
    return read_table_bytes(data, fmt, name=str(path))


def table_bytes(table: pa.Table, fmt: TableFormat) -> bytes:
    """`table` serialized as `fmt` (timestamps as ISO 8601 in CSV and JSONL)."""
    if fmt == "parquet":
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        return buffer.getvalue()
    if fmt == "csv":
        sink = io.BytesIO()
        pacsv.write_csv(table, sink)
        return sink.getvalue()
    return "".join(_json_line(row) for row in table.to_pylist()).encode("utf-8")


def write_table_file(table: pa.Table, path: Path) -> None:
    """Write `table` in the format `path`'s extension names (see `table_bytes`)."""
    fmt = table_format(path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(table_bytes(table, fmt))


def _json_line(row: dict[str, object]) -> str:
    return (
        json.dumps(
            {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()},
            ensure_ascii=False,
        )
        + "\n"
    )
